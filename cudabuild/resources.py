"""Where the container-side files live: inside the wheel (cudabuild/_data/...) or, in a checkout
or an editable install, at the top of the repository."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def resource_dir(name: str) -> Path:
    """Return the directory `name` (builder, dockerfiles or images)."""
    for candidate in (_PACKAGE / "_data" / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"cudabuild's {name}/ directory is missing from the installation ({_PACKAGE})")
