"""Where a BuildJob runs.

- local: `cudabuild modules` as a process beside this one, on this machine's engine; its builder
  containers bind-mount this machine's cache, and kernel trees are shared through it (one
  preparation per kernel, under its lock).
- swarm: one replicated-job service per job on the Swarm this engine manages, running cudabuild's
  own image with the node's engine socket and the node's cache mounted at the same path (the
  builder's bind mounts name the node's paths). The result is pushed to the registry.
- kubernetes: one batch/v1 Job per job, printed for clusters whose nodes run Docker; not run here.

Each backend reports a job's states (queued, building, then its outcome) through `on_state`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from cudabuild.artifact import LABEL_PREFIX
from cudabuild.compile.job import BuildJob
from cudabuild.errors import LOG_TAIL_LINES, InputError

OnState = Callable[[BuildJob, str, str], None]  # job, state, detail


@dataclass
class Outcome:
    """What became of a job: its state (cached, pulled, built, failed), the `cudabuild modules`
    JSON result when it succeeded, the reason and the log's last lines when it failed."""

    job: BuildJob
    state: str
    seconds: float = 0.0
    result: dict | None = None
    error: str | None = None
    log_tail: list[str] = field(default_factory=list)
    log_path: str | None = None


def outcome_of(job: BuildJob, code: int | None, stdout: str, stderr: str, *, seconds: float, log_path: Path,
               reason: str | None = None) -> Outcome:
    """A finished `cudabuild modules --json`: its JSON on success, else its error and last lines."""
    log_path.write_text(stderr + (f"\n{reason}\n" if reason else ""))
    if code == 0:
        try:
            result = json.loads(stdout)
            return Outcome(job, result["origin"], seconds, result=result, log_path=str(log_path))
        except (ValueError, KeyError, TypeError):
            reason = "it succeeded but printed no result cudabuild can read"
    lines = stderr.rstrip("\n").splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    if starts:  # cudabuild's own report: the error, the build log's last lines, the fix
        return Outcome(job, "failed", seconds, error=lines[starts[-1]].removeprefix("error: "),
                       log_tail=lines[starts[-1] + 1:][:2 * LOG_TAIL_LINES], log_path=str(log_path))
    return Outcome(job, "failed", seconds, error=reason or f"exit code {code}", log_tail=lines[-LOG_TAIL_LINES:],
                   log_path=str(log_path))


# ---- local ---------------------------------------------------------------------------------------
def run_local(jobs: list[BuildJob], *, parallel: int, logs: Path, on_state: OnState,
              env: Mapping[str, str]) -> list[Outcome]:
    """Up to `parallel` jobs at a time, each a `cudabuild modules` process on this engine."""
    for job in jobs:
        on_state(job, "queued", "")

    def one(job: BuildJob) -> Outcome:
        on_state(job, "building", "")
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "cudabuild", *job.argv], capture_output=True, text=True,
                              env=dict(env), stdin=subprocess.DEVNULL, check=False)
        return outcome_of(job, done.returncode, done.stdout, done.stderr, seconds=time.monotonic() - started,
                          log_path=logs / f"{job.name}.log")

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        return list(pool.map(one, jobs))


# ---- Swarm ---------------------------------------------------------------------------------------
TERMINAL_FAILED = {"failed", "rejected", "shutdown", "orphaned", "remove"}
WAITING = {"new", "allocated", "pending", "assigned", "accepted", "preparing", "ready", "starting"}
SWARM_ROLE = "matrix-job"


@dataclass(frozen=True)
class SwarmPlace:
    """What every node needs: cudabuild's image in the registry, the engine's socket and the cache,
    mounted at the same paths they have on the node."""

    image: str
    socket: str
    cache_paths: tuple[str, ...]
    cache: str


def swarm_manager(engine) -> None:
    """This engine must manage a Swarm: jobs are services."""
    info = engine.swarm_state()
    if info.get("LocalNodeState") != "active" or not info.get("ControlAvailable"):
        raise InputError("--backend swarm needs an engine that is a Swarm manager, and this one is not "
                         f"(swarm state: {info.get('LocalNodeState') or 'inactive'})",
                         hint="run it against a manager (DOCKER_HOST), or make one: docker swarm init")


