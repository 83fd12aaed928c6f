"""The steps of a build, each on the host or in its own disposable container: the workshop (downloads,
the builder image, the kernel tree fetched, unpacked or prepared once per kernel), the build, the
signing, the verification, the boot test; and the other ways a result reaches the cache: a registry
pull, verified as a build is, and a modules image from elsewhere, read and verified the same way.

The containers of a build, each with only what it needs (cudabuild/compile/contract.py):
- fetch (git kernels): the one with a network; writes a clone into a staging directory;
- prepare: unpacks Debian's headers or prepares a git tag, into a staging directory; the host
  renames it into the cache, where every later container sees it read-only;
- unpack (Debian's driver): its source, and its userspace packages, each unpacked into a staging
  directory once per set of packages and renamed into the cache the same way;
- build: kernel trees, inputs and the driver's sources (an installer, or Debian's unpacked source)
  read-only, its own work directory writable."""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import cudabuild
from cudabuild import artifact
from cudabuild.artifact import (Artifact, ImageLabels, Manifest, describe_userspace, read_labels,
                                unpack_image)
from cudabuild.artifact.admit import Intake, admit
from cudabuild.store.cache import Cache, key_of
from cudabuild.compile.builder import builder_scripts, builder_user, ensure_builder, run_build
from cudabuild.compile.contract import COMPILE_CACHE, DRIVER, INPUTS, KERNELS, KEY, WORK, BuilderEnv
from cudabuild.compile.plan import ModulesPlan
from cudabuild.compile.publish import keep_references
from cudabuild.engine import Engine, Mount
from cudabuild.errors import InputError, VerifyError
from cudabuild.store.fetch import Fetcher
from cudabuild.nvidia import DEBIAN_RELEASE_RE, debian_distribution
from cudabuild.options import BuildOptions
from cudabuild.settings import Services
from cudabuild.signing import verify_signature
from cudabuild.sources.debian import DebianArchive, headers_files
from cudabuild.sources.run import RunDriver, driver_subdir, extract_installer
from cudabuild.ui import Reporter
from cudabuild.verify import config_enabled, verify_modules


def publish_checked(cache: Cache, checked: artifact.Artifact, key: str) -> None:
    """Move a result that was just checked whole into the cache, with its files' stats (a rename
    keeps their inodes and times): the reads that follow re-hash only what changed since."""
    stats = artifact.file_stats(checked)
    cache.publish(checked.root, key)
    cache.record_checked(key, stats)


def pull_verified(plan: ModulesPlan, store, remote: str, *, reporter: Reporter, verify_key: str | None = None) -> None:
    """The registry's modules image into the cache, over the store's own API (the userspace layer
    the cache already holds is not fetched again), verified on this host as a build would be
    (artifact.admit): with `verify_key`, its signature and provenance before any layer is fetched;
    every file's digest against its manifest, its labels, the key, vermagic, version and symbol
    CRCs against this kernel's Module.symvers. A refusal leaves nothing in the cache."""
    from cudabuild.registry import LayerStore
    from cudabuild.registry.trust import load_verify_key, require_signed

    spec, cache = plan.spec, plan.cache
    signed = require_signed(store, load_verify_key(verify_key) if verify_key else None)
    layers = LayerStore(cache.root / "layers")

    def unpack(out: Path) -> ImageLabels | None:
        return read_labels(store.pull(remote, out, accept=signed, layers=layers), remote)

    def expect(m: Manifest) -> None:
        if (m.key, m.kernel_release, m.driver_version, m.flavor) != (plan.key, spec.kernel_release,
                                                                      spec.driver_version, spec.flavor):
            raise VerifyError(f"its manifest describes another build (key {m.key[:16]}..., "
                              f"{m.driver_version} {m.flavor} for {m.kernel_release})")

    def keep(made: Artifact) -> Artifact:
        layers.adopt(made.root)
        publish_checked(cache, made, plan.key)
        return made

    intake = Intake(ref=remote, fetch_step=f"pull {remote} (the registry has this build)",
                    verify_step="verify pulled modules (digests, vermagic, version, symbol CRCs)",
                    refused_as=f"the registry's {remote}",
                    hint=f"nothing was put in the cache; build and push it again: cudabuild modules --kernel "
                         f"{spec.kernel_release} --driver {spec.driver_version} --no-cache --registry REPO")
    admit(intake, cache.workdir(f"pull-{plan.key[:12]}"), unpack=unpack, reporter=reporter, keep=keep,
          discard=cache.discard, expect=expect, check=lambda made, work: verify(plan, made.root / "modules", work))


