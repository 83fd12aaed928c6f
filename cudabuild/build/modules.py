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
from cudabuild.build.builder import ensure_builder, plan_builder, render_template, run_build, tar_context
from cudabuild.build.cache import Cache, default_cache_dir, key_of
from cudabuild.sources.debian import DebianArchive, Package
from cudabuild.sources.run import resolve_run_driver
from cudabuild.build.engine import LABEL_PREFIX, Engine, Mount
from cudabuild.errors import InputError, VerifyError
from cudabuild.build.fetch import Fetcher, sha256_file
from cudabuild.sources.git import BASE_BY_GCC, check_tag, resolve_git_kernel
from cudabuild.build.spec import BuildSpec
from cudabuild.options import (DEBIAN_RELEASE_RE, OPEN_SINCE, ModulesOptions, expected_modules,
                            validate_release, version_tuple)
from cudabuild.ui import Reporter
from cudabuild.verify import config_enabled, verify_modules

MODULES_REPO = "cudabuild/modules"
INPUTS = "/cudabuild/inputs"
KERNELS = "/cudabuild/kernels"


@dataclass
class KernelPlan:
    """A kernel source resolved on the host: what it is (for the key), what to download, and how
    the builder finds it."""

    release: str
    gcc_major: int | None
    canonical: dict
    downloads: list[Package] = field(default_factory=list)
    environment: dict[str, str] = field(default_factory=dict)
    clone: dict | None = None  # git: what the fetch container clones, when it is not cached yet
    symvers: Path | None = None  # on the host, for verification; None until the tree exists
    config: Path | None = None
    tree_dir: str = ""  # the unpacked or prepared tree under the cache's kernels/


@dataclass
class DriverPlan:
    version: str
    canonical: dict
    description: str
    downloads: list[Package] = field(default_factory=list)
    environment: dict[str, str] = field(default_factory=dict)


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


def _pkg(p: Package) -> dict:
    return {"name": p.name, "version": p.version, "sha256": p.sha256}


def _inside(p: Package) -> str:
    return f"{INPUTS}/{p.sha256}"


# ---- kernel sources --------------------------------------------------------------------------
def plan_debian_kernel(archive: DebianArchive, release: str, cache: Cache) -> KernelPlan:
    packages, gcc = archive.kernel_packages(release)
    tree = f"debian-{key_of([p.sha256 for p in packages])[:24]}"
    headers = cache.kernels / tree / "usr" / "src" / f"linux-headers-{release}"
    return KernelPlan(
        release=release, gcc_major=gcc, downloads=packages, tree_dir=tree,
        canonical={"kind": "debian", "packages": [_pkg(p) for p in packages]},
        environment={"KERNEL_SOURCE": "debian", "KERNEL_DEBS": " ".join(_inside(p) for p in packages),
                     "KERNEL_TREE": f"{KERNELS}/{tree}"},
        symvers=headers / "Module.symvers", config=headers / ".config")


def plan_git_kernel(options: ModulesOptions, release: str, cache: Cache) -> KernelPlan:
    kernel = resolve_git_kernel(release=release, repo=options.kernel_repo, config=options.kernel_config,
                                symvers=options.symvers, checkout=options.kernel_checkout,
                                for_host=options.kernel is None, store=cache.downloads)
    clone = f"git-{key_of([kernel.repo, kernel.tag, kernel.checkout])[:24]}"
    env = {"KERNEL_SOURCE": "git", "KERNEL_CLONE": f"{KERNELS}/{clone}", "KERNEL_SUFFIX": kernel.suffix,
           "KERNEL_CONFIG": f"{INPUTS}/{kernel.config_sha256}",
           "KERNEL_SYMVERS": f"{INPUTS}/{kernel.symvers_sha256}" if kernel.symvers_sha256 else ""}
    return KernelPlan(release=release, gcc_major=kernel.gcc_major, canonical=kernel.canonical(), environment=env,
                      clone={"repo": kernel.repo, "tag": kernel.tag, "dir": clone, "checkout": kernel.checkout,
                             "reason": kernel.gcc_reason},
                      symvers=kernel.symvers, config=kernel.config)


