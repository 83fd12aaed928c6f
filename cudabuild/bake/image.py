"""Phase 2: `cudabuild image PROFILE` — a runtime image that adds exactly one layer over its base:
the modules and userspace driver of a checked artifact, and the loader."""

from __future__ import annotations

import shutil
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

from cudabuild import artifact
from cudabuild.artifact import LABEL_PREFIX, Artifact, image_tag
from cudabuild.compile.builder import render_template, tar_context
from cudabuild.store.cache import Cache
from cudabuild.engine import Engine
from cudabuild.host.devices import FACTS_FILE
from cudabuild.host.loader import SETTINGS, settings
from cudabuild.errors import InputError, VerifyError, shown
from cudabuild.options import validate_image_ref
from cudabuild.nvidia import version_tuple
from cudabuild.resources import resource_dir
from cudabuild.ui import Reporter

# The newest CUDA each driver branch supports (NVIDIA's CUDA toolkit release notes, table 3).
DRIVER_MAX_CUDA = [(450, "11.0"), (455, "11.1"), (460, "11.2"), (465, "11.3"), (470, "11.4"), (495, "11.5"),
                   (510, "11.6"), (515, "11.7"), (520, "11.8"), (525, "12.0"), (530, "12.1"), (535, "12.2"),
                   (545, "12.3"), (550, "12.4"), (555, "12.5"), (560, "12.6"), (565, "12.7"), (570, "12.8"),
                   (575, "12.9"), (580, "13.0")]


@dataclass(frozen=True)
class Profile:
    name: str
    base: str
    smoke: tuple[str, ...]
    cuda: str | None = None
    description: str = ""
    kind: str = "runtime"  # runtime: loads the driver itself; driver: installs it on the host


def profiles() -> dict[str, Profile]:
    found = {}
    for path in sorted((resource_dir("images") / "profiles").glob("*.toml")):
        data = tomllib.loads(path.read_text())
        found[path.stem] = Profile(name=path.stem, base=data["base"], smoke=tuple(data["smoke"]),
                                   cuda=data.get("cuda"), description=data.get("description", ""),
                                   kind=data.get("kind", "runtime"))
    return found


def load_profile(name: str | None, base: str | None) -> Profile:
    if base is not None:
        validate_image_ref(base, "--base")
        if name is None:
            return Profile(name="custom", base=base, smoke=("nvidia-smi",), description=f"{base} with the driver")
    known = profiles()
    if name not in known:
        raise InputError(f"no image profile {shown(name)}", hint="choose one of: " + ", ".join(known) + ", or pass --base IMAGE")
    profile = known[name]
    return Profile(name=profile.name, base=base or profile.base, smoke=profile.smoke,
                   cuda=profile.cuda if base is None else None, description=profile.description, kind=profile.kind)


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


def render_runtime(profile: Profile, node: dict | None = None) -> str:
    """`node`: the kernel-agnostic driver container's configuration ({"registry", "command"})."""
    if profile.kind == "driver":
        return render_template("driver.Dockerfile.j2", base=profile.base, node=node)
    if profile.kind == "kmm":
        return render_template("kmm.Dockerfile.j2")
    return render_template("runtime.Dockerfile.j2", base=profile.base, smoke=list(profile.smoke))


# What `cudabuild install` imports, copied from this installation into the driver image (no
# network, no pip in the image build): a signed artifact's signatures and a signed image's are
# checked with asn1crypto and cryptography, whose compiled parts are for CPython 3.11 on glibc, as
# the driver profile's base has. The kernel-agnostic driver container also pulls from a registry
# (requests and what it needs; zstandard, compiled too, restores the modules an image stores
# against the driver's objects) and orders kernel releases (python-debian).
VENDORED = ("cudabuild", "click", "elftools", "platformdirs", "filelock", "yaml", "asn1crypto", "cryptography",
            "cffi", "_cffi_backend", "requests", "urllib3", "idna", "certifi", "charset_normalizer", "debian",
            "zstandard")