def _unpack_from_engine(engine: Engine, ref: str, out: Path) -> None:
    """The modules image `ref`'s one layer, saved from the engine, into `out`."""
    saved = out.parent / "image.tar"
    with open(saved, "wb") as tar:
        for chunk in engine.save(ref):
            tar.write(chunk)
    unpack_image(saved, out)
    saved.unlink()


def import_image(reference: str, labels: ImageLabels, services: Services, *, unpack=None,
                 layers=None) -> Artifact:
    """A modules image that was not built with this cache (`docker pull`ed, or made on another
    machine), read from the engine (or by `unpack`) and admitted as a registry pull is
    (artifact.admit): its layers of modules/, userspace/ and the manifest, every digest, the
    driver's own file names, vermagic and version, the labels against the manifest, and the symbol
    CRCs against the kernel's Module.symvers where Debian has that kernel. Then it is put in the
    cache (and the userspace layer it brought into `layers`); a refusal leaves nothing there."""
    cache, reporter = services.cache, services.reporter

    def from_engine(out: Path) -> ImageLabels:
        _unpack_from_engine(services.engine(), reference, out)
        return labels

    def check(made: Artifact, work: Path) -> None:
        m = made.manifest
        symvers = _debian_symvers(m.kernel_release, work, services)
        if symvers is not None:
            modversions = config_enabled(symvers[1], "CONFIG_MODVERSIONS")
            verify_modules(made.root / "modules", release=m.kernel_release, driver_version=m.driver_version,
                           expected=[e.name for e in m.modules], symvers=symvers[0] if modversions else None,
                           modversions=modversions)

    def keep(made: Artifact) -> Artifact:
        if layers is not None:
            layers.adopt(made.root)
        publish_checked(cache, made, labels.key)
        return artifact.load(cache.result_dir(labels.key))

    intake = Intake(ref=reference, fetch_step=f"read {reference} (it was not built with this cache)",
                    verify_step="verify its modules (digests, vermagic, version, symbol CRCs)", refused_as=reference,
                    hint="nothing was put in the cache; use an unchanged image cudabuild made, or build the modules "
                         "here: cudabuild modules --kernel RELEASE --driver VERSION")
    return admit(intake, cache.workdir(f"import-{labels.key[:12]}"), unpack=unpack or from_engine, reporter=reporter,
                 keep=keep, discard=cache.discard, check=check)


def pull_signed(reference: str | None, services: Services, verify_key: str) -> Artifact:
    """The modules image `reference` (REPO/NAME:TAG in a registry, or oci:DIR/NAME:TAG in a
    bundle), used only when signed by the public key in the file `verify_key` and its signed
    provenance names the build its labels say: checked before anything is fetched, on a cache hit
    too. Its build in the cache is used when there; else it is pulled and admitted as an outside
    image is."""
    from cudabuild.errors import RegistryError
    from cudabuild.registry import LayerStore, open_store
    from cudabuild.registry.trust import load_verify_key, require_signed

    if not reference or "/" not in reference or ":" not in reference.rsplit("/", 1)[1]:
        raise InputError(f"--verify-key checks an image in a registry or bundle, and --modules {reference!r} "
                         "names none", hint="pass --modules REGISTRY/PATH/modules:TAG or oci:DIR/modules:TAG")
    signed = require_signed(store := open_store(reference.rsplit("/", 1)[0],
                                                docker_config=services.settings.docker_config),
                            load_verify_key(verify_key))
    with store.answers(reference):
        found = store.resolve(reference)
    if found is None:
        raise RegistryError(f"{store.host} has no {reference}", hint="check the tag",
                            exit_code=RegistryError.NOT_THERE)
    with services.reporter.step(f"verify the signature of {reference} ({found.digest[:19]}...)"):
        with store.answers(reference):
            signed(found)
    labels = read_labels(found.labels, reference)
    if labels is None:
        raise InputError(f"{reference} has no cudabuild labels: it is not a modules image", hint="pass a modules "
                         "image `cudabuild modules --registry` pushed")
    cache = services.cache
    if cache.result(labels.key):
        return artifact.load(cache.result_dir(labels.key), unchanged_since=cache.checked_stats(labels.key))

    layers = LayerStore(cache.root / "layers")

    def unpack(out: Path) -> ImageLabels:
        def same(again) -> None:
            if again.digest != found.digest:
                raise VerifyError(f"{reference} changed while it was read ({found.digest[:19]}... was verified)")
        store.pull(reference, out, accept=same, layers=layers)
        return labels

    return import_image(reference, labels, services, unpack=unpack, layers=layers)


