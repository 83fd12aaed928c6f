"""The Container Device Interface spec: the single description of "this host's GPUs and driver".

`generate` writes it from what the host's driver reports (GPUs, device numbers) and the userspace
driver of exactly the loaded version; `cudabuild run` and the OCI runtime read it and apply its
edits. Device names: each GPU by index and by UUID, and `all`. Shared edits: the control nodes
and read-only mounts of the libraries (each at its file name and its SONAME, in the multiarch
directory where an unmodified Debian/Ubuntu-based image finds libcuda.so.1) and nvidia-smi."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from cudabuild.artifact import BINARIES, OPTIONAL_LIBRARIES, REQUIRED_LIBRARIES, library_name_ok
from cudabuild.host import devices
from cudabuild.cdi.paths import MOUNT_OPTIONS, SPEC_DIRS
from cudabuild.host.layout import driver_dir
from cudabuild.errors import InputError, printable, shown
from cudabuild.host.root import HostRoot

KIND = "nvidia.com/gpu"
SPEC_FILE = "cudabuild-nvidia.json"
CONTAINER_LIBS = "/usr/lib/x86_64-linux-gnu"
CONTAINER_BIN = "/usr/bin"
SPEC = f"{SPEC_DIRS[1]}/{SPEC_FILE}"  # ours, under a host's root (dynamic: /var/run/cdi)
MAX_SPEC_BYTES = 4 << 20  # a spec is a few kB
# Where hosts keep the userspace driver: distributions' own places, Debian's alternatives, ours.
LIBRARY_DIRS = ("usr/lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu/nvidia/current", "usr/lib64", "usr/lib",
                "lib/x86_64-linux-gnu", "usr/local/nvidia/lib64")
BINARY_DIRS = ("usr/bin", "usr/lib/nvidia/current", "bin", "usr/local/nvidia/bin")


def names_of(library: Path) -> list[str]:
    """The names a library is found by: its file name, every link beside it that leads to it
    (libcuda.so.1, libcuda.so), and its DT_SONAME; only names of the NVIDIA driver's own libraries
    (each becomes a mount path in every GPU container)."""
    from cudabuild.verify import soname

    names = [library.name]
    target = library.resolve()
    for link in sorted(library.parent.iterdir()):
        if link.is_symlink() and link.resolve() == target and link.name not in names:
            names.append(link.name)
    so = soname(library)
    if so and so not in names:
        names.append(so)
    return [n for n in names if library_name_ok(n)]


@dataclass(frozen=True)
class Userspace:
    """The userspace driver files of one version, as this process sees them."""

    version: str
    libraries: tuple[Path, ...]
    binaries: tuple[Path, ...]


def find_userspace(host: HostRoot, version: str, *, extra_dirs: tuple[str, ...] = (), required: bool = True) -> Userspace:
    """The libraries of exactly `version` in the host's library directories (host paths, each
    resolved inside the host's root; `extra_dirs` first); unless not `required`, InputError naming what is
    missing (a 535 module with 470 libraries fails with "Driver/library version mismatch")."""
    alternatives = "usr/lib/x86_64-linux-gnu/nvidia"
    names = [*extra_dirs, *LIBRARY_DIRS, *(f"{alternatives}/{d}" for d in host.listdir(alternatives))]
    dirs = list(dict.fromkeys(host.resolve(d) for d in names))
    found: dict[str, Path] = {}
    others: dict[str, set[str]] = {}
    for name in (*REQUIRED_LIBRARIES, *OPTIONAL_LIBRARIES):
        for d in dirs:
            candidate = d / f"{name}.so.{version}"
            if candidate.is_file() and name not in found:
                found[name] = candidate
            for other in d.glob(f"{name}.so.[0-9][0-9][0-9].*"):
                others.setdefault(name, set()).add(other.name.split(".so.", 1)[1])
    missing = [n for n in REQUIRED_LIBRARIES if n not in found]
    if missing and required:
        seen = sorted(set().union(*(others.get(n, set()) for n in missing)) - {version})
        raise InputError(
            f"the loaded NVIDIA driver is {version}, but {', '.join(f'{n}.so.{version}' for n in missing)} "
            f"is not in {', '.join(str(d) for d in dirs[:4])}, ..."
            + (f" (there is {', '.join(sorted({n + '.so.' + v for n in missing for v in seen}))}: a container "
               "would fail with \"Driver/library version mismatch\")" if seen else ""),
            hint=f"install the userspace driver of exactly {version} (e.g. Debian's libcuda1 and libnvidia-ml1 of "
                 "that version), or install the driver with `cudabuild install`")
    binaries = []
    for name in BINARIES:
        for d in dict.fromkeys(host.resolve(b) for b in [*extra_dirs, *BINARY_DIRS]):
            if (d / name).is_file():
                binaries.append(d / name)
                break
    return Userspace(version=version, libraries=tuple(found.values()), binaries=tuple(binaries))


# ---- the spec ------------------------------------------------------------------------------------
def host_path(path: Path, *, host: HostRoot, host_root: str) -> str:
    """Where the host sees `path` (a path under `root` as this process sees it, resolved inside it)."""
    return host.host_path(host.resolve(host.host_path(path)), host_root)


def generate(host: HostRoot, *, host_root: str, userspace: Userspace) -> dict:
    """The spec of the GPUs `root`'s driver reports and the given userspace driver."""
    f = devices.facts()
    gpus = devices.gpus(host)

    def node(path: str, major: int, minor: int) -> dict:
        # No fileMode (a Go os.FileMode, not st_mode) or permissions: consumers apply their defaults.
        entry = {"path": path, "type": "c", "major": major, "minor": minor}
        host = str(PurePosixPath(host_root) / path.lstrip("/"))
        if host != path:
            entry["hostPath"] = host
        return entry

    shared = [node("/dev/nvidiactl", f.gpu_major, f.ctl_minor)]
    uvm = devices.uvm_major(host)
    if uvm is not None:
        shared += [node("/dev/nvidia-uvm", uvm, f.uvm_minor), node("/dev/nvidia-uvm-tools", uvm, f.uvm_tools_minor)]
    if devices.modeset_loaded(host):
        shared.append(node("/dev/nvidia-modeset", f.gpu_major, f.modeset_minor))
    mounts = []
    for library in userspace.libraries:
        for name in names_of(library):
            mounts.append({"hostPath": host_path(library, host=host, host_root=host_root),
                           "containerPath": f"{CONTAINER_LIBS}/{name}", "options": list(MOUNT_OPTIONS)})
    for binary in userspace.binaries:
        mounts.append({"hostPath": host_path(binary, host=host, host_root=host_root),
                       "containerPath": f"{CONTAINER_BIN}/{binary.name}", "options": list(MOUNT_OPTIONS)})
    gpu_nodes = {g.index: node(f"/dev/nvidia{g.minor}", f.gpu_major, g.minor) for g in gpus}
    device_list = []
    for g in gpus:
        for name in (str(g.index), g.uuid):
            device_list.append({"name": name, "containerEdits": {"deviceNodes": [gpu_nodes[g.index]]}})
    device_list.append({"name": "all", "containerEdits": {"deviceNodes": [gpu_nodes[g.index] for g in gpus]}})
    needs_host_paths = any("hostPath" in n for n in [*shared, *gpu_nodes.values()])
    return {
        # The lowest version with what this spec uses: hostPath on device nodes came in CDI 0.5.0.
        "cdiVersion": "0.5.0" if needs_host_paths else "0.3.0",
        "kind": KIND,
        "devices": device_list,
        "containerEdits": {"env": [f"NVIDIA_DRIVER_VERSION={userspace.version}"], "deviceNodes": shared,
                           "mounts": mounts},
    }


