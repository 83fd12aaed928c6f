"""Drivers from NVIDIA's .run installers: by URL (NVIDIA's pattern or a mirror's) or a local file,
downloaded on the host and stored by content; extracted and built in the builder."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from cudabuild.errors import InputError
from cudabuild.build.fetch import Fetcher, sha256_file, store_local
from cudabuild.options import FULL_DRIVER_RE


@dataclass(frozen=True)
class RunDriver:
    version: str
    source: str  # the URL or path it came from
    path: Path  # in the content store
    sha256: str

    def canonical(self) -> dict:
        return {"kind": "run", "sha256": self.sha256}


def version_from_name(name: str) -> str | None:
    m = re.search(r"NVIDIA-Linux-x86_64-(\d{3}\.\d+(?:\.\d+)?)(?:-[a-z-]+)?\.run$", name)
    return m.group(1) if m else None


def resolve_run_driver(*, version: str | None, installer: str | None, template: str, sha256: str | None,
                       store: Path, fetcher: Fetcher) -> RunDriver:
    source = installer or template.format(version=version)
    named = version_from_name(source.rsplit("/", 1)[-1])
    version = version or named
    if version is None or not FULL_DRIVER_RE.fullmatch(version):
        raise InputError(f"cannot tell the driver version of {source}",
                         hint="pass --driver VERSION with the installer's version, e.g. 535.309.01")
    if named and named != version:
        raise InputError(f"--driver {version} does not match the installer {source} (version {named})",
                         hint="pass the installer of the version you ask for, or the matching --driver")
    if "://" not in source:
        path = Path(source).expanduser()
        if not path.is_file():
            raise InputError(f"--installer {source}: no such file",
                             hint="pass the path of NVIDIA-Linux-x86_64-VERSION.run, or its URL")
        digest = sha256_file(path)
        if sha256 and digest != sha256:
            raise InputError(f"{source} has sha256 {digest}, expected {sha256}",
                             hint="the file is not the installer you meant: check it, or the checksum")
        stored, _ = store_local(path, store)
        return RunDriver(version=version, source=str(path.resolve()), path=stored, sha256=digest)
    # A URL: its content is known by its sha256, given or remembered from an earlier download,
    # so a cached build needs no network.
    known = _urls(store)
    digest = sha256 or known.get(source)
    if digest and (store / digest).is_file():
        return RunDriver(version=version, source=source, path=store / digest, sha256=digest)
    path = fetcher.fetch(source, store=store, sha256=sha256, label=source.rsplit("/", 1)[-1])
    known[source] = path.name
    _save_urls(store, known)
    return RunDriver(version=version, source=source, path=path, sha256=path.name)


def _urls(store: Path) -> dict[str, str]:
    index = store / "urls.json"
    return json.loads(index.read_text()) if index.is_file() else {}


def _save_urls(store: Path, urls: dict[str, str]) -> None:
    tmp = store / "urls.json.partial"
    tmp.write_text(json.dumps(urls, indent=1, sort_keys=True))
    tmp.replace(store / "urls.json")
