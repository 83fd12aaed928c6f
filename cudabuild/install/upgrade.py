"""Changing the driver on a running host: who holds the GPU, draining the containers that hold it,
swapping the modules, rolling back when the new ones do not load, and uninstalling.

The rule: a host is never left with no driver because a change failed. The old driver's modules
are unloaded only when nothing holds the GPU (else the change is refused, naming every holder, or
with --drain the containers among them are stopped through the engine and started again after);
when the new modules do not load, what loaded of them is unloaded, the old driver is loaded again
from its installed copy, and its CDI spec and ready file are put back."""

from __future__ import annotations

import os
import re
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cudabuild.cdi import spec as cdi
from cudabuild.host import holders
from cudabuild.host.holders import Held, Holder
from cudabuild.install.installed import verify_installed
from cudabuild.host.layout import DRIVER_DIR, INSTALL_LOCK, READY, READY_FILE, driver_dir
from cudabuild.host import devices
from cudabuild.host.loader import UnloadError, refuse_half_substituted, run_loader, unload
from cudabuild.errors import CudabuildError, EngineError, HeldError, LoaderError, RolledBackError
from cudabuild.host.root import HostPathError, HostRoot
from cudabuild.nvidia import FULL_DRIVER_RE
from cudabuild.ui import Reporter

if TYPE_CHECKING:
    from cudabuild.artifact import Manifest

STOP_GRACE = 10  # seconds a drained container has between SIGTERM and SIGKILL (docker stop's default)
RELEASE_POLL = 0.2


def who_holds(host: HostRoot, engine: Callable[[], object] | None, reporter: Reporter | None = None) -> list[Holder]:
    """The holders of the GPU under `root`, their containers named through the engine when one
    answers (`engine()` makes it; a holder's container stays unnamed when none does)."""
    found = holders.scan(host)
    if engine is None or not any(h.in_container for h in found):
        return found
    try:
        return holders.named(found, engine().inspect_container)
    except EngineError as exc:
        if reporter:
            reporter.note(f"containers not named: {exc.message}")
        return found


@dataclass(frozen=True)
class Policy:
    """What an install may do to a driver of another version that is loaded (install's flags)."""

    drain: bool = False  # stop the containers that hold the GPU, start them again after
    drain_timeout: float = 60.0  # seconds to wait for the devices to be released
    restart: bool = True  # start the drained containers again (--no-restart: leave them stopped)
    engine: Callable[[], object] | None = None  # the engine (made at first use)


@dataclass
class Drained:
    """The containers stopped for a change of driver, to be started again."""

    engine: object | None = None
    containers: list[str] = field(default_factory=list)  # ids
    names: dict[str, str] = field(default_factory=dict)

    def restart(self, reporter: Reporter) -> list[str]:
        """Start them again; the ones that would not start are said (the change itself stands)."""
        started = []
        for cid in self.containers:
            name = self.names.get(cid, cid[:12])
            try:
                self.engine.start_container(cid)
                started.append(name)
            except EngineError as exc:
                reporter.warn(f"container {name} was stopped for the driver change and does not start again: "
                              f"{exc.message}; recreate it (a container made with the old driver's library paths "
                              "needs them)")
        self.containers = []
        return started


def refuse_held(held: Held, *, doing: str, drain_possible: bool) -> HeldError:
    hint = "stop them and run again"
    if drain_possible:
        hint += (", or pass --drain to stop the containers among them and start them again afterwards"
                 if not held.outside else "; --drain stops only containers the engine runs, never a process "
                                          "outside one")
    return HeldError(f"{doing}: the GPU is in use by {len(held.holders)} process"
                     f"{'es' if len(held.holders) != 1 else ''}: {held.lines()}", hint=hint)


