"""Validation of user strings and the frozen objects a build is described by.

Every string that can reach a shell, a path or an image tag is checked here, once."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from cudabuild.errors import InputError

RELEASE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
DRIVER_RE = re.compile(r"\d{3}(\.\d{1,4}){0,2}")
JOBS_MAX = 256

KERNEL_SOURCES = ("debian",)
DRIVER_SOURCES = ("debian",)
FLAVORS = ("proprietary", "open")

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
    kernel_source: str = "debian"
    driver_source: str = "debian"
    flavor: str = "proprietary"
    jobs: int = 2
    use_cache: bool = True
    refresh_index: bool = False
    apt_mirror: str = "http://deb.debian.org/debian"
    apt_security_mirror: str = "http://deb.debian.org/debian-security"
    distribution: str = "bookworm"
    builder_base: str | None = None
    output: str | None = None
    verbose: bool = False

    def __post_init__(self) -> None:
        if self.kernel not in (None, "latest"):
            validate_release(self.kernel)
        if self.driver is not None:
            validate_driver(self.driver)
        for value, allowed, what in (
            (self.kernel_source, KERNEL_SOURCES, "--kernel-source"),
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
        if not re.fullmatch(r"[a-z]+", self.distribution):
            raise InputError(f"distribution {self.distribution!r} is not a Debian code name",
                             hint="pass a code name such as bookworm or trixie")


@dataclass(frozen=True, kw_only=True)
class Package:
    """One .deb of Debian's archive, as its Packages index describes it."""

    name: str
    version: str
    filename: str
    sha256: str
    size: int
    base_url: str
    depends: str = ""

    @property
    def url(self) -> str:
        return f"{self.base_url.rstrip('/')}/{self.filename}"

    @property
    def upstream_version(self) -> str:
        version = self.version.split(":", 1)[-1]
        return version.rsplit("-", 1)[0] if "-" in version else version


@dataclass(frozen=True, kw_only=True)
class BuildSpec:
    """Everything that decides the built modules: the cache key is a hash of this."""

    kernel_release: str
    driver_version: str
    flavor: str
    kernel_packages: tuple[Package, ...]
    driver_package: Package
    userspace_packages: tuple[Package, ...]
    builder_tag: str
    modules: tuple[str, ...] = field(default_factory=tuple)
    gcc_major: int | None = None

    def canonical(self) -> dict:
        def pkg(p: Package) -> dict:
            return {"name": p.name, "version": p.version, "sha256": p.sha256}

        return {
            "format": 1,
            "kernel_release": self.kernel_release,
            "driver_version": self.driver_version,
            "flavor": self.flavor,
            "kernel_packages": [pkg(p) for p in self.kernel_packages],
            "driver_package": pkg(self.driver_package),
            "userspace_packages": [pkg(p) for p in self.userspace_packages],
            "builder": self.builder_tag,
            "modules": list(self.modules),
        }
