"""The registry client against servers on 127.0.0.1 that misbehave as the hostile tester's did: a
server that trickles, one that sends a huge manifest, a token realm on another host that would
collect `docker login`'s credentials, labels that are not strings, and an unreachable registry
with --no-build. Each ends in a clear RegistryError, bounded in time and memory."""

from __future__ import annotations

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cudabuild.errors import RegistryError
from cudabuild.registry import Registry
from cudabuild.settings import Settings
from tests.helpers import run_cli

CONFIG_DIGEST = "sha256:" + "a" * 64


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


def test_a_trickling_registry_is_given_up_at_the_deadline(server):
    def trickle(h):
        h.send_response(200)
        h.send_header("Content-Length", "1000")
        h.end_headers()
        for _ in range(1000):
            try:
                h.wfile.write(b"{")
                h.wfile.flush()
            except OSError:
                return
            time.sleep(0.5)

    s = server(trickle)
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
    def answer(h):
        if "/manifests/" in h.path:
            send(h, 200, json.dumps({"config": {"digest": CONFIG_DIGEST}}).encode())
        else:
            send(h, 200, json.dumps({"config": {"Labels": labels}}).encode())

    s = server(answer)
    with pytest.raises(RegistryError, match="cannot read"):
        Registry(f"{s.host}/cudabuild").labels(f"{s.host}/cudabuild/modules:x")


def test_an_unreachable_registry_with_no_build_says_unreachable(tmp_path):
    result = run_cli("modules", "--kernel", "6.1.0-56-amd64", "--driver", "535", "--registry", "127.0.0.1:9/cudabuild",
                     "--no-build", env={"CUDABUILD_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 9, result.stderr
    assert "does not answer" in result.stderr and "Traceback" not in result.stderr
