"""An OCI registry as the fleet's shared cache (KMM's "skip when the image exists"): before a build
the registry is asked for the modules image of the same key; a build pushes its result.

The registry is asked over its v2 HTTP API for a tag's labels (its manifest, then its config):
plain HTTP for 127.0.0.1 and localhost, as the Docker engine allows, HTTPS elsewhere, with the
anonymous or `docker login` token a registry asks for. Pushes and pulls go through the engine.
What is pulled is an artifact like any other: its files are checked against their manifest and
the modules verified against this host's kernel before they reach the cache."""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from pathlib import Path

import requests

from cudabuild.errors import RegistryError, shown
from cudabuild.options import validate_registry

MANIFEST_TYPES = ", ".join(["application/vnd.docker.distribution.manifest.v2+json",
                            "application/vnd.oci.image.manifest.v1+json"])
TIMEOUT = 20  # seconds for a connection or one read
DEADLINE = 60.0  # seconds for a whole answer, however it trickles in
MAX_ANSWER = 4 << 20  # bytes of a manifest, a config or a token: a real one is a few kB


class _TooSlow(Exception):
    pass


@dataclass(frozen=True)
class Registry:
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

    def ref(self, local: str) -> str:
        """The registry's name for a local image: cudabuild/modules:TAG -> REPO/modules:TAG."""
        return f"{self.repo}/{local.rsplit('/', 1)[-1]}"

    def _fetch(self, url: str, *, params=None, auth=None, **headers) -> tuple[int, dict, bytes]:
        """One GET, bounded: TIMEOUT per read, `deadline` for the whole answer, MAX_ANSWER bytes."""
        import time

        started = time.monotonic()
        with requests.get(url, params=params, auth=auth, headers=headers, timeout=TIMEOUT, stream=True,
                          allow_redirects=False) as answer:
            body = bytearray()
            # read1: what has arrived (a trickle cannot hold a read past TIMEOUT, nor the whole past the deadline)
            read = getattr(answer.raw, "read1", None)
            chunks = iter(lambda: read(1 << 16), b"") if read else answer.iter_content(1024)
            for chunk in chunks:
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
        fields = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
        realm = fields.get("realm", "")
        if not realm.startswith(("https://", "http://")):
            raise RegistryError(f"the registry {self.host} asks for a token from {shown(realm)}, which is not a URL",
                                hint="check --registry")
        params = {"service": fields.get("service", ""), "scope": fields.get("scope", f"repository:{name}:pull")}
        status, _, token = self._fetch(realm, params=params, auth=self._credentials_for(realm))
        if status != 200:
            return 401, b""
        data = json.loads(token)
        bearer = (data.get("token") or data.get("access_token")) if isinstance(data, dict) else None
        if not isinstance(bearer, str):
            raise ValueError("the token server's answer has no token")
        status, _, body = self._fetch(url, **headers, Authorization=f"Bearer {bearer}")
        return status, body

    def has(self, ref: str, key: str, *, note=lambda message: None) -> bool:
        """Whether the registry holds `ref` as a modules image of the build `key` (another build
        under that tag is said through `note`, and is not it)."""
        from cudabuild.artifact import read_labels

        labels = read_labels(self.labels(ref), ref)
        if labels is None:
            return False
        if labels.key != key:
            note(f"{ref} in the registry is another build (key {labels.key[:16]}..., ours {key[:16]}...)")
            return False
        return True

    def labels(self, ref: str) -> dict[str, str] | None:
        """The labels of `ref` in the registry, or None when it has no such tag."""
        name, _, tag = ref[len(self.host) + 1:].rpartition(":")
        try:
            status, manifest = self._get(f"{self.base_url}/v2/{name}/manifests/{tag}", name, Accept=MANIFEST_TYPES)
            if status == 404:
                return None
            if status in (401, 403):
                raise RegistryError(f"the registry {self.host} refuses to show {ref} (HTTP {status})",
                                    hint=f"log in first: docker login {self.host}")
            if status != 200:
                raise ValueError(f"HTTP {status} for the manifest")
            digest = json.loads(manifest)["config"]["digest"]
            if not isinstance(digest, str) or not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
                raise ValueError(f"the manifest's config digest {shown(digest)} is not a sha256 digest")
            status, config = self._get(f"{self.base_url}/v2/{name}/blobs/{digest}", name)
            if status != 200:
                raise ValueError(f"HTTP {status} for the image's config")
            data = json.loads(config)
            labels = (data.get("config") or {}).get("Labels") if isinstance(data, dict) else None
            labels = labels or {}
            if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                       for k, v in labels.items()):
                raise ValueError("its labels are not a mapping of strings to strings")
            return labels
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
