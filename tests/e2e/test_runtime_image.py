"""A runtime image from a real build: device-query loads the image's own libcuda."""

import json

import docker
import pytest

from tests.helpers import run_cli, run_device_query

pytestmark = [pytest.mark.engine, pytest.mark.build]


def test_device_query_uses_the_images_own_libcuda(build):
    data, output, cache, _ = build
    made = run_cli("image", "device-query", "--modules", str(output), "--json", env={"CUDABUILD_CACHE": str(cache)})
    assert made.returncode == 0, made.stderr
    tag = json.loads(made.stdout)["image"]
    client = docker.from_env()
    try:
        code, logs = run_device_query(tag)
        # No GPU here: libcuda itself answers, with the CUDA error's name and a non-zero exit.
        assert code != 0, logs
        assert f"CUDA driver API {json.loads(made.stdout)['max_cuda']}" in logs
        assert "cuInit failed: CUDA_ERROR_NO_DEVICE" in logs
        inspected = json.loads(run_cli("inspect", tag, "--json").stdout)
        assert inspected["driver_version"] == data["driver_version"]
        assert {m["file"]: m["sha256"] for m in inspected["modules"]} == \
            {m["path"].rsplit("/", 1)[-1]: m["sha256"] for m in data["modules"]}
    finally:
        client.images.remove(tag, force=True)
