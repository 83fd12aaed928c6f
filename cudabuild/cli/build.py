"""The commands that build and read builds: modules, image, matrix, boot-test, inspect."""

from __future__ import annotations

import click

from cudabuild.cli.common import EXIT_CODE_HELP, emit, services, settings
from cudabuild.cli.flags import JSON, MODULES, APT_MIRROR, APT_SECURITY_MIRROR, DISTRIBUTION, build_flag_values, build_flags


@click.command(epilog=EXIT_CODE_HELP)
@build_flags
@click.option("--output", metavar="DIR",
              help="Also copy modules/, userspace/ and manifest.json into DIR (e.g. --output ./nvidia): a new or "
                   "empty directory, or an earlier output. Checked before the build.")
@click.option("--force", is_flag=True, default=None,
              help="With --output: add the result to a directory that holds other files (nothing there is "
                   "replaced that cudabuild did not write).")
@JSON
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
    from cudabuild.options import options_from_json

    if options_json is not None:  # a matrix cell: its options resolved by the matrix, as data
        given = [f"--{k.replace('_', '-')}" for k, v in flags.items() if v is not None]
        if given:
            raise click.UsageError(f"--options-json carries every build option; do not also pass {', '.join(given)}")
        options = options_from_json(options_json)
    else:
        options = settings().build_options(build_flag_values(flags))
    emit(build_modules(options, services()), as_json)


@click.command(epilog=EXIT_CODE_HELP)
@click.argument("profile", required=False)
@click.option("--base", metavar="IMAGE", help="Any base image instead of a profile's (e.g. --base debian:bookworm).")
@MODULES
@click.option("--tag", metavar="TAG", help="Tag of the image (default cudabuild/PROFILE:DRIVER-RELEASE).")
@click.option("--dry-run", is_flag=True, help="Print the Dockerfile and exit; needs no engine.")
@click.option("--no-push", is_flag=True, help="Keep the image here: do not push it to --registry (a kernel-agnostic "
                                              "driver image still takes its builds from there).")
@click.option("--list", "list_profiles", is_flag=True, help="List the profiles and exit.")
@JSON
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
      cudabuild image device-query --modules registry.example/gpu/modules:TAG --verify-key image.pub
    """
    from cudabuild.bake.bake import BakeRequest, bake, list_profiles as profiles

    if list_profiles:
        emit(profiles(), as_json)
        return
    if profile is None and base is None:
        raise click.UsageError("name a PROFILE (cuda, tensorflow, torch, device-query) or pass --base IMAGE")
    if profile == "tool":
        given = [name for name, value in (("--base", base), ("--modules", modules_ref), ("--tag", tag),
                                          ("--dry-run", dry_run or None)) if value is not None]
        given += [f"--{k.replace('_', '-')}" for k, v in flags.items()
                  if v not in (None, False, ()) and k not in ("registry", "no_cache")]
        if given:
            raise click.UsageError(f"the tool image takes --registry, --no-cache and --json only, not {', '.join(given)}")
    building = profile != "tool" and (flags.get("kernel") is not None or flags.get("driver") is not None)
    if building and modules_ref is not None:
        raise click.UsageError("pass either --modules or --kernel/--driver, not both")
    options = settings().build_options(build_flag_values(flags))
    request = BakeRequest(profile=profile, base=base, modules_ref=modules_ref, tag=tag, dry_run=dry_run,
                          push=not no_push, registry=flags.get("registry"), driver=flags.get("driver"),
                          build=options if building else None, rebuild=bool(flags.get("no_cache")),
                          sign_image=options.sign_image, verify_key=options.verify_key)
    emit(bake(request, services()), as_json)


@click.command(epilog=EXIT_CODE_HELP)
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
@JSON
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
    from cudabuild.fleet.matrix import kernels_from, parse_request, run_matrix

    for name in ("kernel", "driver"):
        if flags.get(name) is not None:
            raise click.UsageError(f"matrix takes --{name}s LIST, not --{name}")
    if (kernels is None) == (kernels_file is None):
        raise click.UsageError("pass the kernels as --kernels LIST or --kernels-from FILE (one of them)")
    if kernels_file is not None:
        kernels = kernels_from(kernels_file.read(), kernels_file.name)
    options = settings().build_options(build_flag_values(flags))
    request = parse_request(kernels=kernels, drivers=drivers, flavors=flavors, flavor=options.flavor,
                            backend=backend, parallel=parallel, image=image, node_cache=node_cache,
                            node_socket=node_socket, timeout=cell_timeout)
    emit(run_matrix(request, options, services()), as_json)


for _param in matrix.params:  # a matrix names its kernels and drivers as lists
    if _param.name in ("kernel", "driver"):
        _param.hidden = True


@click.command("boot-test", epilog=EXIT_CODE_HELP)
@MODULES
@click.option("--kernel-image", metavar="FILE",
              help="The kernel to boot: a vmlinuz or a Debian linux-image .deb. Default: the Debian release's own "
                   "linux-image package (downloaded, cached by content).")
@click.option("--append", metavar="ARGS", help="Kernel parameters (e.g. --append module.sig_enforce=1).")
@click.option("--timeout", type=float, metavar="SECONDS", help="Kill the guest after this long (default 300).")
@DISTRIBUTION
@APT_MIRROR
@APT_SECURITY_MIRROR
@JSON
def boot_test(modules_ref, kernel_image, append, timeout, as_json, distribution, apt_mirror,
              apt_security_mirror) -> None:
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
    from cudabuild.compile.modules import boot_test_command

    emit(boot_test_command(modules_ref, kernel_image=kernel_image, append=append, timeout=timeout,
                           distribution=distribution, apt_mirror=apt_mirror, apt_security_mirror=apt_security_mirror,
                           services=services()), as_json)


@click.command(epilog=EXIT_CODE_HELP)
@click.argument("target")
@click.option("--verify", is_flag=True, help="For an image: check its artifact in the cache as a directory is "
                                             "checked (every digest, vermagic, version and signature).")
@JSON
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
    from cudabuild.inspection import inspected

    emit(inspected(target, services(), verify=verify), as_json)


COMMANDS = [modules, image, matrix, boot_test, inspect]
