"""Publishing a checked artifact: as the two-layer modules image, and into an `--output` directory.

The output directory is checked before anything is built: never the file system's root or a
system directory, never a non-empty directory that is not an earlier cudabuild output (unless
--force, and even then nothing there is replaced that cudabuild did not write). It is staged inside
itself under a unique name, so renames stay on one file system and two runs do not collide."""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cudabuild.artifact import MANIFEST, PARTS, Artifact, walk, read_manifest
from cudabuild.artifact.image import (COMPRESSIONS, DEFAULT_COMPRESSION, MODULES_LAYER, USERSPACE_LAYER, config_of,
                                      docker_archive, layers_of)
from cudabuild.store.cache import Cache, key_of
from cudabuild.engine import Engine
from cudabuild.digests import sha256_file
from cudabuild.errors import ArtifactError, InputError, VerifyError, shown
from cudabuild.options import default_of
from cudabuild.ui import Reporter

ENTRIES = (*PARTS, MANIFEST)  # what cudabuild writes into an output directory
# Directories of the operating system: an output there would mix a driver into the system's files.
_SYSTEM_TOP = {"bin", "boot", "dev", "etc", "home", "lib", "lib32", "lib64", "libx32", "media", "mnt", "opt", "proc",
               "root", "run", "sbin", "srv", "sys", "tmp", "usr", "var"}
