"""The GPU without --privileged: a real Podman reading the CDI spec `cudabuild install` wrote,
`cudabuild run` on the real Docker engine, and `cudabuild cdi generate` for a host whose driver
came from Debian's packages. Unmodified Debian-based image; Debian's real libcuda; no GPU here,
so cuInit answers CUDA_ERROR_NO_DEVICE (100) instead of failing to find the library."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from cudabuild.artifact import describe_userspace
from tests.helpers import (DRIVER, cdi_validator, debian_debs, fake_host, make_artifact, run_cli,
                           unpack_debs)

IMAGE = "python:3.11-slim-bookworm"
PROBE = ("ls -l /dev | grep nvidia; python3 -c 'import ctypes; "
         "print(\"cuInit\", ctypes.CDLL(\"libcuda.so.1\").cuInit(0))'")


@pytest.fixture(scope="module")
def installed(tmp_path_factory, docker_client):
    """A fake host with three GPUs on which `cudabuild install` put an artifact whose libcuda is
    Debian's real libcuda.so.535.309.01."""
    base = tmp_path_factory.mktemp("cdi")
    root, art = base / "host", base / "artifact"
    env = fake_host(root, gpus=3)
    manifest = make_artifact(art)
    debs = base / "debs"
    unpack_debs(debian_debs(["libcuda1"], DRIVER), debs)
    real = debs / "usr/lib/x86_64-linux-gnu/nvidia/current" / f"libcuda.so.{DRIVER}"
    shutil.copy2(real, art / "userspace/lib" / f"libcuda.so.{DRIVER}")
    dataclasses.replace(manifest, userspace=describe_userspace(art / "userspace")).write(art)
    result = run_cli("install", "--modules", str(art), "--root", str(root), "--cdi-host-root", str(root), env=env)
    assert result.returncode == 0, result.stderr
    return root


def devices_seen(output: str) -> dict[str, str]:
    """name -> 'major, minor' from `ls -l /dev` lines."""
    seen = {}
    for line in output.splitlines():
        parts = line.split()
        if line.startswith("c") and len(parts) >= 10:
            seen[parts[-1]] = f"{parts[4]} {parts[5]}"
    return seen


def assert_gpu_1_only(output: str) -> None:
    seen = devices_seen(output)
    assert seen["nvidia1"] == "195, 1", output
    assert "nvidia0" not in seen and "nvidia2" not in seen, output
    assert {"nvidiactl", "nvidia-uvm", "nvidia-uvm-tools"} <= set(seen), output
    assert "cuInit 100" in output, output


@pytest.fixture(scope="module")
def podman_image():
    if shutil.which("podman") is None:
        pytest.fail("the CDI tests need Podman (bash scripts/setup installs it)")
    if subprocess.run(["podman", "image", "exists", IMAGE]).returncode != 0:
        with subprocess.Popen(["docker", "save", IMAGE], stdout=subprocess.PIPE) as save:
            subprocess.run(["podman", "load", "-q"], stdin=save.stdout, check=True, capture_output=True)
    return IMAGE


def test_podman_gives_an_unmodified_image_one_gpu_and_the_driver(installed, podman_image):
    """Podman reads specs from /etc/cdi and /var/run/cdi only: the test puts the spec there, under a
    name of its own, and takes it away."""
    spec = Path("/var/run/cdi") / f"cudabuild-test-{uuid.uuid4().hex[:8]}.json"
    spec.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(installed / "run/cdi/cudabuild-nvidia.json", spec)
    try:
        result = subprocess.run(["podman", "run", "--rm", "--network", "none", "--device", "nvidia.com/gpu=1",
                                 podman_image, "sh", "-c", PROBE], capture_output=True, text=True, timeout=300)
    finally:
        spec.unlink()
    assert result.returncode == 0, result.stderr
    assert_gpu_1_only(result.stdout)


