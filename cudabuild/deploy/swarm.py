"""Docker Swarm: GPUs advertised as generic resources (kind `gpu`, one per UUID), cudabuild-runtime
as each node's default runtime (services cannot be privileged or take --device: only the runtime
can hand them a GPU, by the DOCKER_RESOURCE_GPU Swarm sets), the driver installed once per node."""

from __future__ import annotations

import shlex

from cudabuild.deploy import EXAMPLE_IMAGE, RUNTIME_NAME, DriverImage, File, HostFacts


def daemon_json(host: HostFacts, runtime_path: str, runtime_args: list[str] | None = None) -> dict:
    runtime = {"path": runtime_path, **({"runtimeArgs": runtime_args} if runtime_args else {})}
    return {"node-generic-resources": [f"gpu={g.uuid}" for g in host.gpus],
            "runtimes": {RUNTIME_NAME: runtime}, "default-runtime": RUNTIME_NAME}


def files(images: list[DriverImage], host: HostFacts, *, runtime_path: str) -> list[File]:
    agnostic = next((i for i in images if i.every_kernel), None)
    if agnostic is not None:
        # The kernel-agnostic image: it finds the kernel's build itself (staged, or the registry,
        # which it reaches over the host's network), and stages the next kernel's while it waits.
        install = ["#!/bin/sh", "# Once per node: load the driver for whatever kernel runs, write the CDI spec, and",
                   "# stay, staging the next kernel's build. The only privileged container.", "set -eu",
                   shlex.join(["docker", "run", "-d", "--name", "cudabuild-driver", "--restart", "always",
                               "--privileged", "--pid", "host", "--network", "host", "-v", "/:/host", agnostic.ref,
                               *agnostic.args]), ""]
    else:
        install = ["#!/bin/sh", "# Once per node (and at every boot): load the driver, write the CDI spec. The only",
                   "# privileged container; pick the image of the node's kernel (uname -r).", "set -eu",
                   'case "$(uname -r)" in']
        for image in images:
            install.append(f"    {image.kernel_release}) image={shlex.quote(image.ref)} ;;")
        install += ['    *) echo "no cudabuild driver image for kernel $(uname -r)" >&2; exit 1 ;;', "esac",
                    'docker run --rm --privileged --pid host -v /:/host "$image"', ""]
    service = ["#!/bin/sh", "# A GPU job: Swarm picks a node with a free GPU and names it in DOCKER_RESOURCE_GPU;",
               "# the node's runtime gives the container that GPU's device node and the driver.",
               shlex.join(["docker", "service", "create", "--name", "gpu-example", "--mode", "replicated-job",
                           "--generic-resource", "gpu=1", "--restart-condition", "none", EXAMPLE_IMAGE,
                           "nvidia-smi"]), ""]
    stack = {"version": "3.8", "services": {"gpu-example": {
        "image": EXAMPLE_IMAGE, "command": ["nvidia-smi"],
        "deploy": {"mode": "replicated-job", "restart_policy": {"condition": "none"},
                   "resources": {"reservations": {"generic_resources": [
                       {"discrete_resource_spec": {"kind": "gpu", "value": 1}}]}}}}}}
    return [File("daemon.json", daemon_json(host, runtime_path)), File("install-driver.sh", "\n".join(install)),
            File("service.sh", "\n".join(service)), File("stack.yaml", stack)]
