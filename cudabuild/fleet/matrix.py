"""`cudabuild matrix`: every kernel x driver (x flavor) cell, planned here, run by a backend.

Each cell is planned on this machine first, as `cudabuild modules` would (its sources, its cache
key, its image tag), so that a cell the registry already holds with the same key is reported and
never scheduled, and a cell that cannot even be planned (an unknown kernel, a driver too old for
open modules) fails alone. The others become BuildJobs that the chosen backend runs; a failed cell
never stops the others."""

from __future__ import annotations

import dataclasses
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import cudabuild
from cudabuild.compile import backends
from cudabuild.compile.backends import Outcome
from cudabuild.compile.job import BuildJob
from cudabuild.errors import MATRIX_FAILED, CudabuildError, InputError, RegistryError, shown
from cudabuild.nvidia import DEBIAN_RELEASE_RE, FLAVORS
from cudabuild.options import (DRIVER_SOURCES, BuildOptions, options_to_json, validate_driver, validate_image_ref,
                               validate_release)
from cudabuild.settings import Services
from cudabuild.ui import Reporter

BACKENDS = ("local", "swarm", "kubernetes")
DEBIAN_ALL = re.compile(r"debian:([a-z]+)")


def split_list(value: str, what: str) -> list[str]:
    items = [item.strip() for item in (value or "").split(",") if item.strip()]
    if not items:
        raise InputError(f"{what} {shown(value)} names nothing", hint=f"pass a comma-separated list, e.g. {what} "
                         + ("6.1.0-56-amd64,6.1.0-47-amd64" if what == "--kernels" else "535,470"))
    return list(dict.fromkeys(items))


def kernels_from(text: str, source: str) -> str:
    """The releases a file lists (--kernels-from): one per line, or separated by blanks or commas as
    `kubectl get nodes -o jsonpath='{.items[*].status.nodeInfo.kernelVersion}'` prints them; `#`
    starts a comment. As a --kernels LIST, each release once."""
    from cudabuild.options import validate_release

    releases = []
    for line in text.splitlines():
        for item in line.split("#", 1)[0].replace(",", " ").split():
            releases.append(validate_release(item, what=f"a kernel release in {source}"))
    if not releases:
        raise InputError(f"--kernels-from {shown(source)} names no kernel release",
                         hint="list one release per line, e.g. 6.1.0-56-amd64")
    return ",".join(dict.fromkeys(releases))


def expand_kernels(value: str, archive_for: Callable[[str], object]) -> list[str]:
    """Explicit releases, or debian:CODENAME for every linux-headers-*-amd64 ABI Debian has."""
    kernels: list[str] = []
    for item in split_list(value, "--kernels"):
        every = DEBIAN_ALL.fullmatch(item)
        if every:
            found = [r for r in archive_for(every.group(1)).kernel_releases(backports=False)
                     if DEBIAN_RELEASE_RE.fullmatch(r).group("flavour") == "amd64"]
            if not found:
                raise InputError(f"Debian {every.group(1)} lists no linux-headers-*-amd64 packages",
                                 hint="check the code name, or name the releases")
            kernels += found
        else:
            kernels.append(validate_release(item))
    return list(dict.fromkeys(kernels))


@dataclass
class MatrixRequest:
    kernels: list[str]
    drivers: list[str]
    flavors: list[str | None]
    backend: str = "local"
    parallel: int | None = None
    image: str | None = None  # cudabuild's image for swarm and kubernetes
    node_cache: str | None = None
    node_socket: str = "/var/run/docker.sock"
    timeout: float = 3600.0

    def __post_init__(self) -> None:
        for driver in self.drivers:
            driver_cell(driver)
        for flavor in self.flavors:
            if flavor is not None and flavor not in FLAVORS:  # None: each driver's default
                raise InputError(f"--flavors: {shown(flavor)} is not a flavor", hint=f"choose from {', '.join(FLAVORS)}")
        if self.backend not in BACKENDS:
            raise InputError(f"--backend {shown(self.backend)} is not supported", hint=f"choose one of {BACKENDS}")
        if self.parallel is not None and not 1 <= self.parallel <= 64:
            raise InputError(f"--parallel {self.parallel} is out of range", hint="pass 1 to 64")
        if self.node_cache is not None and not self.node_cache.startswith("/"):
            raise InputError(f"--node-cache {shown(self.node_cache)} is not an absolute path",
                             hint="pass the cache directory's path on the nodes, e.g. /var/cache/cudabuild")