def drain(host: HostRoot, held: Held, policy: Policy, reporter: Reporter) -> Drained:
    """Stop the containers that hold the GPU and wait until nothing holds it (the kernel closes a
    process's files when it ends); on a timeout they are started again and HeldError says what
    still holds it."""
    engine = policy.engine()
    drained = Drained(engine=engine)
    try:
        for h in held.holders:
            if h.container_id in drained.containers:
                continue
            name = h.container or h.container_id[:12]
            reporter.note(f"draining: stopping container {name} (pid {h.pid} holds {h.holds[0]})")
            engine.stop_container(h.container_id, timeout=STOP_GRACE)
            drained.containers.append(h.container_id)
            drained.names[h.container_id] = name
        deadline = time.monotonic() + policy.drain_timeout
        while True:
            left = holders.scan(host)
            if not left:
                return drained
            if time.monotonic() > deadline:
                raise refuse_held(Held(holders.named(left, engine.inspect_container)),
                                  doing=f"still held {policy.drain_timeout:g} s after draining (--drain-timeout)",
                                  drain_possible=False)
            time.sleep(RELEASE_POLL)
    except BaseException:
        if policy.restart:
            drained.restart(reporter)
        raise


def running_release(host: HostRoot, env: Mapping[str, str]) -> str | None:
    """The running kernel's release: the loader's seam (CUDABUILD_KERNEL_RELEASE), else the root's
    /proc/sys/kernel/osrelease, else this machine's."""
    import platform

    if env.get("CUDABUILD_KERNEL_RELEASE"):
        return env["CUDABUILD_KERNEL_RELEASE"]
    try:
        return host.read_text("proc/sys/kernel/osrelease", limit=4096).strip() or None
    except HostPathError:
        return platform.release()


def refuse_other_kernel(host: HostRoot, manifest: "Manifest", env: Mapping[str, str], *, doing: str) -> None:
    """Before anything is unloaded: modules built for another kernel than the running one would not
    load, and the working driver would have been unloaded for nothing."""
    running = running_release(host, env)
    if running and manifest.kernel_release != running:
        raise LoaderError(f"{doing}, but its modules are built for kernel {manifest.kernel_release} (vermagic "
                          f"{manifest.vermagic.split()[0]}) and this host runs {running}: nothing was unloaded",
                          exit_code=11, hint=f"install the build for {running}: cudabuild modules --kernel {running}")


def refuse_module_users(host: HostRoot, *, doing: str) -> None:
    """HeldError when kernel modules that are not the driver's own use it (nvidia_fs of GPUDirect
    Storage, a vendor's module): the kernel would refuse to unload nvidia half-way through."""
    ours = {m.replace("-", "_") for m in (*devices.facts().load_order, *devices.facts().optional_modules)}
    users = sorted({name for module in ours for name in host.listdir(f"sys/module/{module}/holders")} - ours)
    if users:
        raise HeldError(f"{doing}: the kernel module{'s' if len(users) > 1 else ''} {', '.join(users)} use"
                        f"{'' if len(users) > 1 else 's'} nvidia, and cudabuild did not load "
                        f"{'them' if len(users) > 1 else 'it'}",
                        hint=f"stop what uses {'them' if len(users) > 1 else 'it'} and unload "
                             f"{'them' if len(users) > 1 else 'it'} (rmmod {' '.join(users)}), then run again")


def installed_by_us(host: HostRoot, version: str) -> Path | None:
    """The installed copy of `version` whose loader can load it again (a directory cudabuild made,
    reached through no link, with its manifest), None when there is none."""
    entries = dict(host.owned_entries(DRIVER_DIR))
    st = entries.get(version)
    if st is None or not stat.S_ISDIR(st.st_mode):
        return None  # a link there is not cudabuild's copy: never loaded, never removed
    place = host.owned_path(driver_dir(version))
    return place if (place / "manifest.json").is_file() else None


@dataclass
class Swap:
    drained: Drained
    files_changed: bool


