"""What to build, resolved on the host before anything is built: the kernel's and the driver's
sources, the builder, the spec and its cache key. Every plan is a frozen value; nothing here
downloads (but package indices), builds or publishes."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cudabuild.artifact import MODULES_REPOSITORY, image_tag
from cudabuild.store.cache import Cache, key_of
from cudabuild.compile.builder import plan_builder
from cudabuild.compile.contract import DRIVER, INPUTS, KERNELS, BuilderEnv
from cudabuild.compile.spec import BuildSpec
from cudabuild.engine import Engine
from cudabuild.errors import InputError
from cudabuild.store.fetch import Fetcher
from cudabuild.nvidia import (DEBIAN_RELEASE_RE, debian_distribution, default_flavor, modules_to_build,
    require_flavor)
from cudabuild.options import BuildOptions, validate_release
from cudabuild.settings import Services
from cudabuild.signing import Certificate, SigningKey, load_signing_key
from cudabuild.sources.debian import DebianArchive, Package, newer_in_backports
from cudabuild.sources.git import BASE_BY_GCC, resolve_git_kernel
from cudabuild.sources.run import RunDriver, resolve_run_driver
from cudabuild.ui import Reporter


@dataclass(frozen=True)
class KernelPlan:
    """A kernel source resolved on the host: what it is (for the key), what to download, and how
    the builder finds it."""

    release: str
    gcc_major: int | None
    canonical: dict
    tree_dir: str  # the unpacked or prepared tree under the cache's kernels/
    tree_step: str  # its step's name, as the prepare container announces it
    downloads: tuple[Package, ...] = ()
    env: BuilderEnv = BuilderEnv()  # what the builder scripts are told of this kernel
    clone: dict | None = None  # git: what the fetch container clones, when it is not cached yet
    symvers: Path | None = None  # on the host, for verification
    config: Path | None = None


@dataclass(frozen=True)
class DriverPlan:
    version: str
    canonical: dict
    description: str
    downloads: tuple[Package, ...] = ()
    env: BuilderEnv = BuilderEnv()  # what the builder scripts are told of this driver
    run: RunDriver | None = None


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
        release=release, gcc_major=gcc, downloads=tuple(packages), tree_dir=tree, tree_step="unpack kernel headers",
        canonical={"kind": "debian", "packages": [_pkg(p) for p in packages]},
        env=BuilderEnv(kernel_source="debian", kernel_debs=" ".join(_inside(p) for p in packages),
                       kernel_tree=f"{KERNELS}/{tree}"),
        symvers=headers / "Module.symvers", config=headers / ".config")


def plan_git_kernel(options: BuildOptions, release: str, cache: Cache, reporter: Reporter) -> KernelPlan:
    kernel = resolve_git_kernel(release=release, repo=options.kernel_repo, config=options.kernel_config,
                                symvers=options.symvers, checkout=options.kernel_checkout,
                                for_host=options.kernel is None, store=cache.downloads, note=reporter.note)
    clone = f"git-{key_of([kernel.repo, kernel.tag, kernel.commit, kernel.checkout])[:24]}"
    env = BuilderEnv(kernel_source="git", kernel_clone=f"{KERNELS}/{clone}", kernel_suffix=kernel.suffix,
                     kernel_config=f"{INPUTS}/{kernel.config_sha256}",
                     kernel_symvers=f"{INPUTS}/{kernel.symvers_sha256}" if kernel.symvers_sha256 else "")
    return KernelPlan(release=release, gcc_major=kernel.gcc_major, canonical=kernel.canonical(), env=env,
                      tree_dir="", tree_step="prepare kernel",
                      clone={"repo": kernel.repo, "tag": kernel.tag, "commit": kernel.commit, "dir": clone,
                             "checkout": kernel.checkout, "reason": kernel.gcc_reason},
                      symvers=kernel.symvers, config=kernel.config)


# ---- driver sources --------------------------------------------------------------------------
def plan_debian_driver(archive: DebianArchive, options: BuildOptions, release: str) -> DriverPlan:
    # Debian's packages are proprietary unless asked (Debian's own default, nvidia-kernel-dkms): no
    # Debian suite has a driver of 560 or later, where NVIDIA's default turns open.
    source, userspace, version = archive.driver_packages(options.driver, options.flavor or "proprietary", release)
    how = "the newest known to support this kernel" if options.driver is None else f"from --driver {options.driver}"
    if source.suite.endswith("-backports"):
        how += f", from {source.suite} (--backports)"
    elif (fixed := newer_in_backports(archive, source)) is not None:
        how += (f"; {fixed.suite} has a newer packaging of it, {fixed.version}, with Debian's fixes for newer "
                "kernels: --backports takes it")
    return DriverPlan(
        version=version, downloads=(source, *userspace),
        description=f"{source.name} {source.version}; {how}",
        canonical={"kind": "debian", "package": _pkg(source), "userspace": [_pkg(p) for p in userspace]},
        env=BuilderEnv(driver_source="debian", driver_deb=_inside(source), driver_tree=DRIVER,
                       userspace_debs=" ".join(_inside(p) for p in userspace)))


def plan_run_driver(options: BuildOptions, cache: Cache, fetcher: Fetcher) -> DriverPlan:
    run = resolve_run_driver(version=options.driver, installer=options.installer, template=options.installer_url,
                             sha256=options.sha256, store=cache.downloads, fetcher=fetcher)
    require_flavor(run.version, options.flavor or default_flavor(run.version))
    return DriverPlan(version=run.version, canonical=run.canonical(), run=run,
                      description=f"NVIDIA installer {run.source} (sha256 {run.sha256[:12]}...)",
                      env=BuilderEnv(driver_source="run", driver_tree=DRIVER, collect_userspace="1"))


# ---- what a kernel's flavour allows ----------------------------------------------------------------
def _kernel_flavour_rules(options: BuildOptions, release: str, reporter: Reporter
                          ) -> Callable[[tuple[str, ...]], tuple[str, ...]]:
    """Debian's kernel flavours, said before anything is fetched (FACTS.md, "Debian 13 trixie"):
    rt-amd64 is PREEMPT_RT, which NVIDIA's build refuses unless told to ignore it; cloud-amd64 has
    no DRM, so nvidia-drm is left out (NVIDIA's Kbuild would make an empty stub of it). The
    builder checks the same in the kernel's own .config, for any kernel."""
    m = DEBIAN_RELEASE_RE.fullmatch(release)
    flavour = m.group("flavour") if m else None
    if flavour == "rt-amd64" and not options.ignore_preempt_rt:
        raise InputError(f"{release} is a PREEMPT_RT kernel, and NVIDIA's build refuses PREEMPT_RT: NVIDIA does "
                         "not support its driver on realtime kernels",
                         hint="build for the amd64 flavour, or pass --ignore-preempt-rt to build anyway "
                              "(NVIDIA's IGNORE_PREEMPT_RT_PRESENCE=1; unsupported by NVIDIA)")
    if flavour == "rt-amd64":
        reporter.note("PREEMPT_RT kernel: building with IGNORE_PREEMPT_RT_PRESENCE=1 (--ignore-preempt-rt), "
                      "which NVIDIA does not support")

    def allowed(modules: tuple[str, ...]) -> tuple[str, ...]:
        if flavour != "cloud-amd64" or "nvidia-drm" not in modules:
            return modules
        reporter.note(f"{release} has no DRM (Debian's cloud kernels are built without CONFIG_DRM): nvidia-drm "
                      "is left out; the modules serve compute, not displays")
        return tuple(name for name in modules if name != "nvidia-drm")

    return allowed


# ---- the whole ---------------------------------------------------------------------------------
@dataclass(frozen=True)
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
    compile_cache_size: str | None = None  # the compile cache's bound; None: the build uses none

    @property
    def inputs(self) -> list[str]:
        """The sha256 of every downloaded input."""
        found = [p.sha256 for p in (*self.kernel.downloads, *self.driver.downloads)]
        return found + ([self.driver.run.sha256] if self.driver.run is not None else [])


def plan_modules(options: BuildOptions, services: Services) -> ModulesPlan:
    """Resolve what to build (kernel, driver, builder) into its spec and cache key; builds nothing.
    The engine is asked for only once every input has been checked."""
    settings, reporter = services.settings, services.reporter
    if options.jobs is None:
        options = dataclasses.replace(options, jobs=settings.cpu_count)
    signing, certificate = None, None
    if options.sign_key is not None:  # checked first: a wrong key or PIN fails before any download
        signing = load_signing_key(options.sign_key, options.sign_cert, settings.sign_pin)
        certificate = signing.certificate
    elif options.sign_cert is not None:
        certificate = Certificate.load(Path(options.sign_cert))
    compile_cache_size = settings.compile_cache_bound() if options.compile_cache else None
    cache, fetcher = services.cache, services.fetcher
    release = None
    if options.kernel is None:
        release = validate_release(settings.host_release, what="this host's kernel release")
        reporter.note(f"kernel: {release} (this host's `uname -r`; pass --kernel to build for another)")
    elif options.kernel != "latest":
        release = options.kernel
    if options.distribution is None:  # the release's own Debian, else this host's: said once, resolved once
        distribution, why = debian_distribution(release, settings.host_codename)
        options = dataclasses.replace(options, distribution=distribution)
        if release is None or DEBIAN_RELEASE_RE.fullmatch(release) or options.driver_source == "debian":
            reporter.note(f"Debian release: {distribution} ({why}; choose with --distribution)")
    archive = DebianArchive(cache=cache, fetcher=fetcher, reporter=reporter, mirror=options.apt_mirror,
                            security_mirror=options.apt_security_mirror, distribution=options.distribution,
                            refresh=options.refresh_index, driver_backports=options.backports)
    if release is None:
        release = archive.latest_kernel()
        reporter.note(f"kernel: {release} (the newest headers in Debian {options.distribution}, its updates and "
                      "security updates)")
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
                      f"{kernel.clone['commit'][:12]}), release suffix {kernel.env.kernel_suffix!r}")
    modules_wanted = _kernel_flavour_rules(options, release, reporter)
    if options.driver_source == "debian":
        driver = plan_debian_driver(archive, options, release)
    else:
        driver = plan_run_driver(options, cache, fetcher)
    if options.flavor is None:
        options = dataclasses.replace(options, flavor=default_flavor(driver.version))
        why = ("NVIDIA's default from 560 on; --flavor proprietary for the proprietary modules up to 580"
               if options.flavor == "open" else "the default before 560; --flavor open for the open modules")
        reporter.note(f"driver: {driver.version} {options.flavor} ({driver.description}; {why})")
    else:
        reporter.note(f"driver: {driver.version} {options.flavor} ({driver.description})")
    if kernel_source == "debian" and options.sign_key is None and not options.no_build:
        reporter.note(f"the modules will be unsigned: {release} is a Debian kernel, which under Secure Boot "
                      "(kernel lockdown) refuses unsigned modules; sign them with --sign-key KEY --sign-cert CERT "
                      "(a key the host's firmware or MOK list trusts) where Secure Boot is on")

    base = options.builder_base or BASE_BY_GCC.get(kernel.gcc_major)
    if base is None:
        raise InputError(f"kernel {release} was built with gcc {kernel.gcc_major}, and cudabuild knows no builder "
                         "base image with that compiler",
                         hint="pass --builder-base IMAGE naming an image whose gcc has that major version")
    why = "--builder-base" if options.builder_base else f"gcc {kernel.gcc_major}, the kernel's own compiler"
    reporter.note(f"builder base: {base} ({why})")
    engine = services.engine()  # every input was checked before this
    builder = plan_builder(engine, base=base, distribution=base.split(":", 1)[-1], gcc_major=kernel.gcc_major,
                           mirror=options.apt_mirror, security_mirror=options.apt_security_mirror)
    if kernel.clone is not None:  # a git tree is prepared by this builder: named after both
        prepared = f"prepared-{key_of([kernel.canonical, builder.tag])[:24]}"
        kernel = dataclasses.replace(kernel, tree_dir=prepared,
                                     env=kernel.env.merged(kernel_prepared=f"{KERNELS}/{prepared}"))
    spec = BuildSpec(kernel_release=release, driver_version=driver.version, flavor=options.flavor,
                     kernel=kernel.canonical, driver=driver.canonical, builder_tag=builder.tag,
                     modules=modules_wanted(modules_to_build(driver.version, options.only_modules)))
    unsigned_key = key_of(spec.canonical())
    if certificate is not None:
        spec = dataclasses.replace(spec, signing={"cert_sha256": certificate.sha256})
        reporter.note(f"signing: with the key of {certificate.signer} (certificate sha256 {certificate.sha256[:16]}...)")
    return ModulesPlan(options=options, spec=spec, key=key_of(spec.canonical()),
                       tag=image_tag(MODULES_REPOSITORY, driver.version, options.flavor, release,
                                     certificate.sha256 if certificate else None, modules=spec.modules), kernel=kernel,
                       driver=driver, builder=builder, cache=cache, fetcher=fetcher, archive=archive, engine=engine,
                       signing=signing, certificate=certificate, unsigned_key=unsigned_key,
                       compile_cache_size=compile_cache_size)