_SYSTEM_TREES = {"bin", "boot", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc", "sbin", "sys"}


# ---- the modules image -------------------------------------------------------------------------
def publish_image(engine: Engine, artifact: Artifact, *, tag: str, reporter: Reporter, work: Path) -> None:
    """The modules image in the engine: two layers, the userspace and then the modules with the
    manifest (artifact/image.py), loaded as they are, without a build; `work` is removed after."""
    manifest = artifact.manifest
    labels = image_labels(manifest)
    found = engine.inspect_image(tag)
    if found:
        existing = found["Config"].get("Labels") or {}
        if all(existing.get(k) == v for k, v in labels.items()) and len(found["RootFS"]["Layers"]) == 2:
            reporter.cached("modules image", tag)  # the same build, nothing new to say
            return
    with reporter.step(f"publish modules image {tag}"):
        try:
            layers = layers_of(artifact, work)
            docker_archive(layers, config_of(labels, [layer.diff_id for layer in layers]), tag, work / "image.tar")
            engine.load(work / "image.tar", tag=tag)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if engine.image(tag)["RootFS"]["Layers"] != [layer.diff_id for layer in layers]:
            raise VerifyError(f"the modules image {tag} does not hold the two layers cudabuild made")


def image_labels(manifest) -> dict[str, str]:
    """The modules image's labels: the artifact's, a title and a description."""
    return {**manifest.labels(), "org.opencontainers.image.title": "NVIDIA kernel modules",
            "org.opencontainers.image.description":
                f"NVIDIA {manifest.driver_version} modules for Linux {manifest.kernel_release}, built by cudabuild"}


# ---- the registry ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pushed:
    digest: str  # the image's manifest digest in the registry
    bytes_sent: int  # what the push sent: the layers the registry lacked, the config and the manifest
    signed: tuple[str, ...] = ()  # the signature's and attestations' tags, with --sign-image


def push_modules(store, checked: Artifact, remote: str, *, cache: Cache, reporter: Reporter,
                 options=None, compression: str = DEFAULT_COMPRESSION, passphrase: str | None = None) -> Pushed:
    """The modules image pushed over the store's own API: each layer compressed once for its
    content (kept in the cache's blobs/, so the next kernel of the driver reuses the userspace's),
    sent only when the registry lacks it; then signed, with --sign-image."""
    sent: list[int] = []
    with reporter.step(f"push {remote}"):
        work = cache.workdir(f"push-{checked.manifest.key[:12]}")
        try:
            blobs = [_compressed(cache, checked, part, work, compression) for part in (USERSPACE_LAYER, MODULES_LAYER)]
            config = config_of(image_labels(checked.manifest), [diff for _, diff in blobs])
            digest = store.push(remote, config, [blob for blob, _ in blobs], counted=sent)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    signed = sign_pushed(store, remote, digest, checked, options=options, reporter=reporter, passphrase=passphrase)
    return Pushed(digest, sum(sent), tuple(signed))


def _compressed(cache: Cache, checked: Artifact, part: str, work: Path, compression: str):
    """(the compressed blob, its diff ID) of one layer of the artifact, made once per content (the
    layer's files by digest, mode and link name name it). With the driver's reference objects
    (references_of), the userspace layer carries them and the modules layer holds each module
    compressed against them (artifact/image.py)."""
    import json

    from cudabuild.artifact.image import REFERENCE, Blob, LAYER_TITLE, compress, delta_modules, write_layer

    references = references_of(cache, checked.manifest)
    names = sorted([rel for rel, _ in checked.files() if rel.startswith(f"{part}/")] +
                   ([MANIFEST] if part == MODULES_LAYER else []))
    listed = {rel: entry.sha256 for rel, entry in checked.files()}
    described = []
    for rel in names:
        path = checked.root / rel
        described.append([rel, path.lstat().st_mode,
                          os.readlink(path) if path.is_symlink() else listed.get(rel) or sha256_file(path)])
    described.append([str(references[0].parent.name) if references else "",
                      [(p.name, p.stat().st_size) for p in references]])
    content = key_of(json.dumps([compression, described]))
    store = cache.root / "blobs"
    memo = store / "layers" / f"{content}.json"
    try:
        known = json.loads(memo.read_text())
        blob = Blob(known["digest"], known["size"], COMPRESSIONS[compression][1],
                    path=store / "sha256" / known["digest"].split(":", 1)[1], annotations={LAYER_TITLE: part})
        if blob.path.stat().st_size == blob.size:
            return blob, known["diff_id"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if part == USERSPACE_LAYER:
        entries = [(rel, checked.root / rel) for rel in names] + [(f"{REFERENCE}/{p.name}", p) for p in references]
    elif references:
        entries = delta_modules(checked, references, work / "delta")
    else:
        entries = [(rel, checked.root / rel) for rel in names]
    layer = write_layer(None, entries, work / f"{part}.tar", part)
    (store / "sha256").mkdir(parents=True, exist_ok=True)
    (store / "layers").mkdir(parents=True, exist_ok=True)
    blob = compress(layer, work / f"{part}.blob", compression)
    kept = store / "sha256" / blob.digest.split(":", 1)[1]
    os.replace(blob.path, kept)
    layer.path.unlink()
    tmp = memo.with_suffix(".tmp")
    tmp.write_text(json.dumps({"digest": blob.digest, "size": blob.size, "diff_id": layer.diff_id}))
    os.replace(tmp, memo)
    return dataclasses.replace(blob, path=kept), layer.diff_id


def _references_dir(cache: Cache, manifest) -> Path:
    import json

    return cache.root / "references" / key_of(json.dumps(manifest.driver_source or {}, sort_keys=True))[:24]


def references_of(cache: Cache, manifest) -> list[Path]:
    """The driver's kernel-independent objects a build of it kept (keep_references), in order;
    [] where there are none (the open modules, or a build made elsewhere)."""
    where = _references_dir(cache, manifest)
    return sorted(p for p in where.iterdir() if p.is_file()) if where.is_dir() else []


def keep_references(cache: Cache, manifest, tree: Path) -> None:
    """The proprietary driver's binary objects (`*.o_binary`: the same for every kernel, most of
    nvidia.ko), from the driver's tree, kept once per driver source for the registry's images."""
    where = _references_dir(cache, manifest)
    found = sorted(tree.rglob("*.o_binary")) if manifest.flavor == "proprietary" else []
    if not found or where.is_dir() or len({p.name for p in found}) != len(found):
        return
    staging = cache.workdir("references")
    try:
        for path in found:
            shutil.copyfile(path, staging / path.name)
        where.parent.mkdir(parents=True, exist_ok=True)
        os.rename(staging, where)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)


def sign_pushed(store, ref: str, digest: str, checked: Artifact, *, options=None, reporter: Reporter,
                passphrase: str | None = None) -> list[str]:
    """With --sign-image: the signature of the pushed image `ref` (`digest`) and its provenance and
    SBOM attestations, pushed beside it; the tags written ([] without a key). `passphrase` opens an
    encrypted key (CUDABUILD_IMAGE_KEY_PASSWORD, from the settings)."""
    key_path = getattr(options, "sign_image", None)
    if not key_path:
        return []
    from cudabuild.registry import trust

    key = trust.load_signing_key(key_path, passphrase=passphrase)
    with reporter.step(f"sign {ref} (cosign signature, SLSA provenance, SPDX SBOM)"):
        said = {k: v for k, v in dataclasses.asdict(options).items()
                if k in _PROVENANCE_OPTIONS and v not in (None, False, "") and v != default_of(k)}
        name = ref.rsplit(":", 1)[0]
        statements = [trust.statement(digest, name, trust.PROVENANCE,
                                      trust.provenance(checked.manifest, options=said, started=None,
                                                       finished=checked.manifest.created)),
                      trust.statement(digest, name, trust.SPDX, trust.sbom(checked, name=f"{name}@{digest}"))]
        return trust.sign_image(store, ref, digest, key, statements)


# The build options a provenance records (not where files are, nor how the output is shown).
_PROVENANCE_OPTIONS = ("kernel_source", "driver_source", "flavor", "only_modules", "kernel_repo", "kernel_checkout",
                       "installer_url", "distribution", "backports", "builder_base", "boot_test", "boot_append",
                       "compile_cache", "ignore_preempt_rt")


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
