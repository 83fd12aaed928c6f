"""The Swarm matrix run of tests/e2e/test_matrix.py, made apart from the tests so that
tests/e2e/conftest.py can start it in the background as soon as the session's build exists: its
compile then fills the core that the boot tests (QEMU, one thread), the pushes and the pulls
leave idle, and the tests that check it wait for it."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from tests.dockerd import SecondEngine
from tests.helpers import REPO, run_cli

OLDER = "6.1.0-47-amd64"  # bookworm's headers that Debian's open 535.261.03 still builds against (FACTS.md)
OPEN = "535.261.03"
# The two modules whose proprietary builds differ from the open ones (NVIDIA's binary cores): the
# open build is the open path's, and the cells compile no more than it needs (uvm, drm and peermem
# are the same sources in both flavors, and built for real by the suite's other builds).
ONLY = ("--only-modules", "nvidia,nvidia-modeset")


def swarm_matrix_run(build, registry, installers, base: Path) -> dict:
    """What the background run does (tests/e2e/conftest.py starts it): a second engine, a one-node
    Swarm manager with the base and builder images the run's build used (nothing can be pulled
    from Docker Hub here), cudabuild's own image in the registry, and the matrix of two cells."""
    data, _, cache, _ = build
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
    return {"engine": engine, "registry": registry, "result": result, "services": services}


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


