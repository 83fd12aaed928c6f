"""A cudabuild image's labels: what a modules image says about the artifact in it, and what the
kernel-agnostic driver image says about the builds it installs."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from cudabuild.artifact.manifest import LABEL_PREFIX, NAME_RE, VERMAGIC_RE
from cudabuild.errors import ArtifactError, shown
from cudabuild.nvidia import FLAVORS, FULL_DRIVER_RE, MODULE_NAMES, RELEASE_RE
from cudabuild.options import SHA256_RE


# ---- image labels ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageLabels:
    """What a cudabuild image's labels say about the artifact in it."""

    key: str
    driver_version: str
    kernel_release: str
    vermagic: str
    flavor: str
    modules: tuple[tuple[str, str], ...]  # (file, sha256)
    profile: str | None = None
    boot_test: str | None = None  # 'accepted by RELEASE (tcg)'
    signer: str | None = None  # signed builds: the certificate's subject, and its sha256
    cert_sha256: str | None = None


_REQUIRED_LABELS = ("key", "driver-version", "kernel-release", "vermagic", "flavor", "modules")


def read_labels(labels: Mapping[str, str] | None, ref: str) -> ImageLabels | None:
    """The artifact labels of image `ref`; None when it has none (not made by cudabuild)."""
    labels = labels or {}
    ours = {k[len(LABEL_PREFIX) + 1:]: v for k, v in labels.items() if k.startswith(LABEL_PREFIX + ".")}
    if not any(name in ours for name in _REQUIRED_LABELS):
        return None
    missing = [f"{LABEL_PREFIX}.{name}" for name in _REQUIRED_LABELS if name not in ours]
    if missing:
        raise ArtifactError(f"image {ref} has some of cudabuild's labels but not {', '.join(missing)}",
                            hint="use an image made by cudabuild, unchanged")

    def bad(name: str) -> None:
        raise ArtifactError(f"image {ref}: label {LABEL_PREFIX}.{name} {shown(ours[name])} is not valid",
                            hint="use an image made by cudabuild, unchanged")

    if not SHA256_RE.fullmatch(ours["key"]):
        bad("key")
    if not FULL_DRIVER_RE.fullmatch(ours["driver-version"]):
        bad("driver-version")
    if not RELEASE_RE.fullmatch(ours["kernel-release"]):
        bad("kernel-release")
    if not VERMAGIC_RE.fullmatch(ours["vermagic"]):
        bad("vermagic")
    if ours["flavor"] not in FLAVORS:
        bad("flavor")
    modules = []
    for item in ours["modules"].split(","):
        file, sep, digest = item.partition("@sha256:")
        if not sep or file.removesuffix(".ko") not in MODULE_NAMES or not SHA256_RE.fullmatch(digest):
            bad("modules")
        modules.append((file, digest))
    profile = ours.get("profile")
    if profile is not None and not NAME_RE.fullmatch(profile):
        bad("profile")
    boot = ours.get("boot-test")
    if boot is not None and not re.fullmatch(r"(accepted|rejected) by [A-Za-z0-9._+-]+ \((tcg|kvm)\)", boot):
        bad("boot-test")
    cert = ours.get("cert-sha256")
    if cert is not None and not SHA256_RE.fullmatch(cert):
        bad("cert-sha256")
    signer = ours.get("signer")
    if signer is not None and (len(signer) > 256 or not signer.isprintable()):
        bad("signer")
    return ImageLabels(key=ours["key"], driver_version=ours["driver-version"], kernel_release=ours["kernel-release"],
                       vermagic=ours["vermagic"], flavor=ours["flavor"], modules=tuple(modules), profile=profile,
                       boot_test=boot, signer=signer, cert_sha256=cert)


# ---- the kernel-agnostic driver image's labels ------------------------------------------------------
def node_image_labels(*, driver: str, registry: str, profile: str) -> dict[str, str]:
    """The labels of a driver image that carries no artifact: the driver it installs (a version,
    a branch, or "any") and the registry it takes the builds from."""
    return {f"{LABEL_PREFIX}.role": "driver", f"{LABEL_PREFIX}.profile": profile,
            f"{LABEL_PREFIX}.node-driver": driver, f"{LABEL_PREFIX}.node-registry": registry}


def read_node_labels(labels: Mapping[str, str] | None) -> tuple[str, str] | None:
    """(driver, registry) of a kernel-agnostic driver image; None for any other image."""
    labels = labels or {}
    driver, registry = labels.get(f"{LABEL_PREFIX}.node-driver"), labels.get(f"{LABEL_PREFIX}.node-registry")
    if driver is None or registry is None or labels.get(f"{LABEL_PREFIX}.profile") != "driver":
        return None
    if not (driver == "any" or re.fullmatch(r"[0-9]{3}(\.[0-9]{1,4}){0,2}", driver)) or \
            not re.fullmatch(r"[A-Za-z0-9.:_/-]{1,255}", registry):
        raise ArtifactError(f"the driver image's labels {shown(driver)} / {shown(registry)} are not valid",
                            hint="use an image made by cudabuild image driver --registry, unchanged")
    return driver, registry


