"""The command line: click turns arguments into frozen options and calls the library; `main()`
turns cudabuild's errors into their exit codes. Results go to stdout, progress to stderr."""

from __future__ import annotations

import functools
import json
import os
import shlex
import sys
from collections.abc import Mapping

import click

import cudabuild
from cudabuild.errors import EXIT_CODES, EXIT_INTERRUPTED, CudabuildError, InputError, printable
from cudabuild.options import (CHECKOUTS, DRIVER_SOURCES, ENVIRONMENT, FLAVORS, KERNEL_SOURCES, debian_distribution,
                               default_of,
                               resolve_build_options, validate_image_ref)
from cudabuild.settings import Settings
from cudabuild.ui import format_seconds

EXIT_CODE_HELP = "\b\nExit codes:\n" + "\n".join(f"  {code:<4} {meaning}" for code, meaning in EXIT_CODES)


@click.group(epilog=EXIT_CODE_HELP, context_settings={"help_option_names": ["-h", "--help"],
                                                      "max_content_width": 100})
@click.version_option(cudabuild.__version__, prog_name="cudabuild")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Build NVIDIA kernel modules for one exact kernel in a disposable container, verify them,
    and bake them into GPU container images that load the driver at start.

    \b
      cudabuild modules --kernel 6.1.0-56-amd64 --driver 535    # phase 1: verified modules
      cudabuild image device-query                              # phase 2: a runtime image
      docker run --privileged cudabuild/device-query:535.309.01-6.1.0-56-amd64
    """
    if ctx.obj is None:  # invoke() reads the settings; a caller of the click group directly gets this process's
        ctx.obj = Settings.from_env(os.environ)


def _settings() -> Settings:
    """The command's settings: read once, when the command line started (invoke)."""
    return click.get_current_context().find_root().obj


def _env_help(name: str) -> str:
    default = default_of(name)
    parts = [f"Default: {default}." if default not in (None, False, "") else ""]
    if name in ENVIRONMENT:
        parts.append(f"Env: {ENVIRONMENT[name]}.")
    return " ".join(p for p in parts if p)


# Every option that decides or steers a build, shared by each command that builds (modules, image).
# Values are None unless given: defaults and environment are applied by resolve_build_options.
BUILD_FLAGS = [
    click.option("--kernel", metavar="RELEASE",
                 help="The target kernel's `uname -r` (e.g. 6.1.0-56-amd64), or `latest` for the newest the "
                      "kernel source has. Default: this host's release."),
    click.option("--driver", metavar="VERSION",
                 help="NVIDIA driver version (535.309.01) or branch (535: its newest release). Default: the "
                      "newest driver known to support the kernel."),
    click.option("--kernel-source", type=click.Choice(KERNEL_SOURCES),
                 help="Where the kernel comes from. debian: the linux-headers-RELEASE packages (e.g. --kernel "
                      "6.1.0-56-amd64). git: the release's tag of --kernel-repo (4.3.6-coreos -> v4.3.6), prepared "
                      "with --kernel-config and --symvers. Default: debian for Debian releases, git otherwise."),
    click.option("--kernel-repo", metavar="URL",
                 help="Git repository with linux-stable's tags (e.g. git://mirror/linux-stable.git). "
                      + _env_help("kernel_repo")),
    click.option("--kernel-config", metavar="FILE|host",
                 help="The target kernel's .config (git source; e.g. --kernel-config ./config-4.3.6-coreos). host: "
                      "/proc/config.gz or /boot/config-$(uname -r)."),
    click.option("--symvers", metavar="FILE|host",
                 help="The target kernel's Module.symvers, needed with CONFIG_MODVERSIONS=y (git source; e.g. "
                      "--symvers ./Module.symvers). host: /lib/modules/$(uname -r)/build/Module.symvers."),
    click.option("--kernel-checkout", type=click.Choice(CHECKOUTS),
                 help="sparse: a partial clone of the tag with only what module builds read (7x fewer bytes); "
                      "full: a plain shallow clone. " + _env_help("kernel_checkout")),
    click.option("--driver-source", type=click.Choice(DRIVER_SOURCES),
                 help="Where the driver comes from. debian: non-free nvidia-kernel-source / "
                      "nvidia-tesla-BRANCH-kernel-source and the userspace packages of the same version. run: "
                      "NVIDIA's NVIDIA-Linux-x86_64-VERSION.run installer (see --installer). "
                      + _env_help("driver_source")),
    click.option("--installer", metavar="URL|PATH",
                 help="The .run installer (run source; e.g. --installer ./NVIDIA-Linux-x86_64-535.309.01.run). "
                      "It is checked and unpacked on the host, never run. Default: NVIDIA's download URL for "
                      "--driver, or CUDABUILD_INSTALLER_URL."),
    click.option("--installer-url", "installer_url", hidden=True),
    click.option("--sha256", metavar="HEX", help="Expected sha256 of the installer; a mismatch deletes the download."),
    click.option("--flavor", type=click.Choice(FLAVORS),
                 help="Proprietary modules, or the open modules (Turing and newer GPUs; e.g. --flavor open). "
                      "Default: the driver's own, open from 560 on (580, 595), proprietary before (535, 550); "
                      "from 590 on there are only the open modules. " + _env_help("flavor")),
    click.option("--ignore-preempt-rt", "ignore_preempt_rt", is_flag=True, default=None,
                 help="Build for a PREEMPT_RT kernel (Debian's rt-amd64) although NVIDIA's build refuses it "
                      "(IGNORE_PREEMPT_RT_PRESENCE=1; NVIDIA does not support it)."),
    click.option("--only-modules", "only_modules", metavar="NAMES",
                 help="Build only these modules, comma-separated, each with what it needs (e.g. --only-modules "
                      "nvidia,nvidia-uvm: a compute-only driver, no modeset, drm or peermem). Default: every module "
                      "the driver has. " + _env_help("only_modules")),
    click.option("--jobs", "-j", type=int, help="Parallel compile jobs (e.g. -j 4). Default: the CPU count."),
    click.option("--no-cache", "no_cache", is_flag=True, default=None,
                 help="Build again even when the cache has the result."),
    click.option("--refresh", "refresh_index", is_flag=True, default=None,
                 help="Re-read the package index now (it is re-read every 6 hours)."),
    click.option("--distribution", help="Debian release whose packages to use (e.g. trixie). Default: the "
                 "kernel release's own (6.12.117+deb13-amd64: trixie; 6.1.0-57-amd64: bookworm), else this "
                 "Debian host's (/etc/os-release), else bookworm. " + _env_help("distribution")),
    click.option("--backports", is_flag=True, default=None,
                 help="Take Debian's driver packages from the distribution's backports too, where newer (Debian's "
                      "fixes for newer kernels land there first; e.g. trixie-backports' nvidia-open-kernel-source)."),
    click.option("--apt-mirror", metavar="URL", help="Debian mirror. " + _env_help("apt_mirror")),
    click.option("--apt-security-mirror", metavar="URL", help="Debian security mirror. "
                 + _env_help("apt_security_mirror")),
    click.option("--builder-base", metavar="IMAGE",
                 help="Base image of the builder (default: chosen by the kernel's gcc, e.g. debian:bookworm "
                      "for gcc 12). Env: CUDABUILD_BUILDER_BASE."),
    click.option("--verbose", "-v", is_flag=True, default=None, help="Show the whole build log as it runs."),
    click.option("--keep-builder", is_flag=True, default=None,
                 help="Keep a failed builder container for debugging (docker commit it and look inside). "
                      "Env: CUDABUILD_KEEP_BUILDER=1."),
    click.option("--compile-cache/--no-compile-cache", "compile_cache", default=None,
                 help="Compile through ccache, its directory in the cache (compile-cache/, bounded by "
                      "CUDABUILD_COMPILE_CACHE_SIZE, default 4G): a rebuild of the same sources for the same "
                      "kernel does not compile again, and gives the same modules. On by default; "
                      "Env: CUDABUILD_COMPILE_CACHE=0 turns it off."),
    click.option("--boot-test", is_flag=True, default=None,
                 help="Before publishing, boot the modules' own kernel in a QEMU guest with them and the real "
                      "loader, and let the kernel judge each module (Debian kernels: their linux-image package; "
                      "git kernels: --kernel-image). A refusal fails the build (exit 7)."),
    click.option("--kernel-image", metavar="FILE",
                 help="The kernel the boot test boots: its vmlinuz (e.g. /boot/vmlinuz-RELEASE, CoreOS "
                      "/usr/boot/vmlinuz) or a Debian linux-image .deb. Implies --boot-test."),
    click.option("--boot-append", metavar="ARGS",
                 help="Kernel parameters for the boot test (e.g. --boot-append module.sig_enforce=1). "
                      "Implies --boot-test."),
    click.option("--boot-timeout", type=float, metavar="SECONDS",
                 help="Kill the boot-test guest after this long (default 300)."),
    click.option("--registry", metavar="HOST[:PORT]/PATH",
                 help="An OCI registry as the shared cache (e.g. --registry 127.0.0.1:5055/cudabuild): a build "
                      "found there with the same key is pulled and verified on this host instead of compiled; "
                      "a result is pushed there as PATH/modules:TAG. Env: CUDABUILD_REGISTRY."),
    click.option("--sign-key", metavar="FILE",
                 help="Sign every module with this PEM private key (Secure Boot), by the kernel's own sign-file "
                      "in a container that alone sees the key; encrypted keys take KBUILD_SIGN_PIN. With "
                      "--sign-cert. Env: CUDABUILD_SIGN_KEY."),
    click.option("--sign-cert", metavar="FILE",
                 help="The key's X.509 certificate (PEM or DER): each signature is checked against it, and the "
                      "manifest records it. Env: CUDABUILD_SIGN_CERT."),
    click.option("--no-build", "no_build", is_flag=True, default=None,
                 help="Never compile: take the modules from the cache or the registry, or fail (exit 21)."),
]


