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

from cudabuild.errors import printable
from cudabuild.host.root import HostPathError, HostRoot, read_regular

# /dev/nvidia0..254, nvidiactl, nvidia-uvm, nvidia-uvm-tools, nvidia-modeset, nvidia-caps/*
_DEVICE_RE = re.compile(r"/dev/nvidia(?:[0-9]{1,3}|ctl|-uvm|-uvm-tools|-modeset|-caps/[A-Za-z0-9_-]+)")
# The driver's libraries, by NVIDIA's names (more than the artifact carries: GL, EGL, video).
_LIBRARY_RE = re.compile(r"(?:libcuda|libcudadebugger|libnvidia-[A-Za-z0-9_-]+|libnvcuvid|libnvoptix|libGLX_nvidia"
                         r"|libEGL_nvidia|libGLESv1_CM_nvidia|libGLESv2_nvidia)\.so(?:\.[0-9]+)*")
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
    confirmed: bool = False  # the engine runs that container (only such a container is ever drained)

    @property
    def in_container(self) -> bool:
        return self.container_id is not None

    def describe(self) -> str:
        where = "not in a container"
        if self.in_container:
            where = f"container {self.container or self.container_id[:12]}"
            if self.pod:
                where += f" (pod {self.namespace}/{self.pod})"
            if not self.confirmed:
                where += " (not one the engine runs)"
        held = ", ".join(self.holds[:4]) + (", ..." if len(self.holds) > 4 else "")
        return printable(f"pid {self.pid} ({self.command}), {where}: {held}")

    def to_json(self) -> dict:
        return {"pid": self.pid, "command": self.command, "holds": list(self.holds),
                "container_id": self.container_id, "container": self.container, "pod": self.pod,
                "namespace": self.namespace, "engine_runs_it": self.confirmed}


def held_path(text: str) -> str | None:
    """The device node or driver library a link target or maps path names, else None."""
    path = text.removesuffix(" (deleted)")
    if _DEVICE_RE.fullmatch(path):
        return path
    if path.startswith("/") and _LIBRARY_RE.fullmatch(path.rsplit("/", 1)[-1]):
        return path
    return None


_PID_RE = re.compile(r"[0-9]{1,10}")  # ASCII digits only ("²".isdigit() is true)
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# The container runtimes' own cgroup layouts (cgroup v1 and v2, systemd and cgroupfs drivers):
# docker-ID.scope, cri-containerd-ID.scope, crio-ID.scope, libpod-ID.scope; /docker/ID;
# /kubepods/.../podUID/ID (containerd, CRI-O with cgroupfs); /libpod_parent/libpod-ID.
_SCOPE_RE = re.compile(r"(?:docker|cri-containerd|crio|libpod)-(?P<id>[0-9a-f]{64})\.scope")
_PLAIN_ID = re.compile(r"(?:libpod-|crio-)?(?P<id>[0-9a-f]{64})")


def scan(host: HostRoot) -> list[Holder]:
    """Every process under ROOT/proc that holds the GPU or maps the driver (by pid); processes that
    end while they are read are skipped. Only decimal pid directories are read, never through a
    link, each file read non-blocking and bounded (a FIFO or a device where a file belongs is
    skipped)."""
    found = []
    try:
        with host.directory("proc") as proc:
            for name in sorted(os.listdir(proc)):
                if not _PID_RE.fullmatch(name):
                    continue
                try:
                    pid_fd = os.open(name, _OPEN_DIR, dir_fd=proc)
                except OSError:  # gone, not ours to read, or a link planted there
                    continue
                try:
                    holds = _holds(pid_fd)
                    if holds:
                        comm = re.sub(r"[^\x20-\x7e]", "?", _read(pid_fd, "comm").strip())[:64] or "?"
                        found.append(Holder(pid=int(name), command=comm, holds=tuple(sorted(holds)),
                                            container_id=container_id(_read(pid_fd, "cgroup"))))
                finally:
                    os.close(pid_fd)
    except HostPathError:
        return []
    return found


def _read(dir_fd: int, name: str, limit: int = SMALL_LIMIT) -> str:
    """At most `limit` bytes of a regular file in a process's directory ("" for anything else)."""
    try:
        data = read_regular(name, limit, dir_fd=dir_fd)
    except OSError:
        return ""
    return data.decode(errors="replace") if data is not None else ""


def _holds(pid_fd: int) -> set[str]:
    holds: set[str] = set()
    try:
        fd_dir = os.open("fd", _OPEN_DIR, dir_fd=pid_fd)
    except OSError:  # gone, or not ours to read
        fd_dir = None
    if fd_dir is not None:
        try:
            for fd in os.listdir(fd_dir):
                try:
                    target = os.readlink(fd, dir_fd=fd_dir)
                except OSError:
                    continue
                path = held_path(target)
                if path:
                    holds.add(path)
        finally:
            os.close(fd_dir)
    for line in _read(pid_fd, "maps", MAPS_LIMIT).splitlines():
        fields = line.split(None, 5)
        if len(fields) == 6:
            path = held_path(fields[5].strip())
            if path:
                holds.add(path)
    return holds


def container_id(cgroup: str) -> str | None:
    """The container's id from a process's cgroup paths, in a container runtime's own layout
    (Docker, containerd, CRI-O, Podman); None for a process in no container (a 64-hex name in a
    user's session scope is not a container)."""
    for line in reversed(cgroup.splitlines()):
        parts = [p for p in line.split(":", 2)[-1].split("/") if p]
        for index in range(len(parts) - 1, -1, -1):
            part = parts[index]
            scope = _SCOPE_RE.fullmatch(part)
            if scope:
                return scope["id"]
            plain = _PLAIN_ID.fullmatch(part)
            if plain and index > 0 and (parts[index - 1] in ("docker", "libpod_parent")
                                        or parts[0].startswith("kubepods")):
                return plain["id"]
    return None


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
        running = bool((data.get("State") or {}).get("Running"))
        out.append(replace(h, container=printable(str(data.get("Name", "")).lstrip("/"))[:128] or None,
                           pod=labels.get(POD_NAME), namespace=labels.get(POD_NAMESPACE), confirmed=running))
    return out


@dataclass
class Held:
    """The holders; those outside any container (which --drain never stops) apart."""

    holders: list[Holder] = field(default_factory=list)

    @property
    def outside(self) -> list[Holder]:
        """Holders --drain never stops: in no container, or in one the engine does not run."""
        return [h for h in self.holders if not h.in_container or not h.confirmed]

    def lines(self) -> str:
        return "; ".join(h.describe() for h in self.holders)
