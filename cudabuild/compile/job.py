"""A build as one value that a backend runs.

A BuildJob names the modules it makes (kernel, driver, flavor; its cache key and image tag once
planned), what it reads (its inputs by sha256, the kernel tree it prepares or reuses, the files of
this machine it names) and what it writes (the cache's result, the registry's tag), and carries
the `cudabuild modules` command line that makes them, its resolved options as data. The backends in
compile/backends.py run the same value: a process beside this one (local Docker, whose builder
containers bind-mount this machine's cache), a Swarm replicated-job running cudabuild's own image
beside the node's engine, or a printed Kubernetes Job."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class BuildJob:
    kernel: str
    driver: str
    flavor: str
    argv: tuple[str, ...]  # `cudabuild` arguments: modules --options-json DATA --json
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
