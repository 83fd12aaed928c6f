"""cudabuild matrix on a real single-node Swarm (a second dockerd) with a real registry: each cell a
replicated-job running cudabuild's own image (made from the wheel by scripts/tool-image) beside the
node's engine; a second identical run schedules nothing; a cell that cannot build fails alone with
the compiler's line. Kept lean: one real build (6.1.0-47) and one real failing compile; the run's
other kernel comes from the run's cache."""

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.dockerd import SecondEngine
from tests.helpers import REPO, run_cli

pytestmark = [pytest.mark.engine, pytest.mark.build]

OLDER = "6.1.0-47-amd64"  # bookworm's headers that Debian's open 535.261.03 still builds against (FACTS.md)


@pytest.fixture(scope="module")
def swarm(build, tmp_path_factory):
    """A second engine, a one-node Swarm manager, with the base and builder images the run's
    build used (nothing can be pulled from Docker Hub here)."""
    data, _, cache, _ = build
    manifest = json.loads((Path(data["cache_dir"]) / "manifest.json").read_text())
    engine = SecondEngine(tmp_path_factory.mktemp("swarm"), {}).start()
    try:
        engine.docker("swarm", "init", "--advertise-addr", "127.0.0.1", "--listen-addr", "127.0.0.1:2377")
        engine.load(manifest["builder_image"]["base"])
        engine.load(manifest["builder_image"]["tag"])
        yield engine
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def tool_image(registry):
    made = subprocess.run(["bash", str(REPO / "scripts" / "tool-image"), registry.repo()], capture_output=True,
                          text=True, timeout=900)
    assert made.returncode == 0, made.stderr[-3000:]
    return made.stdout.strip().splitlines()[-1]


def matrix(swarm, cache, registry, *args):
    since = int(time.time()) - 1
    result = run_cli("matrix", "--backend", "swarm", "--registry", registry.repo(), "--node-socket",
                     str(swarm.socket), *args, env={"CUDABUILD_CACHE": str(cache), "DOCKER_HOST": swarm.host},
                     timeout=1800)
    created = swarm.docker("events", "--since", str(since), "--until", str(int(time.time()) + 1), "--filter",
                           "type=service", "--filter", "event=create", "--format", "{{.Actor.Attributes.name}}")
    return result, [name for name in created.stdout.splitlines() if name]


def test_swarm_jobs_build_and_push_then_a_second_run_schedules_nothing(build, swarm, registry, tool_image):
    data, _, cache, _ = build
    kernels = f"{data['kernel_release']},{OLDER}"
    first, services = matrix(swarm, cache, registry, "--kernels", kernels, "--drivers", "535", "--json")
    assert first.returncode == 0, first.stderr[-4000:]
    cells = json.loads(first.stdout)["cells"]
    assert len(services) == 2, services
    assert {c["kernel"]: c["state"] for c in cells} == {data["kernel_release"]: "cached", OLDER: "built"}
    for cell in cells:
        name, tag = cell["registry_ref"].rsplit(":", 1)
        assert tag in registry.tags(name.split("/", 1)[1])
        assert registry.labels(cell["registry_ref"])["io.cudabuild.key"] == cell["key"]
    assert "building" in first.stderr and "built" in first.stderr
    assert not swarm.docker("service", "ls", "-q").stdout.strip(), "the jobs' services are removed"

    again, services = matrix(swarm, cache, registry, "--kernels", kernels, "--drivers", "535", "--json")
    assert again.returncode == 0, again.stderr[-4000:]
    assert services == [], "cells already in the registry are not scheduled"
    assert [c["state"] for c in json.loads(again.stdout)["cells"]] == ["in-registry", "in-registry"]


def test_a_cell_that_cannot_build_fails_alone_with_the_compilers_line(build, swarm, registry, tool_image):
    data, _, cache, _ = build
    result, services = matrix(swarm, cache, registry, "--kernels", data["kernel_release"], "--drivers", "535",
                              "--flavors", "proprietary,open")
    assert result.returncode == 22, result.stderr[-4000:]
    assert len(services) == 1, "only the open cell is scheduled: the proprietary one is in the registry"
    rows = {tuple(line.split()[:4]) for line in result.stdout.splitlines()}
    assert (data["kernel_release"], data["driver_version"], "proprietary", "in-registry") in rows
    assert any(r[2:4] == ("open", "failed") for r in rows), result.stdout
    assert "error: too few arguments to function 'pci_resize_resource'" in result.stdout
    assert "whole log:" in result.stdout


def test_local_matrix_reports_each_cell_and_a_failure_does_not_stop_the_others(build, tmp_path):
    data, _, cache, _ = build
    result = run_cli("matrix", "--kernels", f"{data['kernel_release']},6.1.0-999-amd64", "--drivers", "535",
                     "--parallel", "2", "--json", env={"CUDABUILD_CACHE": str(cache)})
    assert result.returncode == 22, result.stderr[-3000:]
    cells = json.loads(result.stdout)["cells"]
    assert [(c["kernel"], c["state"]) for c in cells] == [(data["kernel_release"], "cached"),
                                                           ("6.1.0-999-amd64", "failed")]
    assert cells[0]["modules_image"] == data["modules_image"]
    assert "has no kernel headers for release '6.1.0-999-amd64'" in cells[1]["error"]
    assert f"{data['kernel_release']} x 535: building" in result.stderr
