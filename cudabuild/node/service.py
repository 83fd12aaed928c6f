"""A node's driver across kernel updates: the commands `install --registry` (the kernel-agnostic
driver container), `stage`, `ready`, `status`, and Debian's kernel hook.

- The driver container finds the running kernel's verified build (node/staging.py: staged,
  the registry, the fallback), installs it as `cudabuild install` does, and, with --wait, stays:
  it retries with backoff while no build exists (not ready, saying which kernel and driver it
  waits for and where it looked), and stages the kernel the host boots next whenever one appears,
  so that a node is ready for its reboot before the reboot is asked for.
- `ready` is the reboot gate: exit 0 only when the next kernel's build of the configured driver is
  staged, whole and not rejected by its boot test.
- `status` says the node's driver state: the ready file, the kernels, what is staged."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path, PurePosixPath

from cudabuild.host import kernels
from cudabuild.node import staging
from cudabuild.install.install import Installed, install
from cudabuild.host.layout import READY_FILE
from cudabuild.node.config import NodeConfig
from cudabuild.node.staging import Found
from cudabuild.errors import CudabuildError, InputError, NoBuildError, RegistryError
from cudabuild.host.root import HostRoot
from cudabuild.ui import Reporter

HOOK = "etc/kernel/postinst.d/cudabuild"
FIRST_RETRY = 5.0  # seconds before the first retry when no build exists; doubled up to --poll


def resolve_kernel(choice: str | None, host: HostRoot, running: str) -> str:
    """--kernel: a release, `next` (the kernel the host boots next; the running one when none other
    is: kernels.next_kernel, which refuses with exit 23 when that cannot be told), or None (the
    running one)."""
    if choice in (None, "", "running"):
        return running
    if choice == "next":
        return kernels.next_kernel(host, running) or running
    from cudabuild.options import validate_release

    return validate_release(choice, what="--kernel")


def config_for(host: HostRoot, *, driver: str | None, registry: str | None, fallback: bool | None,
               flavor: str | None = None, verify_key: str | None = None) -> NodeConfig:
    """The node's configuration: the flags given, else what the node was configured with. A node
    configured for any driver keeps the exact one it installed (a reboot does not change the driver
    unasked: `ready`, `stage` and `install` answer for it); --driver changes it. A verification key
    (PEM text), once given, stays the node's policy."""
    saved = NodeConfig.load(host)
    if driver and saved and saved.driver != driver:
        saved = replace(saved, installed=None)  # another driver asked for: the last installed says nothing of it
    return NodeConfig(driver=driver or (saved.driver if saved else None),
                      registry=registry if registry is not None else (saved.registry if saved else None),
                      fallback=fallback if fallback is not None else (saved.fallback if saved else True),
                      flavor=flavor or (saved.flavor if saved else None),
                      installed=saved.installed if saved else None,
                      verify_key=verify_key or (saved.verify_key if saved else None)).kept()


def stage_kernel(host: HostRoot, release: str, config: NodeConfig, *, running: str, registry,
                 reporter: Reporter) -> Found:
    """The verified build for `release` staged on the node (the configured driver only: a kernel not
    yet booted waits for its own build), and the builds of kernels no longer installed removed
    (only when every installed kernel is known: a kernel that cannot be read keeps its builds)."""
    found = staging.find_build(host, release, config, registry=registry, reporter=reporter, allow_fallback=False)
    state = kernels.boot_state(host)
    if state.complete and state.releases:
        removed = staging.prune(host, state.releases | {release, running}, reporter=reporter)
        for gone in removed:
            reporter.note(f"removed the staged build of {gone}: that kernel is no longer installed")
    else:
        reporter.note("nothing staged was pruned: " + (state.problems() or "no installed kernel was found"))
    if found is None:
        raise NoBuildError(staging.missing(release, config, host) + " (not fallen back: a kernel that is not "
                           "running yet waits for its own build)", hint=staging.build_it(release, config))
    return found