def build_flags(command):
    for option in reversed(BUILD_FLAGS):
        command = option(command)
    return command


def _build_options(flags: dict, **more):
    """Flags as given (None: not given) -> BuildOptions, with the environment, in one place."""
    no_cache = flags.pop("no_cache", None)
    if no_cache:
        flags["use_cache"] = False
    if flags.get("kernel_image") is not None or flags.get("boot_append") is not None:
        flags["boot_test"] = True
    return resolve_build_options({**flags, **more}, _settings())


def _show_boot_test(result: dict) -> None:
    """A boot test as people read it: the kernel, each module's verdict with the kernel's own
    lines, and the real loader's word."""
    click.echo(f"boot test: kernel {result['kernel']} ({result['kernel_image']}), QEMU {result['accelerator']}, "
               f"{result['seconds']:g} s" + (f", appended: {result['append']}" if result["append"] else ""))
    for m in result["modules"]:
        click.echo(f"  {m['name'] + '.ko':<20} {m['verdict']:<10} {m['reason']}")
        for line in m["kernel_said"][-4:]:
            click.echo(f"  {'':<31}{line}")
    loader = result["loader"]
    if loader["exit_code"] is not None:
        said = "; ".join(loader["said"][-2:]) or "nothing"
        click.echo(f"  the image's loader in the guest: exit {loader['exit_code']}: {said}")
    for note in result["notes"]:
        click.echo(f"  note: {note}")
    click.echo(f"verdict: {result['verdict']}")


@cli.command(epilog=EXIT_CODE_HELP)
@build_flags
@click.option("--output", metavar="DIR",
              help="Also copy modules/, userspace/ and manifest.json into DIR (e.g. --output ./nvidia): a new or "
                   "empty directory, or an earlier output. Checked before the build.")
@click.option("--force", is_flag=True, default=None,
              help="With --output: add the result to a directory that holds other files (nothing there is "
                   "replaced that cudabuild did not write).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with the result on stdout.")
@click.option("--options-json", "options_json", hidden=True, metavar="JSON",
              help="Every build option as data, resolved by `cudabuild matrix` for one cell.")
def modules(as_json: bool, options_json: str | None, **flags) -> None:
    """Build, verify and cache the NVIDIA kernel modules for one kernel.

    Packages are downloaded on the host (cached by content), the modules are compiled in a
    builder container with no privileges and no network, then checked on the host: every module
    present, vermagic for the target release, version equal to the driver, symbol CRCs equal to
    the kernel's Module.symvers. The result lands in the cache (CUDABUILD_CACHE) and in a
    one-layer image cudabuild/modules:DRIVER-RELEASE. A cached result is checked again (every
    file's digest, every module's vermagic and version) before it is used.

    \b
    Examples:
      cudabuild modules                      # this host's kernel, from its Debian release
      cudabuild modules --kernel latest --distribution trixie
      cudabuild modules --kernel 6.12.118+deb13-amd64 --driver-source run --driver 580.142
      cudabuild modules --kernel latest --driver 535
      cudabuild modules --kernel 6.1.0-56-amd64 --driver 470 --output ./nvidia --json
      cudabuild modules --kernel 6.1.0-56-amd64 --driver 535 --registry 127.0.0.1:5055/cudabuild
      cudabuild modules --kernel 4.3.6-coreos --kernel-config ./config --symvers ./Module.symvers \\
          --driver 352.39 --driver-source run
    """
    from cudabuild.compile.modules import build_modules

    if options_json is not None:  # a matrix cell: its options resolved by the matrix, as data
        from cudabuild.options import options_from_json

        given = [f"--{k.replace('_', '-')}" for k, v in flags.items() if v is not None]
        if given:
            raise click.UsageError(f"--options-json carries every build option; do not also pass {', '.join(given)}")
        options = options_from_json(options_json)
    else:
        options = _build_options(flags)
    settings = _settings()
    reporter = settings.reporter()
    result = build_modules(options, settings=settings, reporter=reporter)
    if as_json:
        click.echo(json.dumps(result.as_json(), indent=2))
        return
    m = result.manifest
    origin = {"cached": "from the cache", "pulled": f"pulled from {result.registry_ref} and verified",
              "built": "built and verified"}[result.origin]
    click.echo(f"NVIDIA {m.driver_version} ({m.flavor}) for Linux {m.kernel_release}: {origin}")
    for e in m.modules:
        click.echo(f"  {e.file:<20} {e.size / 1024**2:7.1f} MiB  version {e.version or '-':<12} "
                   f"vermagic {e.vermagic}")
    if m.signature:
        click.echo(f"signed by:     {m.signature['signer']} (key {m.signature['key_id']}, {m.signature['hash']}; "
                   f"certificate sha256 {m.signature['cert_sha256'][:16]}...)")
    click.echo(f"modules image: {result.modules_image}")
    click.echo(f"cache:         {result.artifact.root}")
    if result.output_dir:
        click.echo(f"output:        {result.output_dir}")
    if result.registry_ref:
        click.echo(f"registry:      {result.registry_ref} ({'pushed' if result.pushed else 'already there'})")
    if result.origin == "built" and m.build_seconds is not None:
        click.echo(f"build time:    {format_seconds(m.build_seconds)}")
    if result.boot_tested and m.boot_test:
        _show_boot_test(m.boot_test)


@cli.command(epilog=EXIT_CODE_HELP)
@click.argument("profile", required=False)
@click.option("--base", metavar="IMAGE", help="Any base image instead of a profile's (e.g. --base debian:bookworm).")
@click.option("--modules", "modules_ref", metavar="IMAGE|DIR",
              help="The modules to bake in: a cudabuild/modules:... image or an --output directory. "
                   "Default: the most recent build in the cache; with --kernel/--driver: that build.")
@click.option("--tag", metavar="TAG", help="Tag of the image (default cudabuild/PROFILE:DRIVER-RELEASE).")
@click.option("--dry-run", is_flag=True, help="Print the Dockerfile and exit; needs no engine.")
@click.option("--no-push", is_flag=True, help="Keep the image here: do not push it to --registry (a kernel-agnostic "
                                              "driver image still takes its builds from there).")
@click.option("--list", "list_profiles", is_flag=True, help="List the profiles and exit.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with the result on stdout.")
@build_flags
def image(profile, base, modules_ref, tag, dry_run, no_push, list_profiles, as_json, **flags) -> None:
    """Make a runtime image that loads the driver when it starts.

    PROFILE is one of images/profiles: cuda, tensorflow, torch, device-query; or give --base IMAGE.
    The image adds exactly one layer over its base: the modules, the userspace driver of the same
    version (SONAME links, ldconfig, nvidia-smi on PATH) and the loader, its entrypoint. Run it
    with `docker run --privileged IMAGE [COMMAND]`. With --kernel or --driver the modules are built
    (or found in the cache) first, with every build option of `cudabuild modules`.

    The profile `tool` makes cudabuild's own image (cudabuild/cudabuild:VERSION), which `matrix
    --backend swarm|kubernetes` runs on the nodes, from the cudabuild installed here (no checkout
    needed); with --registry it is pushed there too.

    The profile `driver` makes the driver container instead: its entrypoint is `cudabuild install
    --root /host`; run once per host as `docker run --rm --privileged --pid host -v /:/host IMAGE
    [install options]` (--wait keeps it running, for a DaemonSet), it loads the driver and writes the
    CDI spec, and no workload needs --privileged. With --registry and without --modules or
    --kernel it carries no modules and serves every kernel: at start it takes the running kernel's
    verified build from the host's staged builds or the registry (cudabuild install --registry),
    and stages the next kernel's while it runs.

    \b
    Examples:
      cudabuild image device-query
      cudabuild image tensorflow --modules cudabuild/modules:535.309.01-6.1.0-56-amd64
      cudabuild image --base debian:bookworm --kernel latest --driver 535 --tag my/gpu:535
      cudabuild image torch --dry-run
      cudabuild image tool --registry 127.0.0.1:5000/cudabuild
      cudabuild image driver --modules cudabuild/modules:535.309.01-6.1.0-56-amd64 \\
          --registry registry.example/gpu     # pushed as registry.example/gpu/driver:TAG
      cudabuild image driver --registry registry.example/gpu --driver 535   # every kernel
    """
    from cudabuild import artifact
    from cudabuild.deliver import image as images

    if list_profiles:
        for name, p in images.profiles().items():
            click.echo(f"{name:<14} {p.base:<48} {p.description}")
        return
    if profile is None and base is None:
        raise click.UsageError("name a PROFILE (cuda, tensorflow, torch, device-query) or pass --base IMAGE")
    if profile == "tool":
        _tool_image(base, modules_ref, tag, dry_run, as_json, flags)
        return
    chosen = images.load_profile(profile, base)
    if tag is not None:
        validate_image_ref(tag, "--tag")
    if chosen.kind == "driver" and modules_ref is None and flags.get("kernel") is None:
        node_registry = flags.get("registry") or _settings().option_values.get("registry")
        if node_registry:
            _node_driver_image(chosen, node_registry, flags.get("driver"), tag, dry_run, as_json, push=not no_push)
            return
    building = flags.get("kernel") is not None or flags.get("driver") is not None
    if building and modules_ref is not None:
        raise click.UsageError("pass either --modules or --kernel/--driver, not both")
    settings = _settings()
    options = _build_options(flags) if building else None
    registry = _registry(options.registry if options else flags.get("registry"))
    if dry_run:
        click.echo(images.render_runtime(chosen), nl=False)
        return
    reporter = settings.reporter()
    engine = functools.cache(settings.engine)  # made when first needed: bad input is refused before
    cache = settings.cache()
    if options is not None:
        from cudabuild.compile.modules import build_modules

        checked = build_modules(options, settings=settings, reporter=reporter, engine_factory=engine).artifact
    else:
        checked = artifact.find(modules_ref, cache, engine, import_image=_importer(cache, engine, reporter))
    reporter.note(f"modules: {checked.root}")
    report = images.build_image(profile=chosen, checked=checked, engine=engine(), cache=cache, tag=tag,
                                reporter=reporter)
    if registry and not no_push:
        report["registry_ref"] = registry.ref(report["image"])
        with reporter.step(f"push {report['registry_ref']}"):
            engine().push(report["image"], report["registry_ref"])
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"{report['image']}: {report['profile']} on {report['base']}, one layer added")
    click.echo(f"  NVIDIA {report['driver_version']} for Linux {report['kernel_release']}"
               + (f"; base CUDA {report['base_cuda']} (driver supports up to {report['max_cuda']})"
                  if report["base_cuda"] else ""))
    if chosen.kind == "driver":
        click.echo(f"  run it once per host: docker run --rm --privileged --pid host -v /:/host {report['image']} "
                   "[--wait]")
        click.echo("  then any container: podman run --device nvidia.com/gpu=0 IMAGE, or cudabuild run --gpus 0 IMAGE")
    else:
        click.echo(f"  run it: docker run --privileged {report['image']} {shlex.join(report['smoke'])}")


