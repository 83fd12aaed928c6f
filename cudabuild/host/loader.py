"""The contract between the Python side and images/loader.sh: the settings file the loader reads
(`loader.conf`: KEY=VALUE lines, read line by line and checked again by the loader, never sourced),
written from a checked manifest only; running the loader of an installed driver on a host; and
unloading the modules it loads, in the reverse order (rmmod; CUDABUILD_RMMOD in tests, as
CUDABUILD_INSMOD stands in for insmod)."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path

from cudabuild.artifact import Manifest
from cudabuild.host import devices
from cudabuild.errors import InputError, LoaderError
from cudabuild.host.root import HostRoot

SETTINGS = "loader.conf"


def settings(manifest: Manifest) -> str:
    """loader.conf for an artifact: the values passed the manifest's checks (versions, a release,
    module names), so they hold only letters, digits, '.', '_', '+', '-' and spaces."""
    return (
        "# cudabuild loader settings: read line by line by loader.sh, never executed\n"
        f"DRIVER_VERSION={manifest.driver_version}\n"
        f"KERNEL_RELEASE={manifest.kernel_release}\n"
        f"MODULES={' '.join(m.name for m in manifest.modules)}\n"
        f"KERNEL_DEPENDS={' '.join(manifest.kernel_depends)}\n"
    )


def run_loader(target: Path, *, host: HostRoot, env: Mapping[str, str]) -> list[str]:
    """The image loader, loading from `target` into the kernel; the modules it loaded. Its
    refusals become LoaderError with its exit code and words. Its /dev, /proc and /sys are
    ROOT's, resolved inside ROOT here (the loader, in shell, takes them as given)."""
    selection = devices.facts().selection_variables
    loader_env = {k: v for k, v in env.items() if k not in selection and k != "CUDABUILD_ROOT"}
    loader_env.setdefault("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    loader_env.update({"CUDABUILD_HOME": str(target), "CUDABUILD_LDCONFIG": "true",
                       "CUDABUILD_FIRMWARE": host.host_path(target / "firmware"),  # the kernel reads it from the host
                       "NVIDIA_VISIBLE_DEVICES": "all"})  # the host gets a node for every GPU
    if host.given != Path("/"):
        loader_env["CUDABUILD_ROOT"] = str(host.root)
        loader_env["CUDABUILD_DEV"] = str(host.makedirs("dev"))
        for name in ("proc", "sys"):
            loader_env[f"CUDABUILD_{name.upper()}"] = str(host.resolve(name))
    result = subprocess.run(["sh", str(target / "loader.sh"), "true"], env=loader_env, capture_output=True, text=True)
    said = [line.removeprefix("cudabuild-loader: ") for line in result.stderr.splitlines()]
    if result.returncode != 0:
        raise LoaderError(said[-1] if said else f"the loader failed (exit {result.returncode})",
                          exit_code=result.returncode)
    return [line.split(" ", 1)[1] for line in said if line.startswith("loaded ")]


def loaded_modules(host: HostRoot) -> list[str]:
    """The NVIDIA modules loaded under ROOT/sys/module, in load order (names as the loader's)."""
    f = devices.facts()
    return [m for m in (*f.load_order, *f.optional_modules) if host.is_dir(f"sys/module/{m.replace('-', '_')}")]


class UnloadError(LoaderError):
    """rmmod refused a module; `unloaded` says which went before it."""

    def __init__(self, message: str, *, unloaded: list[str]) -> None:
        super().__init__(message, exit_code=14, hint="stop what uses the GPU (cudabuild holders), then run again")
        self.unloaded = unloaded


def refuse_half_substituted(env: Mapping[str, str]) -> None:
    """Before anything is changed for an unload: a substitute insmod (CUDABUILD_INSMOD) without a
    substitute rmmod would have the machine's own rmmod unload what the substitute never loaded."""
    if env.get("CUDABUILD_INSMOD") and not env.get("CUDABUILD_RMMOD"):
        raise InputError("CUDABUILD_INSMOD is set and CUDABUILD_RMMOD is not: the modules were loaded by a "
                         "substitute, and this machine's rmmod would unload them",
                         hint="set CUDABUILD_RMMOD beside CUDABUILD_INSMOD, or neither")


def unload(host: HostRoot, env: Mapping[str, str]) -> list[str]:
    """Unload every NVIDIA module, the last loaded first; the modules unloaded. UnloadError with the
    kernel's words when one is refused (those unloaded before it stay unloaded: the caller loads
    them again)."""
    rmmod = env.get("CUDABUILD_RMMOD", "rmmod")
    unloaded: list[str] = []
    for module in reversed(loaded_modules(host)):
        name = module.replace("-", "_")
        result = subprocess.run([rmmod, name], env={**env, "PATH": env.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")},
                                capture_output=True, text=True)
        if result.returncode != 0:
            said = (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1]
            raise UnloadError(f"unloading {module} failed: {said}", unloaded=unloaded)
        unloaded.append(module)
    return unloaded
