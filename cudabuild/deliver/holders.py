"""Who holds the GPU: every process on a host that has an NVIDIA device node open or mapped, or
maps a library of the NVIDIA driver, read from ROOT/proc (fd links and maps), whatever started it.

A process in a container is named by its container: the id from ROOT/proc/PID/cgroup (Docker,
containerd, CRI-O and Podman put the 64-hex id in the cgroup path), its name and a Kubernetes
pod's name and namespace from the engine when one answers. No GPU request is assumed: the GPU
Operator's upgrade stalls on holders it does not know about (gpu-operator #2570, #2509)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from cudabuild.hostfs import HostRoot

# /dev/nvidia0..254, nvidiactl, nvidia-uvm, nvidia-uvm-tools, nvidia-modeset, nvidia-caps/*
_DEVICE_RE = re.compile(r"/dev/nvidia(?:[0-9]{1,3}|ctl|-uvm|-uvm-tools|-modeset|-caps/[A-Za-z0-9_-]+)")
# The driver's libraries, by NVIDIA's names (more than the artifact carries: GL, EGL, video).
_LIBRARY_RE = re.compile(r"(?:libcuda|libcudadebugger|libnvidia-[A-Za-z0-9_-]+|libnvcuvid|libnvoptix|libGLX_nvidia"
                         r"|libEGL_nvidia|libGLESv1_CM_nvidia|libGLESv2_nvidia)\.so(?:\.[0-9]+)*")
_CONTAINER_ID_RE = re.compile(r"(?<![0-9a-f])[0-9a-f]{64}(?![0-9a-f])")
MAPS_LIMIT = 8 << 20  # a process's maps: a few hundred kB even for large programs
SMALL_LIMIT = 64 * 1024
# The labels the kubelet puts on a pod's containers (dockershim, cri-dockerd).
POD_NAME, POD_NAMESPACE = "io.kubernetes.pod.name", "io.kubernetes.pod.namespace"


@dataclass(frozen=True)
class Holder:
    pid: int
    command: str
    holds: tuple[str, ...]  # device nodes and driver libraries, as the process sees them
    container_id: str | None = None
    container: str | None = None  # its name, when the engine knows it
    pod: str | None = None
    namespace: str | None = None

    @property
    def in_container(self) -> bool:
        return self.container_id is not None

    def describe(self) -> str:
        where = "not in a container"
        if self.in_container:
            where = f"container {self.container or self.container_id[:12]}"
            if self.pod:
                where += f" (pod {self.namespace}/{self.pod})"
        held = ", ".join(self.holds[:4]) + (", ..." if len(self.holds) > 4 else "")
        return f"pid {self.pid} ({self.command}), {where}: {held}"

    def to_json(self) -> dict:
        return {"pid": self.pid, "command": self.command, "holds": list(self.holds),
                "container_id": self.container_id, "container": self.container, "pod": self.pod,
                "namespace": self.namespace}


def held_path(text: str) -> str | None:
    """The device node or driver library a link target or maps path names, else None."""
    path = text.removesuffix(" (deleted)")
    if _DEVICE_RE.fullmatch(path):
        return path
    if path.startswith("/") and _LIBRARY_RE.fullmatch(path.rsplit("/", 1)[-1]):
        return path
    return None


def scan(root: Path) -> list[Holder]:
    """Every process under ROOT/proc that holds the GPU or maps the driver (by pid); processes that
    end while they are read are skipped."""
    host = HostRoot(root)
    proc = host.resolve("proc")
    found = []
    for name in host.listdir("proc"):
        if not name.isdigit():
            continue
        holds = _holds(proc / name)
        if holds:
            found.append(Holder(pid=int(name), command=_command(host, name), holds=tuple(sorted(holds)),
                                container_id=_container_id(host, name)))
    return found


def _holds(pid_dir: Path) -> set[str]:
    holds: set[str] = set()
    try:
        fds = os.listdir(pid_dir / "fd")
    except OSError:  # gone, or not ours to read
        fds = []
    for fd in fds:
        try:
            target = os.readlink(pid_dir / "fd" / fd)
        except OSError:
            continue
        path = held_path(target)
        if path:
            holds.add(path)
    try:
        with open(pid_dir / "maps", "rb") as f:
            maps = f.read(MAPS_LIMIT).decode(errors="replace")
    except OSError:
        maps = ""
    for line in maps.splitlines():
        fields = line.split(None, 5)
        if len(fields) == 6:
            path = held_path(fields[5].strip())
            if path:
                holds.add(path)
    return holds


def _read(host: HostRoot, rel: str) -> str:
    try:
        return host.read_text(rel, limit=SMALL_LIMIT)
    except Exception:  # noqa: BLE001 - a process that ended, a file not ours to read
        return ""


def _command(host: HostRoot, pid: str) -> str:
    comm = _read(host, f"proc/{pid}/comm").strip()
    return re.sub(r"[^\x20-\x7e]", "?", comm)[:64] or "?"


def _container_id(host: HostRoot, pid: str) -> str | None:
    """The container's id from the process's cgroup paths (the last 64-hex name in them), None
    for a process in no container."""
    ids = _CONTAINER_ID_RE.findall(_read(host, f"proc/{pid}/cgroup"))
    return ids[-1] if ids else None


def named(holders: Iterable[Holder], inspect) -> list[Holder]:
    """The holders with their containers' names and pods: `inspect(id)` is the engine's inspect
    data of a container (None when it does not know it)."""
    seen: dict[str, dict | None] = {}
    out = []
    for h in holders:
        if h.container_id is None:
            out.append(h)
            continue
        if h.container_id not in seen:
            seen[h.container_id] = inspect(h.container_id)
        data = seen[h.container_id]
        if not data:
            out.append(h)
            continue
        labels = (data.get("Config") or {}).get("Labels") or {}
        out.append(replace(h, container=str(data.get("Name", "")).lstrip("/") or None,
                           pod=labels.get(POD_NAME), namespace=labels.get(POD_NAMESPACE)))
    return out


@dataclass
class Held:
    """The holders; those outside any container (which --drain never stops) apart."""

    holders: list[Holder] = field(default_factory=list)

    @property
    def outside(self) -> list[Holder]:
        return [h for h in self.holders if not h.in_container]

    def lines(self) -> str:
        return "; ".join(h.describe() for h in self.holders)