@cli.command(epilog=EXIT_CODE_HELP)
@click.option("--kernels", metavar="LIST",
              help="Kernel releases, comma-separated (6.1.0-56-amd64,6.1.0-47-amd64), or debian:CODENAME for every "
                   "linux-headers-*-amd64 ABI Debian has (debian:bookworm).")
@click.option("--kernels-from", "kernels_file", type=click.File("r"), metavar="FILE|-",
              help="Kernel releases from a file (or - for stdin), one per line or blank-separated: a fleet's own "
                   "kernels, e.g. from kubectl get nodes.")
@click.option("--drivers", required=True, metavar="LIST",
              help="Driver versions or branches, comma-separated (535,470.256.02); SOURCE:VERSION gives a cell "
                   "its own --driver-source, so Debian's and NVIDIA's stand side by side (550,run:580.142).")
@click.option("--flavors", metavar="LIST", help="proprietary,open: each cell in each flavor (default: --flavor).")
@click.option("--backend", type=click.Choice(["local", "swarm", "kubernetes"]), default="local", show_default=True,
              help="local: builds on this engine. swarm: one replicated-job per cell on the Swarm this engine "
                   "manages (needs --registry). kubernetes: print one Job per cell.")
@click.option("--parallel", type=int, metavar="N",
              help="At most N cells at a time (default: 1 locally, every cell on a Swarm).")
@click.option("--image", metavar="IMAGE",
              help="cudabuild's own image for swarm and kubernetes (default REGISTRY/cudabuild:VERSION; "
                   "scripts/tool-image makes it from the wheel).")
@click.option("--node-cache", metavar="DIR",
              help="The cache directory on the nodes, mounted at the same path (default: this cache's path for "
                   "swarm, /var/cache/cudabuild for kubernetes).")
@click.option("--node-socket", default="/var/run/docker.sock", show_default=True, metavar="PATH",
              help="The Docker engine's socket on the nodes.")
@click.option("--timeout", "cell_timeout", type=float, default=3600, show_default=True, metavar="SECONDS",
              help="A Swarm job still unfinished after this long is reported as failed.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object, one entry per cell, on stdout.")
@build_flags
def matrix(kernels, kernels_file, drivers, flavors, backend, parallel, image, node_cache, node_socket, cell_timeout,
           as_json, **flags) -> None:
    """Build every kernel x driver pair: on this engine, as Swarm jobs, or as Kubernetes Jobs.

    Every cell is planned here first (its sources and cache key). With --registry a cell the
    registry already holds with the same key is reported as in the registry and not built again;
    every cell built is pushed there. A cell that fails does not stop the others: the summary names
    each failure with the last lines of its log, and the exit code is 22. Takes every build option
    of `cudabuild modules` (sources, mirrors, --flavor, ...).

    \b
    Examples:
      cudabuild matrix --kernels 6.1.0-56-amd64,6.1.0-47-amd64 --drivers 535,470 --parallel 2
      cudabuild matrix --kernels debian:bookworm --drivers 535 --registry 127.0.0.1:5055/cudabuild
      cudabuild matrix --kernels debian:trixie --drivers 550,run:580.142 --registry 127.0.0.1:5055/cudabuild
      cudabuild matrix --kernels 6.1.0-56-amd64 --drivers 535 --flavors proprietary,open \\
          --backend swarm --registry registry.example/gpu
      cudabuild matrix --kernels 6.1.0-56-amd64 --drivers 535 --backend kubernetes > jobs.yaml
      kubectl get nodes -o jsonpath='{.items[*].status.nodeInfo.kernelVersion}' | \\
          cudabuild matrix --kernels-from - --drivers 535 --registry registry.example/gpu --boot-test
    """
    from cudabuild.fleet.matrix import kernels_from, parse_request, run_matrix, summary_lines

    for name in ("kernel", "driver"):
        if flags.get(name) is not None:
            raise click.UsageError(f"matrix takes --{name}s LIST, not --{name}")
    if (kernels is None) == (kernels_file is None):
        raise click.UsageError("pass the kernels as --kernels LIST or --kernels-from FILE (one of them)")
    if kernels_file is not None:
        kernels = kernels_from(kernels_file.read(), kernels_file.name)
    request = parse_request(kernels=kernels, drivers=drivers, flavors=flavors, flavor=flags.get("flavor") or
                            _build_options({}).flavor, backend=backend, parallel=parallel, image=image,
                            node_cache=node_cache, node_socket=node_socket, timeout=cell_timeout)
    options = _build_options(dict(flags))
    if image is not None:
        validate_image_ref(image, "--image")
    settings = _settings()
    result = run_matrix(request, options, settings=settings, reporter=settings.reporter(),
                        engine_factory=functools.cache(settings.engine))
    if as_json:
        click.echo(json.dumps(result.as_json(), indent=2))
    elif backend == "kubernetes":
        import yaml

        click.echo(yaml.safe_dump_all(result.manifests, sort_keys=False), nl=False)
        for line in summary_lines(result):
            click.echo(line, err=True)
    else:
        for line in summary_lines(result):
            click.echo(line)
    if result.exit_code:
        click.get_current_context().exit(result.exit_code)


for _param in matrix.params:  # a matrix names its kernels and drivers as lists
    if _param.name in ("kernel", "driver"):
        _param.hidden = True


@cli.command("boot-test", epilog=EXIT_CODE_HELP)
@click.option("--modules", "modules_ref", metavar="IMAGE|DIR",
              help="The modules to test: a cudabuild/modules:... image or an --output directory. Default: the "
                   "most recent build in the cache.")
@click.option("--kernel-image", metavar="FILE",
              help="The kernel to boot: a vmlinuz or a Debian linux-image .deb. Default: the Debian release's own "
                   "linux-image package (downloaded, cached by content).")
