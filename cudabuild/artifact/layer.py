"""A modules image's layers unpacked, bounded, only what an artifact holds (modules/, userspace/, the
manifest): from a `docker save` archive or a registry's blobs. An image has two layers (the
userspace, then the modules and the manifest: artifact/image.py) or, in the format before them,
one; both are read (the one-layer format until cudabuild 1.0)."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

from cudabuild.errors import VerifyError, shown


# ---- a saved modules image ---------------------------------------------------------------------
def unpack_image(saved_path: Path, into: Path) -> None:
    """The layers of a saved modules image (`docker save`) into `into`, in order: only modules/,
    userspace/ and manifest.json, regular files, directories and links inside their directory."""
    import tarfile  # only to pull: a cache hit reads no tar

    with tarfile.open(saved_path) as saved:
        try:
            index = json.load(saved.extractfile("manifest.json"))
            layers = index[0]["Layers"]
        except (KeyError, ValueError, IndexError, TypeError) as exc:
            raise VerifyError("the pulled image is not a saved image cudabuild can read",
                              hint="use images `cudabuild modules --registry` pushed") from exc
        if not isinstance(layers, list) or len(layers) not in MODULES_LAYERS:
            raise VerifyError(f"the pulled modules image has {len(layers)} layers, not two (or one, as before): "
                              "cudabuild did not make it", hint="use images `cudabuild modules --registry` pushed")
        for layer in layers:
            extract_layer(saved.extractfile(layer), into, compression=_compression_of(saved.extractfile(layer)))
    restore_modules(into)


MODULES_LAYERS = (1, 2)  # how many layers a modules image has: two, or one in the format before


def _compression_of(head) -> str:
    """A layer file's compression told from its first bytes ("gz", "zst" or "" for a plain tar)."""
    magic = head.read(4)
    return "gz" if magic[:2] == b"\x1f\x8b" else "zst" if magic == b"\x28\xb5\x2f\xfd" else ""


MAX_UNPACKED = 16 << 30  # bytes a modules image's layer may unpack to: a driver's is under 1 GB


def extract_layer(layer, into: Path, *, compression: str = "", limit: int = MAX_UNPACKED) -> None:
    """A modules image's layer (a tar file or file object; compressed when `compression` is "gz"
    or "zst") into `into`: only modules/, userspace/ and manifest.json, regular files, directories
    and links inside their directory, at most `limit` bytes (each member's size counted before it
    is written)."""
    import tarfile

    unreadable: tuple[type[BaseException], ...] = (tarfile.TarError, EOFError, OSError)
    if compression == "zst":
        import zstandard

        unreadable += (zstandard.ZstdError,)
        source = open(layer, "rb") if isinstance(layer, (str, Path)) else layer
        opened = tarfile.open(fileobj=zstandard.ZstdDecompressor().stream_reader(source, closefd=source is not layer),
                              mode="r|")
    else:
        mode = f"r:{compression}" if compression else "r:"
        opened = tarfile.open(layer, mode) if isinstance(layer, (str, Path)) else tarfile.open(fileobj=layer, mode=mode)
    unpacked = 0
    try:
        with opened:
            for member in opened:
                unpacked += member.size
                if unpacked > limit:  # checked before the member is written
                    raise VerifyError(f"the modules image unpacks to more than {limit >> 20} MiB, far more than "
                                      "its layer's size allows for a driver's files (a compression bomb?)",
                                      hint="use images `cudabuild modules --registry` pushed")
                name = PurePosixPath(member.name.removeprefix("./"))
                if not name.parts or name.parts[0] not in ("modules", "userspace", "manifest.json", "reference"):
                    continue
                outward = member.issym() and (member.linkname.startswith("/") or ".." in member.linkname.split("/"))
                if ".." in name.parts or not (member.isfile() or member.isdir() or member.issym()) or outward:
                    raise VerifyError(f"the modules image holds {shown(member.name)}, which cudabuild never writes",
                                      hint="use images `cudabuild modules --registry` pushed")
                member.name = str(name)
                opened.extract(member, into, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    except unreadable as exc:
        if isinstance(exc, OSError) and exc.errno is not None:  # the disk's, not the layer's (gzip's has none)
            raise
        raise VerifyError(f"the modules image's layer is not a tar file cudabuild can read ({exc})",
                          hint="use images `cudabuild modules --registry` pushed") from exc


def restore_modules(out: Path, *, keep_reference: bool = False) -> None:
    """The modules an image stores against the driver's reference objects (modules/NAME.ko.zst,
    artifact/image.py) restored as modules/NAME.ko, each at most MAX_UNPACKED bytes; what they
    restore to is checked against the manifest as every file is. `out/reference` is removed
    unless `keep_reference` (a node keeps it with the userspace layer for the next kernel)."""
    import shutil

    from cudabuild.artifact.image import DELTA, DELTA_WINDOW, REFERENCE, dictionary

    deltas = sorted(p for p in (out / "modules").glob(f"*{DELTA}") if p.is_file() and not p.is_symlink()) \
        if (out / "modules").is_dir() else []
    if deltas:
        import zstandard

        references = sorted(p for p in (out / REFERENCE).iterdir() if p.is_file() and not p.is_symlink()) \
            if (out / REFERENCE).is_dir() else []
        if not references:
            raise VerifyError("the modules image stores its modules against reference objects it does not carry",
                              hint="use images `cudabuild modules --registry` pushed")
        table, _ = dictionary(references)
        reader = zstandard.ZstdDecompressor(dict_data=table, max_window_size=1 << DELTA_WINDOW)
        for delta in deltas:
            target = delta.with_name(delta.name[:-len(DELTA)])
            written = 0
            try:
                with open(delta, "rb") as source, open(target, "wb") as sink:
                    stream = reader.stream_reader(source)
                    for chunk in iter(lambda: stream.read(1 << 20), b""):
                        written += len(chunk)
                        if written > MAX_UNPACKED:
                            raise VerifyError(f"{delta.name} restores to more than {MAX_UNPACKED >> 20} MiB",
                                              hint="use images `cudabuild modules --registry` pushed")
                        sink.write(chunk)
            except zstandard.ZstdError as exc:
                raise VerifyError(f"the modules image's {delta.name} cannot be restored ({exc})",
                                  hint="use images `cudabuild modules --registry` pushed") from exc
            shutil.copymode(delta, target)
            delta.unlink()
    if not keep_reference:
        shutil.rmtree(out / REFERENCE, ignore_errors=True)
