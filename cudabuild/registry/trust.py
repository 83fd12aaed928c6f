"""Who made an image, and from what: cosign-compatible signatures and attestations, written with
`cryptography` and the store's own client (no cosign binary), and checked before anything of an
image is unpacked (FACTS.md, "Signatures a registry's users can check").

- **Signature**: the manifest tagged `sha256-HEX.sig` beside the image, one layer: the
  simple-signing payload (the image's manifest digest and repository), with an ECDSA P-256
  signature over its SHA-256 in the annotation `dev.cosignproject.cosign/signature`.
- **Attestations**: the manifest tagged `sha256-HEX.att`, one layer per statement: a DSSE envelope
  of an in-toto Statement v1 about the image's digest, signed over DSSE's PAE. Two statements: SLSA
  provenance v1 (what was built from what, by which builder and cudabuild) and an SPDX 2.3 SBOM
  (each module and userspace file, the packages they came from).

`cosign verify --key KEY.pub --insecure-ignore-tlog` and `cosign verify-attestation --type
slsaprovenance1|spdxjson` accept them offline. The private key is read from its file (an encrypted
PEM's passphrase from CUDABUILD_IMAGE_KEY_PASSWORD) and never written anywhere."""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from cudabuild.artifact.image import CONFIG_TYPE, Blob, manifest_of
from cudabuild.errors import InputError, TrustError, shown
from cudabuild.registry.store import ImageStore, Resolved

SIGNATURE_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"
DSSE_TYPE = "application/vnd.dsse.envelope.v1+json"
IN_TOTO = "application/vnd.in-toto+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
PROVENANCE = "https://slsa.dev/provenance/v1"
SPDX = "https://spdx.dev/Document"
BUILD_TYPE = "urn:cudabuild:modules:v1"
PASSPHRASE_ENV = "CUDABUILD_IMAGE_KEY_PASSWORD"
KEY_HINT = ("pass a PEM ECDSA P-256 private key, e.g. made with `openssl ecparam -name prime256v1 -genkey -noout "
            "-out image.key` (its public key: `openssl ec -in image.key -pubout -out image.pub`)")


