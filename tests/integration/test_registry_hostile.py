"""The registry client against servers on 127.0.0.1 that misbehave as the hostile tester's did: a
server that trickles, one that sends a huge manifest, a token realm on another host that would
collect `docker login`'s credentials, labels that are not strings, and an unreachable registry
with --no-build. Each ends in a clear RegistryError, bounded in time and memory."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cudabuild.errors import RegistryError, VerifyError
from cudabuild.registry import Registry
from cudabuild.settings import Settings
from tests.helpers import run_cli

EMPTY_CONFIG = json.dumps({"config": {"Labels": {}}}).encode()
CONFIG_DIGEST = "sha256:" + hashlib.sha256(EMPTY_CONFIG).hexdigest()  # a config is checked against its digest


class Server:
    """A v2 registry stand-in whose answers a test chooses; it records each request's headers."""

    def __init__(self, answer) -> None:
        self.requests: list[tuple[str, dict]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):  # noqa: N802 - http.server's name
                outer.requests.append((self.path, dict(self.headers)))
                answer(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def send(handler, status: int, body: bytes, **headers) -> None:
    handler.send_response(status)
    for k, v in {"Content-Length": str(len(body)), **headers}.items():
        handler.send_header(k, v)
    handler.end_headers()
    handler.wfile.write(body)


@pytest.fixture
def server():
    made = []

    def make(answer) -> Server:
        made.append(Server(answer))
        return made[-1]

    yield make
    for s in made:
        s.close()


def trickle(byte: bytes):
    """An answer of 1,000 bytes that sends one `byte` every half second."""
    def answer(h):
        h.send_response(200)
        h.send_header("Content-Length", "1000")
        h.end_headers()
        for _ in range(1000):
            try:
                h.wfile.write(byte)
                h.wfile.flush()
            except OSError:
                return
            time.sleep(0.5)
    return answer


def test_a_trickling_registry_is_given_up_at_the_deadline(server):
    s = server(trickle(b"{"))
    started = time.monotonic()
    with pytest.raises(RegistryError, match="within 2 s"):
        Registry(f"{s.host}/cudabuild", deadline=2).labels(f"{s.host}/cudabuild/modules:x")
    assert time.monotonic() - started < 10


def test_a_huge_manifest_is_refused_without_reading_it_all(server):
    def huge(h):
        h.send_response(200)
        h.send_header("Content-Length", str(1 << 30))
        h.end_headers()
        try:
            for _ in range(1 << 14):
                h.wfile.write(b" " * (1 << 16))
        except OSError:
            pass

    s = server(huge)
    with pytest.raises(RegistryError, match="more than"):
        Registry(f"{s.host}/cudabuild").labels(f"{s.host}/cudabuild/modules:x")


@pytest.fixture
def logged_in(tmp_path):
    """`docker login` credentials stored for a registry host, in the directory returned (what
    DOCKER_CONFIG names, as Settings reads it)."""
    def store(host: str) -> Path:
        auth = base64.b64encode(b"alice:s3cret").decode()
        (tmp_path / "config.json").write_text(json.dumps({"auths": {host: {"auth": auth}}}))
        return Settings.from_env({"DOCKER_CONFIG": str(tmp_path)}).docker_config

    return store


def registry_with_realm(server, realm_of):
    """A registry that asks for a bearer token from realm_of(its own host) and then answers 404."""
    state = {}

    def answer(h):
        if h.path.startswith("/token"):
            send(h, 200, json.dumps({"token": "t"}).encode())
        elif h.headers.get("Authorization", "").startswith("Bearer"):
            send(h, 404, b"{}")
        else:
            send(h, 401, b"{}", **{"WWW-Authenticate": f'Bearer realm="{realm_of(state["host"])}",service="r"'})

    s = server(answer)
    state["host"] = s.host
    return s


def token_server(server):
    return server(lambda h: send(h, 200, json.dumps({"token": "t"}).encode()))


def test_credentials_never_go_to_a_token_realm_on_another_host(server, logged_in):
    elsewhere = token_server(server)
    s = registry_with_realm(server, lambda _: f"http://{elsewhere.host}/token")
    config = logged_in(s.host)
    assert Registry(f"{s.host}/cudabuild", docker_config=config).labels(f"{s.host}/cudabuild/modules:x") is None
    assert elsewhere.requests and all("Authorization" not in headers for _, headers in elsewhere.requests)


def test_credentials_go_to_the_registrys_own_token_realm_on_loopback(server, logged_in):
    """The control: the same registry, its realm on its own host and port, gets them."""
    s = registry_with_realm(server, lambda host: f"http://{host}/token")
    config = logged_in(s.host)
    assert Registry(f"{s.host}/cudabuild", docker_config=config).labels(f"{s.host}/cudabuild/modules:x") is None
    tokens = [headers for path, headers in s.requests if path.startswith("/token")]
    assert tokens and tokens[0]["Authorization"] == "Basic " + base64.b64encode(b"alice:s3cret").decode()


@pytest.mark.parametrize("labels", [[1, 2], {"io.cudabuild.key": {"nested": "json"}}, "a string"],
                         ids=["a-list", "nested", "a-string"])
def test_labels_that_are_not_strings_are_refused(server, labels):
    config = json.dumps({"config": {"Labels": labels}}).encode()

    def answer(h):
        if "/manifests/" in h.path:
            send(h, 200, json.dumps({"config": {"digest": "sha256:" + hashlib.sha256(config).hexdigest()}}).encode())
        else:
            send(h, 200, config)

    s = server(answer)
    with pytest.raises(RegistryError, match="cannot read"):
        Registry(f"{s.host}/cudabuild").labels(f"{s.host}/cudabuild/modules:x")


def test_an_unreachable_registry_with_no_build_says_unreachable(tmp_path):
    result = run_cli("modules", "--kernel", "6.1.0-56-amd64", "--driver", "535", "--registry", "127.0.0.1:9/cudabuild",
                     "--no-build", env={"CUDABUILD_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 9, result.stderr
    assert "does not answer" in result.stderr and "Traceback" not in result.stderr


# ---- a layer's pull (issue 30, part 4) -----------------------------------------------------------------
def layer_registry(server, layer: bytes, *, blob_answer=None, media="application/vnd.oci.image.layer.v1.tar+gzip"):
    """A registry serving one modules image whose only layer is `layer` (its manifest says its true
    size and digest); `blob_answer(h)` answers the layer's GET instead when given."""
    digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    manifest = {"schemaVersion": 2, "config": {"digest": CONFIG_DIGEST},
                "layers": [{"mediaType": media, "digest": digest, "size": len(layer)}]}

    def answer(h):
        if "/manifests/" in h.path:
            send(h, 200, json.dumps(manifest).encode())
        elif h.path.endswith(CONFIG_DIGEST):
            send(h, 200, EMPTY_CONFIG)
        elif blob_answer is not None:
            blob_answer(h)
        else:
            send(h, 200, layer)

    return server(answer)


def test_a_redirect_to_another_host_over_plain_http_is_refused_and_never_followed(server, tmp_path):
    other = server(lambda h: send(h, 200, b"x"))
    elsewhere = f"http://127.0.0.2:{other.httpd.server_address[1]}/latest/meta-data"
    s = layer_registry(server, b"layer", blob_answer=lambda h: send(h, 307, b"", Location=elsewhere))
    with pytest.raises(RegistryError, match="redirected a layer to another host over plain 'http'"):
        Registry(f"{s.host}/cudabuild").pull(f"{s.host}/cudabuild/modules:x", tmp_path / "into")
    assert other.requests == [], "the redirect was not followed"


def test_a_redirect_on_the_registrys_own_host_is_followed(server, tmp_path):
    """The control: the registry's own host, another path (its storage), is followed."""
    import io
    import tarfile

    body = io.BytesIO()
    with tarfile.open(fileobj=body, mode="w") as tar:
        info = tarfile.TarInfo("manifest.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    layer = body.getvalue()

    def blob(h):
        if h.path.startswith("/storage"):
            send(h, 200, layer)
        else:
            send(h, 307, b"", Location="/storage/layer")

    s = layer_registry(server, layer, blob_answer=blob, media="application/vnd.oci.image.layer.v1.tar")
    Registry(f"{s.host}/cudabuild").pull(f"{s.host}/cudabuild/modules:x", tmp_path / "into")
    assert (tmp_path / "into/manifest.json").read_text() == "{}"


def test_a_compression_bomb_is_refused_by_its_layers_size_before_it_is_written(server, tmp_path):
    import gzip
    import io
    import tarfile

    body = io.BytesIO()
    with tarfile.open(fileobj=body, mode="w") as tar:
        info = tarfile.TarInfo("modules/nvidia.ko")
        info.size = 256 << 20
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    layer = gzip.compress(body.getvalue())
    assert len(layer) < 1 << 20
    s = layer_registry(server, layer)
    with pytest.raises(VerifyError, match="compression bomb"):
        Registry(f"{s.host}/cudabuild").pull(f"{s.host}/cudabuild/modules:x", tmp_path / "into")
    written = sum(p.stat().st_size for p in (tmp_path / "into").rglob("*") if p.is_file())
    assert written == 0, "nothing of it was unpacked"


def test_a_layer_that_trickles_is_stopped_at_its_deadline(server, tmp_path, monkeypatch):
    import cudabuild.registry.client as registry_module

    monkeypatch.setattr(registry_module, "LAYER_DEADLINE", 2.0)  # the deadline's floor, shortened for the test
    s = layer_registry(server, b"x" * 1000, blob_answer=trickle(b"x"))
    started = time.monotonic()
    with pytest.raises(RegistryError, match="too slowly"):
        Registry(f"{s.host}/cudabuild").pull(f"{s.host}/cudabuild/modules:x", tmp_path / "into")
    assert time.monotonic() - started < 15
