"""Where cudabuild puts a driver on a host, under its root: written once, read by install,
upgrade and uninstall, the CDI spec's check, the node's state and the deploy manifests."""

DRIVER_DIR = "run/cudabuild/driver"  # VERSION/ (lib/, bin/, firmware/, modules/, loader.sh) and the ready file
READY = "ready"
READY_FILE = f"{DRIVER_DIR}/{READY}"
INSTALL_LOCK = "run/cudabuild/.install.lock"  # one install, upgrade or uninstall at a time on a host


def driver_dir(version: str) -> str:
    """The installed driver of one version (its userspace, modules and loader)."""
    return f"{DRIVER_DIR}/{version}"
