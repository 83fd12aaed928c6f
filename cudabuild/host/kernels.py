"""The kernels of a host: the one it runs, the ones it has installed, and the one it boots next.

Installed kernels are read wherever a boot loader finds them (the Boot Loader Specification and
UAPI.2 name the places):

- Debian's `/boot/vmlinuz-RELEASE` (a name without a release, such as Arch's `vmlinuz-linux-lts`
  or Alpine's `vmlinuz-virt`, and Flatcar's `/boot/flatcar/vmlinuz-a|b`: the release the image's
  own x86 boot header names); a signed copy beside it (`*.efi.signed`) is the same kernel;
- Type #1 entries (`loader/entries/*.conf` in /boot, on the ESP at /boot/efi or /efi), whose
  `linux` line (key and value separated by any whitespace) names `.../vmlinuz-RELEASE`, else
  their `version`, else the unified image their `uki`/`efi` line names;
- Type #2 unified kernel images (`EFI/Linux/*.efi` on the ESP or /boot): the release in their
  `.uname` PE section.

The kernel the host boots next is the boot loader's default entry where that is known (a
`default` in loader/loader.conf); otherwise the newest installed kernel of the running kernel's
flavour (6.1.0-57-amd64 or 6.12.117+deb13-amd64, not -cloud-amd64 or -rt-amd64), ordered as dpkg
orders versions (python-debian; `-rcN` before its release; Debian's ABI bump 6.12.115+deb13.1 after
6.12.115+deb13 and before 6.12.117+deb13, as their packages 6.12.115-2 and 6.12.117-1 are), when it
is newer than the running one. When an
installed kernel's release cannot be read, or a place cannot be listed, the next kernel is not
known: `next_kernel` says so (exit 23), and nothing staged is pruned."""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from cudabuild.errors import NoBuildError
from cudabuild.host.root import HostPathError, HostRoot, NotThereError, read_regular
from cudabuild.nvidia import RELEASE_RE

BOOT = "boot"
FLATCAR = "boot/flatcar"
ESPS = ("boot", "boot/efi", "efi")  # where a BLS tree (loader/, EFI/Linux/) may be
BLS_ENTRIES = "loader/entries"
UKI_DIR = "EFI/Linux"
ENTRY_LIMIT = 1 << 20  # a BLS entry is a few hundred bytes; a longer one is still read, to this bound
IMAGE_HEAD = 1 << 16  # what of a kernel image is read for its release
_VMLINUZ = re.compile(r"vmlinuz-(?P<name>.+)")
# What package managers leave beside a kernel image while they work, or as a backup, and a signed
# copy of the same kernel: not another kernel.
_NOT_A_KERNEL = re.compile(r".*\.(dpkg-[a-z]+|rpmnew|rpmsave|old|bak|efi\.signed|signed|sig|hmac)")
_VERSION_LIKE = re.compile(r"[0-9]+\.[0-9]+[A-Za-z0-9._+~-]*")
_LEAD = re.compile(r"[0-9]+(?:\.[0-9]+)*(?:-rc[0-9]+)?(?:[-.][0-9]+)*")


def _version(release: str):
    """A release as dpkg orders versions: a character dpkg does not allow in a version (the '_' of
    x86_64) counts as '.', and a release candidate comes before its release (6.2.0-rc7 < 6.2.0)."""
    from debian.debian_support import Version

    text = re.sub(r"-rc([0-9])", r"~rc\1", release)
    return Version(re.sub(r"[^A-Za-z0-9.+~-]", ".", text))


def _release(text: str) -> str | None:
    """`text` when it is a kernel release (a version first: 6.1.0-57-amd64, not linux-lts), else None."""
    return text if RELEASE_RE.fullmatch(text) and _VERSION_LIKE.fullmatch(text) else None


def newest(releases: Iterable[str]) -> str | None:
    ordered = sorted(set(releases), key=_version)
    return ordered[-1] if ordered else None


def newer(release: str, than: str) -> bool:
    return _version(release) > _version(than)


