"""A fake engine for unit tests: the small interface compile/ uses (cudabuild/engine.py's Engine),
in memory. Images are dicts; `save` streams a `docker save` archive made from a directory, so that
what reads it (artifact.unpack_image) reads the real format."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path


class FakeEngine:
    def __init__(self) -> None:
        self.images: dict[str, dict] = {}  # ref -> {"Id", "Config": {"Labels"}, "RootFS", "layer": Path | None}
        self.calls: list[tuple] = []

    def add(self, ref: str, *, labels: dict | None = None, layer: Path | None = None) -> None:
        self.images[ref] = {"Id": f"sha256:{len(self.images):064x}", "Config": {"Labels": labels or {}},
                            "RootFS": {"Layers": ["sha256:" + "0" * 64]}, "layer": layer}

    # ---- what compile/ asks ------------------------------------------------------------------
    def image_id(self, ref: str) -> str | None:
        self.calls.append(("image_id", ref))
        return self.images[ref]["Id"] if ref in self.images else None

    def image(self, ref: str) -> dict:
        self.calls.append(("image", ref))
        return self.images[ref]

    inspect_image = image

    def ensure_image(self, ref: str, *, what: str, hint: str) -> dict:
        self.calls.append(("ensure_image", ref))
        if ref not in self.images:
            self.add(ref)
        return self.images[ref]

    def save(self, ref: str):
        """`docker save REF`: manifest.json naming one layer, the layer a tar of the directory."""
        self.calls.append(("save", ref))
        layer = io.BytesIO()
        with tarfile.open(fileobj=layer, mode="w") as tar:
            tar.add(self.images[ref]["layer"], arcname=".")
        saved = io.BytesIO()
        with tarfile.open(fileobj=saved, mode="w") as tar:
            for name, data in (("manifest.json", json.dumps([{"Layers": ["layer/layer.tar"]}]).encode()),
                               ("layer/layer.tar", layer.getvalue())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        data = saved.getvalue()
        yield from (data[i:i + 65536] for i in range(0, len(data), 65536))

    def untag(self, ref: str) -> None:
        self.calls.append(("untag", ref))
        self.images.pop(ref, None)

    def push(self, tag: str, remote: str) -> None:
        self.calls.append(("push", tag, remote))
