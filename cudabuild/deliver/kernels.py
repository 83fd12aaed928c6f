"""The kernels of a host: the one it runs, the ones it has installed, and the one it boots next.

Installed kernels are read where the boot loader finds them (FACTS.md): Debian's
`/boot/vmlinuz-RELEASE`, and Boot Loader Specification entries (`/boot/loader/entries/*.conf`,
which ostree-based hosts such as Fedora CoreOS write), whose `linux` line names
`.../vmlinuz-RELEASE`. The kernel the host boots next is the newest installed one when it is newer
than the running one; releases are ordered as dpkg orders versions (python-debian), so that
6.1.0-56-amd64 is newer than 6.1.0-9-amd64 and 6.5.6-300.fc39.x86_64 newer than 6.5.6-200.fc39.x86_64."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import PurePosixPath

from cudabuild.hostfs import HostPathError, HostRoot
from cudabuild.options import RELEASE_RE

BOOT = "boot"
BLS_ENTRIES = "boot/loader/entries"
_VMLINUZ = re.compile(r"vmlinuz-(?P<release>.+)")


# What package managers leave beside a kernel image while they work, or as a backup: not a kernel.
_NOT_INSTALLED = re.compile(r".*\.(dpkg-[a-z]+|rpmnew|rpmsave|old|bak)")


def _version(release: str):
    """A release as dpkg orders versions (a character dpkg does not allow in a version, such as
    the '_' of x86_64, counts as '.')."""
    from debian.debian_support import Version

    return Version(re.sub(r"[^A-Za-z0-9.+~-]", ".", release))


def newest(releases: Iterable[str]) -> str | None:
    ordered = sorted(set(releases), key=_version)
    return ordered[-1] if ordered else None


def newer(release: str, than: str) -> bool:
    return _version(release) > _version(than)


def _release_of(image: str) -> str | None:
    found = _VMLINUZ.fullmatch(PurePosixPath(image).name)
    if found and RELEASE_RE.fullmatch(found["release"]) and not _NOT_INSTALLED.fullmatch(found["release"]):
        return found["release"]
    return None


def installed(host: HostRoot) -> set[str]:
    """The kernel releases the host's boot loader can boot: /boot/vmlinuz-RELEASE and the `linux`
    lines of its BLS entries."""
    found = set()
    for rel in (BOOT, BLS_ENTRIES):
        for name in host.listdir(rel):
            if rel == BOOT:
                release = _release_of(name)
            elif name.endswith(".conf"):
                release = _bls_release(host, f"{rel}/{name}")
            else:
                release = None
            if release:
                found.add(release)
    return found


def _bls_release(host: HostRoot, rel: str) -> str | None:
    try:
        text = host.read_text(rel, limit=64 << 10)
    except HostPathError:
        return None
    for line in text.splitlines():
        key, _, value = line.strip().partition(" ")
        if key == "linux":
            return _release_of(value.strip())
    return None


def next_kernel(host: HostRoot, running: str) -> str | None:
    """The kernel the host boots next: the newest installed one, when it is newer than `running`."""
    candidate = newest(installed(host))
    return candidate if candidate and newer(candidate, running) else None
