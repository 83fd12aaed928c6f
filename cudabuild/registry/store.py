"""What every place cudabuild keeps images in shares: a registry over HTTP (client.py) and an OCI
image layout on disk, the air-gapped bundle (layout.py). Each gives manifests by tag or digest,
blobs by digest and its tags; on top of those this module reads a modules image's labels, pulls
its layers (reusing the userspace layer a node or cache already holds: LayerStore) and pushes an
image, each blob checked against its digest."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cudabuild.artifact.image import (CONFIG_TYPE, DOCKER_MANIFEST_TYPE, LAYER_TITLE, LAYER_TYPES, MANIFEST_TYPE,
                                      REFERENCE, USERSPACE_LAYER, Blob)
from cudabuild.artifact.layer import MODULES_LAYERS, extract_layer, restore_modules
from cudabuild.errors import RegistryError, VerifyError, shown

DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
MAX_LAYER = 8 << 30  # bytes of a modules image's layer: a driver's is a few hundred MB
# What a layer may unpack to, from its size in the manifest: kernel modules and the userspace driver
# compress by 2-5x; more than this many times is no driver's layer.
MAX_RATIO = 16
READABLE = (MANIFEST_TYPE, DOCKER_MANIFEST_TYPE)
HINT = "use images `cudabuild modules --registry` pushed"


@dataclass(frozen=True)
class Resolved:
    """A manifest as the store holds it: its bytes, digest, parsed form and the config's labels."""

    ref: str
    digest: str
    raw: bytes
    manifest: dict
    labels: dict[str, str]


