"""The commands for a node across kernel updates: stage, ready (the reboot gate), status."""

from __future__ import annotations

import click

from cudabuild.cli.common import EXIT_CODE_HELP, emit, services
from cudabuild.cli.flags import DRIVER, JSON, REGISTRY, ROOT, VERIFY_KEY, node_flags


@click.command(epilog=EXIT_CODE_HELP)
@node_flags
@REGISTRY
@VERIFY_KEY
@DRIVER
@JSON
def stage(host, kernel, flavor, registry, verify_key, driver, as_json) -> None:
    """Stage the verified build for a kernel the host has not booted yet, so that its next boot
    needs no network.

    The build of the node's driver for the kernel is pulled from the registry over its HTTP API,
    checked (digests, vermagic, version, the kernel's symbol CRCs when the host has its
    Module.symvers) and kept in ROOT/var/lib/cudabuild/staged/RELEASE/. Staged builds of kernels
    that are no longer installed are removed (only when every installed kernel can be read). Exit
    23 when the registry has no such build.

    --driver or --flavor, once staged, changes the node's configuration: its next boot installs
    that driver and flavour, and `ready` answers for them. A change of flavour is never made unasked.

    \b
    Examples:
      cudabuild stage --kernel next
      cudabuild stage --kernel 6.1.0-56-amd64 --registry registry.example:5000/gpu --driver 535
      cudabuild stage --kernel next --flavor open   (the node moves to the open modules at its next boot)
      /etc/kernel/postinst.d/cudabuild 6.1.0-56-amd64 /boot/vmlinuz-6.1.0-56-amd64   (the kernel hook)
    """
    from cudabuild.node.commands import stage_report

    emit(stage_report(host, kernel=kernel, flavor=flavor, registry=registry, driver=driver, services=services(),
                      verify_key=verify_key), as_json)


@click.command(epilog=EXIT_CODE_HELP)
@node_flags
@DRIVER
@JSON
def ready(host, kernel, flavor, driver, as_json) -> None:
    """Exit 0 only when the kernel's verified build of the node's driver is staged: the reboot gate.

    A staged build counts when it is whole (every file against its manifest) and, where it was
    boot-tested, the real kernel accepted it. Otherwise exit 23, saying what is missing.

    \b
    Examples:
      cudabuild ready --kernel next && systemctl reboot
      kured --reboot-sentinel-command="sh -c 'test -f /var/run/reboot-required && cudabuild ready --kernel next'"
      cudabuild ready --kernel 6.1.0-56-amd64 --json
    """
    from cudabuild.node.commands import ready_report

    emit(ready_report(host, kernel=kernel, flavor=flavor, driver=driver, services=services()), as_json)


@click.command(epilog=EXIT_CODE_HELP)
@ROOT
@JSON
def status(host, as_json) -> None:
    """The node's driver state: what is installed and where it came from (a fallback is named),
    the running and next kernels, the node's configuration, and what is staged.

    \b
    Examples:
      cudabuild status
      cudabuild status --root /host --json
    """
    from cudabuild.node.commands import status_report

    emit(status_report(host, services()), as_json)


COMMANDS = [stage, ready, status]
