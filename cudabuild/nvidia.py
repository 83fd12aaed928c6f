"""NVIDIA's and the kernel's facts, nothing the user chose: what a kernel release and a driver
version look like, Debian's kernel names and releases, which modules a driver has and what each
needs loaded first, and the branch rules (open modules from 515, the default from 560, the only
ones from 590). Sources: FACTS.md ("NVIDIA's current branches", "Debian 13 trixie", load order).

ASCII only: Python's \\d also matches other scripts' digits (e.g. Arabic-Indic), which no kernel
release or driver version contains."""

from __future__ import annotations

import re

from cudabuild.errors import InputError, shown

RELEASE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
DRIVER_RE = re.compile(r"[0-9]{3}(\.[0-9]{1,4}){0,2}")
FULL_DRIVER_RE = re.compile(r"[0-9]{3}\.[0-9]{1,4}(\.[0-9]{1,4})?")
# Debian's kernel releases (FACTS.md, "Debian 13 trixie"): bookworm's 6.1.0-57-amd64; from trixie on
# UPSTREAM+debN[.ABI]-FLAVOUR (6.12.117+deb13-amd64, the ABI bump 6.12.115+deb13.1-amd64, bookworm-backports'
# 6.12.95+deb12-amd64, forky's and sid's 7.2.13+deb14-amd64). Groups: the Debian release (debN), the flavour.
DEBIAN_RELEASE_RE = re.compile(
    r"[0-9]+\.[0-9]+\.[0-9]+(?:-[0-9]+|\+deb(?P<deb>[0-9]+)(?:\.[0-9]+)?)-(?P<flavour>amd64|cloud-amd64|rt-amd64)")
# Debian's releases by number (a +debN release names the Debian release its packages were built for).
DEBIAN_CODENAMES = {10: "buster", 11: "bullseye", 12: "bookworm", 13: "trixie", 14: "forky"}
# Bookworm and bullseye named their releases VERSION-ABI-FLAVOUR with the upstream line fixed.
_CODENAME_BY_LINE = {"6.1.0": "bookworm", "5.10.0": "bullseye", "4.19.0": "buster"}

FLAVORS = ("proprietary", "open")

OPEN_SINCE = (515,)  # the first branch with open kernel modules
OPEN_DEFAULT_SINCE = (560,)  # NVIDIA's installers build the open modules by default from here
PROPRIETARY_UNTIL = (580,)  # the last branch with proprietary modules (Maxwell, Pascal, Volta)

DEFAULT_DISTRIBUTION = "bookworm"  # where neither the kernel release nor the host says otherwise

# Which modules a driver release builds, by the first release that had them (FACTS.md).
_MODULES_SINCE = [
    ("nvidia", (0,)),
    ("nvidia-uvm", (331, 17)),
    ("nvidia-modeset", (358, 9)),
    ("nvidia-drm", (364, 12)),
    ("nvidia-peermem", (465,)),
]
MODULE_NAMES = tuple(name for name, _ in _MODULES_SINCE)
# The module each one needs loaded before it (FACTS.md, load order): a subset built with
# --only-modules holds what each of its modules needs.
MODULE_NEEDS = {"nvidia-uvm": "nvidia", "nvidia-modeset": "nvidia", "nvidia-drm": "nvidia-modeset",
                "nvidia-peermem": "nvidia"}


def only_modules(value: str) -> tuple[str, ...]:
    """--only-modules NAMES (comma-separated) as module names in load order, checked: NVIDIA's
    modules only, each with what it needs."""
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in MODULE_NAMES]
    if unknown or not names:
        raise InputError(f"--only-modules {shown(value)}: " + (f"{', '.join(shown(n) for n in unknown)} "
                         "is not an NVIDIA module" if unknown else "names no module"),
                         hint=f"choose from {', '.join(MODULE_NAMES)}, e.g. --only-modules nvidia,nvidia-uvm "
                              "(a compute-only driver)")
    lacking = sorted({f"{name} needs {MODULE_NEEDS[name]}" for name in names
                      if name in MODULE_NEEDS and MODULE_NEEDS[name] not in names})
    if lacking:
        raise InputError(f"--only-modules {shown(value)}: {'; '.join(lacking)}",
                         hint="add the modules they need, e.g. --only-modules nvidia,nvidia-modeset,nvidia-drm")
    return tuple(name for name in MODULE_NAMES if name in names)