@dataclass
class MatrixResult:
    backend: str
    registry: str | None
    outcomes: list[Outcome] = field(default_factory=list)
    manifests: list[dict] = field(default_factory=list)  # kubernetes: the Jobs
    logs: str | None = None

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.state == "failed"]

    @property
    def exit_code(self) -> int:
        return MATRIX_FAILED if self.failed else 0

    def to_json(self) -> dict:
        cells = []
        for o in self.outcomes:
            result = o.result or {}
            cells.append({"kernel": o.job.kernel, "driver": o.job.driver, "flavor": o.job.flavor, "state": o.state,
                          "seconds": round(o.seconds, 1), "key": o.job.key,
                          "driver_version": result.get("driver_version") or o.job.driver_version,
                          "modules_image": result.get("modules_image") or o.job.tag,
                          "registry_ref": o.job.registry_ref, "boot_test": _boot_summary(result.get("boot_test")),
                          "error": o.error, "log_tail": o.log_tail, "log": o.log_path})
        return {"backend": self.backend, "registry": self.registry, "cells": cells,
                "failed": len(self.failed), "logs": self.logs,
                **({"jobs": self.manifests} if self.backend == "kubernetes" else {})}


    def text(self) -> str:
        if self.backend == "kubernetes":  # the Jobs are the result; the summary goes beside them (notes)
            import yaml

            return yaml.safe_dump_all(self.manifests, sort_keys=False)
        return "\n".join(summary_lines(self))

    @property
    def notes(self) -> list[str]:
        return summary_lines(self) if self.backend == "kubernetes" else []


def _boot_summary(boot_test) -> str | None:
    """Whether the real kernel accepted a cell's modules in its boot test ("accepted by RELEASE
    (tcg)"): from a build's result, or an image's label (already a line); None when not tested."""
    if isinstance(boot_test, dict):
        return f"{boot_test.get('verdict')} by {boot_test.get('kernel')} ({boot_test.get('accelerator')})"
    return boot_test if isinstance(boot_test, str) else None


