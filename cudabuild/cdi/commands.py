"""`cudabuild cdi generate` and `cudabuild cdi list` as library calls: the spec of the loaded driver
written whole (or checked against the one on disk), and the devices the engines will see."""

from __future__ import annotations

import json
from pathlib import Path

from cudabuild.cdi import spec as specs
from cudabuild.errors import InputError, StaleSpecError, printable
from cudabuild.host.root import HostRoot
from cudabuild.ui import Report


def generate(host: HostRoot, *, cdi_host_root: str, output: str | None, check: bool, if_loaded: bool) -> Report:
    """Write the loaded driver's spec to `output` (a file, "-" for the result itself, None for the
    host's own place), or with `check` compare the one on disk: a stale spec is the result's error
    (exit 26), naming each difference."""
    root = str(host.given)
    if output == "-" and check:
        raise InputError("--check compares a file on disk with the loaded driver", hint="leave out --output -")
    spec = specs.for_loaded(host, host_root=cdi_host_root)
    if spec is None and not check:  # --check: no driver and a spec on disk is a stale spec
        if not if_loaded:
            raise InputError(f"no NVIDIA driver is loaded under {root} (no proc/driver/nvidia/version, no "
                             "sys/module/nvidia/version)", hint="load the driver first (cudabuild install does)")
        return Report({"written": None}, [f"no NVIDIA driver is loaded under {root}: nothing to do"], to_stderr=True)
    target = Path(output).absolute() if output and output != "-" else host.resolve(specs.SPEC)
    if target.is_dir():
        raise InputError(f"--output {output} is a directory; it takes the spec's file name",
                         hint=f"pass a file, e.g. --output {target / specs.SPEC_FILE}")
    if check:
        current = specs.read_spec(target) if target.exists() else None
        said = specs.differences(current, spec, host=host, host_root=cdi_host_root)
        error = None
        if said:
            error = StaleSpecError(printable(f"the CDI spec {target} is stale: {'; '.join(said)}"),
                                   hint="rewrite it: cudabuild cdi generate" + (f" --root {root}" if root != "/" else "")
                                   + (f" --cdi-host-root {cdi_host_root}" if cdi_host_root != "/" else ""))
        return Report({"stale": bool(said), "differences": said, "spec": str(target)},
                      [] if said else [f"{target} matches the loaded driver and GPUs"], error=error)
    if output == "-":
        return Report(spec, [json.dumps(spec, indent=2)])
    if output:
        HostRoot("/").write_atomic(str(target), specs.encode(spec))
    else:
        target, _ = specs.write(spec, host)  # resolved inside the root
    return Report({"written": str(output or target), "devices": len(spec["devices"]),
                   "driver": specs.driver_version_of(spec)},
                  [f"wrote {output or target}: {len(spec['devices'])} devices, driver {specs.driver_version_of(spec)}"],
                  to_stderr=True)


def listing(host: HostRoot) -> Report:
    """The CDI specs and devices the engines will see (/etc/cdi, then /var/run/cdi, which wins a
    name clash)."""
    dirs = [host.resolve(d) for d in specs.SPEC_DIRS]
    found = specs.specs(dirs)
    winners = {}
    for path, spec in found:
        for device in spec.get("devices", []):
            winners[f"{spec['kind']}={device.get('name')}"] = str(path)
    lines = [] if found else [f"no CDI specs in {', '.join(str(d) for d in dirs)}"]
    lines += [f"{name:<60} {path}" for name, path in winners.items()]
    return Report({"specs": [str(p) for p, _ in found], "devices": winners}, lines)