def stage_kmm(checked: Artifact, into: Path) -> None:
    """KMM's layout: /opt/lib/modules/KERNEL/*.ko and depmod's files (the host's depmod -b), the
    firmware under /firmware, and busybox as cp (KMM copies the modules out of the image)."""
    import subprocess

    root = into / "rootfs"
    release = checked.manifest.kernel_release
    modules = root / "opt" / "lib" / "modules" / release
    modules.mkdir(parents=True)
    for m in checked.manifest.modules:
        shutil.copy2(checked.module_path(m.name), modules / m.file)
    depmod = shutil.which("depmod") or next((p for p in ("/sbin/depmod", "/usr/sbin/depmod") if Path(p).exists()), None)
    if depmod is None:
        raise InputError("making a KMM image needs depmod on this host", hint="install kmod (bash scripts/setup does)")
    result = subprocess.run([depmod, "-b", str(root / "opt"), release], capture_output=True, text=True)
    if result.returncode != 0 or not (modules / "modules.dep").is_file():
        raise InputError(f"depmod could not index the modules: {result.stderr.strip()[-300:]}")
    firmware = checked.root / "userspace" / "firmware"
    if firmware.is_dir():
        shutil.copytree(firmware, root / "firmware")
    from cudabuild.resources import static_busybox

    (root / "bin").mkdir()
    shutil.copy2(static_busybox(), root / "bin" / "busybox")
    for applet in ("cp", "sh", "ls"):
        (root / "bin" / applet).symlink_to("busybox")


def stage_driver(checked: Artifact | None, into: Path) -> None:
    """The driver image's layer: the artifact at /opt/cudabuild/artifact (none in the
    kernel-agnostic image) and cudabuild with what it imports at /opt/cudabuild/python (its scripts
    and templates in cudabuild/_data, as in a wheel)."""
    import importlib

    home = into / "rootfs" / "opt" / "cudabuild"
    if checked is not None:
        checked.copy_to(lambda rel: home / "artifact" / rel, manifest=home / "artifact" / artifact.MANIFEST)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "_data")
    for name in VENDORED:
        found = Path(importlib.import_module(name).__file__)
        if found.name == "__init__.py":
            shutil.copytree(found.parent, home / "python" / name, ignore=skip)
        else:  # a module that is one file (cffi's compiled backend)
            shutil.copy2(found, home / "python" / found.name)
    for name in ("builder", "dockerfiles", "images"):
        shutil.copytree(resource_dir(name), home / "python" / "cudabuild" / "_data" / name, ignore=skip)


def stage_rootfs(checked: Artifact, into: Path) -> None:
    """The one layer: /opt/cudabuild/{modules,lib,bin,firmware}, the loader and its settings, the
    manifest. Only what the manifest lists is copied; links stay links (to a file beside them)."""
    home = into / "rootfs" / "opt" / "cudabuild"
    (home / "modules").mkdir(parents=True)
    (home / "bin").mkdir()
    checked.copy_to(lambda rel: home / rel if rel.startswith("modules/") else home / rel.removeprefix("userspace/"))
    shutil.copy2(resource_dir("images") / "loader.sh", home / "loader.sh")
    shutil.copy2(resource_dir("images") / FACTS_FILE, home / FACTS_FILE)
    shutil.copy2(resource_dir("images") / "device-query.py", home / "bin" / "device-query")
    for script in (home / "loader.sh", home / "bin" / "device-query"):
        script.chmod(0o755)
    (home / SETTINGS).write_text(settings(checked.manifest))
    shutil.copy2(checked.root / artifact.MANIFEST, home / artifact.MANIFEST)
    conf = into / "rootfs" / "etc" / "ld.so.conf.d"
    conf.mkdir(parents=True)
    (conf / "cudabuild.conf").write_text("/opt/cudabuild/lib\n")


def runtime_tag(profile: Profile, checked: Artifact) -> str:
    m = checked.manifest
    return image_tag(f"cudabuild/{profile.name}", m.driver_version, m.flavor, m.kernel_release,
                     m.signature["cert_sha256"] if m.signature else None, modules=tuple(e.name for e in m.modules))


