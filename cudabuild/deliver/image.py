"""Phase 2: `cudabuild image PROFILE` — a runtime image that adds exactly one layer over its base
(modules, userspace driver, loader) — and `cudabuild inspect`."""

from __future__ import annotations

import json
import platform
import re
import shutil
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

from cudabuild.build.builder import render_template, tar_context
from cudabuild.build.cache import Cache
from cudabuild.build.engine import LABEL_PREFIX, Engine
from cudabuild.errors import InputError, VerifyError
from cudabuild.resources import resource_dir
from cudabuild.options import version_tuple
from cudabuild.ui import Reporter
from cudabuild.verify import read_module

# The newest CUDA each driver branch supports (NVIDIA's CUDA toolkit release notes, table 3).
DRIVER_MAX_CUDA = [(450, "11.0"), (455, "11.1"), (460, "11.2"), (465, "11.3"), (470, "11.4"), (495, "11.5"),
                   (510, "11.6"), (515, "11.7"), (520, "11.8"), (525, "12.0"), (530, "12.1"), (535, "12.2"),
                   (545, "12.3"), (550, "12.4"), (555, "12.5"), (560, "12.6"), (565, "12.7"), (570, "12.8"),
                   (575, "12.9"), (580, "13.0")]
TAG_RE = re.compile(r"[a-z0-9]+(?:[._/-][a-z0-9]+)*(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?")


@dataclass(frozen=True)
class Profile:
    name: str
    base: str
    smoke: tuple[str, ...]
    cuda: str | None = None
    description: str = ""


def profiles() -> dict[str, Profile]:
    found = {}
    for path in sorted((resource_dir("images") / "profiles").glob("*.toml")):
        data = tomllib.loads(path.read_text())
        found[path.stem] = Profile(name=path.stem, base=data["base"], smoke=tuple(data["smoke"]),
                                   cuda=data.get("cuda"), description=data.get("description", ""))
    return found


def load_profile(name: str | None, base: str | None) -> Profile:
    if base is not None:
        if not TAG_RE.fullmatch(base):
            raise InputError(f"--base {base!r} is not an image reference", hint="pass e.g. --base debian:bookworm")
        if name is None:
            return Profile(name="custom", base=base, smoke=("nvidia-smi",), description=f"{base} with the driver")
    known = profiles()
    if name not in known:
        raise InputError(f"no image profile {name!r}", hint="choose one of: " + ", ".join(known) + ", or pass --base IMAGE")
    profile = known[name]
    return Profile(name=profile.name, base=base or profile.base, smoke=profile.smoke,
                   cuda=profile.cuda if base is None else None, description=profile.description)


def max_cuda(driver_version: str) -> str | None:
    major = version_tuple(driver_version)[0]
    fitting = [cuda for branch, cuda in DRIVER_MAX_CUDA if branch <= major]
    return fitting[-1] if fitting else None


def check_cuda(driver_version: str, base: str, base_cuda: str | None) -> None:
    """Refuse a base whose CUDA runtime needs a newer driver than the modules'."""
    if not base_cuda:
        return
    supported = max_cuda(driver_version)
    if supported and version_tuple(base_cuda)[:2] > version_tuple(supported)[:2]:
        raise InputError(
            f"{base} carries CUDA {base_cuda}, but driver {driver_version} supports CUDA {supported} at most: "
            "its programs would fail with \"CUDA driver version is insufficient for CUDA runtime version\"",
            hint=f"use a base with CUDA {supported} or older, or build the modules with a newer --driver")


def render_runtime(profile: Profile) -> str:
    return render_template("runtime.Dockerfile.j2", base=profile.base, smoke=list(profile.smoke))


