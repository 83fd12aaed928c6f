"""Every flag that more than one command takes, declared once: the host's root, --json, the
registry, the driver, the modules, the node's kernel and flavour, and the build options that every
command that builds shares. A command names the groups it takes."""

from __future__ import annotations

from pathlib import Path

import click

from cudabuild.errors import InputError
from cudabuild.host.root import HostRoot
from cudabuild.nvidia import FLAVORS
from cudabuild.options import CHECKOUTS, DRIVER_SOURCES, ENVIRONMENT, KERNEL_SOURCES, default_of


def _env_help(name: str) -> str:
    default = default_of(name)
    parts = [f"Default: {default}." if default not in (None, False, "") else ""]
    if name in ENVIRONMENT:
        parts.append(f"Env: {ENVIRONMENT[name]}.")
    return " ".join(p for p in parts if p)


class _HostRootType(click.ParamType):
    """--root DIR as the one HostRoot value the command passes down; refused when not a directory."""

    name = "DIR"

    def convert(self, value, param, ctx):
        if isinstance(value, HostRoot):
            return value
        if not Path(value).is_dir():
            raise InputError(f"--root {value} is not a directory", hint="pass the host's file system, e.g. --root /host")
        return HostRoot(value)


def _group(*options):
    def apply(command):
        for option in reversed(options):
            command = option(command)
        return command
    return apply


ROOT = click.option("--root", "host", default="/", show_default=True, metavar="DIR", type=_HostRootType(),
                    help="The host's file system as this process sees it (/host in a container, with the host's "
                         "/proc).")
CDI_HOST_ROOT = click.option("--cdi-host-root", default="/", show_default=True, metavar="DIR",
                             help="The prefix of the paths the CDI spec names, as the host sees them.")
JSON = click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object on stdout.")
REGISTRY = click.option("--registry", metavar="HOST[:PORT]/PATH",
                        help="An OCI registry as the fleet's shared cache (e.g. 127.0.0.1:5055/cudabuild): a build "
                             "found there with the same key is pulled and verified here instead of compiled, a result "
                             "is pushed there as PATH/modules:TAG, and nodes take their builds from it. A bundle "
                             "(`cudabuild bundle`) is read as oci:DIR. "
                             + _env_help("registry"))
VERIFY_KEY = click.option("--verify-key", metavar="PUB",
                          help="Take an image from the registry only when it is signed by this PEM public key (as "
                               "`cosign sign` or `--sign-image` signs) and its signed provenance names the build its "
                               "labels say; refused before anything is unpacked (exit 27). On a node, remembered as "
                               "its policy. Env: CUDABUILD_VERIFY_KEY.")
DRIVER = click.option("--driver", "driver", metavar="VERSION|BRANCH",
                      help="The NVIDIA driver: a version (535.309.01) or a branch (535: its newest release). "
                           "Default: for a build, the newest driver known to support the kernel; on a node, the "
                           "node's (remembered from its first install).")
MODULES = click.option("--modules", "modules_ref", metavar="IMAGE|DIR",
                       help="The modules: a cudabuild/modules:... image or an --output directory. Default: the most "
                            "recent build in the cache.")
FLAVOR = click.option("--flavor", type=click.Choice(FLAVORS), default=None,
                      help="Proprietary modules, or the open modules (Turing and newer GPUs; e.g. --flavor open). "
                           "Default: for a build, the driver's own, open from 560 on (580, 595), proprietary before "
                           "(535, 550), and from 590 on there are only the open modules; on a node, the node's "
                           "(recorded at its first install; a build of the other flavour never counts).")
NODE_KERNEL = click.option("--kernel", "kernel", metavar="RELEASE|next",
                           help="The kernel: a release, or `next` (the kernel the boot loader boots next: its default "
                                "entry where known, else the newest installed kernel of the running one's flavour; "
                                "exit 23 when it cannot be told). Default: the running kernel.")
DISTRIBUTION = click.option("--distribution", help="Debian release whose packages to use (e.g. trixie). Default: the "
                            "kernel release's own (6.12.117+deb13-amd64: trixie; 6.1.0-57-amd64: bookworm), else this "
                            "Debian host's (/etc/os-release), else bookworm. " + _env_help("distribution"))
APT_MIRROR = click.option("--apt-mirror", metavar="URL", help="Debian mirror. " + _env_help("apt_mirror"))
APT_SECURITY_MIRROR = click.option("--apt-security-mirror", metavar="URL",
                                   help="Debian security mirror. " + _env_help("apt_security_mirror"))
OUTPUT_DIR = click.option("--output", metavar="DIR", help="Write one file per object into DIR instead of stdout.")

node_flags = _group(FLAVOR, ROOT, NODE_KERNEL)


# Every option that decides or steers a build, shared by each command that builds (modules, image).
# Values are None unless given: defaults and environment are applied by Settings.build_options.
BUILD_FLAGS = [
    click.option("--kernel", metavar="RELEASE",
                 help="The target kernel's `uname -r` (e.g. 6.1.0-56-amd64), or `latest` for the newest the "
                      "kernel source has. Default: this host's release."),
    DRIVER,
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
    FLAVOR,
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
    DISTRIBUTION,
    click.option("--backports", is_flag=True, default=None,
                 help="Take Debian's driver packages from the distribution's backports too, where newer (Debian's "
                      "fixes for newer kernels land there first; e.g. trixie-backports' nvidia-open-kernel-source)."),
    APT_MIRROR,
    APT_SECURITY_MIRROR,
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
    REGISTRY,
    click.option("--sign-key", metavar="FILE",
                 help="Sign every module with this PEM private key (Secure Boot), by the kernel's own sign-file "
                      "in a container that alone sees the key; encrypted keys take KBUILD_SIGN_PIN. With "
                      "--sign-cert. Env: CUDABUILD_SIGN_KEY."),
    click.option("--sign-cert", metavar="FILE",
                 help="The key's X.509 certificate (PEM or DER): each signature is checked against it, and the "
                      "manifest records it. Env: CUDABUILD_SIGN_CERT."),
    click.option("--sign-image", metavar="KEY",
                 help="Sign each image pushed to --registry with this PEM ECDSA P-256 key, as cosign does (a "
                      "sha256-DIGEST.sig tag), and attest its SLSA provenance and SPDX SBOM (sha256-DIGEST.att); "
                      "`cosign verify --key KEY.pub` checks them. An encrypted key's passphrase comes from "
                      "CUDABUILD_IMAGE_KEY_PASSWORD. Env: CUDABUILD_IMAGE_KEY."),
    VERIFY_KEY,
    click.option("--no-build", "no_build", is_flag=True, default=None,
                 help="Never compile: take the modules from the cache or the registry, or fail (exit 21)."),
]


build_flags = _group(*BUILD_FLAGS)


def build_flag_values(flags: dict) -> dict:
    """The build flags as given (None: not given), in BuildOptions' words: --no-cache is
    use_cache=False, and --kernel-image or --boot-append imply --boot-test."""
    flags = dict(flags)
    if flags.pop("no_cache", None):
        flags["use_cache"] = False
    if flags.get("kernel_image") is not None or flags.get("boot_append") is not None:
        flags["boot_test"] = True
    return flags
