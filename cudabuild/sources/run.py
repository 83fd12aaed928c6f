"""Drivers from NVIDIA's .run installers: by URL (NVIDIA's pattern or a mirror's) or a local file,
downloaded on the host and stored by content.

An installer is never executed, nor is the decompressor it carries. It is an archive of NVIDIA's
makeself (1.6.0-nv2 to -nv9; FACTS.md, "The .run installer"): a `#! /bin/sh` stub whose first lines
are plain assignments (`CRCsum=` and `MD5=` of everything from line 4 on, `skip=` the line where the
payload begins, `skip_decompress=`/`size_decompress=` the lines of an embedded decompressor binary,
`label=`, `version_string=`, `targetdir=`), the decompressor, then one compressed tar: zstd from
530.30.02 on, xz, gzip or bzip2 before, or none. The host checks that shape and the MD5,
decompresses the tar itself (zstd with the `zstandard` library) and extracts it, refusing any member
that is absolute, climbs out with `..`, or is a link pointing out of the tree. Builds read the
result read-only."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from cudabuild.store.fetch import Fetcher, store_local
from cudabuild.digests import sha256_file
from cudabuild.errors import InputError, shown
from cudabuild.nvidia import FULL_DRIVER_RE
from cudabuild.options import existing_file

HEADER_BYTES = 64 * 1024  # the assignments are in the first lines of the stub
_ASSIGNMENT = re.compile(rb'([A-Za-z_][A-Za-z0-9_]*)=(?:"([^"\n]*)"|([^\s"]*))\s*')
_COMPRESSIONS = {b"\x28\xb5\x2f\xfd": "zstd", b"\xfd7zXZ\x00": "xz", b"\x1f\x8b": "gz", b"BZh": "bz2"}
_TAR_MAGIC_AT = 257  # "ustar" in the first header of an uncompressed tar


@dataclass(frozen=True)
class Installer:
    """An installer whose shape was checked: where its payload begins and what it is."""

    version: str
    label: str
    targetdir: str
    offset: int  # byte where the compressed tar begins
    compression: str  # zstd, xz, gz, bz2 or none
    decompressor: int = 0  # bytes of the embedded decompressor binary (never run; 0 when none)

    def to_json(self) -> dict:
        return {"version": self.version, "label": self.label, "targetdir": self.targetdir, "offset": self.offset,
                "compression": self.compression, "decompressor": self.decompressor}


@dataclass(frozen=True)
class RunDriver:
    version: str
    source: str  # the URL or path it came from
    path: Path  # in the content store
    sha256: str
    installer: Installer

    def canonical(self) -> dict:
        return {"kind": "run", "sha256": self.sha256}


def version_from_name(name: str) -> str | None:
    m = re.search(r"NVIDIA-Linux-x86_64-([0-9]{3}\.[0-9]+(?:\.[0-9]+)?)(?:-[a-z-]+)?\.run$", name)
    return m.group(1) if m else None


def _not_an_installer(path: Path, why: str) -> InputError:
    return InputError(f"{path} is not an NVIDIA installer: {why}",
                      hint="pass NVIDIA's NVIDIA-Linux-x86_64-VERSION.run as downloaded, whole and unchanged "
                      "(`sh FILE --check` verifies one)")


def _line_offsets(path: Path, lines: list[int]) -> dict[int, int]:
    """The byte offset at which each of `lines` (1-based) begins; a line past the end is absent."""
    wanted, found, line, offset = sorted(set(lines)), {}, 1, 0
    with open(path, "rb") as f:
        pending = [n for n in wanted if n > 1]
        if 1 in wanted:
            found[1] = 0
        while pending:
            chunk = f.read(1 << 20)
            if not chunk:
                break
            start = 0
            while pending:
                nl = chunk.find(b"\n", start)
                if nl < 0:
                    break
                line, start = line + 1, nl + 1
                if line == pending[0]:
                    found[line] = offset + start
                    pending.pop(0)
            offset += len(chunk)
    return found


def check_installer(path: Path) -> Installer:
    """The installer's shape, checked without running it; InputError when it is not one."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    lines = head.split(b"\n")
    if not lines or lines[0].strip() not in (b"#! /bin/sh", b"#!/bin/sh"):
        raise _not_an_installer(path, "it does not start with a makeself stub (#! /bin/sh)")
    values: dict[str, str] = {}
    for line in lines[1:40]:
        m = _ASSIGNMENT.fullmatch(line)
        if m:
            values.setdefault(m.group(1).decode(), (m.group(2) if m.group(2) is not None else m.group(3)).decode(
                "ascii", "replace"))
    missing = [k for k in ("MD5", "skip", "label", "targetdir") if k not in values]
    if missing:
        raise _not_an_installer(path, f"its stub has no {', '.join(missing)} (NVIDIA's makeself header)")
    numbers = {}
    for key in ("skip", "skip_decompress", "size_decompress"):
        value = values.get(key, "0")
        if not value.isascii() or not value.isdigit() or len(value) > 9:
            raise _not_an_installer(path, f"{key}={shown(value)} is not a line number")
        numbers[key] = int(value)
    skip, dskip, dsize = numbers["skip"], numbers["skip_decompress"], numbers["size_decompress"]
    if skip < 4:
        raise _not_an_installer(path, f"skip={skip} is not a line after the stub's checksums")
    if dsize and not 4 <= dskip < skip:
        raise _not_an_installer(path, f"its decompressor (lines {dskip} to {dskip + dsize - 1}) is not between "
                                f"its stub and its payload (line {skip})")
    if not re.fullmatch(r"[0-9a-f]{32}", values["MD5"]):
        raise _not_an_installer(path, f"MD5={shown(values['MD5'])} is not an md5 sum")
    m = re.fullmatch(r"NVIDIA-Linux-x86_64-([0-9]{3}\.[0-9]+(?:\.[0-9]+)?)(?:-[a-z-]+)?", values["targetdir"])
    if not m or "NVIDIA" not in values["label"]:
        raise _not_an_installer(path, f"its label {shown(values['label'])} and target directory "
                                f"{shown(values['targetdir'])} are not NVIDIA's Linux x86_64 driver's")
    version = m.group(1)
    at = _line_offsets(path, [4, skip] + ([dskip, dskip + dsize] if dsize else []))
    if skip not in at:
        raise _not_an_installer(path, f"it ends before line {skip}, where its payload should begin (truncated)")
    offset = at[skip]
    decompressor = at[dskip + dsize] - at[dskip] if dsize and dskip + dsize in at else 0
    with open(path, "rb") as f:
        f.seek(offset)
        magic = f.read(_TAR_MAGIC_AT + 5)
        # The MD5 makeself's --check computes: `tail -n +4 FILE | md5sum`.
        md5 = hashlib.md5()  # noqa: S324 - makeself's own checksum
        f.seek(at[4])
        while chunk := f.read(1 << 20):
            md5.update(chunk)
    compression = next((name for prefix, name in _COMPRESSIONS.items() if magic.startswith(prefix)), None)
    if compression is None and magic[_TAR_MAGIC_AT:_TAR_MAGIC_AT + 5] == b"ustar":
        compression = "none"
    if compression is None:
        raise _not_an_installer(path, f"no zstd, xz, gzip, bzip2 or tar data at line {skip}, where its stub says "
                                "the payload begins")
    if md5.hexdigest() != values["MD5"]:
        raise InputError(f"{path} is truncated or corrupt: its MD5 is {md5.hexdigest()}, its stub says "
                         f"{values['MD5']} ({size} bytes)",
                         hint="download the installer again; compare it with NVIDIA's published checksum")
    return Installer(version=version, label=values["label"], targetdir=values["targetdir"], offset=offset,
                     compression=compression, decompressor=decompressor)


