"""Phase 1: `cudabuild modules` as a library call. Resolve what to build, answer from the cache
when it can (re-checking the cached artifact), otherwise download on the host, build in disposable
unprivileged containers, verify on the host, publish atomically into the cache, as a one-layer
modules image and into --output.

The containers of a build, each with only what it needs:
- fetch (git kernels): the one with a network; writes a clone into a staging directory;
- prepare: unpacks Debian's headers or prepares a git tag, into a staging directory; the host
  renames it into the cache, where every later container sees it read-only;
- build: kernel trees, inputs and an installer tree read-only, its own work directory writable."""

from __future__ import annotations

import dataclasses
import os
import platform
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import cudabuild
from cudabuild import artifact
from cudabuild.artifact import (MODULES_REPOSITORY, Artifact, Manifest, ModuleEntry, describe_userspace, image_tag,
                                read_labels)
from cudabuild.compile.builder import builder_scripts, builder_user, ensure_builder, plan_builder, run_build
from cudabuild.cache import Cache, default_cache_dir, key_of
from cudabuild.engine import Engine, Mount
from cudabuild.fetch import Fetcher
from cudabuild.compile.publish import check_output, publish_image, write_output
from cudabuild.compile.spec import BuildSpec
from cudabuild.errors import ArtifactError, InputError, RegistryError, VerifyError
from cudabuild.fleet.registry import Registry, headers_files, unpack_image
from cudabuild.signing import Certificate, SigningKey, load_signing_key, verify_signature
from cudabuild.options import (DEBIAN_RELEASE_RE, BuildOptions, expected_modules, require_open_support,
                               validate_release)
from cudabuild.sources.debian import DebianArchive, Package
from cudabuild.sources.git import BASE_BY_GCC, resolve_git_kernel
from cudabuild.sources.run import RunDriver, driver_subdir, extract_installer, resolve_run_driver
from cudabuild.ui import Reporter
from cudabuild.verify import config_enabled, verify_modules

INPUTS = "/cudabuild/inputs"
KERNELS = "/cudabuild/kernels"
INSTALLER = "/cudabuild/installer"
WORK = "/cudabuild/work"


@dataclass
class KernelPlan:
    """A kernel source resolved on the host: what it is (for the key), what to download, and how
    the builder finds it."""

    release: str
    gcc_major: int | None
    canonical: dict
    tree_dir: str  # the unpacked or prepared tree under the cache's kernels/
    tree_step: str  # its step's name, as the prepare container announces it
    downloads: list[Package] = field(default_factory=list)
    environment: dict[str, str] = field(default_factory=dict)
    clone: dict | None = None  # git: what the fetch container clones, when it is not cached yet
    symvers: Path | None = None  # on the host, for verification
    config: Path | None = None


@dataclass
class DriverPlan:
    version: str
    canonical: dict
    description: str
    downloads: list[Package] = field(default_factory=list)
    environment: dict[str, str] = field(default_factory=dict)
    run: RunDriver | None = None


@dataclass
class ModulesResult:
    cache_hit: bool
    artifact: Artifact
    modules_image: str
    output_dir: Path | None
    steps: list = field(default_factory=list)
    boot_tested: bool = False  # whether this run booted the modules (the manifest keeps the result)
    origin: str = "built"  # cached | pulled | built
    registry_ref: str | None = None  # where the registry keeps it, with --registry
    pushed: bool = False  # whether this run pushed it there

    @property
    def manifest(self) -> Manifest:
        return self.artifact.manifest

    def as_json(self) -> dict:
        m = self.manifest
        return {
            "kernel_release": m.kernel_release,
            "driver_version": m.driver_version,
            "flavor": m.flavor,
            "cache_hit": self.cache_hit,
            "origin": self.origin,
            "registry": {"ref": self.registry_ref, "pushed": self.pushed} if self.registry_ref else None,
            "modules_image": self.modules_image,
            "output_dir": str(self.output_dir) if self.output_dir else None,
            "cache_dir": str(self.artifact.root),
            "modules": [{"name": e.name, "path": str(self.artifact.module_path(e.name)), "vermagic": e.vermagic,
                         "version": e.version, "sha256": e.sha256, "size": e.size} for e in m.modules],
            "boot_test": m.boot_test if self.boot_tested else None,
            "steps": [{"name": s.name, "seconds": s.seconds, "status": s.status} for s in self.steps],
        }


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
        release=release, gcc_major=gcc, downloads=packages, tree_dir=tree, tree_step="unpack kernel headers",
        canonical={"kind": "debian", "packages": [_pkg(p) for p in packages]},
        environment={"KERNEL_SOURCE": "debian", "KERNEL_DEBS": " ".join(_inside(p) for p in packages),
                     "KERNEL_TREE": f"{KERNELS}/{tree}"},
        symvers=headers / "Module.symvers", config=headers / ".config")


