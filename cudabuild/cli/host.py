"""The commands for one host's driver: install, uninstall, holders."""

from __future__ import annotations

import click

from cudabuild.cli.common import EXIT_CODE_HELP, code_table, emit, services
from cudabuild.errors import LOADER_EXIT_CODES
from cudabuild.cli.flags import CDI_HOST_ROOT, DRIVER, JSON, MODULES, FLAVOR, REGISTRY, ROOT, VERIFY_KEY

LOADER_EXIT_HELP = code_table("The loader's refusals, as in a runtime image:", LOADER_EXIT_CODES)



@click.command(epilog=LOADER_EXIT_HELP + "\n\n" + EXIT_CODE_HELP)
@MODULES
@ROOT
@CDI_HOST_ROOT
@click.option("--wait", is_flag=True, help="Stay running until stopped (a DaemonSet's container), then remove the "
                                           "ready file. With --registry: wait for a build, and stage the next kernel's.")
@REGISTRY
@VERIFY_KEY
@DRIVER
@click.option("--no-fallback", is_flag=True, default=None,
              help="Never install another driver version when the configured one has no build for the kernel.")
@FLAVOR
@click.option("--poll", type=click.FloatRange(1, 86400), default=300, show_default=True, metavar="SECONDS",
              help="With --wait and --registry: how often to look for the next kernel (and, at most, between "
                   "retries while no build exists).")
@click.option("--kernel-hook", is_flag=True,
              help="Also write ROOT/etc/kernel/postinst.d/cudabuild, Debian's kernel hook: a new kernel's package "
                   "stages its build with the host's own cudabuild (by its absolute path). It never fails the "
                   "kernel's installation; `cudabuild ready` holds the reboot. A host without cudabuild gets none "
                   "(said): the waiting driver container stages the next kernel itself.")
@click.option("--drain", is_flag=True,
              help="When another driver version is loaded and containers hold the GPU: stop them (through the "
                   "engine), upgrade, and start them again. A holder outside any container is never stopped.")
@click.option("--drain-timeout", type=click.FloatRange(1, 3600), default=60, show_default=True, metavar="SECONDS",
              help="With --drain: how long to wait for the devices to be released after the containers stop.")
@click.option("--no-restart", is_flag=True, help="With --drain: leave the drained containers stopped.")
@click.option("--cdi-interval", type=click.FloatRange(1, 86400), default=30, show_default=True, metavar="SECONDS",
              help="With --wait: how often to check the CDI spec against the loaded driver and GPUs, and rewrite "
                   "it when it is stale.")
@JSON
def install(modules_ref, host, cdi_host_root, wait, registry, verify_key, driver, no_fallback, flavor, poll, kernel_hook, drain,
            drain_timeout, no_restart, cdi_interval, as_json) -> None:
    """Install a built driver on this host, once, for every container.

    Loads the modules with the image loader's own checks, order and exit codes (privilege, kernel,
    nouveau, a version already loaded: what is missing of it is loaded), copies the userspace
    driver to ROOT/run/cudabuild/driver/VERSION (lib/ with SONAME links, bin/, firmware/), makes
    the device nodes under ROOT/dev, writes a CDI spec (kind nvidia.com/gpu: each GPU by index and
    UUID, and all) to ROOT/var/run/cdi and, last, ROOT/run/cudabuild/driver/ready. Run again with
    the same driver, it changes nothing and says so: safe at every boot. Containers then get GPUs
    without --privileged (podman run --device nvidia.com/gpu=0, cudabuild run --gpus 0).

    With another driver version loaded, it upgrades: refused (exit 24, naming every process that
    holds the GPU: cudabuild holders) while anything holds it, unless --drain stops the containers
    that do; the old modules are unloaded (last loaded first), the new ones loaded, and the
    userspace directory, CDI spec and ready file rewritten. When the new modules do not load, the
    old driver is loaded again with its spec and ready file (exit 25): never a host without one.

    Without --modules, with --registry or --driver (or on a node set up so before, which remembers
    them): the node's own driver, for whatever kernel it runs (the kernel-agnostic driver
    container). The build for the running kernel is taken from
    ROOT/var/lib/cudabuild/staged (cudabuild stage), else pulled from the registry over its HTTP API
    and checked (digests, vermagic, version, the kernel's symbol CRCs when the host has its
    Module.symvers); else another driver version's build for this kernel (said everywhere: log,
    ready file, cudabuild status), unless --no-fallback; else it fails (exit 23), or with --wait
    waits and retries. Waiting, it stages the kernel the host boots next whenever one appears.

    \b
    Examples:
      sudo cudabuild install --modules cudabuild/modules:535.309.01-6.1.0-56-amd64
      docker run --rm --privileged --pid host -v /:/host cudabuild/driver:535.309.01-6.1.0-56-amd64
      cudabuild install --modules ./nvidia --root /mnt/node --json
      sudo cudabuild install --modules cudabuild/modules:550.127.05-6.1.0-56-amd64 --drain
      cudabuild install --registry registry.example:5000/gpu --driver 535 --root /host --wait
      sudo cudabuild install --registry registry.example:5000/gpu --driver 535 --kernel-hook
      cudabuild install --registry registry.example:5000/gpu --driver 535 --verify-key image.pub --root /host
      cudabuild install --registry oci:/media/bundle --driver 535    (an air-gapped site's bundle)
    """
    from cudabuild.node.commands import InstallRequest, install_driver

    request = InstallRequest(host=host, cdi_host_root=cdi_host_root, modules_ref=modules_ref, wait=wait,
                             registry=registry, driver=driver, fallback=None if no_fallback is None else False,
                             flavor=flavor, poll=poll, kernel_hook=kernel_hook, drain=drain,
                             drain_timeout=drain_timeout, restart=not no_restart, cdi_interval=cdi_interval,
                             verify_key=verify_key)
    install_driver(request, services(), then=lambda result: emit(result, as_json))


@click.command(epilog=EXIT_CODE_HELP)
@ROOT
@JSON
def holders(host, as_json) -> None:
    """Every process that holds the GPU: a /dev/nvidia* node open or mapped, or a library of the
    driver mapped (ROOT/proc/*/fd and ROOT/proc/*/maps), whatever started it, with the container
    it runs in (the id from ROOT/proc/PID/cgroup; its name, and a Kubernetes pod's name and
    namespace, from the engine when one answers). These are what keep a driver from being
    unloaded; `install --drain` stops the containers among them.

    \b
    Examples:
      sudo cudabuild holders
      cudabuild holders --root /host --json
    """
    from cudabuild.install.commands import holders_report

    emit(holders_report(host, services()), as_json)


@click.command(epilog=EXIT_CODE_HELP)
@ROOT
@CDI_HOST_ROOT
@JSON
def uninstall(host, cdi_host_root, as_json) -> None:
    """Remove what `cudabuild install` put on the host, in the safe order: refused (exit 24,
    naming them) while anything holds the GPU; the CDI spec first, so that no new container gets
    the GPU; then the modules unloaded (the last loaded first; a driver cudabuild did not install
    stays loaded); the device nodes; ROOT/run/cudabuild/driver/VERSION; the ready file last.
    Staged builds and the node's configuration (ROOT/var/lib/cudabuild) are kept.

    \b
    Examples:
      sudo cudabuild uninstall
      cudabuild uninstall --root /host --json
    """
    from cudabuild.install.commands import uninstall_report

    emit(uninstall_report(host, cdi_host_root, services()), as_json)


COMMANDS = [install, holders, uninstall]