def run_matrix(request: MatrixRequest, options: BuildOptions, services: Services) -> MatrixResult:
    """Every cell planned here; each cell's build gets its resolved options as data (`cudabuild
    modules --options-json`), run by the backend the request names."""
    from cudabuild.compile.plan import plan_modules
    from cudabuild.sources.debian import DebianArchive

    settings, reporter, cache = services.settings, services.reporter, services.cache
    registry = services.registry(options.registry)
    local_files = options.local_files()
    if request.backend != "local" and local_files:
        named = ", ".join(f"{flag} {path}" for flag, path in local_files)
        raise InputError(f"--backend {request.backend} runs each build on a node, which cannot read this machine's "
                         f"files ({named})", hint="pass URLs (--installer https://...), or use --backend local")
    if request.backend == "swarm" and registry is None:
        raise InputError("--backend swarm needs --registry: each job pushes its result there, and cudabuild's "
                         "own image comes from there", hint="pass --registry HOST[:PORT]/PATH (or set "
                         "CUDABUILD_REGISTRY)")

    def archive_for(codename: str) -> DebianArchive:
        return DebianArchive(cache=cache, fetcher=services.fetcher, reporter=reporter,
                             mirror=options.apt_mirror, security_mirror=options.apt_security_mirror,
                             distribution=codename, refresh=options.refresh_index)

    engine = services.engine()
    if request.backend == "swarm":
        backends.swarm_manager(engine)  # before anything is planned
    kernels = expand_kernels(",".join(request.kernels), archive_for)
    cells = [(k, d, f) for k in kernels for d in request.drivers for f in request.flavors]
    reporter.note(f"matrix: {len(kernels)} kernel(s) x {len(request.drivers)} driver(s) x "
                  f"{len(request.flavors)} flavor(s) = {len(cells)} cell(s), backend {request.backend}")
    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(2)
    logs = cache.logs / f"matrix-{run_id}"
    logs.mkdir(parents=True, exist_ok=True)
    result = MatrixResult(backend=request.backend, registry=options.registry, logs=str(logs))

    # ---- plan every cell here; the registry's cells are done -------------------------------------
    jobs: list[BuildJob] = []
    quiet = services.quiet()
    done: dict[tuple, Outcome] = {}
    planned: dict[str, str] = {}  # cache key -> the cell planned with it (535 and 535.309.01 are one cell)
    asked: dict[str, tuple] = {}  # cache key -> the cell as asked (its flavor may be the driver's default)
    with reporter.step(f"plan {len(cells)} cell(s)" + (f", ask {registry.host} for each" if registry else "")):
        for kernel, driver, flavor in cells:
            job = BuildJob(kernel=kernel, driver=driver, flavor=flavor or "default", argv=())
            try:
                source, version = driver_cell(driver)
                cell_options = dataclasses.replace(options, kernel=kernel, driver=version, flavor=flavor, output=None,
                                                   force=False, driver_source=source or options.driver_source)
                plan = plan_modules(cell_options, quiet)
            except CudabuildError as exc:
                done[(kernel, driver, flavor)] = Outcome(job, "failed", error=f"could not be planned: {exc.message}",
                                                         log_tail=[f"fix: {exc.hint}"] if exc.hint else [])
                continue
            if plan.key in planned:
                reporter.note(f"{kernel} x {driver} {plan.spec.flavor} is the cell {planned[plan.key]}: planned once")
                continue
            planned[plan.key] = f"{kernel} x {plan.spec.driver_version} {plan.spec.flavor}"
            asked[plan.key] = (kernel, driver, flavor)
            remote = registry.ref(plan.tag) if registry else None
            resolved = dataclasses.replace(cell_options, driver=plan.spec.driver_version, flavor=plan.spec.flavor,
                                           distribution=plan.options.distribution)
            argv = ("modules", "--options-json", options_to_json(resolved), "--json")
            job = dataclasses.replace(job, argv=argv, key=plan.key, tag=plan.tag, flavor=plan.spec.flavor,
                                      driver_version=plan.spec.driver_version,
                                      registry_ref=remote, inputs=tuple(plan.inputs),
                                      kernel_tree=plan.kernel.tree_dir or None, local_files=tuple(local_files))
            held = (registry.held(remote, plan.key, note=reporter.note)
                    if registry is not None and options.use_cache else None)
            if held is not None:  # with its boot test's verdict, as labelled
                done[(kernel, driver, flavor)] = Outcome(job, "in-registry", result={"boot_test": held.boot_test})
                continue
            jobs.append(job)
    for outcome in done.values():
        _say(reporter, outcome.job, outcome.state, outcome.error or (outcome.job.registry_ref or ""))

    def on_state(job: BuildJob, state: str, detail: str) -> None:
        _say(reporter, job, state, detail)

    outcomes: list[Outcome] = []
    if request.backend == "kubernetes":
        image = request.image or _tool_image_ref(registry)
        result.manifests = backends.kubernetes_jobs(jobs, image=image,
                                                    cache=request.node_cache or "/var/cache/cudabuild",
                                                    socket=request.node_socket)
        outcomes = [Outcome(job, "printed") for job in jobs]
    elif jobs and request.backend == "local":
        engine.require_shared_files()
        outcomes = backends.run_local(jobs, parallel=request.parallel or 1, logs=logs, env=settings.environ,
                                      on_state=lambda j, s, d: None if s == "queued" else on_state(j, s, d))
        for outcome in outcomes:
            on_state(outcome.job, outcome.state, _detail(outcome))
    elif jobs and request.backend == "swarm":
        image = _ensure_tool_image(engine, registry, request.image, reporter)
        paths = (request.node_cache,) if request.node_cache else backends.cache_paths(cache.root)
        place = backends.SwarmPlace(image=image, socket=request.node_socket, cache_paths=paths, cache=paths[0])
        outcomes = backends.run_swarm(engine, jobs, place=place, parallel=request.parallel or len(jobs),
                                      logs=logs, run_id=run_id, timeout=request.timeout,
                                      on_state=lambda j, s, d: None if s == "queued" else on_state(j, s, d))
        for outcome in outcomes:
            on_state(outcome.job, outcome.state, _detail(outcome))
    by_cell = {asked[o.job.key]: o for o in outcomes}
    by_cell.update(done)
    result.outcomes = [by_cell[c] for c in cells if c in by_cell]
    return result


