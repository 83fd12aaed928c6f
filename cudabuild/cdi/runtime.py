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

Nothing but os, sys and CDI's paths is imported before runc is exec'ed on the path that changes nothing."""

import os
from collections.abc import Mapping
import sys

from cudabuild.cdi.paths import MOUNT_OPTIONS, SPEC_DIRS

OUR_OPTIONS = ("--cdi-spec-dir", "--runtime-path", "--runtime-log")
# runc's global options that take a value (`runc [global options] command ...`).
RUNC_VALUED = ("--log", "--log-format", "--root", "--criu", "--rootless")
CONFIG_FILE = "/etc/cudabuild/runtime.json"
MAX_CONFIG_BYTES = 4 << 20  # a bundle's config.json
DEFAULTS = {"cdi_spec_dirs": [f"/{d}" for d in SPEC_DIRS], "runtime_path": "runc",
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


def bundle_of(args: list[str], at: int) -> str | None:
    """The --bundle/-b of a create or run command (default: the current directory); None when
    --bundle ends the command line with no value."""
    i = at + 1
    while i < len(args):
        arg = args[i]
        if arg in ("--bundle", "-b"):
            return args[i + 1] if i + 1 < len(args) else None
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


def main(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """The runtime's one entry: its arguments and environment are read here, once (the runtime is its
    own program, started by the engine for each container; it does not go through the CLI's Settings)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    path = config_path(os.environ if env is None else env)
    ours, args = split(argv)
    command, at = command_of(args)
    if command not in ("create", "run"):  # the path that changes nothing: no json, no cudabuild imported
        configured = os.path.exists(path)
        # state, delete, kill...: always reach runc, whatever is wrong with the configuration file
        exec_runtime(ours.get("runtime_path") or (_config(path)[0]["runtime_path"] if configured else "runc"), args)
    settings, problem = _config(path)
    config = {**settings, **ours}
    runtime = config.get("runtime_path") or "runc"
    try:
        if problem:
            raise _Refused(problem)
        bundle = bundle_of(args, at)
        if bundle is None:
            raise _Refused(f"{command} --bundle has no value")
        _edit_bundle(bundle, [os_path(d) for d in config.get("cdi_spec_dirs") or []])
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


def config_path(env: Mapping[str, str]) -> str:
    """The runtime's configuration file: CUDABUILD_RUNTIME_CONFIG, or /etc/cudabuild/runtime.json."""
    return env.get("CUDABUILD_RUNTIME_CONFIG") or CONFIG_FILE


def _config(path: str) -> tuple[dict, str | None]:
    """The configuration file's keys over the defaults (a missing file: the defaults), and what is
    wrong with the file, if anything (then only its valid keys are taken)."""
    import json

    settings = dict(DEFAULTS)
    try:
        with open(path) as f:
            data = json.loads(f.read(1 << 16))
    except FileNotFoundError:
        return settings, None
    except (OSError, ValueError) as exc:
        return settings, f"cannot read the configuration {path}: {_shown(str(exc))}; fix or remove it"
    if not isinstance(data, dict):
        return settings, f"the configuration {path} is not a JSON object; fix or remove it"
    problems = []
    for key, value in data.items():
        if key not in DEFAULTS:
            continue
        if key == "cdi_spec_dirs":
            ok = isinstance(value, list) and all(isinstance(v, str) and v.startswith("/") for v in value)
            what = "a list of absolute directories"
        else:
            ok = isinstance(value, str) and value != ""
            what = "a path"
        if ok:
            settings[key] = value
        else:
            problems.append(f"{key} must be {what}, not {_shown(json.dumps(value))}")
    return settings, (f"the configuration {path}: {'; '.join(problems)}" if problems else None)


def _shown(value: str, limit: int = 200) -> str:
    """A value from outside, for a message or a log: escaped, one line, and cut at `limit`."""
    text = value if len(value) <= limit else value[:limit] + f"... ({len(value)} characters)"
    return text.encode("unicode_escape").decode("ascii").replace('"', '\\"')