# ---- keys ----------------------------------------------------------------------------------------
def load_signing_key(path: str, *, passphrase: str | None = None, what: str = "--sign-image"):
    """The ECDSA P-256 private key in the PEM file `path` (encrypted: `passphrase`, from
    CUDABUILD_IMAGE_KEY_PASSWORD). InputError, naming what is wrong, otherwise."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    data = _read(path, what)
    if b"SIGSTORE PRIVATE KEY" in data or b"COSIGN PRIVATE KEY" in data:
        raise InputError(f"{what} {shown(path)} is a key in cosign's own encrypted format, which cudabuild does not "
                         "read", hint=KEY_HINT)
    try:
        key = load_pem_private_key(data, password=passphrase.encode() if passphrase else None)
    except TypeError as exc:
        needs = "is encrypted: set its passphrase in " + PASSPHRASE_ENV if "encrypted" in str(exc) else \
            "is not encrypted: unset " + PASSPHRASE_ENV
        raise InputError(f"{what} {shown(path)} {needs}", hint=KEY_HINT) from exc
    except ValueError as exc:
        raise InputError(f"{what} {shown(path)} is not a PEM private key cudabuild can read, or its passphrase "
                         f"({PASSPHRASE_ENV}) is wrong", hint=KEY_HINT) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise InputError(f"{what} {shown(path)} is not an ECDSA P-256 key (cosign's kind)", hint=KEY_HINT)
    return key


def load_verify_key(path: str, *, what: str = "--verify-key") -> str:
    """The PEM text of the ECDSA P-256 public key in the file `path` (cosign.pub, or `openssl ec
    -pubout`'s), checked."""
    data = _read(path, what)
    public_key(data, what=f"{what} {shown(path)}")
    return data.decode()


def public_key(data: bytes, *, what: str):
    """The ECDSA P-256 public key of PEM `data`; InputError naming `what` otherwise."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(data)
    except ValueError as exc:
        raise InputError(f"{what} is not a PEM public key", hint="pass the public key the images were signed "
                         "for (cosign.pub, or `openssl ec -in image.key -pubout`)") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise InputError(f"{what} is not an ECDSA P-256 public key", hint=KEY_HINT)
    return key


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise InputError(f"{what} {shown(path)}: {exc.strerror or exc}", hint=KEY_HINT) from exc


def _sign(key, data: bytes) -> str:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    return base64.b64encode(key.sign(data, ec.ECDSA(hashes.SHA256()))).decode()


def _valid(public, data: bytes, signature: str) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        public.verify(base64.b64decode(signature, validate=True), data, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def _pae(payload_type: str, body: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what an envelope's signature is over."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(body), body)


# ---- the formats -------------------------------------------------------------------------------
def simple_signing(repository: str, digest: str) -> bytes:
    return json.dumps({"critical": {"identity": {"docker-reference": repository},
                                    "image": {"docker-manifest-digest": digest},
                                    "type": "cosign container image signature"},
                       "optional": None}, separators=(",", ":")).encode()


def statement(digest: str, name: str, predicate_type: str, predicate: dict) -> dict:
    return {"_type": "https://in-toto.io/Statement/v1",
            "subject": [{"name": name, "digest": {"sha256": digest.split(":", 1)[1]}}],
            "predicateType": predicate_type, "predicate": predicate}


def _cosign_manifest(layers: list[Blob]) -> tuple[bytes, list[Blob]]:
    """The manifest cosign writes for its signature and attestation images: a config naming the
    layers' digests as their diff IDs, and the layers."""
    config = json.dumps({"architecture": "", "created": "0001-01-01T00:00:00Z",
                         "history": [{"created": "0001-01-01T00:00:00Z"}], "os": "",
                         "rootfs": {"type": "layers", "diff_ids": [layer.digest for layer in layers]},
                         "config": {}}, separators=(",", ":")).encode()
    config_blob = Blob.of(config, CONFIG_TYPE)
    return manifest_of(config_blob, layers), [*layers, config_blob]


def _tag(digest: str, kind: str) -> str:
    return f"{digest.replace(':', '-')}.{kind}"


# ---- signing -------------------------------------------------------------------------------------
def sign_image(store: ImageStore, ref: str, digest: str, key, statements: list[dict]) -> list[str]:
    """The signature of `ref`'s manifest `digest`, and its attestations (`statements`), pushed
    beside it; the tags written."""
    repository = ref.rsplit(":", 1)[0]
    payload = simple_signing(repository, digest)
    signature = Blob.of(payload, SIGNATURE_TYPE, **{SIGNATURE_ANNOTATION: _sign(key, payload)})
    manifest, blobs = _cosign_manifest([signature])
    written = [f"{repository}:{_tag(digest, 'sig')}"]
    store.put_artifact(written[0], manifest, blobs)
    if statements:
        layers = []
        for made in statements:
            body = json.dumps(made, separators=(",", ":")).encode()
            envelope = {"payloadType": IN_TOTO, "payload": base64.b64encode(body).decode(),
                        "signatures": [{"keyid": "", "sig": _sign(key, _pae(IN_TOTO, body))}]}
            layers.append(Blob.of(json.dumps(envelope, separators=(",", ":")).encode(), DSSE_TYPE,
                                  **{"predicateType": made["predicateType"], SIGNATURE_ANNOTATION: ""}))
        manifest, blobs = _cosign_manifest(layers)
        written.append(f"{repository}:{_tag(digest, 'att')}")
        store.put_artifact(written[1], manifest, blobs)
    return written


# ---- verifying ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Verified:
    digest: str
    provenance: dict | None  # the SLSA predicate, when the image has one signed by the key


def verify_image(store: ImageStore, found: Resolved, public) -> Verified:
    """That `found` (a resolved image) is signed by `public`, and that its signed provenance names
    the build its labels say; TrustError with the reason otherwise. Nothing of the image is
    fetched but its manifest and config."""
    repository = found.ref.rsplit(":", 1)[0]
    hint = (f"use an image signed by this key (cudabuild modules --registry ... --sign-image KEY), or check with "
            f"`cosign verify --key KEY.pub --insecure-ignore-tlog {repository}@{found.digest}`")
    sig = store.resolve(f"{repository}:{_tag(found.digest, 'sig')}")
    if sig is None:
        raise TrustError(f"{found.ref} is not signed: the registry has no signature for {found.digest[:19]}...",
                         hint=hint)
    name, _ = store.name_and_tag(found.ref)
    signed = False
    for layer in sig.manifest.get("layers") or []:
        annotation = (layer.get("annotations") or {}).get(SIGNATURE_ANNOTATION)
        if layer.get("mediaType") != SIGNATURE_TYPE or not isinstance(annotation, str) or layer.get("size", 0) > 1 << 16:
            continue
        payload = store.blob_bytes(name, layer["digest"])
        if not _valid(public, payload, annotation):
            continue
        try:
            said = json.loads(payload)["critical"]["image"]["docker-manifest-digest"]
        except (ValueError, KeyError, TypeError):
            continue
        if said == found.digest:
            signed = True
            break
    if not signed:
        raise TrustError(f"{found.ref} is not signed by this key: no signature of {found.digest[:19]}... verifies "
                         "with it", hint=hint)
    provenance = _provenance(store, name, repository, found, public)
    if provenance is not None:
        _provenance_matches(found, provenance, hint)
    return Verified(found.digest, provenance)


def _provenance(store: ImageStore, name: str, repository: str, found: Resolved, public) -> dict | None:
    att = store.resolve(f"{repository}:{_tag(found.digest, 'att')}")
    if att is None:
        return None
    for layer in att.manifest.get("layers") or []:
        if layer.get("mediaType") != DSSE_TYPE or (layer.get("annotations") or {}).get("predicateType") != PROVENANCE:
            continue
        try:
            envelope = json.loads(store.blob_bytes(name, layer["digest"]))
            body = base64.b64decode(envelope["payload"], validate=True)
            ok = envelope.get("payloadType") == IN_TOTO and any(
                _valid(public, _pae(IN_TOTO, body), s.get("sig", "")) for s in envelope.get("signatures") or [])
            said = json.loads(body) if ok else None
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
        if said and said.get("predicateType") == PROVENANCE and any(
                s.get("digest", {}).get("sha256") == found.digest.split(":", 1)[1] for s in said.get("subject") or []):
            return said.get("predicate") or {}
    return None


def _provenance_matches(found: Resolved, predicate: dict, hint: str) -> None:
    """The provenance's build (kernel, driver, flavour, key, modules) against the image's labels."""
    from cudabuild.artifact import LABEL_PREFIX

    params = (predicate.get("buildDefinition") or {}).get("externalParameters") or {}
    said = {"kernel-release": params.get("kernelRelease"), "driver-version": params.get("driverVersion"),
            "flavor": params.get("flavor"), "key": params.get("key"), "modules": params.get("modules")}
    for label, value in said.items():
        labelled = found.labels.get(f"{LABEL_PREFIX}.{label}")
        if value != labelled:
            raise TrustError(f"{found.ref}'s signed provenance contradicts its labels: {label} is {shown(value)} in "
                             f"the provenance, {shown(labelled)} in the labels", hint=hint)


# ---- what the statements say --------------------------------------------------------------------
def provenance(manifest, *, options: dict, started: str | None, finished: str | None) -> dict:
    """SLSA provenance v1 of a modules build: its parameters, the packages or installer it was made
    from by sha256, the builder image, cudabuild's version."""
    import cudabuild

    deps = [{"name": p["name"], "digest": {"sha256": p["sha256"]},
             "annotations": {"version": p.get("version", ""), "role": role}}
            for role, p in _packages(manifest) if p.get("sha256")]
    kernel = manifest.kernel_source or {}
    if kernel.get("kind") == "git" and kernel.get("commit"):
        deps.append({"name": kernel.get("tag", "kernel"), "uri": kernel.get("repo", ""),
                     "digest": {"gitCommit": kernel["commit"]}, "annotations": {"role": "kernel"}})
    builder = manifest.builder_image or {}
    if builder.get("id"):
        deps.append({"name": builder.get("tag", "builder"), "digest": {"sha256": builder["id"].split(":", 1)[-1]},
                     "annotations": {"role": "builder image", "base": builder.get("base", "")}})
    metadata = {k: v for k, v in {"startedOn": started, "finishedOn": finished}.items() if v}
    return {"buildDefinition": {"buildType": BUILD_TYPE,
                                "externalParameters": {"kernelRelease": manifest.kernel_release,
                                                       "driverVersion": manifest.driver_version,
                                                       "flavor": manifest.flavor, "key": manifest.key,
                                                       "modules": manifest.labels()["io.cudabuild.modules"],
                                                       "options": options},
                                "resolvedDependencies": deps},
            "runDetails": {"builder": {"id": f"urn:cudabuild:{cudabuild.__version__}",
                                       "version": {"cudabuild": cudabuild.__version__}},
                           "metadata": metadata}}


def _packages(manifest) -> list[tuple[str, dict]]:
    """(role, {name, version, sha256}) of every input the manifest records."""
    found = []
    kernel, driver = manifest.kernel_source or {}, manifest.driver_source or {}
    for p in kernel.get("packages") or []:
        found.append(("kernel", p))
    if kernel.get("sha256"):
        found.append(("kernel", {"name": kernel.get("tag") or kernel.get("kind", "kernel"), "sha256": kernel["sha256"]}))
    if isinstance(driver.get("package"), dict):
        found.append(("driver", driver["package"]))
    for p in driver.get("userspace") or []:
        found.append(("userspace", p))
    if driver.get("sha256"):
        found.append(("driver", {"name": driver.get("file") or driver.get("url") or "installer",
                                 "version": manifest.driver_version, "sha256": driver["sha256"]}))
    return found


_NVIDIA = "LicenseRef-NVIDIA-Software-License"


def _licence(role: str, name: str, flavor: str) -> str:
    if role == "kernel":
        return "GPL-2.0-only"
    if role == "driver" and flavor == "open":
        return "MIT OR GPL-2.0-only"
    return _NVIDIA


def _came_from(rel: str, inputs: list[tuple[str, dict]]) -> int | None:
    """The index in `inputs` of the package a file of the artifact came from: a module from the
    driver's source (package or installer); a userspace file from the one userspace package its
    name gives (libNAME.so.* from libNAME or libNAME + its SONAME digits, bin/NAME from NAME,
    firmware from the firmware package), else from the installer; None when none is told."""
    import re

    driver = [n for n, (role, _) in enumerate(inputs) if role == "driver"]
    if rel.startswith("modules/"):
        return driver[0] if driver else None
    userspace = [(n, p["name"]) for n, (role, p) in enumerate(inputs) if role == "userspace"]
    if not userspace:  # an installer: every file comes from it
        return driver[-1] if driver else None
    name = rel.rsplit("/", 1)[-1]
    if rel.startswith("userspace/firmware/"):
        found = [n for n, package in userspace if "firmware" in package]
    elif rel.startswith("userspace/bin/"):
        found = [n for n, package in userspace if package == name]
    else:
        stem = name.split(".so", 1)[0]
        found = [n for n, package in userspace if re.fullmatch(re.escape(stem) + r"[0-9]*", package)]
    return found[0] if len(found) == 1 else None


def sbom(artifact, *, name: str) -> dict:
    """An SPDX 2.3 document of what the image carries: each module and userspace file with its
    SHA-256 (and SHA-1, which SPDX asks of a file), the packages they came from, their licences."""
    m = artifact.manifest
    packages, relationships = [], []
    for n, (role, p) in enumerate(_packages(m)):
        spdx_id = f"SPDXRef-Package-{n}"
        packages.append({"SPDXID": spdx_id, "name": p["name"], "versionInfo": p.get("version") or m.driver_version,
                         "downloadLocation": "NOASSERTION", "filesAnalyzed": False,
                         "licenseConcluded": "NOASSERTION", "licenseDeclared": _licence(role, p["name"], m.flavor),
                         "copyrightText": "NOASSERTION", "comment": f"cudabuild input: {role}",
                         **({"checksums": [{"algorithm": "SHA256", "checksumValue": p["sha256"]}]}
                            if p.get("sha256") else {})})
        relationships.append({"spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES",
                              "relatedSpdxElement": spdx_id})
    inputs = _packages(m)
    files = []
    for n, (rel, entry) in enumerate(artifact.files()):
        path = artifact.root / rel
        if path.is_symlink():
            continue
        sha1 = hashlib.sha1(usedforsecurity=False)
        with open(path, "rb") as data:
            for chunk in iter(lambda: data.read(1 << 20), b""):
                sha1.update(chunk)
        spdx_id = f"SPDXRef-File-{n}"
        files.append({"SPDXID": spdx_id, "fileName": f"./{rel}",
                      "checksums": [{"algorithm": "SHA256", "checksumValue": entry.sha256},
                                    {"algorithm": "SHA1", "checksumValue": sha1.hexdigest()}],
                      "licenseConcluded": "NOASSERTION", "copyrightText": "NOASSERTION"})
        source = _came_from(rel, inputs)
        if source is not None:
            relationships.append({"spdxElementId": spdx_id, "relationshipType": "GENERATED_FROM"
                                  if rel.startswith("modules/") else "CONTAINED_BY",
                                  "relatedSpdxElement": f"SPDXRef-Package-{source}"})
    return {"spdxVersion": "SPDX-2.3", "dataLicense": "CC0-1.0", "SPDXID": "SPDXRef-DOCUMENT", "name": name,
            "documentNamespace": f"urn:cudabuild:spdx:{m.key}",
            "creationInfo": {"created": m.created.replace("+00:00", "Z"), "creators": ["Tool: cudabuild"]},
            "packages": packages, "files": files, "relationships": relationships,
            "hasExtractedLicensingInfos": [{"licenseId": _NVIDIA, "name": "NVIDIA Software License",
                                            "extractedText": "The NVIDIA driver's licence, as its package ships it."}]}


def require_signed(store: ImageStore, pem: str | None):
    """The check a pull asks before it fetches a layer (`accept`): signed by the PEM public key
    `pem` (load_verify_key's); None when no key is asked for."""
    if not pem:
        return None
    public = public_key(pem.encode(), what="the verification key")
    return lambda found: verify_image(store, found, public)
