"""The one way in for a build made elsewhere: a registry's modules image pulled for a build here
(compile), a modules image `docker pull`ed or made on another machine (`--modules IMAGE`), and a
registry's build staged on a node. Each comes through `admit`, which refuses for one reason in
one place:

1. the image's layer is unpacked, bounded, only what an artifact holds (the caller's `unpack`);
2. the directory is loaded as every artifact is (every digest, the driver's file names, vermagic
   and version);
3. the image's labels describe the manifest's build (its key and every module's digest);
4. it is the build that was asked for (`expect`), and it passes what this machine can check
   (`check`: the kernel's symbol CRCs);
5. only then is it kept (`keep`: the cache, or the node's staged builds), and the work directory is
   removed whatever happened: a refusal leaves nothing behind."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cudabuild.artifact.labels import ImageLabels
from cudabuild.artifact.manifest import LABEL_PREFIX
from cudabuild.artifact.manifest import Manifest
from cudabuild.artifact.tree import Artifact, load
from cudabuild.errors import ArtifactError, VerifyError


@dataclass(frozen=True)
class Intake:
    """How one outside build comes in: what it is called in every message, the step that brings
    its layer, and what a refusal tells the user to do."""

    ref: str
    fetch_step: str  # e.g. "pull REF (the registry has this build)"
    verify_step: str  # e.g. "verify pulled modules (digests, vermagic, version, symbol CRCs)"
    refused_as: str  # e.g. "the registry's REF": "refused the registry's REF: ..."
    hint: str  # what to do after a refusal

    def refuse(self, exc: ArtifactError | VerifyError) -> VerifyError:
        """The refusal of this build for `exc`'s reason (exit 7)."""
        return VerifyError(f"refused {self.refused_as}: {exc.message}", hint=self.hint)


def labels_match(labels: ImageLabels | None, manifest: Manifest) -> None:
    """The labels an image carries describe the build in its layer: the same key, the same modules
    with the same digests. An image without cudabuild's labels is refused."""
    if labels is None:
        raise VerifyError(f"it has no {LABEL_PREFIX} labels: its labels describe another build than its manifest")
    if labels.key != manifest.key:
        raise VerifyError(f"its labels describe another build than its manifest (key {labels.key[:16]}..., the "
                          f"manifest's {manifest.key[:16]}...)")
    listed = tuple((e.file, e.sha256) for e in manifest.modules)
    if listed != labels.modules:
        said, theirs = dict(labels.modules), dict(listed)
        differ = sorted({f for f in said.keys() | theirs.keys() if said.get(f) != theirs.get(f)})
        raise VerifyError("its labels describe another build than its manifest: "
                          + ", ".join(f"{f}'s sha256 differs" if f in said and f in theirs else
                                      f"{f} is in {'the labels' if f in said else 'the manifest'} only"
                                      for f in differ))


def admit(intake: Intake, work: Path, *, unpack: Callable[[Path], ImageLabels | None], reporter,
          keep: Callable[[Artifact], Artifact], discard: Callable[[Path], None],
          expect: Callable[[Manifest], None] | None = None,
          check: Callable[[Artifact, Path], None] | None = None) -> Artifact:
    """Bring an outside build in through `work` (a directory of its own): `unpack(out)` writes the
    artifact into `out` and returns the labels it came with; `expect(manifest)` refuses a build that
    is not the one asked for; `check(artifact, work)` what this machine can verify more; `keep` moves
    the checked artifact where it serves and returns it there. `discard(work)` runs whatever happens."""
    out = work / "out"
    try:
        with reporter.step(intake.fetch_step):
            labels = unpack(out)
        with reporter.step(intake.verify_step):
            try:
                made = load(out)
                labels_match(labels, made.manifest)
                if expect is not None:
                    expect(made.manifest)
                if check is not None:
                    check(made, work)
            except (ArtifactError, VerifyError) as exc:
                raise intake.refuse(exc) from exc
        return keep(made)
    finally:
        discard(work)
