"""Verification of kernel modules, on the host, by reading the ELF files themselves:
`.modinfo` (vermagic, version, depends) and `__versions` (the CRC of every kernel symbol a module
imports, which the kernel checks at load time when it has CONFIG_MODVERSIONS).

Modules come from builds, caches, directories and images: none is trusted. Sections are read only
when they lie inside the file and are of a sane size; the file itself is hashed in chunks."""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from cudabuild.digests import sha256_file
from cudabuild.errors import VerifyError, shown
from cudabuild.lazy import lazy_import

# pyelftools loads when a file is first read: a cache hit whose files are unchanged reads none.
_elffile = lazy_import("elftools.elf.elffile")
_exceptions = lazy_import("elftools.common.exceptions")

MAX_MODINFO_BYTES = 1 << 20
MAX_VERSIONS_BYTES = 16 << 20
MODVERSION_ENTRY = 64  # struct modversion_info: an 8-byte CRC, then a 56-byte name (64-bit)
_SYMBOL_RE = re.compile(rb"[A-Za-z0-9_.$]+")


def _malformed() -> tuple[type[BaseException], ...]:
    """What a malformed ELF file makes pyelftools raise: never a traceback for the user."""
    from elftools.construct import ConstructError

    return (_exceptions.ELFError, _exceptions.ELFParseError, ConstructError, struct.error, ValueError, OverflowError,
            MemoryError, UnicodeDecodeError, IndexError, KeyError, AttributeError)


@dataclass(frozen=True)
class ModuleEntry:
    """One kernel module as read from its ELF file, and as the manifest lists it (artifact.Manifest
    .modules): the same type for both. `path` (where it was read) and `crcs` (the symbol versions it
    imports) are what reading it learned beside the entry; they take no part in comparing entries."""

    name: str
    file: str
    size: int
    sha256: str
    vermagic: str
    version: str | None
    depends: tuple[str, ...] = ()
    path: Path | None = field(default=None, compare=False, repr=False)
    crcs: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    def to_json(self) -> dict:
        return {"name": self.name, "file": self.file, "size": self.size, "sha256": self.sha256,
                "vermagic": self.vermagic, "version": self.version, "depends": list(self.depends)}


def _section_bytes(elf, name: str, *, file_size: int, limit: int, path: Path) -> bytes | None:
    section = elf.get_section_by_name(name)
    if section is None:
        return None
    offset, size = section["sh_offset"], section["sh_size"]
    if section["sh_type"] != "SHT_PROGBITS":
        raise VerifyError(f"{path}: its {name} section holds no data ({section['sh_type']}): not a kernel module")
    if size > limit or offset + size > file_size:
        raise VerifyError(f"{path}: its {name} section claims {size} bytes at offset {offset}, outside the "
                          f"{file_size}-byte file: the file is corrupt or not a kernel module")
    return section.data()


