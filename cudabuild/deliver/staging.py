"""Verified builds kept on a node for its kernels, and how a node finds the build for a kernel.

A node (a host, or the driver container with the host at /host) keeps verified builds under
ROOT/var/lib/cudabuild/staged/RELEASE/NAME/ (an artifact: manifest.json, modules/, userspace/), so
that the kernel it boots next needs no network. A build for a kernel is looked for, in order:

1. staged for that kernel, of the configured driver;
2. in the registry (REPO/modules:TAG, pulled over the registry's HTTP API: a node has no Docker
   engine), checked like every artifact (each file's digest, the labels against the manifest,
   vermagic and version, and the symbol CRCs against the kernel's own Module.symvers when the host
   has it) and then staged;
3. unless the fallback is off: the same for another driver version (staged first), said as a
   fallback everywhere a person or a script looks.

A build whose boot test the real kernel rejected is never used. What a node was configured with
(driver, registry, fallback) is kept in ROOT/var/lib/cudabuild/node.json, so that `cudabuild
ready`, `stage` and the kernel hook answer for the same driver as the driver container."""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cudabuild import artifact
from cudabuild.artifact import Artifact, read_labels
from cudabuild.errors import ArtifactError, InputError, RegistryError, VerifyError
from cudabuild.hostfs import HostRoot
from cudabuild.options import FULL_DRIVER_RE, RELEASE_RE, validate_driver
from cudabuild.ui import Reporter

STAGED = "var/lib/cudabuild/staged"
NODE_CONFIG = "var/lib/cudabuild/node.json"
MODULES_REPOSITORY = "modules"  # REPO/modules:TAG, as `cudabuild modules --registry REPO` pushes
# Where a host keeps its kernel's Module.symvers (Debian: the headers package, linked from build/).
SYMVERS_PLACES = ("lib/modules/{release}/build/Module.symvers", "usr/src/linux-headers-{release}/Module.symvers",
                  "usr/lib/modules/{release}/build/Module.symvers")


@dataclass(frozen=True)
class NodeConfig:
    """What a node's driver is: a driver version or branch ("535", "535.309.01"; None: the newest
    there is), the registry it comes from, and whether another version may stand in."""

    driver: str | None = None
    registry: str | None = None
    fallback: bool = True

    def __post_init__(self) -> None:
        if self.driver is not None:
            validate_driver(self.driver)

    @property
    def shown_driver(self) -> str:
        return self.driver or "any"

    def wants(self, version: str) -> bool:
        return self.driver is None or version == self.driver or version.startswith(self.driver + ".")

    def args(self) -> list[str]:
        """The flags that name this driver and registry to `install` and `stage`: --registry R [--driver D]."""
        return [*(["--registry", self.registry] if self.registry else []),
                *(["--driver", self.driver] if self.driver else [])]

    def to_json(self) -> dict:
        return {"driver": self.driver, "registry": self.registry, "fallback": self.fallback}

    def save(self, host: HostRoot) -> None:
        host.write_atomic(NODE_CONFIG, (json.dumps(self.to_json(), indent=2) + "\n").encode())

    @classmethod
    def load(cls, host: HostRoot) -> "NodeConfig | None":
        try:
            data = json.loads(host.read_text(NODE_CONFIG))
        except (InputError, ValueError):
            return None
        if not isinstance(data, dict):
            return None
        driver, registry = data.get("driver"), data.get("registry")
        try:
            return cls(driver=driver if isinstance(driver, str) else None,
                       registry=registry if isinstance(registry, str) else None,
                       fallback=data.get("fallback") is not False)
        except InputError:
            return None


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


def boot_rejected(checked: Artifact) -> bool:
    verdict = checked.manifest.boot_test
    return bool(verdict) and verdict.get("verdict") == "rejected"


# ---- staged builds --------------------------------------------------------------------------------
def staged(host: HostRoot, release: str, *, reporter: Reporter | None = None) -> list[Artifact]:
    """The whole, checked builds staged for `release` (each file against its manifest); a staged
    copy that fails its check is said and left out."""
    found = []
    for name in host.listdir(f"{STAGED}/{release}"):
        if name.startswith("."):
            continue
        try:
            checked = artifact.load(host.resolve(f"{STAGED}/{release}/{name}"))
        except (ArtifactError, VerifyError, InputError) as exc:
            if reporter:
                reporter.note(f"the staged build {STAGED}/{release}/{name} is not whole ({exc}); not used")
            continue
        if checked.manifest.kernel_release == release:
            found.append(checked)
    return found


def staged_releases(host: HostRoot) -> list[str]:
    return [name for name in host.listdir(STAGED) if RELEASE_RE.fullmatch(name) and not name.startswith(".")]


def _name(checked: Artifact) -> str:
    m = checked.manifest
    return f"{m.driver_version}-{m.flavor}-{m.key[:12]}"


