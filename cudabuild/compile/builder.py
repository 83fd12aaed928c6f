"""The builder: its image (rendered from dockerfiles/builder.Dockerfile.j2, built once per
toolchain and tagged by content) and the container that runs builder/build.sh."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cudabuild.artifact import LABEL_PREFIX
from cudabuild.compile.contract import SCRIPTS, STEP_MARK
from cudabuild.engine import Engine, Mount
from cudabuild.errors import LOG_TAIL_LINES, BuildError
from cudabuild.options import DEFAULT_APT_MIRROR, DEFAULT_APT_SECURITY_MIRROR
from cudabuild.resources import resource_dir
from cudabuild.ui import Reporter, Step

TOOLCHAIN = ["gcc", "make", "kmod", "bc", "flex", "bison", "libelf-dev", "libssl-dev", "xz-utils",
             "git", "binutils", "ca-certificates", "patch", "python3",  # python3: resolve_btfids on BTF kernels
             "ccache"]  # the compile cache: an identical rebuild does not compile again
# pahole, where kbuild gives modules BTF as Debian's own have (trixie's kernels: DEBUG_INFO_BTF_MODULES
# and vmlinux in the headers). Bookworm's builder stays as its results were made and measured.
BTF_TOOLS = {"trixie": ["pahole"], "forky": ["pahole"], "sid": ["pahole"]}
# Builds never run as root: when cudabuild does, its containers run as nobody.
UNPRIVILEGED = (65534, 65534)


def builder_user() -> tuple[int, int]:
    """The uid and gid builder containers run as: the caller's, or nobody's for root."""
    return UNPRIVILEGED if os.getuid() == 0 else (os.getuid(), os.getgid())


def render_template(name: str, **slots) -> str:
    import jinja2  # only when rendering: a cache hit renders nothing

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(resource_dir("dockerfiles"))),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             trim_blocks=True, lstrip_blocks=True)
    return env.get_template(name).render(**slots)


def apt_sources(distribution: str, mirror: str, security_mirror: str) -> str | None:
    """A deb822 sources file for a non-default mirror; None keeps the base image's own."""
    if mirror == DEFAULT_APT_MIRROR and security_mirror == DEFAULT_APT_SECURITY_MIRROR:
        return None
    return (f"Types: deb\nURIs: {mirror}\nSuites: {distribution} {distribution}-updates\nComponents: main\n"
            "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
            f"Types: deb\nURIs: {security_mirror}\nSuites: {distribution}-security\nComponents: main\n"
            "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg")


def tar_context(files: Mapping[str, bytes], entries: list[tuple[str, Path]] = ()):
    """A deterministic tar build context (fixed owner and times), in a temporary file: `files`
    by content, and `entries` (name in the context, path on the host; links stay links)."""
    import tempfile

    out = tempfile.TemporaryFile()
    with tarfile.open(fileobj=out, mode="w") as tar:
        def normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            return info

        for name, data in sorted(files.items()):
            info = normalise(tarfile.TarInfo(name))
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
        for name, path in sorted(entries):
            tar.add(path, arcname=name, recursive=False, filter=normalise)
    out.seek(0)
    return out


BUILDER_TEMPLATE = "builder.Dockerfile.j2"


@dataclass(frozen=True)
class BuilderImage:
    base: str
    tag: str
    slots: tuple  # the template's slots, as (name, value) pairs

    @property
    def dockerfile(self) -> str:
        """Rendered when the image is built (a build that finds it renders nothing)."""
        return render_template(BUILDER_TEMPLATE, **dict(self.slots))


def plan_builder(engine: Engine, *, base: str, distribution: str, gcc_major: int | None, mirror: str,
                 security_mirror: str) -> BuilderImage:
    """The builder, named by the hash of its Dockerfile's template and slots and its base image's id."""
    base_id = engine.ensure_image(base, what="builder base image",
                                  hint="run `bash scripts/setup` to make a stand-in, or pass another base with "
                                  "--builder-base")["Id"]
    packages = TOOLCHAIN + ([f"gcc-{gcc_major}"] if gcc_major else []) + BTF_TOOLS.get(distribution, [])
    slots = (("base", base), ("packages", tuple(packages)),
             ("apt_sources", apt_sources(distribution, mirror, security_mirror)))
    template = (resource_dir("dockerfiles") / BUILDER_TEMPLATE).read_bytes()
    digest = hashlib.sha256(template + json.dumps(slots).encode() + base_id.encode()).hexdigest()[:16]
    return BuilderImage(base=base, tag=f"cudabuild/builder:{digest}", slots=slots)


