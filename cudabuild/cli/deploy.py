"""`cudabuild deploy`: what operators apply for Swarm, ECS, Kubernetes and systemd."""

from __future__ import annotations

import click

from cudabuild.cli.common import EXIT_CODE_HELP, emit, services
from cudabuild.cli.flags import DRIVER, JSON, OUTPUT_DIR, REGISTRY, ROOT, _group


@click.group()
def deploy() -> None:
    """What operators apply for Swarm, ECS and Kubernetes, from the driver images built before.

    \b
    Examples:
      cudabuild deploy swarm --output ./swarm          # on a node after cudabuild install
      cudabuild deploy ecs --registry registry.example:5000/cudabuild --json
      cudabuild deploy kubernetes --image cudabuild/driver:535.309.01-6.1.0-56-amd64 --output ./k8s
      cudabuild deploy kubernetes --kmm --registry registry.example:5000/cudabuild
      cudabuild deploy kubernetes --prebuild --registry registry.example:5000/cudabuild --drivers 535
      cudabuild deploy systemd --registry registry.example:5000/cudabuild --driver 535 --output /etc/systemd/system
    """


IMAGES = click.option("--image", "images", multiple=True, metavar="IMAGE",
                      help="A driver image (cudabuild image driver; with --kmm: cudabuild image kmm), one per kernel; "
                           "repeatable. Default: every such image in the engine.")
RUNTIME_PATH = click.option("--runtime-path", default="/usr/local/bin/cudabuild-runtime", show_default=True,
                            metavar="PATH", help="Where cudabuild-runtime is on the nodes.")
deploy_flags = _group(IMAGES, REGISTRY, OUTPUT_DIR, JSON)


@deploy.command("swarm", epilog=EXIT_CODE_HELP)
@deploy_flags
@ROOT
@RUNTIME_PATH
def deploy_swarm(images, registry, output, as_json, host, runtime_path) -> None:
    """Swarm: the node's daemon.json (one generic resource gpu=UUID per GPU, cudabuild-runtime as
    the default runtime: services cannot be privileged or take --device), the driver's one-shot
    install per node, a service example and a stack file."""
    from cudabuild.deploy.commands import deliver, swarm_files

    files = swarm_files(host, images=images, registry=registry, runtime_path=runtime_path, services=services())
    emit(deliver(files, output, as_json), as_json)


@deploy.command("ecs", epilog=EXIT_CODE_HELP)
@deploy_flags
@ROOT
@RUNTIME_PATH
def deploy_ecs(images, registry, output, as_json, host, runtime_path) -> None:
    """ECS: the driver as a daemon service (privileged, the host's root), the node's configuration
    (the runtime registered as nvidia, ECS_ENABLE_GPU_SUPPORT, nvidia-gpu-info.json) and a workload
    task definition in two shapes: GPUs by resourceRequirements, and the seed's volumes and devices."""
    from cudabuild.deploy.commands import deliver, ecs_files

    files = ecs_files(host, images=images, registry=registry, runtime_path=runtime_path, services=services())
    emit(deliver(files, output, as_json), as_json)


@deploy.command("kubernetes", epilog=EXIT_CODE_HELP)
@deploy_flags
@click.option("--kmm", is_flag=True, help="A Kernel Module Management Module (cudabuild image kmm images) instead of "
                                          "driver DaemonSets.")
@click.option("--prebuild", is_flag=True,
              help="Also a CronJob that builds, boot-tests and pushes the fleet's kernels ahead of need (cudabuild "
                   "matrix --kernels-from the ConfigMap cudabuild-fleet-kernels) on a node labelled "
                   "cudabuild.io/builder=true. Needs --registry and --drivers.")
@click.option("--drivers", metavar="LIST", help="With --prebuild: the drivers to build (e.g. 535).")
@click.option("--schedule", default="0 3 * * *", show_default=True, metavar="CRON",
              help="With --prebuild: when the CronJob runs.")
def deploy_kubernetes(images, registry, output, as_json, kmm, prebuild, drivers, schedule) -> None:
    """Kubernetes: a namespace and one driver DaemonSet for every kernel (the kernel-agnostic
    driver image, on every node with an NVIDIA device), or one per kernel (nodeSelector on Node
    Feature Discovery's kernel-version.full); privileged with hostPID and the host's root, ready
    when the ready file is there, system-node-critical, OnDelete, tolerating GPU taints. With
    --kmm, a KMM Module with a kernelMapping per kernel. With --prebuild, also the CronJob that
    builds the fleet's kernels ahead of need."""
    from cudabuild.deploy.commands import deliver, kubernetes_files

    files = kubernetes_files(images=images, registry=registry, kmm=kmm, prebuild=prebuild, drivers=drivers,
                             schedule=schedule, services=services())
    emit(deliver(files, output, as_json), as_json)


