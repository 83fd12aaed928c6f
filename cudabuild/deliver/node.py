"""A node's driver across kernel updates: the commands `install --registry` (the kernel-agnostic
driver container), `stage`, `ready`, `status`, and Debian's kernel hook.

- The driver container finds the running kernel's verified build (deliver/staging.py: staged,
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
from pathlib import Path

from cudabuild.deliver import kernels, staging
from cudabuild.deliver.install import Installed, install
from cudabuild.deliver.layout import READY_FILE
from cudabuild.deliver.staging import Found, NodeConfig
from cudabuild.errors import InputError, NoBuildError, RegistryError
from cudabuild.hostfs import HostRoot
from cudabuild.ui import Reporter

HOOK = "etc/kernel/postinst.d/cudabuild"
FIRST_RETRY = 5.0  # seconds before the first retry when no build exists; doubled up to --poll


def resolve_kernel(choice: str | None, host: HostRoot, running: str) -> str:
    """--kernel: a release, `next` (the kernel the host boots next; the running one when none is
    newer), or None (the running one)."""
    if choice in (None, "", "running"):
        return running
    if choice == "next":
        return kernels.next_kernel(host, running) or running
    from cudabuild.options import validate_release

    return validate_release(choice, what="--kernel")


def config_for(host: HostRoot, *, driver: str | None, registry: str | None, fallback: bool | None) -> NodeConfig:
    """The node's configuration: the flags given, else what the node was configured with."""
    saved = NodeConfig.load(host)
    driver = driver or (saved.driver if saved else None)
    return NodeConfig(driver=driver, registry=registry if registry is not None else (saved.registry if saved else None),
                      fallback=fallback if fallback is not None else (saved.fallback if saved else True))


def stage_kernel(host: HostRoot, release: str, config: NodeConfig, *, running: str, registry,
                 reporter: Reporter) -> Found:
    """The verified build for `release` staged on the node (the configured driver only: a kernel not
    yet booted waits for its own build), and the builds of kernels no longer installed removed."""
    found = staging.find_build(host, release, config, registry=registry, reporter=reporter, allow_fallback=False)
    removed = staging.prune(host, kernels.installed(host) | {release, running})
    for gone in removed:
        reporter.note(f"removed the staged build of {gone}: that kernel is no longer installed")
    if found is None:
        raise NoBuildError(staging.missing(release, config, host) + " (not fallen back: a kernel that is not "
                           "running yet waits for its own build)", hint=staging.build_it(release, config))
    return found


def readiness(host: HostRoot, release: str, config: NodeConfig) -> dict:
    """Whether the build for `release` of the configured driver is staged, whole, and not rejected
    by its boot test; what is missing otherwise."""
    builds = [b for b in staging.staged(host, release) if config.wants(b.manifest.driver_version)]
    usable = [b for b in builds if not staging.boot_rejected(b)]
    answer = {"kernel": release, "driver": config.shown_driver, "ready": bool(usable),
              "staged": [_describe(b) for b in builds]}
    if not usable:
        answer["missing"] = (f"the boot test rejected every staged build for kernel {release} and driver "
                             f"{config.shown_driver}" if builds else
                             f"no verified build for kernel {release} and driver {config.shown_driver} is staged in "
                             f"{host.root / staging.STAGED / release}")
        answer["fix"] = f"cudabuild stage --kernel {release} --registry {config.registry or 'REPO'}"
    return answer


def _describe(build) -> dict:
    m = build.manifest
    return {"driver": m.driver_version, "flavor": m.flavor, "modules": [e.name for e in m.modules],
            "boot_test": m.boot_summary, "path": str(build.root)}


def status(host: HostRoot, running: str) -> dict:
    try:
        ready = json.loads(host.read_text(READY_FILE))
    except (InputError, ValueError):
        ready = None
    config = NodeConfig.load(host)
    upcoming = kernels.next_kernel(host, running)
    return {"running_kernel": running, "next_kernel": upcoming, "ready": ready is not None, "driver": ready,
            "config": config.to_json() if config else None,
            "staged": {release: [_describe(b) for b in staging.staged(host, release)]
                       for release in staging.staged_releases(host)}}


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
            installed = install(found.artifact, root=host.given, host_root=host_root, env=env, reporter=reporter,
                                origin=found.to_json(), **({"policy": policy} if policy else {}))
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
        _stage_ahead(host, config, running=running, registry=registry, reporter=reporter, poll=poll, stop=stop)
    return installed


def _stage_ahead(host: HostRoot, config: NodeConfig, *, running: str, registry, reporter: Reporter, poll: float,
                 stop: threading.Event) -> None:
    """Every `poll` s until `stop`: when the host has a newer kernel installed, stage its build."""
    told: set[str] = set()
    while not stop.is_set():
        upcoming = kernels.next_kernel(host, running)
        if upcoming and not readiness(host, upcoming, config)["ready"]:
            try:
                found = stage_kernel(host, upcoming, config, running=running, registry=registry, reporter=reporter)
                reporter.note(f"staged {found.artifact.manifest.driver_version} for the next kernel {upcoming} "
                              f"(from {found.source})")
                told.discard(upcoming)
            except (NoBuildError, RegistryError) as exc:
                if upcoming not in told:
                    reporter.warn(f"the next kernel {upcoming} is not ready: {exc.message}")
                    told.add(upcoming)
        stop.wait(poll)


def hook_script(host_root: str) -> str:
    """Debian's kernel hook (run-parts: $1 the release, $2 the image): stage the new kernel's build,
    or fail the package's configuration step naming the kernel and the registry."""
    return f"""#!/bin/sh
# cudabuild: stage the verified NVIDIA modules for a kernel when its package is installed
# (run by run-parts from /etc/kernel/postinst.d with the release and the image path). A
# non-zero exit fails the kernel package's configuration step: the kernel has no driver yet.
set -e
release="$1"
[ -n "$release" ] || {{ echo "cudabuild hook: no kernel release given" >&2; exit 2; }}
command -v "${{CUDABUILD:-cudabuild}}" >/dev/null 2>&1 || {{
    echo "cudabuild hook: cudabuild is not on PATH, so kernel $release cannot be staged; install it (pip install cudabuild) or set CUDABUILD" >&2
    exit 1
}}
exec "${{CUDABUILD:-cudabuild}}" stage --kernel "$release" --root {_quote(host_root)}
"""


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def write_hook(host: HostRoot, host_root: str) -> Path:
    path, _ = host.write_atomic(HOOK, hook_script(host_root).encode(), mode=0o755)
    return path