def test_cudabuild_run_gives_the_same_view_on_docker(installed):
    cdi_dir = str(installed / "run/cdi")
    dry = run_cli("run", "--gpus", "1", "--cdi-dir", cdi_dir, "--dry-run", "--rm", IMAGE, "true")
    assert dry.returncode == 0 and dry.stdout.startswith("docker run --device ")
    assert f"--device {installed}/dev/nvidia1:/dev/nvidia1" in dry.stdout and "/dev/nvidia0" not in dry.stdout
    assert dry.stdout.rstrip().endswith(f"--rm {IMAGE} true"), "every other argument passes unchanged"
    result = run_cli("run", "--gpus", "1", "--cdi-dir", cdi_dir, "--rm", "--network", "none", IMAGE, "sh", "-c", PROBE)
    assert result.returncode == 0, result.stderr
    assert_gpu_1_only(result.stdout)
    by_env = run_cli("run", "--cdi-dir", cdi_dir, "--dry-run", IMAGE, env={"NV_GPU": "GPU-00000002-fake"})
    assert "/dev/nvidia2:/dev/nvidia2" in by_env.stdout and "/dev/nvidia1" not in by_env.stdout
    missing = run_cli("run", "--gpus", "7", "--cdi-dir", cdi_dir, IMAGE)
    assert missing.returncode == 3 and "GPU '7'" in missing.stderr and "GPU-00000002-fake" in missing.stderr


def test_cdi_list_shows_what_the_engines_see(installed):
    result = run_cli("cdi", "list", "--root", str(installed), "--json")
    assert result.returncode == 0, result.stderr
    devices = json.loads(result.stdout)["devices"]
    assert set(devices) >= {"nvidia.com/gpu=0", "nvidia.com/gpu=GPU-00000002-fake", "nvidia.com/gpu=all"}


@pytest.fixture(scope="module")
def packaged_host(tmp_path_factory):
    """A host whose 535.309.01 driver came from Debian's packages, loaded, with two GPUs."""
    root = tmp_path_factory.mktemp("packaged") / "host"
    unpack_debs(debian_debs(["libcuda1", "libnvidia-ml1", "libnvidia-ptxjitcompiler1", "nvidia-smi"], DRIVER), root)
    gpus = root / "proc/driver/nvidia/gpus"
    for i in range(2):
        (gpus / f"0000:0{i + 1}:00.0").mkdir(parents=True)
        (gpus / f"0000:0{i + 1}:00.0" / "information").write_text(
            f"Model: \t\t NVIDIA H100\nDevice Minor: \t {i}\nGPU UUID: \t GPU-0000000{i}-deb\n")
    (root / "sys/module/nvidia").mkdir(parents=True)
    (root / "sys/module/nvidia/version").write_text(f"{DRIVER}\n")
    (root / "proc/devices").write_text("Character devices:\n195 nvidia\n510 nvidia-uvm\n")
    return root


def test_cdi_generate_lists_the_packaged_libraries_of_the_loaded_version(packaged_host):
    result = run_cli("cdi", "generate", "--root", str(packaged_host), "--cdi-host-root", str(packaged_host),
                     "--output", "-")
    assert result.returncode == 0, result.stderr
    spec = json.loads(result.stdout)
    cdi_validator()(spec)
    mounts = {m["containerPath"]: m["hostPath"] for m in spec["containerEdits"]["mounts"]}
    current = f"{packaged_host}/usr/lib/x86_64-linux-gnu/nvidia/current"
    assert mounts["/usr/lib/x86_64-linux-gnu/libcuda.so.1"] == f"{current}/libcuda.so.{DRIVER}"
    assert mounts["/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1"] == f"{current}/libnvidia-ml.so.{DRIVER}"
    assert mounts["/usr/bin/nvidia-smi"] == f"{packaged_host}/usr/lib/nvidia/current/nvidia-smi"
    assert [d["name"] for d in spec["devices"]] == ["0", "GPU-00000000-deb", "1", "GPU-00000001-deb", "all"]
    assert f"NVIDIA_DRIVER_VERSION={DRIVER}" in spec["containerEdits"]["env"]


def test_cdi_generate_refuses_libraries_of_another_version(tmp_path, packaged_host):
    root = tmp_path / "host"
    shutil.copytree(packaged_host / "proc", root / "proc")
    shutil.copytree(packaged_host / "sys", root / "sys")
    unpack_debs(debian_debs(["libnvidia-tesla-470-cuda1", "libnvidia-tesla-470-ml1"], "470.256.02"), root)
    result = run_cli("cdi", "generate", "--root", str(root), "--output", "-")
    assert result.returncode == 3, result.stderr
    assert f"the loaded NVIDIA driver is {DRIVER}" in result.stderr and f"libcuda.so.{DRIVER}" in result.stderr
    assert "libcuda.so.470.256.02" in result.stderr and "Driver/library version mismatch" in result.stderr
