"""Verified builds kept on a node for its kernels, and how a node finds the build for a kernel.

A node (a host, or the driver container with the host at /host) keeps verified builds under
ROOT/var/lib/cudabuild/staged/RELEASE/NAME/ (an artifact: manifest.json, modules/, userspace/), so
that the kernel it boots next needs no network. A build for a kernel is looked for, in order:

1. staged for that kernel, of the configured driver and flavour, passing what a pull is checked
   for with what the host has now (its Module.symvers may have come after the build was staged);
2. in the registry (REPO/modules:TAG, pulled over the registry's HTTP API: a node has no Docker
   engine), each candidate tag in turn, checked like every artifact (each file's digest, the labels
   against the manifest, the driver against its tag and the node's, vermagic and version, and the
   symbol CRCs against the kernel's own Module.symvers when the host has it) and then staged;
3. unless the fallback is off: the same for another driver version (staged first), said as a
   fallback everywhere a person or a script looks.

A build that a boot test rejected under a configuration this node has (boot_verdict: signature
enforcement as the node reports it) is never used. What a node was configured with (driver,
flavour, registry, fallback, the driver it installed) is kept in ROOT/var/lib/cudabuild/node.json,
so that `cudabuild ready`, `stage` and the kernel hook answer for the same driver as the driver
container. Everything here lives under cudabuild's own directories and is written and removed
without following a link (host.root.owned_directory)."""

from __future__ import annotations

import re
import shutil
import stat
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from cudabuild import artifact
from cudabuild.artifact import Artifact, read_labels
from cudabuild.artifact.admit import Intake, admit
from cudabuild.errors import ArtifactError, InputError, RegistryError, TrustError, VerifyError, printable, shown
from cudabuild.host.root import HostPathError, HostRoot
from cudabuild.node.config import NodeConfig
from cudabuild.nvidia import FULL_DRIVER_RE, RELEASE_RE
from cudabuild.registry import LayerStore
from cudabuild.registry.trust import require_signed
from cudabuild.ui import Reporter

STAGED = "var/lib/cudabuild/staged"
LAYERS = "var/lib/cudabuild/layers"  # userspace layers pulled, by digest: the next kernel's pull links them
STAGE_LOCK = "var/lib/cudabuild/.stage.lock"  # one stage or pull at a time on a node
LEFTOVER_PREFIXES = (".pull-", ".staging-", ".broken-")  # a stage's work directories: stale under the lock
MODULES_REPOSITORY = "modules"  # REPO/modules:TAG, as `cudabuild modules --registry REPO` pushes
# Where a host keeps its kernel's Module.symvers (Debian: the headers package, linked from build/).
SYMVERS_PLACES = ("lib/modules/{release}/build/Module.symvers", "usr/src/linux-headers-{release}/Module.symvers",
                  "usr/lib/modules/{release}/build/Module.symvers")


@dataclass(frozen=True)
class Found:
    """A verified build for a kernel, and where it came from."""

    artifact: Artifact
    source: str  # "staged" or "registry"
    ref: str | None = None  # the registry's tag it came from
    fallback_from: str | None = None  # the configured driver, when another version stands in

    def to_json(self) -> dict:
        m = self.artifact.manifest
        return {"kernel": m.kernel_release, "driver": m.driver_version, "flavor": m.flavor, "source": self.source,
                "ref": self.ref, "fallback_from": self.fallback_from, "boot_test": m.boot_summary}


# ---- boot-test verdicts: each belongs to the configuration it judged ---------------------------------
_ENFORCING_APPEND = re.compile(r"(?:^|\s)(?:module\.sig_enforce=(?:1|y|Y)|lockdown=(?:integrity|confidentiality))"
                               r"(?=\s|$)")


def enforcing_append(append: str) -> bool:
    """Whether a kernel command line enforces module signatures (module.sig_enforce=1, or a
    lockdown that implies it)."""
    return bool(_ENFORCING_APPEND.search(append or ""))


def node_enforces(host: HostRoot) -> bool:
    """Whether the node's kernel enforces module signatures: /sys/module/module/parameters/sig_enforce
    is Y, or /sys/kernel/security/lockdown has integrity or confidentiality selected."""
    def read(rel: str) -> str:
        try:
            return host.read_text(rel, limit=4096)
        except HostPathError:
            return ""

    lockdown = read("sys/kernel/security/lockdown")
    return read("sys/module/module/parameters/sig_enforce").strip() in ("Y", "1") or \
        "[integrity]" in lockdown or "[confidentiality]" in lockdown


def boot_verdict(checked: Artifact, *, enforcing: bool) -> dict | None:
    """The boot test that rejects this build on a node (None: none does). A rejection under a
    command line that enforces signatures applies only to a node that enforces them; any other
    rejection applies to every node."""
    for verdict in reversed(checked.manifest.verdicts):
        if verdict.get("verdict") == "rejected" and (enforcing or not enforcing_append(str(verdict.get("append", "")))):
            return verdict
    return None


