"""Phase 1: `cudabuild modules` as a library call, as an outline: plan the build (compile/plan.py),
answer from the cache when it can (re-checking the cached artifact), else from the registry (a pull
verified on this host), else build (compile/steps.py); then publish: the cache, a one-layer modules
image, --output, and the registry."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cudabuild import artifact
from cudabuild.artifact import Artifact, Manifest
from cudabuild.compile import steps
from cudabuild.compile.plan import plan_modules
from cudabuild.registry.trust import PASSPHRASE_ENV
from cudabuild.compile.publish import Pushed, check_output, publish_image, push_modules, sign_pushed, write_output
from cudabuild.errors import ArtifactError, RegistryError
from cudabuild.options import BuildOptions
from cudabuild.nvidia import debian_distribution
from cudabuild.options import check_boot_append, check_boot_timeout
from cudabuild.compile.intake import find_modules
from cudabuild.settings import Services
from cudabuild.sources.debian import DebianArchive
from cudabuild.ui import Report, format_seconds
from cudabuild.errors import VerifyError


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
    compile_cache: dict | None = None  # {"hits", "misses"} of the compile cache, when this run compiled with it
    push: object | None = None  # publish.Pushed: the digest, the bytes sent, the signature's tags

    @property
    def manifest(self) -> Manifest:
        return self.artifact.manifest

    def to_json(self) -> dict:
        m = self.manifest
        return {
            "kernel_release": m.kernel_release,
            "driver_version": m.driver_version,
            "flavor": m.flavor,
            "cache_hit": self.cache_hit,
            "origin": self.origin,
            "registry": {"ref": self.registry_ref, "pushed": self.pushed,
                         **({"digest": self.push.digest, "bytes_sent": self.push.bytes_sent,
                             "signed": list(self.push.signed)} if self.push else {})} if self.registry_ref else None,
            "modules_image": self.modules_image,
            "output_dir": str(self.output_dir) if self.output_dir else None,
            "cache_dir": str(self.artifact.root),
            "modules": [{"name": e.name, "path": str(self.artifact.module_path(e.name)), "vermagic": e.vermagic,
                         "version": e.version, "sha256": e.sha256, "size": e.size} for e in m.modules],
            "boot_test": m.boot_test if self.boot_tested else None,
            "compile_cache": self.compile_cache,
            "steps": [{"name": s.name, "seconds": s.seconds, "status": s.status} for s in self.steps],
        }

    def text(self) -> str:
        m = self.manifest
        origin = {"cached": "from the cache", "pulled": f"pulled from {self.registry_ref} and verified",
                  "built": "built and verified"}[self.origin]
        lines = [f"NVIDIA {m.driver_version} ({m.flavor}) for Linux {m.kernel_release}: {origin}"]
        lines += [f"  {e.file:<20} {e.size / 1024**2:7.1f} MiB  version {e.version or '-':<12} vermagic {e.vermagic}"
                  for e in m.modules]
        if m.signature:
            lines.append(f"signed by:     {m.signature['signer']} (key {m.signature['key_id']}, "
                         f"{m.signature['hash']}; certificate sha256 {m.signature['cert_sha256'][:16]}...)")
        lines.append(f"modules image: {self.modules_image}")
        lines.append(f"cache:         {self.artifact.root}")
        if self.output_dir:
            lines.append(f"output:        {self.output_dir}")
        if self.registry_ref:
            lines.append(f"registry:      {self.registry_ref} ({'pushed' if self.pushed else 'already there'})")
            if self.push is not None:
                lines.append(f"               {self.push.digest}" + (f", {self.push.bytes_sent / 1e6:.1f} MB sent"
                                                                    if self.pushed else ""))
                lines += [f"signed:        {tag}" for tag in self.push.signed]
        if self.origin == "built" and m.build_seconds is not None:
            lines.append(f"build time:    {format_seconds(m.build_seconds)}")
        if self.boot_tested and m.boot_test:
            from cudabuild.boottest import lines_of  # only here: a cache hit does not import the boot test

            lines += lines_of(m.boot_test)
        return "\n".join(lines)


def build_modules(options: BuildOptions, services: Services) -> ModulesResult:
    reporter = services.reporter
    output = check_output(options.output, force=options.force) if options.output else None
    plan = plan_modules(options, services)
    cache, key, tag, engine = plan.cache, plan.key, plan.tag, plan.engine
    registry = services.registry(options.registry)
    remote = registry.ref(tag) if registry else None
    in_registry: bool | None = None  # whether the registry has this key (None: not asked)
    registry_down: RegistryError | None = None
    compile_cache = None

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
                        in_registry = registry.has(remote, key, note=reporter.note)
                    except RegistryError as exc:
                        registry_down = exc
                        reporter.warn(f"{exc.message}; {'nothing is pulled' if options.no_build else 'building here'}")
                    if in_registry:
                        steps.pull_verified(plan, registry, remote, reporter=reporter, verify_key=options.verify_key)
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
                    compile_cache = (steps.sign if plan.signing else steps.build)(plan, reporter=reporter)
                    origin = "built"
        finally:
            lock.release()
    result_dir = cache.result_dir(key)
    if origin == "cached":
        reporter.cached("build modules", f"cached result {result_dir}")
    known = cache.checked_stats(key)
    try:
        checked = artifact.load(result_dir, unchanged_since=known)
    except ArtifactError as exc:
        exc.hint = (f"the cached result was changed after it was built, and is not used; remove it (rm -rf "
                    f"{result_dir}) or build again with --no-cache")
        raise
    if checked.manifest.key != key:
        raise ArtifactError(f"{result_dir} holds the result of another build (key {checked.manifest.key[:16]}...)",
                            hint=f"remove it (rm -rf {result_dir}) or build again with --no-cache")
    stats = artifact.file_stats(checked)
    if stats != known:  # checked whole just now: the next cache hit reads only what changed since
        cache.record_checked(key, stats)
    if origin != "built" and options.boot_test:  # a fresh build was boot-tested before it was published
        with cache.lock(key):
            checked = steps.boot_test(checked, options=options, archive=plan.archive, cache=cache,
                                      fetcher=plan.fetcher, reporter=reporter)

    # ---- publish ---------------------------------------------------------------------------
    publish_image(engine, checked, tag=tag, reporter=reporter, work=cache.workdir(f"publish-{key[:12]}"))
    if output:
        write_output(checked, output, cache=cache)
        reporter.note(f"copied the modules, userspace and manifest to {output}")
    pushed, push = False, None
    if registry is not None:
        kept = f"the modules are kept here: {result_dir} and the image {tag}"
        try:
            if registry_down is not None:
                raise registry_down
            if in_registry is None:
                in_registry = registry.has(remote, key, note=reporter.note)
            if not in_registry:
                push = push_modules(registry, checked, remote, cache=cache, reporter=reporter, options=options,
                                    passphrase=services.settings.environ.get(PASSPHRASE_ENV))
                pushed = True
            elif options.sign_image:  # already there: signed now (a signature is cheap; the image is not sent)
                found = registry.resolve(remote)
                push = Pushed(found.digest, 0, tuple(sign_pushed(
                    registry, remote, found.digest, checked, options=options, reporter=reporter,
                    passphrase=services.settings.environ.get(PASSPHRASE_ENV))))
        except RegistryError as exc:
            exc.message = f"{exc.message}; {kept}"
            exc.args = (exc.message,)
            raise
    return ModulesResult(cache_hit=origin == "cached", origin=origin, artifact=checked, modules_image=tag,
                         output_dir=output, steps=list(reporter.steps), boot_tested=options.boot_test,
                         registry_ref=remote, pushed=pushed, compile_cache=compile_cache, push=push)


def boot_test_command(modules_ref: str | None, *, kernel_image: str | None, append: str | None,
                      timeout: float | None, distribution: str | None, apt_mirror: str | None,
                      apt_security_mirror: str | None, services) -> Report:
    """`cudabuild boot-test`: the modules found (an image, a directory, the newest build), their
    kernel booted with them; the verdict kept in the cached artifact's manifest; a refusal is the
    result's error (exit 7), raised once the result is shown."""
    from cudabuild import boottest

    if append is not None:
        check_boot_append(append, "--append")
    if timeout is not None:
        check_boot_timeout(timeout, "--timeout")
    settings, reporter, cache = services.settings, services.reporter, services.cache
    options = settings.build_options({"distribution": distribution, "apt_mirror": apt_mirror,
                                      "apt_security_mirror": apt_security_mirror, "kernel_image": kernel_image,
                                      "boot_append": append, "boot_timeout": timeout})
    checked = find_modules(modules_ref, services)

    def archive() -> DebianArchive:
        codename = options.distribution or debian_distribution(checked.manifest.kernel_release,
                                                               settings.host_codename)[0]
        return DebianArchive(cache=cache, fetcher=services.fetcher, reporter=reporter, mirror=options.apt_mirror,
                             security_mirror=options.apt_security_mirror, distribution=codename)

    result = boottest.run_for(checked, kernel_image=options.kernel_image, append=options.boot_append,
                     timeout=options.boot_timeout, archive=archive, cache=cache, fetcher=services.fetcher,
                     reporter=reporter)
    if result is None:
        return Report({"verdict": "skipped", "kernel": checked.manifest.kernel_release})
    if checked.root.resolve() == cache.result_dir(checked.manifest.key).resolve():
        boottest.record(checked, result)  # the cached artifact keeps its verdict; a directory elsewhere is not changed
    try:
        boottest.refuse_rejected(result)
        error = None
    except VerifyError as exc:
        error = exc
    return Report(result.to_json(), boottest.lines_of(result.to_json()), error=error)
