"""`cudabuild image` and `cudabuild inspect` against the real engine, with a small modules result
made here (gcc-built ELF modules, a stand-in libcuda)."""

import json
import os
import stat

import docker
import pytest

from tests.helpers import DRIVER, RELEASE, make_artifact, run_cli
from tests.integration.test_loader import STUB_INSMOD

PROFILES = {"cuda": "nvidia/cuda:12.2.2-base-ubuntu22.04", "tensorflow": "tensorflow/tensorflow:2.15.0-gpu",
            "torch": "pytorch/pytorch:2.1.2-cuda12.1-cudnn8-runtime", "device-query": "python:3.11-slim-bookworm"}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    root = tmp_path_factory.mktemp("result") / "artifact"
    make_artifact(root)
    return root


@pytest.fixture(scope="module")
def client(docker_client):
    return docker_client


@pytest.fixture(scope="module")
def made(client):
    tags = []
    yield tags
    for tag in tags:
        try:
            client.images.remove(tag, force=True)
        except docker.errors.ImageNotFound:
            pass


def build(result, made, *args):
    out = run_cli("image", *args, "--modules", str(result), "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    made.append(report["image"])
    return report


@pytest.mark.parametrize("profile", [*PROFILES, "base"])
def test_each_profile_adds_exactly_one_layer_with_labels(result, made, client, profile):
    args = ["--base", "debian:bookworm", "--tag", "cudabuild-test/custom:1"] if profile == "base" else [profile]
    report = build(result, made, *args)
    base = "debian:bookworm" if profile == "base" else PROFILES[profile]
    image, base_image = client.images.get(report["image"]), client.images.get(base)
    assert len(image.attrs["RootFS"]["Layers"]) == len(base_image.attrs["RootFS"]["Layers"]) + 1
    labels = image.labels
    assert labels["io.cudabuild.driver-version"] == DRIVER
    assert labels["io.cudabuild.kernel-release"] == RELEASE
    assert labels["io.cudabuild.vermagic"].startswith(RELEASE + " ")
    assert image.attrs["Config"]["Entrypoint"] == ["/opt/cudabuild/loader.sh"]


def test_dry_run_prints_the_dockerfile_without_an_engine(tmp_path):
    out = run_cli("image", "torch", "--dry-run", env={"DOCKER_HOST": f"unix://{tmp_path}/none.sock"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("# cudabuild runtime image")
    assert "FROM pytorch/pytorch:2.1.2-cuda12.1-cudnn8-runtime" in out.stdout
    assert out.stdout.count("COPY") == 1 and "RUN" not in out.stdout


def test_a_base_needing_a_newer_cuda_is_refused(result, made, client, tmp_path):
    import io

    tag = "cudabuild-test/newer-cuda:12.4"
    client.images.build(fileobj=io.BytesIO(b"FROM debian:bookworm\nENV CUDA_VERSION=12.4.1\n"), tag=tag,
                        network_mode="host", rm=True)
    made.append(tag)
    out = run_cli("image", "--base", tag, "--modules", str(result))
    assert out.returncode == 3
    assert "CUDA 12.4.1" in out.stderr and "supports CUDA 12.2 at most" in out.stderr
    assert "insufficient" in out.stderr and "fix:" in out.stderr


def test_inspect_reports_what_the_manifest_says(result, made):
    report = build(result, made, "cuda")
    manifest = json.loads((result / "manifest.json").read_text())
    for target in (report["image"], str(result)):
        out = run_cli("inspect", target, "--json")
        assert out.returncode == 0, out.stderr
        seen = json.loads(out.stdout)
        assert seen["driver_version"] == manifest["driver_version"]
        assert seen["kernel_release"] == manifest["kernel_release"]
        assert {m["file"]: m["sha256"] for m in seen["modules"]} == {m["file"]: m["sha256"] for m in manifest["modules"]}
        assert seen["matches_host"] is (os.uname().release == RELEASE)
    one = run_cli("inspect", str(result / "modules" / "nvidia.ko"))
    assert one.returncode == 0 and DRIVER in one.stdout and RELEASE in one.stdout
    assert run_cli("inspect", "no-such-thing:1").returncode == 3


def test_loader_inside_the_image_against_a_fake_root(result, made, client, tmp_path):
    report = build(result, made, "--base", "debian:bookworm", "--tag", "cudabuild-test/loader:1")
    fake = tmp_path / "fake"
    for d in ("proc/self", "proc/driver/nvidia/gpus", "sys/module", "dev"):
        (fake / d).mkdir(parents=True)
    (fake / "proc/self/status").write_text("CapEff:\t000001ffffffffff\n")
    (fake / "proc/devices").write_text("Character devices:\n")
    (fake / "insmod").write_text(STUB_INSMOD)
    (fake / "insmod").chmod(0o755)
    logs = client.containers.run(
        report["image"], ["sh", "-c", "echo the command ran; ls /opt/cudabuild/lib; exit 5"], remove=False,
        detach=True, network_mode="none", volumes={str(fake): {"bind": "/fake", "mode": "rw"}},
        environment={"CUDABUILD_ROOT": "/fake", "CUDABUILD_INSMOD": "/fake/insmod", "CUDABUILD_KERNEL_RELEASE": RELEASE,
                     "FAKE_ROOT": "/fake", "FAKE_GPUS": "2", "FAKE_VERSION": DRIVER, "NVIDIA_VISIBLE_DEVICES": "1"})
    try:
        code = logs.wait()["StatusCode"]
        output = logs.logs().decode()
    finally:
        logs.remove(force=True)
    assert code == 5, output
    assert "the command ran" in output and f"libcuda.so.{DRIVER}" in output
    assert (fake / "insmod.log").read_text().split() == ["nvidia", "nvidia_uvm", "nvidia_modeset", "nvidia_drm"]
    assert sorted(p.name for p in (fake / "dev").iterdir()) == ["nvidia-modeset", "nvidia-uvm", "nvidia-uvm-tools",
                                                               "nvidia1", "nvidiactl"]
    st = (fake / "dev" / "nvidia1").stat()
    assert stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (195, 1)


def test_without_privileges_the_image_says_privileged(result, made, client):
    report = build(result, made, "--base", "debian:bookworm", "--tag", "cudabuild-test/noprivs:1")
    container = client.containers.run(report["image"], ["true"], detach=True, network_mode="none")
    try:
        code = container.wait()["StatusCode"]
        output = container.logs().decode()
    finally:
        container.remove(force=True)
    assert code == 10 and "--privileged" in output


def test_unknown_profile_lists_the_profiles():
    out = run_cli("image", "caffe", "--dry-run")
    assert out.returncode == 3 and "cuda, device-query, driver, kmm, tensorflow, torch" in out.stderr


def test_the_driver_container_installs_into_the_host_and_waits(result, made, client, tmp_path):
    """Run as it is on a node (-v /:/host), against a fake host root with the test seams: it
    installs there, stays running with --wait, and when stopped removes the ready file."""
    import time

    from tests.helpers import fake_host

    report = build(result, made, "driver", "--tag", "cudabuild-test/driver:1")
    image = client.images.get(report["image"])
    assert image.attrs["Config"]["Entrypoint"][-4:] == ["--root", "/host", "--modules", "/opt/cudabuild/artifact"]
    host = tmp_path / "host"
    env = {k: v.replace(str(host), "/host") for k, v in fake_host(host, gpus=3).items()}
    assert os.readlink(host / "var/run") == "/run", "laid out as Debian: /host/var/run is the container's /run"
    container = client.containers.run(report["image"], ["--wait", "--json"], detach=True, network_mode="none",
                                      environment=env, volumes={str(host): {"bind": "/host", "mode": "rw"}})
    try:
        ready = host / "run/cudabuild/driver/ready"
        for _ in range(120):
            if ready.exists():
                break
            time.sleep(0.5)
        assert ready.exists(), container.logs().decode()
        container.reload()
        assert container.status == "running", "--wait keeps it running"
        assert (host / "insmod.log").read_text().split() == ["drm", "nvidia", "nvidia_uvm", "nvidia_modeset",
                                                             "nvidia_drm"]
        assert sorted(p.name for p in (host / "dev").glob("nvidia[0-9]*")) == ["nvidia0", "nvidia1", "nvidia2"]
        spec = json.loads((host / "run/cdi/cudabuild-nvidia.json").read_text())
        node = spec["devices"][0]["containerEdits"]["deviceNodes"][0]
        assert node == {"path": "/dev/nvidia0", "type": "c", "major": 195, "minor": 0}, "host paths as the host sees them"
        assert spec["cdiVersion"] == "0.3.0"
        container.stop(timeout=20)
        assert container.wait()["StatusCode"] == 0
        assert not ready.exists(), "stopped, it removes the ready file"
    finally:
        container.remove(force=True)