def rejection(verdict: dict) -> str:
    append = str(verdict.get("append") or "")
    return (f"the real kernel {shown(str(verdict.get('kernel')))} rejected it in its boot test"
            + (f" with {shown(append)}" if append else "") + "; not used")


# ---- staged builds --------------------------------------------------------------------------------
def staged(host: HostRoot, release: str, *, reporter: Reporter | None = None) -> list[Artifact]:
    """The whole, checked builds staged for `release` (each file against its manifest); a staged
    copy that fails its check, or a link where a staged build belongs, is said and left out."""
    found = []
    for name, st in host.owned_entries(f"{STAGED}/{release}"):
        if name.startswith("."):
            continue
        if not stat.S_ISDIR(st.st_mode):
            if reporter:
                reporter.note(f"{printable(host.root / STAGED / release / name)} is not a directory cudabuild staged; "
                              "not used")
            continue
        try:
            checked = artifact.load(host.owned_path(f"{STAGED}/{release}/{name}"))
        except (ArtifactError, VerifyError, InputError) as exc:
            if reporter:
                reporter.note(f"the staged build {STAGED}/{release}/{name} is not whole ({exc}); not used")
            continue
        if checked.manifest.kernel_release == release:
            found.append(checked)
    return found


def staged_releases(host: HostRoot) -> list[str]:
    """The kernels with staged builds (real directories only: a link there is not cudabuild's)."""
    return [name for name, st in host.owned_entries(STAGED)
            if RELEASE_RE.fullmatch(name) and not name.startswith(".") and stat.S_ISDIR(st.st_mode)]


def _name(checked: Artifact) -> str:
    m = checked.manifest
    return f"{m.driver_version}-{m.flavor}-{m.key[:12]}"


def stage(host: HostRoot, checked: Artifact, *, move: bool = False) -> Path:
    """A copy of a checked artifact, staged for its kernel (a copy beside it, renamed into place;
    with `move`, a pull's own directory beside it is renamed, its files, linked from the node's
    userspace layers, kept as they are). A staged copy of the same build that is whole is kept; one
    that is not is replaced. Nothing is written or removed through a link (NotOursError)."""
    release = checked.manifest.kernel_release
    rel = f"{STAGED}/{release}/{_name(checked)}"
    parent = host.owned_path(f"{STAGED}/{release}", create=True)
    target = parent / _name(checked)
    if target.is_symlink():
        host.remove_owned(rel)  # refuses, naming the link
    if target.is_dir():
        try:
            artifact.load(target)
            return target
        except (ArtifactError, VerifyError):
            host.remove_owned(rel)
    if move and checked.root.parent.parent == parent:  # a pull's work directory, on the same file system
        checked.root.chmod(0o755)
        checked.root.rename(target)
        return target
    work = Path(tempfile.mkdtemp(prefix=".staging-", dir=parent))
    try:
        checked.copy_to(lambda rel: work / rel, manifest=work / artifact.MANIFEST)
        work.chmod(0o755)
        work.rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def remove_leftovers(host: HostRoot, release: str) -> None:
    """The work directories of a stage or pull that was killed (held under STAGE_LOCK: none runs now)."""
    for name, st in host.owned_entries(f"{STAGED}/{release}"):
        if name.startswith(LEFTOVER_PREFIXES) and stat.S_ISDIR(st.st_mode):
            host.remove_owned(f"{STAGED}/{release}/{name}")


def prune(host: HostRoot, keep: set[str], *, reporter: Reporter | None = None) -> list[str]:
    """Remove the staged builds of kernels not in `keep` (those no longer installed); what was
    removed. A link among them is left where it is and said: it is not cudabuild's."""
    removed = []
    for name, st in host.owned_entries(STAGED):
        if not RELEASE_RE.fullmatch(name) or name.startswith(".") or name in keep:
            continue
        if not stat.S_ISDIR(st.st_mode):
            if reporter:
                reporter.warn(f"not pruned: {printable(host.root / STAGED / name)} is not a directory cudabuild staged "
                              "(a link or a file); remove it yourself if nothing needs it")
            continue
        host.remove_owned(f"{STAGED}/{name}")
        removed.append(name)
    if removed:
        prune_layers(host)
    return removed


def prune_layers(host: HostRoot) -> None:
    """Remove the userspace layers no staged build links any more (every file's only link is the
    layer's own): a driver the node moved away from does not stay on its disk."""
    for name, st in host.owned_entries(f"{LAYERS}/sha256"):
        if name.startswith(".") or not stat.S_ISDIR(st.st_mode):
            continue
        top = host.owned_path(f"{LAYERS}/sha256/{name}")
        files = [p for p in top.rglob("*") if p.is_file() and not p.is_symlink()]
        if all(p.stat().st_nlink == 1 for p in files):
            host.remove_owned(f"{LAYERS}/sha256/{name}")