@deploy.command("systemd", epilog=EXIT_CODE_HELP)
@REGISTRY
@DRIVER
@click.option("--prebuild", is_flag=True,
              help="A build host's units instead: cudabuild-prebuild.service and .timer, which build, boot-test and "
                   "push the kernels listed in /etc/cudabuild/kernels (cudabuild matrix --kernels-from).")
@click.option("--cdi-refresh", is_flag=True,
              help="Only the units that keep the CDI spec current, for a host whose driver came another way "
                   "(distribution packages, NVIDIA's installer): cudabuild-cdi-refresh.service and its udev rule.")
@click.option("--drivers", metavar="LIST", help="With --prebuild: the drivers to build (e.g. 535).")
@click.option("--schedule", default="daily", show_default=True, metavar="CALENDAR",
              help="With --prebuild: the timer's OnCalendar.")
@click.option("--cudabuild-path", default="/usr/local/bin/cudabuild", show_default=True, metavar="PATH",
              help="Where cudabuild is on the host.")
@OUTPUT_DIR
@JSON
def deploy_systemd(registry, driver, prebuild, cdi_refresh, drivers, schedule, cudabuild_path, output,
                   as_json) -> None:
    """systemd units for a host. By default the node's: cudabuild-driver.service installs the
    driver for whatever kernel runs (staged build, else the registry; cudabuild install
    --registry) before the container engines start; cudabuild-stage.service and .timer stage the
    next kernel's build hourly; cudabuild-cdi-refresh.service rewrites the CDI spec at boot and,
    through 60-cudabuild-cdi-refresh.rules (for /etc/udev/rules.d), whenever the driver's modules
    load, doing nothing while none is loaded. With --prebuild, a build host's: a service and a
    timer that build the fleet's kernels ahead of need.

    \b
    Examples:
      cudabuild deploy systemd --registry registry.example:5000/gpu --driver 535 --output /etc/systemd/system
      cudabuild deploy systemd --cdi-refresh --output /tmp/units
      cudabuild deploy systemd --prebuild --registry registry.example:5000/gpu --drivers 535,550
    """
    from cudabuild.deploy.commands import deliver, systemd_files

    files = systemd_files(registry=registry, driver=driver, prebuild=prebuild, cdi_refresh=cdi_refresh,
                          drivers=drivers, schedule=schedule, cudabuild_path=cudabuild_path, services=services())
    emit(deliver(files, output, as_json), as_json)


@click.command(epilog=EXIT_CODE_HELP)
@REGISTRY
@click.option("--kernels", metavar="LIST", help="Kernel releases, comma-separated (default: every kernel the registry "
                                                "has a modules image for).")
@click.option("--drivers", metavar="LIST", help="Driver versions or branches, comma-separated (default: every driver).")
@click.option("--output", required=True, metavar="DIR", help="The bundle's directory: new, or an earlier bundle to "
                                                             "bring up to date.")
@JSON
def bundle(registry, kernels, drivers, output, as_json) -> None:
    """Copy a registry's modules images, with their signatures and attestations, into one
    directory (an OCI image layout: oci-layout, index.json, blobs/sha256/) for a site with no
    network. There, --registry oci:DIR reads it wherever a registry is read: install, stage,
    the driver container (mount the directory into it), a build's pull. Every blob is checked
    against its digest on the way; blobs an earlier bundle holds are not copied again.

    \b
    Examples:
      cudabuild bundle --registry registry.example:5000/gpu --drivers 535 --output /media/usb/gpu-bundle
      cudabuild bundle --registry registry.example:5000/gpu --kernels 6.1.0-57-amd64,6.1.0-58-amd64 --output ./b
      skopeo inspect oci:/media/usb/gpu-bundle:modules:535.309.01-6.1.0-57-amd64
      cudabuild install --registry oci:/media/usb/gpu-bundle --driver 535
    """
    from cudabuild.fleet.bundle import BundleRequest, bundle as write_bundle

    made = services()
    settings = made.settings
    repo = settings.registry_repo(registry)
    if not repo:
        raise click.UsageError("name the registry to copy from: --registry HOST[:PORT]/PATH (or CUDABUILD_REGISTRY)")
    split = lambda text: tuple(x.strip() for x in (text or "").split(",") if x.strip())  # noqa: E731
    request = BundleRequest(registry=repo, output=output, kernels=split(kernels), drivers=split(drivers))
    emit(write_bundle(request, made.registry(repo), reporter=made.reporter), as_json)


COMMANDS = [deploy, bundle]