def readiness(host: HostRoot, release: str, config: NodeConfig) -> dict:
    """Whether the build for `release` of the configured driver and flavour is staged, whole, passes
    what `stage` checks with what the host has now (its Module.symvers), and no boot test rejected
    it for this node's configuration; what is missing otherwise."""
    builds = [b for b in staging.staged(host, release) if config.wants_build(b)]
    enforcing = staging.node_enforces(host)
    checked, refused = [], []
    for b in builds:
        verdict = staging.boot_verdict(b, enforcing=enforcing)
        why = staging.refusal(host, b, release) or (staging.rejection(verdict) if verdict else None)
        if why is None:
            checked.append(b)
        else:
            refused.append(f"{b.root.name}: {why}")
    wanted = config.described
    answer = {"kernel": release, "driver": wanted, "ready": bool(checked),
              "staged": [_describe(b) for b in builds]}
    if not checked:
        answer["missing"] = (f"no staged build for kernel {release} and driver {wanted} passes its check now: "
                             + "; ".join(refused) if refused else
                             f"no verified build for kernel {release} and driver {wanted} is staged in "
                             f"{host.root / staging.STAGED / release}")
        answer["fix"] = f"cudabuild stage --kernel {release} --registry {config.registry or 'REPO'}"
    return answer


def _describe(build) -> dict:
    m = build.manifest
    return {"driver": m.driver_version, "flavor": m.flavor, "modules": [e.name for e in m.modules],
            "boot_test": m.boot_summary, "path": str(build.root)}


def status(host: HostRoot, running: str) -> dict:
    """The node's state; what cannot be read is said in `problems`, never a traceback."""
    problems = []
    ready = None
    try:
        if host.exists(READY_FILE):
            ready = json.loads(host.read_text(READY_FILE))
            if not isinstance(ready, dict):
                problems.append(f"{host.show(READY_FILE)} is a JSON {type(ready).__name__}, not the driver's state")
                ready = None
    except InputError as exc:
        problems.append(exc.message)
    except (ValueError, RecursionError):
        problems.append(f"{host.show(READY_FILE)} is not JSON")
    try:
        config = NodeConfig.load(host)
    except InputError as exc:
        problems.append(exc.message)
        config = None
    try:
        upcoming = kernels.next_kernel(host, running)
    except kernels.NextKernelUnknown as exc:
        problems.append(exc.message)
        upcoming = "unknown"
    try:
        staged = {release: [_describe(b) for b in staging.staged(host, release)]
                  for release in staging.staged_releases(host)}
    except InputError as exc:
        problems.append(exc.message)
        staged = {}
    return {"running_kernel": running, "next_kernel": upcoming, "ready": ready is not None, "driver": ready,
            "config": config.to_json() if config else None, "staged": staged, "problems": problems}


def serve(host: HostRoot, config: NodeConfig, *, running: str, registry, host_root: str, env: Mapping[str, str],
          reporter: Reporter, wait: bool, poll: float, stop: threading.Event, policy=None,
          installed_then: Callable[[Installed], None] = lambda result: None) -> Installed | None:
    """The kernel-agnostic driver container: find the running kernel's build, install it; with
    `wait`, retry with backoff until one exists, then (after `installed_then(result)`) keep staging
    the next kernel every `poll` s until `stop`. Without `wait`, NoBuildError when there is none."""
    config.save(host)
    delay, installed = FIRST_RETRY, None
    while not stop.is_set():
        try:
            found = staging.find_build(host, running, config, registry=registry, reporter=reporter)
        except RegistryError as exc:
            if not wait:
                raise
            reporter.warn(f"{exc.message}; looking again in {delay:.0f} s")
            found = None
        if found is not None:
            if found.fallback_from:
                reporter.warn(f"FALLBACK: no verified build of driver {found.fallback_from} for kernel {running}; "
                              f"installing {found.artifact.manifest.driver_version} instead (from {found.source})")
            installed = install(found.artifact, host=host, host_root=host_root, env=env, reporter=reporter,
                                origin=found.to_json(), **({"policy": policy} if policy else {}))
            m = found.artifact.manifest
            config = replace(config, installed=m.driver_version, flavor=config.flavor or m.flavor)
            config.save(host)  # `ready` answers for this driver and flavour
            break
        if not wait:
            raise NoBuildError(staging.missing(running, config, host),
                               hint=f"{staging.build_it(running, config)}, or run with --wait")
        reporter.warn(f"not ready: waiting for a verified build of kernel {running} and driver {config.shown_driver} "
                      f"(looked in {staging.where_looked(host, running, config)}); looking again in {delay:.0f} s")
        stop.wait(delay)
        delay = min(delay * 2, max(poll, FIRST_RETRY))
    if installed is not None and wait:
        installed_then(installed)
        _stage_ahead(host, config.kept(), running=running, registry=registry, reporter=reporter, poll=poll,
                     stop=stop)  # the next kernel gets the driver just installed, as `ready` asks of it
    return installed