# ---- driver sources --------------------------------------------------------------------------
def plan_debian_driver(archive: DebianArchive, options: ModulesOptions, release: str) -> DriverPlan:
    source, userspace, version = archive.driver_packages(options.driver, options.flavor, release)
    how = "the newest known to support this kernel" if options.driver is None else f"from --driver {options.driver}"
    return DriverPlan(
        version=version, downloads=[source, *userspace],
        description=f"{source.name} {source.version}; {how}",
        canonical={"kind": "debian", "package": _pkg(source), "userspace": [_pkg(p) for p in userspace]},
        environment={"DRIVER_SOURCE": "debian", "DRIVER_DEB": _inside(source),
                     "USERSPACE_DEBS": " ".join(_inside(p) for p in userspace)})


def plan_run_driver(options: ModulesOptions, cache: Cache, fetcher: Fetcher) -> DriverPlan:
    run = resolve_run_driver(version=options.driver, installer=options.installer, template=options.installer_url,
                             sha256=options.sha256, store=cache.downloads, fetcher=fetcher)
    if options.flavor == "open" and version_tuple(run.version) < OPEN_SINCE:
        raise InputError(f"driver {run.version} has no open kernel modules: they exist from 515 on",
                         hint="use --flavor proprietary, or a driver of 515 or newer")
    return DriverPlan(version=run.version, canonical=run.canonical(),
                      description=f"NVIDIA installer {run.source} (sha256 {run.sha256[:12]}...)",
                      environment={"DRIVER_SOURCE": "run", "DRIVER_INSTALLER": f"{INPUTS}/{run.sha256}"})


# ---- the whole ---------------------------------------------------------------------------------
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
    kernel_source = options.kernel_source
    if kernel_source is None:
        kernel_source = "debian" if options.kernel == "latest" or DEBIAN_RELEASE_RE.fullmatch(release) else "git"
        reporter.note(f"kernel source: {kernel_source} ({'a Debian kernel release' if kernel_source == 'debian' else 'not a Debian release: its tag from ' + options.kernel_repo}; "
                      "choose with --kernel-source)")
    if kernel_source == "debian":
        kernel = plan_debian_kernel(archive, release, cache)
    else:
        kernel = plan_git_kernel(options, release, cache)
        reporter.note(f"kernel: tag {kernel.clone['tag']} of {options.kernel_repo}, release suffix "
                      f"{kernel.environment['KERNEL_SUFFIX']!r}")
    if options.driver_source == "debian":
        driver = plan_debian_driver(archive, options, release)
    else:
        driver = plan_run_driver(options, cache, fetcher)
    reporter.note(f"driver: {driver.version} {options.flavor} ({driver.description})")

    base = options.builder_base or BASE_BY_GCC.get(kernel.gcc_major)
    if base is None:
        raise InputError(f"kernel {release} was built with gcc {kernel.gcc_major}, and cudabuild knows no builder "
                         "base image with that compiler",
                         hint="pass --builder-base IMAGE naming an image whose gcc has that major version")
    why = "--builder-base" if options.builder_base else f"gcc {kernel.gcc_major}, the kernel's own compiler"
    reporter.note(f"builder base: {base} ({why})")
    builder = plan_builder(engine, base=base, distribution=base.split(":", 1)[-1], gcc_major=kernel.gcc_major,
                           mirror=options.apt_mirror, security_mirror=options.apt_security_mirror)
    if kernel.clone is not None:
        prepared = f"prepared-{key_of([kernel.canonical, builder.tag])[:24]}"
        kernel.environment["KERNEL_PREPARED"] = f"{KERNELS}/{prepared}"
        kernel.tree_dir = prepared
    spec = BuildSpec(kernel_release=release, driver_version=driver.version, flavor=options.flavor,
                     kernel=kernel.canonical, driver=driver.canonical, builder_tag=builder.tag,
                     modules=tuple(expected_modules(driver.version)))
    key = key_of(spec.canonical())
    tag = modules_image_tag(driver.version, options.flavor, release)

    # ---- the cache -------------------------------------------------------------------------
    hit = cache.result(key) if options.use_cache else None
    if hit is None:
        lock = cache.acquire(key, on_wait=lambda: reporter.note(
            "another cudabuild is building the same modules; waiting for it"))
        try:
            hit = cache.result(key) if options.use_cache else None  # it may have finished meanwhile
            if hit is None:
                _build(spec, key, kernel=kernel, driver=driver, cache=cache, engine=engine, fetcher=fetcher,
                       builder=builder, options=options, reporter=reporter)
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
    return ModulesResult(kernel_release=release, driver_version=driver.version, flavor=options.flavor,
                         cache_hit=cache_hit, result_dir=result_dir, manifest=manifest, modules_image=tag,
                         output_dir=output, steps=list(reporter.steps))


