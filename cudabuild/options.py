"""Validation of user strings and the frozen objects a build is described by.

Every string that can reach a shell, a path or an image tag is checked here, once."""

from __future__ import annotations

import re
from dataclasses import dataclass

from cudabuild.errors import InputError

RELEASE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
DRIVER_RE = re.compile(r"\d{3}(\.\d{1,4}){0,2}")
JOBS_MAX = 256

KERNEL_SOURCES = ("debian", "git")
DRIVER_SOURCES = ("debian", "run")
FLAVORS = ("proprietary", "open")
CHECKOUTS = ("sparse", "full")
OPEN_SINCE = (515,)
DEFAULT_KERNEL_REPO = "https://git.kernel.org/pub/scm/linux/kernel/git/stable/linux.git"
DEFAULT_INSTALLER_URL = "https://download.nvidia.com/XFree86/Linux-x86_64/{version}/NVIDIA-Linux-x86_64-{version}.run"
URL_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[A-Za-z0-9._~:/%@+=,-]+")
FULL_DRIVER_RE = re.compile(r"\d{3}\.\d{1,4}(\.\d{1,4})?")
DEBIAN_RELEASE_RE = re.compile(r"\d+\.\d+\.\d+-\d+-(amd64|cloud-amd64|rt-amd64)|\d+\.\d+\.\d+\+deb\d+-(amd64|cloud-amd64|rt-amd64)")

# Which modules a driver release builds, by the first release that had them (FACTS.md).
_MODULES_SINCE = [
    ("nvidia", (0,)),
    ("nvidia-uvm", (331, 17)),
    ("nvidia-modeset", (358, 9)),
    ("nvidia-drm", (364, 12)),
    ("nvidia-peermem", (465,)),
]


def validate_release(value: str, *, what: str = "kernel release") -> str:
    if not RELEASE_RE.fullmatch(value or "") or ".." in value:
        raise InputError(
            f"{what} {value!r} is not valid: a release is what `uname -r` prints, made of letters, "
            "digits and . _ + - (for example 6.1.0-56-amd64 or 4.3.6-coreos)",
            hint="pass the exact `uname -r` of the target host with --kernel, or --kernel latest",
        )
    return value


def validate_driver(value: str) -> str:
    if not DRIVER_RE.fullmatch(value or ""):
        raise InputError(
            f"driver version {value!r} is not valid: expected a version like 535.309.01, "
            "or a branch like 535",
            hint="pass --driver VERSION (e.g. 535.309.01) or --driver BRANCH (e.g. 535)",
        )
    return value


def kernel_tag(release: str) -> tuple[str, str]:
    """linux-stable's tag for a release, and the rest of the release (the suffix):
    4.3.6-coreos -> (v4.3.6, -coreos); 6.1.0-foo -> (v6.1, -foo)."""
    m = re.fullmatch(r"(\d+)\.(\d+)(?:\.(\d+))?(.*)", release)
    if not m:
        raise InputError(f"kernel release {release!r} does not start with a kernel version (like 6.1.192)",
                         hint="pass the `uname -r` of the target, e.g. --kernel 4.3.6-coreos")
    major, minor, sub, suffix = m.groups()
    tag = f"v{major}.{minor}" + (f".{sub}" if sub and sub != "0" else "")
    return tag, suffix


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version))


def expected_modules(driver_version: str) -> list[str]:
    """The modules a driver of this version builds for x86_64."""
    v = version_tuple(driver_version)
    return [name for name, since in _MODULES_SINCE if v >= since]