def flavour(release: str) -> str:
    """What stays the same across a distribution's updates of one kernel line: the part after the
    version and ABI (-amd64, -cloud-amd64, -rt-amd64, -generic), a distribution tag (.fc39, .el9_3;
    Debian's +deb13 and its ABI bump +deb13.1) left out."""
    lead = _LEAD.match(release)
    rest = release[lead.end():] if lead else release
    rest = re.sub(r"^\+deb[0-9]+(?:\.[0-9]+)?(?=-)", "", rest)
    return re.sub(r"\.[a-z]+[0-9]+(?:_[0-9]+)*(?=\.)", "", rest)


@dataclass(frozen=True)
class Entry:
    """One kernel the boot loader can boot: where it is (as the host sees it) and its release
    (None: it could not be read)."""

    where: str
    release: str | None
    entry_id: str | None = None  # a BLS entry's id (its file name without .conf), for loader.conf's default


@dataclass
class BootState:
    entries: list[Entry] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)  # places that exist and cannot be listed or read
    default_pattern: str | None = None  # loader.conf's `default` glob

    @property
    def releases(self) -> set[str]:
        return {e.release for e in self.entries if e.release}

    @property
    def unknown(self) -> list[str]:
        return [e.where for e in self.entries if e.release is None]

    @property
    def complete(self) -> bool:
        """Whether every installed kernel is known (only then may staged builds be pruned)."""
        return not self.unknown and not self.unreadable

    def problems(self) -> str:
        said = [f"{where}: its kernel release cannot be read" for where in self.unknown]
        said += [f"{where} cannot be read" for where in self.unreadable]
        return "; ".join(said)


def _names(host: HostRoot, rel: str, state: BootState) -> list[str]:
    """The names in a directory under the root; none when it is not there; said in `state` when it
    is there and cannot be listed."""
    try:
        with host.directory(rel) as fd:
            return sorted(os.listdir(fd))
    except NotThereError:
        return []
    except (HostPathError, OSError):
        state.unreadable.append("/" + rel)
        return []


def _head(host: HostRoot, rel: str, size: int) -> bytes | None:
    """At most `size` bytes of a regular file (never blocking on a FIFO or a device)."""
    try:
        return read_regular(host.resolve(rel), size)
    except (HostPathError, OSError):
        return None


def image_release(host: HostRoot, rel: str) -> str | None:
    """The release an x86 bzImage names in its boot header ('HdrS' at 0x202, the kernel_version
    pointer at 0x20e, relative to 0x200); None when it names none."""
    head = _head(host, rel, IMAGE_HEAD)
    if not head or len(head) < 0x210 or head[0x202:0x206] != b"HdrS":
        return None
    pointer = int.from_bytes(head[0x20E:0x210], "little") + 0x200
    text = head[pointer:pointer + 256].split(b"\0", 1)[0].decode("ascii", "replace")
    return _release(text.split(" ", 1)[0])


def uki_release(host: HostRoot, rel: str) -> str | None:
    """The release a unified kernel image (UAPI.2, Type #2) names in its .uname PE section."""
    import pefile

    try:
        path = host.resolve(rel)
        if not os.path.isfile(path) or os.path.getsize(path) > 1 << 30:
            return None
        image = pefile.PE(str(path), fast_load=True)
    except (HostPathError, OSError, pefile.PEFormatError):
        return None
    try:
        for section in image.sections:
            if section.Name.rstrip(b"\0") == b".uname":
                text = section.get_data()[:section.Misc_VirtualSize or None][:256]
                release = text.split(b"\0", 1)[0].decode("ascii", "replace").strip()
                return release if RELEASE_RE.fullmatch(release) else None
        return None
    finally:
        image.close()


def _from_vmlinuz(host: HostRoot, rel: str) -> Entry | None:
    """An image named vmlinuz-NAME: the release in its name, else in its boot header."""
    name = PurePosixPath(rel).name
    found = _VMLINUZ.fullmatch(name)
    if not found or _NOT_A_KERNEL.fullmatch(name):
        return None
    return Entry("/" + rel, _release(found["name"]) or image_release(host, rel))


