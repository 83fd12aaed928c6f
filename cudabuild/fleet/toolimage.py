"""cudabuild's own image, cudabuild/cudabuild:VERSION: what `cudabuild matrix --backend
swarm|kubernetes` runs on the nodes (`cudabuild image tool`).

It is made from the cudabuild that runs this, with no checkout needed: the wheel is packed again
from the installed files (or, for an editable install, built from its source tree), and it and
the wheels of what it needs, for the image's Python (CPython 3.11 on x86_64), are fetched on this
host by pip with this host's configuration; the image build installs them with no index."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

import cudabuild
from cudabuild.artifact import LABEL_PREFIX
from cudabuild.errors import FetchError, InputError
from cudabuild.resources import resource_dir
from cudabuild.ui import Reporter

TOOL_REPOSITORY = "cudabuild/cudabuild"
DISTRIBUTION = "cudabuild"
# The image's Python (dockerfiles/cudabuild.Dockerfile: python:3.11-slim-bookworm on x86_64).
TARGET = ["--python-version", "3.11", "--implementation", "cp", "--abi", "cp311", "--abi", "abi3", "--abi", "none",
          "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
          "--platform", "manylinux2014_x86_64", "--platform", "any"]
_SKIPPED = {"INSTALLER", "REQUESTED", "RECORD", "direct_url.json"}


def tool_tag(version: str = cudabuild.__version__) -> str:
    return f"{TOOL_REPOSITORY}:{version}"


def own_wheel(into: Path) -> Path:
    """The wheel of the cudabuild that runs this: built from the source tree of an editable
    install, else packed again from the installed files (its RECORD)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution(DISTRIBUTION)
    except PackageNotFoundError as exc:
        raise InputError("cudabuild is not installed as a package here, so its wheel cannot be made",
                         hint="install it with pip (pip install cudabuild, or pip install -e CHECKOUT)") from exc
    direct = json.loads(dist.read_text("direct_url.json") or "{}")
    if direct.get("dir_info", {}).get("editable") and direct.get("url", "").startswith("file://"):
        source = direct["url"][len("file://"):]
        made = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(into),
                               source], capture_output=True, text=True)
        if made.returncode != 0:
            raise FetchError(f"pip could not build cudabuild's wheel from {source}: {made.stderr.strip()[-500:]}",
                             hint="check that the checkout is whole")
        [wheel] = into.glob("cudabuild-*.whl")
        return wheel
    return _repack(dist, into)


