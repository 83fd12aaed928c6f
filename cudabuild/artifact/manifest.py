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
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath

from cudabuild.errors import ArtifactError, InputError, shown
from cudabuild.nvidia import FLAVORS, FULL_DRIVER_RE, MODULE_NAMES, RELEASE_RE, expected_modules
from cudabuild.options import SHA256_RE, validate_release
from cudabuild.verify import ModuleEntry


MANIFEST = "manifest.json"
FORMAT = 1
MAX_MANIFEST_BYTES = 1 << 20  # a real one is about 20 kB
MAX_USERSPACE_ENTRIES = 1024
LABEL_PREFIX = "io.cudabuild"
MODULES_REPOSITORY = "cudabuild/modules"
PARTS = ("modules", "userspace")  # the directories an artifact has beside its manifest
USERSPACE_TOPS = ("lib", "bin", "firmware")

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,254}")

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
VERMAGIC_RE = re.compile(r"[A-Za-z0-9._+-]+(?: [A-Za-z0-9._+-]+)* ?")
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
        vermagic = check.text(data, "vermagic", VERMAGIC_RE)
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
                or not all(NAME_RE.fullmatch(p) for p in parts) or ".." in path.split("/"):
            self.fail(f"userspace path {shown(path)} is not a plain path under {', '.join(USERSPACE_TOPS)}")
        if not driver_file_ok(path):
            self.fail(f"userspace path {shown(path)} is not one of the NVIDIA driver's own files (lib/: "
                      f"{', '.join(REQUIRED_LIBRARIES + OPTIONAL_LIBRARIES)}; bin/: {', '.join(BINARIES)}; "
                      "firmware/nvidia/VERSION/gsp*.bin); it would be mounted into every GPU container")
        if "link" in entry:
            link = self.text(entry, "link", NAME_RE)
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

