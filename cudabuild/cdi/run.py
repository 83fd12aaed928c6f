"""`cudabuild run`: nvidia-docker 1.0's wrapper, for Docker engines without CDI (Debian 12's
20.10): `docker run` with exactly the CDI spec's device nodes for the chosen GPUs, its mounts and
its environment, and every other argument unchanged."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from cudabuild.cdi import spec as cdi
from cudabuild.host import devices
from cudabuild.errors import InputError

DEFAULT_DIRS = tuple(Path("/") / d for d in cdi.SPEC_DIRS)


def docker_arguments(edits: dict) -> list[str]:
    """`docker run` options for CDI container edits (hooks cannot be given to docker run)."""
    if edits.get("hooks"):
        raise InputError("the CDI spec asks for hooks, which `docker run` cannot run",
                         hint="use an engine that reads CDI (Podman, Docker 25 and newer), or a spec without hooks "
                              "(cudabuild install writes one)")
    args: list[str] = []
    for node in edits.get("deviceNodes", []):
        host = node.get("hostPath") or node["path"]
        args += ["--device", f"{host}:{node['path']}" + (f":{node['permissions']}" if node.get("permissions") else "")]
    for mount in edits.get("mounts", []):
        read_only = "ro" in (mount.get("options") or [])
        args += ["-v", f"{mount['hostPath']}:{mount['containerPath']}" + (":ro" if read_only else "")]
    for variable in edits.get("env", []):
        args += ["-e", variable]
    return args


def command(docker_args: list[str], *, gpus: str | None, cdi_dirs: list[Path], env: Mapping[str, str]) -> list[str]:
    """The whole `docker run` command line: the selection (--gpus, else NV_GPU, NVIDIA_VISIBLE_DEVICES
    as the device facts order them, else all), the spec's edits for it, then the user's arguments."""
    if gpus is not None and not gpus.strip(" ,"):
        raise InputError("--gpus is empty: it names no GPU", hint="name GPUs (--gpus 0,1 or a UUID), all, or none")
    value = gpus if gpus is not None else (devices.requested(env) or (None, "all"))[1]
    available = cdi.gpus_in_spec(cdi_dirs)
    chosen = devices.select(available, value, what="--gpus" if gpus is not None else "the GPU selection")
    if chosen is None:  # void: the container gets nothing of the driver
        return ["docker", "run", *docker_args]
    edits = cdi.edits_for(cdi_dirs, cdi.device_names(chosen))
    return ["docker", "run", *docker_arguments(edits), *docker_args]


def run_docker(docker_args: list[str], *, gpus: str | None, cdi_dirs: list[Path], env: Mapping[str, str],
               dry_run: bool):
    """`cudabuild run`: `docker run` with the GPUs the CDI spec describes. With `dry_run` the
    command itself (a Report to show); else this process becomes it (never returns)."""
    import os
    import shlex
    import shutil
    import sys

    from cudabuild.ui import Report

    line = command(docker_args, gpus=gpus, cdi_dirs=cdi_dirs or list(DEFAULT_DIRS), env=env)
    if dry_run:
        return Report(line, [shlex.join(line)])
    docker = shutil.which("docker")
    if docker is None:
        raise InputError("the docker command is not installed", hint="install the docker CLI, or use --dry-run")
    sys.stdout.flush()
    os.execv(docker, line)
