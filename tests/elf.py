"""Minimal ELF64 relocatable objects with the sections a kernel module has (.modinfo, __versions),
written byte by byte so that tests can also make the broken ones an attacker would: a section
that claims 1 TiB, a .modinfo that holds no data (NOBITS), a symbol name that is not UTF-8."""

from __future__ import annotations

import struct
from pathlib import Path

SHT_PROGBITS, SHT_STRTAB, SHT_NOBITS = 1, 3, 8


def module_bytes(modinfo: dict[str, str] | bytes, crcs: dict[bytes, int] | None = None, *,
                 modinfo_type: int = SHT_PROGBITS, modinfo_size: int | None = None,
                 modinfo_offset: int | None = None) -> bytes:
    info = modinfo if isinstance(modinfo, bytes) else b"".join(
        f"{k}={v}".encode() + b"\0" for k, v in modinfo.items())
    versions = b"".join(struct.pack("<Q", crc) + name.ljust(56, b"\0")[:56] for name, crc in (crcs or {}).items())
    names = b"\0.modinfo\0__versions\0.shstrtab\0"
    body = bytearray(b"\0" * 64)  # the ELF header, written last
    sections = [(0, 0, 0, 0)]  # (name offset, type, offset, size)
    for name_off, kind, data in ((1, SHT_PROGBITS, info), (10, SHT_PROGBITS, versions), (21, SHT_STRTAB, names)):
        offset = len(body)
        body += data
        sections.append((name_off, kind, offset, len(data)))
    name_off, _, offset, size = sections[1]
    sections[1] = (name_off, modinfo_type, modinfo_offset if modinfo_offset is not None else offset,
                   modinfo_size if modinfo_size is not None else size)
    shoff = len(body)
    for name_off, kind, offset, size in sections:
        body += struct.pack("<IIQQQQIIQQ", name_off, kind, 0, 0, offset, size, 0, 0, 1, 0)
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + b"\0" * 8
    body[:64] = ident + struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, len(sections), 3)
    return bytes(body)


RELEASE, DRIVER = "6.1.0-56-amd64", "535.309.01"
VERMAGIC = f"{RELEASE} SMP preempt mod_unload modversions "


def write_artifact(root: Path, *, modules=(("nvidia", "drm"), ("nvidia-uvm", "nvidia")), release: str = RELEASE,
                   driver: str = DRIVER) -> Path:
    """A valid artifact directory whose modules are written byte by byte: (name, depends) pairs,
    a stand-in libcuda with its SONAME link chain, and the manifest by cudabuild's own module."""
    from cudabuild.artifact import Manifest, describe_userspace
    from cudabuild.verify import read_module

    vermagic = f"{release} SMP preempt mod_unload modversions "
    (root / "modules").mkdir(parents=True)
    for name, depends in modules:
        (root / "modules" / f"{name}.ko").write_bytes(module_bytes(
            {"vermagic": vermagic, "name": name.replace("-", "_"), "version": driver, "depends": depends},
            {b"_printk": 1}))
    lib = root / "userspace" / "lib"
    lib.mkdir(parents=True)
    (lib / f"libcuda.so.{driver}").write_bytes(b"\x7fELF libcuda")
    (lib / "libcuda.so.1").symlink_to(f"libcuda.so.{driver}")
    (lib / "libcuda.so").symlink_to("libcuda.so.1")  # a chain, as Debian's packages ship it
    infos = [read_module(root / "modules" / f"{name}.ko") for name, _ in modules]
    Manifest(key="a" * 64, created="2026-11-22T00:00:00+00:00", kernel_release=release, driver_version=driver,
             flavor="proprietary", vermagic=vermagic, modules=tuple(infos),
             userspace=describe_userspace(root / "userspace")).write(root)
    return root