def _build(spec: BuildSpec, key: str, *, kernel: KernelPlan, driver: DriverPlan, cache: Cache, engine: Engine,
           fetcher: Fetcher, builder, options: ModulesOptions, reporter: Reporter) -> None:
    cache.check_space()
    reaped, running = engine.reap_builders()
    if reaped:
        reporter.note(f"removed builder containers left by killed runs: {', '.join(reaped)}")
    cache.reap_stale(builders_running=running > 0)
    started = time.monotonic()
    packages = kernel.downloads + driver.downloads
    if packages:
        with reporter.step(f"download {len(packages)} packages "
                           f"({sum(p.size for p in packages) / 1024**2:.0f} MiB, cached by content)"):
            for p in packages:
                fetcher.fetch(p.url, store=cache.downloads, sha256=p.sha256, size=p.size,
                              label=p.filename.rsplit("/", 1)[-1])
    image_id = ensure_builder(engine, builder, reporter, verbose=options.verbose)
    stamp = datetime.now().strftime("%Y%m%dT%H%M%S")
    log_path = cache.logs / f"{key[:16]}-{stamp}.log"
    inputs = Mount(str(cache.downloads), INPUTS)
    kernels = Mount(str(cache.kernels), KERNELS, read_only=False)

    if kernel.clone is not None:
        clone_dir = cache.kernels / kernel.clone["dir"]
        if clone_dir.is_dir():
            reporter.cached("fetch kernel source", f"reusing the clone of {kernel.clone['tag']} ({clone_dir})")
        else:
            check_tag(kernel.clone["repo"], kernel.clone["tag"])
            run_build(engine, image=builder.tag, reporter=reporter, verbose=options.verbose,
                      log_path=cache.logs / f"{key[:16]}-{stamp}-fetch.log", script="fetch-kernel-git.sh",
                      mounts=[kernels], network="host",
                      environment={"KERNEL_REPO": kernel.clone["repo"], "KERNEL_TAG": kernel.clone["tag"],
                                   "KERNEL_CLONE": f"{KERNELS}/{kernel.clone['dir']}",
                                   "KERNEL_CHECKOUT": kernel.clone["checkout"]})
    work = cache.workdir(key[:16])
    try:
        run_build(engine, image=builder.tag, reporter=reporter, verbose=options.verbose, log_path=log_path,
                  keep=options.keep_builder, mounts=[inputs, kernels, Mount(str(work), "/cudabuild/work", read_only=False)],
                  environment={**kernel.environment, **driver.environment,
                               "KERNEL_RELEASE": spec.kernel_release, "DRIVER_VERSION": spec.driver_version,
                               "FLAVOR": spec.flavor, "MODULES": " ".join(spec.modules),
                               "JOBS": str(options.jobs), "WORK": "/cudabuild/work"})
        out = work / "out"
        with reporter.step("verify modules (vermagic, version, symbol CRCs)"):
            config = kernel.config or cache.kernels / kernel.tree_dir / ".config"
            modversions = config_enabled(config, "CONFIG_MODVERSIONS")
            infos = verify_modules(out / "modules", release=spec.kernel_release,
                                   driver_version=spec.driver_version, expected=list(spec.modules),
                                   symvers=kernel.symvers if modversions else None, modversions=modversions)
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
            "kernel_source": spec.kernel,
            "driver_source": spec.driver,
            "modules": [i.as_json() for i in infos],
            "userspace": _userspace_listing(out / "userspace"),
            "builder_image": {"tag": builder.tag, "id": image_id, "base": builder.base},
            "build_seconds": round(time.monotonic() - started, 1),
        }
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        shutil.copy2(log_path, out / "build.log")
        cache.publish(out, key)
    finally:
        shutil.rmtree(work, ignore_errors=True)


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