def ensure_builder(engine: Engine, builder: BuilderImage, reporter: Reporter, *, verbose: bool) -> str:
    """The builder image's id, building it first when the engine does not have it."""
    image_id = engine.image_id(builder.tag)
    if image_id:
        reporter.cached("builder image", f"{builder.tag} (from {builder.base})")
        return image_id
    with reporter.step(f"build builder image {builder.tag} from {builder.base}"):
        on_line = (lambda line: print(f"    {line}", file=reporter.stream)) if verbose else (lambda line: None)
        with tar_context({"Dockerfile": builder.dockerfile.encode()}) as context:
            return engine.build(context=context, tag=builder.tag, on_line=on_line,
                                labels={f"{LABEL_PREFIX}.role": "builder", f"{LABEL_PREFIX}.base": builder.base})


# What a compiler says when a driver's sources predate an API change of the kernel they are built for.
_API_CHANGED = re.compile(r"error: (too (few|many) arguments to function|implicit declaration of function|"
                          r"'[^']+' has no member named|incompatible type for argument) '?([A-Za-z0-9_]*)")


def _failure_hint(step: str, tail: list[str] = ()) -> str:
    if step.startswith("make modules"):
        changed = next((m for line in tail if (m := _API_CHANGED.search(line))), None)
        if changed is not None:
            return (f"the driver's sources predate this kernel's API ({changed.group(1)}"
                    + (f" {changed.group(3)}" if changed.group(3) else "") + "): a newer driver supports it, e.g. "
                    "NVIDIA's 580 (--driver-source run --driver 580.142), or build for an older kernel")
        return ("read the compiler's lines above: a kernel newer than the driver supports fails here; "
                "try a newer --driver, or an older kernel")
    if step.startswith(("prepare kernel", "unpack kernel")):
        return "the kernel tree could not be prepared with this config: check --kernel-config and the log"
    if step.startswith("fetch kernel"):
        return "check --kernel-repo and that the server is reachable"
    return "read the log's last lines above"


def builder_scripts(cache) -> Path:
    """builder/'s scripts in the cache, named by their content: the builder container mounts them
    from there, a path its engine can see even when cudabuild itself runs in a container (a Swarm
    job whose cache is the node's, mounted at the same path)."""
    source = resource_dir("builder")
    files = sorted(p for p in source.iterdir() if p.is_file())
    digest = hashlib.sha256(b"".join(p.name.encode() + b"\0" + p.read_bytes() for p in files)).hexdigest()[:16]
    target = cache.sources / f"builder-{digest}"
    if target.is_dir():
        return target
    staging = cache.workdir("builder-scripts")
    for p in files:
        (staging / p.name).write_bytes(p.read_bytes())
        (staging / p.name).chmod(0o644)
    staging.chmod(0o755)
    return cache.publish_tree(staging, target)


def run_build(engine: Engine, *, image: str, environment: Mapping[str, str], mounts: list[Mount],
              log_path: Path, reporter: Reporter, verbose: bool, scripts: Path, script: str = "build.sh",
              network: str = "none", keep: bool = False) -> None:
    """Run a script of builder/ in a container, as an unprivileged user; its step markers become
    named steps with durations, its whole output goes to `log_path`. A failure raises BuildError
    with the log's last lines. Only the kernel fetch gets a network."""
    mounts = [Mount(str(scripts), SCRIPTS), *mounts]
    uid, gid = builder_user()
    current: Step | None = None
    started = 0.0
    tail: list[str] = []

    def finish() -> None:
        if current is not None:
            reporter.finish(current, time.monotonic() - started)

    with open(log_path, "a") as log, engine.container(
            image=image, command=["sh", f"{SCRIPTS}/{script}"], mounts=mounts, network=network,
            environment=environment, user=f"{uid}:{gid}", name_prefix="cudabuild-builder", keep=keep) as container:
        reporter.note(f"builder container {container.name}; log: {log_path}")
        for line in container.lines():
            log.write(line + "\n")
            if line.startswith(STEP_MARK):
                finish()
                name = line[len(STEP_MARK):]
                current, started = (reporter.start(name), time.monotonic()) if name != "done" else (None, 0.0)
                continue
            tail = (tail + [line])[-LOG_TAIL_LINES:]
            if verbose:
                print(f"    {line}", file=reporter.stream)
        code = container.wait()
    if code != 0:
        if current is not None:
            current.status = "failed"
        raise BuildError(
            f"the build failed in step {current.name!r} (exit code {code})" if current
            else f"the builder exited with code {code}",
            log_tail="\n".join(tail), log_path=str(log_path),
            hint=_failure_hint(current.name if current else "", tail),
        )
    finish()
