"""A real OCI registry for tests: Debian's docker-registry (distribution 2.8), on 127.0.0.1 with its
own storage directory, stopped by its own pid (FACTS.md)."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

import requests

from cudabuild.digests import sha256_file


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

    def push_directory(self, ref: str, directory: Path, labels: dict[str, str]) -> None:
        """DIRECTORY as a one-layer image under REF (HOST/NAME:TAG), as `COPY payload/ /` on scratch
        makes it, pushed straight over the registry's HTTP API: an OCI image whose layer is an
        uncompressed tar (application/vnd.oci.image.layer.v1.tar), which any engine pulls. What a
        hostile registry serves need not come from `docker push`; this spares compressing it."""
        name, _, tag = ref[len(self.host) + 1:].rpartition(":")
        with tempfile.TemporaryDirectory() as work:  # not beside DIRECTORY: it may be a cache's result
            layer = Path(work) / "layer.tar"
            with tarfile.open(layer, "w", format=tarfile.PAX_FORMAT) as tar:
                for path in sorted(directory.rglob("*")):
                    tar.add(path, arcname=str(path.relative_to(directory)), recursive=False)
            layer_size = layer.stat().st_size
            with open(layer, "rb") as body:
                layer_digest = self._upload(name, body, f"sha256:{sha256_file(layer)}")
        config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Labels": labels},
                             "rootfs": {"type": "layers", "diff_ids": [layer_digest]}}).encode()
        config_digest = self._upload(name, config, f"sha256:{hashlib.sha256(config).hexdigest()}")
        config_size = len(config)
        manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
                               "size": config_size},
                    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest,
                                "size": layer_size}]}
        put = requests.put(f"http://{self.host}/v2/{name}/manifests/{tag}", data=json.dumps(manifest).encode(),
                           headers={"Content-Type": manifest["mediaType"]}, timeout=60)
        assert put.status_code == 201, put.text

    def _upload(self, name: str, body, digest: str) -> str:
        """A blob (bytes or an open file) with its digest, uploaded in one request; the digest."""
        started = requests.post(f"http://{self.host}/v2/{name}/blobs/uploads/", timeout=60)
        assert started.status_code == 202, started.text
        location = started.headers["Location"]
        location = location if location.startswith("http") else f"http://{self.host}{location}"
        done = requests.put(location, params={"digest": digest}, data=body,
                            headers={"Content-Type": "application/octet-stream"}, timeout=600)
        assert done.status_code == 201, done.text
        return digest