@click.option("--append", metavar="ARGS", help="Kernel parameters (e.g. --append module.sig_enforce=1).")
@click.option("--timeout", type=float, metavar="SECONDS", help="Kill the guest after this long (default 300).")
@click.option("--distribution", help="Debian release the kernel image comes from. " + _env_help("distribution"))
@click.option("--apt-mirror", metavar="URL", help="Debian mirror. " + _env_help("apt_mirror"))
@click.option("--apt-security-mirror", metavar="URL", help="Debian security mirror. "
              + _env_help("apt_security_mirror"))
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object on stdout.")
def boot_test(modules_ref, kernel_image, append, timeout, as_json, **mirrors) -> None:
    """Boot the modules' kernel in a QEMU guest and let it judge each module.

    The guest's initramfs holds busybox, the kernel's own modules ours depend on (from their
    .modinfo), the modules and the image's real loader, which runs with real insmod inside the
    guest; nothing is ever loaded on this machine. Each module is accepted (loaded, or its init
    ran: without a GPU nvidia.ko says "No NVIDIA GPU found"), rejected with the kernel's own lines
    (invalid module format, a symbol version that disagrees, an unknown symbol, an unsigned module
    under enforced signatures), or not tried (it needs one that did not load). A refusal exits 7.
    The result is kept in the cached artifact's manifest and shown by `inspect`.

    \b
    Examples:
      cudabuild boot-test --modules cudabuild/modules:535.309.01-6.1.0-56-amd64
      cudabuild boot-test --modules ./nvidia --kernel-image /boot/vmlinuz-6.1.0-56-amd64
      cudabuild boot-test --modules ./nvidia --append module.sig_enforce=1 --json
    """
    from cudabuild import artifact, boottest
    from cudabuild.sources.debian import DebianArchive

    try:
        options = resolve_build_options({**mirrors, "kernel_image": kernel_image, "boot_append": append,
                                         "boot_timeout": timeout}, _settings())
    except InputError as exc:  # the options' words are `modules`'; this command's flags are --append, --timeout
        for theirs, ours in (("--boot-append", "--append"), ("--boot-timeout", "--timeout")):
            exc.message, exc.hint = exc.message.replace(theirs, ours), (exc.hint or "").replace(theirs, ours) or None
        exc.args = (exc.message,)
        raise
    settings = _settings()
    reporter = settings.reporter()
    cache = settings.cache()
    engine = functools.cache(settings.engine)
    checked = artifact.find(modules_ref, cache, engine, import_image=_importer(cache, engine, reporter))
    fetcher = settings.fetcher(reporter)

    def archive() -> DebianArchive:
        distribution = options.distribution or debian_distribution(checked.manifest.kernel_release,
                                                                    settings.host_codename)[0]
        return DebianArchive(cache=cache, fetcher=fetcher, reporter=reporter, mirror=options.apt_mirror,
                             security_mirror=options.apt_security_mirror, distribution=distribution)

    result = boottest.run_for(checked, kernel_image=options.kernel_image, append=options.boot_append,
                              timeout=options.boot_timeout, archive=archive, cache=cache, fetcher=fetcher,
                              reporter=reporter)
    if result is None:
        if as_json:
            click.echo(json.dumps({"verdict": "skipped", "kernel": checked.manifest.kernel_release}, indent=2))
        return
    if checked.root.resolve() == cache.result_dir(checked.manifest.key).resolve():
        boottest.record(checked, result)  # the cached artifact keeps its verdict; a directory elsewhere is not changed
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        _show_boot_test(result.to_json())
    boottest.refuse_rejected(result)


LOADER_EXIT_HELP = """\b
The loader's refusals, as in a runtime image:
  10   no CAP_SYS_MODULE: run it as root, or --privileged in a container
  11   the running kernel is not the modules' kernel
  12   nouveau holds the GPUs
  13   another NVIDIA version is loaded (its holders are named)
  14   a module failed to load (the kernel's reason is in dmesg)
  16   the GPUs' information in /proc/driver/nvidia cannot be read
  17   the loader's settings are malformed
  18   the GPU selection names a GPU that does not exist
  19   the kernel enforces module signatures and the modules are unsigned"""


@cli.command(epilog=LOADER_EXIT_HELP + "\n\n" + EXIT_CODE_HELP)
@click.option("--modules", "modules_ref", metavar="IMAGE|DIR",
              help="The modules to install: a cudabuild/modules:... image or an --output directory. Default: the "
                   "most recent build in the cache.")
@click.option("--root", default="/", show_default=True, metavar="DIR",
              help="The host's file system as this process sees it (/host in the driver container).")
@click.option("--cdi-host-root", default="/", show_default=True, metavar="DIR",
              help="The prefix of the paths the CDI spec names, as the host sees them.")
@click.option("--wait", is_flag=True, help="Stay running until stopped (a DaemonSet's container), then remove the "
                                           "ready file. With --registry: wait for a build, and stage the next kernel's.")
@click.option("--registry", metavar="HOST[:PORT]/PATH",
              help="Without --modules: take the running kernel's verified build from what is staged on the node, "
                   "else from this registry (its HTTP API; no engine needed). " + _env_help("registry"))
@click.option("--driver", "driver", metavar="VERSION|BRANCH",
              help="Without --modules: the driver the node runs (e.g. 535 or 535.309.01); remembered on the node.")
@click.option("--no-fallback", is_flag=True, default=None,
              help="Never install another driver version when the configured one has no build for the kernel.")
@click.option("--flavor", type=click.Choice(["open", "proprietary"]), default=None,
              help="Without --modules: the node's module flavour (default: the node's, else the first build "
                   "installed; a build of the other flavour is never used).")
@click.option("--poll", type=click.FloatRange(1, 86400), default=300, show_default=True, metavar="SECONDS",
              help="With --wait and --registry: how often to look for the next kernel (and, at most, between "
                   "retries while no build exists).")
@click.option("--kernel-hook", is_flag=True,
              help="Also write ROOT/etc/kernel/postinst.d/cudabuild, Debian's kernel hook: a new kernel's package "
                   "stages its build with the host's own cudabuild (by its absolute path). It never fails the "
                   "kernel's installation; `cudabuild ready` holds the reboot. A host without cudabuild gets none "
                   "(said): the waiting driver container stages the next kernel itself.")
@click.option("--drain", is_flag=True,
              help="When another driver version is loaded and containers hold the GPU: stop them (through the "
                   "engine), upgrade, and start them again. A holder outside any container is never stopped.")
@click.option("--drain-timeout", type=click.FloatRange(1, 3600), default=60, show_default=True, metavar="SECONDS",
              help="With --drain: how long to wait for the devices to be released after the containers stop.")
@click.option("--no-restart", is_flag=True, help="With --drain: leave the drained containers stopped.")
@click.option("--cdi-interval", type=click.FloatRange(1, 86400), default=30, show_default=True, metavar="SECONDS",
              help="With --wait: how often to check the CDI spec against the loaded driver and GPUs, and rewrite "
                   "it when it is stale.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object on stdout.")
def install(modules_ref, root, cdi_host_root, wait, registry, driver, no_fallback, flavor, poll, kernel_hook, drain,
            drain_timeout, no_restart, cdi_interval, as_json) -> None:
    """Install a built driver on this host, once, for every container.

    Loads the modules with the image loader's own checks, order and exit codes (privilege, kernel,
    nouveau, a version already loaded: what is missing of it is loaded), copies the userspace
    driver to ROOT/run/cudabuild/driver/VERSION (lib/ with SONAME links, bin/, firmware/), makes
    the device nodes under ROOT/dev, writes a CDI spec (kind nvidia.com/gpu: each GPU by index and
    UUID, and all) to ROOT/var/run/cdi and, last, ROOT/run/cudabuild/driver/ready. Run again with
    the same driver, it changes nothing and says so: safe at every boot. Containers then get GPUs
    without --privileged (podman run --device nvidia.com/gpu=0, cudabuild run --gpus 0).

    With another driver version loaded, it upgrades: refused (exit 24, naming every process that
    holds the GPU: cudabuild holders) while anything holds it, unless --drain stops the containers
    that do; the old modules are unloaded (last loaded first), the new ones loaded, and the
    userspace directory, CDI spec and ready file rewritten. When the new modules do not load, the
    old driver is loaded again with its spec and ready file (exit 25): never a host without one.

    Without --modules, with --registry or --driver (or on a node set up so before, which remembers
    them): the node's own driver, for whatever kernel it runs (the kernel-agnostic driver
    container). The build for the running kernel is taken from
    ROOT/var/lib/cudabuild/staged (cudabuild stage), else pulled from the registry over its HTTP API
    and checked (digests, vermagic, version, the kernel's symbol CRCs when the host has its
    Module.symvers); else another driver version's build for this kernel (said everywhere: log,
    ready file, cudabuild status), unless --no-fallback; else it fails (exit 23), or with --wait
    waits and retries. Waiting, it stages the kernel the host boots next whenever one appears.

    \b
    Examples:
      sudo cudabuild install --modules cudabuild/modules:535.309.01-6.1.0-56-amd64
      docker run --rm --privileged --pid host -v /:/host cudabuild/driver:535.309.01-6.1.0-56-amd64
      cudabuild install --modules ./nvidia --root /mnt/node --json
      sudo cudabuild install --modules cudabuild/modules:550.127.05-6.1.0-56-amd64 --drain
      cudabuild install --registry registry.example:5000/gpu --driver 535 --root /host --wait
      sudo cudabuild install --registry registry.example:5000/gpu --driver 535 --kernel-hook
    """
    import signal
    import threading
    from pathlib import Path

    from cudabuild import artifact
    from cudabuild.deliver import install as installer
    from cudabuild.deliver import upgrade

    settings = _settings()
    reporter = settings.reporter()
    if (no_restart or drain_timeout != 60) and not drain:
        raise InputError("--no-restart and --drain-timeout go with --drain", hint="add --drain, or leave them out")
    engine = functools.cache(settings.engine)
    policy = upgrade.Policy(drain=drain, drain_timeout=drain_timeout, restart=not no_restart, engine=engine)
    registry = registry or settings.option_values.get("registry")
    stop = threading.Event()
    if wait:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    if modules_ref is None and (registry or driver or flavor or _configured_node(root)):
        result = _install_node(settings, reporter, root=root, cdi_host_root=cdi_host_root, registry=registry,
                               driver=driver, fallback=None if no_fallback is None else False, wait=wait, poll=poll,
                               kernel_hook=kernel_hook, stop=stop, policy=policy, flavor=flavor)
        if result is None:  # stopped while waiting for a build
            return
    else:
        if kernel_hook:
            raise InputError("--kernel-hook stages builds from a registry", hint="pass --registry and --driver with it")
        if flavor:
            raise InputError("--flavor chooses the node's builds from a registry; --modules names one build",
                             hint="leave out --flavor, or --modules")
        where = None if modules_ref and os.path.isdir(modules_ref) else settings.cache()
        checked = artifact.find(modules_ref, where, engine,
                                import_image=_importer(where, engine, reporter) if where is not None else None)
        result = installer.install(checked, root=Path(root), host_root=cdi_host_root, env=settings.environ,
                                   reporter=reporter, policy=policy)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        what = "installed" if result.changed else "already installed: nothing changed"
        if result.upgraded_from:
            what = f"installed, replacing {result.upgraded_from}"
        click.echo(f"NVIDIA {result.driver_version} {what}")
        if result.drained:
            click.echo(f"  drained:   {', '.join(result.drained)} (stopped, then started again)")
        click.echo(f"  driver:    {result.driver_dir}" + (" (copied)" if result.files_changed else ""))
        click.echo(f"  loaded:    {', '.join(result.loaded) or 'nothing (already loaded)'}")
        click.echo("  GPUs:      " + (", ".join(f"{g['index']} {g['uuid']}" for g in result.gpus) or "none"))
        click.echo(f"  CDI spec:  {result.spec}" + (" (written)" if result.spec_changed else " (unchanged)"))
        click.echo(f"  ready:     {result.ready}")
        click.echo("  use it:    podman run --device nvidia.com/gpu=all IMAGE | cudabuild run --gpus all IMAGE")
    if wait:
        from cudabuild.deliver import cdi as specs

        if not stop.is_set():
            reporter.note("ready; waiting until stopped (the ready file goes away then)")
        try:
            while not stop.wait(cdi_interval):
                specs.refresh(Path(root), host_root=cdi_host_root, reporter=reporter)
            specs.refresh(Path(root), host_root=cdi_host_root, reporter=reporter)
        finally:  # whatever stopped the wait, the node is not said to be ready any more
            installer.not_ready(Path(root))
        reporter.note("stopped: the ready file is removed; the driver stays loaded and its CDI spec valid")


