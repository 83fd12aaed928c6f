"""The modules a command names with --modules: a modules image, an --output directory, or the
newest build in the cache; a modules image made elsewhere is taken in through artifact.admit
(compile/steps.import_image). Light on purpose: the driver container runs `install --modules DIR`
without the docker SDK, which only the image path loads."""

from __future__ import annotations

from cudabuild import artifact
from cudabuild.artifact import Artifact
from cudabuild.settings import Services


def find_modules(reference: str | None, services: Services, *, use_cache: bool = True,
                 verify_key: str | None = None) -> Artifact:
    """The checked artifact a command names with --modules: a modules image (its build in the
    cache, else read from the engine and admitted: compile/steps.import_image), an --output
    directory, or the newest build in the cache. `use_cache=False`: a directory is read where it
    is and an image must be in the cache already. With `verify_key` (a PEM file), the image is
    read from its registry or bundle and used only when signed by that key (steps.pull_signed)."""
    if verify_key:
        from cudabuild.compile import steps

        return steps.pull_signed(reference, services, verify_key)
    cache = services.cache if use_cache else None
    return artifact.find(reference, cache, services.engine,
                         import_image=(lambda ref, labels: _import_image(ref, labels, services))
                         if use_cache else None)


def _import_image(reference, labels, services) -> Artifact:
    from cudabuild.compile import steps

    return steps.import_image(reference, labels, services)
