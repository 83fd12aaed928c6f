"""The modules artifact: `manifest.json` and the image labels, read and written here and nowhere
else.

An artifact is a directory: `modules/*.ko`, `userspace/{lib,bin,firmware}/...` and `manifest.json`.
Whatever reads one (a fresh build's publish, a cache hit, `image`, `inspect`, and what comes after
them) goes through `load()`, which checks it as hard as a fresh build:

- the manifest is bounded, well-formed, and every value matches the same patterns as user input
  (so nothing unchecked can reach a shell, a path or a tag);
- `modules/` and `userspace/` hold regular files only, each listed, of the listed size and sha256;
  a link only where the manifest lists it, pointing at a listed file beside it; nothing unlisted;
- every module is an ELF kernel module whose vermagic and version are the manifest's.

A failure is an ArtifactError (exit 3): the artifact is refused, never used."""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath

from cudabuild.digests import sha256_files
from cudabuild.errors import ArtifactError, InputError, VerifyError, shown
from cudabuild.options import (FLAVORS, FULL_DRIVER_RE, MODULE_NAMES, RELEASE_RE, SHA256_RE, expected_modules,
                               path_kind, validate_image_ref, validate_release)
from cudabuild.verify import ModuleInfo, read_module

MANIFEST = "manifest.json"
FORMAT = 1
MAX_MANIFEST_BYTES = 1 << 20  # a real one is about 20 kB
MAX_USERSPACE_ENTRIES = 1024
LABEL_PREFIX = "io.cudabuild"
MODULES_REPOSITORY = "cudabuild/modules"
PARTS = ("modules", "userspace")  # the directories an artifact has beside its manifest
USERSPACE_TOPS = ("lib", "bin", "firmware")

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,254}")

# The NVIDIA driver's own userspace files: the only ones an artifact may carry, since each library
# and binary is mounted into every GPU container by its name (FACTS.md, "Userspace a CUDA container
# needs"; NVIDIA/libnvidia-container's nvc_info.c). The first two libraries must be there.
REQUIRED_LIBRARIES = ("libcuda", "libnvidia-ml")
OPTIONAL_LIBRARIES = ("libnvidia-ptxjitcompiler", "libnvidia-nvvm", "libnvidia-cfg", "libnvidia-allocator",
                      "libnvidia-opencl", "libcudadebugger", "libnvidia-fatbinaryloader", "libnvidia-compiler",
                      "libnvidia-pkcs11-openssl3", "libnvidia-pkcs11")
BINARIES = ("nvidia-smi",)
_LIBRARY_RE = re.compile(r"(?:%s)\.so(?:\.[0-9]{1,6}){0,4}" % "|".join(
    re.escape(n) for n in (*REQUIRED_LIBRARIES, *OPTIONAL_LIBRARIES)))
_FIRMWARE_RE = re.compile(r"firmware/nvidia/[0-9]{3}\.[0-9]{1,4}(?:\.[0-9]{1,4})?/gsp[A-Za-z0-9_]{0,32}\.bin")


def library_name_ok(name: str) -> bool:
    """Whether `name` is a plain file name of one of the NVIDIA driver's libraries."""
    return bool(_LIBRARY_RE.fullmatch(name))


def driver_file_ok(path: str) -> bool:
    """Whether `path` (under userspace/) is one of the driver's own files at its place."""
    top, _, name = path.partition("/")
    if top == "lib":
        return library_name_ok(name)
    if top == "bin":
        return name in BINARIES
    return bool(_FIRMWARE_RE.fullmatch(path))
_VERMAGIC_RE = re.compile(r"[A-Za-z0-9._+-]+(?: [A-Za-z0-9._+-]+)* ?")
_DEPEND_RE = re.compile(r"[a-z0-9_-]{1,64}")


def image_tag(repository: str, driver_version: str, flavor: str, kernel_release: str,
              cert_sha256: str | None = None, *, modules: tuple[str, ...] | None = None) -> str:
    """The tag of an image made from an artifact:
    REPOSITORY:DRIVER[-FLAVOR][-only.SET][-signed.CERT]-RELEASE (SET: the modules of a build of
    fewer than the driver has, without their "nvidia-" and joined by '_', as nvidia_uvm; CERT: the
    signing certificate's sha256, 12 digits), with the release's '+' (not allowed in a tag) as '_'."""
    flavour = "" if flavor == "proprietary" else f"-{flavor}"
    subset = ""
    if modules is not None and list(modules) != expected_modules(driver_version):
        subset = "-only." + "_".join(name.removeprefix("nvidia-") for name in modules)
    signed = f"-signed.{cert_sha256[:12]}" if cert_sha256 else ""
    return f"{repository}:{driver_version}{flavour}{subset}{signed}-{kernel_release}".replace("+", "_")


