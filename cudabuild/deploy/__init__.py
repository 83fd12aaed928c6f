"""What operators apply, as pure functions of the driver images (their labels, read through the
artifact module) and the host's GPUs (its CDI facts): Swarm's daemon.json and stack, ECS task
definitions and node configuration, Kubernetes DaemonSets or a KMM Module.

Each deployment is a list of files: `--output DIR` writes one file per object, without it they go
to stdout."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from cudabuild.artifact import LABEL_PREFIX, read_labels, read_node_labels
from cudabuild.host import devices
from cudabuild.host.layout import READY_FILE as _READY
from cudabuild.errors import InputError
from cudabuild.host.root import HostRoot
from cudabuild.options import validate_image_ref

# A workload example: an unmodified CUDA image that lists the GPUs.
EXAMPLE_IMAGE = "nvidia/cuda:12.2.2-base-ubuntu22.04"
RUNTIME_NAME = "cudabuild"
READY_FILE = f"/{_READY}"  # where install writes it (cudabuild/host/layout.py)


@dataclass(frozen=True)
class DriverImage:
    """A driver (or KMM) image as the cluster pulls it, and what it holds. A kernel-agnostic
    driver image (cudabuild image driver --registry R) has no kernel: it serves every one, started
    with `args`."""

    ref: str
    kernel_release: str | None
    driver_version: str
    kind: str  # driver | kmm
    args: tuple[str, ...] = ("--wait",)

    @property
    def every_kernel(self) -> bool:
        return self.kernel_release is None


@dataclass(frozen=True)
class HostFacts:
    driver_version: str | None
    gpus: tuple[devices.Gpu, ...]


@dataclass(frozen=True)
class File:
    name: str
    content: object  # a dict (JSON or YAML), a list of dicts (a YAML stream) or text

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        if self.name.endswith((".yaml", ".yml")):
            import yaml

            class _NoAnchors(yaml.SafeDumper):  # every value written out where it is: no &anchors, no *aliases
                def ignore_aliases(self, data):
                    return True

            docs = self.content if isinstance(self.content, list) else [self.content]
            return yaml.dump_all(docs, Dumper=_NoAnchors, sort_keys=False)
        return json.dumps(self.content, indent=2) + "\n"


def as_pulled(ref: str, registry: str | None) -> str:
    """The reference nodes pull: the local one, or the same name and tag under --registry."""
    if registry is None:
        return ref
    validate_image_ref(registry, "--registry")
    name_and_tag = ref.rsplit("/", 1)[-1]
    return f"{registry.rstrip('/')}/{name_and_tag}"


def driver_images(engine, refs: list[str], *, kind: str, registry: str | None) -> list[DriverImage]:
    """The named images (or, none named: the kernel-agnostic driver image when the engine has one,
    else every local cudabuild image of this kind), checked to be cudabuild's images of that kind."""
    if not refs:
        refs = engine.tagged(f"{LABEL_PREFIX}.profile={kind}")
        if not refs:
            raise InputError(f"no cudabuild {kind} image in the engine",
                             hint=f"make one: cudabuild image {kind} --registry REPO (every kernel), or "
                                  f"--modules IMAGE|DIR (one kernel); or name one with --image")
        agnostic = [ref for ref in refs if read_node_labels(engine.image(ref)["Config"].get("Labels"))]
        refs = agnostic[-1:] or refs  # one object serves every kernel
    found = []
    for ref in refs:
        validate_image_ref(ref, "--image")
        if engine.image_id(ref) is None:
            raise InputError(f"--image {ref}: no such image in the engine",
                             hint=f"make it with cudabuild image {kind}, or check the name")
        image_labels = engine.image(ref)["Config"].get("Labels")
        node = read_node_labels(image_labels)
        if node is not None and kind != "driver":
            raise InputError(f"--image {ref} is a kernel-agnostic driver image; {kind.upper()} maps each kernel to "
                             "an image of its own", hint=f"make one per kernel: cudabuild image {kind} --modules "
                                                         "IMAGE|DIR")
        if node is not None:
            from cudabuild.bake.image import node_command
            from cudabuild.node.config import NodeConfig

            driver, node_registry = node
            config = NodeConfig(driver=None if driver == "any" else driver, registry=node_registry)
            found.append(DriverImage(ref=as_pulled(ref, registry), kernel_release=None, driver_version=driver,
                                     kind=kind, args=tuple(node_command(config))))
            continue
        labels = read_labels(image_labels, ref)
        if labels is None or labels.profile != kind:
            raise InputError(f"--image {ref} is not a cudabuild {kind} image",
                             hint=f"make one with cudabuild image {kind} --modules IMAGE|DIR")
        found.append(DriverImage(ref=as_pulled(ref, registry), kernel_release=labels.kernel_release,
                                 driver_version=labels.driver_version, kind=kind))
    return found


def host_facts(host: HostRoot) -> HostFacts:
    return HostFacts(driver_version=devices.loaded_version(host), gpus=tuple(devices.gpus(host)))


def require_gpus(facts: HostFacts, host: HostRoot) -> None:
    if not facts.gpus:
        raise InputError(f"no GPUs under {host.given}/proc/driver/nvidia/gpus: the node's GPUs name its resources",
                         hint="run it on a node after `cudabuild install` (or the driver container), or pass --root")


WRITTEN = ".cudabuild-deploy"  # in an --output directory: the files cudabuild wrote there


def write(files: list[File], output: Path | None) -> str:
    """Write one file per object into `output`, or return them all for stdout. A file already in
    `output` that an earlier `deploy` did not write is never replaced: refused, naming it. Each
    file is written whole (a new temporary name, never through a link planted there)."""
    from cudabuild.host.root import HostRoot

    if output is None:
        return "".join(f"# ---- {f.name} ----\n{f.text()}\n" for f in files)
    output = Path(os.path.abspath(output))
    if output == Path("/") or output.is_file():
        raise InputError(f"--output {output} is {'the root directory' if output == Path('/') else 'a file'}",
                         hint="pass a new or empty directory for the manifests, e.g. --output ./deploy")
    host = HostRoot("/")
    try:
        ours = set(host.read_text(str(output / WRITTEN), limit=1 << 16).split()) if (output / WRITTEN).exists() else set()
    except InputError:
        ours = set()
    theirs = [f.name for f in files if (output / f.name).exists() or (output / f.name).is_symlink()
              if f.name not in ours]
    if theirs:
        raise InputError(f"--output {output} already holds {', '.join(theirs)}, which cudabuild did not write",
                         hint="pass a new or empty directory, or move those files away")
    host.write_atomic(str(output / WRITTEN), "".join(f"{n}\n" for n in sorted(ours | {f.name for f in files})).encode())
    for f in files:
        host.write_atomic(str(output / f.name), f.text().encode())
    return "".join(f"wrote {output / f.name}\n" for f in files)