def plan_git_kernel(options: BuildOptions, release: str, cache: Cache, reporter: Reporter) -> KernelPlan:
    kernel = resolve_git_kernel(release=release, repo=options.kernel_repo, config=options.kernel_config,
                                symvers=options.symvers, checkout=options.kernel_checkout,
                                for_host=options.kernel is None, store=cache.downloads, note=reporter.note)
    clone = f"git-{key_of([kernel.repo, kernel.tag, kernel.commit, kernel.checkout])[:24]}"
    env = {"KERNEL_SOURCE": "git", "KERNEL_CLONE": f"{KERNELS}/{clone}", "KERNEL_SUFFIX": kernel.suffix,
           "KERNEL_CONFIG": f"{INPUTS}/{kernel.config_sha256}",
           "KERNEL_SYMVERS": f"{INPUTS}/{kernel.symvers_sha256}" if kernel.symvers_sha256 else ""}
    return KernelPlan(release=release, gcc_major=kernel.gcc_major, canonical=kernel.canonical(), environment=env,
                      tree_dir="", tree_step="prepare kernel",
                      clone={"repo": kernel.repo, "tag": kernel.tag, "commit": kernel.commit, "dir": clone,
                             "checkout": kernel.checkout, "reason": kernel.gcc_reason},
                      symvers=kernel.symvers, config=kernel.config)


# ---- driver sources --------------------------------------------------------------------------
def plan_debian_driver(archive: DebianArchive, options: BuildOptions, release: str) -> DriverPlan:
    source, userspace, version = archive.driver_packages(options.driver, options.flavor, release)
    how = "the newest known to support this kernel" if options.driver is None else f"from --driver {options.driver}"
    return DriverPlan(
        version=version, downloads=[source, *userspace],
        description=f"{source.name} {source.version}; {how}",
        canonical={"kind": "debian", "package": _pkg(source), "userspace": [_pkg(p) for p in userspace]},
        environment={"DRIVER_SOURCE": "debian", "DRIVER_DEB": _inside(source),
                     "USERSPACE_DEBS": " ".join(_inside(p) for p in userspace)})


def plan_run_driver(options: BuildOptions, cache: Cache, fetcher: Fetcher) -> DriverPlan:
    run = resolve_run_driver(version=options.driver, installer=options.installer, template=options.installer_url,
                             sha256=options.sha256, store=cache.downloads, fetcher=fetcher)
    if options.flavor == "open":
        require_open_support(run.version)
    return DriverPlan(version=run.version, canonical=run.canonical(), run=run,
                      description=f"NVIDIA installer {run.source} (sha256 {run.sha256[:12]}...)",
                      environment={"DRIVER_SOURCE": "run", "DRIVER_TREE": INSTALLER})


# ---- the whole ---------------------------------------------------------------------------------
@dataclass
class ModulesPlan:
    """A build resolved on the host, before anything is built: what it is (the spec and its key),
    where its sources come from, and the names of its results."""

    options: BuildOptions
    spec: BuildSpec
    key: str
    tag: str  # the local modules image, cudabuild/modules:DRIVER[-FLAVOR]-RELEASE
    kernel: KernelPlan
    driver: DriverPlan
    builder: object  # BuilderImage
    cache: Cache
    fetcher: Fetcher
    archive: DebianArchive
    engine: Engine
    signing: SigningKey | None = None  # the user's key, when the modules are signed
    certificate: Certificate | None = None  # the signing certificate (alone with --no-build)
    unsigned_key: str | None = None  # the key of the same build unsigned, which a signed one starts from

    @property
    def inputs(self) -> list[str]:
        """The sha256 of every downloaded input."""
        found = [p.sha256 for p in self.kernel.downloads + self.driver.downloads]
        return found + ([self.driver.run.sha256] if self.driver.run is not None else [])