def for_loaded(host: HostRoot, *, host_root: str) -> dict | None:
    """The spec of the driver loaded under `root` now and its GPUs, with the userspace driver of
    exactly that version (the one cudabuild installed first, then the host's library directories);
    None when no NVIDIA driver is loaded."""
    version = devices.loaded_version(host)
    return None if version is None else of_version(host, version, host_root=host_root)


def of_version(host: HostRoot, version: str, *, host_root: str) -> dict:
    """The spec of the GPUs under `root` and the userspace driver of `version`: the copy cudabuild
    installed first, then the host's library directories (install writes this; `--check` and the
    driver container compare against it). With cudabuild's copy there, its libraries suffice."""
    ours = driver_dir(version)
    installed = host.is_dir(f"{ours}/lib")
    userspace = find_userspace(host, version, extra_dirs=(f"{ours}/lib", f"{ours}/bin"), required=not installed)
    return generate(host, host_root=host_root, userspace=userspace)


MAX_HOST_PATH = 4096  # PATH_MAX


def refresh(host: HostRoot, *, host_root: str, reporter=None) -> list[str]:
    """Our spec rewritten when it is stale against the loaded driver and GPUs (removed when no
    driver is loaded: it would name devices that are gone); what was stale."""
    try:
        wanted = for_loaded(host, host_root=host_root)
    except InputError as exc:
        if reporter:
            reporter.warn(f"the CDI spec cannot be checked: {exc.message}")
        return []
    saved = on_disk(host)
    try:
        current = json.loads(saved) if saved is not None else None
    except (ValueError, RecursionError):
        current = {}
    if current is not None and not isinstance(current, dict):
        current = {}
    said = differences(current, wanted, host=host, host_root=host_root)
    if said:
        if wanted is None:
            host.remove_file(SPEC)
        else:
            write(wanted, host)
        if reporter:
            reporter.warn(f"the CDI spec was stale ({'; '.join(said)}): "
                          + ("removed" if wanted is None else "rewritten"))
    return said


