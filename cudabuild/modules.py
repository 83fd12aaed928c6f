"""Phase 1: `cudabuild modules` as a library call. Resolve what to build, answer from the cache
when it can, otherwise download on the host, build in a disposable container, verify on the
host, publish atomically into the cache and as a one-layer modules image."""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import cudabuild
from cudabuild.builder import (BASE_BY_GCC, ensure_builder, plan_builder, render_template, run_build,
                               tar_context)
from cudabuild.cache import Cache, default_cache_dir, key_of
from cudabuild.debian import DebianArchive
from cudabuild.engine import LABEL_PREFIX, Engine, Mount
from cudabuild.errors import InputError, VerifyError
from cudabuild.fetch import Fetcher, sha256_file
from cudabuild.spec import BuildSpec, ModulesOptions, expected_modules, validate_release
from cudabuild.ui import Reporter
from cudabuild.verify import config_enabled, verify_modules

MODULES_REPO = "cudabuild/modules"


@dataclass
class ModulesResult:
    kernel_release: str
    driver_version: str
    flavor: str
    cache_hit: bool
    result_dir: Path
    manifest: dict
    modules_image: str
    output_dir: Path | None
    steps: list = field(default_factory=list)

    def as_json(self) -> dict:
        return {
            "kernel_release": self.kernel_release,
            "driver_version": self.driver_version,
            "flavor": self.flavor,
            "cache_hit": self.cache_hit,
            "modules_image": self.modules_image,
            "output_dir": str(self.output_dir) if self.output_dir else None,
            "cache_dir": str(self.result_dir),
            "modules": [{"name": m["name"], "path": str(self.result_dir / "modules" / m["file"]),
                         "vermagic": m["vermagic"], "version": m["version"], "sha256": m["sha256"],
                         "size": m["size"]} for m in self.manifest["modules"]],
            "steps": [{"name": s.name, "seconds": s.seconds, "status": s.status} for s in self.steps],
        }


def modules_image_tag(driver_version: str, flavor: str, release: str) -> str:
    flavour = "" if flavor == "proprietary" else f"-{flavor}"
    return f"{MODULES_REPO}:{driver_version}{flavour}-{release}".replace("+", "_")