def plan_modules(options: BuildOptions, *, env: Mapping[str, str], reporter: Reporter,
                 engine_factory: Callable[[], Engine] | None = None) -> ModulesPlan:
    """Resolve what to build (kernel, driver, builder) into its spec and cache key; builds nothing."""
    signing, certificate = None, None
    if options.sign_key is not None:  # checked first: a wrong key or PIN fails before any download
        signing = load_signing_key(options.sign_key, options.sign_cert, env.get("KBUILD_SIGN_PIN") or None)
        certificate = signing.certificate
    elif options.sign_cert is not None:
        certificate = Certificate.load(Path(options.sign_cert))
    cache = Cache(default_cache_dir(env))
    fetcher = Fetcher(reporter=reporter)
    archive = DebianArchive(cache=cache, fetcher=fetcher, reporter=reporter, mirror=options.apt_mirror,
                            security_mirror=options.apt_security_mirror, distribution=options.distribution,
                            refresh=options.refresh_index)
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
        kernel = plan_git_kernel(options, release, cache, reporter)
        reporter.note(f"kernel: tag {kernel.clone['tag']} of {options.kernel_repo} (commit "
                      f"{kernel.clone['commit'][:12]}), release suffix {kernel.environment['KERNEL_SUFFIX']!r}")
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
    engine = (engine_factory or (lambda: Engine.from_env(env)))()  # every input was checked before this
    builder = plan_builder(engine, base=base, distribution=base.split(":", 1)[-1], gcc_major=kernel.gcc_major,
                           mirror=options.apt_mirror, security_mirror=options.apt_security_mirror)
    if kernel.clone is not None:
        kernel.tree_dir = f"prepared-{key_of([kernel.canonical, builder.tag])[:24]}"
        kernel.environment["KERNEL_PREPARED"] = f"{KERNELS}/{kernel.tree_dir}"
    spec = BuildSpec(kernel_release=release, driver_version=driver.version, flavor=options.flavor,
                     kernel=kernel.canonical, driver=driver.canonical, builder_tag=builder.tag,
                     modules=tuple(expected_modules(driver.version)))
    unsigned_key = key_of(spec.canonical())
    if certificate is not None:
        spec = dataclasses.replace(spec, signing={"cert_sha256": certificate.sha256})
        reporter.note(f"signing: with the key of {certificate.signer} (certificate sha256 {certificate.sha256[:16]}...)")
    return ModulesPlan(options=options, spec=spec, key=key_of(spec.canonical()),
                       tag=image_tag(MODULES_REPOSITORY, driver.version, options.flavor, release,
                                     certificate.sha256 if certificate else None), kernel=kernel,
                       driver=driver, builder=builder, cache=cache, fetcher=fetcher, archive=archive, engine=engine,
                       signing=signing, certificate=certificate, unsigned_key=unsigned_key)