def _checked_installer(path: Path, digest: str, store: Path) -> Installer:
    """Check once per content: the result is remembered beside the stored file."""
    record = store / f"{digest}.installer.json"
    if record.is_file():
        try:
            return Installer(**json.loads(record.read_text()))
        except (ValueError, TypeError):
            pass
    installer = check_installer(path)
    tmp = record.with_suffix(".partial")
    tmp.write_text(json.dumps(installer.to_json()))
    tmp.replace(record)
    return installer


def resolve_run_driver(*, version: str | None, installer: str | None, template: str, sha256: str | None,
                       store: Path, fetcher: Fetcher) -> RunDriver:
    source = installer or template.format(version=version)
    named = version_from_name(source.rsplit("/", 1)[-1])
    version = version or named
    if version is None or not FULL_DRIVER_RE.fullmatch(version):
        raise InputError(f"cannot tell the driver version of {shown(source)}",
                         hint="pass --driver VERSION with the installer's version, e.g. 535.309.01")
    if named and named != version:
        raise InputError(f"--driver {version} does not match the installer {shown(source)} (version {named})",
                         hint="pass the installer of the version you ask for, or the matching --driver")
    if "://" not in source:
        path = existing_file(source, "--installer", "NVIDIA-Linux-x86_64-VERSION.run, or its URL")
        digest = sha256_file(path)
        if sha256 and digest != sha256:
            raise InputError(f"{source} has sha256 {digest}, expected {sha256}",
                             hint="the file is not the installer you meant: check it, or the checksum")
        checked = check_installer(path)  # before it is copied into the cache
        stored, _ = store_local(path, store)
        return _run_driver(version, str(path.resolve()), stored, digest, checked)
    # A URL: its content is known by its sha256, given or remembered from an earlier download,
    # so a cached build needs no network.
    known = _urls(store)
    digest = sha256 or known.get(source)
    if digest and (store / digest).is_file():
        return _run_driver(version, source, store / digest, digest, _checked_installer(store / digest, digest, store))
    path = fetcher.fetch(source, store=store, sha256=sha256, label=source.rsplit("/", 1)[-1])
    try:
        checked = _checked_installer(path, path.name, store)
    except InputError:
        path.unlink(missing_ok=True)  # never keep what is not an installer
        raise
    known[source] = path.name
    _save_urls(store, known)
    return _run_driver(version, source, path, path.name, checked)


