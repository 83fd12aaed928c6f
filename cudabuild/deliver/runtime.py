"""cudabuild-runtime: an OCI runtime that wraps runc the way nvidia-container-runtime does.

Every command passes to runc unchanged. On `create` (and `run`), when the container's environment
names GPUs (DOCKER_RESOURCE_GPU from Swarm, NV_GPU, NVIDIA_VISIBLE_DEVICES from ECS: indexes,
UUIDs, all; none gives the driver without a GPU, void nothing), the CDI spec's edits for those GPUs
go into the bundle's config.json first: device nodes with the device-cgroup rules that allow them,
mounts, environment, hooks. A container that names no GPU is untouched. A GPU that does not exist,
or no spec, fails `create` with a message that reaches `docker run` (through runc's --log file,
where the shim reads the error) and this runtime's own log; no container starts without the GPU
it asked for.

Configuration, all optional: `runtimeArgs` in daemon.json (--cdi-spec-dir DIR, repeatable;
--runtime-path PATH; --runtime-log FILE), or the same keys in a JSON file
(/etc/cudabuild/runtime.json, or CUDABUILD_RUNTIME_CONFIG): {"cdi_spec_dirs": [...],
"runtime_path": "...", "log_file": "..."}. Defaults: CDI's /etc/cdi and /var/run/cdi, runc on PATH,
/var/log/cudabuild-runtime.log.

Nothing but os and sys is imported before runc is exec'ed on the path that changes nothing."""

import os
import sys

OUR_OPTIONS = ("--cdi-spec-dir", "--runtime-path", "--runtime-log")
# runc's global options that take a value (`runc [global options] command ...`).
RUNC_VALUED = ("--log", "--log-format", "--root", "--criu", "--rootless")
CONFIG_FILE = "/etc/cudabuild/runtime.json"
DEFAULTS = {"cdi_spec_dirs": ["/etc/cdi", "/var/run/cdi"], "runtime_path": "runc",
            "log_file": "/var/log/cudabuild-runtime.log"}


def split(argv: list[str]) -> tuple[dict, list[str]]:
    """Our options (wherever they are) and runc's arguments, in order."""
    ours: dict = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in OUR_OPTIONS:
            if not eq:
                i += 1
                value = argv[i] if i < len(argv) else ""
            key = {"--cdi-spec-dir": "cdi_spec_dirs", "--runtime-path": "runtime_path",
                   "--runtime-log": "log_file"}[name]
            if key == "cdi_spec_dirs":
                ours.setdefault(key, []).append(value)
            else:
                ours[key] = value
        else:
            rest.append(arg)
        i += 1
    return ours, rest


def command_of(args: list[str]) -> tuple[str | None, int]:
    """runc's command and its position, past the global options."""
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in RUNC_VALUED:
            i += 2
            continue
        if arg.startswith("-"):
            i += 1
            continue
        return arg, i
    return None, -1


def bundle_of(args: list[str], at: int) -> str:
    """The --bundle/-b of a create or run command (default: the current directory)."""
    i = at + 1
    while i < len(args):
        arg = args[i]
        if arg in ("--bundle", "-b") and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--bundle="):
            return arg.split("=", 1)[1]
        i += 1
    return "."


def runc_log_of(args: list[str]) -> tuple[str | None, str]:
    """runc's --log file and --log-format (the shim reads a failed create's error there)."""
    log, fmt = None, "text"
    for i, arg in enumerate(args):
        if arg == "--log" and i + 1 < len(args):
            log = args[i + 1]
        elif arg.startswith("--log="):
            log = arg.split("=", 1)[1]
        elif arg == "--log-format" and i + 1 < len(args):
            fmt = args[i + 1]
        elif arg.startswith("--log-format="):
            fmt = arg.split("=", 1)[1]
    return log, fmt


def exec_runtime(path: str, args: list[str]) -> None:
    os.execvp(path, [path, *args])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, args = split(argv)
    command, at = command_of(args)
    if command not in ("create", "run"):  # the path that changes nothing: no json, no cudabuild imported
        configured = os.path.exists(os.environ.get("CUDABUILD_RUNTIME_CONFIG", CONFIG_FILE))
        exec_runtime(ours.get("runtime_path") or (_config()["runtime_path"] if configured else "runc"), args)
    config = {**_config(), **ours}
    runtime = config.get("runtime_path") or "runc"
    try:
        _edit_bundle(bundle_of(args, at), [os_path(d) for d in config.get("cdi_spec_dirs") or []])
    except _Refused as refused:
        _report(str(refused), args, config)
        return 1
    exec_runtime(runtime, args)
    return 0