def build_modules(options: BuildOptions, *, env: Mapping[str, str], reporter: Reporter,
                  engine_factory: Callable[[], Engine] | None = None) -> ModulesResult:
    output = check_output(options.output, force=options.force) if options.output else None
    plan = plan_modules(options, env=env, reporter=reporter, engine_factory=engine_factory)
    cache, key, tag, engine = plan.cache, plan.key, plan.tag, plan.engine
    registry = Registry(options.registry) if options.registry else None
    remote = registry.ref(tag) if registry else None
    in_registry: bool | None = None  # whether the registry has this key (None: not asked)
    registry_down: RegistryError | None = None

    # ---- the cache, then the registry, then a build ------------------------------------------
    origin = "cached" if options.use_cache and cache.result(key) else None
    if origin is None:
        lock = cache.acquire(key, on_wait=lambda: reporter.note(
            "another cudabuild is building the same modules; waiting for it"))
        try:
            if options.use_cache and cache.result(key):  # it may have finished meanwhile
                origin = "cached"
            else:
                if registry is not None and options.use_cache:
                    try:
                        in_registry = _registry_has(registry, remote, key, reporter)
                    except RegistryError as exc:
                        registry_down = exc
                        reporter.warn(f"{exc.message}; {'nothing is pulled' if options.no_build else 'building here'}")
                    if in_registry:
                        _pull(plan, remote, reporter=reporter)
                        origin = "pulled"
                if origin is None and options.no_build and registry_down is not None:
                    raise RegistryError(f"--no-build: the cache ({cache.root}) does not have it, and "
                                        f"{registry_down.message}", hint=registry_down.hint)  # exit 9, not 21
                if origin is None and options.no_build:
                    wanted = f"NVIDIA {plan.spec.driver_version} {plan.spec.flavor} for {plan.spec.kernel_release}"
                    raise RegistryError(f"--no-build: neither the cache ({cache.root}) nor the registry ({remote}) "
                                        f"has {wanted}" if registry else
                                        f"--no-build: the cache ({cache.root}) has no {wanted}",
                                        hint="build it somewhere with cudabuild modules --registry REPO, or drop "
                                             "--no-build", exit_code=RegistryError.NOT_THERE)
                if origin is None:
                    (_sign if plan.signing else _build)(plan, reporter=reporter)
                    origin = "built"
        finally:
            lock.release()
    result_dir = cache.result_dir(key)
    if origin == "cached":
        reporter.cached("build modules", f"cached result {result_dir}")
    try:
        checked = artifact.load(result_dir)
    except ArtifactError as exc:
        exc.hint = (f"the cached result was changed after it was built, and is not used; remove it (rm -rf "
                    f"{result_dir}) or build again with --no-cache")
        raise
    if checked.manifest.key != key:
        raise ArtifactError(f"{result_dir} holds the result of another build (key {checked.manifest.key[:16]}...)",
                            hint=f"remove it (rm -rf {result_dir}) or build again with --no-cache")
    if origin != "built" and options.boot_test:  # a fresh build was boot-tested before it was published
        with cache.lock(key):
            checked = _boot_test(checked, options=options, archive=plan.archive, cache=cache, fetcher=plan.fetcher,
                                 reporter=reporter)

    # ---- publish ---------------------------------------------------------------------------
    publish_image(engine, checked, tag=tag, reporter=reporter)
    if output:
        write_output(checked, output, cache=cache)
        reporter.note(f"copied the modules, userspace and manifest to {output}")
    pushed = False
    if registry is not None:
        kept = f"the modules are kept here: {result_dir} and the image {tag}"
        try:
            if registry_down is not None:
                raise registry_down
            if in_registry is None:
                in_registry = _registry_has(registry, remote, key, reporter)
            if not in_registry:
                with reporter.step(f"push {remote}"):
                    engine.push(tag, remote)
                pushed = True
        except RegistryError as exc:
            exc.message = f"{exc.message}; {kept}"
            exc.args = (exc.message,)
            raise
    return ModulesResult(cache_hit=origin == "cached", origin=origin, artifact=checked, modules_image=tag,
                         output_dir=output, steps=list(reporter.steps), boot_tested=options.boot_test,
                         registry_ref=remote, pushed=pushed)


def _registry_has(registry: Registry, remote: str, key: str, reporter: Reporter) -> bool:
    """Whether the registry holds `remote` with the same cache key."""
    labels = read_labels(registry.labels(remote), remote)
    if labels is None:
        return False
    if labels.key != key:
        reporter.note(f"{remote} in the registry is another build (key {labels.key[:16]}..., ours {key[:16]}...)")
        return False
    return True


