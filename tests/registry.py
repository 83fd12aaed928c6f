"""A real OCI registry for tests: Debian's docker-registry (distribution 2.8), on 127.0.0.1 with its
own storage directory, stopped by its own pid (FACTS.md)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import requests



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalRegistry:
    def __init__(self, base: Path, *, read_only: bool = False) -> None:
        self.base = base
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.read_only = read_only
        self.proc: subprocess.Popen | None = None

    def repo(self, path: str = "cudabuild") -> str:
        return f"{self.host}/{path}"

    def __enter__(self) -> "LocalRegistry":
        binary = shutil.which("docker-registry")
        assert binary, "the registry tests need Debian's docker-registry (bash scripts/setup installs it)"
        self.base.mkdir(parents=True, exist_ok=True)
        readonly = "  maintenance:\n    readonly:\n      enabled: true\n" if self.read_only else ""
        (self.base / "config.yml").write_text(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
            f"    rootdirectory: {self.base / 'data'}\n  delete:\n    enabled: true\n{readonly}"
            f"http:\n  addr: {self.host}\n")
        self.log = open(self.base / "registry.log", "w")
        self.proc = subprocess.Popen([binary, "serve", str(self.base / "config.yml")], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        for _ in range(100):
            try:
                if requests.get(f"http://{self.host}/v2/", timeout=2).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.__exit__()
        raise AssertionError(f"docker-registry did not start: {(self.base / 'registry.log').read_text()[-2000:]}")

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(20)
            self.proc = None
            self.log.close()

    def tags(self, name: str) -> list[str]:
        answer = requests.get(f"http://{self.host}/v2/{name}/tags/list", timeout=10)
        return (answer.json().get("tags") or []) if answer.status_code == 200 else []

    def labels(self, ref: str) -> dict | None:
        from cudabuild.registry import Registry

        return Registry(ref.rsplit("/", 1)[0]).labels(ref)

    def push_directory(self, ref: str, directory: Path, labels: dict[str, str], *, one_layer: bool = False) -> str:
        """DIRECTORY as a modules image under REF (HOST/NAME:TAG), pushed by cudabuild's own client
        as `cudabuild modules --registry` pushes: the userspace layer, then the modules and the
        manifest, gzip-compressed; or, `one_layer`, everything in one uncompressed layer, as images
        of the format before were. Whatever the directory holds is pushed as it is (a hostile
        registry's image need not be a sound artifact); its digest."""
        from cudabuild.artifact.image import LAYER_TAR, MODULES_LAYER, USERSPACE_LAYER, Blob, compress, config_of, write_layer
        from cudabuild.registry import Registry

        names = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if not p.is_dir() or p.is_symlink())
        parts = [("all", names)] if one_layer else [
            (USERSPACE_LAYER, [n for n in names if n.startswith("userspace/")]),
            (MODULES_LAYER, [n for n in names if not n.startswith("userspace/")])]
        with tempfile.TemporaryDirectory() as work:  # not beside DIRECTORY: it may be a cache's result
            blobs, diff_ids = [], []
            for part, members in parts:
                layer = write_layer(directory, members, Path(work) / f"{part}.tar", part)
                diff_ids.append(layer.diff_id)
                blobs.append(Blob(layer.diff_id, layer.size, LAYER_TAR, path=layer.path) if one_layer
                             else compress(layer, Path(work) / f"{part}.gz"))
            return Registry(ref.split("/", 1)[0] + "/x").push(ref, config_of(labels, diff_ids), blobs)