def run_swarm(engine, jobs: list[BuildJob], *, place: SwarmPlace, parallel: int, logs: Path, on_state: OnState,
              run_id: str, timeout: float, poll: float = 2.0) -> list[Outcome]:
    """One replicated-job per BuildJob (at most `parallel` at a time), followed until it ends, its
    node goes away, or `timeout` passes; its logs collected and the service removed. `engine` is
    cudabuild/engine.py's Engine (or a stand-in with its Swarm methods)."""
    pending, running, outcomes = list(enumerate(jobs)), {}, {}
    for job in jobs:
        on_state(job, "queued", "")
    binds = [(path, path) for path in place.cache_paths] + [(place.socket, "/var/run/docker.sock")]
    try:
        while pending or running:
            while pending and len(running) < parallel:
                index, job = pending.pop(0)
                environment = {"CUDABUILD_CACHE": place.cache, "CI": "true"}
                service_id = engine.create_job_service(
                    image=place.image, args=list(job.argv), name=f"cudabuild-{run_id}-{job.name}"[:63].rstrip("-"),
                    binds=binds, env=environment,
                    labels={f"{LABEL_PREFIX}.role": SWARM_ROLE, f"{LABEL_PREFIX}.matrix": run_id})
                running[service_id] = (index, job, time.monotonic(), "queued")
            time.sleep(poll)
            for service_id, (index, job, started, shown_state) in list(running.items()):
                state, reason = _task_state(engine, service_id)
                if time.monotonic() - started > timeout and state != "complete" and state not in TERMINAL_FAILED:
                    state, reason = "failed", f"it did not finish within {timeout:g} s"
                if state == "running" and shown_state != "building":
                    on_state(job, "building", "")
                    running[service_id] = (index, job, started, "building")
                if state == "complete" or state in TERMINAL_FAILED:
                    stdout, stderr = _service_logs(engine, service_id)
                    code = 0 if state == "complete" else None
                    outcomes[index] = outcome_of(job, code, stdout, stderr, seconds=time.monotonic() - started,
                                               log_path=logs / f"{job.name}.log",
                                               reason=None if code == 0 else reason)
                    engine.remove_service(service_id)
                    del running[service_id]
    finally:
        for service_id in running:  # interrupted: no job is left behind
            engine.remove_service(service_id)
    return [outcomes[index] for index in range(len(jobs))]


def _task_state(engine, service_id: str) -> tuple[str, str]:
    """The service's newest task: its state, and why it failed (its error, its exit code, its node)."""
    tasks = engine.service_tasks(service_id)
    if not tasks:
        return "new", ""
    task = max(tasks, key=lambda t: t.get("CreatedAt", ""))
    status = task.get("Status") or {}
    state = status.get("State", "new")
    code = (status.get("ContainerStatus") or {}).get("ExitCode")
    reason = status.get("Err") or (f"exit code {code}" if code else status.get("Message", ""))
    node_id = task.get("NodeID")
    if state == "running" and node_id:
        node = engine.node(node_id)
        if (node.get("Status") or {}).get("State") == "down":
            name = (node.get("Description") or {}).get("Hostname", node_id)
            return "orphaned", f"its node {name} went away"
    if state == "orphaned":
        reason = "its node went away"
    return state, reason


def _service_logs(engine, service_id: str) -> tuple[str, str]:
    def read(stderr: bool) -> str:
        try:
            return engine.service_logs(service_id, stderr=stderr).decode(errors="replace")
        except Exception as exc:  # noqa: BLE001 - a node that went away keeps its logs
            return f"(the logs could not be read: {exc})\n"

    return read(stderr=False), read(stderr=True)


# ---- Kubernetes ----------------------------------------------------------------------------------
def kubernetes_jobs(jobs: Iterable[BuildJob], *, image: str, cache: str, socket: str = "/var/run/docker.sock",
                    namespace: str = "default") -> list[dict]:
    """One batch/v1 Job per BuildJob: cudabuild's image beside the node's Docker engine, with the
    node's cache at the same path (the builder's bind mounts name the node's paths)."""
    out = []
    for job in jobs:
        labels = {"app.kubernetes.io/name": "cudabuild", "app.kubernetes.io/component": "modules-build",
                  "cudabuild.io/driver": job.driver, "cudabuild.io/flavor": job.flavor}
        environment = {"CUDABUILD_CACHE": cache, "CI": "true"}
        out.append({
            "apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": f"cudabuild-{job.name}"[:63].rstrip("-"), "namespace": namespace,
                         "labels": dict(labels),
                         "annotations": {"cudabuild.io/kernel": job.kernel, "cudabuild.io/key": job.key or ""}},
            "spec": {
                "backoffLimit": 0, "ttlSecondsAfterFinished": 86400,
                "template": {"metadata": {"labels": dict(labels)}, "spec": {
                    "restartPolicy": "Never",
                    "nodeSelector": {"kubernetes.io/arch": "amd64"},
                    "containers": [{
                        "name": "build", "image": image, "args": list(job.argv),
                        "env": [{"name": k, "value": v} for k, v in sorted(environment.items())],
                        "volumeMounts": [{"name": "docker", "mountPath": "/var/run/docker.sock"},
                                         {"name": "cache", "mountPath": cache}],
                    }],
                    "volumes": [{"name": "docker", "hostPath": {"path": socket, "type": "Socket"}},
                                {"name": "cache", "hostPath": {"path": cache, "type": "DirectoryOrCreate"}}],
                }},
            },
        })
    return out


def cache_paths(root: Path) -> tuple[str, ...]:
    """The cache and what its top-level links point at (a shared downloads directory): each is
    mounted at its own path."""
    paths = [str(root.resolve())]
    for entry in sorted(root.iterdir()):
        if entry.is_symlink() and entry.resolve().is_dir():
            target = str(entry.resolve())
            if not target.startswith(paths[0] + os.sep):
                paths.append(target)
    return tuple(paths)