# ---- looking for a build ------------------------------------------------------------------------------
def _best(builds: list[Artifact], *, enforcing: bool = False) -> Artifact | None:
    """The newest driver version; of one version, the build with the most modules."""
    from cudabuild.nvidia import version_tuple

    usable = [b for b in builds if boot_verdict(b, enforcing=enforcing) is None]
    usable.sort(key=lambda b: (version_tuple(b.manifest.driver_version), len(b.manifest.modules)), reverse=True)
    return usable[0] if usable else None


def registry_candidates(registry, release: str) -> list[tuple[str, str]]:
    """(tag, driver version) of the registry's modules images for `release`, newest driver first,
    full module sets before subsets."""
    from cudabuild.nvidia import version_tuple

    suffix = "-" + release.replace("+", "_")
    found = []
    for tag in registry.tags(MODULES_REPOSITORY):
        if not tag.endswith(suffix):
            continue
        driver = tag.split("-", 1)[0]
        if FULL_DRIVER_RE.fullmatch(driver):
            found.append((tag, driver))
    found.sort(key=lambda item: (version_tuple(item[1]), "-only." not in item[0]), reverse=True)
    return found


def host_symvers(host: HostRoot, release: str) -> Path | None:
    for place in SYMVERS_PLACES:
        rel = place.format(release=release)
        try:
            path = host.resolve(rel)
        except InputError:
            continue
        if path.is_file():
            return path
    return None


def check_for_host(host: HostRoot, checked: Artifact, release: str, *, reporter: Reporter | None = None) -> None:
    """What `stage` checks of a build before it keeps it, with what the host has now: its kernel,
    vermagic and version, and the symbol CRCs against the kernel's Module.symvers when the host has
    it (headers installed after a build was staged count). VerifyError otherwise."""
    from cudabuild.verify import verify_modules

    m = checked.manifest
    if m.kernel_release != release:
        raise VerifyError(f"it is a build for {m.kernel_release}, not {release}")
    symvers = host_symvers(host, release)
    if symvers is None and reporter:
        reporter.note(f"symbol CRCs not checked: the host has no Module.symvers for {release}")
    verify_modules(checked.root / "modules", release=release, driver_version=m.driver_version,
                   expected=[e.name for e in m.modules], symvers=symvers,
                   modversions=m.modversions and symvers is not None)


def pull_checked(host: HostRoot, registry, ref: str, release: str, *, reporter: Reporter,
                 driver: str | None = None, config: NodeConfig | None = None) -> Artifact:
    """The modules image `ref`, pulled over the registry's API into a staging directory on the
    node, checked against what was asked (the kernel, the tag's driver `driver`, the node's driver
    and flavour), and staged; a refusal leaves nothing behind."""
    def asked(version: str, flavor: str, kernel: str) -> None:
        """What was asked of this tag: its kernel, the driver its tag names, the node's driver and flavour."""
        if kernel != release:
            raise VerifyError(f"it is a build for {kernel}, not {release}")
        if driver is not None and version != driver:
            raise VerifyError(f"it is driver {version}, but its tag names {driver}")
        if config is not None and not config.wants(version, flavor):
            raise VerifyError(f"it is driver {version} ({flavor}), not the node's {config.described}")

    intake = Intake(ref=ref, fetch_step=f"pull {ref} (the registry's HTTP API)",
                    verify_step="verify it (digests, labels, vermagic, version, symbol CRCs when the host has them)",
                    refused_as=f"the registry's {ref}",
                    hint=f"nothing was staged; push an unchanged build: cudabuild modules --kernel {release} "
                         "--registry REPO")

    def accept(raw: dict[str, str]) -> None:  # before the layer is downloaded: its labels say what it is
        try:
            said = read_labels(raw, ref)
            if said is not None:
                asked(said.driver_version, said.flavor, said.kernel_release)
        except (ArtifactError, VerifyError) as exc:
            raise intake.refuse(exc) from exc

    signed = require_signed(registry, config.verify_key if config is not None else None)
    layers = LayerStore(host.owned_path(LAYERS, create=True))

    def unpack(out: Path):
        def before_layers(found) -> None:  # the signature first, then what the labels say
            if signed is not None:
                signed(found)
            accept(found.labels)

        return read_labels(registry.pull(ref, out, accept=before_layers, layers=layers), ref)

    def keep(checked: Artifact) -> Artifact:
        layers.adopt(checked.root)
        return Artifact(stage(host, checked, move=True), checked.manifest)

    def check(checked: Artifact, work: Path) -> None:
        m = checked.manifest
        asked(m.driver_version, m.flavor, m.kernel_release)
        check_for_host(host, checked, release, reporter=reporter)

    parent = host.owned_path(f"{STAGED}/{release}", create=True)
    return admit(intake, Path(tempfile.mkdtemp(prefix=".pull-", dir=parent)), unpack=unpack, reporter=reporter,
                 keep=keep,
                 discard=lambda work: shutil.rmtree(work, ignore_errors=True), check=check)