def _install_node(settings, reporter, *, root, cdi_host_root, registry, driver, fallback, wait, poll, kernel_hook,
                  stop, policy, flavor=None):
    """`install` without --modules: deliver/node.py serve, which stages the next kernel while it
    waits (in a thread here, so that the JSON result is printed once installed)."""
    import threading

    from cudabuild.deliver import node

    host = _host(root)
    config = node.config_for(host, driver=driver, registry=registry, fallback=fallback, flavor=flavor)
    if kernel_hook:
        node.write_hook(host, root, cdi_host_root, reporter)
    serve = functools.partial(node.serve, host, config, running=settings.host_release,
                              registry=settings.registry(config.registry), host_root=cdi_host_root,
                              env=settings.environ, reporter=reporter, poll=poll, stop=stop, policy=policy)
    if not wait:
        return serve(wait=False)
    done, box = threading.Event(), {}

    def installed_then(result):
        box["result"] = result
        done.set()

    def work():
        try:
            serve(wait=True, installed_then=installed_then)
        except BaseException as exc:  # said by the main thread
            box["error"] = exc
        finally:
            done.set()

    threading.Thread(target=work, name="node", daemon=True).start()
    while not done.wait(0.5):  # the main thread stays free for SIGTERM
        pass
    if "error" in box:
        stop.set()
        raise box["error"]
    return box.get("result")


def _configured_node(root: str) -> bool:
    """Whether the node under `root` was set up by a kernel-agnostic install (it remembers its driver)."""
    from cudabuild.deliver.staging import NodeConfig

    return os.path.isdir(root) and NodeConfig.load(_host(root)) is not None


def _host(root: str):
    from cudabuild.hostfs import HostRoot

    if not os.path.isdir(root):
        raise InputError(f"--root {root} is not a directory", hint="pass the host's file system, e.g. --root /host")
    return HostRoot(root)


FLAVOR_OPTION = click.option("--flavor", type=click.Choice(["open", "proprietary"]), default=None,
                             help="The node's module flavour (default: the node's, recorded at its first install; "
                                  "a build of the other flavour never counts).")


def _node_flags(command):
    command = FLAVOR_OPTION(command)
    command = click.option("--root", default="/", show_default=True, metavar="DIR",
                           help="The host's file system as this process sees it (/host in a container).")(command)
    command = click.option("--kernel", "kernel", metavar="RELEASE|next",
                           help="The kernel: a release, or `next` (the kernel the boot loader boots next: its "
                                "default entry where known, else the newest installed kernel of the running one's "
                                "flavour; exit 23 when it cannot be told). Default: the running kernel.")(command)
    return command


@cli.command(epilog=EXIT_CODE_HELP)
@_node_flags
@click.option("--registry", metavar="HOST[:PORT]/PATH", help="Where the build comes from (default: the node's).")
@click.option("--driver", "driver", metavar="VERSION|BRANCH", help="The driver (default: the node's).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object on stdout.")
def stage(root, kernel, flavor, registry, driver, as_json) -> None:
    """Stage the verified build for a kernel the host has not booted yet, so that its next boot
    needs no network.

    The build of the node's driver for the kernel is pulled from the registry over its HTTP API,
    checked (digests, vermagic, version, the kernel's symbol CRCs when the host has its
    Module.symvers) and kept in ROOT/var/lib/cudabuild/staged/RELEASE/. Staged builds of kernels
    that are no longer installed are removed (only when every installed kernel can be read). Exit
    23 when the registry has no such build.

    --driver or --flavor, once staged, changes the node's configuration: its next boot installs
    that driver and flavour, and `ready` answers for them. A change of flavour is never made unasked.

    \b
    Examples:
      cudabuild stage --kernel next
      cudabuild stage --kernel 6.1.0-56-amd64 --registry registry.example:5000/gpu --driver 535
      cudabuild stage --kernel next --flavor open   (the node moves to the open modules at its next boot)
      /etc/kernel/postinst.d/cudabuild 6.1.0-56-amd64 /boot/vmlinuz-6.1.0-56-amd64   (the kernel hook)
    """
    from cudabuild.deliver import node
    from cudabuild.deliver.staging import NodeConfig

    settings = _settings()
    reporter = settings.reporter()
    host = _host(root)
    config = node.config_for(host, driver=driver, registry=registry or settings.option_values.get("registry"),
                             fallback=None, flavor=flavor)
    saved = NodeConfig.load(host)
    release = node.resolve_kernel(kernel, host, settings.host_release)
    if saved is None:  # a node set up by staging first: `ready` answers for the same driver
        config.save(host)
    found = node.stage_kernel(host, release, config, running=settings.host_release,
                              registry=settings.registry(config.registry), reporter=reporter)
    if saved is not None and (driver or flavor) and (saved.driver, saved.flavor) != (config.driver, config.flavor):
        config.save(host)  # the operator changed the node's driver or flavour: its next boot takes that one
        reporter.warn(f"the node's driver is now {config.described} (it was {saved.described}); "
                      "its next boot installs that one")
    answer = {**found.to_json(), "path": str(found.artifact.root)}
    if as_json:
        click.echo(json.dumps(answer, indent=2))
    else:
        click.echo(f"staged NVIDIA {answer['driver']} for kernel {answer['kernel']} (from {answer['source']}): "
                   f"{answer['path']}")


@cli.command(epilog=EXIT_CODE_HELP)
@_node_flags
@click.option("--driver", "driver", metavar="VERSION|BRANCH", help="The driver (default: the node's).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object on stdout.")
def ready(root, kernel, flavor, driver, as_json) -> None:
    """Exit 0 only when the kernel's verified build of the node's driver is staged: the reboot gate.

    A staged build counts when it is whole (every file against its manifest) and, where it was
    boot-tested, the real kernel accepted it. Otherwise exit 23, saying what is missing.

    \b
    Examples:
      cudabuild ready --kernel next && systemctl reboot
      kured --reboot-sentinel-command="sh -c 'test -f /var/run/reboot-required && cudabuild ready --kernel next'"
      cudabuild ready --kernel 6.1.0-56-amd64 --json
    """
    from cudabuild.deliver import node
    from cudabuild.errors import NoBuildError

    settings = _settings()
    host = _host(root)
    config = node.config_for(host, driver=driver, registry=None, fallback=None, flavor=flavor)
    release = node.resolve_kernel(kernel, host, settings.host_release)
    answer = node.readiness(host, release, config)
    if as_json:
        click.echo(json.dumps(answer, indent=2))
    elif answer["ready"]:
        click.echo(f"ready: kernel {release} has a verified build of driver {config.shown_driver} staged")
    if not answer["ready"]:
        raise NoBuildError(f"not ready: {answer['missing']}", hint=answer["fix"])


@cli.command(epilog=EXIT_CODE_HELP)
@click.option("--root", default="/", show_default=True, metavar="DIR",
              help="The host's file system as this process sees it (/host in a container).")
