"""The node's commands as library calls: `install` (one build, or the node's own driver for
whatever kernel runs, then, with --wait, the CDI spec kept current until stopped), `stage`, `ready`
(the reboot gate) and `status`. Each result knows its text beside its JSON."""

from __future__ import annotations

import functools
import os
import signal
import threading
from dataclasses import dataclass

from cudabuild.compile.intake import find_modules
from cudabuild.cdi import spec as specs
from cudabuild.errors import InputError, NoBuildError, printable
from cudabuild.host.root import HostRoot
from cudabuild.install import install as installer
from cudabuild.install import upgrade
from cudabuild.node import service as node
from cudabuild.node.config import NodeConfig
from cudabuild.ui import Report


@dataclass(frozen=True)
class InstallRequest:
    host: HostRoot
    cdi_host_root: str = "/"
    modules_ref: str | None = None
    wait: bool = False
    registry: str | None = None
    driver: str | None = None
    fallback: bool | None = None  # False: --no-fallback
    flavor: str | None = None
    poll: float = 300
    kernel_hook: bool = False
    drain: bool = False
    drain_timeout: float = 60
    restart: bool = True
    cdi_interval: float = 30
    verify_key: str | None = None  # a PEM public key file: builds are taken only when signed by it


def node_verify_key(settings, flag: str | None) -> str | None:
    """The PEM text of --verify-key (else CUDABUILD_VERIFY_KEY), checked; None for neither."""
    path = flag or settings.option_values.get("verify_key")
    if not path:
        return None
    from cudabuild.registry.trust import load_verify_key

    return load_verify_key(path)


def install_driver(request: InstallRequest, services, *, then) -> None:
    """Install one build (--modules) or the node's own driver; `then(result)` shows the result as
    soon as the driver is installed. With `wait`, stay until SIGTERM or SIGINT: the node's service
    stages the next kernel, the CDI spec is checked every `cdi_interval` seconds and rewritten when
    stale, and the ready file is removed when stopped."""
    reporter, host = services.reporter, request.host
    if (not request.restart or request.drain_timeout != 60) and not request.drain:
        raise InputError("--no-restart and --drain-timeout go with --drain", hint="add --drain, or leave them out")
    policy = upgrade.Policy(drain=request.drain, drain_timeout=request.drain_timeout, restart=request.restart,
                            engine=services.engine)
    registry = services.settings.registry_repo(request.registry)
    stop = threading.Event()
    if request.wait:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    if request.modules_ref is None and (registry or request.driver or request.flavor or NodeConfig.load(host)):
        result = _install_node(request, services, registry=registry, stop=stop, policy=policy)
        if result is None:  # stopped while waiting for a build
            return
    else:
        if request.kernel_hook:
            raise InputError("--kernel-hook stages builds from a registry", hint="pass --registry and --driver with it")
        if request.flavor:
            raise InputError("--flavor chooses the node's builds from a registry; --modules names one build",
                             hint="leave out --flavor, or --modules")
        ref = request.modules_ref
        checked = find_modules(ref, services, use_cache=not (ref and os.path.isdir(ref)),
                               verify_key=request.verify_key or services.settings.option_values.get("verify_key"))
        result = installer.install(checked, host=host, host_root=request.cdi_host_root,
                                   env=services.settings.environ, reporter=reporter, policy=policy)
    then(result)
    if not request.wait:
        return
    if not stop.is_set():
        reporter.note("ready; waiting until stopped (the ready file goes away then)")
    try:
        while not stop.wait(request.cdi_interval):
            specs.refresh(host, host_root=request.cdi_host_root, reporter=reporter)
        specs.refresh(host, host_root=request.cdi_host_root, reporter=reporter)
    finally:  # whatever stopped the wait, the node is not said to be ready any more
        installer.not_ready(host)
    reporter.note("stopped: the ready file is removed; the driver stays loaded and its CDI spec valid")