class LayerStore:
    """Userspace layers of builds already admitted, by their digest (DIR/sha256/HEX/), so the next
    kernel's image of the same driver links their files instead of downloading them again. A layer
    a pull fetched is only pending until its build is admitted (`adopt`, called by the admission's
    keep): a refused image leaves nothing here. Every file linked from here is checked against the
    artifact's manifest, as every file of a pull is."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pending: dict[str, Path] = {}  # digest -> the pull's directory that holds its files

    def held(self, digest: str) -> Path | None:
        path = self.root / "sha256" / digest.split(":", 1)[1]
        return path if path.is_dir() and not path.is_symlink() else None

    def adopt(self, root: Path) -> None:
        """The pending layers' files (their userspace/ and reference/) kept, linked from the admitted
        build at `root`; then its reference/ (not part of an artifact) removed from it."""
        for digest, unpacked in self.pending.items():
            if self.held(digest) or not (unpacked / "userspace").is_dir():
                continue
            (self.root / "sha256").mkdir(parents=True, exist_ok=True)
            made = Path(tempfile.mkdtemp(prefix=".layer-", dir=self.root))
            try:
                for part in ("userspace", REFERENCE):
                    if (unpacked / part).is_dir():
                        link_tree(unpacked / part, made / part)
                os.rename(made, self.root / "sha256" / digest.split(":", 1)[1])
            except OSError:  # another pull kept it first, or the disk is full: the build is kept all the same
                shutil.rmtree(made, ignore_errors=True)
        self.pending.clear()
        shutil.rmtree(root / REFERENCE, ignore_errors=True)


def link_tree(source: Path, into: Path) -> None:
    """Every file under `source` into `into` as a hard link (a copy across file systems), links as links."""
    for path in sorted(source.rglob("*")):
        target = into / path.relative_to(source)
        if path.is_symlink():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.readlink(path), target)
        elif path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, target)
            except OSError:
                shutil.copy2(path, target)


class ImageStore:
    """The reading and writing both kinds of store share; a kind gives the primitives below."""

    repo: str
    host: str

    # ---- primitives a kind provides ----------------------------------------------------------
    def tags(self, repository: str) -> list[str]:
        raise NotImplementedError

    def name_and_tag(self, ref: str) -> tuple[str, str]:
        raise NotImplementedError

    def manifest_bytes(self, name: str, reference: str) -> bytes | None:
        """The manifest under a tag or digest, as stored; None when there is none."""
        raise NotImplementedError

    def blob_bytes(self, name: str, digest: str) -> bytes:
        """A small blob (a config, a signature's payload), checked against its digest."""
        raise NotImplementedError

    def blob_to(self, name: str, digest: str, size: int, dest: Path) -> str:
        """A layer's blob written to `dest` (at most `size` bytes); the digest of what arrived."""
        raise NotImplementedError

    def has_blob(self, name: str, digest: str) -> bool:
        raise NotImplementedError

    def _put_blob(self, name: str, blob: Blob) -> None:
        raise NotImplementedError

    def _put_manifest(self, name: str, tag: str, raw: bytes, media_type: str) -> None:
        raise NotImplementedError

    def answers(self, ref: str):
        raise NotImplementedError

    def ref(self, local: str) -> str:
        """The store's name for a local image: cudabuild/modules:TAG -> REPO/modules:TAG."""
        return f"{self.repo}/{local.rsplit('/', 1)[-1]}"

    # ---- reading -----------------------------------------------------------------------------
    def resolve(self, ref: str, *, digest: str | None = None) -> Resolved | None:
        """The manifest of `ref` (its tag, or `digest` when given) and its config's labels; None
        when the store has no such tag."""
        name, tag = self.name_and_tag(ref)
        raw = self.manifest_bytes(name, digest or tag)
        if raw is None:
            return None
        found = f"sha256:{hashlib.sha256(raw).hexdigest()}"
        if digest is not None and found != digest:
            raise VerifyError(f"{ref}'s manifest does not match its digest {digest[:19]}...",
                              hint="nothing was used; check the registry")
        manifest = json.loads(raw)
        config = manifest["config"]["digest"]
        if not isinstance(config, str) or not DIGEST_RE.fullmatch(config):
            raise ValueError(f"the manifest's config digest {shown(config)} is not a sha256 digest")
        data = json.loads(self.blob_bytes(name, config))
        labels = (data.get("config") or {}).get("Labels") if isinstance(data, dict) else None
        labels = labels or {}
        if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in labels.items()):
            raise ValueError("its labels are not a mapping of strings to strings")
        return Resolved(ref, found, raw, manifest, labels)

    def labels(self, ref: str) -> dict[str, str] | None:
        """The labels of `ref` in the store, or None when it has no such tag."""
        with self.answers(ref):
            found = self.resolve(ref)
            return None if found is None else found.labels

    def has(self, ref: str, key: str, *, note=lambda message: None) -> bool:
        """Whether the store holds `ref` as a modules image of the build `key` (another build under
        that tag is said through `note`, and is not it)."""
        return self.held(ref, key, note=note) is not None

    def held(self, ref: str, key: str, *, note=lambda message: None):
        """The artifact labels (artifact.ImageLabels) of `ref` when the store holds it as a modules
        image of the build `key`; None otherwise (another build is said through `note`)."""
        from cudabuild.artifact import read_labels

        labels = read_labels(self.labels(ref), ref)
        if labels is None:
            return None
        if labels.key != key:
            note(f"{ref} in the registry is another build (key {labels.key[:16]}..., ours {key[:16]}...)")
            return None
        return labels

    def pull(self, ref: str, into: Path, *, accept: Callable[[Resolved], None] | None = None,
             layers: LayerStore | None = None, counted: list[int] | None = None) -> dict[str, str]:
        """The modules image `ref` unpacked into `into`, layer after layer, each blob checked
        against its digest; its labels. `accept(resolved)`, when given, is asked before any layer is
        fetched (it raises to refuse: a label, a signature). A userspace layer `layers` already
        holds is linked from there, not fetched; one fetched is kept there once its build is
        admitted (LayerStore.adopt). Modules stored against the driver's reference objects are
        restored. `counted` gets the bytes fetched added."""
        with self.answers(ref):
            found = self.resolve(ref)
            if found is None:
                raise RegistryError(f"the registry {self.host} has no {ref}", hint="check the tag; `cudabuild "
                                    "modules --registry` pushes it", exit_code=RegistryError.NOT_THERE)
            if accept is not None:
                accept(found)
            described = found.manifest.get("layers")
            if not isinstance(described, list) or len(described) not in MODULES_LAYERS:
                raise VerifyError(f"{ref} has {len(described) if isinstance(described, list) else 'no'} layers, "
                                  "not two (or one, as before): cudabuild did not make it", hint=HINT)
            name, _ = self.name_and_tag(ref)
            into.mkdir(parents=True, exist_ok=True)
            for layer in described:
                self._unpack_layer(ref, name, layer, into, layers, counted)
            restore_modules(into, keep_reference=layers is not None)
            return found.labels

    def _unpack_layer(self, ref: str, name: str, layer: object, into: Path, layers: LayerStore | None,
                      counted: list[int] | None) -> None:
        if not isinstance(layer, dict):
            raise VerifyError(f"{ref}'s manifest lists a layer that is not a descriptor", hint=HINT)
        digest, size, media = layer.get("digest"), layer.get("size"), layer.get("mediaType")
        if not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest) or not isinstance(size, int) \
                or not 0 < size <= MAX_LAYER or media not in LAYER_TYPES:
            raise VerifyError(f"{ref}'s layer is not one cudabuild can read ({shown(media)}, {shown(size)} bytes)",
                              hint=HINT)
        shared = layers is not None and (layer.get("annotations") or {}).get(LAYER_TITLE) == USERSPACE_LAYER
        if shared and layers.held(digest):
            link_tree(layers.held(digest), into)
            return
        blob = into / f".blob-{digest[7:19]}"
        try:
            arrived = self.blob_to(name, digest, size, blob)
            if counted is not None:
                counted.append(size)
            if arrived != digest:
                raise VerifyError(f"{ref}'s layer does not match its digest {digest[:19]}...: it changed on the way "
                                  "or in the registry", hint="nothing was used; push the build again")
            compression = LAYER_TYPES[media]
            limit = min(size * MAX_RATIO + (1 << 20), MAX_LAYER * 2) if compression else size
            extract_layer(blob, into, compression=compression, limit=limit)
        finally:
            blob.unlink(missing_ok=True)
        if shared:
            layers.pending[digest] = into

    # ---- writing -----------------------------------------------------------------------------
    def push(self, ref: str, config: bytes, layers: list[Blob], *, counted: list[int] | None = None) -> str:
        """The image of `config` and `layers` under `ref`: each blob sent only when the store lacks
        it, then its manifest; its digest. `counted` gets the bytes sent added."""
        from cudabuild.artifact.image import manifest_of

        name, tag = self.name_and_tag(ref)
        config_blob = Blob.of(config, CONFIG_TYPE)
        raw = manifest_of(config_blob, layers)
        with self.answers(ref):
            for blob in [*layers, config_blob]:
                self.put_blob(name, blob, counted=counted)
            self._put_manifest(name, tag, raw, MANIFEST_TYPE)
        if counted is not None:
            counted.append(len(raw))
        return f"sha256:{hashlib.sha256(raw).hexdigest()}"

    def put_blob(self, name: str, blob: Blob, *, counted: list[int] | None = None) -> None:
        if self.has_blob(name, blob.digest):
            return
        self._put_blob(name, blob)
        if counted is not None:
            counted.append(blob.size)

    def put_artifact(self, ref_tag: str, manifest: bytes, blobs: list[Blob]) -> None:
        """A manifest made elsewhere (a signature's, an attestation's) and its blobs, under a tag of
        the repository that `ref_tag` (REPO/NAME:TAG) names."""
        name, tag = self.name_and_tag(ref_tag)
        media_type = json.loads(manifest).get("mediaType") or MANIFEST_TYPE
        with self.answers(ref_tag):
            for blob in blobs:
                self.put_blob(name, blob)
            self._put_manifest(name, tag, manifest, media_type)