def _debian_symvers(release: str, work: Path, services: Services) -> tuple[Path, Path] | None:
    """Module.symvers and .config of a Debian kernel release, from its headers package; None (said)
    when Debian has no such kernel or its archive cannot be read."""
    from cudabuild.errors import FetchError

    settings, cache, fetcher, reporter = services.settings, services.cache, services.fetcher, services.reporter
    if not DEBIAN_RELEASE_RE.fullmatch(release):
        reporter.note(f"symbol CRCs not checked: {release} is not a Debian kernel, and only Debian's "
                      "Module.symvers can be fetched here")
        return None

    options = settings.build_options({})
    distribution = options.distribution or debian_distribution(release, settings.host_codename)[0]
    archive = DebianArchive(cache=cache, fetcher=fetcher, reporter=reporter, mirror=options.apt_mirror,
                            security_mirror=options.apt_security_mirror, distribution=distribution)
    try:
        found = archive.versions(f"linux-headers-{release}")
        if not found:
            reporter.note(f"symbol CRCs not checked: Debian {distribution} has no linux-headers-{release}")
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


def boot_test(checked: Artifact, *, options: BuildOptions, archive: DebianArchive, cache: Cache, fetcher: Fetcher,
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


def _ensure_tree(target: Path, *, what: str, cache: Cache, reporter: Reporter, make: Callable[[Path], None]) -> Path:
    """A tree in the cache made from inputs named by content (a kernel tree, the userspace driver
    unpacked): reused when it is there, else made by `make(staging)` in a staging directory and
    renamed into place. One maker at a time per tree."""
    name = target.name
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


@dataclass(frozen=True)
class _Workshop:
    """What a build's containers share: the builder image, the log, the mounts, the kernel tree."""

    run: Callable[..., None]  # run(script, env: BuilderEnv, mounts, network="none")
    env: BuilderEnv
    inputs: Mount
    log_path: Path
    image_id: str
    started: float
    scripts: Path  # builder/'s scripts in the cache, named by their content


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
    packages = [*kernel.downloads, *(driver.downloads if for_driver else ())]
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

    def container(script: str, env: BuilderEnv, mounts: list[Mount], network: str = "none") -> None:
        run_build(engine, image=builder.tag, reporter=reporter, verbose=options.verbose, log_path=log_path,
                  scripts=scripts, keep=options.keep_builder, script=script, mounts=mounts, network=network,
                  environment=env.to_env())

    prepare_mounts = [inputs]
    if kernel.clone is not None:
        clone = kernel.clone
        clone_dir = _ensure_tree(cache.kernels / clone["dir"], what="fetch kernel source", cache=cache,
                                 reporter=reporter,
                                 make=lambda staging: container(
                                     "fetch-kernel-git.sh", network="host",
                                     mounts=[Mount(str(staging), f"{KERNELS}/{clone['dir']}", read_only=False)],
                                     env=BuilderEnv(kernel_repo=clone["repo"], kernel_tag=clone["tag"],
                                                    kernel_commit=clone["commit"],
                                                    kernel_clone=f"{KERNELS}/{clone['dir']}",
                                                    kernel_checkout=clone["checkout"])))
        prepare_mounts.append(Mount(str(clone_dir), f"{KERNELS}/{clone['dir']}"))
    env = BuilderEnv().merged(kernel.env, driver.env, kernel_release=spec.kernel_release,
                              driver_version=spec.driver_version, modules=" ".join(spec.modules),
                              jobs=str(options.jobs), ignore_preempt_rt="1" if options.ignore_preempt_rt else "")
    _ensure_tree(cache.kernels / kernel.tree_dir, what=kernel.tree_step, cache=cache, reporter=reporter,
                 make=lambda staging: container(
                     "prepare-kernel.sh", env=env,
                     mounts=[*prepare_mounts, Mount(str(staging), f"{KERNELS}/{kernel.tree_dir}", read_only=False)]))
    return _Workshop(run=container, env=env, inputs=inputs, log_path=log_path, image_id=image_id,
                     started=started, scripts=scripts)


def prepare_kernel(plan: ModulesPlan, *, reporter: Reporter) -> Path:
    """The first half of a build alone: the kernel tree module builds read, fetched and prepared
    (or found in the cache). Returns its directory in the cache."""
    _workshop(plan, reporter=reporter, for_driver=False)
    return plan.cache.kernels / plan.kernel.tree_dir


def build(plan: ModulesPlan, *, reporter: Reporter) -> dict | None:
    """Build, verify and cache; returns what the compile cache gave the build (None: none used)."""
    spec, key, driver, cache = plan.spec, plan.key, plan.driver, plan.cache
    fetcher, builder, options, archive = plan.fetcher, plan.builder, plan.options, plan.archive
    build_mounts, subdir = [], ""
    if driver.run is not None:
        # On the host and first: a hostile installer is refused before any container starts.
        tree = _installer_tree(driver.run, cache=cache, reporter=reporter)
        subdir = driver_subdir(tree, spec.flavor, spec.driver_version)
    shop = _workshop(plan, reporter=reporter)
    if driver.run is None:
        tree = _unpacked(plan, shop, "source", reporter=reporter)
    build_mounts.append(Mount(str(tree), DRIVER))
    userspace = _unpacked(plan, shop, "userspace", reporter=reporter) if driver.env.userspace_debs else None
    work = cache.workdir(key[:16], owner=builder_user())
    env = shop.env.merged(driver_subdir=subdir)
    if plan.compile_cache_size is not None:
        build_mounts.append(Mount(str(_compile_cache(cache)), COMPILE_CACHE, read_only=False))
        env = env.merged(compile_cache=COMPILE_CACHE, compile_cache_size=plan.compile_cache_size)
    try:
        shop.run("build.sh", env=env, mounts=[shop.inputs, Mount(str(cache.kernels), KERNELS), *build_mounts,
                                              Mount(str(work), WORK, read_only=False)])
        used = _compile_cache_use(work, reporter) if plan.compile_cache_size is not None else None
        out = work / "out"
        _give_back(out)
        if userspace is not None:
            _link_tree(userspace, out / "userspace")
        with reporter.step("verify modules (vermagic, version, symbol CRCs)"):
            modversions, infos = verify(plan, out / "modules", work)
        manifest = Manifest(
            key=key, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            kernel_release=spec.kernel_release, driver_version=spec.driver_version, flavor=spec.flavor,
            vermagic=infos[0].vermagic, modules=tuple(infos),
            userspace=describe_userspace(out / "userspace"), modversions=modversions,
            cudabuild_version=cudabuild.__version__, build_seconds=round(time.monotonic() - shop.started, 1),
            kernel_source=spec.kernel, driver_source=spec.driver,
            builder_image={"tag": builder.tag, "id": shop.image_id, "base": builder.base})
        manifest.write(out)
        made = artifact.load(out)  # what the build made passes the check every reader applies
        if options.boot_test:  # the real kernel judges before anything is published
            boot_test(made, options=options, archive=archive, cache=cache, fetcher=fetcher, reporter=reporter)
        shutil.copy2(shop.log_path, out / "build.log")
        publish_checked(cache, made, key)
        keep_references(cache, manifest, tree / subdir if subdir else tree)
    finally:
        cache.discard(work)
    return used


# The parts of Debian's driver packages unpack-driver.sh unpacks: the step it names, the
# BuilderEnv field that gives it the packages.
_PARTS = {"source": ("unpack driver source", "driver_deb"), "userspace": ("unpack userspace driver", "userspace_debs")}


def _unpacked(plan: ModulesPlan, shop: _Workshop, part: str, *, reporter: Reporter) -> Path:
    """A part of Debian's driver packages unpacked (builder/unpack-driver.sh: `source`, the module
    source's tree, or `userspace`, the userspace packages flattened), once per set of packages and
    scripts: every build of that driver, for any kernel, takes it from there instead of
    decompressing the packages again (the source: copied into the build; the userspace: linked
    into the result). An installer's driver has neither: the host extracts the installer."""
    what, field = _PARTS[part]
    packages = getattr(plan.driver.env, field)
    # named by the packages and by the scripts that unpack them
    target = plan.cache.sources / f"{part}-{key_of([*packages.split(), shop.scripts.name])[:24]}"

    def make(staging: Path) -> None:
        shop.run("unpack-driver.sh", env=BuilderEnv(driver_source=plan.driver.env.driver_source, **{field: packages}),
                 mounts=[shop.inputs, Mount(str(staging), WORK, read_only=False)])
        _give_back(staging)

    return _ensure_tree(target, what=what, cache=plan.cache, reporter=reporter, make=make) / part


def _link_tree(source: Path, target: Path) -> None:
    """`source` at `target` by hard links (one file system: the cache's), copied where a link is
    refused; symbolic links and modes as they are. Nothing writes a result's files in place."""
    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    # copytree sets a directory's mode after filling it (it may not be writable)
    shutil.copytree(source, target, symlinks=True, copy_function=link_or_copy)


def _compile_cache(cache: Cache) -> Path:
    """The cache's compile cache, made and given to the builders' user at first use."""
    path = cache.compile_cache
    path.mkdir(exist_ok=True)
    owner, st = builder_user(), path.stat()
    if (st.st_uid, st.st_gid) != owner:
        os.chown(path, *owner)
    return path


def _compile_cache_use(work: Path, reporter: Reporter) -> dict | None:
    """What the compile cache gave this build: {"hits", "misses"}, counted in ccache's stats log of
    this build alone (builder/build.sh: CCACHE_STATSLOG=WORK/compile-cache.log; for each compile,
    a `# SOURCE` line, then the names of the counters it raised, one a line)."""
    try:
        lines = (work / "compile-cache.log").read_text(errors="replace").splitlines()
    except OSError:
        return None
    hits = sum(line in ("direct_cache_hit", "preprocessed_cache_hit") for line in lines)
    misses = lines.count("cache_miss")
    if hits + misses:
        reporter.note(f"compile cache: {hits} of {hits + misses} compiles answered from it "
                      f"({100 * hits / (hits + misses):.0f}%)")
    return {"hits": hits, "misses": misses}


def verify(plan: ModulesPlan, modules: Path, work: Path):
    """Every module present, vermagic, version and (with CONFIG_MODVERSIONS) symbol CRCs against
    this kernel's Module.symvers: after a build, after signing, and after a pull."""
    spec = plan.spec
    symvers, config = _kernel_files(plan, work)
    modversions = config_enabled(config, "CONFIG_MODVERSIONS")
    return modversions, verify_modules(modules, release=spec.kernel_release, driver_version=spec.driver_version,
                                       expected=list(spec.modules), symvers=symvers if modversions else None,
                                       modversions=modversions)


def sign(plan: ModulesPlan, *, reporter: Reporter) -> dict | None:
    """A signed build: the unsigned build of the same inputs (from the cache, or built first),
    its modules signed by the kernel's own sign-file in a container that alone sees the key,
    then every signature checked on the host against the certificate."""
    cache, key, signing = plan.cache, plan.key, plan.signing
    started = time.monotonic()  # the signed build's time: this run's (signing, and the build when not cached)
    unsigned = dataclasses.replace(plan, spec=dataclasses.replace(plan.spec, signing=None), key=plan.unsigned_key,
                                   signing=None, certificate=None)
    used = None  # what the compile cache gave the unsigned build, when this run makes it
    if plan.options.use_cache and cache.result(unsigned.key):
        reporter.cached("build modules", f"the unsigned build is in the cache ({cache.result_dir(unsigned.key)})")
    else:
        with cache.lock(unsigned.key):
            if not (plan.options.use_cache and cache.result(unsigned.key)):  # another run may have built it
                used = build(unsigned, reporter=reporter)
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
            shop.run("sign.sh", env=shop.env,
                     mounts=[Mount(str(cache.kernels), KERNELS), Mount(str(keys), KEY),
                             Mount(str(out / "modules"), f"{WORK}/modules", read_only=False)])
        _give_back(out)
        with reporter.step(f"verify signed modules (signatures against {signing.certificate.signer}, vermagic, "
                           "version, symbol CRCs)"):
            _, infos = verify(plan, out / "modules", work)
            hashes = {verify_signature(out / "modules" / f"{name}.ko", signing.certificate).hash_name
                      for name in plan.spec.modules}
        manifest = dataclasses.replace(
            source.manifest, key=key, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            modules=tuple(infos), signature=signing.certificate.record(hashes.pop()),
            build_seconds=round(time.monotonic() - started, 1))
        manifest.write(out)
        made = artifact.load(out)  # every reader's check, signatures included
        with open(out / "build.log", "a") as log:
            log.write(shop.log_path.read_text())
        publish_checked(cache, made, key)
    finally:
        cache.discard(work)
    return used