def find_modules(reference: str | None, cache: Cache, engine: Engine | None) -> Path:
    """The cached result for a modules image, a result directory, or the newest build."""
    if reference is None:
        results = [p for p in (cache.root / "results").glob("*/manifest.json")]
        if not results:
            raise InputError("there are no built modules in the cache yet",
                             hint="build them first: cudabuild modules --kernel RELEASE --driver VERSION")
        return max(results, key=lambda p: json.loads(p.read_text())["created"]).parent
    path = Path(reference).expanduser()
    if (path / "manifest.json").is_file():
        return path
    if engine is None or engine.image_id(reference) is None:
        raise InputError(f"--modules {reference}: neither a modules image nor a directory with manifest.json",
                         hint="pass a cudabuild/modules:... image, or the directory --output wrote")
    key = engine.image(reference)["Config"].get("Labels", {}).get(f"{LABEL_PREFIX}.key")
    result = cache.result(key) if key else None
    if result is None:
        raise InputError(f"{reference} was not built with this cache ({cache.root})",
                         hint="build it here with cudabuild modules, or pass the directory --output wrote")
    return result


def labels_for(manifest: dict) -> dict[str, str]:
    return {
        "org.opencontainers.image.version": manifest["driver_version"],
        "org.opencontainers.image.created": manifest["created"],
        f"{LABEL_PREFIX}.driver-version": manifest["driver_version"],
        f"{LABEL_PREFIX}.kernel-release": manifest["kernel_release"],
        f"{LABEL_PREFIX}.vermagic": manifest["vermagic"],
        f"{LABEL_PREFIX}.flavor": manifest["flavor"],
        f"{LABEL_PREFIX}.key": manifest["key"],
        f"{LABEL_PREFIX}.modules": ",".join(f"{m['file']}@sha256:{m['sha256']}" for m in manifest["modules"]),
    }


def stage_rootfs(result: Path, manifest: dict, into: Path) -> None:
    """The one layer: /opt/cudabuild/{modules,lib,bin,firmware}, the loader, driver.env, manifest."""
    home = into / "rootfs" / "opt" / "cudabuild"
    home.mkdir(parents=True)
    shutil.copytree(result / "modules", home / "modules")
    userspace = result / "userspace"
    shutil.copytree(userspace / "lib", home / "lib", symlinks=True)
    shutil.copytree(userspace / "bin", home / "bin", symlinks=True)
    if (userspace / "firmware").is_dir():
        shutil.copytree(userspace / "firmware", home / "firmware")
    shutil.copy2(resource_dir("images") / "loader.sh", home / "loader.sh")
    shutil.copy2(resource_dir("images") / "device-query.py", home / "bin" / "device-query")
    for script in (home / "loader.sh", home / "bin" / "device-query"):
        script.chmod(0o755)
    nvidia = next(m for m in manifest["modules"] if m["name"] == "nvidia")
    (home / "driver.env").write_text(
        f'DRIVER_VERSION="{manifest["driver_version"]}"\nKERNEL_RELEASE="{manifest["kernel_release"]}"\n'
        f'MODULES="{" ".join(m["name"] for m in manifest["modules"])}"\n'
        f'NEEDS_IPMI={1 if "ipmi_msghandler" in nvidia.get("depends", []) else 0}\n')
    shutil.copy2(result / "manifest.json", home / "manifest.json")
    conf = into / "rootfs" / "etc" / "ld.so.conf.d"
    conf.mkdir(parents=True)
    (conf / "cudabuild.conf").write_text("/opt/cudabuild/lib\n")