@contextmanager
def swapping(host: HostRoot, *, old: str, new: str, target: Path, env: Mapping[str, str], policy: Policy,
             reporter: Reporter, prepare: Callable[[], bool], new_modules: "Manifest") -> Iterator[Swap]:
    """Replace the loaded driver `old` by `new`: the holders checked (refused, or drained), then
    `prepare()` puts the new driver's files at `target` (whether they changed), then the old
    modules are unloaded; the block loads the new ones and writes the spec and ready file. If the
    block fails, the old driver is loaded again, with its spec and ready file, and RolledBackError
    says so. Drained containers start again at the end (unless the policy says not to)."""
    doing = f"NVIDIA {old} is loaded and {new} would replace it"
    old_dir = installed_by_us(host, old)
    if old_dir is None:
        raise LoaderError(f"{doing}, but {old} was not installed by cudabuild (no {host.show(driver_dir(old))}): it "
                          f"could not be loaded again if {new} failed to load, so it is left as it is",
                          exit_code=13, hint="unload it when nothing uses the GPU (rmmod nvidia_drm nvidia_modeset "
                                             "nvidia_uvm nvidia), then run cudabuild install again")
    refuse_half_substituted(env)
    refuse_module_users(host, doing=doing)
    refuse_other_kernel(host, new_modules, env, doing=doing)
    held = Held(who_holds(host, policy.engine, reporter))
    drained = Drained()
    if held.holders:
        if not policy.drain or held.outside:
            raise refuse_held(held, doing=doing, drain_possible=True)
        drained = drain(host, held, policy, reporter)
    try:
        files_changed = prepare()
        saved_spec, saved_ready = cdi.on_disk(host), _read(host, READY_FILE)
        host.remove_file(READY_FILE)  # not ready while the driver changes
        try:
            unloaded = unload(host, env)
        except UnloadError as exc:
            _load_again(host, old, old_dir, env, saved_spec, saved_ready, reporter)
            host.remove_owned(driver_dir(new))
            raise RolledBackError(f"{doing}, but {exc.message}; NVIDIA {old} is loaded again and nothing changed",
                                  hint="stop what uses the GPU (cudabuild holders), then run again") from exc
        reporter.note(f"unloaded NVIDIA {old}: {', '.join(unloaded)}")
        try:
            yield Swap(drained=drained, files_changed=files_changed)
        except Exception as exc:  # noqa: BLE001 - whatever stopped the new driver, the old one comes back
            _load_again(host, old, old_dir, env, saved_spec, saved_ready, reporter)
            host.remove_owned(driver_dir(new))
            why = exc.message if isinstance(exc, CudabuildError) else str(exc)
            raise RolledBackError(f"NVIDIA {new} did not load ({why}); rolled back: NVIDIA {old} is loaded "
                                  f"again, with its CDI spec and ready file",
                                  hint=f"the host keeps working on {old}; see why {new} did not load (dmesg | tail), "
                                       "then run the install again") from exc
        host.remove_owned(driver_dir(old))  # the old userspace: its libraries match no loaded driver now
    finally:
        if drained.containers:
            if policy.restart:
                started = drained.restart(reporter)
                if started:
                    reporter.note(f"started again: {', '.join(started)}")
            else:
                reporter.note(f"left stopped (--no-restart): {', '.join(drained.names.values())}")


def _load_again(host: HostRoot, old: str, old_dir: Path, env: Mapping[str, str], spec: bytes | None,
                ready: bytes | None, reporter: Reporter) -> None:
    """The old driver back: what loaded of the new one unloaded, then the old loaded from its
    installed copy (its loader loads what is missing of it, when its unloading stopped half-way),
    its spec and ready file as they were."""
    try:
        verify_installed(old_dir)  # what runs and loads is what was installed, checked first
        if devices.loaded_version(host) not in (None, old):
            unload(host, env)
        run_loader(old_dir, host=host, env=env)
    except CudabuildError as exc:
        raise LoaderError(f"rolling back failed too: {exc.message}; no NVIDIA driver may be loaded now",
                          exit_code=exc.exit_code if isinstance(exc, LoaderError) else 14,
                          hint=f"load it by hand: sh {old_dir}/loader.sh true") from exc
    cdi.put_back(host, spec)
    if ready is not None:
        host.write_atomic(READY_FILE, ready)
    reporter.warn(f"rolled back to the driver in {old_dir}")


