"""Kernels from a git repository (linux-stable or a mirror): the tag named by the release, the
target's config and Module.symvers, and the compiler the kernel was built with."""

from __future__ import annotations

import gzip
import json
import platform
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cudabuild.store.fetch import store_local
from cudabuild.errors import FetchError, InputError, VerifyError, shown
from cudabuild.options import existing_file
from cudabuild.nvidia import kernel_tag, version_tuple
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
    commit: str  # what the tag named when the repository was asked: a moved tag is another kernel
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
        return {"kind": "git", "repo": self.repo, "tag": self.tag, "commit": self.commit, "release": self.release,
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
                       for_host: bool, store: Path, note: Callable[[str], None]) -> GitKernel:
    tag, suffix = kernel_tag(release)
    if config is None and for_host:
        config = "host"
    if config is None:
        raise InputError(f"building kernel {release} from git needs its config",
                         hint="pass --kernel-config FILE (on the target: /proc/config.gz, /boot/config-$(uname -r); "
                         "CoreOS: /usr/boot/config), or --kernel-config host when building for this host")
    data = host_config() if config == "host" else existing_file(
        config, "--kernel-config", "the target kernel's .config").read_bytes()
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
        source = existing_file(symvers, "--symvers", "the target kernel's Module.symvers")
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
    commit = tag_commit(repo, tag, store=store, note=note)
    return GitKernel(repo=repo, tag=tag, commit=commit, suffix=suffix, release=release, config=config_path,
                     config_sha256=config_sha, symvers=symvers_path, symvers_sha256=symvers_sha, gcc_major=gcc,
                     gcc_reason=reason, modversions=modversions, checkout=checkout)


def tag_commit(repo: str, tag: str, *, store: Path, note: Callable[[str], None]) -> str:
    """The commit the repository's tag names now. Remembered in the store, so that an offline run
    builds (or finds in the cache) the same kernel; a missing tag names the nearest ones."""
    remembered_path = store / "git-tags.json"
    remembered = json.loads(remembered_path.read_text()) if remembered_path.is_file() else {}
    try:
        listing = subprocess.run(["git", "ls-remote", "--tags", repo], capture_output=True, text=True, timeout=120,
                                 env={"GIT_TERMINAL_PROMPT": "0", "PATH": "/usr/bin:/bin:/usr/local/bin"})
        failure = None if listing.returncode == 0 else (listing.stderr.strip().splitlines() or ["git failed"])[-1]
    except FileNotFoundError:
        failure = "git is not installed on this host"
    except subprocess.TimeoutExpired:
        failure = "no answer within 120 s"
    if failure is not None:
        known = remembered.get(f"{repo} {tag}")
        if known:
            note(f"cannot ask {repo} for {tag} ({failure}); using the commit it named before, {known[:12]}")
            return known
        raise FetchError(f"cannot list the tags of {repo}: {shown(failure)}",
                         hint="check --kernel-repo (or CUDABUILD_KERNEL_REPO) and that the server is reachable")
    tags: dict[str, str] = {}
    for line in listing.stdout.splitlines():
        sha, _, ref = line.partition("\t")
        if ref.startswith("refs/tags/"):
            name = ref[len("refs/tags/"):]
            if name.endswith("^{}"):
                tags[name[:-3]] = sha  # an annotated tag, peeled to its commit
            else:
                tags.setdefault(name, sha)
    if tag not in tags:
        wanted = version_tuple(tag)
        kernel_tags = [t for t in tags if re.fullmatch(r"v[0-9]+\.[0-9]+(\.[0-9]+)?", t)]
        nearest = sorted(kernel_tags, key=lambda t: (abs(_ordinal(version_tuple(t)) - _ordinal(wanted)), t))[:5]
        raise InputError(f"{repo} has no tag {tag}",
                         hint=("the nearest tags it has: " + ", ".join(sorted(nearest, key=version_tuple)))
                         if nearest else "it has no version tags at all: check --kernel-repo")
    if remembered.get(f"{repo} {tag}") != tags[tag]:
        remembered[f"{repo} {tag}"] = tags[tag]
        tmp = remembered_path.with_suffix(".partial")
        tmp.write_text(json.dumps(remembered, indent=1, sort_keys=True))
        tmp.replace(remembered_path)
    return tags[tag]


def _ordinal(v: tuple[int, ...]) -> int:
    v = (v + (0, 0, 0))[:3]
    return v[0] * 1_000_000 + v[1] * 1_000 + v[2]