def _pull(plan: ModulesPlan, remote: str, *, reporter: Reporter) -> None:
    """The registry's modules image into the cache, verified on this host as a build would be:
    every file's digest against its manifest, the key, vermagic, version and symbol CRCs against
    this kernel's Module.symvers. A refusal leaves nothing in the cache."""
    spec, cache = plan.spec, plan.cache
    work = cache.workdir(f"pull-{plan.key[:12]}")
    try:
        with reporter.step(f"pull {remote} (the registry has this build)"):
            plan.engine.pull_or_fail(remote)
            _unpack_from_engine(plan.engine, remote, work)
        with reporter.step("verify pulled modules (digests, vermagic, version, symbol CRCs)"):
            try:
                made = artifact.load(work / "out")
                m = made.manifest
                if (m.key, m.kernel_release, m.driver_version, m.flavor) != (plan.key, spec.kernel_release,
                                                                              spec.driver_version, spec.flavor):
                    raise VerifyError(f"its manifest describes another build (key {m.key[:16]}..., "
                                      f"{m.driver_version} {m.flavor} for {m.kernel_release})")
                _verify(plan, work / "out" / "modules", work)
            except (ArtifactError, VerifyError) as exc:
                raise VerifyError(f"refused the registry's {remote}: {exc.message}",
                                  hint=f"nothing was put in the cache; build and push it again: cudabuild modules "
                                       f"--kernel {spec.kernel_release} --driver {spec.driver_version} --no-cache "
                                       "--registry REPO") from exc
        cache.publish(work / "out", plan.key)
        plan.engine.retag(remote, plan.tag)  # the pulled image is the modules image: nothing to build again
    finally:
        cache.discard(work)
        plan.engine.untag(remote)


def _unpack_from_engine(engine: Engine, ref: str, work: Path) -> None:
    """The modules image `ref`'s one layer, saved from the engine, into work/out."""
    saved = work / "image.tar"
    with open(saved, "wb") as out:
        for chunk in engine.save(ref):
            out.write(chunk)
    unpack_image(saved, work / "out")
    saved.unlink()


def import_image(reference: str, labels, *, cache: Cache, engine: Engine, env: Mapping[str, str],
                 reporter: Reporter) -> Artifact:
    """A modules image that was not built with this cache (`docker pull`ed, or made on another
    machine), read from the engine and checked as a registry pull is: one layer of modules/,
    userspace/ and the manifest, every digest, the driver's own file names, vermagic and version,
    the labels against the manifest, and the symbol CRCs against the kernel's Module.symvers where
    Debian has that kernel. Then it is put in the cache; a refusal leaves nothing there."""
    work = cache.workdir(f"import-{labels.key[:12]}")
    try:
        with reporter.step(f"read {reference} (it was not built with this cache)"):
            _unpack_from_engine(engine, reference, work)
        with reporter.step("verify its modules (digests, vermagic, version, symbol CRCs)"):
            try:
                m = artifact.load(work / "out").manifest
                if m.key != labels.key or tuple((e.file, e.sha256) for e in m.modules) != labels.modules:
                    raise VerifyError(f"its labels describe another build than its manifest (key {labels.key[:16]}..., "
                                      f"the manifest's {m.key[:16]}...)")
                symvers = _debian_symvers(m.kernel_release, work, cache=cache, env=env, reporter=reporter)
                if symvers is not None:
                    modversions = config_enabled(symvers[1], "CONFIG_MODVERSIONS")
                    verify_modules(work / "out" / "modules", release=m.kernel_release, driver_version=m.driver_version,
                                   expected=[e.name for e in m.modules], symvers=symvers[0] if modversions else None,
                                   modversions=modversions)
            except (ArtifactError, VerifyError) as exc:
                raise VerifyError(f"refused {reference}: {exc.message}",
                                  hint="nothing was put in the cache; use an unchanged image cudabuild made, or build "
                                       "the modules here: cudabuild modules --kernel RELEASE --driver VERSION") from exc
        cache.publish(work / "out", labels.key)
    finally:
        cache.discard(work)
    return artifact.load(cache.result_dir(labels.key))


def _debian_symvers(release: str, work: Path, *, cache: Cache, env: Mapping[str, str],
                    reporter: Reporter) -> tuple[Path, Path] | None:
    """Module.symvers and .config of a Debian kernel release, from its headers package; None (said)
    when Debian has no such kernel or its archive cannot be read."""
    from cudabuild.errors import FetchError

    if not DEBIAN_RELEASE_RE.fullmatch(release):
        reporter.note(f"symbol CRCs not checked: {release} is not a Debian kernel, and only Debian's "
                      "Module.symvers can be fetched here")
        return None
    from cudabuild.options import resolve_build_options

    options = resolve_build_options({}, env)
    fetcher = Fetcher(reporter=reporter)
    archive = DebianArchive(cache=cache, fetcher=fetcher, reporter=reporter, mirror=options.apt_mirror,
                            security_mirror=options.apt_security_mirror, distribution=options.distribution)
    try:
        found = archive.versions(f"linux-headers-{release}")
        if not found:
            reporter.note(f"symbol CRCs not checked: Debian {options.distribution} has no linux-headers-{release}")
            return None
        headers = found[0]
        deb = fetcher.fetch(headers.url, store=cache.downloads, sha256=headers.sha256, size=headers.size,
                            label=headers.filename.rsplit("/", 1)[-1])
    except (FetchError, InputError) as exc:
        reporter.note(f"symbol CRCs not checked: Debian's archive could not be read ({exc.message})")
        return None
    return headers_files(deb, release, work)


