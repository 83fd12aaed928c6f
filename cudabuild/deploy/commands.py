"""`cudabuild deploy swarm|ecs|kubernetes|systemd` as library calls: the driver images found, the
host's facts read, the files made, and delivered (to stdout, or one file per object into a
directory)."""

from __future__ import annotations

from pathlib import Path

from cudabuild.deploy import driver_images, ecs, host_facts, kubernetes, require_gpus, swarm, systemd, write
from cudabuild.errors import InputError
from cudabuild.host.root import HostRoot
from cudabuild.node.config import NodeConfig
from cudabuild.ui import Report


def deliver(files, output: str | None, as_json: bool) -> Report:
    """The files as the result (--json: {name: content}), or written into `output` (the text then
    says what was written, on stderr)."""
    if as_json and output:
        raise InputError("--json prints the manifests on stdout and --output writes them to files: choose one",
                         hint="drop --json to write files, or --output to print JSON")
    data = {f.name: f.content for f in files}
    if as_json:
        return Report(data)
    return Report(data, [write(files, Path(output) if output else None)], to_stderr=bool(output))


def _images(services, images, registry, kind):
    return driver_images(services.engine(), list(images), kind=kind, registry=registry)


def _node_files(orchestrator, host: HostRoot, *, images, registry, runtime_path: str, services):
    """Swarm's or ECS's files: both name the node's GPUs (read under --root) and its driver images."""
    facts = host_facts(host)
    require_gpus(facts, host)
    return orchestrator.files(_images(services, images, registry, "driver"), facts, runtime_path=runtime_path)


def swarm_files(host: HostRoot, **given):
    return _node_files(swarm, host, **given)


def ecs_files(host: HostRoot, **given):
    return _node_files(ecs, host, **given)


def kubernetes_files(*, images, registry, kmm: bool, prebuild: bool, drivers: str | None, schedule: str, services):
    if prebuild:
        kubernetes.cron_schedule(schedule)  # before anything else is looked at
    files = kubernetes.files(_images(services, images, registry, "kmm" if kmm else "driver"), kmm=kmm)
    if prebuild:
        files.append(kubernetes.prebuild_file(registry=prebuild_registry(registry, services),
                                              drivers=prebuild_drivers(drivers), schedule=schedule))
    return files


def systemd_files(*, registry, driver, prebuild: bool, cdi_refresh: bool, drivers, schedule, cudabuild_path, services):
    registry = services.settings.registry_repo(registry)
    if cdi_refresh and prebuild:
        raise InputError("--cdi-refresh and --prebuild are units for different hosts", hint="pass one of them")
    if cdi_refresh:
        return systemd.cdi_refresh_files(cudabuild=cudabuild_path)
    if prebuild:
        return systemd.prebuild_files(cudabuild=cudabuild_path, registry=prebuild_registry(registry, services),
                                      drivers=prebuild_drivers(drivers), schedule=schedule)
    if not registry:
        raise InputError("the node's driver comes from a registry", hint="pass --registry HOST[:PORT]/PATH")
    return systemd.node_files(cudabuild=cudabuild_path,
                              config=NodeConfig(driver=driver, registry=services.settings.registry(registry).repo))


def prebuild_registry(registry: str | None, services) -> str:
    if not registry:
        raise InputError("--prebuild pushes what it builds to a registry, and the nodes take it from there",
                         hint="pass --registry HOST[:PORT]/PATH")
    return services.settings.registry(registry).repo


def prebuild_drivers(drivers: str | None) -> str:
    from cudabuild.fleet.matrix import driver_cell, split_list

    if not drivers:
        raise InputError("--prebuild builds the drivers you name", hint="pass --drivers LIST, e.g. --drivers 535 "
                         "or --drivers 550,run:580.142")
    items = split_list(drivers, "--drivers")
    for item in items:
        driver_cell(item)  # checked as the matrix the job runs checks it
    return ",".join(items)