def refusal(host: HostRoot, checked: Artifact, release: str) -> str | None:
    """Why a staged build no longer passes check_for_host with what the host has now; None: it passes."""
    try:
        check_for_host(host, checked, release)
    except (VerifyError, InputError) as exc:
        return exc.message
    return None


def usable_staged(host: HostRoot, release: str, *, reporter: Reporter | None = None) -> list[Artifact]:
    """The staged builds for `release` that pass check_for_host now; the others said and left out."""
    usable = []
    for checked in staged(host, release, reporter=reporter):
        why = refusal(host, checked, release)
        if why is None:
            usable.append(checked)
        elif reporter:
            reporter.note(f"the staged build {checked.root.name} for {release} no longer passes its check: "
                          f"{why}; not used")
    return usable


def find_build(host: HostRoot, release: str, config: NodeConfig, *, registry, reporter: Reporter,
               allow_fallback: bool | None = None) -> Found | None:
    """The build for `release`: staged, else the registry's (`registry`, the config's, or None;
    staged on the way), of the configured driver, else (with the fallback) of another; None when
    there is none anywhere. Each registry candidate that is refused or cannot be read is said, and
    the next is tried. A build a boot test rejected for this node's configuration is never used."""
    fallback = config.fallback if allow_fallback is None else allow_fallback
    enforcing = node_enforces(host)
    with host.lock(STAGE_LOCK, waiting=lambda: reporter.note("waiting for another stage on this node")):
        remove_leftovers(host, release)
        here = usable_staged(host, release, reporter=reporter)
        for b in here:
            verdict = boot_verdict(b, enforcing=enforcing)
            if verdict is not None:
                reporter.note(f"the staged build {b.root.name}: {rejection(verdict)}")
        stand_in = replace(config, driver=None)  # what the fallback takes: another version, never another flavour
        candidates, unreachable, refused = None, None, []
        for wanted in (True, False) if fallback else (True,):
            best = _best([b for b in here if config.wants_build(b) == wanted and stand_in.wants_build(b)],
                         enforcing=enforcing)
            if best is not None:
                return Found(best, "staged", fallback_from=None if wanted else config.shown_driver)
            if registry is None:
                continue
            if candidates is None:
                try:
                    candidates = registry_candidates(registry, release)
                except RegistryError as exc:  # what is staged may still serve (the fallback)
                    reporter.note(exc.message)
                    candidates, unreachable = [], exc
            for tag, driver in candidates:
                if config.wants(driver) != wanted:
                    continue
                ref = f"{registry.repo}/{MODULES_REPOSITORY}:{tag}"
                try:
                    pulled = pull_checked(host, registry, ref, release, reporter=reporter, driver=driver,
                                          config=config if wanted else stand_in)
                except (VerifyError, RegistryError, ArtifactError, TrustError) as exc:
                    reporter.note(f"{exc.message}; trying the next")
                    refused.append(exc)
                    continue
                verdict = boot_verdict(pulled, enforcing=enforcing)
                if verdict is not None:
                    reporter.note(f"{ref}: {rejection(verdict)}")
                    continue
                return Found(pulled, "registry", ref=ref, fallback_from=None if wanted else config.shown_driver)
        if unreachable is not None:
            raise unreachable
        for kind in (RegistryError, TrustError):  # every candidate failed the same way: that is the answer
            if refused and all(isinstance(exc, kind) for exc in refused):
                raise refused[-1]
        return None


def where_looked(host: HostRoot, release: str, config: NodeConfig) -> str:
    places = [str(host.root / STAGED / release)]
    if config.registry:
        places.append(f"the registry {config.registry}/{MODULES_REPOSITORY}")
    return " and ".join(places)


def missing(release: str, config: NodeConfig, host: HostRoot) -> str:
    return (f"no verified build for kernel {release} and driver {config.described} in "
            f"{where_looked(host, release, config)}" + ("" if config.fallback else
                                                         " (the fallback to another driver version is off)"))


def build_it(release: str, config: NodeConfig) -> str:
    """The fix when no build exists: the command that builds and pushes it."""
    return (f"build and push it: cudabuild modules --kernel {release} --driver {config.shown_driver} "
            f"--registry {config.registry or 'REPO'}")
