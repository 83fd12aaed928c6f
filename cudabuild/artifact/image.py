"""The modules image, made by cudabuild itself (no Dockerfile, no build): two layers by what changes.

- the **userspace layer**: `userspace/` (the driver's libraries, binaries and firmware), the same
  bytes for every kernel of one driver version and flavour, so a registry and a node keep it once;
- the **modules layer**: `modules/` and `manifest.json`, the kernel's own part.

Where the driver has kernel-independent objects (the proprietary modules' `nv-kernel.o_binary` and
`nv-modeset-kernel.o_binary`, which make up most of nvidia.ko), the registry's image carries them
in the userspace layer under `reference/`, and its modules layer holds each module as a zstd frame
with those objects as its dictionary (`modules/NAME.ko.zst`): a new kernel's modules layer is a few
MB instead of tens. Every reader restores the modules (artifact/layer.py, restore_modules) and
checks them against the manifest as always.

Each layer is a deterministic tar (sorted, owner 0, time 0), so the same files give the same diff
ID and, compressed the same way, the same digest on any machine. The config carries the artifact's
labels (artifact/labels.py) and nothing that changes between runs, so the image's ID is the same
wherever it is made. An image of the one-layer format (modules, userspace and the manifest in one
layer) is still read everywhere: its layer holds the same paths."""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cudabuild.artifact.manifest import MANIFEST
from cudabuild.artifact.tree import Artifact

CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
# A layer's media type -> how it is compressed ("" none, "gz", "zst"): what cudabuild reads.
LAYER_TYPES = {"application/vnd.docker.image.rootfs.diff.tar.gzip": "gz",
               "application/vnd.oci.image.layer.v1.tar+gzip": "gz",
               "application/vnd.oci.image.layer.v1.tar+zstd": "zst",
               LAYER_TAR: ""}
COMPRESSIONS = {"gzip": ("gz", "application/vnd.oci.image.layer.v1.tar+gzip"),
                "zstd": ("zst", "application/vnd.oci.image.layer.v1.tar+zstd")}
DEFAULT_COMPRESSION = "gzip"  # every engine and registry reads it; zstd where all of a fleet's engines do
LAYER_TITLE = "org.opencontainers.image.title"  # a layer descriptor's annotation: which part it is
USERSPACE_LAYER, MODULES_LAYER = "userspace", "modules"
REFERENCE = "reference"  # the driver's kernel-independent objects, in the registry's userspace layer
DELTA = ".zst"  # a module stored as a zstd frame whose dictionary is the reference objects
DELTA_WINDOW = 27  # log2 of the frames' window: nvidia.ko is under 128 MiB


@dataclass(frozen=True)
class Layer:
    """One uncompressed layer tar on disk and its diff ID (sha256:HEX of the tar)."""

    part: str  # USERSPACE_LAYER or MODULES_LAYER
    path: Path
    diff_id: str
    size: int


@dataclass(frozen=True)
class Blob:
    """A blob as a registry keeps it: its digest, size and media type, and where its bytes are."""

    digest: str
    size: int
    media_type: str
    path: Path | None = None
    data: bytes | None = None
    annotations: Mapping[str, str] | None = None

    def descriptor(self) -> dict:
        described = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            described["annotations"] = dict(self.annotations)
        return described

    def read(self) -> bytes:
        return self.data if self.data is not None else self.path.read_bytes()

    @classmethod
    def of(cls, data: bytes, media_type: str, **annotations: str) -> "Blob":
        return cls(f"sha256:{hashlib.sha256(data).hexdigest()}", len(data), media_type, data=data,
                   annotations=annotations or None)