def build_modules(options: ModulesOptions, *, env: Mapping[str, str], reporter: Reporter,
                  engine_factory: Callable[[], Engine] | None = None) -> ModulesResult:
    cache = Cache(default_cache_dir(env))
    engine = (engine_factory or (lambda: Engine.from_env(env)))()
    fetcher = Fetcher(reporter=reporter)
    archive = DebianArchive(cache=cache, fetcher=fetcher, reporter=reporter, mirror=options.apt_mirror,
                            security_mirror=options.apt_security_mirror, distribution=options.distribution,
                            refresh=options.refresh_index)

    # ---- resolve ---------------------------------------------------------------------------
    if options.kernel is None:
        release = validate_release(platform.release(), what="this host's kernel release")
        reporter.note(f"kernel: {release} (this host's `uname -r`; pass --kernel to build for another)")
    elif options.kernel == "latest":
        release = archive.latest_kernel()
        reporter.note(f"kernel: {release} (the newest headers in Debian {options.distribution})")
    else:
        release = options.kernel
    kernel_packages, gcc_major = archive.kernel_packages(release)
    source, userspace, driver_version = archive.driver_packages(options.driver, options.flavor, release)
    how = "newest known to support this kernel" if options.driver is None else f"from --driver {options.driver}"
    reporter.note(f"driver: {driver_version} {options.flavor} ({source.name} {source.version}; {how})")

    base, distribution = BASE_BY_GCC.get(gcc_major, (None, options.distribution))
    if options.builder_base:
        base = options.builder_base
    elif base is None:
        raise InputError(f"kernel {release} was built with gcc {gcc_major}, and cudabuild knows no builder "
                         "base image with that compiler",
                         hint="pass --builder-base IMAGE naming an image whose gcc has that major version")
    reporter.note(f"builder base: {base} (gcc {gcc_major}, the kernel's own compiler)")
    builder = plan_builder(engine, base=base, distribution=distribution, gcc_major=gcc_major,
                           mirror=options.apt_mirror, security_mirror=options.apt_security_mirror)
    spec = BuildSpec(kernel_release=release, driver_version=driver_version, flavor=options.flavor,
                     kernel_packages=tuple(kernel_packages), driver_package=source,
                     userspace_packages=tuple(userspace), builder_tag=builder.tag,
                     modules=tuple(expected_modules(driver_version)), gcc_major=gcc_major)
    key = key_of(spec.canonical())
    tag = modules_image_tag(driver_version, options.flavor, release)

    # ---- the cache -------------------------------------------------------------------------
    hit = cache.result(key) if options.use_cache else None
    if hit is None:
        lock = cache.acquire(key, on_wait=lambda: reporter.note(
            "another cudabuild is building the same modules; waiting for it"))
        try:
            hit = cache.result(key) if options.use_cache else None  # it may have finished meanwhile
            if hit is None:
                _build(spec, key, cache=cache, engine=engine, fetcher=fetcher, builder=builder,
                       options=options, reporter=reporter)
                result_dir, cache_hit = cache.result_dir(key), False
            else:
                result_dir, cache_hit = hit, True
        finally:
            lock.release()
    else:
        result_dir, cache_hit = hit, True
    if cache_hit:
        reporter.cached("build modules", f"cached result {result_dir}")
    manifest = json.loads((result_dir / "manifest.json").read_text())

    # ---- publish ---------------------------------------------------------------------------
    publish_image(engine, result_dir, manifest, tag=tag, key=key, reporter=reporter)
    output = Path(options.output).resolve() if options.output else None
    if output:
        copy_result(result_dir, output)
        reporter.note(f"copied the modules, userspace and manifest to {output}")
    return ModulesResult(kernel_release=release, driver_version=driver_version, flavor=options.flavor,
                         cache_hit=cache_hit, result_dir=result_dir, manifest=manifest, modules_image=tag,
                         output_dir=output, steps=list(reporter.steps))


def _build(spec: BuildSpec, key: str, *, cache: Cache, engine: Engine, fetcher: Fetcher, builder,
           options: ModulesOptions, reporter: Reporter) -> None:
    cache.check_space()
    cache.reap_stale()
    started = time.monotonic()
    packages = [*spec.kernel_packages, spec.driver_package, *spec.userspace_packages]
    with reporter.step(f"download {len(packages)} packages "
                       f"({sum(p.size for p in packages) / 1024**2:.0f} MiB, cached by content)"):
        paths = {p.name: fetcher.fetch(p.url, store=cache.downloads, sha256=p.sha256, size=p.size,
                                       label=p.filename.rsplit("/", 1)[-1]) for p in packages}
    image_id = ensure_builder(engine, builder, reporter, verbose=options.verbose)

    def inside(p) -> str:
        return f"/cudabuild/inputs/{paths[p.name].name}"

    kernel_key = key_of([p.sha256 for p in spec.kernel_packages])[:24]
    work = cache.workdir(key[:16])
    log_path = cache.logs / f"{key[:16]}-{datetime.now().strftime('%Y%m%dT%H%M%S')}.log"
    try:
        run_build(engine, image=builder.tag, reporter=reporter, verbose=options.verbose, log_path=log_path,
                  mounts=[Mount(str(cache.downloads), "/cudabuild/inputs"),
                          Mount(str(cache.kernels), "/cudabuild/kernels", read_only=False),
                          Mount(str(work), "/cudabuild/work", read_only=False)],
                  environment={
                      "KERNEL_SOURCE": options.kernel_source,
                      "DRIVER_SOURCE": options.driver_source,
                      "KERNEL_RELEASE": spec.kernel_release,
                      "KERNEL_DEBS": " ".join(inside(p) for p in spec.kernel_packages),
                      "KERNEL_TREE": f"/cudabuild/kernels/debian-{kernel_key}",
                      "DRIVER_DEB": inside(spec.driver_package),
                      "USERSPACE_DEBS": " ".join(inside(p) for p in spec.userspace_packages),
                      "MODULES": " ".join(spec.modules),
                      "JOBS": str(options.jobs),
                      "WORK": "/cudabuild/work",
                  })
        out = work / "out"
        headers = cache.kernels / f"debian-{kernel_key}" / "usr" / "src" / f"linux-headers-{spec.kernel_release}"
        with reporter.step("verify modules (vermagic, version, symbol CRCs)"):
            modversions = config_enabled(headers / ".config", "CONFIG_MODVERSIONS")
            infos = verify_modules(out / "modules", release=spec.kernel_release,
                                   driver_version=spec.driver_version, expected=list(spec.modules),
                                   symvers=headers / "Module.symvers" if modversions else None,
                                   modversions=modversions)
        manifest = {
            "format": 1,
            "cudabuild_version": cudabuild.__version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "key": key,
            "kernel_release": spec.kernel_release,
            "driver_version": spec.driver_version,
            "flavor": spec.flavor,
            "vermagic": infos[0].vermagic,
            "modversions": modversions,
            "kernel_source": {"kind": "debian", "packages": [_pkg(p) for p in spec.kernel_packages]},
            "driver_source": {"kind": "debian", "package": _pkg(spec.driver_package)},
            "modules": [i.as_json() for i in infos],
            "userspace": _userspace_listing(out / "userspace"),
            "userspace_packages": [_pkg(p) for p in spec.userspace_packages],
            "builder_image": {"tag": builder.tag, "id": image_id, "base": builder.base},
            "build_seconds": round(time.monotonic() - started, 1),
        }
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        shutil.copy2(log_path, out / "build.log")
        cache.publish(out, key)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _pkg(p) -> dict:
    return {"name": p.name, "version": p.version, "sha256": p.sha256}


