"""cudabuild-runtime on a second Docker engine (FACTS.md), configured by `cudabuild deploy swarm`'s
daemon.json: Swarm GPU jobs get the GPU Swarm assigned them, `--runtime nvidia` with
NVIDIA_VISIBLE_DEVICES (ECS), and refusals that reach `docker run`. The main engine is untouched."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from tests.dockerd import SecondEngine
from tests.helpers import host_with_artifact, run_cli

IMAGE = "python:3.11-slim-bookworm"
RUNTIME = str(Path(sys.executable).parent / "cudabuild-runtime")
LOOK = "env | grep ^DOCKER_RESOURCE_GPU= > /out/env; ls -l /dev > /out/dev; ls /usr/lib/x86_64-linux-gnu/libcuda.so.1 > /out/lib"


@pytest.fixture(scope="module")
def gpu_host(tmp_path_factory, docker_client):
    root, env, art = host_with_artifact(tmp_path_factory.mktemp("gpuhost"), gpus=3, installed=True)
    made = run_cli("image", "driver", "--modules", str(art), "--tag", "cudabuild-test/runtime-driver:1", "--json")
    assert made.returncode == 0, made.stderr
    yield root
    docker_client.images.remove("cudabuild-test/runtime-driver:1", force=True)


@pytest.fixture(scope="module")
def engine(tmp_path_factory, gpu_host):
    deployed = run_cli("deploy", "swarm", "--root", str(gpu_host), "--runtime-path", RUNTIME, "--image",
                       "cudabuild-test/runtime-driver:1", "--json")
    assert deployed.returncode == 0, deployed.stderr
    daemon = json.loads(deployed.stdout)["daemon.json"]
    assert daemon["node-generic-resources"] == [f"gpu=GPU-0000000{i}-fake" for i in range(3)]
    # The spec is in the fake root, not /var/run/cdi: say so to the runtime (runtimeArgs).
    daemon["runtimes"]["cudabuild"]["runtimeArgs"] = ["--cdi-spec-dir", str(gpu_host / "run/cdi")]
    daemon["runtimes"]["nvidia"] = daemon["runtimes"]["cudabuild"]  # the name the ECS agent uses
    daemon["runtimes"]["nospec"] = {"path": RUNTIME, "runtimeArgs": ["--cdi-spec-dir", str(gpu_host / "none")]}
    second = SecondEngine(tmp_path_factory.mktemp("engine2"), daemon).start()
    try:
        second.load(IMAGE)
        yield second
    finally:
        second.stop()


def nodes(listing: str) -> dict[str, str]:
    return {line.split()[-1]: f"{line.split()[4]} {line.split()[5]}" for line in listing.splitlines()
            if line.startswith("c") and "nvidia" in line}


def test_swarm_gpu_jobs_each_get_the_gpu_swarm_assigned(engine, tmp_path):
    engine.docker("swarm", "init", "--advertise-addr", "127.0.0.1", "--listen-addr", "127.0.0.1:2377")
    outs = {}
    for n in (1, 2):  # two at once
        outs[n] = tmp_path / f"job{n}"
        outs[n].mkdir()
        engine.docker("service", "create", "--detach", "--name", f"gpu-job-{n}", "--mode", "replicated-job",
                      "--network", "host", "--generic-resource", "gpu=1", "--restart-condition", "none",
                      "--mount", f"type=bind,src={outs[n]},dst=/out", IMAGE, "sh", "-c", LOOK + "; sleep 3")
    deadline = time.monotonic() + 180
    states = []
    while time.monotonic() < deadline:
        states = [engine.docker("service", "ps", f"gpu-job-{n}", "--format", "{{.CurrentState}} {{.Error}}").stdout
                  for n in (1, 2)]
        if all(s.startswith(("Complete", "Failed", "Rejected")) for s in states):
            break
        time.sleep(1)
    assert all(s.startswith("Complete") for s in states), states
    seen = []
    for n in (1, 2):
        uuid = (outs[n] / "env").read_text().strip().split("=", 1)[1]
        index = int(uuid[len("GPU-0000000"):len("GPU-0000000") + 1])
        devices = nodes((outs[n] / "dev").read_text())
        gpu_nodes = sorted(name for name in devices if name[len("nvidia"):].isdigit())
        assert gpu_nodes == [f"nvidia{index}"], (uuid, devices)
        assert devices[f"nvidia{index}"] == f"195, {index}"
        assert {"nvidiactl", "nvidia-uvm", "nvidia-uvm-tools"} <= set(devices)
        assert (outs[n] / "lib").read_text().strip() == "/usr/lib/x86_64-linux-gnu/libcuda.so.1"
        seen.append(uuid)
    assert len(set(seen)) == 2, f"two jobs at once get different GPUs: {seen}"


def test_the_ecs_runtime_name_gives_the_gpu_in_nvidia_visible_devices(engine):
    run = ["run", "--rm", "--runtime", "nvidia", "--network", "none"]
    two = engine.docker(*run, "-e", "NVIDIA_VISIBLE_DEVICES=2", IMAGE, "sh", "-c", "ls -l /dev")
    devices = nodes(two.stdout)
    assert devices["nvidia2"] == "195, 2" and "nvidia0" not in devices and "nvidia1" not in devices
    untouched = engine.docker(*run, IMAGE, "sh", "-c", "ls /dev; ls /usr/lib/x86_64-linux-gnu/libcuda.so.1 || true")
    assert "nvidia" not in untouched.stdout, "a container that names no GPU is unchanged"
    seven = engine.docker(*run, "-e", "NVIDIA_VISIBLE_DEVICES=7", IMAGE, "true", check=False)
    assert seven.returncode != 0
    assert "GPU '7'" in seven.stderr and "GPU-00000002-fake" in seven.stderr, seven.stderr


def test_no_spec_means_no_container(engine):
    result = engine.docker("run", "--rm", "--runtime", "nospec", "--network", "none", "-e", "NVIDIA_VISIBLE_DEVICES=0",
                           IMAGE, "true", check=False)
    assert result.returncode != 0 and "no CDI spec of kind nvidia.com/gpu" in result.stderr, result.stderr
