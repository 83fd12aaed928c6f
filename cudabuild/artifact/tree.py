"""An artifact directory, checked as hard as a fresh build: `load()`, and `find()` for what a command
names (a modules image, an --output directory, the newest build in the cache)."""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from cudabuild.artifact.labels import LABEL_PREFIX, read_labels
from cudabuild.artifact.manifest import (MANIFEST, PARTS, Manifest, ModuleEntry, UserspaceEntry, library_name_ok,
                                         read_manifest)
from cudabuild.digests import sha256_files
from cudabuild.errors import ArtifactError, InputError, VerifyError, shown
from cudabuild.options import path_kind, validate_image_ref
from cudabuild.verify import read_module


# ---- the directory -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Artifact:
    """A checked artifact directory and its manifest."""

    root: Path
    manifest: Manifest

    def module_path(self, name: str) -> Path:
        return self.root / "modules" / self.manifest.module(name).file

    def files(self) -> list[tuple[str, UserspaceEntry | ModuleEntry]]:
        """Every listed entry, by its path relative to the root."""
        listed: list[tuple[str, UserspaceEntry | ModuleEntry]] = [(f"modules/{m.file}", m)
                                                                 for m in self.manifest.modules]
        listed += [(f"userspace/{u.path}", u) for u in self.manifest.userspace]
        return listed

    def copy_to(self, place, *, manifest: Path | None = None) -> None:
        """Copy every listed file to `place(rel)` (a path; its directories are made), links as
        links (to a file beside them); then the manifest to `manifest`, when given, last."""
        import shutil

        for rel, _ in self.files():
            source, target = self.root / rel, Path(place(rel))
            target.parent.mkdir(parents=True, exist_ok=True)
            if source.is_symlink():
                os.symlink(os.readlink(source), target)
            else:
                shutil.copy2(source, target)
        if manifest is not None:
            shutil.copy2(self.root / MANIFEST, manifest)


def walk(root: Path) -> dict[str, str]:
    """Everything under root/modules and root/userspace, by relative path: 'file', 'link', 'dir'
    or 'other'. Links are not followed."""
    found: dict[str, str] = {}
    for part in PARTS:
        top = root / part
        try:
            st = top.lstat()
        except FileNotFoundError:
            continue
        if not stat.S_ISDIR(st.st_mode):
            found[part] = "link" if stat.S_ISLNK(st.st_mode) else "other"
            continue
        for directory, dirs, files in os.walk(top):
            for name in dirs + files:
                path = Path(directory) / name
                mode = path.lstat().st_mode
                kind = ("dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode)
                        else "link" if stat.S_ISLNK(mode) else "other")
                found[str(path.relative_to(root))] = kind
            dirs[:] = [d for d in dirs if not (Path(directory) / d).is_symlink()]
    return found


def load(root: Path, *, check_modules: bool = True, unchanged_since: Mapping[str, list] | None = None) -> Artifact:
    """The artifact at `root`, checked (see the module's docstring); ArtifactError otherwise.
    `unchanged_since`: what `file_stats` gave after an earlier whole check of it (the cache keeps
    it); when every file still has the same inode, size, mtime and ctime (a write, a rename over it,
    a chmod all change the ctime, which no one but the clock's owner can set back), its contents
    are the ones checked then, and only the layout is checked again."""
    root = Path(root)
    if not root.is_dir():
        raise ArtifactError(f"{root} is not a directory", hint="pass the directory `cudabuild modules --output` wrote")
    manifest = read_manifest(root / MANIFEST)
    artifact = Artifact(root=root, manifest=manifest)
    listed = dict(artifact.files())
    found = walk(root)
    problems: list[str] = []
    for rel, kind in sorted(found.items()):
        if kind == "dir":
            continue
        entry = listed.get(rel)
        if entry is None:
            problems.append(f"{rel} is not listed in the manifest")
        elif kind == "other":
            problems.append(f"{rel} is not a regular file")
        elif kind == "link" and not (isinstance(entry, UserspaceEntry) and entry.link is not None):
            problems.append(f"{rel} is a symbolic link (to {shown(os.readlink(root / rel))}), not a file")
        elif kind == "file" and isinstance(entry, UserspaceEntry) and entry.link is not None:
            problems.append(f"{rel} should be a link to {entry.link}, but is a file")
    for rel, entry in listed.items():
        kind = found.get(rel)
        if kind is None:
            problems.append(f"{rel} is missing")
        elif kind == "link" and isinstance(entry, UserspaceEntry) and entry.link is not None \
                and os.readlink(root / rel) != entry.link:
            problems.append(f"{rel} links to {shown(os.readlink(root / rel))}, not {entry.link}")
    if problems:
        _refuse(root, problems)
    files = {root / rel: entry for rel, entry in listed.items() if not getattr(entry, "link", None)}
    for path, entry in files.items():
        if path.lstat().st_size != entry.size:
            problems.append(f"{path.relative_to(root)} has {path.lstat().st_size} bytes, the manifest says "
                            f"{entry.size}")
    if problems:
        _refuse(root, problems)
    if unchanged_since is not None and file_stats(artifact) == dict(unchanged_since):
        return artifact
    # Modules are read on this thread while the others hash (hashlib runs without the GIL).
    with ThreadPoolExecutor(max_workers=1) as hashing:
        digests = hashing.submit(sha256_files, files)
        if check_modules:
            for m in manifest.modules:
                try:
                    info = read_module(root / "modules" / m.file, digest=False, crcs=False)
                except VerifyError as exc:
                    problems.append(exc.message)
                    continue
                if info.vermagic != m.vermagic:
                    problems.append(f"{m.file} has vermagic {shown(info.vermagic)}, the manifest says "
                                    f"{shown(m.vermagic)}")
                if info.version != m.version:
                    problems.append(f"{m.file} has version {shown(info.version)}, the manifest says "
                                    f"{shown(m.version)}")
        problems += _soname_problems(root, manifest)
        for path, digest in digests.result().items():
            if digest != files[path].sha256:
                problems.append(f"{path.relative_to(root)} has sha256 {digest}, the manifest says "
                                f"{files[path].sha256}")
    if not problems and manifest.signature:
        problems += check_signatures(artifact)
    if problems:
        _refuse(root, problems)
    return artifact


