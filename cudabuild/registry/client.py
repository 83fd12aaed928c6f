"""An OCI registry over HTTP, the fleet's shared cache (KMM's "skip when the image exists"): before
a build the registry is asked for the modules image of the same key; a build pushes its result.

The registry is asked over its v2 HTTP API for a tag's labels (its manifest, then its config) and
for the tags it holds: plain HTTP for 127.0.0.1 and localhost, as the Docker engine allows, HTTPS
elsewhere, with the anonymous or `docker login` token a registry asks for. Everything goes over
this API, no engine: a build's push and pull, and a node's (the driver container has no engine:
Kubernetes nodes run containerd), each blob checked against its digest (store.py). What is pulled
is an artifact like any other: its files are checked against their manifest and the modules
verified against the kernel before they are used."""

from __future__ import annotations

import base64
import json
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cudabuild.artifact.image import Blob
from cudabuild.errors import RegistryError, VerifyError, shown
from cudabuild.lazy import lazy_import
from cudabuild.options import validate_registry
from cudabuild.registry.store import READABLE, ImageStore

requests = lazy_import("requests")  # at the first request: most commands that read this module make none

MANIFEST_TYPES = ", ".join(READABLE)
TIMEOUT = 20  # seconds for a connection or one read
DEADLINE = 60.0  # seconds for a whole answer, however it trickles in
MAX_ANSWER = 4 << 20  # bytes of a manifest, a config or a token: a real one is a few kB
LAYER_RATE = 256 << 10  # bytes per second a layer must at least arrive at, over the whole pull ...
LAYER_DEADLINE = 120.0  # ... plus this many seconds; a trickle is stopped at its deadline
MAX_REDIRECTS = 5


class _TooSlow(Exception):
    pass


