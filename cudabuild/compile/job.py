"""A build as one value that a backend runs.

A BuildJob names the modules it makes (kernel, driver, flavor; its cache key and image tag once
planned), what it reads (its inputs by sha256, the kernel tree it prepares or reuses, the files of
this machine it names) and what it writes (the cache's result, the registry's tag), and carries
the `cudabuild modules` command line and environment that make them. The backends in
build/backends.py run the same value: a process beside this one (local Docker, whose builder
containers bind-mount this machine's cache), a Swarm replicated-job running cudabuild's own image
beside the node's engine, or a printed Kubernetes Job."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class BuildJob:
    kernel: str
    driver: str
    flavor: str
    argv: tuple[str, ...]  # `cudabuild` arguments: modules --kernel ... --json
    environment: Mapping[str, str] = field(default_factory=dict)  # CUDABUILD_* the build reads
    driver_version: str | None = None  # the version `driver` resolved to, once planned
    key: str | None = None  # the cache key, once planned
    tag: str | None = None  # the local modules image
    registry_ref: str | None = None  # where the result goes, with --registry
    inputs: tuple[str, ...] = ()  # sha256 of every download it reads
    kernel_tree: str | None = None  # the cache's kernels/ entry it unpacks or prepares
    local_files: tuple[tuple[str, str], ...] = ()  # (flag, path) of files on this machine it names

    @property
    def cell(self) -> str:
        """How people name it: 6.1.0-56-amd64 x 535 (open)."""
        return f"{self.kernel} x {self.driver}" + (f" ({self.flavor})" if self.flavor != "proprietary" else "")

    @property
    def name(self) -> str:
        """A name for a service, a Job or a log file: lower-case letters, digits and dashes."""
        raw = f"{self.driver}-{self.flavor[:4]}-{self.kernel}".lower()
        return re.sub(r"[^a-z0-9]+", "-", raw).strip("-")[:52]


def command_line(params, flags: Mapping[str, object], skip: set[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """The flags as given on a command line again (click's parameters say how each is spelled), and
    the local files among them. Values not given (None) are left out, so each build resolves its
    own defaults and environment as `cudabuild modules` would."""
    import click

    argv: list[str] = []
    files: list[tuple[str, str]] = []
    for param in params:
        if not isinstance(param, click.Option) or param.name in skip or flags.get(param.name) is None:
            continue
        value, flag = flags[param.name], param.opts[0]
        if param.is_flag:
            if value:
                argv.append(flag)
            continue
        argv += [flag, str(value)]
        if param.name in ("kernel_config", "symvers", "installer", "kernel_image", "sign_key", "sign_cert") \
                and value != "host" \
                and "://" not in str(value):
            files.append((flag, str(value)))
    return argv, files
