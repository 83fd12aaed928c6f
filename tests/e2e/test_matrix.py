"""cudabuild matrix on a real single-node Swarm (a second dockerd) with a real registry: each cell a
replicated-job running cudabuild's own image (made from the wheel by scripts/tool-image) beside the
node's engine; a second run schedules nothing the registry holds; a cell that cannot build fails
alone with the compiler's line. Kept lean: one run, one real build (the open modules for 6.1.0-47,
the suite's only open build) and one real failing compile, started in the background as soon as the
session's build exists, with a cache of its own (tests/background.py, tests/conftest.py)."""

import json
import subprocess

import pytest

from tests.helpers import run_cli
from tests.background import OLDER, ONLY, OPEN, installer_url, matrix

pytestmark = [pytest.mark.engine, pytest.mark.build]


def modinfo(field: str, path) -> str:
    return subprocess.run(["/sbin/modinfo", "-F", field, str(path)], capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.fixture(scope="module")
def swarm_matrix(swarm_matrix_started):
    """The Swarm run started in the background once the session's build was made (conftest.py)."""
    return swarm_matrix_started.wait()


@pytest.fixture(scope="module")
def swarm(swarm_matrix):
    return swarm_matrix["engine"]


@pytest.fixture(scope="module")
def registry(swarm_matrix):
    """The registry the background run pushed to (this module's own)."""
    return swarm_matrix["registry"]


@pytest.fixture(scope="module")
def open_run(swarm_matrix):
    """One Swarm run of two cells, both the open modules from NVIDIA's .run installer (served over
    HTTP on 127.0.0.1; the jobs run on the host network): the older kernel builds, the newest does
    not compile (Debian's open 535.261.03 source, FACTS.md). The built cell is also the suite's one
    build of the open modules (test_the_open_cell_holds_the_open_modules)."""
    return swarm_matrix["result"], swarm_matrix["services"]


def test_swarm_jobs_build_and_push_and_a_cell_that_cannot_build_fails_alone(build, swarm, registry, open_run):
    data, _, _, _ = build
    result, services = open_run
    assert result.returncode == 22, result.stderr[-4000:]
    assert len(services) == 2, services
    rows = {tuple(line.split()[:4]): line.split()[-1] for line in result.stdout.splitlines() if line.strip()}
    built = rows.get((OLDER, OPEN, "open", "built"))
    assert built is not None, result.stdout
    assert (data["kernel_release"], OPEN, "open", "failed") in rows, result.stdout
    name, tag = built.rsplit(":", 1)
    assert tag in registry.tags(name.split("/", 1)[1])
    assert "error: too few arguments to function 'pci_resize_resource'" in result.stdout
    assert "whole log:" in result.stdout
    assert "building" in result.stderr and "built" in result.stderr
    assert not swarm.docker("service", "ls", "-q").stdout.strip(), "the jobs' services are removed"


def test_a_second_run_schedules_nothing_the_registry_holds(swarm_matrix, swarm, registry, open_run, installers,
                                                           tmp_path):
    """The fleet's kernels from a file (--kernels-from): the one the registry holds is not built again."""
    cache = swarm_matrix["cache"]
    fleet = tmp_path / "kernels"
    fleet.write_text(f"# the fleet's kernels\n{OLDER}\n")
    again, services = matrix(swarm, cache, registry, "--kernels-from", str(fleet), "--drivers", OPEN, "--flavors",
                             "open", *ONLY, "--driver-source", "run", "--installer", installer_url(installers),
                             "--json")
    assert again.returncode == 0, again.stderr[-4000:]
    assert services == [], "cells already in the registry are not scheduled"
    cells = json.loads(again.stdout)["cells"]
    assert [c["state"] for c in cells] == ["in-registry"]
    assert registry.labels(cells[0]["registry_ref"])["io.cudabuild.key"] == cells[0]["key"]


def test_the_open_cell_holds_the_open_modules(swarm_matrix, open_run, installers):
    """The Swarm job built into the run's cache (mounted at the same path on the node): the same
    build asked for here is answered from it, and its modules are the open ones."""
    cache = swarm_matrix["cache"]
    result = run_cli("modules", "--kernel", OLDER, "--kernel-source", "debian", "--flavor", "open", *ONLY,
                     "--driver-source", "run", "--installer", installer_url(installers), "--json",
                     env={"CUDABUILD_CACHE": str(cache)})
    assert result.returncode == 0, result.stderr[-4000:]
    data = json.loads(result.stdout)
    assert data["origin"] == "cached", "the Swarm job's build, not another"
    assert data["flavor"] == "open" and data["modules_image"].endswith(f"{OPEN}-open-only.nvidia_modeset-{OLDER}")
    assert [m["name"] for m in data["modules"]] == ["nvidia", "nvidia-modeset"]
    licenses = {m["name"]: modinfo("license", m["path"]) for m in data["modules"]}
    # The proprietary nvidia.ko and nvidia-modeset.ko say "NVIDIA"; the open ones are Dual MIT/GPL.
    assert licenses["nvidia"] == licenses["nvidia-modeset"] == "Dual MIT/GPL", licenses
    for m in data["modules"]:
        assert modinfo("version", m["path"]) == OPEN


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