@dataclass(frozen=True)
class ModuleEntry:
    name: str
    file: str
    size: int
    sha256: str
    vermagic: str
    version: str | None
    depends: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {"name": self.name, "file": self.file, "size": self.size, "sha256": self.sha256,
                "vermagic": self.vermagic, "version": self.version, "depends": list(self.depends)}

    @classmethod
    def of(cls, info: ModuleInfo) -> "ModuleEntry":
        return cls(name=info.name, file=info.path.name, size=info.size, sha256=info.sha256, vermagic=info.vermagic,
                   version=info.version, depends=info.depends)


@dataclass(frozen=True)
class UserspaceEntry:
    path: str  # relative to userspace/, e.g. lib/libcuda.so.535.309.01
    size: int | None = None
    sha256: str | None = None
    link: str | None = None  # a link's target: a file name in the same directory

    def to_json(self) -> dict:
        if self.link is not None:
            return {"path": self.path, "link": self.link}
        return {"path": self.path, "size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class Manifest:
    """What a build made: the single description of an artifact."""

    key: str
    created: str
    kernel_release: str
    driver_version: str
    flavor: str
    vermagic: str
    modules: tuple[ModuleEntry, ...]
    userspace: tuple[UserspaceEntry, ...]
    modversions: bool = True
    cudabuild_version: str = ""
    build_seconds: float | None = None
    # Where the inputs came from and what built it: recorded for people, never used in a command.
    kernel_source: dict = field(default_factory=dict)
    driver_source: dict = field(default_factory=dict)
    builder_image: dict = field(default_factory=dict)
    # What the real kernel said of these modules in a QEMU guest (cudabuild.boottest), when asked.
    boot_test: dict | None = None
    # Every boot test kept, one per kernel command line it was judged under (`append`), the latest
    # last: a verdict belongs to the configuration it judged (boottest.record, staging.boot_verdict).
    boot_tests: tuple[dict, ...] = ()
    # Signed builds: signer, key_id, cert_sha256, hash and the certificate (PEM) every module's
    # signature is checked against. Never anything of the key.
    signature: dict | None = None

    @property
    def certificate(self):
        """The certificate a signed artifact's modules are checked against (None: unsigned)."""
        if not self.signature:
            return None
        from cudabuild.signing import Certificate

        return Certificate.from_bytes(self.signature["certificate"].encode(), "the manifest's certificate")

    @property
    def verdicts(self) -> tuple[dict, ...]:
        """Every boot test kept (a manifest written before `boot_tests` has its one `boot_test`)."""
        return self.boot_tests or ((self.boot_test,) if self.boot_test else ())

    @property
    def boot_summary(self) -> str | None:
        """'accepted by 6.1.0-56-amd64 (tcg)': the boot test in a line (and a label)."""
        if not self.boot_test:
            return None
        return f"{self.boot_test.get('verdict')} by {self.boot_test.get('kernel')} ({self.boot_test.get('accelerator')})"

    def module(self, name: str) -> ModuleEntry:
        return next(m for m in self.modules if m.name == name)

    @property
    def kernel_depends(self) -> tuple[str, ...]:
        """The kernel's own modules ours need loaded first (drm, ipmi_msghandler, ...), in order."""
        ours = {m.name.replace("-", "_") for m in self.modules}
        seen: list[str] = []
        for m in self.modules:
            for dep in m.depends:
                if dep.replace("-", "_") not in ours and dep not in seen:
                    seen.append(dep)
        return tuple(seen)

    def to_json(self) -> dict:
        return {"format": FORMAT, "cudabuild_version": self.cudabuild_version, "created": self.created,
                "key": self.key, "kernel_release": self.kernel_release, "driver_version": self.driver_version,
                "flavor": self.flavor, "vermagic": self.vermagic, "modversions": self.modversions,
                "kernel_source": self.kernel_source, "driver_source": self.driver_source,
                "modules": [m.to_json() for m in self.modules],
                "userspace": [u.to_json() for u in self.userspace],
                "builder_image": self.builder_image, "build_seconds": self.build_seconds,
                **({"boot_test": self.boot_test} if self.boot_test is not None else {}),
                **({"boot_tests": list(self.boot_tests)} if self.boot_tests else {}),
                **({"signature": self.signature} if self.signature is not None else {})}

    def write(self, directory: Path) -> None:
        tmp = directory / f".{MANIFEST}.partial"
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        os.replace(tmp, directory / MANIFEST)

    def labels(self) -> dict[str, str]:
        """The image labels of anything made from this artifact: OCI's keys where they fit, ours
        under io.cudabuild."""
        return {
            "org.opencontainers.image.version": self.driver_version,
            "org.opencontainers.image.created": self.created,
            f"{LABEL_PREFIX}.key": self.key,
            f"{LABEL_PREFIX}.driver-version": self.driver_version,
            f"{LABEL_PREFIX}.kernel-release": self.kernel_release,
            f"{LABEL_PREFIX}.vermagic": self.vermagic,
            f"{LABEL_PREFIX}.flavor": self.flavor,
            f"{LABEL_PREFIX}.modules": ",".join(f"{m.file}@sha256:{m.sha256}" for m in self.modules),
            **({f"{LABEL_PREFIX}.boot-test": self.boot_summary} if self.boot_test else {}),
            **({f"{LABEL_PREFIX}.signer": self.signature["signer"],
                f"{LABEL_PREFIX}.sig-key": self.signature["key_id"],
                f"{LABEL_PREFIX}.cert-sha256": self.signature["cert_sha256"]} if self.signature else {}),
        }

    # ---- reading ---------------------------------------------------------------------------
    @classmethod
    def from_json(cls, data: object, *, where: str) -> "Manifest":
        """A Manifest from parsed JSON, every value checked; ArtifactError naming what is wrong."""
        check = _Checker(where)
        data = check.mapping(data, "the manifest")
        fmt = data.get("format")
        if fmt != FORMAT:
            check.fail(f"format {shown(fmt)} is not {FORMAT}: it was written by another version of cudabuild")
        release = check.text(data, "kernel_release", RELEASE_RE)
        try:
            validate_release(release)
        except Exception:  # noqa: BLE001 - reported as the manifest's fault below
            check.fail(f"kernel_release {shown(release)} is not a kernel release")
        driver = check.text(data, "driver_version", FULL_DRIVER_RE)
        flavor = check.text(data, "flavor")
        if flavor not in FLAVORS:
            check.fail(f"flavor {shown(flavor)} is not one of {', '.join(FLAVORS)}")
        vermagic = check.text(data, "vermagic", _VERMAGIC_RE)
        if not vermagic.startswith(release + " "):
            check.fail(f"vermagic {shown(vermagic)} is not for kernel {release}")
        created = check.text(data, "created")
        try:
            datetime.fromisoformat(created)
        except ValueError:
            check.fail(f"created {shown(created)} is not a date and time")
        modules = tuple(check.module(entry, i, vermagic=vermagic, driver=driver)
                        for i, entry in enumerate(check.sequence(data, "modules", limit=len(MODULE_NAMES))))
        names = [m.name for m in modules]
        if "nvidia" not in names or len(set(names)) != len(names):
            check.fail(f"modules {shown(', '.join(names))} must name nvidia once, and each module once")
        userspace = tuple(check.userspace(entry, i) for i, entry in
                          enumerate(check.sequence(data, "userspace", limit=MAX_USERSPACE_ENTRIES)))
        check.userspace_links(userspace)
        seconds = data.get("build_seconds")
        return cls(key=check.text(data, "key", SHA256_RE), created=created, kernel_release=release,
                   driver_version=driver, flavor=flavor, vermagic=vermagic, modules=modules, userspace=userspace,
                   modversions=bool(data.get("modversions", True)),
                   cudabuild_version=str(data.get("cudabuild_version", ""))[:32],
                   build_seconds=float(seconds) if isinstance(seconds, (int, float)) else None,
                   kernel_source=check.optional_mapping(data, "kernel_source"),
                   driver_source=check.optional_mapping(data, "driver_source"),
                   builder_image=check.optional_mapping(data, "builder_image"),
                   boot_test=check.optional_mapping(data, "boot_test") or None,
                   boot_tests=tuple(check.mapping(entry, f"boot_tests[{i}]") for i, entry in
                                    enumerate(check.sequence(data, "boot_tests", limit=MAX_BOOT_TESTS)))
                   if "boot_tests" in data else (),
                   signature=check.signature(data))


MAX_BOOT_TESTS = 16  # verdicts kept in a manifest, one per kernel command line


class _Checker:
    """Checks of one manifest's values, each failure an ArtifactError naming the manifest."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, problem: str):
        raise ArtifactError(f"{self.where}: {problem}",
                            hint="use an artifact written by `cudabuild modules` (its --output directory or its "
                            "modules image), unchanged; build again if in doubt")

    def mapping(self, value: object, what: str) -> dict:
        if not isinstance(value, dict):
            self.fail(f"{what} is a JSON {type(value).__name__}, not an object")
        return value

    def optional_mapping(self, data: dict, key: str) -> dict:
        value = data.get(key, {})
        return self.mapping(value, key) if value is not None else {}

    def text(self, data: dict, key: str, pattern: re.Pattern | None = None) -> str:
        if key not in data:
            self.fail(f"it has no {key!r}")
        value = data[key]
        if not isinstance(value, str) or (pattern is not None and not pattern.fullmatch(value)):
            self.fail(f"{key} {shown(value)} is not valid")
        return value

    def signature(self, data: dict) -> dict | None:
        """A signed build's record: its fields well formed, its certificate a certificate whose
        sha256 is the one recorded."""
        value = data.get("signature")
        if value is None:
            return None
        value = self.mapping(value, "signature")
        for key in ("signer", "key_id", "hash", "certificate"):
            self.text(value, key)
        digest = self.text(value, "cert_sha256", SHA256_RE)
        if len(value["certificate"]) > 64 * 1024:
            self.fail("signature.certificate is too long to be a certificate")
        from cudabuild.signing import Certificate

        try:
            cert = Certificate.from_bytes(value["certificate"].encode(), "signature.certificate")
        except InputError:
            self.fail("signature.certificate is not an X.509 certificate")
        if cert.sha256 != digest:
            self.fail(f"signature.cert_sha256 {digest[:16]}... is not the sha256 of its certificate "
                      f"({cert.sha256[:16]}...)")
        return {k: value[k] for k in ("signer", "key_id", "cert_sha256", "hash", "certificate")}

    def sequence(self, data: dict, key: str, *, limit: int) -> list:
        value = data.get(key)
        if not isinstance(value, list) or len(value) > limit:
            self.fail(f"{key} must be a list of at most {limit} entries")
        return value

    def module(self, entry: object, index: int, *, vermagic: str, driver: str) -> ModuleEntry:
        entry = self.mapping(entry, f"modules[{index}]")
        name = self.text(entry, "name")
        if name not in MODULE_NAMES:
            self.fail(f"modules[{index}] names {shown(name)}, not an NVIDIA module ({', '.join(MODULE_NAMES)})")
        file = self.text(entry, "file")
        if file != f"{name}.ko":
            self.fail(f"modules[{index}] file {shown(file)} is not {name}.ko")
        size = entry.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            self.fail(f"modules[{index}] size {shown(size)} is not a size")
        if self.text(entry, "vermagic") != vermagic:
            self.fail(f"{file} has vermagic {shown(entry['vermagic'])}, not the manifest's {shown(vermagic)}")
        version = entry.get("version")
        if version is not None and version != driver:
            self.fail(f"{file} has version {shown(version)}, not the manifest's driver {driver}")
        depends = entry.get("depends", [])
        if not isinstance(depends, list) or not all(isinstance(d, str) and _DEPEND_RE.fullmatch(d) for d in depends):
            self.fail(f"{file} depends {shown(depends)} is not a list of module names")
        return ModuleEntry(name=name, file=file, size=size, sha256=self.text(entry, "sha256", SHA256_RE),
                           vermagic=vermagic, version=version, depends=tuple(depends))

    def userspace(self, entry: object, index: int) -> UserspaceEntry:
        entry = self.mapping(entry, f"userspace[{index}]")
        path = self.text(entry, "path")
        parts = PurePosixPath(path).parts
        if not parts or parts[0] not in USERSPACE_TOPS or len(parts) > 8 or path != "/".join(parts) \
                or not all(_NAME_RE.fullmatch(p) for p in parts) or ".." in path.split("/"):
            self.fail(f"userspace path {shown(path)} is not a plain path under {', '.join(USERSPACE_TOPS)}")
        if not driver_file_ok(path):
            self.fail(f"userspace path {shown(path)} is not one of the NVIDIA driver's own files (lib/: "
                      f"{', '.join(REQUIRED_LIBRARIES + OPTIONAL_LIBRARIES)}; bin/: {', '.join(BINARIES)}; "
                      "firmware/nvidia/VERSION/gsp*.bin); it would be mounted into every GPU container")
        if "link" in entry:
            link = self.text(entry, "link", _NAME_RE)
            if not (path.startswith("lib/") and library_name_ok(link)):
                self.fail(f"userspace link {shown(path)} -> {shown(link)} does not name one of the driver's libraries")
            return UserspaceEntry(path=path, link=link)
        size = entry.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            self.fail(f"userspace {path} size {shown(size)} is not a size")
        return UserspaceEntry(path=path, size=size, sha256=self.text(entry, "sha256", SHA256_RE))

    def userspace_links(self, entries: tuple[UserspaceEntry, ...]) -> None:
        """Every link points at a listed entry beside it, and its chain (libcuda.so -> libcuda.so.1
        -> libcuda.so.VERSION) ends at a listed file."""
        by_path = {e.path: e for e in entries}
        if len(by_path) != len(entries):
            self.fail("userspace lists a path twice")
        for e in entries:
            seen, current = {e.path}, e
            while current.link is not None:
                target = str(PurePosixPath(current.path).parent / current.link)
                if target not in by_path or target in seen:
                    self.fail(f"userspace link {e.path} -> {e.link} does not lead to a listed file beside it")
                seen.add(target)
                current = by_path[target]


def read_manifest(path: Path) -> Manifest:
    """The manifest at `path`: a regular file of bounded size holding one valid manifest."""
    where = str(path)
    try:
        st = path.lstat()
    except FileNotFoundError:
        raise ArtifactError(f"{where} does not exist: this is not a cudabuild artifact",
                            hint="pass the directory `cudabuild modules --output` wrote, or a modules image")
    except OSError as exc:
        raise ArtifactError(f"cannot read {where}: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise ArtifactError(f"{where} is not a regular file (a link or a directory)",
                            hint="an artifact's manifest is a plain file; use an unchanged artifact")
    if st.st_size > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{where} is {st.st_size} bytes, more than a manifest ever is "
                            f"({MAX_MANIFEST_BYTES} at most)", hint="use an unchanged artifact")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{where} is not JSON ({shown(str(exc))})", hint="use an unchanged artifact") from exc
    except RecursionError as exc:
        raise ArtifactError(f"{where} nests too deeply to be a manifest", hint="use an unchanged artifact") from exc
    return Manifest.from_json(data, where=where)


# ---- the directory -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Artifact:
    """A checked artifact directory and its manifest."""

    root: Path
    manifest: Manifest

    def module_path(self, name: str) -> Path:
        return self.root / "modules" / self.manifest.module(name).file

    def files(self) -> list[tuple[str, UserspaceEntry | ModuleEntry]]:
        """Every listed entry, by its path relative to the root."""
        listed: list[tuple[str, UserspaceEntry | ModuleEntry]] = [(f"modules/{m.file}", m)
                                                                 for m in self.manifest.modules]
        listed += [(f"userspace/{u.path}", u) for u in self.manifest.userspace]
        return listed

    def copy_to(self, place, *, manifest: Path | None = None) -> None:
        """Copy every listed file to `place(rel)` (a path; its directories are made), links as
        links (to a file beside them); then the manifest to `manifest`, when given, last."""
        import shutil

        for rel, _ in self.files():
            source, target = self.root / rel, Path(place(rel))
            target.parent.mkdir(parents=True, exist_ok=True)
            if source.is_symlink():
                os.symlink(os.readlink(source), target)
            else:
                shutil.copy2(source, target)
        if manifest is not None:
            shutil.copy2(self.root / MANIFEST, manifest)


def walk(root: Path) -> dict[str, str]:
    """Everything under root/modules and root/userspace, by relative path: 'file', 'link', 'dir'
    or 'other'. Links are not followed."""
    found: dict[str, str] = {}
    for part in PARTS:
        top = root / part
        try:
            st = top.lstat()
        except FileNotFoundError:
            continue
        if not stat.S_ISDIR(st.st_mode):
            found[part] = "link" if stat.S_ISLNK(st.st_mode) else "other"
            continue
        for directory, dirs, files in os.walk(top):
            for name in dirs + files:
                path = Path(directory) / name
                mode = path.lstat().st_mode
                kind = ("dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode)
                        else "link" if stat.S_ISLNK(mode) else "other")
                found[str(path.relative_to(root))] = kind
            dirs[:] = [d for d in dirs if not (Path(directory) / d).is_symlink()]
    return found


def load(root: Path, *, check_modules: bool = True, unchanged_since: Mapping[str, list] | None = None) -> Artifact:
    """The artifact at `root`, checked (see the module's docstring); ArtifactError otherwise.
    `unchanged_since`: what `file_stats` gave after an earlier whole check of it (the cache keeps
    it); when every file still has the same inode, size, mtime and ctime (a write, a rename over it,
    a chmod all change the ctime, which no one but the clock's owner can set back), its contents
    are the ones checked then, and only the layout is checked again."""
    root = Path(root)
    if not root.is_dir():
        raise ArtifactError(f"{root} is not a directory", hint="pass the directory `cudabuild modules --output` wrote")
    manifest = read_manifest(root / MANIFEST)
    artifact = Artifact(root=root, manifest=manifest)
    listed = dict(artifact.files())
    found = walk(root)
    problems: list[str] = []
    for rel, kind in sorted(found.items()):
        if kind == "dir":
            continue
        entry = listed.get(rel)
        if entry is None:
            problems.append(f"{rel} is not listed in the manifest")
        elif kind == "other":
            problems.append(f"{rel} is not a regular file")
        elif kind == "link" and not (isinstance(entry, UserspaceEntry) and entry.link is not None):
            problems.append(f"{rel} is a symbolic link (to {shown(os.readlink(root / rel))}), not a file")
        elif kind == "file" and isinstance(entry, UserspaceEntry) and entry.link is not None:
            problems.append(f"{rel} should be a link to {entry.link}, but is a file")
    for rel, entry in listed.items():
        kind = found.get(rel)
        if kind is None:
            problems.append(f"{rel} is missing")
        elif kind == "link" and isinstance(entry, UserspaceEntry) and entry.link is not None \
                and os.readlink(root / rel) != entry.link:
            problems.append(f"{rel} links to {shown(os.readlink(root / rel))}, not {entry.link}")
    if problems:
        _refuse(root, problems)
    files = {root / rel: entry for rel, entry in listed.items() if not getattr(entry, "link", None)}
    for path, entry in files.items():
        if path.lstat().st_size != entry.size:
            problems.append(f"{path.relative_to(root)} has {path.lstat().st_size} bytes, the manifest says "
                            f"{entry.size}")
    if problems:
        _refuse(root, problems)
    if unchanged_since is not None and file_stats(artifact) == dict(unchanged_since):
        return artifact
    # Modules are read on this thread while the others hash (hashlib runs without the GIL).
    with ThreadPoolExecutor(max_workers=1) as hashing:
        digests = hashing.submit(sha256_files, files)
        if check_modules:
            for m in manifest.modules:
                try:
                    info = read_module(root / "modules" / m.file, digest=False, crcs=False)
                except VerifyError as exc:
                    problems.append(exc.message)
                    continue
                if info.vermagic != m.vermagic:
                    problems.append(f"{m.file} has vermagic {shown(info.vermagic)}, the manifest says "
                                    f"{shown(m.vermagic)}")
                if info.version != m.version:
                    problems.append(f"{m.file} has version {shown(info.version)}, the manifest says "
                                    f"{shown(m.version)}")
        problems += _soname_problems(root, manifest)
        for path, digest in digests.result().items():
            if digest != files[path].sha256:
                problems.append(f"{path.relative_to(root)} has sha256 {digest}, the manifest says "
                                f"{files[path].sha256}")
    if not problems and manifest.signature:
        problems += check_signatures(artifact)
    if problems:
        _refuse(root, problems)
    return artifact


def file_stats(artifact: Artifact) -> dict[str, list]:
    """Each file's (and the manifest's) device, inode, size, mtime and ctime: what `load` compares
    to skip reading again what has not changed since a whole check."""
    stats = {}
    for rel in [MANIFEST, *(rel for rel, entry in artifact.files() if not getattr(entry, "link", None))]:
        st = (artifact.root / rel).lstat()
        stats[rel] = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    return stats


def _soname_problems(root: Path, manifest: Manifest) -> list[str]:
    """Each library's DT_SONAME is a name of the driver's libraries: it becomes a mount path."""
    from cudabuild.verify import soname

    problems = []
    for entry in manifest.userspace:
        if entry.link is None and entry.path.startswith("lib/"):
            so = soname(root / "userspace" / entry.path)
            if so is not None and not library_name_ok(so):
                problems.append(f"userspace/{entry.path} has the DT_SONAME {shown(so)}, which is not a name of the "
                                "NVIDIA driver's libraries (it would become a mount path in every GPU container)")
    return problems


def check_signatures(artifact: Artifact) -> list[str]:
    """Each module's signature checked against the manifest's certificate, over its own bytes."""
    from cudabuild.signing import verify_signature

    certificate = artifact.manifest.certificate
    problems = []
    for m in artifact.manifest.modules:
        try:
            verify_signature(artifact.root / "modules" / m.file, certificate)
        except VerifyError as exc:
            problems.append(exc.message)
    return problems


def _refuse(root: Path, problems: list[str]) -> None:
    shown_problems = problems[:12] + ([f"... and {len(problems) - 12} more"] if len(problems) > 12 else [])
    raise ArtifactError(f"{root} is not the artifact its manifest describes:\n  - " + "\n  - ".join(shown_problems),
                        hint="use an unchanged artifact (the --output directory or modules image cudabuild wrote); "
                        "build again if in doubt")


def describe_userspace(root: Path) -> tuple[UserspaceEntry, ...]:
    """The userspace entries of a freshly built tree (files with digests, links with targets)."""
    entries = []
    paths = sorted(p for p in root.rglob("*") if p.is_symlink() or p.is_file())
    digests = sha256_files([p for p in paths if not p.is_symlink()])
    for path in paths:
        rel = str(path.relative_to(root))
        if path.is_symlink():
            entries.append(UserspaceEntry(path=rel, link=os.readlink(path)))
        else:
            entries.append(UserspaceEntry(path=rel, size=path.stat().st_size, sha256=digests[path]))
    return tuple(entries)


def find(reference: str | None, cache, engine_factory, *, import_image=None) -> Artifact:
    """The checked artifact of a modules image, an --output directory, or the newest build in
    the cache. A modules image whose build is not in the cache is read from the image by
    `import_image(reference, labels)` (which checks it and puts it there) when one is given."""
    if reference is None:
        newest: tuple[str, Path] | None = None
        for manifest_path in (cache.root / "results").glob("*/manifest.json"):
            try:
                created = read_manifest(manifest_path).created
            except ArtifactError:
                continue  # not a usable result: never the default
            if newest is None or created > newest[0]:
                newest = (created, manifest_path.parent)
        if newest is None:
            raise InputError("there are no built modules in the cache yet",
                             hint="build them first: cudabuild modules --kernel RELEASE --driver VERSION")
        return load(newest[1])
    hint = "pass a cudabuild/modules:... image, or the directory --output wrote"
    kind = path_kind(reference, "--modules", hint)
    if kind == "dir":
        return load(Path(reference).expanduser())
    if kind is not None:
        raise InputError(f"--modules {shown(reference)} is a file, not a modules image or directory", hint=hint)
    validate_image_ref(reference, "--modules")
    engine = engine_factory()
    if engine.image_id(reference) is None:
        raise InputError(f"--modules {shown(reference)}: neither a modules image nor a directory", hint=hint)
    labels = read_labels(engine.image(reference)["Config"].get("Labels"), reference)
    if labels is None:
        raise InputError(f"--modules {shown(reference)} is not a cudabuild modules image (it has no {LABEL_PREFIX} "
                         "labels)", hint=hint)
    result = cache.result(labels.key)
    if result is not None:
        return load(result)
    if import_image is None:
        raise InputError(f"{reference} was not built with this cache ({cache.root})",
                         hint="build it here with cudabuild modules, or pass the directory --output wrote")
    return import_image(reference, labels)


# ---- image labels ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageLabels:
    """What a cudabuild image's labels say about the artifact in it."""

    key: str
    driver_version: str
    kernel_release: str
    vermagic: str
    flavor: str
    modules: tuple[tuple[str, str], ...]  # (file, sha256)
    profile: str | None = None
    boot_test: str | None = None  # 'accepted by RELEASE (tcg)'
    signer: str | None = None  # signed builds: the certificate's subject, and its sha256
    cert_sha256: str | None = None


_REQUIRED_LABELS = ("key", "driver-version", "kernel-release", "vermagic", "flavor", "modules")


def read_labels(labels: Mapping[str, str] | None, ref: str) -> ImageLabels | None:
    """The artifact labels of image `ref`; None when it has none (not made by cudabuild)."""
    labels = labels or {}
    ours = {k[len(LABEL_PREFIX) + 1:]: v for k, v in labels.items() if k.startswith(LABEL_PREFIX + ".")}
    if not any(name in ours for name in _REQUIRED_LABELS):
        return None
    missing = [f"{LABEL_PREFIX}.{name}" for name in _REQUIRED_LABELS if name not in ours]
    if missing:
        raise ArtifactError(f"image {ref} has some of cudabuild's labels but not {', '.join(missing)}",
                            hint="use an image made by cudabuild, unchanged")

    def bad(name: str) -> None:
        raise ArtifactError(f"image {ref}: label {LABEL_PREFIX}.{name} {shown(ours[name])} is not valid",
                            hint="use an image made by cudabuild, unchanged")

    if not SHA256_RE.fullmatch(ours["key"]):
        bad("key")
    if not FULL_DRIVER_RE.fullmatch(ours["driver-version"]):
        bad("driver-version")
    if not RELEASE_RE.fullmatch(ours["kernel-release"]):
        bad("kernel-release")
    if not _VERMAGIC_RE.fullmatch(ours["vermagic"]):
        bad("vermagic")
    if ours["flavor"] not in FLAVORS:
        bad("flavor")
    modules = []
    for item in ours["modules"].split(","):
        file, sep, digest = item.partition("@sha256:")
        if not sep or file.removesuffix(".ko") not in MODULE_NAMES or not SHA256_RE.fullmatch(digest):
            bad("modules")
        modules.append((file, digest))
    profile = ours.get("profile")
    if profile is not None and not _NAME_RE.fullmatch(profile):
        bad("profile")
    boot = ours.get("boot-test")
    if boot is not None and not re.fullmatch(r"(accepted|rejected) by [A-Za-z0-9._+-]+ \((tcg|kvm)\)", boot):
        bad("boot-test")
    cert = ours.get("cert-sha256")
    if cert is not None and not SHA256_RE.fullmatch(cert):
        bad("cert-sha256")
    signer = ours.get("signer")
    if signer is not None and (len(signer) > 256 or not signer.isprintable()):
        bad("signer")
    return ImageLabels(key=ours["key"], driver_version=ours["driver-version"], kernel_release=ours["kernel-release"],
                       vermagic=ours["vermagic"], flavor=ours["flavor"], modules=tuple(modules), profile=profile,
                       boot_test=boot, signer=signer, cert_sha256=cert)


# ---- the kernel-agnostic driver image's labels ------------------------------------------------------
def node_image_labels(*, driver: str, registry: str, profile: str) -> dict[str, str]:
    """The labels of a driver image that carries no artifact: the driver it installs (a version,
    a branch, or "any") and the registry it takes the builds from."""
    return {f"{LABEL_PREFIX}.role": "driver", f"{LABEL_PREFIX}.profile": profile,
            f"{LABEL_PREFIX}.node-driver": driver, f"{LABEL_PREFIX}.node-registry": registry}


def read_node_labels(labels: Mapping[str, str] | None) -> tuple[str, str] | None:
    """(driver, registry) of a kernel-agnostic driver image; None for any other image."""
    labels = labels or {}
    driver, registry = labels.get(f"{LABEL_PREFIX}.node-driver"), labels.get(f"{LABEL_PREFIX}.node-registry")
    if driver is None or registry is None or labels.get(f"{LABEL_PREFIX}.profile") != "driver":
        return None
    if not (driver == "any" or re.fullmatch(r"[0-9]{3}(\.[0-9]{1,4}){0,2}", driver)) or \
            not re.fullmatch(r"[A-Za-z0-9.:_/-]{1,255}", registry):
        raise ArtifactError(f"the driver image's labels {shown(driver)} / {shown(registry)} are not valid",
                            hint="use an image made by cudabuild image driver --registry, unchanged")
    return driver, registry


# ---- a saved modules image ---------------------------------------------------------------------
def unpack_image(saved_path: Path, into: Path) -> None:
    """The one layer of a saved modules image (`docker save`) into `into`: only modules/,
    userspace/ and manifest.json, regular files, directories and links inside their directory."""
    import tarfile  # only to pull: a cache hit reads no tar

    with tarfile.open(saved_path) as saved:
        try:
            index = json.load(saved.extractfile("manifest.json"))
            layers = index[0]["Layers"]
        except (KeyError, ValueError, IndexError, TypeError) as exc:
            raise VerifyError("the pulled image is not a saved image cudabuild can read",
                              hint="use images `cudabuild modules --registry` pushed") from exc
        if len(layers) != 1:
            raise VerifyError(f"the pulled modules image has {len(layers)} layers, not one: cudabuild did not "
                              "make it", hint="use images `cudabuild modules --registry` pushed")
        extract_layer(saved.extractfile(layers[0]), into)


MAX_UNPACKED = 16 << 30  # bytes a modules image's layer may unpack to: a driver's is under 1 GB


def extract_layer(layer, into: Path, *, compression: str = "", limit: int = MAX_UNPACKED) -> None:
    """A modules image's layer (a tar file or file object; gzip-compressed when `compression` is
    "gz") into `into`: only modules/, userspace/ and manifest.json, regular files, directories and
    links inside their directory, at most `limit` bytes (each member's size counted before it is
    written)."""
    import tarfile

    mode = f"r:{compression}" if compression else "r:"
    opened = tarfile.open(layer, mode) if isinstance(layer, (str, Path)) else tarfile.open(fileobj=layer, mode=mode)
    unpacked = 0
    try:
        with opened:
            for member in opened:
                unpacked += member.size
                if unpacked > limit:  # checked before the member is written
                    raise VerifyError(f"the modules image unpacks to more than {limit >> 20} MiB, far more than "
                                      "its layer's size allows for a driver's files (a compression bomb?)",
                                      hint="use images `cudabuild modules --registry` pushed")
                name = PurePosixPath(member.name.removeprefix("./"))
                if not name.parts or name.parts[0] not in ("modules", "userspace", "manifest.json"):
                    continue
                outward = member.issym() and (member.linkname.startswith("/") or ".." in member.linkname.split("/"))
                if ".." in name.parts or not (member.isfile() or member.isdir() or member.issym()) or outward:
                    raise VerifyError(f"the modules image holds {shown(member.name)}, which cudabuild never writes",
                                      hint="use images `cudabuild modules --registry` pushed")
                member.name = str(name)
                opened.extract(member, into, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    except (tarfile.TarError, EOFError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:  # the disk's, not the layer's (gzip's has none)
            raise
        raise VerifyError(f"the modules image's layer is not a tar file cudabuild can read ({exc})",
                          hint="use images `cudabuild modules --registry` pushed") from exc