@click.option("--json", "as_json", is_flag=True, help="Print the node's state as one JSON object on stdout.")
def status(root, as_json) -> None:
    """The node's driver state: what is installed and where it came from (a fallback is named),
    the running and next kernels, the node's configuration, and what is staged.

    \b
    Examples:
      cudabuild status
      cudabuild status --root /host --json
    """
    from cudabuild.deliver import node

    settings = _settings()
    answer = node.status(_host(root), settings.host_release)
    if as_json:
        click.echo(json.dumps(answer, indent=2))
        return

    driver = answer["driver"]
    click.echo(f"kernel:   {answer['running_kernel']} (next: {printable(answer['next_kernel'] or 'the same')})")
    if driver is None:
        click.echo("driver:   not ready (no ready file)")
    else:
        fell = f", FALLBACK from {printable(driver.get('fallback_from'))}" if driver.get("fallback_from") else ""
        click.echo(printable(f"driver:   NVIDIA {driver.get('driver')} for {driver.get('kernel')} (from "
                             f"{driver.get('source')}{fell}); boot test: {driver.get('boot_test') or 'not run'}"))
        click.echo(f"CDI spec: {printable(driver.get('cdi_spec'))}")
    config = answer["config"]
    if config:
        click.echo(f"config:   driver {config['driver'] or 'any'}" + (f" ({config['flavor']})" if config['flavor'] else "")
                   + f", registry {config['registry'] or 'none'}, fallback {'on' if config['fallback'] else 'off'}")
    for release, builds in answer["staged"].items():
        click.echo(f"staged:   {release}: " + (", ".join(f"{b['driver']} {b['flavor']}" for b in builds) or "nothing whole"))
    for problem in answer["problems"]:
        click.echo(f"problem:  {printable(problem)}")


@cli.command(epilog=EXIT_CODE_HELP)
@click.option("--root", default="/", show_default=True, metavar="DIR",
              help="The host's file system as this process sees it (/host in a container, with the host's /proc).")
@click.option("--json", "as_json", is_flag=True, help="Print the holders as one JSON list on stdout.")
def holders(root, as_json) -> None:
    """Every process that holds the GPU: a /dev/nvidia* node open or mapped, or a library of the
    driver mapped (ROOT/proc/*/fd and ROOT/proc/*/maps), whatever started it, with the container
    it runs in (the id from ROOT/proc/PID/cgroup; its name, and a Kubernetes pod's name and
    namespace, from the engine when one answers). These are what keep a driver from being
    unloaded; `install --drain` stops the containers among them.

    \b
    Examples:
      sudo cudabuild holders
      cudabuild holders --root /host --json
    """
    from pathlib import Path

    from cudabuild.deliver import upgrade

    settings = _settings()
    _host(root)
    found = upgrade.who_holds(Path(root), functools.cache(settings.engine), settings.reporter())
    if as_json:
        click.echo(json.dumps([h.to_json() for h in found], indent=2))
        return
    if not found:
        click.echo("nothing holds the GPU")
        return
    click.echo(f"{'PID':>8}  {'COMMAND':<16} {'CONTAINER':<28} HOLDS")
    for h in found:
        where = (h.container or h.container_id[:12]) if h.in_container else "-"
        if h.pod:
            where += f" ({h.namespace}/{h.pod})"
        click.echo(printable(f"{h.pid:>8}  {h.command:<16} {where:<28} {', '.join(h.holds)}"))


@cli.command(epilog=EXIT_CODE_HELP)
@click.option("--root", default="/", show_default=True, metavar="DIR",
              help="The host's file system as this process sees it (/host in the driver container).")
@click.option("--cdi-host-root", default="/", show_default=True, metavar="DIR",
              help="The prefix of the paths the CDI spec names, as the host sees them.")
@click.option("--json", "as_json", is_flag=True, help="Print what was done as one JSON object on stdout.")
def uninstall(root, cdi_host_root, as_json) -> None:
    """Remove what `cudabuild install` put on the host, in the safe order: refused (exit 24,
    naming them) while anything holds the GPU; the CDI spec first, so that no new container gets
    the GPU; then the modules unloaded (the last loaded first; a driver cudabuild did not install
    stays loaded); the device nodes; ROOT/run/cudabuild/driver/VERSION; the ready file last.
    Staged builds and the node's configuration (ROOT/var/lib/cudabuild) are kept.

    \b
    Examples:
      sudo cudabuild uninstall
      cudabuild uninstall --root /host --json
    """
    from pathlib import Path

    from cudabuild.deliver import upgrade

    settings = _settings()
    _host(root)
    done = upgrade.uninstall(Path(root), host_root=cdi_host_root, env=settings.environ,
                             engine=functools.cache(settings.engine), reporter=settings.reporter())
    if as_json:
        click.echo(json.dumps(done.to_json(), indent=2))
        return
    if done.driver_version and done.unloaded:
        click.echo(f"NVIDIA {done.driver_version} uninstalled: unloaded {', '.join(done.unloaded)}")
    elif done.left_loaded:
        click.echo(f"NVIDIA {done.driver_version} stays loaded (cudabuild did not install it)")
    else:
        click.echo("no NVIDIA driver was loaded")
    for path in done.removed:
        click.echo(f"  removed: {path}")


@cli.group()
def cdi() -> None:
    """CDI specs: write one for a host whose driver came another way, list what engines see."""


@cdi.command("generate", epilog=EXIT_CODE_HELP)
@click.option("--root", default="/", show_default=True, metavar="DIR", help="The host's file system.")
@click.option("--cdi-host-root", default="/", show_default=True, metavar="DIR",
              help="The prefix of the paths the spec names, as the host sees them.")
@click.option("--output", metavar="FILE|-", help="Where to write the spec: a file, or - for stdout. Default: "
                                                 "ROOT/var/run/cdi/cudabuild-nvidia.json.")
@click.option("--check", is_flag=True,
              help="Write nothing: exit 26 when the spec on disk (--output FILE, or the default) does not match the "
                   "loaded driver and GPUs (another version, a GPU gone or new, a library path that no longer "
                   "exists), naming each difference; 0 when it matches.")
@click.option("--if-loaded", is_flag=True,
              help="When no NVIDIA driver is loaded, do nothing and exit 0 (a boot-time unit: the driver may load "
                   "later, and its udev event runs this again).")
@click.option("--json", "as_json", is_flag=True, help="With --check: print {stale, differences, spec} as JSON.")
def cdi_generate(root, cdi_host_root, output, check, if_loaded, as_json) -> None:
    """Write the CDI spec of the driver loaded on a host and its GPUs: whatever installed it
    (cudabuild install, distribution packages, NVIDIA's installer). The loaded driver's version
    (/proc/driver/nvidia/version or /sys/module/nvidia/version), its GPUs, and the userspace
    libraries of exactly that version (cudabuild's copy first, then the host's library
    directories); refused, naming what is missing, when they are not there. The file is written
    whole or not at all (a temporary file, then a rename): an engine never reads half a spec.

    \b
    Examples:
      sudo cudabuild cdi generate
      cudabuild cdi generate --root /host --output -
      cudabuild cdi generate --check || sudo cudabuild cdi generate
      cudabuild cdi generate --if-loaded          (cudabuild-cdi-refresh.service: cudabuild deploy systemd)
    """
    from pathlib import Path

    from cudabuild.deliver import cdi as specs
    from cudabuild.errors import StaleSpecError
    from cudabuild.hostfs import HostRoot

    base = Path(root)
    if not base.is_dir():
        raise InputError(f"--root {root} is not a directory", hint="pass the host's file system, e.g. --root /host")
    if output == "-" and check:
        raise InputError("--check compares a file on disk with the loaded driver", hint="leave out --output -")
    spec = specs.for_loaded(base, host_root=cdi_host_root)
    if spec is None and not check:  # --check: no driver and a spec on disk is a stale spec
        if not if_loaded:
            raise InputError(f"no NVIDIA driver is loaded under {root} (no proc/driver/nvidia/version, no "
                             "sys/module/nvidia/version)", hint="load the driver first (cudabuild install does)")
        click.echo(f"no NVIDIA driver is loaded under {root}: nothing to do", err=True)
        return
    target = Path(output).absolute() if output and output != "-" else HostRoot(base).resolve(specs.SPEC)
    if target.is_dir():
        raise InputError(f"--output {output} is a directory; it takes the spec's file name",
                         hint=f"pass a file, e.g. --output {target / specs.SPEC_FILE}")
    if check:
        current = specs.read_spec(target) if target.exists() else None
        said = specs.differences(current, spec, root=base, host_root=cdi_host_root)
        if as_json:
            click.echo(json.dumps({"stale": bool(said), "differences": said, "spec": str(target)}, indent=2))
        if said:
            raise StaleSpecError(printable(f"the CDI spec {target} is stale: {'; '.join(said)}"),
                                 hint="rewrite it: cudabuild cdi generate" + (f" --root {root}" if root != "/" else "")
                                 + (f" --cdi-host-root {cdi_host_root}" if cdi_host_root != "/" else ""))
        if not as_json:
            click.echo(f"{target} matches the loaded driver and GPUs")
        return
    if output == "-":
        click.echo(json.dumps(spec, indent=2))
        return
    if output:
        HostRoot("/").write_atomic(str(target), specs.encode(spec))
    else:
        target, _ = specs.write(spec, base)  # resolved inside the root
    click.echo(f"wrote {output or target}: {len(spec['devices'])} devices, driver {specs.driver_version_of(spec)}",
               err=True)


@cdi.command("list", epilog=EXIT_CODE_HELP)
@click.option("--root", default="/", show_default=True, metavar="DIR", help="The host's file system.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object on stdout.")
def cdi_list(root, as_json) -> None:
    """Show the CDI specs and devices the engines will see (/etc/cdi, then /var/run/cdi, which wins
    a name clash)."""

    from cudabuild.deliver import cdi as specs
    from cudabuild.hostfs import HostRoot

    dirs = [HostRoot(root).resolve(d) for d in specs.SPEC_DIRS]
    found = specs.specs(dirs)
    winners = {}
    for path, spec in found:
        for device in spec.get("devices", []):
            winners[f"{spec['kind']}={device.get('name')}"] = str(path)
    if as_json:
        click.echo(json.dumps({"specs": [str(p) for p, _ in found], "devices": winners}, indent=2))
        return
    if not found:
        click.echo(f"no CDI specs in {', '.join(str(d) for d in dirs)}")
    for name, path in winners.items():
        click.echo(f"{name:<60} {path}")