def debian_distribution(release: str | None, host_codename: str | None) -> tuple[str, str]:
    """The Debian release whose packages serve a kernel release, and why: the one the release's name
    says (6.12.117+deb13-amd64: trixie; 6.1.0-57-amd64: bookworm), else this host's own (a Debian
    host's /etc/os-release), else bookworm."""
    m = DEBIAN_RELEASE_RE.fullmatch(release or "")
    if m and m.group("deb") and int(m.group("deb")) in DEBIAN_CODENAMES:
        return DEBIAN_CODENAMES[int(m.group("deb"))], f"{release} is a Debian {m.group('deb')} kernel"
    if m and (line := release.split("-", 1)[0]) in _CODENAME_BY_LINE:
        return _CODENAME_BY_LINE[line], f"{release} is a {_CODENAME_BY_LINE[line]} kernel"
    if host_codename:
        return host_codename, "this host's Debian release (/etc/os-release)"
    return DEFAULT_DISTRIBUTION, "the default"


def require_open_support(version: str) -> None:
    """Open kernel modules exist from 515 on (FACTS.md)."""
    if version_tuple(version) < OPEN_SINCE:
        raise InputError(f"driver {version} has no open kernel modules: they exist from 515 on",
                         hint="use --flavor proprietary, or a driver of 515 or newer")


def default_flavor(version: str) -> str:
    """The flavour a driver builds when none is asked for: NVIDIA's own default, the open modules
    from 560 on (FACTS.md, "NVIDIA's current branches"), the proprietary ones before."""
    return "open" if version_tuple(version) >= OPEN_DEFAULT_SINCE else "proprietary"


def require_flavor(version: str, flavor: str) -> None:
    """A flavour the driver has: open from 515, proprietary up to the 580 branch (from 590 NVIDIA
    ships only the open modules)."""
    if flavor == "open":
        require_open_support(version)
    elif version_tuple(version)[:1] > PROPRIETARY_UNTIL:
        raise InputError(f"driver {version} has no proprietary kernel modules: from the 590 branch on NVIDIA "
                         "ships only the open modules, which need a GPU with a GSP (Turing or newer)",
                         hint="build the open modules (the default, or --flavor open); Maxwell, Pascal and Volta "
                              "GPUs need the proprietary modules of 580 or earlier (e.g. --driver 580.142 "
                              "--flavor proprietary with NVIDIA's 580 installer)")


def kernel_tag(release: str) -> tuple[str, str]:
    """linux-stable's tag for a release, and the rest of the release (the suffix):
    4.3.6-coreos -> (v4.3.6, -coreos); 6.1.0-foo -> (v6.1, -foo)."""
    m = re.fullmatch(r"([0-9]+)\.([0-9]+)(?:\.([0-9]+))?(.*)", release)
    if not m:
        raise InputError(f"kernel release {shown(release)} does not start with a kernel version (like 6.1.192)",
                         hint="pass the `uname -r` of the target, e.g. --kernel 4.3.6-coreos")
    major, minor, sub, suffix = m.groups()
    tag = f"v{major}.{minor}" + (f".{sub}" if sub and sub != "0" else "")
    return tag, suffix


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"[0-9]+", version))


def expected_modules(driver_version: str) -> list[str]:
    """The modules a driver of this version builds for x86_64."""
    v = version_tuple(driver_version)
    return [name for name, since in _MODULES_SINCE if v >= since]


def modules_to_build(driver_version: str, only: str | None) -> tuple[str, ...]:
    """The modules a build makes: all the driver has, or the --only-modules subset of them."""
    has = expected_modules(driver_version)
    if only is None:
        return tuple(has)
    chosen = only_modules(only)
    lacking = [name for name in chosen if name not in has]
    if lacking:
        raise InputError(f"--only-modules: NVIDIA {driver_version} has no {', '.join(lacking)}",
                         hint=f"choose from what it has: {', '.join(has)}")
    return chosen


