"""What users ask for: flags and environment resolved once, into frozen options, every value checked
once. Every string that can reach a shell, a path, an image tag or a container is validated here.

Precedence: the defaults below < `CUDABUILD_*` environment < flags. The environment comes in as the
command's Settings (`Settings.build_options(flags)`), read once from an explicit mapping, so
tests pass `Settings()` or `Settings.from_env({...})`."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import stat
from dataclasses import dataclass, fields
from pathlib import Path

from cudabuild.errors import InputError, shown
from cudabuild.nvidia import (DRIVER_RE, FLAVORS, FULL_DRIVER_RE, PROPRIETARY_UNTIL, RELEASE_RE, modules_to_build,
                              only_modules, require_flavor, version_tuple)

# ASCII only (see nvidia.py).
URL_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[A-Za-z0-9._~:/%@+=,-]+")
HTTP_URL_RE = re.compile(r"https?://[A-Za-z0-9._~:/%@+=,-]+")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
BOOT_APPEND_RE = re.compile(r"[A-Za-z0-9_.,=:/+ -]{0,512}")
# An image reference as the engine parses it (distribution/reference's grammar): an optional
# registry host[:port], path components, an optional tag and an optional digest.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_HOST = r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*|\[[0-9A-Fa-f:]+\])(?::[0-9]{1,5})?"
IMAGE_REF_RE = re.compile(rf"(?:{_HOST}/)?{_COMPONENT}(?:/{_COMPONENT})*(?::[A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}})?"
                          r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9A-Fa-f]{32,})?")
JOBS_MAX = 256

KERNEL_SOURCES = ("debian", "git")
DRIVER_SOURCES = ("debian", "run")
CHECKOUTS = ("sparse", "full")
DEFAULT_KERNEL_REPO = "https://git.kernel.org/pub/scm/linux/kernel/git/stable/linux.git"
DEFAULT_INSTALLER_URL = "https://download.nvidia.com/XFree86/Linux-x86_64/{version}/NVIDIA-Linux-x86_64-{version}.run"
DEFAULT_APT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_APT_SECURITY_MIRROR = "http://deb.debian.org/debian-security"

def validate_release(value: str, *, what: str = "kernel release") -> str:
    if not RELEASE_RE.fullmatch(value or "") or ".." in value:
        raise InputError(
            f"{what} {shown(value)} is not valid: a release is what `uname -r` prints, made of letters, "
            "digits and . _ + - (for example 6.1.0-56-amd64 or 4.3.6-coreos)",
            hint="pass the exact `uname -r` of the target host with --kernel, or --kernel latest",
        )
    return value


def validate_driver(value: str) -> str:
    if not DRIVER_RE.fullmatch(value or ""):
        raise InputError(
            f"driver version {shown(value)} is not valid: expected a version like 535.309.01, "
            "or a branch like 535",
            hint="pass --driver VERSION (e.g. 535.309.01) or --driver BRANCH (e.g. 535)",
        )
    return value


def validate_image_ref(value: str, what: str) -> str:
    """An image reference the engine would accept (repository[:tag][@digest], lower-case path)."""
    if not value or len(value) > 255 or not IMAGE_REF_RE.fullmatch(value):
        raise InputError(f"{what} {shown(value)} is not a valid image reference",
                         hint="pass e.g. debian:bookworm, cudabuild/modules:535.309.01-6.1.0-56-amd64 or "
                         "registry.example:5000/team/image:tag (lower-case name, tag of letters, digits, . _ -)")
    return value


def validate_registry(value: str, what: str = "--registry") -> str:
    """A repository in a registry, HOST[:PORT]/PATH without a tag (cudabuild adds modules:TAG), or
    oci:DIR, a bundle (an OCI image layout) on disk."""
    hint = ("pass HOST[:PORT]/PATH, e.g. --registry 127.0.0.1:5055/cudabuild or registry.example/team/cudabuild, "
            "or a bundle: oci:/path/to/bundle")
    if value.startswith("oci:") and len(value) > 4 and "\n" not in value:
        return value
    if not value or "@" in value or not IMAGE_REF_RE.fullmatch(value) or ":" in value.rpartition("/")[2]:
        raise InputError(f"{what} {shown(value)} is not a registry repository (HOST[:PORT]/PATH: a lower-case path, no tag)", hint=hint)
    host = value.split("/", 1)[0]
    if "/" not in value or ("." not in host and ":" not in host and host != "localhost"):
        raise InputError(f"{what} {shown(value)} names no registry host", hint=hint)
    return value


# ---- paths the user names ----------------------------------------------------------------------
_PATH_REASONS = {
    errno.ENOENT: "no such file or directory",
    errno.ENAMETOOLONG: "a name in the path is too long (a file name has at most 255 bytes)",
    errno.ELOOP: "the path has a loop of symbolic links",
    errno.EACCES: "permission denied",
    errno.ENOTDIR: "a part of the path is not a directory",
}


def _stat(value: str, flag: str, hint: str) -> os.stat_result | None:
    """The path's stat (following links), None when it does not exist; any other failure is the
    user's input, said in words."""
    try:
        return Path(value).expanduser().stat()
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        reason = _PATH_REASONS.get(getattr(exc, "errno", None), str(exc))
        raise InputError(f"{flag} {shown(value)}: {reason}", hint=hint) from exc