def _stage_ahead(host: HostRoot, config: NodeConfig, *, running: str, registry, reporter: Reporter, poll: float,
                 stop: threading.Event) -> None:
    """Every `poll` s until `stop`: when the host has a newer kernel installed, stage its build."""
    told: set[str] = set()
    while not stop.is_set():
        upcoming = None
        try:
            upcoming = kernels.next_kernel(host, running)
            if upcoming and not readiness(host, upcoming, config)["ready"]:
                found = stage_kernel(host, upcoming, config, running=running, registry=registry, reporter=reporter)
                reporter.note(f"staged {found.artifact.manifest.driver_version} for the next kernel {upcoming} "
                              f"(from {found.source})")
                told.discard(upcoming)
        except CudabuildError as exc:  # said once per kernel; the driver stays served
            if str(upcoming) not in told:
                reporter.warn(f"the next kernel{f' {upcoming}' if upcoming else ''} is not ready: {exc.message}")
                told.add(str(upcoming))
        stop.wait(poll)


def hook_script(cudabuild: str, host_root: str) -> str:
    """Debian's kernel hook (run-parts: $1 the release, $2 the image): stage the new kernel's build
    with the cudabuild at the absolute path `cudabuild`. It always exits 0: run-parts
    --exit-on-error stops at the first failing hook, and the hooks after it (dkms, initramfs-tools,
    zz-update-grub) would not run, leaving the new kernel without an initramfs or a boot entry.
    What it could not do is said on stderr; `cudabuild ready` holds the reboot until it is done."""
    return f"""#!/bin/sh
# cudabuild: stage the verified NVIDIA modules for a kernel when its package is installed (run by
# run-parts from /etc/kernel/postinst.d with the release and the image path). It never fails the
# kernel's installation: what it cannot do is said here, and `cudabuild ready --kernel next` holds
# the reboot until the kernel's build is staged.
release="$1"
cudabuild={_quote(cudabuild)}
if [ -z "$release" ]; then
    echo "cudabuild hook: no kernel release given; nothing staged" >&2
    exit 0
fi
if [ ! -x "$cudabuild" ]; then
    echo "cudabuild hook: $cudabuild is not there, so kernel $release was not staged; reinstall cudabuild, then run: cudabuild stage --kernel $release" >&2
    exit 0
fi
"$cudabuild" stage --kernel "$release" --root {_quote(host_root)} || \
    echo "cudabuild hook: kernel $release was not staged (exit $?); cudabuild ready holds the reboot until: cudabuild stage --kernel $release" >&2
exit 0
"""


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


HOST_PROGRAMS = ("usr/local/bin/cudabuild", "usr/bin/cudabuild", "opt/cudabuild/bin/cudabuild")


def hook_program(host: HostRoot, host_root: str) -> str | None:
    """The cudabuild the host itself runs, by its absolute path as the host sees it (`host_root`:
    where the host's / is, as for the CDI spec), None when the host has none. Run from the host's
    own root, it is this cudabuild; run in the driver container (--root /host), only a cudabuild on
    the host's own file system can be called by its kernel package."""
    import os
    import shutil
    import sys

    if host.root == Path("/"):
        found = shutil.which("cudabuild") or sys.argv[0]
        return os.path.abspath(found) if found and os.path.isabs(found) and os.access(found, os.X_OK) else None
    for place in HOST_PROGRAMS:
        try:
            path = host.resolve(place)
        except InputError:
            continue
        if path.is_file() and os.access(path, os.X_OK):
            return str(PurePosixPath(host_root) / place)
    return None


def write_hook(host: HostRoot, host_root: str, reporter: Reporter) -> Path | None:
    """The kernel hook, calling the host's own cudabuild by its absolute path; none when the host has
    no cudabuild (said: the driver container then stages the next kernel itself while it runs)."""
    program = hook_program(host, host_root)
    if program is None:
        reporter.warn(f"no kernel hook written: the host under {host.root} has no cudabuild to call ("
                      + ", ".join("/" + p for p in HOST_PROGRAMS) + "); the driver container stages the next "
                      "kernel itself while it runs (--wait), and `cudabuild ready --kernel next` gates the reboot")
        return None
    path, _ = host.write_atomic(HOOK, hook_script(program, host_root).encode(), mode=0o755)
    reporter.note(f"kernel hook: {path} (calls {program})")
    return path
