"""The suite's builds that run in the background (tests/e2e/conftest.py starts them at the first
e2e test): the git tag + .run builds of tests/e2e/test_git_run.py (535, then 470 on the kernel
535 prepared), each in a cache of its own, and the Swarm matrix of tests/e2e/test_matrix.py once
the session's build exists. The suite otherwise kept one core idle a quarter of the time (the
boot tests' QEMU runs one thread; pushes and pulls compress in one); the tests that check a
background build wait for it. Their builders carry their own process's pid (io.cudabuild.pid),
which tests/helpers.run_cli_watched uses to tell them from the builders of the command under test."""

from __future__ import annotations

import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.dockerd import SecondEngine
from tests.helpers import REPO, run_cli


class Started:
    """Work running in a thread of its own; `wait` gives its result or raises its error."""

    def __init__(self, function, *args) -> None:
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="background")
        self.future = self.executor.submit(function, *args)

    def wait(self, timeout: float = 2400):
        return self.future.result(timeout=timeout)


# ---- git tag + .run (tests/e2e/test_git_run.py) ---------------------------------------------------
RELEASE_SUFFIX = "-test"


def git_build(cache, kernel_repo, files, installer_url, *extra, release=None):
    release = release or kernel_repo["version"] + RELEASE_SUFFIX
    return run_cli("modules", "--kernel", release, "--kernel-source", "git", "--kernel-repo", kernel_repo["url"],
                   "--kernel-config", str(files["config"]), "--symvers", str(files["symvers"]),
                   "--driver-source", "run", "--installer", installer_url, "--json", *extra,
                   env={"CUDABUILD_CACHE": str(cache)})


def git_builds(cache, kernel_repo, files, installers) -> dict:
    """535 from an installer in NVIDIA's layout that our stand-in script did not write (zstd, an
    embedded zstd; tests/e2e/conftest.py independent_installer), then 470 as a compute-only driver
    on the kernel 535 fetched and prepared."""
    first = git_build(cache, kernel_repo, files, f"{installers['url']}/independent/NVIDIA-Linux-x86_64-535.309.01.run")
    second = None
    if first.returncode == 0:
        second = git_build(cache, kernel_repo, files, f"{installers['url']}/NVIDIA-Linux-x86_64-470.256.02.run",
                           "--only-modules", "nvidia,nvidia-uvm")
    return {"cache": cache, "535": first, "470": second}


# ---- the Swarm matrix (tests/e2e/test_matrix.py) -----------------------------------------------------
OLDER = "6.1.0-47-amd64"  # bookworm's headers that Debian's open 535.261.03 still builds against (FACTS.md)
OPEN = "535.261.03"
# The two modules whose proprietary builds differ from the open ones (NVIDIA's binary cores): the
# open build is the open path's, and the cells compile no more than it needs (uvm, drm and peermem
# are the same sources in both flavors, and built for real by the suite's other builds).
ONLY = ("--only-modules", "nvidia,nvidia-modeset")


def swarm_matrix_run(build, cache, registry, installers, base: Path) -> dict:
    """A second engine, a one-node Swarm manager with the base and builder images the run's build
    used (nothing can be pulled from Docker Hub here), cudabuild's own image in the registry, and
    the matrix of two cells, with a cache of its own."""
    data = build[0]
    manifest = json.loads((Path(data["cache_dir"]) / "manifest.json").read_text())
    engine = SecondEngine(base, {}).start()
    try:
        engine.docker("swarm", "init", "--advertise-addr", "127.0.0.1", "--listen-addr", "127.0.0.1:2377")
        engine.load(manifest["builder_image"]["base"], manifest["builder_image"]["tag"])
        made = subprocess.run(["bash", str(REPO / "scripts" / "tool-image"), registry.repo()], capture_output=True,
                              text=True, timeout=900)
        assert made.returncode == 0, made.stderr[-3000:]
        result, services = matrix(engine, cache, registry, "--kernels", f"{data['kernel_release']},{OLDER}",
                                  "--drivers", OPEN, "--flavors", "open", *ONLY, "--driver-source", "run",
                                  "--installer", installer_url(installers))
    except BaseException:
        engine.stop()
        raise
    return {"engine": engine, "registry": registry, "cache": cache, "result": result, "services": services}


def matrix(swarm, cache, registry, *args):
    since = int(time.time()) - 1
    result = run_cli("matrix", "--backend", "swarm", "--registry", registry.repo(), "--node-socket",
                     str(swarm.socket), *args, env={"CUDABUILD_CACHE": str(cache), "DOCKER_HOST": swarm.host},
                     timeout=1800)
    created = swarm.docker("events", "--since", str(since), "--until", str(int(time.time()) + 1), "--filter",
                           "type=service", "--filter", "event=create", "--format", "{{.Actor.Attributes.name}}")
    return result, [name for name in created.stdout.splitlines() if name]


def installer_url(installers) -> str:
    return f"{installers['url']}/NVIDIA-Linux-x86_64-{OPEN}.run"