def _repack(dist, into: Path) -> Path:
    """A wheel of the installed distribution: its files as RECORD lists them, the package's data
    scripts (bin/cudabuild-runtime) back under .data/scripts, console scripts left to the
    installer, a new RECORD."""
    version = dist.version
    data = f"{DISTRIBUTION}-{version}.data"
    info = f"{DISTRIBUTION}-{version}.dist-info"
    scripts = _data_scripts(dist)
    entries: dict[str, bytes] = {}
    for file in dist.files or []:
        rel = PurePosixPath(str(file))
        if "__pycache__" in rel.parts or rel.suffix == ".pyc":
            continue
        if rel.parts[0] == info and rel.name in _SKIPPED:
            continue
        if ".." in rel.parts:  # installed outside site-packages: a script
            if rel.name in scripts:
                entries[f"{data}/scripts/{rel.name}"] = Path(file.locate()).read_bytes()
            continue
        entries[str(rel)] = Path(file.locate()).read_bytes()
    if f"{info}/WHEEL" not in entries or not any(n.startswith("cudabuild/") for n in entries):
        raise InputError(f"the installed cudabuild {version} lists no package files (RECORD)",
                         hint="install it again with pip")
    record = [f"{name},sha256={_digest(content)},{len(content)}" for name, content in sorted(entries.items())]
    record.append(f"{info}/RECORD,,")
    entries[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = into / f"{DISTRIBUTION}-{version}-py3-none-any.whl"
    into.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as out:
        for name, content in entries.items():
            item = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            item.external_attr = (0o100755 if "/scripts/" in name else 0o100644) << 16  # a regular file, mode
            out.writestr(item, content, zipfile.ZIP_DEFLATED)
    return wheel


def _data_scripts(dist) -> set[str]:
    """The scripts the wheel ships as data (not generated from entry points)."""
    generated = {ep.name for ep in dist.entry_points if ep.group in ("console_scripts", "gui_scripts")}
    return {PurePosixPath(str(f)).name for f in dist.files or []
            if ".." in PurePosixPath(str(f)).parts and "bin" in PurePosixPath(str(f)).parts} - generated


def _digest(content: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(content).digest()).rstrip(b"=").decode()


def wheel_identity(wheel: Path) -> str:
    """What a wheel of cudabuild holds, as one sha256: every file's name and bytes but its RECORD
    (which lists them) and the zip's own metadata, so that the wheel pip builds from a checkout and
    the one packed again from the same installed files are the same."""
    digest = hashlib.sha256()
    with zipfile.ZipFile(wheel) as archive:
        for name in sorted(archive.namelist()):
            if name.endswith(".dist-info/RECORD") or name.endswith("/"):
                continue
            digest.update(name.encode() + b"\0" + hashlib.sha256(archive.read(name)).digest())
    return digest.hexdigest()


def wheels_for_image(own: Path, into: Path, reporter: Reporter) -> None:
    """cudabuild's wheel and the wheels of everything it needs, and pip's own, for the image's Python."""
    fetched = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(into),
                              "--only-binary=:all:", *TARGET, str(own), "pip"], capture_output=True, text=True)
    if fetched.returncode != 0:
        said = [line for line in fetched.stderr.splitlines() if "is ignored: it is neither" not in line]
        raise FetchError(f"pip could not fetch the wheels cudabuild needs: {' '.join(said)[-600:]}",
                         hint="check pip's index (pip config list) and the network; the wheels are fetched on "
                              "this host, for CPython 3.11 on x86_64")


WHEEL_LABEL = f"{LABEL_PREFIX}.wheel"  # the tool image's cudabuild, as wheel_identity says


def make_tool_image(engine, *, registry=None, reporter: Reporter, rebuild: bool = False) -> dict:
    """Build cudabuild/cudabuild:VERSION (and push it to REGISTRY/cudabuild:VERSION). An image of
    that tag made from the same wheel is used as it is, unless `rebuild` (which also fetches what
    cudabuild needs again)."""
    from cudabuild.compile.builder import tar_context

    version = cudabuild.__version__
    tag = tool_tag(version)
    with tempfile.TemporaryDirectory() as work:
        with reporter.step(f"cudabuild {version}'s wheel"):
            own = own_wheel(Path(work) / "own")
            identity = wheel_identity(own)
        present = engine.image_id(tag) is not None and \
            (engine.image(tag)["Config"].get("Labels") or {}).get(WHEEL_LABEL) == identity
        reused = present and not rebuild
        if reused:
            reporter.note(f"{tag} was made from this wheel: used as it is (--no-cache makes it again)")
        else:
            wheels = Path(work) / "wheels"
            with reporter.step("wheels of what it needs (CPython 3.11, x86_64)"):
                wheels_for_image(own, wheels, reporter)
            files = {"Dockerfile": (resource_dir("dockerfiles") / "cudabuild.Dockerfile").read_bytes()}
            entries = [(f"wheels/{w.name}", w) for w in sorted(wheels.iterdir())]
            with reporter.step(f"build {tag}"):
                with tar_context(files, entries) as context:
                    engine.build(context=context, tag=tag, network="host",
                                 labels={f"{LABEL_PREFIX}.role": "tool", f"{LABEL_PREFIX}.version": version,
                                         WHEEL_LABEL: identity})
    report = {"image": tag, "version": version, "wheel": identity, "reused": reused, "registry_ref": None}
    if registry is not None:
        ref = f"{registry.repo}/cudabuild:{version}"
        with reporter.step(f"push {ref}"):
            engine.push(tag, ref)
        report["registry_ref"] = ref
    return report

