"""The CDI commands: write or check a host's spec, list what engines see, and `cudabuild run`."""

from __future__ import annotations

import click

from cudabuild.cli.common import EXIT_CODE_HELP, emit, settings
from cudabuild.cli.flags import CDI_HOST_ROOT, JSON, ROOT


@click.group()
def cdi() -> None:
    """CDI specs: write one for a host whose driver came another way, list what engines see."""


@cdi.command("generate", epilog=EXIT_CODE_HELP)
@ROOT
@CDI_HOST_ROOT
@click.option("--output", metavar="FILE|-", help="Where to write the spec: a file, or - for stdout. Default: "
                                                 "ROOT/var/run/cdi/cudabuild-nvidia.json.")
@click.option("--check", is_flag=True,
              help="Write nothing: exit 26 when the spec on disk (--output FILE, or the default) does not match the "
                   "loaded driver and GPUs (another version, a GPU gone or new, a library path that no longer "
                   "exists), naming each difference; 0 when it matches.")
@click.option("--if-loaded", is_flag=True,
              help="When no NVIDIA driver is loaded, do nothing and exit 0 (a boot-time unit: the driver may load "
                   "later, and its udev event runs this again).")
@JSON
def cdi_generate(host, cdi_host_root, output, check, if_loaded, as_json) -> None:
    """Write the CDI spec of the driver loaded on a host and its GPUs: whatever installed it
    (cudabuild install, distribution packages, NVIDIA's installer). The loaded driver's version
    (/proc/driver/nvidia/version or /sys/module/nvidia/version), its GPUs, and the userspace
    libraries of exactly that version (cudabuild's copy first, then the host's library
    directories); refused, naming what is missing, when they are not there. The file is written
    whole or not at all (a temporary file, then a rename): an engine never reads half a spec.

    \b
    Examples:
      sudo cudabuild cdi generate
      cudabuild cdi generate --root /host --output -
      cudabuild cdi generate --check || sudo cudabuild cdi generate
      cudabuild cdi generate --if-loaded          (cudabuild-cdi-refresh.service: cudabuild deploy systemd)
    """
    from cudabuild.cdi.commands import generate

    emit(generate(host, cdi_host_root=cdi_host_root, output=output, check=check, if_loaded=if_loaded), as_json)


@cdi.command("list", epilog=EXIT_CODE_HELP)
@ROOT
@JSON
def cdi_list(host, as_json) -> None:
    """Show the CDI specs and devices the engines will see (/etc/cdi, then /var/run/cdi, which wins
    a name clash)."""
    from cudabuild.cdi.commands import listing

    emit(listing(host), as_json)


@click.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
               epilog=EXIT_CODE_HELP)
@click.option("--gpus", metavar="all|0,1|GPU-UUID|none",
              help="The GPUs the container gets. Default: NV_GPU, then NVIDIA_VISIBLE_DEVICES, then all.")
@click.option("--cdi-dir", "cdi_dirs", multiple=True, metavar="DIR",
              help="Where the CDI specs are (repeatable). Default: /etc/cdi and /var/run/cdi.")
@click.option("--dry-run", is_flag=True, help="Print the docker run command instead of running it.")
@click.argument("docker_args", nargs=-1, type=click.UNPROCESSED, required=True)
def run(gpus, cdi_dirs, dry_run, docker_args) -> None:
    """`docker run` with the GPUs, for Docker engines without CDI (nvidia-docker 1.0's way).

    Reads the CDI spec `cudabuild install` wrote and starts `docker run` with exactly its device
    nodes for the chosen GPUs, its read-only mounts of the userspace driver and its environment.
    Its own options come first; every other argument goes to `docker run` unchanged. The
    container needs no --privileged and no change to its image.

    \b
    Examples:
      cudabuild run --gpus 0 --rm python:3.11-slim-bookworm python3 -c 'import ctypes; ctypes.CDLL("libcuda.so.1")'
      NV_GPU=0,1 cudabuild run --rm -it my/cuda-app
      cudabuild run --gpus GPU-5a1c... --dry-run --rm debian:bookworm ls /dev
    """
    from pathlib import Path

    from cudabuild.cdi.run import run_docker

    emit(run_docker(list(docker_args), gpus=gpus, cdi_dirs=[Path(d) for d in cdi_dirs], env=settings().environ,
                    dry_run=dry_run))


COMMANDS = [cdi, run]