def _normalised(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = 0
    return info


def write_layer(root: Path | None, names: Iterable[str] | Iterable[tuple[str, Path]], out: Path, part: str) -> Layer:
    """A deterministic tar at `out` of `names`: paths relative to `root`, or (name in the layer,
    path) pairs; links stay links."""
    entries = sorted((name, root / name) if isinstance(name, str) else name for name in names)
    with open(out, "wb") as raw:
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name, path in entries:
                tar.add(path, arcname=name, recursive=False, filter=_normalised)
    digest = hashlib.sha256()
    with open(out, "rb") as made:
        for chunk in iter(lambda: made.read(1 << 20), b""):
            digest.update(chunk)
    return Layer(part, out, f"sha256:{digest.hexdigest()}", out.stat().st_size)


def layers_of(artifact: Artifact, work: Path) -> list[Layer]:
    """The artifact's two layers, written into `work`: the userspace, then the modules and manifest."""
    work.mkdir(parents=True, exist_ok=True)
    files = [rel for rel, _ in artifact.files()]
    userspace = [rel for rel in files if rel.startswith("userspace/")]
    modules = [rel for rel in files if rel.startswith("modules/")] + [MANIFEST]
    return [write_layer(artifact.root, userspace, work / "userspace.tar", USERSPACE_LAYER),
            write_layer(artifact.root, modules, work / "modules.tar", MODULES_LAYER)]


def dictionary(references: list[Path]):
    """The zstd dictionary of the reference objects (their bytes, in the order given), and the
    parameters the modules are compressed with against it."""
    import zstandard

    data = b"".join(path.read_bytes() for path in references)
    params = zstandard.ZstdCompressionParameters.from_level(9, window_log=DELTA_WINDOW, hash_log=25, chain_log=26,
                                                            enable_ldm=True)
    return zstandard.ZstdCompressionDict(data, dict_type=zstandard.DICT_TYPE_RAWCONTENT), params


def delta_modules(artifact: Artifact, references: list[Path], out: Path) -> list[tuple[str, Path]]:
    """Each module of `artifact` compressed against `references` into out/modules/NAME.ko.zst, and
    the manifest beside them: the modules layer's (name, path) entries."""
    import shutil
    import zstandard

    table, params = dictionary(references)
    table.precompute_compress(compression_params=params)
    compressor = zstandard.ZstdCompressor(dict_data=table, compression_params=params)
    (out / "modules").mkdir(parents=True, exist_ok=True)
    entries = []
    for rel, _ in artifact.files():
        if not rel.startswith("modules/"):
            continue
        target = out / f"{rel}{DELTA}"
        with open(artifact.root / rel, "rb") as source, open(target, "wb") as sink:
            compressor.copy_stream(source, sink)
        shutil.copymode(artifact.root / rel, target)
        entries.append((f"{rel}{DELTA}", target))
    shutil.copy2(artifact.root / MANIFEST, out / MANIFEST)
    return [*entries, (MANIFEST, out / MANIFEST)]


def config_of(labels: Mapping[str, str], diff_ids: list[str]) -> bytes:
    """The image's config: the labels, the layers' diff IDs and, as `created`, the build's own time
    (its label, when it has one): nothing that changes between runs of the same build."""
    config = {"architecture": "amd64", "os": "linux", "config": {"Labels": dict(sorted(labels.items()))},
              "rootfs": {"type": "layers", "diff_ids": list(diff_ids)}}
    if labels.get("org.opencontainers.image.created"):
        config["created"] = labels["org.opencontainers.image.created"]
    return json.dumps(config, sort_keys=True, separators=(",", ":")).encode()


def manifest_of(config: Blob, layers: list[Blob], *, artifact_type: str | None = None) -> bytes:
    """An OCI image manifest of `config` and `layers`, as the registry and a digest see it."""
    manifest = {"schemaVersion": 2, "mediaType": MANIFEST_TYPE, "config": config.descriptor(),
                "layers": [layer.descriptor() for layer in layers]}
    if artifact_type:
        manifest["artifactType"] = artifact_type
    return json.dumps(manifest, separators=(",", ":")).encode()


GZIP_CHUNK = 16 << 20  # bytes of a layer compressed apart, as one gzip member (the chunks are fixed)


def compress(layer: Layer, out: Path, compression: str = DEFAULT_COMPRESSION) -> Blob:
    """`layer` compressed into `out`, deterministically, as the registry keeps it. gzip: fixed
    chunks of the tar each compressed as one gzip member (no name, time 0), on every core at once,
    and written in order: a multi-member gzip stream, which every gzip reader (Go's, zlib's,
    Python's) reads as one. zstd: a fixed level."""
    import gzip
    from concurrent.futures import ThreadPoolExecutor

    _, media = COMPRESSIONS[compression]
    digest, size = hashlib.sha256(), 0

    def write(data: bytes) -> None:
        nonlocal size
        digest.update(data)
        size += len(data)
        sink.write(data)

    with open(layer.path, "rb") as source, open(out, "wb") as sink:
        chunks = iter(lambda: source.read(GZIP_CHUNK), b"")
        if compression == "gzip":  # zlib lets go of the GIL while it compresses: the chunks run in parallel
            with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
                for member in pool.map(lambda chunk: gzip.compress(chunk, compresslevel=6, mtime=0), chunks):
                    write(member)
        else:
            import zstandard

            compressor = zstandard.ZstdCompressor(level=3).compressobj()
            for chunk in chunks:
                write(compressor.compress(chunk))
            write(compressor.flush())
    return Blob(f"sha256:{digest.hexdigest()}", size, media, path=out, annotations={LAYER_TITLE: layer.part})


def docker_archive(layers: list[Layer], config: bytes, tag: str, out: Path) -> None:
    """A `docker load` archive of the image: its config, its uncompressed layers and manifest.json."""
    import io

    config_name = f"{hashlib.sha256(config).hexdigest()}.json"
    index = [{"Config": config_name, "RepoTags": [tag],
              "Layers": [f"{layer.diff_id.split(':', 1)[1]}/layer.tar" for layer in layers]}]
    with tarfile.open(out, "w") as tar:
        for name, data in ((config_name, config), ("manifest.json", json.dumps(index).encode())):
            info = _normalised(tarfile.TarInfo(name))
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
        for layer, name in zip(layers, index[0]["Layers"]):
            tar.add(layer.path, arcname=name, recursive=False, filter=_normalised)
