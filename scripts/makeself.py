"""Write a self-extracting archive laid out as NVIDIA's makeself (1.6.0-nv2 to -nv9) installers are
(FACTS.md, "The .run installer"):

    line 1      `#! /bin/sh`
    lines 2-3   `CRCsum=` (POSIX cksum) and `MD5=` (md5sum), both of `tail -n +4 FILE`
    lines 4-    `skip=`, `skip_decompress=`, `size_decompress=`, `label=`, `version_string=`,
                `pkg_version=`, `script=`, `targetdir=`, `scriptargs=`, `keep=`, `TARGET_OS=`,
                `TARGET_ARCH=`, then the shell code that extracts
    skip_decompress .. +size_decompress-1   the embedded decompressor binary (zstd or xz)
    skip ..     the payload to the end of the file: one compressed tar of the package directory's
                contents (`./kernel/...`, `./nvidia-installer`, no top folder)

Compression follows the version, as NVIDIA's: zstd from 530.30.02 on, xz before. The embedded
decompressor is this machine's `zstd` or `xz` binary; `sh FILE -x [--target DIR]` extracts with it,
as the real stub does. Used by scripts/standin-installer and by the tests (hostile archives)."""

from __future__ import annotations

import hashlib
import io
import lzma
import shutil
import subprocess
import tarfile
from pathlib import Path

import zstandard

STUB = """#! /bin/sh
CRCsum={crc}
MD5={md5}
skip={skip}
skip_decompress={skip_decompress}
size_decompress={size_decompress}
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
        --extract-decompress) tail -n +$skip_decompress "$0" | head -n $size_decompress; exit $? ;;
        --target) shift; targetdir=$1 ;;
    esac
    shift
done
[ "$extract" -eq 1 ] || {{ echo "this stand-in only extracts; pass -x" >&2; exit 1; }}
if [ -e "$targetdir" ]; then
    echo "The directory '$targetdir' already exists." >&2
    exit 1
fi
tmpdir=$(mktemp -d "$TMPROOT/makeself.XXXXXX") || exit 1
tail -n +$skip_decompress "$0" | head -n $size_decompress > "$tmpdir/decompress" && chmod +x "$tmpdir/decompress"
mkdir -p "$targetdir" && tail -n +$skip "$0" | "$tmpdir/decompress" -dc | tar -xf - -C "$targetdir"
status=$?
rm -rf "$tmpdir"
exit $status
"""


def compression_for(version: str) -> str:
    """NVIDIA's: zstd from 530.30.02 on, xz before (FACTS.md)."""
    return "zstd" if tuple(int(p) for p in version.split(".")) >= (530, 30, 2) else "xz"


def posix_cksum(data: bytes) -> int:
    """POSIX `cksum`, which makeself's CRCsum is."""
    return int(subprocess.run(["cksum"], input=data, capture_output=True, check=True).stdout.split()[0])


def tar_bytes(entries: dict[str, tuple[int, bytes | None, str | None]]) -> bytes:
    """A tar of path -> (mode, data or None for a directory, link target or None), with members
    named `./PATH` as NVIDIA's (`cd DIR; tar cf - $(find . -maxdepth 1 -mindepth 1)`)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for path in sorted(entries):
            mode, data, link = entries[path]
            info = tarfile.TarInfo(path if path.startswith(("/", "./", "../")) else f"./{path}")
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


def compress(tar: bytes, compression: str) -> bytes:
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=3).compress(tar)
    return lzma.compress(tar, preset=1, check=lzma.CHECK_CRC32)


def write_installer(out: Path, version: str, tar: bytes, *, targetdir: str | None = None,
                    compression: str | None = None) -> Path:
    """Write `out` holding `tar` (uncompressed tar bytes) as NVIDIA's makeself writes an installer."""
    targetdir = targetdir or f"NVIDIA-Linux-x86_64-{version}"
    compression = compression or compression_for(version)
    payload = compress(tar, compression)
    tool = shutil.which("zstd" if compression == "zstd" else "xz")
    if tool is None:
        raise SystemExit(f"the embedded decompressor needs `{compression}` on this machine (scripts/setup installs it)")
    # The binary is padded to end a line, so that the payload begins at a line as `tail -n +skip` reads it.
    decompressor = Path(tool).read_bytes()
    decompressor += b"" if decompressor.endswith(b"\n") else b"\n"
    size_decompress = decompressor.count(b"\n")
    fields = dict(version=version, targetdir=targetdir, size_decompress=size_decompress)
    stub_lines = STUB.format(crc="0", md5="0", skip=0, skip_decompress=0, **fields).count("\n")
    skip_decompress = stub_lines + 1
    stub = STUB.format(crc="{crc}", md5="{md5}", skip=skip_decompress + size_decompress,
                       skip_decompress=skip_decompress, **fields)
    lines = stub.split("\n")
    tail = "\n".join(lines[3:]).encode() + decompressor + payload  # `tail -n +4` of the file
    whole = ("\n".join(lines[:3]).format(crc=posix_cksum(tail), md5=hashlib.md5(tail).hexdigest()) + "\n").encode()
    whole += tail
    partial = out.with_name(out.name + ".partial")
    partial.write_bytes(whole)
    partial.chmod(0o755)
    partial.replace(out)
    return out