def stage(host: HostRoot, checked: Artifact) -> Path:
    """A copy of a checked artifact, staged for its kernel (a copy beside it, renamed into place).
    A staged copy of the same build that is whole is kept; one that is not is replaced."""
    release = checked.manifest.kernel_release
    parent = host.makedirs(f"{STAGED}/{release}")
    target = parent / _name(checked)
    if target.is_dir():
        try:
            artifact.load(target)
            return target
        except (ArtifactError, VerifyError):
            broken = Path(tempfile.mkdtemp(prefix=".broken-", dir=parent))
            target.rename(broken / target.name)
            shutil.rmtree(broken, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=".staging-", dir=parent))
    try:
        checked.copy_to(lambda rel: work / rel, manifest=work / artifact.MANIFEST)
        work.chmod(0o755)
        work.rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def prune(host: HostRoot, keep: set[str]) -> list[str]:
    """Remove the staged builds of kernels not in `keep` (those no longer installed); what was removed."""
    removed = []
    for release in staged_releases(host):
        if release not in keep:
            shutil.rmtree(host.resolve(f"{STAGED}/{release}"), ignore_errors=True)
            removed.append(release)
    return removed


# ---- looking for a build ------------------------------------------------------------------------------
def _best(builds: list[Artifact]) -> Artifact | None:
    """The newest driver version; of one version, the build with the most modules."""
    from cudabuild.options import version_tuple

    usable = [b for b in builds if not boot_rejected(b)]
    usable.sort(key=lambda b: (version_tuple(b.manifest.driver_version), len(b.manifest.modules)), reverse=True)
    return usable[0] if usable else None


def registry_candidates(registry, release: str) -> list[tuple[str, str]]:
    """(tag, driver version) of the registry's modules images for `release`, newest driver first,
    full module sets before subsets."""
    from cudabuild.options import version_tuple

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


def pull_checked(host: HostRoot, registry, ref: str, release: str, *, reporter: Reporter) -> Artifact:
    """The modules image `ref`, pulled over the registry's API into a staging directory on the
    node, checked, and staged; a refusal leaves nothing behind."""
    from cudabuild.verify import verify_modules

    parent = host.makedirs(f"{STAGED}/{release}")
    work = Path(tempfile.mkdtemp(prefix=".pull-", dir=parent))
    try:
        with reporter.step(f"pull {ref} (the registry's HTTP API)"):
            labels = read_labels(registry.pull_layer(ref, work), ref)
        with reporter.step("verify it (digests, labels, vermagic, version, symbol CRCs when the host has them)"):
            try:
                checked = artifact.load(work)
                m = checked.manifest
                if labels is None or labels.key != m.key or \
                        tuple((e.file, e.sha256) for e in m.modules) != labels.modules:
                    raise VerifyError("its labels describe another build than its manifest")
                if m.kernel_release != release:
                    raise VerifyError(f"it is a build for {m.kernel_release}, not {release}")
                symvers = host_symvers(host, release)
                if symvers is None:
                    reporter.note(f"symbol CRCs not checked: the host has no Module.symvers for {release}")
                verify_modules(work / "modules", release=release, driver_version=m.driver_version,
                               expected=[e.name for e in m.modules], symvers=symvers,
                               modversions=m.modversions and symvers is not None)
            except (ArtifactError, VerifyError) as exc:
                raise VerifyError(f"refused the registry's {ref}: {exc.message}",
                                  hint="nothing was staged; push an unchanged build: cudabuild modules --kernel "
                                       f"{release} --registry REPO") from exc
        return artifact.load(stage(host, checked))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def find_build(host: HostRoot, release: str, config: NodeConfig, *, registry, reporter: Reporter,
               allow_fallback: bool | None = None) -> Found | None:
    """The build for `release`: staged, else the registry's (`registry`, the config's, or None;
    staged on the way), of the configured driver, else (with the fallback) of another; None when
    there is none anywhere."""
    fallback = config.fallback if allow_fallback is None else allow_fallback
    here = staged(host, release, reporter=reporter)
    candidates, unreachable = None, None
    for wanted in (True, False) if fallback else (True,):
        best = _best([b for b in here if config.wants(b.manifest.driver_version) == wanted])
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
                pulled = pull_checked(host, registry, ref, release, reporter=reporter)
            except VerifyError as exc:
                reporter.note(f"{exc.message}; trying the next")
                continue
            if boot_rejected(pulled):
                reporter.note(f"{ref}: the real kernel rejected it in its boot test; not used")
                continue
            return Found(pulled, "registry", ref=ref, fallback_from=None if wanted else config.shown_driver)
    if unreachable is not None:
        raise unreachable
    return None


def where_looked(host: HostRoot, release: str, config: NodeConfig) -> str:
    places = [str(host.root / STAGED / release)]
    if config.registry:
        places.append(f"the registry {config.registry}/{MODULES_REPOSITORY}")
    return " and ".join(places)


def missing(release: str, config: NodeConfig, host: HostRoot) -> str:
    return (f"no verified build for kernel {release} and driver {config.shown_driver} in "
            f"{where_looked(host, release, config)}" + ("" if config.fallback else
                                                         " (the fallback to another driver version is off)"))


def build_it(release: str, config: NodeConfig) -> str:
    """The fix when no build exists: the command that builds and pushes it."""
    return (f"build and push it: cudabuild modules --kernel {release} --driver {config.shown_driver} "
            f"--registry {config.registry or 'REPO'}")
