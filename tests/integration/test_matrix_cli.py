"""`cudabuild matrix` as a user meets it without building: Kubernetes Jobs that kubernetes-validate
accepts (strict, 1.30), and the refusals that come before anything is scheduled."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import STANDINS, run_cli

pytestmark = pytest.mark.engine

# Planning reads Debian's package index; the stand-ins' cache already holds it.
ENV = {"CUDABUILD_CACHE": str(STANDINS / "standin-cache")}


@pytest.fixture
def engine(docker_client):
    return docker_client


def test_kubernetes_backend_prints_one_valid_job_per_cell(engine, tmp_path):
    result = run_cli("matrix", "--kernels", "6.1.0-56-amd64,6.1.0-47-amd64", "--drivers", "535", "--flavors",
                     "proprietary,open", "--backend", "kubernetes", "--image", "registry.example/gpu/cudabuild:0.1.0",
                     env={**ENV, "CUDABUILD_KERNEL_REPO": "git://mirror.example/linux-stable.git"})
    assert result.returncode == 0, result.stderr
    jobs = list(yaml.safe_load_all(result.stdout))
    assert [j["kind"] for j in jobs] == ["Job"] * 4
    assert len({j["metadata"]["name"] for j in jobs}) == 4
    path = tmp_path / "jobs.yaml"
    path.write_text(result.stdout)
    validate = subprocess.run([str(Path(sys.executable).parent / "kubernetes-validate"), "-k", "1.30.0", "--strict",
                               "--quiet", str(path)], capture_output=True, text=True)
    assert validate.returncode == 0, validate.stdout + validate.stderr
    args = jobs[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:2] == ["modules", "--options-json"] and args[3:] == ["--json"]
    cell = json.loads(args[2])  # the cell's options, resolved here: the environment's settings travel as data
    assert (cell["kernel"], cell["driver"], cell["flavor"]) == ("6.1.0-56-amd64", "535.309.01", "proprietary")
    assert cell["kernel_repo"] == "git://mirror.example/linux-stable.git" and cell["jobs"] is None
    assert "printed" in result.stderr  # the summary goes to stderr, the Jobs alone to stdout


def test_a_driver_named_twice_is_one_cell(engine):
    """535 and 535.309.01 resolve to the same build: one Job, and the second name is said to be it."""
    result = run_cli("matrix", "--kernels", "6.1.0-56-amd64", "--drivers", "535,535.309.01", "--backend", "kubernetes",
                     "--image", "registry.example/gpu/cudabuild:0.1.0", env=ENV)
    assert result.returncode == 0, result.stderr
    assert [j["kind"] for j in yaml.safe_load_all(result.stdout)] == ["Job"]
    assert "6.1.0-56-amd64 x 535.309.01 proprietary is the cell 6.1.0-56-amd64 x 535.309.01 proprietary" in result.stderr


@pytest.mark.parametrize("args, code, message", [
    (["--backend", "swarm"], 3, "--backend swarm needs --registry"),
    (["--backend", "swarm", "--registry", "127.0.0.1:9/cudabuild"], 3, "needs an engine that is a Swarm manager"),
    (["--kernel", "6.1.0-56-amd64"], 2, "matrix takes --kernels LIST"),
    (["--flavors", "closed"], 3, "'closed' is not a flavor"),
    (["--kernel-config", "./config", "--backend", "kubernetes"], 3, "cannot read this machine's files"),
])
def test_refusals_come_before_anything_is_scheduled(engine, tmp_path, args, code, message):
    (tmp_path / "config").write_text("CONFIG_MODVERSIONS=y\n")
    result = subprocess.run([str(Path(sys.executable).parent / "cudabuild"), "matrix", "--kernels", "6.1.0-56-amd64",
                             "--drivers", "535", *args], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, **ENV})
    assert result.returncode == code, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_kernels_from_a_fleets_list_build_exactly_those(engine, tmp_path):
    """--kernels-from -: the releases as `kubectl get nodes -o jsonpath=...` prints them (blank-
    separated, one node's kernel repeated), or a file with comments: exactly those cells."""
    cudabuild = str(Path(sys.executable).parent / "cudabuild")
    common = ["--drivers", "535", "--backend", "kubernetes", "--image", "registry.example/gpu/cudabuild:0.1.0"]
    piped = subprocess.run([cudabuild, "matrix", "--kernels-from", "-", *common], capture_output=True, text=True,
                           input="6.1.0-56-amd64 6.1.0-47-amd64 6.1.0-56-amd64\n", env={**os.environ, **ENV})
    assert piped.returncode == 0, piped.stderr
    kernels = [json.loads(j["spec"]["template"]["spec"]["containers"][0]["args"][2])["kernel"]
               for j in yaml.safe_load_all(piped.stdout)]
    assert kernels == ["6.1.0-56-amd64", "6.1.0-47-amd64"]
    listed = tmp_path / "kernels"
    listed.write_text("# the fleet's kernels\n6.1.0-47-amd64\n\n")
    from_file = run_cli("matrix", "--kernels-from", str(listed), *common, env=ENV)
    assert from_file.returncode == 0, from_file.stderr
    assert len(list(yaml.safe_load_all(from_file.stdout))) == 1
    (tmp_path / "empty").write_text("# nothing yet\n")
    for args, code, message in ((["--kernels-from", str(tmp_path / "empty")], 3, "names no kernel release"),
                                (["--kernels-from", str(listed), "--kernels", "6.1.0-47-amd64"], 2, "one of them"),
                                ([], 2, "--kernels LIST or --kernels-from FILE")):
        refused = run_cli("matrix", *args, *common, env=ENV)
        assert refused.returncode == code and message in refused.stderr, refused.stderr