def _kernel_files(plan: ModulesPlan, work: Path) -> tuple[Path | None, Path]:
    """The kernel's Module.symvers and .config on this host: given (git), in the cache's unpacked
    tree, or read from Debian's linux-headers-RELEASE package without a container."""
    kernel = plan.kernel
    if kernel.config is not None and kernel.config.is_file():
        return kernel.symvers, kernel.config
    release = plan.spec.kernel_release
    headers = next(p for p in kernel.downloads if p.name == f"linux-headers-{release}")
    deb = plan.fetcher.fetch(headers.url, store=plan.cache.downloads, sha256=headers.sha256, size=headers.size,
                             label=headers.filename.rsplit("/", 1)[-1])
    return headers_files(deb, release, work)


def _boot_test(checked: Artifact, *, options: BuildOptions, archive: DebianArchive, cache: Cache, fetcher: Fetcher,
               reporter: Reporter) -> Artifact:
    """Boot the artifact's kernel in a QEMU guest with its modules; the verdict goes into the
    manifest; a refusal raises VerifyError (exit 7)."""
    from cudabuild import boottest

    result = boottest.run_for(checked, kernel_image=options.kernel_image, append=options.boot_append,
                              timeout=options.boot_timeout, archive=lambda: archive, cache=cache, fetcher=fetcher,
                              reporter=reporter)
    if result is None:
        return checked
    checked = boottest.record(checked, result)
    reporter.note(f"boot test: {checked.manifest.boot_summary}, {result.seconds:g} s in the guest")
    boottest.refuse_rejected(result)
    return checked


def _ensure_tree(name: str, *, what: str, cache: Cache, reporter: Reporter, make: Callable[[Path], None]) -> Path:
    """A kernel tree in the cache: reused when it is there, else made by `make(staging)` in a
    staging directory and renamed into place. One maker at a time per tree."""
    target = cache.kernels / name
    if target.is_dir():
        reporter.cached(what, f"reusing {target}")
        return target
    lock = cache.acquire(f"tree-{name}", on_wait=lambda: reporter.note(f"another cudabuild is making {name}; "
                                                                       "waiting for it"))
    staging = None
    try:
        if target.is_dir():
            reporter.cached(what, f"reusing {target}")
            return target
        staging = cache.workdir(f"tree-{name[:20]}", owner=builder_user())
        make(staging)
        os.chmod(staging, 0o755)
        return cache.publish_tree(staging, target)
    finally:
        if staging is not None:
            cache.discard(staging)
        lock.release()


def _installer_tree(run: RunDriver, *, cache: Cache, reporter: Reporter) -> Path:
    """The installer extracted on the host (checked member by member), once per installer."""
    target = cache.sources / f"run-{run.sha256[:24]}"
    if target.is_dir():
        reporter.cached("extract installer", f"reusing {target}")
        return target
    with cache.lock(f"tree-{target.name}"):
        if not target.is_dir():
            with reporter.step("extract installer (on the host, every member checked)"):
                staging = cache.workdir("installer")
                try:
                    extract_installer(run.path, run.installer, staging / "tree")
                    cache.publish_tree(staging / "tree", target)
                finally:
                    shutil.rmtree(staging, ignore_errors=True)
    return target


def _give_back(tree: Path) -> None:
    """Files a build container wrote as nobody become the caller's again."""
    if os.getuid() != 0:
        return
    for path in [tree, *tree.rglob("*")]:
        os.lchown(path, os.getuid(), os.getgid())