def existing_file(value: str, flag: str, what: str) -> Path:
    """A regular file the user named, or an InputError that says what is wrong with the path."""
    hint = f"pass the path of {what}"
    st = _stat(value, flag, hint)
    if st is None:
        raise InputError(f"{flag} {shown(value)}: no such file", hint=hint)
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{flag} {shown(value)}: not a regular file", hint=hint)
    return Path(value).expanduser()


def path_kind(value: str, flag: str, hint: str) -> str | None:
    """'file', 'dir' or 'other' for an existing path, None when nothing is there."""
    st = _stat(value, flag, hint)
    if st is None:
        return None
    return "file" if stat.S_ISREG(st.st_mode) else "dir" if stat.S_ISDIR(st.st_mode) else "other"


def check_boot_append(value: str, flag: str) -> None:
    """Kernel parameters for a boot test's guest (`modules --boot-append`, `boot-test --append`)."""
    if not BOOT_APPEND_RE.fullmatch(value):
        raise InputError(f"{flag} {shown(value)} is not a list of kernel parameters",
                         hint=f"pass e.g. {flag} module.sig_enforce=1 (letters, digits, _ . , = : / + -)")


def check_boot_timeout(value: float, flag: str) -> None:
    if not 10 <= value <= 3600:
        raise InputError(f"{flag} {value:g} is out of range", hint="pass 10 to 3600 seconds")


