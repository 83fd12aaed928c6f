"""The builder container's contract, written once: where cudabuild mounts things inside it, the
environment its scripts (builder/*.sh) read, and the marker a script prints to name a step.
tests/unit/test_builder_contract.py checks that every variable the scripts read is a field of
BuilderEnv (or one they set themselves), and that every field is read by some script."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

SCRIPTS = "/cudabuild/builder"  # builder/*.sh, read-only
INPUTS = "/cudabuild/inputs"  # the download store (packages by sha256), read-only
KERNELS = "/cudabuild/kernels"  # the cache's kernel trees; read-only but for the one being made
DRIVER = "/cudabuild/driver"  # the driver's sources, read-only: an extracted .run or Debian's package unpacked
WORK = "/cudabuild/work"  # the build's own directory, writable
KEY = "/cudabuild/key"  # a signing key, in the signing container only
COMPILE_CACHE = "/cudabuild/compile-cache"  # ccache's directory (the cache's compile-cache/), writable
STEP_MARK = "::cudabuild-step::"  # builder/lib.sh's step(): a line that names the next step


@dataclass(frozen=True)
class BuilderEnv:
    """The variables the builder scripts read; each field is one, its name upper-cased. Plans carry
    the part they know (a kernel's, a driver's) and `merged` joins them for a container."""

    kernel_release: str = ""
    driver_version: str = ""
    modules: str = ""  # the module names to build, space-separated
    jobs: str = ""  # make -j
    work: str = WORK
    compile_cache: str = ""  # ccache's directory (COMPILE_CACHE) when the build uses one
    compile_cache_size: str = ""  # its bound, in ccache's units (e.g. 4G)
    # the kernel: Debian's headers packages, or a git tag prepared out of tree
    kernel_source: str = ""  # debian | git
    kernel_debs: str = ""
    kernel_tree: str = ""
    kernel_repo: str = ""
    kernel_tag: str = ""
    kernel_commit: str = ""
    kernel_checkout: str = ""
    kernel_clone: str = ""
    kernel_suffix: str = ""
    kernel_config: str = ""
    kernel_symvers: str = ""
    kernel_prepared: str = ""
    # the driver: Debian's module source package, or an installer's tree
    driver_source: str = ""  # debian | run
    driver_deb: str = ""  # unpacked by unpack-driver.sh, once (a build copies the tree, DRIVER_TREE)
    userspace_debs: str = ""  # unpacked by unpack-driver.sh, once per set (the host links its tree into a build's)
    collect_userspace: str = ""  # "1": build.sh collects the userspace driver beside make (an installer's)
    driver_tree: str = ""  # DRIVER: where a build finds the driver's sources
    driver_subdir: str = ""  # kernel/ or kernel-open/ of an installer
    ignore_preempt_rt: str = ""  # "1": NVIDIA's IGNORE_PREEMPT_RT_PRESENCE, only when the user asked (--ignore-preempt-rt)

    def to_env(self) -> dict[str, str]:
        """Every variable, set ones and empty ones alike (the scripts run with `set -u`)."""
        return {f.name.upper(): getattr(self, f.name) for f in fields(self)}

    def merged(self, *others: "BuilderEnv", **changes: str) -> "BuilderEnv":
        """This one with what each of `others` sets, then `changes`."""
        values = {}
        for other in others:
            values.update({f.name: getattr(other, f.name) for f in fields(other)
                           if getattr(other, f.name) != f.default})
        return replace(self, **values, **changes)

    @classmethod
    def variables(cls) -> set[str]:
        return {f.name.upper() for f in fields(cls)}
