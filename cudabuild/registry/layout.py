"""An OCI image layout on disk (`oci-layout`, `index.json`, `blobs/sha256/`): the air-gapped bundle
that `cudabuild bundle` writes and `--registry oci:DIR` reads wherever a registry is read. A
disconnected site carries one directory; skopeo, crane and oras read it too (`oci:DIR:NAME:TAG`).

Each manifest in index.json carries its name in `org.opencontainers.image.ref.name` as
NAME:TAG (e.g. `modules:535.309.01-6.1.0-57-amd64`, `modules:sha256-HEX.sig`), so one layout
holds a repository's images, their signatures and attestations. What is read is checked against
its digest as a registry's blobs are; a write goes through a file beside its place, renamed."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from cudabuild.artifact.image import INDEX_TYPE, MANIFEST_TYPE, Blob
from cudabuild.errors import InputError, RegistryError, VerifyError, shown
from cudabuild.registry.store import DIGEST_RE, ImageStore

PREFIX = "oci:"
REF_NAME = "org.opencontainers.image.ref.name"
LAYOUT = {"imageLayoutVersion": "1.0.0"}
MAX_MANIFEST = 4 << 20


def is_layout(repo: str | None) -> bool:
    return bool(repo) and repo.startswith(PREFIX)


class OciLayout(ImageStore):
    """The layout at `oci:DIR`, read (and, with `create`, written) as a registry's repository is."""

    def __init__(self, repo: str, *, create: bool = False) -> None:
        if not is_layout(repo) or len(repo) == len(PREFIX):
            raise InputError(f"--registry {shown(repo)} is not oci:DIR", hint="pass oci:/path/to/bundle")
        self.repo = repo.rstrip("/")
        self.dir = Path(self.repo[len(PREFIX):]).expanduser().absolute()
        self.host = f"bundle {self.dir}"
        if create:
            (self.dir / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
            if not (self.dir / "oci-layout").exists():
                _write(self.dir / "oci-layout", json.dumps(LAYOUT).encode())
            if not (self.dir / "index.json").exists():
                self._write_index([])
        elif not (self.dir / "oci-layout").is_file() or not (self.dir / "index.json").is_file():
            raise InputError(f"--registry {shown(repo)}: {self.dir} is not an OCI image layout (no oci-layout or "
                             "index.json)", hint="pass the directory `cudabuild bundle --output DIR` wrote")

    # ---- the index ---------------------------------------------------------------------------
    def _index(self) -> list[dict]:
        try:
            index = json.loads((self.dir / "index.json").read_text())
            manifests = index.get("manifests") or []
        except (OSError, ValueError, AttributeError) as exc:
            raise RegistryError(f"the bundle {self.dir} has an index.json cudabuild cannot read ({exc})",
                                hint="write the bundle again: cudabuild bundle --output DIR") from exc
        return [m for m in manifests if isinstance(m, dict)]

    def _write_index(self, manifests: list[dict]) -> None:
        index = {"schemaVersion": 2, "mediaType": INDEX_TYPE, "manifests": manifests}
        _write(self.dir / "index.json", json.dumps(index, indent=1).encode())

    def name_and_tag(self, ref: str) -> tuple[str, str]:
        """oci:DIR/NAME:TAG -> (NAME, TAG)."""
        name, _, tag = ref[len(self.repo) + 1:].rpartition(":")
        return name, tag

    def tags(self, repository: str) -> list[str]:
        names = [(m.get("annotations") or {}).get(REF_NAME, "") for m in self._index()]
        return sorted(n.split(":", 1)[1] for n in names if n.startswith(f"{repository}:"))

    # ---- the primitives of an ImageStore -----------------------------------------------------
    def blob_path(self, digest: str) -> Path:
        if not DIGEST_RE.fullmatch(digest):
            raise ValueError(f"{shown(digest)} is not a sha256 digest")
        return self.dir / "blobs" / "sha256" / digest.split(":", 1)[1]

    def manifest_bytes(self, name: str, reference: str) -> bytes | None:
        if not DIGEST_RE.fullmatch(reference):
            found = [m for m in self._index() if (m.get("annotations") or {}).get(REF_NAME) == f"{name}:{reference}"]
            if not found:
                return None
            reference = found[-1].get("digest", "")
        path = self.blob_path(reference)
        if not path.is_file():
            return None
        return self._checked(path, reference, MAX_MANIFEST)

    def _checked(self, path: Path, digest: str, limit: int) -> bytes:
        data = path.read_bytes() if path.stat().st_size <= limit else b""
        if f"sha256:{hashlib.sha256(data).hexdigest()}" != digest:
            raise VerifyError(f"the bundle {self.dir} holds a blob that does not match its digest {digest[:19]}...",
                              hint="nothing was used; write the bundle again")
        return data

    def blob_bytes(self, name: str, digest: str) -> bytes:
        path = self.blob_path(digest)
        if not path.is_file():
            raise ValueError(f"the blob {digest[:19]} is missing")
        return self._checked(path, digest, MAX_MANIFEST)

    def blob_to(self, name: str, digest: str, size: int, dest: Path) -> str:
        path = self.blob_path(digest)
        if not path.is_file() or path.stat().st_size != size:
            raise VerifyError(f"the bundle {self.dir} lacks the layer {digest[:19]}... (or it has another size)",
                              hint="write the bundle again: cudabuild bundle --output DIR")
        made = hashlib.sha256()
        with open(path, "rb") as source, open(dest, "wb") as out:
            for chunk in iter(lambda: source.read(1 << 20), b""):
                made.update(chunk)
                out.write(chunk)
        return f"sha256:{made.hexdigest()}"

    def has_blob(self, name: str, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def _put_blob(self, name: str, blob: Blob) -> None:
        if blob.data is not None:
            _write(self.blob_path(blob.digest), blob.data)
            return
        fd, tmp = tempfile.mkstemp(prefix=".blob-", dir=self.blob_path(blob.digest).parent)
        with os.fdopen(fd, "wb") as out, open(blob.path, "rb") as source:
            for chunk in iter(lambda: source.read(1 << 20), b""):
                out.write(chunk)
        os.rename(tmp, self.blob_path(blob.digest))

    def _put_manifest(self, name: str, tag: str, raw: bytes, media_type: str) -> None:
        digest = f"sha256:{hashlib.sha256(raw).hexdigest()}"
        _write(self.blob_path(digest), raw)
        ref_name = f"{name}:{tag}"
        kept = [m for m in self._index() if (m.get("annotations") or {}).get(REF_NAME) != ref_name]
        self._write_index([*kept, {"mediaType": media_type or MANIFEST_TYPE, "digest": digest, "size": len(raw),
                                   "annotations": {REF_NAME: ref_name}}])

    @contextmanager
    def answers(self, ref: str):
        try:
            yield
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise RegistryError(f"the bundle {self.dir} holds something cudabuild cannot read for {ref} ({exc})",
                                hint="write the bundle again: cudabuild bundle --output DIR") from exc


def _write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.rename(tmp, path)