@dataclass
class _Workshop:
    """What a build's containers share: the builder image, the log, the mounts, the kernel tree."""

    run: Callable[..., None]  # run(script, environment, mounts, network="none")
    environment: dict
    inputs: Mount
    log_path: Path
    image_id: str
    started: float


def _workshop(plan: ModulesPlan, *, reporter: Reporter, for_driver: bool = True) -> _Workshop:
    """Downloads on the host, the builder image, and the kernel tree (fetched, unpacked or
    prepared once per kernel, shared through the cache): everything before the driver's build,
    or before signing (for_driver=False: the driver's sources are not needed)."""
    spec, key, kernel, driver, cache, engine = plan.spec, plan.key, plan.kernel, plan.driver, plan.cache, plan.engine
    fetcher, builder, options = plan.fetcher, plan.builder, plan.options
    engine.require_shared_files()
    cache.check_space()
    reaped, _ = engine.reap_builders()
    if reaped:
        reporter.note(f"removed builder containers left by killed runs: {', '.join(reaped)}")
    cache.reap_stale()
    started = time.monotonic()
    packages = kernel.downloads + (driver.downloads if for_driver else [])
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
    scripts = builder_scripts(cache)

    def container(script: str, environment: dict, mounts: list[Mount], network: str = "none") -> None:
        run_build(engine, image=builder.tag, reporter=reporter, verbose=options.verbose, log_path=log_path,
                  scripts=scripts,
                  keep=options.keep_builder, script=script, mounts=mounts, network=network, environment=environment)

    prepare_mounts = [inputs]
    if kernel.clone is not None:
        clone = kernel.clone
        clone_dir = _ensure_tree(clone["dir"], what="fetch kernel source", cache=cache, reporter=reporter,
                                 make=lambda staging: container(
                                     "fetch-kernel-git.sh", network="host",
                                     mounts=[Mount(str(staging), f"{KERNELS}/{clone['dir']}", read_only=False)],
                                     environment={"KERNEL_REPO": clone["repo"], "KERNEL_TAG": clone["tag"],
                                                  "KERNEL_COMMIT": clone["commit"],
                                                  "KERNEL_CLONE": f"{KERNELS}/{clone['dir']}",
                                                  "KERNEL_CHECKOUT": clone["checkout"]}))
        prepare_mounts.append(Mount(str(clone_dir), f"{KERNELS}/{clone['dir']}"))
    environment = {**kernel.environment, **driver.environment, "KERNEL_RELEASE": spec.kernel_release,
                   "DRIVER_VERSION": spec.driver_version, "FLAVOR": spec.flavor, "MODULES": " ".join(spec.modules),
                   "JOBS": str(options.jobs), "WORK": WORK}
    _ensure_tree(kernel.tree_dir, what=kernel.tree_step, cache=cache, reporter=reporter,
                 make=lambda staging: container(
                     "prepare-kernel.sh", environment=environment,
                     mounts=[*prepare_mounts, Mount(str(staging), f"{KERNELS}/{kernel.tree_dir}", read_only=False)]))
    return _Workshop(run=container, environment=environment, inputs=inputs, log_path=log_path, image_id=image_id,
                     started=started)


def _build(plan: ModulesPlan, *, reporter: Reporter) -> None:
    spec, key, driver, cache = plan.spec, plan.key, plan.driver, plan.cache
    fetcher, builder, options, archive = plan.fetcher, plan.builder, plan.options, plan.archive
    build_mounts, subdir = [], {}
    if driver.run is not None:
        # On the host and first: a hostile installer is refused before any container starts.
        tree = _installer_tree(driver.run, cache=cache, reporter=reporter)
        subdir["DRIVER_SUBDIR"] = driver_subdir(tree, spec.flavor, spec.driver_version)
        build_mounts.append(Mount(str(tree), INSTALLER))
    shop = _workshop(plan, reporter=reporter)
    shop.environment.update(subdir)
    work = cache.workdir(key[:16], owner=builder_user())
    try:
        shop.run("build.sh", environment=shop.environment,
                 mounts=[shop.inputs, Mount(str(cache.kernels), KERNELS), *build_mounts,
                         Mount(str(work), WORK, read_only=False)])
        out = work / "out"
        _give_back(out)
        with reporter.step("verify modules (vermagic, version, symbol CRCs)"):
            modversions, infos = _verify(plan, out / "modules", work)
        manifest = Manifest(
            key=key, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            kernel_release=spec.kernel_release, driver_version=spec.driver_version, flavor=spec.flavor,
            vermagic=infos[0].vermagic, modules=tuple(ModuleEntry.of(i) for i in infos),
            userspace=describe_userspace(out / "userspace"), modversions=modversions,
            cudabuild_version=cudabuild.__version__, build_seconds=round(time.monotonic() - shop.started, 1),
            kernel_source=spec.kernel, driver_source=spec.driver,
            builder_image={"tag": builder.tag, "id": shop.image_id, "base": builder.base})
        manifest.write(out)
        made = artifact.load(out)  # what the build made passes the check every reader applies
        if options.boot_test:  # the real kernel judges before anything is published
            _boot_test(made, options=options, archive=archive, cache=cache, fetcher=fetcher, reporter=reporter)
        shutil.copy2(shop.log_path, out / "build.log")
        cache.publish(out, key)
    finally:
        cache.discard(work)