def build_image(*, profile: Profile, checked: Artifact, engine: Engine, cache: Cache, tag: str | None,
                reporter: Reporter) -> dict:
    manifest = checked.manifest
    base_info = {"RootFS": {"Layers": []}, "Config": {}} if profile.base == "scratch" else engine.ensure_image(
        profile.base, what="base image", hint="or run `bash scripts/setup` to make its stand-in")
    base_cuda = (profile.cuda or _env(base_info, "CUDA_VERSION")) if profile.kind == "runtime" else None
    check_cuda(manifest.driver_version, profile.base, base_cuda)
    tag = tag or runtime_tag(profile, checked)
    _build_one_layer(engine, cache, reporter, what=f"build {tag} from {profile.base} (one layer)", tag=tag,
                     dockerfile=render_runtime(profile), base_layers=len(base_info["RootFS"]["Layers"]),
                     stage=lambda staging: {"driver": stage_driver, "kmm": stage_kmm}.get(
                         profile.kind, stage_rootfs)(checked, staging),
                     labels={**manifest.labels(), "org.opencontainers.image.base.name": profile.base,
                             f"{LABEL_PREFIX}.profile": profile.name})
    return {"image": tag, "base": profile.base, "profile": profile.name, "driver_version": manifest.driver_version,
            "kernel_release": manifest.kernel_release, "base_cuda": base_cuda,
            "max_cuda": max_cuda(manifest.driver_version), "layers_added": 1, "smoke": list(profile.smoke)}


def node_command(config) -> list[str]:
    """The kernel-agnostic driver container's arguments (its CMD, and what deploy starts it with)."""
    return [*config.args(), "--wait"]


def build_node_driver_image(*, profile: Profile, registry: str, driver: str | None, engine: Engine, cache: Cache,
                            tag: str | None, reporter: Reporter) -> dict:
    """The kernel-agnostic driver container: no modules; at start it finds the running kernel's
    verified build (staged on the host, else REGISTRY over its HTTP API) and installs it, then waits
    and stages the next kernel (`cudabuild install --registry REGISTRY [--driver DRIVER] --wait`)."""
    from cudabuild.node.config import NodeConfig

    config = NodeConfig(driver=driver, registry=registry)
    tag = tag or f"cudabuild/driver:{config.shown_driver}"
    command = node_command(config)
    base_info = engine.ensure_image(profile.base, what="base image",
                                    hint="or run `bash scripts/setup` to make its stand-in")
    _build_one_layer(engine, cache, reporter, what=f"build {tag} from {profile.base} (one layer; no modules: any "
                     "kernel)", tag=tag, dockerfile=render_runtime(profile, {"registry": registry, "command": command}),
                     base_layers=len(base_info["RootFS"]["Layers"]), stage=lambda staging: stage_driver(None, staging),
                     labels={**artifact.node_image_labels(driver=config.shown_driver, registry=registry,
                                                          profile=profile.name),
                             "org.opencontainers.image.base.name": profile.base})
    return {"image": tag, "base": profile.base, "profile": profile.name, "driver_version": None,
            "kernel_release": None, "node": config.to_json(), "command": command, "layers_added": 1}


def _build_one_layer(engine: Engine, cache: Cache, reporter: Reporter, *, what: str, tag: str, dockerfile: str,
                     base_layers: int, stage, labels: dict[str, str]) -> None:
    """`tag`: the rootfs that `stage(directory)` writes under directory/rootfs, one layer over the
    base (checked), with `labels`."""
    with reporter.step(what), tempfile.TemporaryDirectory(dir=cache.root / "tmp") as staging:
        stage(Path(staging))
        rootfs = Path(staging) / "rootfs"
        entries = [(str(Path("rootfs") / p.relative_to(rootfs)), p) for p in sorted(rootfs.rglob("*"))]
        with tar_context({"Dockerfile": dockerfile.encode()}, entries) as context:
            engine.build(context=context, tag=tag, network="none", labels=labels)
    layers = len(engine.image(tag)["RootFS"]["Layers"])
    if layers != base_layers + 1:
        raise VerifyError(f"{tag} has {layers - base_layers} layers over its base instead of one")


def _env(info: dict, name: str) -> str | None:
    for item in info["Config"].get("Env") or []:
        key, _, value = item.partition("=")
        if key == name:
            return value
    return None