def os_path(value: str):
    from pathlib import Path

    return Path(value)


class _Refused(Exception):
    pass


def _config() -> dict:
    """The configuration file's keys over the defaults (a missing file: the defaults)."""
    import json

    path = os.environ.get("CUDABUILD_RUNTIME_CONFIG", CONFIG_FILE)
    settings = dict(DEFAULTS)
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return settings
    except (OSError, ValueError) as exc:
        raise SystemExit(f"cudabuild-runtime: cannot read {path}: {exc}")
    if isinstance(data, dict):
        settings.update({k: v for k, v in data.items() if k in DEFAULTS})
    return settings


def _edit_bundle(bundle: str, spec_dirs: list) -> None:
    """Apply the CDI edits for the GPUs the container's environment names to config.json."""
    import json

    from cudabuild.deliver import cdi, devices
    from cudabuild.errors import CudabuildError

    path = os.path.join(bundle, "config.json")
    with open(path) as f:
        spec = json.load(f)
    env = dict(item.split("=", 1) for item in (spec.get("process") or {}).get("env") or [] if "=" in item)
    requested = devices.requested(env)
    if requested is None:
        return  # names no GPU: untouched
    variable, value = requested
    try:
        chosen = devices.select(cdi.gpus_in_spec(spec_dirs), value, what=f"{variable}={value}")
        if chosen is None:  # void
            return
        edits = cdi.edits_for(spec_dirs, cdi.device_names(chosen))
    except CudabuildError as exc:
        raise _Refused(f"{exc.message}; the container was not started (cudabuild-runtime, CDI specs in "
                       f"{', '.join(str(d) for d in spec_dirs)})") from exc
    apply_edits(spec, edits)
    tmp = path + ".cudabuild-partial"
    with open(tmp, "w") as f:
        json.dump(spec, f)
    os.replace(tmp, path)


def apply_edits(spec: dict, edits: dict) -> None:
    """CDI container edits into an OCI runtime spec (what a CDI-aware engine does)."""
    linux = spec.setdefault("linux", {})
    nodes = linux.setdefault("devices", [])
    rules = linux.setdefault("resources", {}).setdefault("devices", [])
    for node in edits.get("deviceNodes", []):
        entry = {"path": node["path"], "type": node.get("type", "c"), "major": node["major"], "minor": node["minor"],
                 "fileMode": 0o666, "uid": 0, "gid": 0}
        nodes[:] = [n for n in nodes if n.get("path") != entry["path"]] + [entry]
        rules.append({"allow": True, "type": entry["type"], "major": entry["major"], "minor": entry["minor"],
                      "access": node.get("permissions") or "rwm"})
    mounts = spec.setdefault("mounts", [])
    for mount in edits.get("mounts", []):
        options = list(mount.get("options") or ["ro", "nosuid", "nodev", "bind"])
        mounts.append({"destination": mount["containerPath"], "source": mount["hostPath"],
                       "type": mount.get("type") or "bind", "options": options})
    process = spec.setdefault("process", {})
    env = process.setdefault("env", [])
    for variable in edits.get("env", []):
        name = variable.split("=", 1)[0]
        env[:] = [e for e in env if e.split("=", 1)[0] != name] + [variable]
    hooks = spec.setdefault("hooks", {})
    for hook in edits.get("hooks", []):
        entry = {k: hook[k] for k in ("path", "args", "env", "timeout") if k in hook}
        hooks.setdefault(hook["hookName"], []).append(entry)


def _report(message: str, args: list[str], config: dict) -> None:
    """The error where each reader looks: stderr, runc's --log (the shim reports it to docker
    run and docker service ps), and this runtime's own log."""
    import json
    import time

    print(f"cudabuild-runtime: {message}", file=sys.stderr)
    log, fmt = runc_log_of(args)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if log:
        try:
            with open(log, "a") as f:
                line = json.dumps({"level": "error", "msg": message, "time": stamp}) if fmt == "json" \
                    else f'time="{stamp}" level=error msg="{message}"'
                f.write(line + "\n")
        except OSError:
            pass
    own = config.get("log_file")
    if own:
        try:
            with open(own, "a") as f:
                f.write(f"{stamp} create refused: {message}\n")
        except OSError:
            pass


if __name__ == "__main__":
    sys.exit(main())
