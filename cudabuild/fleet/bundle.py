"""`cudabuild bundle`: a registry's modules images (a set of kernels and drivers), with their
signatures and attestations, copied into an OCI image layout on disk, for a site with no network:
`--registry oci:DIR` then reads it wherever a registry is read (install, stage, the driver
container, a build's pull). Blobs the layout already holds are not copied again, so a bundle can
be brought up to date in place. What is copied is checked against its digest on the way."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from cudabuild.node.staging import MODULES_REPOSITORY
from cudabuild.artifact.image import Blob
from cudabuild.errors import InputError, RegistryError, shown
from cudabuild.nvidia import version_tuple
from cudabuild.registry import ImageStore, OciLayout
from cudabuild.registry.layout import PREFIX
from cudabuild.ui import Report, Reporter


@dataclass(frozen=True)
class BundleRequest:
    registry: str
    output: str
    kernels: tuple[str, ...] = ()  # releases; () every kernel
    drivers: tuple[str, ...] = ()  # versions or branches; () every driver


def _wanted(tag: str, request: BundleRequest) -> bool:
    driver = tag.split("-", 1)[0]
    release = tag.replace("_", "+")
    kernel_ok = not request.kernels or any(release.endswith("-" + k) for k in request.kernels)
    driver_ok = not request.drivers or any(driver == d or driver.startswith(d + ".") for d in request.drivers)
    return kernel_ok and driver_ok


def bundle(request: BundleRequest, source: ImageStore, *, reporter: Reporter) -> Report:
    """Copy the wanted modules images of `source` into the layout at request.output."""
    output = Path(request.output).expanduser().absolute()
    if output.exists() and any(output.iterdir()) and not (output / "oci-layout").is_file():
        raise InputError(f"--output {shown(request.output)} is not empty and is not a bundle (no oci-layout)",
                         hint="pass a new directory, or an earlier bundle to bring it up to date")
    tags = [t for t in source.tags(MODULES_REPOSITORY) if not t.startswith("sha256-") and _wanted(t, request)]
    tags.sort(key=lambda t: (version_tuple(t.split("-", 1)[0]) if t[:1].isdigit() else (0,), t))
    if not tags:
        raise RegistryError(f"{source.repo}/{MODULES_REPOSITORY} has no modules image for "
                            + (f"the kernels {', '.join(request.kernels)}" if request.kernels else "any kernel")
                            + (f" and drivers {', '.join(request.drivers)}" if request.drivers else ""),
                            hint="push them first: cudabuild matrix --registry REPO --kernels ... --drivers ...",
                            exit_code=RegistryError.NOT_THERE)
    layout = OciLayout(PREFIX + str(output), create=True)
    copied, signed = [], 0
    with tempfile.TemporaryDirectory(prefix=".bundle-", dir=output) as work:
        for tag in tags:
            ref = f"{source.repo}/{MODULES_REPOSITORY}:{tag}"
            with reporter.step(f"copy {ref}"):
                digest = _copy(source, layout, ref, f"{layout.repo}/{MODULES_REPOSITORY}:{tag}", Path(work))
            extra = []
            for kind in ("sig", "att"):
                side = f"{source.repo}/{MODULES_REPOSITORY}:{digest.replace(':', '-')}.{kind}"
                with source.answers(side):
                    there = source.manifest_bytes(*source.name_and_tag(side)) is not None
                if there:
                    _copy(source, layout, side, f"{layout.repo}/{MODULES_REPOSITORY}:{side.rsplit(':', 1)[1]}",
                          Path(work))
                    extra.append(kind)
            signed += "sig" in extra
            copied.append({"tag": tag, "digest": digest, "signature": "sig" in extra, "attestations": "att" in extra})
    data = {"bundle": str(output), "registry": f"{PREFIX}{output}", "images": copied}
    lines = [f"{len(copied)} modules image(s) in {output} ({signed} signed)"]
    lines += [f"  {c['tag']}  {c['digest'][:19]}..." + ("  signed" if c["signature"] else "") for c in copied]
    lines.append(f"read it with --registry {PREFIX}{output} (install, stage, the driver container), or skopeo inspect "
                 f"oci:{output}:{MODULES_REPOSITORY}:TAG")
    return Report(data, lines)


def _copy(source: ImageStore, layout: OciLayout, ref: str, target: str, work: Path) -> str:
    """One manifest and its blobs from `source` into `layout`, each checked against its digest; its digest."""
    name, _ = source.name_and_tag(ref)
    with source.answers(ref):
        found = source.resolve(ref)
        if found is None:
            raise RegistryError(f"{ref} went away while the bundle was written", hint="run cudabuild bundle again")
        descriptors = [found.manifest["config"], *found.manifest.get("layers", [])]
        blobs = []
        for d in descriptors:
            digest, size = d["digest"], d["size"]
            if layout.has_blob("", digest):
                blobs.append(Blob(digest, size, d["mediaType"], path=layout.blob_path(digest)))
                continue
            dest = work / digest.split(":", 1)[1]
            if source.blob_to(name, digest, size, dest) != digest:
                raise RegistryError(f"a blob of {ref} did not match its digest {digest[:19]}...",
                                    hint="nothing was kept of it; run cudabuild bundle again")
            blobs.append(Blob(digest, size, d["mediaType"], path=dest))
    layout.put_artifact(target, found.raw, blobs)
    for blob in blobs:
        if blob.path is not None and blob.path.parent == work:
            blob.path.unlink(missing_ok=True)
    return found.digest