def build_image(*, profile: Profile, result: Path, engine: Engine, cache: Cache, tag: str | None,
                reporter: Reporter) -> dict:
    manifest = json.loads((result / "manifest.json").read_text())
    base_info = _base(engine, profile.base)
    base_cuda = profile.cuda or _env(base_info, "CUDA_VERSION")
    check_cuda(manifest["driver_version"], profile.base, base_cuda)
    tag = tag or f"cudabuild/{profile.name}:{manifest['driver_version']}-{manifest['kernel_release']}".replace("+", "_")
    if not TAG_RE.fullmatch(tag):
        raise InputError(f"--tag {tag!r} is not a valid image tag", hint="pass e.g. --tag registry.example/gpu:535")
    dockerfile = render_runtime(profile)
    with reporter.step(f"build {tag} from {profile.base} (one layer)"), \
            tempfile.TemporaryDirectory(dir=cache.root / "tmp") as staging:
        stage_rootfs(result, manifest, Path(staging))
        with tar_context({"Dockerfile": dockerfile.encode()}, directory=Path(staging)) as context:
            engine.build(context=context, tag=tag, network="none",
                         labels={**labels_for(manifest), "org.opencontainers.image.base.name": profile.base,
                                 f"{LABEL_PREFIX}.profile": profile.name})
    layers, base_layers = len(engine.image(tag)["RootFS"]["Layers"]), len(base_info["RootFS"]["Layers"])
    if layers != base_layers + 1:
        raise VerifyError(f"{tag} has {layers - base_layers} layers over its base instead of one")
    return {"image": tag, "base": profile.base, "profile": profile.name, "driver_version": manifest["driver_version"],
            "kernel_release": manifest["kernel_release"], "base_cuda": base_cuda,
            "max_cuda": max_cuda(manifest["driver_version"]), "layers_added": 1, "smoke": list(profile.smoke)}


def _base(engine: Engine, base: str) -> dict:
    if engine.image_id(base) is None and engine.pull(base) is None:
        raise InputError(f"the base image {base} is not in the engine and cannot be pulled",
                         hint=f"pull or load {base}, or run `bash scripts/setup` to make its stand-in")
    return engine.image(base)


def _env(info: dict, name: str) -> str | None:
    for item in info["Config"].get("Env") or []:
        key, _, value = item.partition("=")
        if key == name:
            return value
    return None


# ---- inspect -----------------------------------------------------------------------------------
def inspect(target: str, engine_factory) -> dict:
    """Driver, kernel and module digests of a runtime image, a modules image, a directory or a .ko."""
    path = Path(target).expanduser()
    if path.is_file() and path.suffix == ".ko":
        info = read_module(path)
        report = {"kind": "module", "driver_version": info.version, "kernel_release": info.vermagic.split(" ")[0],
                  "vermagic": info.vermagic, "modules": [info.as_json()]}
    elif path.is_dir() and (path / "manifest.json").is_file():
        manifest = json.loads((path / "manifest.json").read_text())
        report = {"kind": "directory", "driver_version": manifest["driver_version"],
                  "kernel_release": manifest["kernel_release"], "vermagic": manifest["vermagic"],
                  "modules": [{k: m[k] for k in ("name", "file", "size", "sha256", "version")}
                              for m in manifest["modules"]]}
    elif path.exists():
        raise InputError(f"{target} is neither a .ko file nor a directory with manifest.json",
                         hint="pass a runtime or modules image, the directory --output wrote, or a .ko")
    else:
        engine = engine_factory()
        if engine.image_id(target) is None:
            raise InputError(f"{target}: no such file, directory or image", hint="check the name")
        labels = engine.image(target)["Config"].get("Labels") or {}
        if f"{LABEL_PREFIX}.driver-version" not in labels:
            raise InputError(f"{target} was not made by cudabuild (it has no {LABEL_PREFIX} labels)")
        modules = []
        for entry in labels[f"{LABEL_PREFIX}.modules"].split(","):
            file, _, digest = entry.partition("@sha256:")
            modules.append({"name": file.removesuffix(".ko"), "file": file, "sha256": digest})
        report = {"kind": "runtime image" if f"{LABEL_PREFIX}.profile" in labels else "modules image",
                  "image": target, "driver_version": labels[f"{LABEL_PREFIX}.driver-version"],
                  "kernel_release": labels[f"{LABEL_PREFIX}.kernel-release"],
                  "vermagic": labels[f"{LABEL_PREFIX}.vermagic"], "modules": modules}
    host = platform.release()
    report["host_kernel_release"] = host
    report["matches_host"] = report["kernel_release"] == host
    return report
