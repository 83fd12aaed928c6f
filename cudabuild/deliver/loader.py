"""The contract between the Python side and images/loader.sh: the settings file the loader reads
(`loader.conf`: KEY=VALUE lines, read line by line and checked again by the loader, never sourced),
written from a checked manifest only."""

from __future__ import annotations

from cudabuild.artifact import Manifest

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