def _install_node(request: InstallRequest, services, *, registry, stop, policy):
    """`install` without --modules: node/service.py serve, which stages the next kernel while it
    waits (in a thread here, so that the result is shown once installed)."""
    settings, reporter, host = services.settings, services.reporter, request.host
    config = node.config_for(host, driver=request.driver, registry=registry, fallback=request.fallback,
                             flavor=request.flavor, verify_key=node_verify_key(settings, request.verify_key))
    if request.kernel_hook:
        node.write_hook(host, request.cdi_host_root, reporter)
    serve = functools.partial(node.serve, host, config, running=settings.host_release,
                              registry=services.registry(config.registry),
                              host_root=request.cdi_host_root, env=settings.environ, reporter=reporter,
                              poll=request.poll, stop=stop, policy=policy)
    if not request.wait:
        return serve(wait=False)
    done, box = threading.Event(), {}

    def installed_then(result):
        box["result"] = result
        done.set()

    def work():
        try:
            serve(wait=True, installed_then=installed_then)
        except BaseException as exc:  # said by the main thread
            box["error"] = exc
        finally:
            done.set()

    threading.Thread(target=work, name="node", daemon=True).start()
    while not done.wait(0.5):  # the main thread stays free for SIGTERM
        pass
    if "error" in box:
        stop.set()
        raise box["error"]
    return box.get("result")


def stage_report(host: HostRoot, *, kernel: str | None, flavor: str | None, registry: str | None,
                 driver: str | None, services, verify_key: str | None = None) -> Report:
    """The verified build for a kernel staged; --driver or --flavor, once staged, become the node's."""
    settings, reporter = services.settings, services.reporter
    config = node.config_for(host, driver=driver, registry=settings.registry_repo(registry), fallback=None,
                             flavor=flavor, verify_key=node_verify_key(settings, verify_key))
    saved = NodeConfig.load(host)
    release = node.resolve_kernel(kernel, host, settings.host_release)
    if saved is None:  # a node set up by staging first: `ready` answers for the same driver
        config.save(host)
    found = node.stage_kernel(host, release, config, running=settings.host_release,
                              registry=services.registry(config.registry),
                              reporter=reporter)
    if saved is not None and config.verify_key != saved.verify_key:
        config.save(host)  # a verification key given: from now on the node's policy
        reporter.note("the node now takes only builds signed by the key given (--verify-key)")
    elif saved is not None and (driver or flavor) and (saved.driver, saved.flavor) != (config.driver, config.flavor):
        config.save(host)  # the operator changed the node's driver or flavour: its next boot takes that one
        reporter.warn(f"the node's driver is now {config.described} (it was {saved.described}); "
                      "its next boot installs that one")
    answer = {**found.to_json(), "path": str(found.artifact.root)}
    return Report(answer, [f"staged NVIDIA {answer['driver']} for kernel {answer['kernel']} (from "
                           f"{answer['source']}): {answer['path']}"])


def ready_report(host: HostRoot, *, kernel: str | None, flavor: str | None, driver: str | None, services) -> Report:
    """The reboot gate: ready only when the kernel's verified build of the node's driver is staged;
    otherwise the result carries exit 23, saying what is missing."""
    config = node.config_for(host, driver=driver, registry=None, fallback=None, flavor=flavor)
    release = node.resolve_kernel(kernel, host, services.settings.host_release)
    answer = node.readiness(host, release, config)
    if answer["ready"]:
        return Report(answer, [f"ready: kernel {release} has a verified build of driver {config.shown_driver} staged"])
    return Report(answer, error=NoBuildError(f"not ready: {answer['missing']}", hint=answer["fix"]))


def status_report(host: HostRoot, services) -> Report:
    answer = node.status(host, services.settings.host_release)
    driver = answer["driver"]
    lines = [f"kernel:   {answer['running_kernel']} (next: {printable(answer['next_kernel'] or 'the same')})"]
    if driver is None:
        lines.append("driver:   not ready (no ready file)")
    else:
        fell = f", FALLBACK from {printable(driver.get('fallback_from'))}" if driver.get("fallback_from") else ""
        lines.append(printable(f"driver:   NVIDIA {driver.get('driver')} for {driver.get('kernel')} (from "
                               f"{driver.get('source')}{fell}); boot test: {driver.get('boot_test') or 'not run'}"))
        lines.append(f"CDI spec: {printable(driver.get('cdi_spec'))}")
    config = answer["config"]
    if config:
        lines.append(f"config:   driver {config['driver'] or 'any'}"
                     + (f" ({config['flavor']})" if config["flavor"] else "")
                     + f", registry {config['registry'] or 'none'}, fallback {'on' if config['fallback'] else 'off'}")
    for release, builds in answer["staged"].items():
        lines.append(f"staged:   {release}: "
                     + (", ".join(f"{b['driver']} {b['flavor']}" for b in builds) or "nothing whole"))
    lines += [f"problem:  {printable(problem)}" for problem in answer["problems"]]
    return Report(answer, lines)