# ---- cudabuild modules (and every command that builds) -----------------------------------------
@dataclass(frozen=True, kw_only=True)
class BuildOptions:
    """What the user asked a build for, after defaults, environment and flags."""

    kernel: str | None = None  # a release, "latest", or None for this host's
    driver: str | None = None  # a version, a branch, or None for the newest that supports the kernel
    kernel_source: str | None = None  # None: debian for Debian's releases, git otherwise
    driver_source: str = "debian"
    flavor: str | None = None  # None: the driver's default (open from 560 on, proprietary before)
    ignore_preempt_rt: bool = False  # build for a PREEMPT_RT kernel although NVIDIA's build refuses it
    only_modules: str | None = None  # e.g. "nvidia,nvidia-uvm": build only these (None: all the driver has)
    kernel_repo: str = DEFAULT_KERNEL_REPO
    kernel_config: str | None = None  # a file, or "host"
    symvers: str | None = None  # a file, or "host"
    kernel_checkout: str = "sparse"
    installer: str | None = None  # a URL or a file
    installer_url: str = DEFAULT_INSTALLER_URL  # template with {version}
    sha256: str | None = None
    jobs: int | None = None  # None: the CPU count of the machine that builds (Settings.cpu_count)
    use_cache: bool = True
    refresh_index: bool = False
    apt_mirror: str = DEFAULT_APT_MIRROR
    apt_security_mirror: str = DEFAULT_APT_SECURITY_MIRROR
    distribution: str | None = None  # None: the release's own (+deb13: trixie), else this Debian host's, else bookworm
    backports: bool = False  # Debian's driver packages from DIST-backports too, where newer
    builder_base: str | None = None
    output: str | None = None
    force: bool = False
    verbose: bool = False
    keep_builder: bool = False
    compile_cache: bool = True  # ccache in the builder, its directory in the cache (--no-compile-cache: off)
    boot_test: bool = False  # boot the result in a QEMU guest before publishing it
    kernel_image: str | None = None  # the kernel to boot: a vmlinuz or a linux-image .deb
    boot_append: str = ""  # kernel parameters for the guest, e.g. module.sig_enforce=1
    boot_timeout: float = 300.0
    registry: str | None = None  # HOST[:PORT]/PATH: pull the result from there first, push it there after
    no_build: bool = False  # take the result from the cache or the registry, never compile
    sign_key: str | None = None  # a PEM private key: the modules are signed with it (Secure Boot)
    sign_cert: str | None = None  # its X.509 certificate (PEM or DER)
    sign_image: str | None = None  # a PEM ECDSA P-256 key: each pushed image gets a cosign signature and attestations
    verify_key: str | None = None  # a PEM public key: a registry's image is used only when signed by it

    def __post_init__(self) -> None:
        if self.kernel not in (None, "latest"):
            validate_release(self.kernel)
        if self.driver is not None:
            validate_driver(self.driver)
        for value, allowed, what in (
            (self.kernel_source or "debian", KERNEL_SOURCES, "--kernel-source"),
            (self.kernel_checkout, CHECKOUTS, "--kernel-checkout"),
            (self.driver_source, DRIVER_SOURCES, "--driver-source"),
            (self.flavor or FLAVORS[0], FLAVORS, "--flavor"),
        ):
            if value not in allowed:
                raise InputError(f"{what} {shown(value)} is not supported",
                                 hint=f"choose one of: {', '.join(allowed)}")
        if self.only_modules is not None:  # against what the driver has too, when its version is exact
            if self.driver is not None and FULL_DRIVER_RE.fullmatch(self.driver):
                modules_to_build(self.driver, self.only_modules)
            else:
                only_modules(self.only_modules)
        if self.jobs is not None and not 1 <= self.jobs <= JOBS_MAX:
            raise InputError(f"--jobs {self.jobs} is out of range", hint=f"pass 1 to {JOBS_MAX}")
        for url, what in ((self.apt_mirror, "--apt-mirror"), (self.apt_security_mirror, "--apt-security-mirror")):
            if not re.fullmatch(r"https?://[A-Za-z0-9._~:/%@+-]+", url):
                raise InputError(f"{what} {shown(url)} is not an http(s) URL",
                                 hint="pass a Debian mirror such as http://deb.debian.org/debian")
        if not URL_RE.fullmatch(self.kernel_repo):
            raise InputError(f"--kernel-repo {shown(self.kernel_repo)} is not a repository URL",
                             hint="pass a URL such as git://mirror.example/linux-stable.git or https://...")
        if self.sha256 is not None and not SHA256_RE.fullmatch(self.sha256):
            raise InputError(f"--sha256 {shown(self.sha256)} is not a sha256 (64 lower-case hex digits)",
                             hint="pass the checksum NVIDIA publishes beside the installer")
        if "{version}" not in self.installer_url \
                or not HTTP_URL_RE.fullmatch(self.installer_url.replace("{version}", "1")):
            raise InputError(f"installer URL template {shown(self.installer_url)} is not an http(s) URL with "
                             "{version}",
                             hint="set CUDABUILD_INSTALLER_URL like https://mirror/{version}/NVIDIA-Linux-x86_64-"
                             "{version}.run")
        if self.installer is not None and "://" in self.installer and not HTTP_URL_RE.fullmatch(self.installer):
            raise InputError(f"--installer {shown(self.installer)} is not a valid http(s) URL",
                             hint="pass an http(s) URL, or the path of a local .run file (without file://)")
        if self.driver_source == "run" and self.driver is not None and not FULL_DRIVER_RE.fullmatch(self.driver):
            raise InputError(f"with --driver-source run, --driver must be a full version, not {shown(self.driver)}",
                             hint="pass e.g. --driver 535.309.01 (NVIDIA's installers are named by version)")
        if self.driver_source == "run" and self.driver is None and self.installer is None:
            raise InputError("with --driver-source run, say which driver",
                             hint="pass --driver VERSION (e.g. 535.309.01), and --installer URL|PATH for a mirror")
        if self.flavor is not None and self.driver is not None and FULL_DRIVER_RE.fullmatch(self.driver):
            require_flavor(self.driver, self.flavor)
        elif self.flavor == "proprietary" and self.driver is not None and version_tuple(self.driver) > PROPRIETARY_UNTIL:
            require_flavor(self.driver, self.flavor)  # a branch: 595
        if self.distribution is not None and not re.fullmatch(r"[a-z]+", self.distribution):
            raise InputError(f"distribution {shown(self.distribution)} is not a Debian code name",
                             hint="pass a code name such as bookworm or trixie")
        if self.builder_base is not None:
            validate_image_ref(self.builder_base, "--builder-base")
        # Files named on the command line exist, now, before anything is fetched or built.
        if self.installer is not None and "://" not in self.installer:
            existing_file(self.installer, "--installer", "NVIDIA-Linux-x86_64-VERSION.run, or its URL")
        if self.kernel_config not in (None, "host"):
            existing_file(self.kernel_config, "--kernel-config", "the target kernel's .config")
        if self.symvers not in (None, "host"):
            existing_file(self.symvers, "--symvers", "the target kernel's Module.symvers")
        if self.kernel_image is not None:
            existing_file(self.kernel_image, "--kernel-image", "the target's vmlinuz or a linux-image .deb")
        check_boot_append(self.boot_append, "--boot-append")
        if self.registry is not None:
            validate_registry(self.registry)
        if self.sign_key is not None:
            existing_file(self.sign_key, "--sign-key", "the PEM private key to sign the modules with")
        if self.sign_cert is not None:
            existing_file(self.sign_cert, "--sign-cert", "the key's X.509 certificate")
        if (self.sign_key is None) != (self.sign_cert is None) and not (self.sign_cert and self.no_build):
            raise InputError("--sign-key and --sign-cert go together" + ("" if self.sign_key else
                             " (only with --no-build does a certificate alone name the signed modules to take)"),
                             hint="pass both, e.g. --sign-key ./key.pem --sign-cert ./cert.pem (or "
                                  "CUDABUILD_SIGN_KEY and CUDABUILD_SIGN_CERT)")
        if self.sign_image is not None:
            existing_file(self.sign_image, "--sign-image", "the PEM private key to sign pushed images with")
        if self.verify_key is not None:
            existing_file(self.verify_key, "--verify-key", "the PEM public key images must be signed by")
        check_boot_timeout(self.boot_timeout, "--boot-timeout")

    def local_files(self) -> list[tuple[str, str]]:
        """(flag, path) of each file on this machine the options name: a build elsewhere cannot read them."""
        return [(f"--{name.replace('_', '-')}", value) for name in LOCAL_FILE_OPTIONS
                if isinstance(value := getattr(self, name), str) and value != "host" and "://" not in value]