@cli.group()
def deploy() -> None:
    """What operators apply for Swarm, ECS and Kubernetes, from the driver images built before.

    \b
    Examples:
      cudabuild deploy swarm --output ./swarm          # on a node after cudabuild install
      cudabuild deploy ecs --registry registry.example:5000/cudabuild --json
      cudabuild deploy kubernetes --image cudabuild/driver:535.309.01-6.1.0-56-amd64 --output ./k8s
      cudabuild deploy kubernetes --kmm --registry registry.example:5000/cudabuild
      cudabuild deploy kubernetes --prebuild --registry registry.example:5000/cudabuild --drivers 535
      cudabuild deploy systemd --registry registry.example:5000/cudabuild --driver 535 --output /etc/systemd/system
    """


def _node_driver_image(chosen, registry_repo: str, driver: str | None, tag, dry_run, as_json, *, push: bool) -> None:
    """`cudabuild image driver --registry R [--driver D]` without --modules or --kernel: the
    kernel-agnostic driver container, pushed to R/driver:TAG."""
    from cudabuild.deliver import image as images
    from cudabuild.deliver.staging import NodeConfig

    settings = _settings()
    registry = settings.registry(registry_repo)
    config = NodeConfig(driver=driver, registry=registry.repo)
    if dry_run:
        click.echo(images.render_runtime(chosen, {"registry": registry.repo, "command": images.node_command(config)}),
                   nl=False)
        return
    reporter = settings.reporter()
    engine = settings.engine()
    report = images.build_node_driver_image(profile=chosen, registry=registry.repo, driver=config.driver,
                                            engine=engine, cache=settings.cache(), tag=tag, reporter=reporter)
    report["registry_ref"] = registry.ref(report["image"]) if push else None
    if push:
        with reporter.step(f"push {report['registry_ref']}"):
            engine.push(report["image"], report["registry_ref"])
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"{report['image']}: the driver container for every kernel (driver {config.shown_driver}, builds "
               f"from {registry.repo})" + (f", pushed as {report['registry_ref']}" if push else ""))
    click.echo(f"  run it once per host: docker run --rm --privileged --pid host --network host -v /:/host "
               f"{report['registry_ref'] or report['image']}")
    click.echo(f"  one DaemonSet for a fleet of mixed kernels: cudabuild deploy kubernetes --registry {registry.repo}")


def _tool_image(base, modules_ref, tag, dry_run, as_json, flags) -> None:
    """`cudabuild image tool`: cudabuild's own image, from the installed cudabuild."""
    from cudabuild.deliver.toolimage import make_tool_image

    given = [name for name, value in (("--base", base), ("--modules", modules_ref), ("--tag", tag),
                                      ("--dry-run", dry_run or None)) if value is not None]
    given += [f"--{k.replace('_', '-')}" for k, v in flags.items()
              if v not in (None, False, ()) and k not in ("registry", "no_cache")]
    if given:
        raise click.UsageError(f"the tool image takes --registry, --no-cache and --json only, not {', '.join(given)}")
    settings = _settings()
    report = make_tool_image(settings.engine(), registry=_registry(flags.get("registry")), reporter=settings.reporter(),
                             rebuild=bool(flags.get("no_cache")))
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(report["image"] + (" (made earlier from the same wheel)" if report["reused"] else "")
               + (f" (pushed as {report['registry_ref']})" if report["registry_ref"] else ""))


def _registry(flag: str | None):
    """The Registry of --registry, or of CUDABUILD_REGISTRY (None: neither)."""
    settings = _settings()
    return settings.registry(flag or settings.option_values.get("registry"))


def _importer(cache, engine, reporter):
    """Reads a modules image that is not in the cache (docker pull'ed, or made elsewhere) into it,
    checked as a registry pull is."""
    def import_image(reference, labels):
        from cudabuild.compile.steps import import_image as read_image

        return read_image(reference, labels, cache=cache, engine=engine(), settings=_settings(), reporter=reporter)

    return import_image


def _deploy_flags(command):
    for option in reversed([
        click.option("--image", "images", multiple=True, metavar="IMAGE",
                     help="A driver image (cudabuild image driver; with --kmm: cudabuild image kmm), one per kernel; "
                          "repeatable. Default: every such image in the engine."),
        click.option("--registry", metavar="REPO",
                     help="Where nodes pull the images from (e.g. registry.example:5000/cudabuild): the manifests "
                          "name REPO/NAME:TAG."),
        click.option("--output", metavar="DIR", help="Write one file per object into DIR instead of stdout."),
        click.option("--json", "as_json", is_flag=True, help="Print {file name: content} as one JSON object."),
    ]):
        command = option(command)
    return command


def _host_flags(command):
    for option in reversed([
        click.option("--root", default="/", show_default=True, metavar="DIR",
                     help="The node whose GPUs the configuration names (its driver loaded: cudabuild install)."),
        click.option("--runtime-path", default="/usr/local/bin/cudabuild-runtime", show_default=True, metavar="PATH",
                     help="Where cudabuild-runtime is on the nodes."),
    ]):
        command = option(command)
    return command


def _emit(files, output, as_json) -> None:
    from pathlib import Path

    from cudabuild.deploy import write

    if as_json and output:
        raise InputError("--json prints the manifests on stdout and --output writes them to files: choose one",
                         hint="drop --json to write files, or --output to print JSON")
    if as_json:
        click.echo(json.dumps({f.name: f.content for f in files}, indent=2))
        return
    text = write(files, Path(output) if output else None)
    click.echo(text, nl=False, err=bool(output))


def _deploy_images(images, registry, kind):
    from cudabuild.deploy import driver_images

    return driver_images(_settings().engine(), list(images), kind=kind, registry=registry)


@deploy.command("swarm", epilog=EXIT_CODE_HELP)
@_deploy_flags
@_host_flags
def deploy_swarm(images, registry, output, as_json, root, runtime_path) -> None:
    """Swarm: the node's daemon.json (one generic resource gpu=UUID per GPU, cudabuild-runtime as
    the default runtime: services cannot be privileged or take --device), the driver's one-shot
    install per node, a service example and a stack file."""
    from pathlib import Path

    from cudabuild.deploy import host_facts, require_gpus, swarm

    host = host_facts(Path(root))
    require_gpus(host, Path(root))
    _emit(swarm.files(_deploy_images(images, registry, "driver"), host, runtime_path=runtime_path), output, as_json)


@deploy.command("ecs", epilog=EXIT_CODE_HELP)
@_deploy_flags
@_host_flags
def deploy_ecs(images, registry, output, as_json, root, runtime_path) -> None:
    """ECS: the driver as a daemon service (privileged, the host's root), the node's configuration
    (the runtime registered as nvidia, ECS_ENABLE_GPU_SUPPORT, nvidia-gpu-info.json) and a workload
    task definition in two shapes: GPUs by resourceRequirements, and the seed's volumes and devices."""
    from pathlib import Path

    from cudabuild.deploy import ecs, host_facts, require_gpus

    host = host_facts(Path(root))
    require_gpus(host, Path(root))
    _emit(ecs.files(_deploy_images(images, registry, "driver"), host, runtime_path=runtime_path), output, as_json)


@deploy.command("kubernetes", epilog=EXIT_CODE_HELP)
@_deploy_flags
@click.option("--kmm", is_flag=True, help="A Kernel Module Management Module (cudabuild image kmm images) instead of "
                                          "driver DaemonSets.")
@click.option("--prebuild", is_flag=True,
              help="Also a CronJob that builds, boot-tests and pushes the fleet's kernels ahead of need (cudabuild "
                   "matrix --kernels-from the ConfigMap cudabuild-fleet-kernels) on a node labelled "
                   "cudabuild.io/builder=true. Needs --registry and --drivers.")
@click.option("--drivers", metavar="LIST", help="With --prebuild: the drivers to build (e.g. 535).")
@click.option("--schedule", default="0 3 * * *", show_default=True, metavar="CRON",
              help="With --prebuild: when the CronJob runs.")
def deploy_kubernetes(images, registry, output, as_json, kmm, prebuild, drivers, schedule) -> None:
    """Kubernetes: a namespace and one driver DaemonSet for every kernel (the kernel-agnostic
    driver image, on every node with an NVIDIA device), or one per kernel (nodeSelector on Node
    Feature Discovery's kernel-version.full); privileged with hostPID and the host's root, ready
    when the ready file is there, system-node-critical, OnDelete, tolerating GPU taints. With
    --kmm, a KMM Module with a kernelMapping per kernel. With --prebuild, also the CronJob that
    builds the fleet's kernels ahead of need."""
    from cudabuild.deploy import kubernetes

    if prebuild:
        kubernetes.cron_schedule(schedule)  # before anything else is looked at
    files = kubernetes.files(_deploy_images(images, registry, "kmm" if kmm else "driver"), kmm=kmm)
    if prebuild:
        files.append(kubernetes.prebuild_file(registry=_prebuild_registry(registry), drivers=_prebuild_drivers(drivers),
                                              schedule=schedule))
    _emit(files, output, as_json)


