"""`cudabuild inspect`: the driver, kernel and modules of a runtime image, a modules image, an
artifact directory or a .ko, and whether they match this host's kernel. Directories are checked
like every artifact a command reads; images are described by their labels, read through the one
artifact module."""

from __future__ import annotations

import platform
from pathlib import Path

from cudabuild import artifact
from cudabuild.ui import Report
from cudabuild.errors import InputError, VerifyError, shown
from cudabuild.nvidia import expected_modules
from cudabuild.options import path_kind, validate_image_ref
from cudabuild.verify import read_module

HINT = "pass a runtime or modules image, the directory `cudabuild modules --output` wrote, or a .ko"


def _signed(manifest) -> dict | None:
    s = manifest.signature
    return {"signer": s["signer"], "key_id": s["key_id"], "cert_sha256": s["cert_sha256"], "hash": s["hash"]} \
        if s else None


def inspect(target: str, engine_factory, *, verify: bool = False, cache=None) -> dict:
    """The report of `target`. With `verify`, an image's artifact in the cache is checked like a
    directory (every digest, every module's vermagic, version and signature)."""
    kind = path_kind(target, "inspect", HINT)
    if kind == "file":
        path = Path(target).expanduser()
        if path.suffix != ".ko":
            raise InputError(f"{shown(target)} is neither a .ko file nor a directory with manifest.json", hint=HINT)
        try:
            info = read_module(path)
        except VerifyError as exc:
            raise InputError(exc.message, hint="pass a kernel module (.ko) built for Linux") from exc
        from cudabuild.signing import is_signed

        report = {"kind": "module", "driver_version": info.version, "kernel_release": info.vermagic.split(" ")[0],
                  "vermagic": info.vermagic, "modules": [info.to_json()],
                  "signed": {"signer": None} if is_signed(path) else None}
    elif kind == "dir":
        manifest = artifact.load(Path(target).expanduser()).manifest
        report = {"kind": "directory", "driver_version": manifest.driver_version,
                  "kernel_release": manifest.kernel_release, "vermagic": manifest.vermagic, "verified": True,
                  "boot_test": manifest.boot_summary, "signed": _signed(manifest),
                  "modules": [{k: v for k, v in m.to_json().items() if k in ("name", "file", "size", "sha256", "version")}
                              for m in manifest.modules]}
    elif kind == "other":
        raise InputError(f"{shown(target)} is neither a file nor a directory", hint=HINT)
    else:
        validate_image_ref(target, "inspect: no such file or directory, and")
        engine = engine_factory()
        if engine.image_id(target) is None:
            raise InputError(f"{shown(target)}: no such file, directory or image", hint="check the name")
        labels = artifact.read_labels(engine.image(target)["Config"].get("Labels"), target)
        if labels is None:
            raise InputError(f"{target} was not made by cudabuild (it has no {artifact.LABEL_PREFIX} labels)",
                             hint=HINT)
        report = {"kind": "runtime image" if labels.profile else "modules image", "image": target,
                  "driver_version": labels.driver_version, "kernel_release": labels.kernel_release,
                  "vermagic": labels.vermagic, "boot_test": labels.boot_test,
                  "signed": {"signer": labels.signer, "cert_sha256": labels.cert_sha256} if labels.cert_sha256 else None,
                  "modules": [{"name": file.removesuffix(".ko"), "file": file, "sha256": digest}
                              for file, digest in labels.modules]}
        if verify:
            checked = artifact.find(target, cache, lambda: engine)
            report["verified"] = True
            report["signed"] = _signed(checked.manifest)
            report["cache_dir"] = str(checked.root)
    if report["kind"] != "module":  # a build of fewer modules than the driver has (--only-modules)
        names = {m["name"] for m in report["modules"]}
        report["modules_left_out"] = [name for name in expected_modules(report["driver_version"]) if name not in names]
    host = platform.release()
    report["host_kernel_release"] = host
    report["matches_host"] = report["kernel_release"] == host
    return report


def inspected(target: str, services, *, verify: bool = False) -> Report:
    """`cudabuild inspect`: the report, with the text people read."""
    report = inspect(target, services.engine, verify=verify, cache=services.cache if verify else None)
    lines = [f"{target} ({report['kind']})", f"  driver:  {report['driver_version']}",
             f"  kernel:  {report['kernel_release']} (vermagic {report['vermagic'].strip()})"]
    match = "yes" if report["matches_host"] else f"no, this host runs {report['host_kernel_release']}"
    lines.append(f"  matches this host's kernel: {match}")
    lines.append(f"  boot test: {report.get('boot_test') or 'not run (cudabuild boot-test)'}")
    signed = report.get("signed")
    if signed is None:
        lines.append("  signed:  no (a kernel that enforces signatures refuses these modules)")
    else:
        lines.append(f"  signed:  by {signed.get('signer') or 'a key (its signer is not recorded here)'}"
                     + (f", certificate sha256 {signed['cert_sha256']}" if signed.get("cert_sha256") else ""))
    if report.get("verified"):
        where = "" if report["kind"] == "directory" else " (its artifact in the cache)"
        lines.append(f"  verified: every file's digest{', every signature' if signed else ''}{where}")
    if report.get("modules_left_out"):
        lines.append(f"  modules: {', '.join(m['name'] for m in report['modules'])} (built with --only-modules; "
                     f"not {', '.join(report['modules_left_out'])})")
    for m in report["modules"]:
        size = f"{m['size'] / 1024**2:7.1f} MiB  " if "size" in m else ""
        lines.append(f"  {m['file']:<20} {size}sha256:{m['sha256']}")
    return Report(report, lines)
