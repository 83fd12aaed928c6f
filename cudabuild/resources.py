"""Where the container-side files live: inside the wheel (cudabuild/_data/...) or, in a checkout
or an editable install, at the top of the repository."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def resource_dir(name: str) -> Path:
    """Return the directory `name` (builder, dockerfiles or images)."""
    for candidate in (_PACKAGE / "_data" / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"cudabuild's {name}/ directory is missing from the installation ({_PACKAGE})")


def static_busybox() -> Path:
    """This host's static busybox (no ELF interpreter), which the boot test's initramfs and the
    KMM image carry; InputError naming the package when there is none."""
    from elftools.elf.elffile import ELFFile

    from cudabuild.errors import InputError

    for candidate in ("/bin/busybox", "/usr/bin/busybox"):
        path = Path(candidate)
        if path.is_file():
            with open(path, "rb") as f:
                if not any(seg["p_type"] == "PT_INTERP" for seg in ELFFile(f).iter_segments()):
                    return path
    raise InputError("a static busybox is needed on this host (the boot test, the KMM image)",
                     hint="install it: apt-get install busybox-static (bash scripts/setup does)")