def _bls(host: HostRoot, esp: str, name: str) -> Entry:
    rel = f"{esp}/{BLS_ENTRIES}/{name}"
    entry_id = name.removesuffix(".conf")
    try:
        text = host.read_text(rel, limit=ENTRY_LIMIT)
    except HostPathError:
        return Entry("/" + rel, None, entry_id)
    fields: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 1)  # BLS: a key and its value, separated by any whitespace
        fields.setdefault(parts[0], parts[1].strip() if len(parts) > 1 else "")
    release = None
    kernel = _VMLINUZ.fullmatch(PurePosixPath(fields.get("linux", "")).name)
    if kernel:
        release = _release(kernel["name"]) or image_release(host, f"{esp}/{fields['linux'].lstrip('/')}")
    release = release or _release(fields.get("version", ""))
    for key in ("uki", "efi"):
        if release is None and key in fields:
            release = uki_release(host, f"{esp}/{fields[key].lstrip('/')}")
    return Entry("/" + rel, release, entry_id)


def boot_state(host: HostRoot) -> BootState:
    """Every kernel the host's boot loaders can boot, and what could not be read."""
    state = BootState()
    for name in _names(host, BOOT, state):
        entry = _from_vmlinuz(host, f"{BOOT}/{name}")
        if entry:
            state.entries.append(entry)
    for name in _names(host, FLATCAR, state):
        if name in ("vmlinuz-a", "vmlinuz-b"):
            state.entries.append(Entry(f"/{FLATCAR}/{name}", image_release(host, f"{FLATCAR}/{name}")))
    seen_esps = set()
    for esp in ESPS:
        try:
            real = host.resolve(esp)
        except HostPathError:
            continue
        if real in seen_esps:
            continue
        seen_esps.add(real)
        for name in _names(host, f"{esp}/{BLS_ENTRIES}", state):
            if name.endswith(".conf") and not name.startswith("."):
                state.entries.append(_bls(host, esp, name))
        for name in _names(host, f"{esp}/{UKI_DIR}", state):
            if name.lower().endswith(".efi") and not name.startswith("."):
                rel = f"{esp}/{UKI_DIR}/{name}"
                state.entries.append(Entry("/" + rel, uki_release(host, rel), name[:-4]))
        try:
            conf = host.read_text(f"{esp}/loader/loader.conf", limit=ENTRY_LIMIT)
        except HostPathError:
            conf = ""
        for line in conf.splitlines():
            parts = line.strip().split(None, 1)
            if len(parts) == 2 and parts[0] == "default" and state.default_pattern is None:
                state.default_pattern = parts[1].strip()
    return state


def installed(host: HostRoot) -> set[str]:
    """The kernel releases the host's boot loaders can boot (those that could be read)."""
    return boot_state(host).releases


def _default(state: BootState) -> str | None:
    """The release of loader.conf's default entry, when it names one that can be read."""
    if not state.default_pattern or state.default_pattern.startswith("@"):
        return None  # @saved / @default: kept in EFI variables, not on disk
    pattern = state.default_pattern.removesuffix(".conf")
    matches = [e for e in state.entries if e.entry_id and fnmatch.fnmatchcase(e.entry_id, pattern)]
    known = [e.release for e in matches if e.release]
    return newest(known) if known and len(known) == len(matches) else None


class NextKernelUnknown(NoBuildError):
    """The kernel the host boots next cannot be determined: the gate says not ready (exit 23)."""


def next_kernel(host: HostRoot, running: str) -> str | None:
    """The kernel the host boots next when it is not the running one, None when it is the running
    one. NextKernelUnknown when it cannot be told (an installed kernel whose release cannot be
    read, a boot directory that cannot be listed)."""
    state = boot_state(host)
    default = _default(state)
    if default is not None:
        return default if default != running else None
    if not state.complete:
        raise NextKernelUnknown(f"the kernel this host boots next cannot be determined: {state.problems()}",
                                hint="name it: --kernel RELEASE (the release the boot loader will boot)")
    mine = [r for r in state.releases if flavour(r) == flavour(running)]
    candidate = newest(mine)
    return candidate if candidate and newer(candidate, running) else None