def encode(spec: dict) -> bytes:
    return (json.dumps(spec, indent=2) + "\n").encode()


def write(spec: dict, host: HostRoot) -> tuple[Path, bool]:
    """Write the spec to ROOT/var/run/cdi (resolved inside the root: on Debian ROOT/run/cdi), whole
    or not at all (a temporary file beside it, then a rename: an engine never reads half a spec);
    the path written and whether it changed."""
    return host.write_atomic(SPEC, encode(spec))


def on_disk(host: HostRoot) -> bytes | None:
    """Our spec's bytes under `root` as they are now (None when there is none)."""
    try:
        return host.read_bytes(SPEC, limit=MAX_SPEC_BYTES)
    except InputError:
        return None


def put_back(host: HostRoot, saved: bytes | None) -> None:
    """Our spec as it was (`on_disk`'s answer): rewritten whole, or removed when there was none."""
    if saved is None:
        host.remove_file(SPEC)
    else:
        host.write_atomic(SPEC, saved)


def differences(current: dict | None, wanted: dict | None, *, host: HostRoot, host_root: str) -> list[str]:
    """What makes the spec `current` (None: there is none) stale against `wanted`, the spec of
    the loaded driver and GPUs (None: no driver is loaded), said for a user; [] when it is not."""
    if current is None:
        return [] if wanted is None else [f"there is no spec, and NVIDIA {driver_version_of(wanted)} is loaded"]
    if wanted is None:
        return [f"the spec is for NVIDIA {driver_version_of(current)}, and no NVIDIA driver is loaded"]
    said = []
    have_version, loaded = driver_version_of(current), driver_version_of(wanted)
    if have_version != loaded:
        said.append(f"the spec is for NVIDIA {have_version}, the loaded driver is {loaded}")
    have, want = _gpu_names(current), _gpu_names(wanted)
    said += [f"GPU {name} is in the spec but gone" for name in sorted(have - want)]
    said += [f"GPU {name} is new: not in the spec" for name in sorted(want - have)]
    mounts = _edits(current).get("mounts") or []
    if not isinstance(mounts, list):
        said.append(f"its mounts are a JSON {type(mounts).__name__}, not a list")
        mounts = []
    for mount in mounts:
        path = mount.get("hostPath") if isinstance(mount, dict) else None
        if not isinstance(path, str) or not path.startswith("/") or "\0" in path or len(path) > MAX_HOST_PATH:
            said.append(f"a mount's hostPath {shown(path if isinstance(mount, dict) else mount)} is not a path")
            continue
        rel = _under(path, host_root)
        try:
            there = rel is not None and host.resolve(rel).exists()
        except (InputError, OSError, ValueError):
            there = False
        if not there:
            said.append(f"{printable(path)} (mounted at {printable(mount.get('containerPath'))}) no longer exists")
    if not said and current != wanted:
        keys = [k for k in ("cdiVersion", "kind", "devices", "containerEdits") if current.get(k) != wanted.get(k)]
        said.append(f"its {', '.join(keys) or 'content'} differ from what the loaded driver and GPUs give "
                     "(device numbers, nodes or libraries)")
    return said


def _edits(spec: dict) -> dict:
    edits = spec.get("containerEdits")
    return edits if isinstance(edits, dict) else {}


def driver_version_of(spec: dict) -> str:
    """The driver version a spec is for (its NVIDIA_DRIVER_VERSION)."""
    env = _edits(spec).get("env")
    for entry in env if isinstance(env, list) else []:
        if isinstance(entry, str) and entry.startswith("NVIDIA_DRIVER_VERSION="):
            return printable(entry.split("=", 1)[1][:64])
    return "(unknown version)"


def _gpu_names(spec: dict) -> set[str]:
    return {d.get("name") for d in spec.get("devices") or [] if isinstance(d, dict)
            and str(d.get("name", "")).startswith("GPU-")}


def _under(path: str, host_root: str) -> str | None:
    """A host path's place under the host's root (None when it is not under it)."""
    try:
        return str(PurePosixPath(path).relative_to(PurePosixPath(host_root)))
    except ValueError:
        return None


