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
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import requests

from cudabuild.errors import RegistryError, VerifyError, shown
from cudabuild.options import validate_registry

MANIFEST_TYPES = ", ".join(["application/vnd.docker.distribution.manifest.v2+json",
                            "application/vnd.oci.image.manifest.v1+json"])
TIMEOUT = 20


@dataclass(frozen=True)
class Registry:
    repo: str  # HOST[:PORT]/PATH, e.g. 127.0.0.1:5055/cudabuild

    def __post_init__(self) -> None:
        validate_registry(self.repo)

    @property
    def host(self) -> str:
        return self.repo.split("/", 1)[0]

    @property
    def base_url(self) -> str:
        name = self.host.rsplit(":", 1)[0] if not self.host.startswith("[") else self.host
        insecure = name == "localhost" or name.startswith("127.") or name == "[::1]"
        return f"{'http' if insecure else 'https'}://{self.host}"

    def ref(self, local: str) -> str:
        """The registry's name for a local image: cudabuild/modules:TAG -> REPO/modules:TAG."""
        return f"{self.repo}/{local.rsplit('/', 1)[-1]}"

    def _get(self, url: str, name: str, **headers) -> requests.Response:
        """GET with the token the registry asks for (anonymous, or `docker login`'s credentials)."""
        answer = requests.get(url, headers=headers, timeout=TIMEOUT)
        challenge = answer.headers.get("WWW-Authenticate", "")
        if answer.status_code != 401 or not challenge.lower().startswith("bearer "):
            return answer
        fields = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
        params = {"service": fields.get("service", ""), "scope": fields.get("scope", f"repository:{name}:pull")}
        token = requests.get(fields.get("realm", ""), params=params, auth=_login(self.host), timeout=TIMEOUT)
        token.raise_for_status()
        bearer = token.json().get("token") or token.json().get("access_token")
        return requests.get(url, headers={**headers, "Authorization": f"Bearer {bearer}"}, timeout=TIMEOUT)

    def labels(self, ref: str) -> dict[str, str] | None:
        """The labels of `ref` in the registry, or None when it has no such tag."""
        name, _, tag = ref[len(self.host) + 1:].rpartition(":")
        try:
            manifest = self._get(f"{self.base_url}/v2/{name}/manifests/{tag}", name, Accept=MANIFEST_TYPES)
            if manifest.status_code == 404:
                return None
            if manifest.status_code in (401, 403):
                raise RegistryError(f"the registry {self.host} refuses to show {ref} (HTTP {manifest.status_code})",
                                    hint=f"log in first: docker login {self.host}")
            manifest.raise_for_status()
            config = self._get(f"{self.base_url}/v2/{name}/blobs/{manifest.json()['config']['digest']}", name)
            config.raise_for_status()
            return (config.json().get("config") or {}).get("Labels") or {}
        except requests.ConnectionError as exc:
            raise RegistryError(f"the registry {self.host} does not answer ({_reason(exc)})",
                                hint="check --registry (or CUDABUILD_REGISTRY) and that the registry runs") from exc
        except requests.Timeout as exc:
            raise RegistryError(f"the registry {self.host} did not answer within {TIMEOUT} s",
                                hint="check --registry (or CUDABUILD_REGISTRY) and the network") from exc
        except (requests.RequestException, ValueError, KeyError, TypeError) as exc:
            raise RegistryError(f"the registry {self.host} answered for {ref} with something cudabuild cannot "
                                f"read ({_reason(exc)})", hint="check that it is an OCI registry (v2 API)") from exc


def _reason(exc: BaseException) -> str:
    text = str(exc)
    found = re.search(r"\] ([^'\")]+)", text)  # urllib3 buries the errno's words in a long repr
    return shown((found.group(1) if found else text)[:200])


def _login(host: str) -> tuple[str, str] | None:
    """The user name and password `docker login HOST` stored, when they are stored in the file."""
    path = Path(os.environ.get("DOCKER_CONFIG", Path.home() / ".docker")) / "config.json"
    try:
        auth = json.loads(path.read_text()).get("auths", {}).get(host, {}).get("auth")
        user, _, password = base64.b64decode(auth).decode().partition(":") if auth else ("", "", "")
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return (user, password) if user else None


def unpack_image(saved_path: Path, into: Path) -> None:
    """The one layer of a saved modules image (`docker save`) into `into`: only modules/,
    userspace/ and manifest.json, regular files, directories and links inside their directory."""
    import tarfile  # only to pull: a cache hit reads no tar

    with tarfile.open(saved_path) as saved:
        try:
            index = json.load(saved.extractfile("manifest.json"))
            layers = index[0]["Layers"]
        except (KeyError, ValueError, IndexError, TypeError) as exc:
            raise VerifyError("the pulled image is not a saved image cudabuild can read",
                              hint="use images `cudabuild modules --registry` pushed") from exc
        if len(layers) != 1:
            raise VerifyError(f"the pulled modules image has {len(layers)} layers, not one: cudabuild did not "
                              "make it", hint="use images `cudabuild modules --registry` pushed")
        with tarfile.open(fileobj=saved.extractfile(layers[0])) as layer:
            for member in layer:
                name = PurePosixPath(member.name.removeprefix("./"))
                if not name.parts or name.parts[0] not in ("modules", "userspace", "manifest.json"):
                    continue
                outward = member.issym() and (member.linkname.startswith("/") or ".." in member.linkname.split("/"))
                if ".." in name.parts or not (member.isfile() or member.isdir() or member.issym()) or outward:
                    raise VerifyError(f"the pulled modules image holds {shown(member.name)}, which cudabuild "
                                      "never writes", hint="use images `cudabuild modules --registry` pushed")
                member.name = str(name)
                layer.extract(member, into, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))


def headers_files(deb: Path, release: str, into: Path) -> tuple[Path, Path]:
    """Module.symvers and .config of a Debian kernel, read on the host from its
    linux-headers-RELEASE package: what a pulled result is verified against."""
    from debian.debfile import DebFile

    wanted = {f"linux-headers-{release}/Module.symvers": into / "Module.symvers",
              f"linux-headers-{release}/.config": into / "config"}
    package = DebFile(str(deb))
    try:
        data = package.data.tgz()
        for member in data.getmembers():
            for suffix, target in wanted.items():
                if member.isfile() and member.name.endswith(suffix):
                    with data.extractfile(member) as source, open(target, "wb") as out:
                        shutil.copyfileobj(source, out)
    finally:
        package.close()
    missing = [t.name for t in wanted.values() if not t.is_file()]
    if missing:
        raise VerifyError(f"{deb.name} has no {' or '.join(missing)} for {release}",
                          hint="the kernel's headers package is needed to verify pulled modules")
    return wanted[f"linux-headers-{release}/Module.symvers"], wanted[f"linux-headers-{release}/.config"]
