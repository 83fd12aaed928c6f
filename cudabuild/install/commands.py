"""`cudabuild holders` and `cudabuild uninstall` as library calls, each result with its text."""

from __future__ import annotations

from cudabuild.errors import printable
from cudabuild.host.root import HostRoot
from cudabuild.install import upgrade
from cudabuild.ui import Report


def holders_report(host: HostRoot, services) -> Report:
    """Every process that holds the GPU, with its container (named through the engine when one answers)."""
    found = upgrade.who_holds(host, services.engine, services.reporter)
    if not found:
        return Report([], ["nothing holds the GPU"])
    lines = [f"{'PID':>8}  {'COMMAND':<16} {'CONTAINER':<28} HOLDS"]
    for h in found:
        where = (h.container or h.container_id[:12]) if h.in_container else "-"
        if h.pod:
            where += f" ({h.namespace}/{h.pod})"
        lines.append(printable(f"{h.pid:>8}  {h.command:<16} {where:<28} {', '.join(h.holds)}"))
    return Report([h.to_json() for h in found], lines)


def uninstall_report(host: HostRoot, cdi_host_root: str, services) -> Report:
    """What `install` put on the host removed, in the safe order (install/upgrade.py uninstall)."""
    done = upgrade.uninstall(host, host_root=cdi_host_root, env=services.settings.environ,
                             engine=services.engine, reporter=services.reporter)
    if done.driver_version and done.unloaded:
        lines = [f"NVIDIA {done.driver_version} uninstalled: unloaded {', '.join(done.unloaded)}"]
    elif done.left_loaded:
        lines = [f"NVIDIA {done.driver_version} stays loaded (cudabuild did not install it)"]
    else:
        lines = ["no NVIDIA driver was loaded"]
    lines += [f"  removed: {path}" for path in done.removed]
    return Report(done.to_json(), lines)
