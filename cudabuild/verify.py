"""Verification of built modules, on the host, by reading the ELF files themselves:
`.modinfo` (vermagic, version, depends) and `__versions` (the CRC of every kernel symbol a module
imports, which the kernel checks at load time when it has CONFIG_MODVERSIONS)."""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from cudabuild.errors import VerifyError


@dataclass(frozen=True)
class ModuleInfo:
    name: str
    path: Path
    size: int
    sha256: str
    vermagic: str
    version: str | None
    depends: tuple[str, ...]
    crcs: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    def as_json(self) -> dict:
        return {"name": self.name, "file": self.path.name, "size": self.size, "sha256": self.sha256,
                "vermagic": self.vermagic, "version": self.version, "depends": list(self.depends)}


def read_module(path: Path) -> ModuleInfo:
    """Read a kernel module's .modinfo and __versions sections."""
    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            modinfo = elf.get_section_by_name(".modinfo")
            if modinfo is None:
                raise VerifyError(f"{path} has no .modinfo section: it is not a kernel module")
            fields: dict[str, str] = {}
            for item in modinfo.data().split(b"\0"):
                key, sep, value = item.decode("utf-8", "replace").partition("=")
                if sep:
                    fields.setdefault(key, value)
            crcs: dict[str, int] = {}
            versions = elf.get_section_by_name("__versions")
            if versions is not None:
                data = versions.data()
                word = 8 if elf.elfclass == 64 else 4
                fmt = ("<" if elf.little_endian else ">") + ("Q" if word == 8 else "I")
                for offset in range(0, len(data) - 63, 64):  # struct modversion_info: crc + name[64 - word]
                    (crc,) = struct.unpack_from(fmt, data, offset)
                    name = data[offset + word:offset + 64].split(b"\0", 1)[0].decode()
                    crcs[name] = crc
    except (ELFError, OSError) as exc:
        raise VerifyError(f"cannot read {path} as an ELF kernel module: {exc}") from exc
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    depends = tuple(d for d in fields.get("depends", "").split(",") if d)
    return ModuleInfo(name=fields.get("name", path.stem).replace("_", "-"), path=path, size=path.stat().st_size,
                      sha256=digest, vermagic=fields.get("vermagic", ""), version=fields.get("version"),
                      depends=depends, crcs=crcs)


def read_symvers(path: Path) -> dict[str, int]:
    """Module.symvers: `0xCRC<TAB>symbol<TAB>module<TAB>export[<TAB>namespace]` per line."""
    crcs: dict[str, int] = {}
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        parts = line.split("\t")
        if len(parts) < 4 or not parts[0].startswith("0x"):
            raise VerifyError(f"{path} line {number} is not a Module.symvers line: {line[:80]!r}",
                              hint="pass the Module.symvers of the kernel build (it has 4 or 5 tab-separated columns)")
        crcs[parts[1]] = int(parts[0], 16)
    return crcs


def config_enabled(config: Path, option: str) -> bool:
    return any(line.strip() == f"{option}=y" for line in config.read_text(errors="replace").splitlines())


def verify_modules(directory: Path, *, release: str, driver_version: str, expected: list[str],
                   symvers: Path | None, modversions: bool) -> list[ModuleInfo]:
    """Check every expected module; raise VerifyError naming every problem found."""
    problems: list[str] = []
    infos: list[ModuleInfo] = []
    kernel_crcs = read_symvers(symvers) if symvers else {}
    for name in expected:
        path = directory / f"{name}.ko"
        if not path.is_file():
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
