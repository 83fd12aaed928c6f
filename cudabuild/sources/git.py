"""Kernels from a git repository (linux-stable or a mirror): the tag named by the release, the
target's config and Module.symvers, and the compiler the kernel was built with."""

from __future__ import annotations

import gzip
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cudabuild.errors import FetchError, InputError, VerifyError
from cudabuild.build.fetch import store_local
from cudabuild.options import kernel_tag, version_tuple
from cudabuild.verify import read_symvers

# A builder base image with each gcc major; kernels before 5.8 name no compiler in their config,
# so theirs is chosen by kernel version (a 4.x kernel does not compile with gcc 12).
BASE_BY_GCC = {
    5: "ubuntu:16.04", 6: "debian:stretch", 7: "ubuntu:18.04", 8: "debian:buster", 9: "ubuntu:20.04",
    10: "debian:bullseye", 11: "ubuntu:22.04", 12: "debian:bookworm", 13: "ubuntu:24.04", 14: "debian:trixie",
}
GCC_BY_KERNEL = [((4, 0), 5), ((4, 15), 7), ((5, 0), 8), ((5, 8), 10)]


@dataclass(frozen=True)
class GitKernel:
    repo: str
    tag: str
    suffix: str
    release: str
    config: Path  # stored by content
    config_sha256: str
    symvers: Path | None
    symvers_sha256: str | None
    gcc_major: int
    gcc_reason: str
    modversions: bool
    checkout: str

    def canonical(self) -> dict:
        return {"kind": "git", "repo": self.repo, "tag": self.tag, "release": self.release,
                "config_sha256": self.config_sha256, "symvers_sha256": self.symvers_sha256,
                "checkout": self.checkout}


def host_config() -> bytes:
    release = platform.release()
    proc = Path("/proc/config.gz")
    if proc.is_file():
        return gzip.decompress(proc.read_bytes())
    boot = Path(f"/boot/config-{release}")
    if boot.is_file():
        return boot.read_bytes()
    raise InputError("this host has no kernel config (/proc/config.gz or /boot/config-" + release + ")",
                     hint="pass --kernel-config FILE with the target kernel's .config")


def _file(value: str, what: str, flag: str) -> Path:
    path = Path(value).expanduser()
    if not path.is_file():
        raise InputError(f"{flag} {value}: no such file", hint=f"pass the path of the target kernel's {what}")
    return path


def gcc_of(config_text: str, kernel_version: tuple[int, ...]) -> tuple[int, str]:
    m = re.search(r'^CONFIG_CC_VERSION_TEXT="(.*)"$', config_text, re.M)
    if m:
        text = m.group(1)
        if "clang" in text:
            raise InputError(f"the kernel was built with clang ({text}); cudabuild builds with gcc only so far",
                             hint="use a gcc-built kernel, or --builder-base with an LLVM toolchain is not yet supported")
        version = re.search(r"\)\s+(\d+)\.\d+", text) or re.search(r"(\d+)\.\d+\.\d+", text)
        if version:
            return int(version.group(1)), f"CONFIG_CC_VERSION_TEXT {text!r}"
    chosen = 5
    for since, gcc in GCC_BY_KERNEL:
        if kernel_version[:2] >= since:
            chosen = gcc
    return chosen, f"the config names no compiler; gcc {chosen} is of the kernel's era"


def resolve_git_kernel(*, release: str, repo: str, config: str | None, symvers: str | None, checkout: str,
                       for_host: bool, store: Path) -> GitKernel:
    tag, suffix = kernel_tag(release)
    if config is None and for_host:
        config = "host"
    if config is None:
        raise InputError(f"building kernel {release} from git needs its config",
                         hint="pass --kernel-config FILE (on the target: /proc/config.gz, /boot/config-$(uname -r); "
                         "CoreOS: /usr/boot/config), or --kernel-config host when building for this host")
    data = host_config() if config == "host" else _file(config, ".config", "--kernel-config").read_bytes()
    text = data.decode("utf-8", "replace")
    if "CONFIG_" not in text:
        raise InputError(f"--kernel-config {config} is not a kernel .config (it sets no CONFIG_ options)",
                         hint="pass the target kernel's .config")
    config_path, config_sha = store_local(data, store)
    modversions = "\nCONFIG_MODVERSIONS=y" in "\n" + text
    if symvers == "host":
        symvers = f"/lib/modules/{platform.release()}/build/Module.symvers"
    symvers_path = symvers_sha = None
    if symvers is not None:
        source = _file(symvers, "Module.symvers", "--symvers")
        try:
            read_symvers(source)
        except VerifyError as exc:
            raise InputError(exc.message, hint=exc.hint) from exc
        symvers_path, symvers_sha = store_local(source, store)
    elif modversions:
        raise InputError(
            f"the config of {release} has CONFIG_MODVERSIONS=y, so its modules need the kernel's Module.symvers: "
            "without it they get no symbol CRCs and the kernel refuses them (NVIDIA's build stops at "
            "module_symvers_sanity_check)",
            hint="pass --symvers FILE: the target's /lib/modules/$(uname -r)/build/Module.symvers, the distribution's "
            "headers package, or a full `make modules` of the same source and config (--symvers host for this host)",
        )
    gcc, reason = gcc_of(text, version_tuple(release))
    return GitKernel(repo=repo, tag=tag, suffix=suffix, release=release, config=config_path,
                     config_sha256=config_sha, symvers=symvers_path, symvers_sha256=symvers_sha, gcc_major=gcc,
                     gcc_reason=reason, modversions=modversions, checkout=checkout)


def check_tag(repo: str, tag: str) -> None:
    """Ask the repository whether it has the tag; name the nearest ones when it has not."""
    if shutil.which("git") is None:
        return  # the builder's clone will say so
    try:
        listing = subprocess.run(["git", "ls-remote", "--tags", "--refs", repo], capture_output=True, text=True,
                                 timeout=120, env={"GIT_TERMINAL_PROMPT": "0", "PATH": "/usr/bin:/bin:/usr/local/bin"})
    except subprocess.TimeoutExpired as exc:
        raise FetchError(f"{repo} did not answer within 120 s", hint="check the URL and the network") from exc
    if listing.returncode != 0:
        raise FetchError(f"cannot list the tags of {repo}: {listing.stderr.strip().splitlines()[-1:]}",
                         hint="check --kernel-repo (or CUDABUILD_KERNEL_REPO) and that the server is reachable")
    tags = [line.split("refs/tags/", 1)[1] for line in listing.stdout.splitlines() if "refs/tags/" in line]
    if tag in tags:
        return
    wanted = version_tuple(tag)
    kernel_tags = [t for t in tags if re.fullmatch(r"v\d+\.\d+(\.\d+)?", t)]
    nearest = sorted(kernel_tags, key=lambda t: (abs(_ordinal(version_tuple(t)) - _ordinal(wanted)), t))[:5]
    raise InputError(f"{repo} has no tag {tag}",
                     hint=("the nearest tags it has: " + ", ".join(sorted(nearest, key=version_tuple)))
                     if nearest else "it has no version tags at all: check --kernel-repo")


def _ordinal(v: tuple[int, ...]) -> int:
    v = (v + (0, 0, 0))[:3]
    return v[0] * 1_000_000 + v[1] * 1_000 + v[2]