def read_module(path: Path, *, digest: bool = True, crcs: bool = True) -> ModuleEntry:
    """Read a kernel module's .modinfo and (with `crcs`) __versions sections, with bounds."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            elf = _elffile.ELFFile(f)
            modinfo = _section_bytes(elf, ".modinfo", file_size=size, limit=MAX_MODINFO_BYTES, path=path)
            if modinfo is None:
                raise VerifyError(f"{path} has no .modinfo section: it is not a kernel module")
            fields: dict[str, str] = {}
            for item in modinfo.split(b"\0"):
                key, sep, value = item.partition(b"=")
                if sep:
                    fields.setdefault(key.decode("ascii", "replace"), value.decode("utf-8", "replace"))
            imports: dict[str, int] = {}
            versions = _section_bytes(elf, "__versions", file_size=size, limit=MAX_VERSIONS_BYTES,
                                      path=path) if crcs else None
            if versions is not None:
                word = 8 if elf.elfclass == 64 else 4
                fmt = ("<" if elf.little_endian else ">") + ("Q" if word == 8 else "I")
                for offset in range(0, len(versions) - MODVERSION_ENTRY + 1, MODVERSION_ENTRY):
                    (crc,) = struct.unpack_from(fmt, versions, offset)
                    raw = versions[offset + word:offset + MODVERSION_ENTRY].split(b"\0", 1)[0]
                    if not _SYMBOL_RE.fullmatch(raw):
                        raise VerifyError(f"{path}: its __versions section names a symbol that is not a C "
                                          f"identifier ({shown(raw.decode('utf-8', 'replace'))}): the file is "
                                          "corrupt or not a kernel module")
                    imports[raw.decode("ascii")] = crc
    except VerifyError:
        raise
    except OSError as exc:
        raise VerifyError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except _malformed() as exc:
        raise VerifyError(f"{path} is not an ELF kernel module ({type(exc).__name__}: {shown(str(exc))})") from exc
    vermagic = fields.get("vermagic")
    if not vermagic:
        raise VerifyError(f"{path} has no vermagic in its .modinfo: it is not a kernel module")
    depends = tuple(d for d in fields.get("depends", "").split(",") if d)
    return ModuleEntry(name=fields.get("name", path.stem).replace("_", "-"), file=path.name, path=path, size=size,
                      sha256=sha256_file(path) if digest else "", vermagic=vermagic, version=fields.get("version"),
                      depends=depends, crcs=imports)


SYMVERS_LIMIT = 64 << 20  # Debian's amd64 kernel: 2 MB, some 30,000 symbols


def read_symvers(path: Path) -> dict[str, int]:
    """Module.symvers: `0xCRC<TAB>symbol<TAB>module<TAB>export[<TAB>namespace]` per line."""
    crcs: dict[str, int] = {}
    with open(path, "rb") as f:
        data = f.read(SYMVERS_LIMIT + 1)
    if len(data) > SYMVERS_LIMIT:
        raise VerifyError(f"{path} is larger than {SYMVERS_LIMIT >> 20} MiB, far more than a kernel's Module.symvers "
                          "(a few MB)", hint="pass the Module.symvers of the kernel build")
    for number, line in enumerate(data.decode(errors="replace").splitlines(), 1):
        parts = line.split("\t")
        if len(parts) < 4 or not re.fullmatch(r"0x[0-9a-fA-F]{1,16}", parts[0]):
            raise VerifyError(f"{path} line {number} is not a Module.symvers line: {shown(line)}",
                              hint="pass the Module.symvers of the kernel build (it has 4 or 5 tab-separated columns)")
        crcs[parts[1]] = int(parts[0], 16)
    return crcs


def config_enabled(config: Path, option: str) -> bool:
    return any(line.strip() == f"{option}=y" for line in config.read_text(errors="replace").splitlines())


def verify_modules(directory: Path, *, release: str, driver_version: str, expected: list[str],
                   symvers: Path | None, modversions: bool) -> list[ModuleEntry]:
    """Check every expected module; raise VerifyError naming every problem found."""
    problems: list[str] = []
    infos: list[ModuleEntry] = []
    kernel_crcs = read_symvers(symvers) if symvers else {}
    for name in expected:
        path = directory / f"{name}.ko"
        if not path.is_file() or path.is_symlink():
            problems.append(f"{name}.ko is missing")
            continue
        info = read_module(path)
        infos.append(info)
        if not info.vermagic.startswith(release + " "):
            problems.append(f"{name}.ko has vermagic {info.vermagic!r}, which is not for kernel {release}")
        # Some branches' nvidia-uvm declares no version (470); nvidia.ko always does.
        if (info.version is not None or name == "nvidia") and info.version != driver_version:
            problems.append(f"{name}.ko has version {info.version!r}, expected {driver_version}")
        if modversions:
            if not info.crcs:
                problems.append(f"{name}.ko has no symbol CRCs but the kernel has CONFIG_MODVERSIONS=y: "
                                "it was built without the kernel's Module.symvers and would be refused")
            for symbol, crc in info.crcs.items():
                if symbol in kernel_crcs and kernel_crcs[symbol] != crc:
                    problems.append(f"{name}.ko expects {symbol} with CRC {crc:#010x}, "
                                    f"the kernel exports {kernel_crcs[symbol]:#010x}")
    if problems:
        raise VerifyError("the built modules failed verification:\n  - " + "\n  - ".join(problems),
                          hint="the modules were not published; check that the kernel headers, config and "
                          "Module.symvers all belong to the target kernel")
    return infos


def soname(path: Path) -> str | None:
    """A shared library's DT_SONAME (libcuda.so.VERSION -> libcuda.so.1), or None."""
    from elftools.elf.dynamic import DynamicSection

    try:
        with open(path, "rb") as f:
            for section in _elffile.ELFFile(f).iter_sections():
                if isinstance(section, DynamicSection):
                    for tag in section.iter_tags():
                        if tag.entry.d_tag == "DT_SONAME":
                            return str(tag.soname)
    except (*_malformed(), OSError):
        return None
    return None