# ---- reading specs -------------------------------------------------------------------------------
def read_spec(path: Path) -> dict:
    """A spec file, JSON or YAML (nvidia-ctk writes YAML), checked to be one."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read(MAX_SPEC_BYTES + 1)
        if len(text) > MAX_SPEC_BYTES:
            raise ValueError(f"it is larger than {MAX_SPEC_BYTES} bytes")
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the CDI spec {path}: {shown(str(exc))}", hint="fix or remove the file") from exc
    except Exception as exc:  # noqa: BLE001 - yaml's errors have no common base we can import lazily
        raise InputError(f"cannot read the CDI spec {path}: {shown(str(exc))}", hint="fix or remove the file") from exc
    if not isinstance(data, dict) or not isinstance(data.get("kind"), str) or not isinstance(data.get("devices"), list) \
            or not all(isinstance(d, dict) for d in data["devices"]) \
            or not isinstance(data.get("containerEdits") or {}, dict):
        raise InputError(f"{path} is not a CDI spec (it needs kind, and devices that are objects)",
                         hint="fix or remove the file")
    return data


def specs(directories: list[Path]) -> list[tuple[Path, dict]]:
    """Every spec in the directories, in CDI's order (a later directory wins a clash)."""
    found = []
    for directory in directories:
        if directory.is_dir():
            for path in sorted(directory.iterdir()):
                if path.suffix in (".json", ".yaml", ".yml") and path.is_file():
                    try:
                        found.append((path, read_spec(path)))
                    except InputError:
                        if path.name == SPEC_FILE:
                            raise  # ours: nothing can work until it is rewritten
                        continue  # another tool's broken spec must not refuse every GPU container (CDI skips it too)
    return found


def devices_of(directories: list[Path], kind: str = KIND) -> dict[str, tuple[Path, dict, dict]]:
    """name -> (spec file, spec, device) for one kind, later directories winning."""
    chosen: dict[str, tuple[Path, dict, dict]] = {}
    for path, spec in specs(directories):
        if spec.get("kind") != kind:
            continue
        for device in spec.get("devices", []):
            if isinstance(device, dict) and isinstance(device.get("name"), str):
                chosen[device["name"]] = (path, spec, device)
    return chosen


def edits_for(directories: list[Path], names: list[str], *, kind: str = KIND) -> dict:
    """The container edits for the named devices: each device's, and its spec's shared ones once.
    No names: the shared edits alone (the driver and control nodes, no GPU)."""
    known = devices_of(directories, kind)
    where = ", ".join(str(d) for d in directories)
    if not known:
        raise InputError(f"no CDI spec of kind {kind} in {where}",
                         hint="install the driver first (cudabuild install), or write one with cudabuild cdi generate")
    missing = [n for n in names if n not in known]
    if missing:
        raise InputError(f"the CDI specs in {where} have no device {kind}={', '.join(missing)}; they have: "
                         f"{', '.join(sorted(known, key=_natural))}", hint="name an index, a UUID or all")
    merged: dict[str, list] = {"env": [], "deviceNodes": [], "mounts": [], "hooks": []}
    if names:
        chosen = [known[n] for n in names]
    else:  # one entry per spec, with no device of its own
        chosen = list({path: (path, spec, {}) for path, spec, _ in known.values()}.values())
    seen_specs: set[Path] = set()
    for path, spec, device in chosen:
        parts = [device.get("containerEdits") or {}]
        if path not in seen_specs:
            parts.insert(0, spec.get("containerEdits") or {})
            seen_specs.add(path)
        for edits in parts:
            for key in merged:
                for item in edits.get(key) or []:
                    if item not in merged[key]:
                        merged[key].append(item)
    return merged


def _natural(name: str):
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def device_names(selection: list[devices.Gpu] | None) -> list[str]:
    """The spec's device names for a selection (by index; none: no GPU device)."""
    return [str(g.index) for g in selection or []]


def gpus_in_spec(directories: list[Path], kind: str = KIND) -> list[devices.Gpu]:
    """The GPUs a spec describes (the devices named by index, paired with their UUID names); no
    spec of the kind is an error that says so."""
    known = devices_of(directories, kind)
    if not known:
        raise InputError(f"no CDI spec of kind {kind} in {', '.join(str(d) for d in directories)}",
                         hint="install the driver first (cudabuild install), or write one with cudabuild cdi generate")
    by_node: dict[str, str] = {}
    for name, (_, _, device) in known.items():
        nodes = (device.get("containerEdits") or {}).get("deviceNodes") or []
        if name.startswith("GPU-") and len(nodes) == 1:
            by_node[nodes[0].get("path", "")] = name
    gpus = []
    for name, (_, _, device) in known.items():
        nodes = (device.get("containerEdits") or {}).get("deviceNodes") or []
        if name.isdigit() and len(nodes) == 1:
            m = re.fullmatch(r"/dev/nvidia([0-9]+)", nodes[0].get("path", ""))
            gpus.append(devices.Gpu(index=int(name), minor=int(m.group(1)) if m else -1,
                                    uuid=by_node.get(nodes[0].get("path", ""), ""), bus_id=""))
    return sorted(gpus, key=lambda g: g.index)