def file_stats(artifact: Artifact) -> dict[str, list]:
    """Each file's (and the manifest's) device, inode, size, mtime and ctime: what `load` compares
    to skip reading again what has not changed since a whole check."""
    stats = {}
    for rel in [MANIFEST, *(rel for rel, entry in artifact.files() if not getattr(entry, "link", None))]:
        st = (artifact.root / rel).lstat()
        stats[rel] = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    return stats


def _soname_problems(root: Path, manifest: Manifest) -> list[str]:
    """Each library's DT_SONAME is a name of the driver's libraries: it becomes a mount path."""
    from cudabuild.verify import soname

    problems = []
    for entry in manifest.userspace:
        if entry.link is None and entry.path.startswith("lib/"):
            so = soname(root / "userspace" / entry.path)
            if so is not None and not library_name_ok(so):
                problems.append(f"userspace/{entry.path} has the DT_SONAME {shown(so)}, which is not a name of the "
                                "NVIDIA driver's libraries (it would become a mount path in every GPU container)")
    return problems


def check_signatures(artifact: Artifact) -> list[str]:
    """Each module's signature checked against the manifest's certificate, over its own bytes."""
    from cudabuild.signing import verify_signature

    certificate = artifact.manifest.certificate
    problems = []
    for m in artifact.manifest.modules:
        try:
            verify_signature(artifact.root / "modules" / m.file, certificate)
        except VerifyError as exc:
            problems.append(exc.message)
    return problems


def _refuse(root: Path, problems: list[str]) -> None:
    shown_problems = problems[:12] + ([f"... and {len(problems) - 12} more"] if len(problems) > 12 else [])
    raise ArtifactError(f"{root} is not the artifact its manifest describes:\n  - " + "\n  - ".join(shown_problems),
                        hint="use an unchanged artifact (the --output directory or modules image cudabuild wrote); "
                        "build again if in doubt")


def describe_userspace(root: Path) -> tuple[UserspaceEntry, ...]:
    """The userspace entries of a freshly built tree (files with digests, links with targets)."""
    entries = []
    paths = sorted(p for p in root.rglob("*") if p.is_symlink() or p.is_file())
    digests = sha256_files([p for p in paths if not p.is_symlink()])
    for path in paths:
        rel = str(path.relative_to(root))
        if path.is_symlink():
            entries.append(UserspaceEntry(path=rel, link=os.readlink(path)))
        else:
            entries.append(UserspaceEntry(path=rel, size=path.stat().st_size, sha256=digests[path]))
    return tuple(entries)


def find(reference: str | None, cache, engine_factory, *, import_image=None) -> Artifact:
    """The checked artifact of a modules image, an --output directory, or the newest build in
    the cache. A modules image whose build is not in the cache is read from the image by
    `import_image(reference, labels)` (which checks it and puts it there) when one is given."""
    if reference is None:
        newest: tuple[str, Path] | None = None
        for manifest_path in (cache.root / "results").glob("*/manifest.json"):
            try:
                created = read_manifest(manifest_path).created
            except ArtifactError:
                continue  # not a usable result: never the default
            if newest is None or created > newest[0]:
                newest = (created, manifest_path.parent)
        if newest is None:
            raise InputError("there are no built modules in the cache yet",
                             hint="build them first: cudabuild modules --kernel RELEASE --driver VERSION")
        return load(newest[1])
    hint = "pass a cudabuild/modules:... image, or the directory --output wrote"
    kind = path_kind(reference, "--modules", hint)
    if kind == "dir":
        return load(Path(reference).expanduser())
    if kind is not None:
        raise InputError(f"--modules {shown(reference)} is a file, not a modules image or directory", hint=hint)
    validate_image_ref(reference, "--modules")
    engine = engine_factory()
    if engine.image_id(reference) is None:
        raise InputError(f"--modules {shown(reference)}: neither a modules image nor a directory", hint=hint)
    labels = read_labels(engine.image(reference)["Config"].get("Labels"), reference)
    if labels is None:
        raise InputError(f"--modules {shown(reference)} is not a cudabuild modules image (it has no {LABEL_PREFIX} "
                         "labels)", hint=hint)
    result = cache.result(labels.key)
    if result is not None:
        return load(result)
    if import_image is None:
        raise InputError(f"{reference} was not built with this cache ({cache.root})",
                         hint="build it here with cudabuild modules, or pass the directory --output wrote")
    return import_image(reference, labels)