@dataclass(frozen=True, kw_only=True)
class ModulesOptions:
    """What the user asked `cudabuild modules` for, after defaults, environment and flags."""

    kernel: str | None = None  # a release, "latest", or None for this host's
    driver: str | None = None  # a version, a branch, or None for the newest that supports the kernel
    kernel_source: str | None = None  # None: debian for Debian's releases, git otherwise
    driver_source: str = "debian"
    flavor: str = "proprietary"
    kernel_repo: str = DEFAULT_KERNEL_REPO
    kernel_config: str | None = None  # a file, or "host"
    symvers: str | None = None  # a file, or "host"
    kernel_checkout: str = "sparse"
    installer: str | None = None  # a URL or a file
    installer_url: str = DEFAULT_INSTALLER_URL  # template with {version}
    sha256: str | None = None
    jobs: int = 2
    use_cache: bool = True
    refresh_index: bool = False
    apt_mirror: str = "http://deb.debian.org/debian"
    apt_security_mirror: str = "http://deb.debian.org/debian-security"
    distribution: str = "bookworm"
    builder_base: str | None = None
    output: str | None = None
    verbose: bool = False
    keep_builder: bool = False

    def __post_init__(self) -> None:
        if self.kernel not in (None, "latest"):
            validate_release(self.kernel)
        if self.driver is not None:
            validate_driver(self.driver)
        for value, allowed, what in (
            (self.kernel_source or "debian", KERNEL_SOURCES, "--kernel-source"),
            (self.kernel_checkout, CHECKOUTS, "--kernel-checkout"),
            (self.driver_source, DRIVER_SOURCES, "--driver-source"),
            (self.flavor, FLAVORS, "--flavor"),
        ):
            if value not in allowed:
                raise InputError(f"{what} {value!r} is not supported",
                                 hint=f"choose one of: {', '.join(allowed)}")
        if not 1 <= self.jobs <= JOBS_MAX:
            raise InputError(f"--jobs {self.jobs} is out of range", hint=f"pass 1 to {JOBS_MAX}")
        for url, what in ((self.apt_mirror, "--apt-mirror"), (self.apt_security_mirror, "--apt-security-mirror")):
            if not re.fullmatch(r"https?://[A-Za-z0-9._~:/%@+-]+", url):
                raise InputError(f"{what} {url!r} is not an http(s) URL",
                                 hint="pass a Debian mirror such as http://deb.debian.org/debian")
        if not URL_RE.fullmatch(self.kernel_repo):
            raise InputError(f"--kernel-repo {self.kernel_repo!r} is not a repository URL",
                             hint="pass a URL such as git://mirror.example/linux-stable.git or https://...")
        if self.sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise InputError(f"--sha256 {self.sha256!r} is not a sha256 (64 lower-case hex digits)",
                             hint="pass the checksum NVIDIA publishes beside the installer")
        if "{version}" not in self.installer_url or not URL_RE.fullmatch(self.installer_url.replace("{version}", "1")):
            raise InputError(f"installer URL template {self.installer_url!r} is not a URL with {{version}}",
                             hint="set CUDABUILD_INSTALLER_URL like https://mirror/{version}/NVIDIA-Linux-x86_64-{version}.run")
        if self.installer is not None and "://" in self.installer and not URL_RE.fullmatch(self.installer):
            raise InputError(f"--installer {self.installer!r} is not a valid URL",
                             hint="pass an http(s) URL or the path of a local .run file")
        if self.driver_source == "run" and self.driver is not None and not FULL_DRIVER_RE.fullmatch(self.driver):
            raise InputError(f"with --driver-source run, --driver must be a full version, not {self.driver!r}",
                             hint="pass e.g. --driver 535.309.01 (NVIDIA's installers are named by version)")
        if self.driver_source == "run" and self.driver is None and self.installer is None:
            raise InputError("with --driver-source run, say which driver",
                             hint="pass --driver VERSION (e.g. 535.309.01), and --installer URL|PATH for a mirror")
        if self.flavor == "open" and self.driver is not None and FULL_DRIVER_RE.fullmatch(self.driver) \
                and version_tuple(self.driver) < OPEN_SINCE:
            raise InputError(f"driver {self.driver} has no open kernel modules: they exist from 515 on",
                             hint="use --flavor proprietary, or a driver of 515 or newer")
        if not re.fullmatch(r"[a-z]+", self.distribution):
            raise InputError(f"distribution {self.distribution!r} is not a Debian code name",
                             hint="pass a code name such as bookworm or trixie")