def _run_driver(version: str, source: str, path: Path, digest: str, installer: Installer) -> RunDriver:
    if installer.version != version:
        raise InputError(f"{source} is the installer of {installer.version}, not of {version}",
                         hint=f"pass the installer of {version}, or --driver {installer.version}")
    return RunDriver(version=version, source=source, path=path, sha256=digest, installer=installer)


def _urls(store: Path) -> dict[str, str]:
    index = store / "urls.json"
    return json.loads(index.read_text()) if index.is_file() else {}


def _save_urls(store: Path, urls: dict[str, str]) -> None:
    tmp = store / "urls.json.partial"
    tmp.write_text(json.dumps(urls, indent=1, sort_keys=True))
    tmp.replace(store / "urls.json")


# ---- extraction --------------------------------------------------------------------------------
def _member_problem(member) -> str | None:
    name = PurePosixPath(member.name)
    if name.is_absolute():
        return "an absolute path"
    if ".." in name.parts:
        return "a path that climbs out with .."
    if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
        return "a device, FIFO or other special file"
    if member.issym() or member.islnk():
        target = PurePosixPath(member.linkname)
        inside = (name.parent / target) if member.issym() else target
        if target.is_absolute() or ".." in PurePosixPath(os.path.normpath(str(inside))).parts \
                or os.path.normpath(str(inside)).startswith("/"):
            return f"a link pointing out of the installer ({shown(member.linkname)})"
    return None


def extract_installer(path: Path, installer: Installer, dest: Path) -> None:
    """Extract the payload into `dest` (which must not exist). Every member is checked before it
    is written; a bad one stops the extraction and `dest` is removed."""
    import lzma
    import tarfile  # only when extracting: a cache hit extracts nothing

    import zstandard

    dest.mkdir()
    try:
        with open(path, "rb") as raw:
            raw.seek(installer.offset)
            with _decompressed(raw, installer.compression) as stream, \
                    tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in tar:
                    problem = _member_problem(member)
                    if problem:
                        raise InputError(f"{path}: its archive holds {shown(member.name)}, {problem}; nothing "
                                         "was extracted",
                                         hint="use NVIDIA's installer as published: this one was altered to "
                                         "write outside its own directory")
                    if hasattr(tarfile, "data_filter"):
                        tar.extract(member, dest, filter="data")
                    else:  # Python < 3.11.4 (Debian 12 has 3.11.2): the checks above are the filter
                        tar.extract(member, dest, set_attrs=False)
                        if not member.issym():  # modes as the data filter leaves them (else dirs are 0700)
                            os.chmod(dest / member.name, member.mode & 0o755)
    except (tarfile.TarError, lzma.LZMAError, zstandard.ZstdError, OSError, EOFError) as exc:
        shutil.rmtree(dest, ignore_errors=True)
        raise InputError(f"{path}: its archive cannot be unpacked ({shown(str(exc))})",
                         hint="download the installer again; it is truncated or corrupt") from exc
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def _decompressed(raw, compression: str):
    """A stream of the payload's tar, decompressed on the host (the embedded decompressor is never run)."""
    if compression == "zstd":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=False)
    if compression == "none":
        return contextlib.nullcontext(raw)
    import bz2
    import gzip
    import lzma

    return {"xz": lzma.open, "gz": gzip.open, "bz2": bz2.open}[compression](raw)


def driver_subdir(installer_tree: Path, flavor: str, version: str) -> str:
    """kernel/ (proprietary) or kernel-open/ (open, from 515), checked to exist."""
    subdir = "kernel-open" if flavor == "open" else "kernel"
    if not (installer_tree / subdir / "Makefile").is_file():
        raise InputError(f"the installer of {version} has no {subdir}/Makefile"
                         + (": open modules need an installer of 515 or newer" if flavor == "open" else ""),
                         hint="pass the matching installer, or another --flavor")
    return subdir