def _read(host: HostRoot, rel: str) -> bytes | None:
    try:
        return host.read_bytes(rel)
    except HostPathError:
        return None


# ---- uninstall --------------------------------------------------------------------------------------
@dataclass
class Uninstalled:
    driver_version: str | None
    unloaded: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)  # as the host sees them, in the order removed
    left_loaded: bool = False  # a driver cudabuild did not install stays

    def to_json(self) -> dict:
        return {"driver_version": self.driver_version, "unloaded": self.unloaded, "removed": self.removed,
                "left_loaded": self.left_loaded}


def uninstall(host: HostRoot, *, host_root: str, env: Mapping[str, str], engine: Callable[[], object] | None,
              reporter: Reporter) -> Uninstalled:
    """Remove what `install` put on the host, in the safe order: refused while anything holds the
    GPU; the CDI spec first (no new container gets the GPU), then the modules unloaded (a driver
    cudabuild did not install is left loaded), the device nodes, the userspace directories, and the
    ready file last."""
    from cudabuild.host import devices

    with host.lock(INSTALL_LOCK, waiting=lambda: reporter.note("waiting for another install")):
        host.owned_entries(DRIVER_DIR)  # a link where the drivers are is refused before anything changes
        version = devices.loaded_version(host)
        doing = f"NVIDIA {version or '(not loaded)'} cannot be uninstalled now"
        refuse_half_substituted(env)
        refuse_module_users(host, doing=doing)
        held = Held(who_holds(host, engine, reporter))
        if held.holders:
            raise refuse_held(held, doing=doing, drain_possible=False)
        done = Uninstalled(driver_version=version)
        saved = cdi.on_disk(host)
        if saved is not None:
            host.remove_file(cdi.SPEC)
            done.removed.append(host.host_path(host.resolve(cdi.SPEC), host_root))
        ours = installed_by_us(host, version) if version else None
        if version and ours is None:
            done.left_loaded = True
            reporter.warn(f"NVIDIA {version} is loaded but was not installed by cudabuild: it stays loaded")
        elif version:
            try:
                done.unloaded = unload(host, env)
            except UnloadError as exc:
                verify_installed(ours)
                run_loader(ours, host=host, env=env)
                cdi.put_back(host, saved)
                raise LoaderError(f"uninstalling NVIDIA {version}: {exc.message}; it is loaded again, with its "
                                  "CDI spec", exit_code=exc.exit_code, hint=exc.hint) from exc
            done.removed += [host.host_path(host.resolve("dev") / name, host_root) for name in remove_nodes(host)]
        for name, st in host.owned_entries(DRIVER_DIR):
            if name == READY or not (FULL_DRIVER_RE.fullmatch(name) or name.startswith(".")):
                continue  # not a driver cudabuild installed (a link is refused in remove_owned)
            if stat.S_ISLNK(st.st_mode):
                reporter.warn(f"left alone: {host.show(f'{DRIVER_DIR}/{name}')} is a symbolic link, not a driver "
                              "cudabuild installed")
                continue
            if host.remove_owned(f"{DRIVER_DIR}/{name}") and not name.startswith("."):
                done.removed.append(host.host_path(host.owned_path(DRIVER_DIR) / name, host_root))
        if host.remove_owned(READY_FILE):
            done.removed.append(host.host_path(host.owned_path(DRIVER_DIR) / READY, host_root))
        return done


_NODE_RE = re.compile(r"nvidia(?:[0-9]{1,3}|ctl|-uvm|-uvm-tools|-modeset)")


def remove_nodes(host: HostRoot) -> list[str]:
    """Remove the device nodes the loader made: names it makes that are themselves character
    devices (lstat: a link named nvidia8 is never followed; nvidia-caps/ and the like are left)."""
    try:
        with host.directory("dev") as fd:
            removed = []
            for name in sorted(os.listdir(fd)):
                try:
                    if _NODE_RE.fullmatch(name) and \
                            stat.S_ISCHR(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                        os.unlink(name, dir_fd=fd)
                        removed.append(name)
                except OSError:
                    continue
            return removed
    except HostPathError:
        return []