def _prebuild_registry(registry: str | None) -> str:
    if not registry:
        raise InputError("--prebuild pushes what it builds to a registry, and the nodes take it from there",
                         hint="pass --registry HOST[:PORT]/PATH")
    return _settings().registry(registry).repo


def _prebuild_drivers(drivers: str | None) -> str:
    from cudabuild.fleet.matrix import driver_cell, split_list

    if not drivers:
        raise InputError("--prebuild builds the drivers you name", hint="pass --drivers LIST, e.g. --drivers 535 "
                         "or --drivers 550,run:580.142")
    items = split_list(drivers, "--drivers")
    for item in items:
        driver_cell(item)  # checked as the matrix the job runs checks it
    return ",".join(items)


@deploy.command("systemd", epilog=EXIT_CODE_HELP)
@click.option("--registry", metavar="REPO", help="The registry the builds come from (and --prebuild pushes to). "
                                                 + _env_help("registry"))
@click.option("--driver", "driver", metavar="VERSION|BRANCH", help="The node's driver (e.g. 535).")
@click.option("--prebuild", is_flag=True,
              help="A build host's units instead: cudabuild-prebuild.service and .timer, which build, boot-test and "
                   "push the kernels listed in /etc/cudabuild/kernels (cudabuild matrix --kernels-from).")
@click.option("--cdi-refresh", is_flag=True,
              help="Only the units that keep the CDI spec current, for a host whose driver came another way "
                   "(distribution packages, NVIDIA's installer): cudabuild-cdi-refresh.service and its udev rule.")
@click.option("--drivers", metavar="LIST", help="With --prebuild: the drivers to build (e.g. 535).")
@click.option("--schedule", default="daily", show_default=True, metavar="CALENDAR",
              help="With --prebuild: the timer's OnCalendar.")
@click.option("--cudabuild-path", default="/usr/local/bin/cudabuild", show_default=True, metavar="PATH",
              help="Where cudabuild is on the host.")
@click.option("--output", metavar="DIR", help="Write one file per unit into DIR (e.g. /etc/systemd/system) instead "
                                              "of stdout.")
@click.option("--json", "as_json", is_flag=True, help="Print {file name: content} as one JSON object.")
def deploy_systemd(registry, driver, prebuild, cdi_refresh, drivers, schedule, cudabuild_path, output,
                   as_json) -> None:
    """systemd units for a host. By default the node's: cudabuild-driver.service installs the
    driver for whatever kernel runs (staged build, else the registry; cudabuild install
    --registry) before the container engines start; cudabuild-stage.service and .timer stage the
    next kernel's build hourly; cudabuild-cdi-refresh.service rewrites the CDI spec at boot and,
    through 60-cudabuild-cdi-refresh.rules (for /etc/udev/rules.d), whenever the driver's modules
    load, doing nothing while none is loaded. With --prebuild, a build host's: a service and a
    timer that build the fleet's kernels ahead of need.

    \b
    Examples:
      cudabuild deploy systemd --registry registry.example:5000/gpu --driver 535 --output /etc/systemd/system
      cudabuild deploy systemd --cdi-refresh --output /tmp/units
      cudabuild deploy systemd --prebuild --registry registry.example:5000/gpu --drivers 535,550
    """
    from cudabuild.deploy import systemd

    registry = registry or _settings().option_values.get("registry")
    if cdi_refresh and prebuild:
        raise InputError("--cdi-refresh and --prebuild are units for different hosts", hint="pass one of them")
    if cdi_refresh:
        files = systemd.cdi_refresh_files(cudabuild=cudabuild_path)
    elif prebuild:
        files = systemd.prebuild_files(cudabuild=cudabuild_path, registry=_prebuild_registry(registry),
                                       drivers=_prebuild_drivers(drivers), schedule=schedule)
    else:
        from cudabuild.deliver.staging import NodeConfig

        if not registry:
            raise InputError("the node's driver comes from a registry", hint="pass --registry HOST[:PORT]/PATH")
        files = systemd.node_files(cudabuild=cudabuild_path,
                                   config=NodeConfig(driver=driver, registry=_settings().registry(registry).repo))
    _emit(files, output, as_json)


@cli.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
             epilog=EXIT_CODE_HELP)
@click.option("--gpus", metavar="all|0,1|GPU-UUID|none",
              help="The GPUs the container gets. Default: NV_GPU, then NVIDIA_VISIBLE_DEVICES, then all.")
@click.option("--cdi-dir", "cdi_dirs", multiple=True, metavar="DIR",
              help="Where the CDI specs are (repeatable). Default: /etc/cdi and /var/run/cdi.")
@click.option("--dry-run", is_flag=True, help="Print the docker run command instead of running it.")
@click.argument("docker_args", nargs=-1, type=click.UNPROCESSED, required=True)
def run(gpus, cdi_dirs, dry_run, docker_args) -> None:
    """`docker run` with the GPUs, for Docker engines without CDI (nvidia-docker 1.0's way).

    Reads the CDI spec `cudabuild install` wrote and starts `docker run` with exactly its device
    nodes for the chosen GPUs, its read-only mounts of the userspace driver and its environment.
    Its own options come first; every other argument goes to `docker run` unchanged. The
    container needs no --privileged and no change to its image.

    \b
    Examples:
      cudabuild run --gpus 0 --rm python:3.11-slim-bookworm python3 -c 'import ctypes; ctypes.CDLL("libcuda.so.1")'
      NV_GPU=0,1 cudabuild run --rm -it my/cuda-app
      cudabuild run --gpus GPU-5a1c... --dry-run --rm debian:bookworm ls /dev
    """
    import shutil
    from pathlib import Path

    from cudabuild.deliver.run import DEFAULT_DIRS, command

    line = command(list(docker_args), gpus=gpus, cdi_dirs=[Path(d) for d in cdi_dirs] or list(DEFAULT_DIRS),
                   env=_settings().environ)
    if dry_run:
        click.echo(shlex.join(line))
        return
    docker = shutil.which("docker")
    if docker is None:
        raise InputError("the docker command is not installed", hint="install the docker CLI, or use --dry-run")
    sys.stdout.flush()
    os.execv(docker, line)


@cli.command(epilog=EXIT_CODE_HELP)
@click.argument("target")
@click.option("--verify", is_flag=True, help="For an image: check its artifact in the cache as a directory is "
                                             "checked (every digest, vermagic, version and signature).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def inspect(target: str, verify: bool, as_json: bool) -> None:
    """Show the driver, kernel and modules of a runtime image, a modules image, a directory or a .ko,
    and whether they match this host's kernel. A directory is checked like every artifact cudabuild
    reads (every file's digest, every module's vermagic and version).

    \b
    Examples:
      cudabuild inspect cudabuild/device-query:535.309.01-6.1.0-56-amd64
      cudabuild inspect ./nvidia --json
      cudabuild inspect ./nvidia/modules/nvidia.ko
      cudabuild inspect cudabuild/modules:535.309.01-6.1.0-56-amd64 --verify
    """
    from cudabuild.inspection import inspect as inspect_target

    settings = _settings()
    report = inspect_target(target, settings.engine, verify=verify, cache=settings.cache() if verify else None)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"{target} ({report['kind']})")
    click.echo(f"  driver:  {report['driver_version']}")
    click.echo(f"  kernel:  {report['kernel_release']} (vermagic {report['vermagic'].strip()})")
    match = "yes" if report["matches_host"] else f"no, this host runs {report['host_kernel_release']}"
    click.echo(f"  matches this host's kernel: {match}")
    click.echo(f"  boot test: {report.get('boot_test') or 'not run (cudabuild boot-test)'}")
    signed = report.get("signed")
    if signed is None:
        click.echo("  signed:  no (a kernel that enforces signatures refuses these modules)")
    else:
        click.echo(f"  signed:  by {signed.get('signer') or 'a key (its signer is not recorded here)'}"
                   + (f", certificate sha256 {signed['cert_sha256']}" if signed.get("cert_sha256") else ""))
    if report.get("verified"):
        where = "" if report["kind"] == "directory" else " (its artifact in the cache)"
        click.echo(f"  verified: every file's digest{', every signature' if signed else ''}{where}")
    if report.get("modules_left_out"):
        click.echo(f"  modules: {', '.join(m['name'] for m in report['modules'])} (built with --only-modules; "
                   f"not {', '.join(report['modules_left_out'])})")
    for m in report["modules"]:
        size = f"{m['size'] / 1024**2:7.1f} MiB  " if "size" in m else ""
        click.echo(f"  {m['file']:<20} {size}sha256:{m['sha256']}")


def invoke(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """The command line, in this process, with the settings read once from `env` (default: this
    process's environment): every error printed as the README says and mapped to its exit code,
    which is returned (tests call this; `main` exits with it)."""
    try:
        settings = Settings.from_env(os.environ if env is None else env)
        code = cli.main(args=argv, prog_name="cudabuild", standalone_mode=False, obj=settings)
    except click.exceptions.Abort:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except CudabuildError as exc:
        print(exc.render(), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted: the builder container was removed; nothing was published", file=sys.stderr)
        return EXIT_INTERRUPTED
    return code if isinstance(code, int) else 0


def main(argv: list[str] | None = None) -> None:
    sys.exit(invoke(argv))
