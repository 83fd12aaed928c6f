"""Publishing a checked artifact: as the one-layer modules image, and into an `--output` directory.

The output directory is checked before anything is built: never the file system's root or a
system directory, never a non-empty directory that is not an earlier cudabuild output (unless
--force, and even then nothing there is replaced that cudabuild did not write). It is staged inside
itself under a unique name, so renames stay on one file system and two runs do not collide."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

from cudabuild.artifact import MANIFEST, PARTS, Artifact, walk, read_manifest
from cudabuild.compile.builder import tar_context
from cudabuild.store.cache import Cache, key_of
from cudabuild.engine import Engine
from cudabuild.errors import ArtifactError, InputError, VerifyError, shown
from cudabuild.ui import Reporter

ENTRIES = (*PARTS, MANIFEST)  # what cudabuild writes into an output directory
# Directories of the operating system: an output there would mix a driver into the system's files.
_SYSTEM_TOP = {"bin", "boot", "dev", "etc", "home", "lib", "lib32", "lib64", "libx32", "media", "mnt", "opt", "proc",
               "root", "run", "sbin", "srv", "sys", "tmp", "usr", "var"}
_SYSTEM_TREES = {"bin", "boot", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc", "sbin", "sys"}


# ---- the modules image -------------------------------------------------------------------------
def publish_image(engine: Engine, artifact: Artifact, *, tag: str, reporter: Reporter) -> None:
    """The modules image: one layer holding modules/, userspace/ and manifest.json as the manifest
    lists them, and nothing else (imported as a layer: FROM scratch and one COPY, without a build)."""
    manifest = artifact.manifest
    labels = manifest.labels()
    found = engine.inspect_image(tag)
    if found:
        existing = found["Config"].get("Labels") or {}
        if all(existing.get(k) == v for k, v in labels.items()):  # the same build, nothing new to say
            reporter.cached("modules image", tag)
            return
    labels.update({
        "org.opencontainers.image.title": "NVIDIA kernel modules",
        "org.opencontainers.image.description":
            f"NVIDIA {manifest.driver_version} modules for Linux {manifest.kernel_release}, built by cudabuild",
    })
    payload = [(rel, artifact.root / rel) for rel, _ in artifact.files()]
    payload.append((MANIFEST, artifact.root / MANIFEST))
    with reporter.step(f"publish modules image {tag}"):
        with tar_context({}, payload) as layer:
            engine.import_layer(layer=layer, tag=tag, labels=labels)
        layers = engine.image(tag)["RootFS"]["Layers"]
        if len(layers) != 1:
            raise VerifyError(f"the modules image {tag} has {len(layers)} layers instead of one")


# ---- --output DIR ------------------------------------------------------------------------------
def _is_system_path(path: Path) -> bool:
    parts = path.parts  # ('/', 'usr', 'lib', ...)
    if len(parts) == 1:
        return True
    if len(parts) == 2:
        return parts[1] in _SYSTEM_TOP
    return parts[1] in _SYSTEM_TREES or (parts[1] in ("usr", "var") and len(parts) == 3)


def _written_by_cudabuild(path: Path) -> bool:
    """Whether `path` holds an earlier cudabuild output and nothing in modules/ and userspace/
    that its manifest does not list (so replacing them loses nothing of the user's)."""
    try:
        manifest = read_manifest(path / MANIFEST)
    except ArtifactError:
        return False
    listed = {f"modules/{m.file}" for m in manifest.modules} | {f"userspace/{u.path}" for u in manifest.userspace}
    return all(kind == "dir" or rel in listed for rel, kind in walk(path).items())


def check_output(value: str, *, force: bool) -> Path:
    """The output directory, refused now (before a build) when cudabuild must not write there."""
    hint = "pass a new or empty directory with --output, e.g. --output ./nvidia"
    try:
        path = Path(value).expanduser().resolve()
    except (OSError, RuntimeError) as exc:
        raise InputError(f"--output {shown(value)}: {exc}", hint=hint) from exc
    if _is_system_path(path):
        raise InputError(f"--output {shown(value)} is {path}, a directory of the operating system: cudabuild does "
                         "not write modules/, userspace/ and manifest.json there", hint=hint)
    try:
        exists = path.exists()
        if exists and not path.is_dir():
            raise InputError(f"--output {shown(value)} exists and is not a directory", hint=hint)
        present = [p.name for p in path.iterdir()] if exists else []
    except OSError as exc:
        raise InputError(f"--output {shown(value)}: {exc.strerror or exc}", hint=hint) from exc
    if present:
        ours = _written_by_cudabuild(path)
        if not ours and not force:
            raise InputError(f"--output {shown(value)} is not empty and holds no earlier cudabuild output "
                             f"({', '.join(sorted(present)[:5])}{', ...' if len(present) > 5 else ''})",
                             hint=hint + ", or --force to add modules/, userspace/ and manifest.json beside the "
                             "files there (nothing of yours is replaced)")
        clash = [name for name in ENTRIES if name in present]
        if clash and not ours:
            raise InputError(f"--output {shown(value)} already has {', '.join(clash)}, not written by cudabuild; "
                             "cudabuild never replaces what it did not write", hint=hint)
    # Can it be written? Probe in the directory itself, or the nearest one that exists.
    probe_in = path if exists else next(p for p in path.parents if p.exists())
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".cudabuild-probe-", dir=probe_in))
    except OSError as exc:
        raise InputError(f"--output {shown(value)}: cannot write in {probe_in} ({exc.strerror or exc})",
                         hint=hint) from exc
    return path


def write_output(artifact: Artifact, output: Path, *, cache: Cache) -> None:
    """Copy the artifact into `output`: staged inside it, then each of modules/, userspace/ and
    manifest.json (last) moved into place; an earlier cudabuild output's are replaced, and on
    any failure everything is put back as it was."""
    with cache.lock(f"output-{key_of(str(output))}"):
        check_output(str(output), force=True)  # again, under the lock: another run may have written meanwhile
        output.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".cudabuild-staging-", dir=output))
        moved: list[str] = []
        try:
            artifact.copy_to(lambda rel: staging / rel, manifest=staging / MANIFEST)
            for part in PARTS:
                (staging / part).mkdir(exist_ok=True)
            for name in ENTRIES:
                if (output / name).exists() or (output / name).is_symlink():
                    os.rename(output / name, staging / f".old-{name}")
                os.rename(staging / name, output / name)
                moved.append(name)
        except OSError as exc:
            for name in reversed(moved):
                os.rename(output / name, staging / name)
            for name in ENTRIES:
                if (staging / f".old-{name}").exists():
                    os.rename(staging / f".old-{name}", output / name)
            shutil.rmtree(staging, ignore_errors=True)
            reason = "the file system is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
            raise InputError(f"cannot write the output into {output}: {reason}; it is as it was",
                             hint="free space there, or pass another --output") from exc
        shutil.rmtree(staging, ignore_errors=True)