def _userspace_listing(root: Path) -> list[dict]:
    listing = []
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            listing.append({"path": rel, "link": os.readlink(path)})
        elif path.is_file():
            listing.append({"path": rel, "size": path.stat().st_size, "sha256": sha256_file(path)})
    return listing


def publish_image(engine: Engine, result_dir: Path, manifest: dict, *, tag: str, key: str,
                  reporter: Reporter) -> None:
    """The modules image: FROM scratch, one layer with modules/, userspace/ and manifest.json."""
    existing = engine.image_id(tag)
    if existing and engine.image(tag)["Config"].get("Labels", {}).get(f"{LABEL_PREFIX}.key") == key:
        reporter.cached("modules image", tag)
        return
    labels = {
        "org.opencontainers.image.title": "NVIDIA kernel modules",
        "org.opencontainers.image.version": manifest["driver_version"],
        "org.opencontainers.image.created": manifest["created"],
        "org.opencontainers.image.description":
            f"NVIDIA {manifest['driver_version']} modules for Linux {manifest['kernel_release']}, built by cudabuild",
        f"{LABEL_PREFIX}.key": key,
        f"{LABEL_PREFIX}.driver-version": manifest["driver_version"],
        f"{LABEL_PREFIX}.kernel-release": manifest["kernel_release"],
        f"{LABEL_PREFIX}.vermagic": manifest["vermagic"],
        f"{LABEL_PREFIX}.flavor": manifest["flavor"],
        f"{LABEL_PREFIX}.modules": ",".join(f"{m['file']}@sha256:{m['sha256']}" for m in manifest["modules"]),
    }
    with reporter.step(f"publish modules image {tag}"):
        staging = {"Dockerfile": render_template("modules.Dockerfile.j2").encode()}
        with tar_context(staging, directory=result_dir, exclude=("build.log",)) as context:
            engine.build(context=context, tag=tag, labels=labels, network="none")
        layers = engine.image(tag)["RootFS"]["Layers"]
        if len(layers) != 1:
            raise VerifyError(f"the modules image {tag} has {len(layers)} layers instead of one")


def copy_result(result_dir: Path, output: Path) -> None:
    """Copy the result into `output` through a staging directory, so it is never half-written."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.cudabuild-partial"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(result_dir, staging, symlinks=True, ignore=shutil.ignore_patterns("build.log"))
    output.mkdir(exist_ok=True)
    for item in staging.iterdir():
        target = output / item.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(item, target)
    staging.rmdir()