def _detail(outcome: Outcome) -> str:
    if outcome.state == "failed":
        return outcome.error or ""
    return f"{format(outcome.seconds, '.0f')} s"


def _say(reporter: Reporter, job: BuildJob, state: str, detail: str) -> None:
    reporter.note(f"{job.cell}: {state}" + (f" ({detail})" if detail else ""))


def _tool_image_ref(registry) -> str:
    from cudabuild.fleet.toolimage import tool_tag

    version = cudabuild.__version__
    return f"{registry.repo}/cudabuild:{version}" if registry else tool_tag(version)


def _ensure_tool_image(engine, registry, image: str | None, reporter: Reporter) -> str:
    """cudabuild's own image in the registry, where every node pulls it from: pushed from this
    engine when the registry lacks it; `cudabuild image tool` makes it."""
    from cudabuild.fleet.toolimage import tool_tag

    if image is not None:
        return image
    ref = _tool_image_ref(registry)
    if registry.labels(ref) is not None:
        return ref
    local = tool_tag(cudabuild.__version__)
    if engine.image_id(local) is None:
        raise RegistryError(f"cudabuild's own image is neither in the registry ({ref}) nor in this engine ({local})",
                            hint=f"make it: cudabuild image tool --registry {registry.repo}, then run this again; "
                                 "or pass --image", exit_code=RegistryError.NOT_THERE)
    with reporter.step(f"push cudabuild's image {ref}"):
        engine.push(local, ref)
    return ref


def summary_lines(result: MatrixResult) -> list[str]:
    """The table people read: one row per cell, then each failure with its log's last lines."""
    rows = [("KERNEL", "DRIVER", "FLAVOR", "STATE", "TIME", "WHERE")]
    for o in result.outcomes:
        where = (o.job.registry_ref or o.job.tag or "") if o.state != "failed" else (o.error or "")[:90]
        rows.append((o.job.kernel, o.job.driver_version or o.job.driver, o.job.flavor, o.state,
                     f"{o.seconds:.0f}s" if o.seconds else "-", where))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(r[i].ljust(widths[i]) for i in range(5)) + "  " + r[5] for r in rows]
    for o in result.failed:
        lines.append("")
        lines.append(f"failed: {o.job.cell}: {o.error}")
        compiler = [line for line in o.log_tail if re.search(r"\berror:", line) and not line.startswith("error:")]
        for line in (compiler[:6] or o.log_tail[-8:]):
            lines.append(f"    {line}")
        if o.log_path:
            lines.append(f"    whole log: {o.log_path}")
    return lines


def driver_cell(item: str) -> tuple[str | None, str]:
    """A --drivers item: VERSION or BRANCH (from --driver-source), or SOURCE:VERSION for a cell of
    its own source, so Debian's and NVIDIA's drivers stand side by side (550,run:580.142)."""
    source, sep, version = item.rpartition(":")
    if sep and source not in DRIVER_SOURCES:
        raise InputError(f"--drivers: {shown(item)} names no driver source ({shown(source)})",
                         hint=f"write VERSION, or SOURCE:VERSION with SOURCE one of {', '.join(DRIVER_SOURCES)} "
                              "(e.g. --drivers 550,run:580.142)")
    return (source or None), validate_driver(version)


def parse_request(*, kernels: str, drivers: str, flavors: str | None, flavor: str | None, **rest) -> MatrixRequest:
    if rest.get("image") is not None:
        validate_image_ref(rest["image"], "--image")
    return MatrixRequest(kernels=split_list(kernels, "--kernels"), drivers=split_list(drivers, "--drivers"),
                         flavors=split_list(flavors, "--flavors") if flavors else [flavor], **rest)


