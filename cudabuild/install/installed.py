"""An installed copy of a driver on a host (ROOT/run/cudabuild/driver/VERSION): where each of the
artifact's files goes in it, what of it differs from the artifact, and the loader files cudabuild
writes beside them (images/loader.sh, the device facts, loader.conf). Install checks a copy with
these before it keeps it; a rollback or an uninstall's reload checks the old copy with them
before its loader runs."""

from __future__ import annotations

import os
from pathlib import Path

from cudabuild.artifact import MANIFEST, Artifact, read_manifest
from cudabuild.host import devices
from cudabuild.host.loader import SETTINGS, settings
from cudabuild.digests import sha256_files
from cudabuild.errors import ArtifactError
from cudabuild.resources import resource_dir


def place_of(target: Path, rel: str) -> Path:
    """modules/X.ko stays; userspace/lib/X -> lib/X (and bin/, firmware/)."""
    return target / rel.removeprefix("userspace/")


def changed_files(target: Path, checked: Artifact) -> list[str] | None:
    """What of `target` differs from this artifact (each file's sha256 against the manifest, each
    link's target): [] when it holds exactly this driver, None when it holds no copy of it at all."""
    try:
        installed = read_manifest(target / MANIFEST)
    except ArtifactError:
        return None
    if installed.key != checked.manifest.key:
        return None
    changed, files = [], {}
    for rel, entry in checked.files():
        place = place_of(target, rel)
        link = getattr(entry, "link", None)
        if link is not None:
            if not place.is_symlink() or os.readlink(place) != link:
                changed.append(rel)
        elif place.is_symlink() or not place.is_file() or place.stat().st_size != entry.size:
            changed.append(rel)
        else:
            files[place] = (rel, entry.sha256)
    for place, digest in sha256_files(list(files)).items():
        if digest != files[place][1]:
            changed.append(files[place][0])
    return sorted(changed)


def loader_files(manifest) -> dict[str, bytes]:
    """What of an installed copy is cudabuild's own, not the artifact's: the image loader, the device
    facts it reads, and its settings for this build."""
    images = resource_dir("images")
    return {"loader.sh": (images / "loader.sh").read_bytes(),
            devices.FACTS_FILE: (images / devices.FACTS_FILE).read_bytes(),
            SETTINGS: settings(manifest).encode()}


def restore_loader(target: Path, manifest) -> list[str]:
    """The loader files in `target` as this cudabuild writes them (a changed one, a planted line, is
    replaced, never run); the names rewritten."""
    rewritten = []
    for name, data in loader_files(manifest).items():
        path = target / name
        try:
            same = not path.is_symlink() and path.is_file() and path.stat().st_size == len(data) \
                and path.read_bytes() == data
        except OSError:
            same = False
        if same:
            continue
        tmp = target / f".{name}.partial"
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        rewritten.append(name)
    return rewritten


def verify_installed(target: Path):
    """An installed copy checked against its own manifest before anything of it runs or loads:
    every module, library and firmware file by its sha256 (ArtifactError naming what changed), and
    the loader files written again as this cudabuild writes them. Its manifest."""
    manifest = read_manifest(target / MANIFEST)
    changed = changed_files(target, Artifact(root=target, manifest=manifest))
    if changed:
        raise ArtifactError(f"the installed copy {target} changed since it was installed ({', '.join(changed[:5])}"
                            f"{', ...' if len(changed) > 5 else ''}): it is not loaded",
                            hint=f"install NVIDIA {manifest.driver_version} again from its verified artifact "
                                 "(cudabuild install --modules ...)")
    restore_loader(target, manifest)
    return manifest