# The options that may name a file on this machine.
LOCAL_FILE_OPTIONS = ("kernel_config", "symvers", "installer", "kernel_image", "sign_key", "sign_cert", "sign_image",
                      "verify_key")


# Which environment variable sets which option; the flag of the same name wins over it.
ENVIRONMENT = {
    "kernel_repo": "CUDABUILD_KERNEL_REPO",
    "installer_url": "CUDABUILD_INSTALLER_URL",
    "distribution": "CUDABUILD_DISTRIBUTION",
    "apt_mirror": "CUDABUILD_APT_MIRROR",
    "apt_security_mirror": "CUDABUILD_APT_SECURITY_MIRROR",
    "builder_base": "CUDABUILD_BUILDER_BASE",
    "only_modules": "CUDABUILD_ONLY_MODULES",
    "keep_builder": "CUDABUILD_KEEP_BUILDER",
    "compile_cache": "CUDABUILD_COMPILE_CACHE",
    "registry": "CUDABUILD_REGISTRY",
    "sign_key": "CUDABUILD_SIGN_KEY",
    "sign_cert": "CUDABUILD_SIGN_CERT",
    "sign_image": "CUDABUILD_IMAGE_KEY",
    "verify_key": "CUDABUILD_VERIFY_KEY",
}
_BOOLEAN = {"keep_builder", "compile_cache"}


def environment_value(name: str, raw: str) -> object:
    """An option's value as its environment variable spells it."""
    return raw not in ("0", "false", "no") if name in _BOOLEAN else raw


def default_of(name: str):
    """The default of a BuildOptions field (for --help texts)."""
    f = next(f for f in fields(BuildOptions) if f.name == name)
    return None if f.default is dataclasses.MISSING else f.default


def options_to_json(options: BuildOptions) -> str:
    """A resolved BuildOptions as data for another process (a matrix cell's build)."""
    return json.dumps(dataclasses.asdict(options), sort_keys=True)


def options_from_json(text: str) -> BuildOptions:
    """BuildOptions from options_to_json's data, checked again as every BuildOptions is."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise InputError(f"the build options given as data are not JSON ({exc})",
                         hint="pass what `cudabuild matrix` writes for a cell") from None
    known = {f.name for f in fields(BuildOptions)}
    if not isinstance(data, dict) or set(data) - known:
        raise InputError("the build options given as data are not cudabuild's "
                         f"(unknown: {', '.join(sorted(set(data) - known)) if isinstance(data, dict) else 'all'})",
                         hint="pass what `cudabuild matrix` writes for a cell, from the same cudabuild version")
    for f in fields(BuildOptions):
        value = data.get(f.name)
        kind = {"bool": bool, "int": int, "float": (int, float)}.get(str(f.type).removesuffix(" | None"), str)
        if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
            raise InputError(f"the build options given as data have {f.name} = {shown(str(value))}, not a {f.type}",
                             hint="pass what `cudabuild matrix` writes for a cell")
    return BuildOptions(**data)