def _verify(plan: ModulesPlan, modules: Path, work: Path):
    """Every module present, vermagic, version and (with CONFIG_MODVERSIONS) symbol CRCs against
    this kernel's Module.symvers: after a build, after signing, and after a pull."""
    spec = plan.spec
    symvers, config = _kernel_files(plan, work)
    modversions = config_enabled(config, "CONFIG_MODVERSIONS")
    return modversions, verify_modules(modules, release=spec.kernel_release, driver_version=spec.driver_version,
                                       expected=list(spec.modules), symvers=symvers if modversions else None,
                                       modversions=modversions)


def _sign(plan: ModulesPlan, *, reporter: Reporter) -> None:
    """A signed build: the unsigned build of the same inputs (from the cache, or built first),
    its modules signed by the kernel's own sign-file in a container that alone sees the key,
    then every signature checked on the host against the certificate."""
    cache, key, signing = plan.cache, plan.key, plan.signing
    started = time.monotonic()  # the signed build's time: this run's (signing, and the build when not cached)
    unsigned = dataclasses.replace(plan, spec=dataclasses.replace(plan.spec, signing=None), key=plan.unsigned_key,
                                   signing=None, certificate=None)
    if plan.options.use_cache and cache.result(unsigned.key):
        reporter.cached("build modules", f"the unsigned build is in the cache ({cache.result_dir(unsigned.key)})")
    else:
        with cache.lock(unsigned.key):
            if not (plan.options.use_cache and cache.result(unsigned.key)):  # another run may have built it
                _build(unsigned, reporter=reporter)
    source = artifact.load(cache.result_dir(unsigned.key))
    shop = _workshop(plan, reporter=reporter, for_driver=False)
    owner = builder_user()
    work = cache.workdir(f"sign-{key[:12]}", owner=owner)
    try:
        out = work / "out"
        shutil.copytree(source.root, out, symlinks=True)
        for path in (out / "modules", *(out / "modules").iterdir()):
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
            if os.getuid() == 0:
                os.chown(path, *owner)
        with signing.staged(owner) as keys:
            shop.run("sign.sh", environment={**shop.environment, "WORK": WORK},
                     mounts=[Mount(str(cache.kernels), KERNELS), Mount(str(keys), "/cudabuild/key"),
                             Mount(str(out / "modules"), f"{WORK}/modules", read_only=False)])
        _give_back(out)
        with reporter.step(f"verify signed modules (signatures against {signing.certificate.signer}, vermagic, "
                           "version, symbol CRCs)"):
            _, infos = _verify(plan, out / "modules", work)
            hashes = {verify_signature(out / "modules" / f"{name}.ko", signing.certificate).hash_name
                      for name in plan.spec.modules}
        manifest = dataclasses.replace(
            source.manifest, key=key, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            modules=tuple(ModuleEntry.of(i) for i in infos), signature=signing.certificate.record(hashes.pop()),
            build_seconds=round(time.monotonic() - started, 1))
        manifest.write(out)
        artifact.load(out)  # every reader's check, signatures included
        with open(out / "build.log", "a") as log:
            log.write(shop.log_path.read_text())
        cache.publish(out, key)
    finally:
        cache.discard(work)
