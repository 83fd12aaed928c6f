"""NVIDIA's device facts (images/nvidia-devices.conf, which the loader reads too), the GPUs a
host's driver reports, and which of them a container asked for. The one GPU selection: the
loader (in shell, from the same facts), `cudabuild run` and the OCI runtime follow it."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cudabuild.errors import InputError, shown
from cudabuild.host.root import HostPathError, HostRoot
from cudabuild.resources import resource_dir

FACTS_FILE = "nvidia-devices.conf"
_VALUE_RE = re.compile(r"[A-Za-z0-9._+ -]*")


def read_settings(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (blank lines and # comments skipped), by the loader's own rules."""
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not re.fullmatch(r"[A-Z_]+", key) or not _VALUE_RE.fullmatch(value):
            raise ValueError(f"{path} line {number} is not KEY=VALUE of letters, digits, . _ + - and spaces")
        values[key] = value
    return values


@dataclass(frozen=True)
class DeviceFacts:
    load_order: tuple[str, ...]
    optional_modules: tuple[str, ...]
    gpu_major: int
    ctl_minor: int
    modeset_minor: int
    uvm_device: str
    uvm_minor: int
    uvm_tools_minor: int
    node_mode: int
    selection_variables: tuple[str, ...]


@functools.cache
def facts() -> DeviceFacts:
    v = read_settings(resource_dir("images") / FACTS_FILE)
    return DeviceFacts(load_order=tuple(v["LOAD_ORDER"].split()), optional_modules=tuple(v["OPTIONAL_MODULES"].split()),
                       gpu_major=int(v["GPU_MAJOR"]), ctl_minor=int(v["CTL_MINOR"]),
                       modeset_minor=int(v["MODESET_MINOR"]), uvm_device=v["UVM_DEVICE"],
                       uvm_minor=int(v["UVM_MINOR"]), uvm_tools_minor=int(v["UVM_TOOLS_MINOR"]),
                       node_mode=int(v["NODE_MODE"], 8), selection_variables=tuple(v["SELECTION_VARIABLES"].split()))


# ---- what the host's driver reports ------------------------------------------------------------
@dataclass(frozen=True)
class Gpu:
    index: int  # in the order of the driver's bus ids, as the loader counts
    minor: int  # /dev/nvidiaMINOR
    uuid: str
    bus_id: str
    model: str = ""


GPUS_DIR = "proc/driver/nvidia/gpus"
INFO_LIMIT = 64 * 1024  # a GPU's information file is a few hundred bytes


def gpus(host: HostRoot) -> list[Gpu]:
    """The GPUs in ROOT/proc/driver/nvidia/gpus/*/information (each read at most 64 KiB)."""
    found = []
    for index, name in enumerate(host.listdir(GPUS_DIR)):
        info = f"{GPUS_DIR}/{name}/information"
        try:
            text = host.read_text(info, limit=INFO_LIMIT)
        except HostPathError as exc:
            raise InputError(f"cannot read {host.show(info)}, where the driver describes GPU {shown(name)}: "
                             f"{exc.message}", hint="check that nvidia.ko loaded (dmesg | tail)") from exc
        fields = dict((k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in text.splitlines()) if v)
        minor, uuid = fields.get("Device Minor", ""), fields.get("GPU UUID", "")
        if not re.fullmatch(r"[0-9]{1,3}", minor) or int(minor) > 254 \
                or not re.fullmatch(r"GPU-[A-Za-z0-9-]{1,64}", uuid):
            raise InputError(f"{host.show(info)} names no device minor (0-254) and GPU UUID for {shown(name)}",
                             hint="check that nvidia.ko loaded (dmesg | tail)")
        found.append(Gpu(index=index, minor=int(minor), uuid=uuid, bus_id=name, model=fields.get("Model", "")[:200]))
    return found


def _read(host: HostRoot, rel: str) -> str | None:
    try:
        return host.read_text(rel, limit=INFO_LIMIT)
    except HostPathError:
        return None


def uvm_major(host: HostRoot) -> int | None:
    """nvidia-uvm's major, from ROOT/proc/devices (None when nvidia-uvm is not loaded)."""
    for line in (_read(host, "proc/devices") or "").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1] == facts().uvm_device and re.fullmatch(r"[0-9]{1,4}", parts[0]):
            return int(parts[0])
    return None


def loaded_version(host: HostRoot) -> str | None:
    """The loaded NVIDIA driver's version: /proc/driver/nvidia/version, or /sys/module/nvidia/version."""
    proc = _read(host, "proc/driver/nvidia/version")
    if proc:
        m = re.search(r"Kernel Module\s+(?:for \S+\s+)?([0-9]{3}\.[0-9]+(?:\.[0-9]+)?)", proc)
        if m:
            return m.group(1)
    version = (_read(host, "sys/module/nvidia/version") or "").strip()
    if re.fullmatch(r"[0-9]{3}\.[0-9]+(\.[0-9]+)?", version):
        return version
    return None


def modeset_loaded(host: HostRoot) -> bool:
    return host.is_dir("sys/module/nvidia_modeset")


# ---- which GPUs a container asked for ----------------------------------------------------------
def requested(env: Mapping[str, str]) -> tuple[str, str] | None:
    """(variable, value) of the first selection variable that is set and not empty, or None."""
    for variable in facts().selection_variables:
        value = env.get(variable, "").strip()
        if value:
            return variable, value
    return None


def select(available: list[Gpu], value: str, *, what: str = "GPU selection") -> list[Gpu] | None:
    """The GPUs `value` names: all; none (no GPU, the driver still); void (nothing at all: None);
    or indexes and UUIDs, comma-separated. A GPU that does not exist is an error naming those that do."""
    value = value.strip()
    if value == "all":
        return list(available)
    if value == "none":
        return []
    if value == "void":
        return None
    chosen: list[Gpu] = []
    for want in (w.strip() for w in value.split(",") if w.strip()):
        match = next((g for g in available if want == str(g.index) or want == g.uuid), None)
        if match is None:
            existing = ", ".join(f"{g.index} ({g.uuid})" for g in available) or "none"
            raise InputError(f"{what} names GPU {shown(want)}, which does not exist; the GPUs here: {existing}",
                             hint="name a GPU by its index or UUID, or all / none")
        if match not in chosen:
            chosen.append(match)
    return chosen
