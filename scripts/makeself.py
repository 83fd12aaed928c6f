"""Write a self-extracting archive in the shape of NVIDIA's makeself 1.6.0-nv2 installers: a
`#! /bin/sh` stub whose first lines are `CRCsum=`, `MD5=` (both of everything from line 4 on),
`skip=` (the line where the payload begins), `label=`, `version_string=` and `targetdir=`, then an
xz-compressed tar (xz -C none, as NVIDIA's). `sh FILE -x [--target DIR]` extracts it, as the real
one does. Used by scripts/standin-installer and by the tests (hostile archives)."""

from __future__ import annotations

import hashlib
import io
import lzma
import subprocess
import tarfile
from pathlib import Path

STUB = """#! /bin/sh
CRCsum={crc}
MD5={md5}
skip={skip}
skip_decompress={skip}
size_decompress=0
label="NVIDIA Accelerated Graphics Driver for Linux-x86_64 {version}"
version_string={version}
pkg_version=1
script=./nvidia-installer
targetdir={targetdir}
scriptargs=""
keep=n
TMPROOT=${{TMPDIR:=/tmp}}
TARGET_OS="Linux"
TARGET_ARCH="x86_64"
# Stand-in for NVIDIA's {targetdir}.run, made by cudabuild's scripts: it only extracts.
extract=0
while [ $# -gt 0 ]; do
    case "$1" in
        -x|--extract-only) extract=1 ;;
        --target) shift; targetdir=$1 ;;
    esac
    shift
done
[ "$extract" -eq 1 ] || {{ echo "this stand-in only extracts; pass -x" >&2; exit 1; }}
if [ -e "$targetdir" ]; then
    echo "The directory '$targetdir' already exists." >&2
    exit 1
fi
mkdir -p "$targetdir" && tail -n +$skip "$0" | xz -d | tar -xf - -C "$targetdir"
exit $?
"""


def posix_cksum(data: bytes) -> int:
    """POSIX `cksum`, which makeself's CRCsum is."""
    return int(subprocess.run(["cksum"], input=data, capture_output=True, check=True).stdout.split()[0])


def tar_bytes(entries: dict[str, tuple[int, bytes | None, str | None]]) -> bytes:
    """A tar of path -> (mode, data or None for a directory, link target or None)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for path in sorted(entries):
            mode, data, link = entries[path]
            info = tarfile.TarInfo(path)
            info.mode, info.mtime = mode & 0o7777, 0
            if link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, link
                tar.addfile(info)
            elif data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return raw.getvalue()


def write_installer(out: Path, version: str, tar: bytes, *, targetdir: str | None = None) -> Path:
    """Write `out` holding `tar` (uncompressed tar bytes) as a makeself 1.6.0-nv2 installer."""
    targetdir = targetdir or f"NVIDIA-Linux-x86_64-{version}"
    payload = lzma.compress(tar, preset=1, check=lzma.CHECK_NONE)
    stub = STUB.format(crc="0" * 10, md5="0" * 32, skip=0, version=version, targetdir=targetdir)
    skip = stub.count("\n") + 1
    stub = STUB.format(crc="{crc}", md5="{md5}", skip=skip, version=version, targetdir=targetdir)
    lines = stub.split("\n")
    tail = ("\n".join(lines[3:])).encode() + payload  # `tail -n +4` of the file
    whole = ("\n".join(lines[:3]).format(crc=posix_cksum(tail), md5=hashlib.md5(tail).hexdigest()) + "\n").encode()
    whole += tail
    partial = out.with_name(out.name + ".partial")
    partial.write_bytes(whole)
    partial.chmod(0o755)
    partial.replace(out)
    return out