@dataclass(frozen=True)
class Registry(ImageStore):
    repo: str  # HOST[:PORT]/PATH, e.g. 127.0.0.1:5055/cudabuild
    deadline: float = DEADLINE
    docker_config: Path | None = None  # where `docker login` keeps credentials (Settings.docker_config)

    def __post_init__(self) -> None:
        validate_registry(self.repo)

    @property
    def host(self) -> str:
        return self.repo.split("/", 1)[0]

    @property
    def _address(self):
        """HOST[:PORT] split as a URL's network location is (hostname lower-cased, [::1] -> ::1)."""
        from urllib.parse import urlsplit

        return urlsplit(f"//{self.host}")

    @property
    def loopback(self) -> bool:
        name = self._address.hostname or ""
        return name == "localhost" or name.startswith("127.") or name == "::1"

    @property
    def base_url(self) -> str:
        return f"{'http' if self.loopback else 'https'}://{self.host}"

    def _fetch(self, url: str, *, params=None, auth=None, **headers) -> tuple[int, dict, bytes]:
        """One GET, bounded: TIMEOUT per read, `deadline` for the whole answer, MAX_ANSWER bytes."""
        import time

        started = time.monotonic()
        with requests.get(url, params=params, auth=auth, headers=headers, timeout=TIMEOUT, stream=True,
                          allow_redirects=False) as answer:
            body = bytearray()
            for chunk in _arrived(answer, 1 << 16, fallback=1024):
                body += chunk
                if len(body) > MAX_ANSWER:
                    raise RegistryError(f"the registry {self.host} sent more than {MAX_ANSWER} bytes for {shown(url)}, "
                                        "more than a manifest or token ever is",
                                        hint="check --registry: it is not an OCI registry, or not a sound one")
                if time.monotonic() - started > self.deadline:
                    raise _TooSlow()
            if time.monotonic() - started > self.deadline:
                raise _TooSlow()
            return answer.status_code, dict(answer.headers), bytes(body)

    def _credentials_for(self, realm: str) -> tuple[str, str] | None:
        """`docker login`'s credentials, only for a token server on the registry's own host and
        port, and only over HTTPS unless the registry itself is on loopback."""
        from urllib.parse import urlsplit

        try:
            where = urlsplit(realm)
            port = where.port
        except ValueError:
            return None
        default = 443 if where.scheme == "https" else 80
        ours = self._address
        same_host = where.hostname == ours.hostname and (port or default) == (ours.port or default)
        if not same_host or not (where.scheme == "https" or (where.scheme == "http" and self.loopback)):
            return None
        return _login(self.host, self.docker_config)

    def _get(self, url: str, name: str, **headers) -> tuple[int, bytes]:
        """GET with the token the registry asks for (anonymous, or `docker login`'s credentials
        where the token server is the registry's own)."""
        status, answer_headers, body = self._fetch(url, **headers)
        challenge = answer_headers.get("WWW-Authenticate", "")
        if status != 401 or not challenge.lower().startswith("bearer "):
            return status, body
        bearer = self._token(challenge, name)
        if bearer is None:
            return 401, b""
        status, _, body = self._fetch(url, **headers, Authorization=f"Bearer {bearer}")
        return status, body

    def _token(self, challenge: str, name: str, *, actions: str = "pull") -> str | None:
        """The bearer token a 401's challenge asks for; None when the token server refuses."""
        fields = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
        realm = fields.get("realm", "")
        if not realm.startswith(("https://", "http://")):
            raise RegistryError(f"the registry {self.host} asks for a token from {shown(realm)}, which is not a URL",
                                hint="check --registry")
        params = {"service": fields.get("service", ""), "scope": fields.get("scope", f"repository:{name}:{actions}")}
        status, _, token = self._fetch(realm, params=params, auth=self._credentials_for(realm))
        if status != 200:
            return None
        data = json.loads(token)
        bearer = (data.get("token") or data.get("access_token")) if isinstance(data, dict) else None
        if not isinstance(bearer, str):
            raise ValueError("the token server's answer has no token")
        return bearer

    def tags(self, repository: str) -> list[str]:
        """The tags of REPO/`repository` (e.g. "modules"); [] when it has none."""
        name = f"{self.repo.split('/', 1)[1]}/{repository}" if "/" in self.repo else repository
        ref = f"{self.host}/{name}"
        with self.answers(ref):
            status, body = self._get(f"{self.base_url}/v2/{name}/tags/list", name)  # all of them, unpaged
            if status == 404:
                return []
            self._refused(status, ref)
            if status != 200:
                raise ValueError(f"HTTP {status} for the tag list")
            tags = json.loads(body).get("tags") or []
            if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
                raise ValueError("its tag list is not a list of names")
            return tags

    # ---- the primitives of an ImageStore -----------------------------------------------------
    def manifest_bytes(self, name: str, reference: str) -> bytes | None:
        status, raw = self._get(f"{self.base_url}/v2/{name}/manifests/{reference}", name, Accept=MANIFEST_TYPES)
        if status == 404:
            return None
        self._refused(status, f"{self.host}/{name}:{reference}")
        if status != 200:
            raise ValueError(f"HTTP {status} for the manifest")
        return raw

    def blob_bytes(self, name: str, digest: str) -> bytes:
        import hashlib

        status, data = self._get(f"{self.base_url}/v2/{name}/blobs/{digest}", name)
        if status != 200:
            raise ValueError(f"HTTP {status} for the blob {digest[:19]}")
        if f"sha256:{hashlib.sha256(data).hexdigest()}" != digest:
            raise VerifyError(f"the registry {self.host} sent a blob that does not match its digest {digest[:19]}...",
                              hint="nothing was used; check the registry")
        return data

    def blob_to(self, name: str, digest: str, size: int, dest: Path) -> str:
        return self._download(f"{self.base_url}/v2/{name}/blobs/{digest}", name, dest, size=size)

    def has_blob(self, name: str, digest: str) -> bool:
        status, _ = self._send("HEAD", f"{self.base_url}/v2/{name}/blobs/{digest}", name)
        return status == 200

    def _put_blob(self, name: str, blob: Blob) -> None:
        """A blob in one upload (POST, then PUT with its digest), its bytes from memory or its file."""
        from urllib.parse import urljoin

        status, headers = self._send("POST", f"{self.base_url}/v2/{name}/blobs/uploads/", name)
        if status != 202 or "Location" not in headers:
            raise self._push_refused(name, f"HTTP {status} to start an upload")
        location = urljoin(f"{self.base_url}/", headers["Location"])
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(blob.size)}
        if blob.data is not None:
            status, _ = self._send("PUT", location, name, params={"digest": blob.digest}, data=blob.data,
                                   headers=headers)
        else:
            with open(blob.path, "rb") as body:
                status, _ = self._send("PUT", location, name, params={"digest": blob.digest}, data=body,
                                       headers=headers)
        if status != 201:
            raise self._push_refused(name, f"HTTP {status} for the blob {blob.digest[:19]}")

    def _put_manifest(self, name: str, tag: str, raw: bytes, media_type: str) -> None:
        status, _ = self._send("PUT", f"{self.base_url}/v2/{name}/manifests/{tag}", name, data=raw,
                               headers={"Content-Type": media_type})
        if status != 201:
            raise self._push_refused(name, f"HTTP {status} for the manifest of {tag}")

    def _push_refused(self, name: str, why: str) -> RegistryError:
        return RegistryError(f"the registry {self.host} refused the push of {self.host}/{name}: {why}",
                             hint="check that the registry runs and accepts pushes (`docker login` for one that asks)",
                             exit_code=RegistryError.PUSH_REFUSED)

    def _send(self, method: str, url: str, name: str, *, params=None, data=None, headers=None) -> tuple[int, dict]:
        """A request that changes or asks about the registry (HEAD, POST, PUT), with the token a 401
        asks for (pull and push); its status and headers."""
        headers = dict(headers or {})
        for attempt in (1, 2):
            answer = requests.request(method, url, params=params, data=data, headers=headers, timeout=TIMEOUT * 15,
                                      allow_redirects=False)
            challenge = answer.headers.get("WWW-Authenticate", "")
            if answer.status_code == 401 and challenge.lower().startswith("bearer ") and attempt == 1:
                bearer = self._token(challenge, name, actions="pull,push")
                if bearer is None:
                    break
                headers["Authorization"] = f"Bearer {bearer}"
                if hasattr(data, "seek"):
                    data.seek(0)
                continue
            if answer.status_code in (401, 403):
                break
            return answer.status_code, dict(answer.headers)
        raise RegistryError(f"the registry {self.host} refuses pushes to {name} (HTTP {answer.status_code})",
                            hint=f"log in first: docker login {self.host}", exit_code=RegistryError.PUSH_REFUSED)

    def _download(self, url: str, name: str, dest: Path, *, size: int) -> str:
        """A blob into `dest`: at most `size` bytes, TIMEOUT per read and a deadline for the whole
        (LAYER_DEADLINE + size at LAYER_RATE); its digest, sha256:HEX, taken as it arrives.
        Redirects are followed only to the registry's own host (never from https to http) or to a
        blob store over https, and credentials go only to the registry itself."""
        import hashlib
        import time

        deadline = time.monotonic() + LAYER_DEADLINE + size / LAYER_RATE
        headers: dict[str, str] = {}
        tried_token = False
        for _ in range(MAX_REDIRECTS + 2):
            with requests.get(url, headers=headers, timeout=TIMEOUT, stream=True, allow_redirects=False) as answer:
                if answer.is_redirect:
                    url, headers = self._redirected(url, answer.headers.get("Location", ""), headers)
                    continue
                challenge = answer.headers.get("WWW-Authenticate", "")
                if answer.status_code == 401 and challenge.lower().startswith("bearer ") and not tried_token \
                        and self._ours(url):
                    tried_token = True
                    bearer = self._token(challenge, name)
                    if bearer is None:
                        break
                    headers = {"Authorization": f"Bearer {bearer}"}
                    continue
                self._refused(answer.status_code, url)
                if answer.status_code != 200:
                    raise ValueError(f"HTTP {answer.status_code} for a layer")
                written, digest = 0, hashlib.sha256()
                with open(dest, "wb") as out:
                    for chunk in _arrived(answer, 1 << 20, fallback=1 << 20):
                        written += len(chunk)
                        if written > size:
                            raise VerifyError(f"the registry {self.host} sent more than the layer's {size} bytes",
                                              hint="nothing was used; check the registry")
                        if time.monotonic() > deadline:
                            raise RegistryError(f"the registry {self.host} sent the layer too slowly: {written} of "
                                                f"{size} bytes in {LAYER_DEADLINE + size / LAYER_RATE:.0f} s",
                                                hint="nothing was used; check the registry and the network")
                        out.write(chunk)
                        digest.update(chunk)
                return f"sha256:{digest.hexdigest()}"
        else:
            raise RegistryError(f"the registry {self.host} redirected a layer more than {MAX_REDIRECTS} times",
                                hint="check the registry's storage settings")
        raise self._refusal(401, url)  # the token server said no, or the token was not taken

    def _ours(self, url: str) -> bool:
        """Whether `url` is on the registry itself (where its token may be asked for and sent)."""
        from urllib.parse import urlsplit

        return urlsplit(url).netloc.lower() == urlsplit(self.base_url).netloc.lower()

    def _redirected(self, url: str, location: str, headers: dict[str, str]) -> tuple[str, dict[str, str]]:
        """Where a redirect may lead: the registry's own host (credentials kept, never https to
        http), or a blob store over https (no credentials). RegistryError otherwise."""
        from urllib.parse import urljoin, urlsplit

        target = urljoin(url, location)
        was, now = urlsplit(url), urlsplit(target)
        if was.scheme == "https" and now.scheme != "https":
            raise RegistryError(f"the registry {self.host} redirected a layer from https to {shown(now.scheme)} "
                                f"({shown(target)}): refused", hint="fix the registry's storage to use https")
        same = now.scheme == was.scheme and now.hostname == was.hostname and now.port == was.port
        if same:
            return target, headers
        if now.scheme == "https":
            return target, {}  # a blob store: never the registry's credentials
        raise RegistryError(f"the registry {self.host} redirected a layer to another host over plain "
                            f"{shown(now.scheme)} ({shown(target)}): refused",
                            hint="a registry's blob store must be served over https")

    def _refused(self, status: int, ref: str) -> None:
        if status in (401, 403):
            raise self._refusal(status, ref)

    def _refusal(self, status: int, ref: str) -> RegistryError:
        return RegistryError(f"the registry {self.host} refuses to show {ref} (HTTP {status})",
                             hint=f"log in first: docker login {self.host}")

    def name_and_tag(self, ref: str) -> tuple[str, str]:
        """HOST/NAME:TAG -> (NAME, TAG)."""
        name, _, tag = ref[len(self.host) + 1:].rpartition(":")
        return name, tag

    @contextmanager
    def answers(self, ref: str):
        """The registry's failures, said as RegistryError naming `ref`."""
        try:
            yield
        except _TooSlow:
            raise RegistryError(f"the registry {self.host} did not answer for {ref} within {self.deadline:g} s",
                                hint="check the registry and the network; it sends too slowly") from None
        except requests.ConnectionError as exc:
            raise RegistryError(f"the registry {self.host} does not answer ({_reason(exc)})",
                                hint="check --registry (or CUDABUILD_REGISTRY) and that the registry runs") from exc
        except requests.Timeout as exc:
            raise RegistryError(f"the registry {self.host} did not answer within {TIMEOUT} s",
                                hint="check --registry (or CUDABUILD_REGISTRY) and the network") from exc
        except (requests.RequestException, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise RegistryError(f"the registry {self.host} answered for {ref} with something cudabuild cannot "
                                f"read ({_reason(exc)})", hint="check that it is an OCI registry (v2 API)") from exc


def _arrived(answer, size: int, *, fallback: int):
    """An answer's body as it arrives, at most `size` bytes a chunk: read1 returns what has come (a
    trickle cannot hold one read past TIMEOUT, nor the whole past a deadline the caller keeps);
    without it, chunks of `fallback` bytes."""
    read = getattr(answer.raw, "read1", None)
    return iter(lambda: read(size), b"") if read else answer.iter_content(fallback)


def _reason(exc: BaseException) -> str:
    text = str(exc)
    found = re.search(r"\] ([^'\")]+)", text)  # urllib3 buries the errno's words in a long repr
    return shown((found.group(1) if found else text)[:200])


def _login(host: str, config_dir: Path | None) -> tuple[str, str] | None:
    """The user name and password `docker login HOST` stored, when they are stored in the file."""
    if config_dir is None:
        return None
    path = config_dir / "config.json"
    try:
        auth = json.loads(path.read_text()).get("auths", {}).get(host, {}).get("auth")
        user, _, password = base64.b64decode(auth).decode().partition(":") if auth else ("", "", "")
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return (user, password) if user else None