def _edit_bundle(bundle: str, spec_dirs: list) -> None:
    """Apply the CDI edits for the GPUs the container's environment names to config.json."""
    import json

    from cudabuild.cdi import spec as cdi
    from cudabuild.host import devices
    from cudabuild.errors import CudabuildError

    path = os.path.join(bundle, "config.json")
    try:
        with open(path) as f:
            spec = json.loads(f.read(MAX_CONFIG_BYTES + 1))
    except FileNotFoundError:
        raise _Refused(f"the bundle {_shown(bundle)} has no config.json") from None
    except (OSError, ValueError) as exc:
        raise _Refused(f"cannot read the bundle's {_shown(path)}: {_shown(str(exc))}") from None
    process = spec.get("process") if isinstance(spec, dict) else None
    listed = process.get("env") if isinstance(process, dict) else None
    if not isinstance(spec, dict) or not isinstance(process, (dict, type(None))) \
            or not isinstance(listed, (list, type(None))) or not all(isinstance(e, str) for e in listed or []):
        raise _Refused(f"the bundle's {_shown(path)} is not an OCI runtime spec (process.env must be a list of "
                       "strings)")
    env = dict(item.split("=", 1) for item in listed or [] if "=" in item)
    requested = devices.requested(env)
    if requested is None:
        return  # names no GPU: untouched
    variable, value = requested
    try:
        chosen = devices.select(cdi.gpus_in_spec(spec_dirs), value, what=f"{variable}={_shown(value)}")
        if chosen is None:  # void
            return
        edits = cdi.edits_for(spec_dirs, cdi.device_names(chosen))
    except CudabuildError as exc:
        raise _Refused(f"{exc.message}; the container was not started (cudabuild-runtime, CDI specs in "
                       f"{', '.join(str(d) for d in spec_dirs)})") from exc
    try:
        apply_edits(spec, edits)
    except (KeyError, TypeError, ValueError) as exc:
        raise _Refused(f"the CDI spec's edits are malformed ({_shown(str(exc))}); the container was not started; "
                       "rewrite the spec: cudabuild cdi generate") from None
    tmp = path + ".cudabuild-partial"
    with open(tmp, "w") as f:
        json.dump(spec, f)
    os.replace(tmp, path)


def _number(value, what: str, limit: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= limit:
        raise ValueError(f"{what} {value!r} is not a number from 0 to {limit}")
    return value


def _text(value, what: str) -> str:
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        raise ValueError(f"{what} {value!r} is not an absolute path")
    return value


def apply_edits(spec: dict, edits: dict) -> None:
    """CDI container edits into an OCI runtime spec (what a CDI-aware engine does); every value
    checked to be of CDI's type first (ValueError otherwise): nothing unchecked reaches runc."""
    linux = spec.setdefault("linux", {})
    nodes = linux.setdefault("devices", [])
    rules = linux.setdefault("resources", {}).setdefault("devices", [])
    for node in edits.get("deviceNodes", []):
        kind = node.get("type", "c")
        if kind not in ("c", "b", "u", "p"):
            raise ValueError(f"device type {kind!r} is not c, b, u or p")
        entry = {"path": _text(node["path"], "a device's path"), "type": kind,
                 "major": _number(node["major"], "a device's major", 4095),
                 "minor": _number(node["minor"], "a device's minor", (1 << 20) - 1),
                 "fileMode": 0o666, "uid": 0, "gid": 0}
        nodes[:] = [n for n in nodes if n.get("path") != entry["path"]] + [entry]
        rules.append({"allow": True, "type": entry["type"], "major": entry["major"], "minor": entry["minor"],
                      "access": node.get("permissions") or "rwm"})
    mounts = spec.setdefault("mounts", [])
    for mount in edits.get("mounts", []):
        options = list(mount.get("options") or MOUNT_OPTIONS)
        if not all(isinstance(o, str) for o in options):
            raise ValueError(f"mount options {options!r} are not strings")
        mounts.append({"destination": _text(mount["containerPath"], "a mount's containerPath"),
                       "source": _text(mount["hostPath"], "a mount's hostPath"),
                       "type": mount.get("type") or "bind", "options": options})
    process = spec.setdefault("process", {})
    env = process.setdefault("env", [])
    for variable in edits.get("env", []):
        if not isinstance(variable, str) or "=" not in variable:
            raise ValueError(f"environment entry {variable!r} is not NAME=VALUE")
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

    message = _shown(message, 2000)  # one line, escaped: no value can forge a log line
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
    if isinstance(own, str) and own:
        try:
            with open(own, "a") as f:
                f.write(f"{stamp} create refused: {message}\n")
        except OSError:
            pass


if __name__ == "__main__":
    sys.exit(main())
