"""`cudabuild install`: the driver on a host, once, for every container.

1. The userspace driver goes to ROOT/run/cudabuild/driver/VERSION (lib/ with SONAME links, bin/,
   firmware/, modules/), staged beside it and swapped in; already there, it is left alone.
2. The image's own loader (images/loader.sh, with the device facts it shares with this package)
   loads the modules and makes the device nodes under ROOT/dev: the same checks, order and exit
   codes as in a runtime image.
3. A CDI spec of the GPUs the driver reports goes to ROOT/var/run/cdi.
4. Last, the readiness file ROOT/run/cudabuild/driver/ready: JSON naming the kernel, the driver,
   where the build came from (`source`: the artifact given, staged on the node, the registry;
   `fallback_from` when another driver version stands in) and its boot-test verdict.

ROOT is the host's file system as this process sees it (/host in the driver container); every path
under it is resolved inside it, as a chroot would (cudabuild/host/root.py: on Debian /var/run is a link
to /run). Paths in the spec are written as the host sees them (--cdi-host-root, / by default)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cudabuild.artifact import MANIFEST, Artifact
from cudabuild.cdi import spec as cdi
from cudabuild.host import devices
from cudabuild.install import upgrade
from cudabuild.install.installed import changed_files, place_of, restore_loader
from cudabuild.host.layout import DRIVER_DIR, INSTALL_LOCK, READY_FILE
from cudabuild.host.loader import run_loader
from cudabuild.host.root import HostPathError, HostRoot
from cudabuild.ui import Reporter



@dataclass
class Installed:
    driver_version: str
    driver_dir: str  # as the host sees it
    spec: str
    ready: str
    gpus: list[dict] = field(default_factory=list)
    loaded: list[str] = field(default_factory=list)
    files_changed: bool = False
    spec_changed: bool = False
    upgraded_from: str | None = None  # the driver version it replaced
    drained: list[str] = field(default_factory=list)  # containers stopped for the change and started again

    @property
    def changed(self) -> bool:
        return self.files_changed or self.spec_changed or bool(self.loaded)

    def to_json(self) -> dict:
        return {"driver_version": self.driver_version, "driver_dir": self.driver_dir, "cdi_spec": self.spec,
                "ready": self.ready, "gpus": self.gpus, "loaded": self.loaded, "files_changed": self.files_changed,
                "spec_changed": self.spec_changed, "changed": self.changed, "upgraded_from": self.upgraded_from,
                "drained": self.drained}

    def text(self) -> str:
        what = "installed" if self.changed else "already installed: nothing changed"
        if self.upgraded_from:
            what = f"installed, replacing {self.upgraded_from}"
        lines = [f"NVIDIA {self.driver_version} {what}"]
        if self.drained:
            lines.append(f"  drained:   {', '.join(self.drained)} (stopped, then started again)")
        lines += [f"  driver:    {self.driver_dir}" + (" (copied)" if self.files_changed else ""),
                  f"  loaded:    {', '.join(self.loaded) or 'nothing (already loaded)'}",
                  "  GPUs:      " + (", ".join(f"{g['index']} {g['uuid']}" for g in self.gpus) or "none"),
                  f"  CDI spec:  {self.spec}" + (" (written)" if self.spec_changed else " (unchanged)"),
                  f"  ready:     {self.ready}",
                  "  use it:    podman run --device nvidia.com/gpu=all IMAGE | cudabuild run --gpus all IMAGE"]
        return "\n".join(lines)


def put_driver(checked: Artifact, target: Path, *, note=None) -> bool:
    """The driver files in `target` (a resolved path whose parent exists), checked file by file
    against the artifact's manifest; False when they were there already, unchanged. A copy that
    changed since it was installed is replaced (and `note` told what changed)."""
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise HostPathError(f"{target} is not a directory that cudabuild made (it is a "
                            f"{'symbolic link' if target.is_symlink() else 'file'})",
                            hint="remove it; cudabuild installs the driver there")
    changed = changed_files(target, checked)
    if changed == []:
        restored = restore_loader(target, checked.manifest)
        if restored and note:
            note(f"the installed loader changed since it was installed ({', '.join(restored)}); written again")
        return bool(restored)
    if changed and note:
        note(f"the installed copy changed since it was installed ({', '.join(changed[:5])}"
             f"{', ...' if len(changed) > 5 else ''}); installing it again from the verified artifact")
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
    try:
        checked.copy_to(lambda rel: place_of(staging, rel))
        for part in ("lib", "bin", "modules"):
            (staging / part).mkdir(exist_ok=True)
        restore_loader(staging, checked.manifest)
        shutil.copy2(checked.root / MANIFEST, staging / MANIFEST)  # last: it marks the copy whole
        os.chmod(staging, 0o755)
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        if target.exists():
            os.rename(target, old / "driver")  # into a directory made here: nothing else is removed
        os.rename(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return True


def install(checked: Artifact, *, host: HostRoot, host_root: str, env: Mapping[str, str], reporter: Reporter,
            origin: Mapping[str, object] | None = None, policy: upgrade.Policy = upgrade.Policy()) -> Installed:
    """`origin`: where a node found this build (staging.Found.to_json), written into the ready file.
    Another version loaded is replaced (install/upgrade.py: refused while the GPU is held, unless
    `policy` drains; rolled back when the new modules do not load)."""
    version = checked.manifest.driver_version
    with host.lock(INSTALL_LOCK, waiting=lambda: reporter.note("waiting for another install")):
        target = host.owned_path(DRIVER_DIR, create=True) / version
        old = devices.loaded_version(host)

        def put() -> bool:
            with reporter.step(f"driver files in {host.host_path(target, host_root)}"):
                try:
                    return put_driver(checked, target, note=reporter.note)
                except OSError as exc:  # a read-only or full file system, a file where a directory belongs
                    raise host.error(f"{DRIVER_DIR}/{version}", exc) from exc

        def load_and_finish(files_changed: bool) -> Installed:
            with reporter.step("load the modules and make the device nodes (the image loader)"):
                loaded = run_loader(target, host=host, env=env)
            return _finish(checked, host, host_root=host_root, target=target, loaded=loaded,
                           files_changed=files_changed, origin=origin)

        if old is None or old == version:
            return load_and_finish(put())
        with upgrade.swapping(host, old=old, new=version, target=target, env=env, policy=policy, reporter=reporter,
                              prepare=put, new_modules=checked.manifest) as swap:
            result = load_and_finish(swap.files_changed)
        result.upgraded_from, result.drained = old, list(swap.drained.names.values())
        return result


def _finish(checked: Artifact, host: HostRoot, *, host_root: str, target: Path, loaded: list[str],
            files_changed: bool, origin: Mapping[str, object] | None) -> Installed:
    """The CDI spec of what is loaded, then the ready file."""
    version = checked.manifest.driver_version
    spec, spec_changed = cdi.write(cdi.of_version(host, version, host_root=host_root), host)
    m = checked.manifest
    state = {"kernel": m.kernel_release, "driver": version, "flavor": m.flavor, "source": "artifact", "ref": None,
             "fallback_from": None, "boot_test": m.boot_summary, **(origin or {}),
             "driver_version": version, "cdi_spec": host.host_path(spec, host_root)}
    text = json.dumps(state) + "\n"
    ready, _ = host.write_atomic(READY_FILE, text.encode())
    return Installed(driver_version=version, driver_dir=host.host_path(target, host_root),
                     spec=host.host_path(spec, host_root), ready=host.host_path(ready, host_root),
                     gpus=[{"index": g.index, "minor": g.minor, "uuid": g.uuid} for g in devices.gpus(host)],
                     loaded=loaded, files_changed=files_changed, spec_changed=spec_changed)


def not_ready(host: HostRoot) -> None:
    """Remove the readiness file (the driver container stops)."""
    host.remove_owned(READY_FILE)
