"""An artifact whose userspace names anything but the NVIDIA driver's own files (a libc.so.6 added
with a true digest, a libcuda whose DT_SONAME is ../../bin/sh) would put that file into every GPU
container's /usr/lib or /usr/bin. It is refused at `image` and at `install`, naming the file, and
nothing is installed or made. (The registry pull: tests/e2e/test_registry.py.)"""

from __future__ import annotations

import pytest

from tests.helpers import (HOSTILE_USERSPACE, fake_host, image_ids, images_made_since, make_artifact,
                           make_userspace_hostile, run_cli)


@pytest.fixture(params=HOSTILE_USERSPACE)
def hostile(request, tmp_path):
    art = tmp_path / "artifact"
    make_artifact(art)
    return art, make_userspace_hostile(art, request.param)


def test_install_refuses_it_naming_the_file(hostile, tmp_path):
    art, named = hostile
    root = tmp_path / "host"
    env = fake_host(root, gpus=1)
    result = run_cli("install", "--modules", str(art), "--root", str(root), env=env)
    assert result.returncode == 3, result.stderr
    assert named in result.stderr and "NVIDIA driver's" in result.stderr and "Traceback" not in result.stderr
    assert not (root / "run/cudabuild").exists() and not (root / "insmod.log").exists()


def test_image_refuses_it_naming_the_file(hostile, docker_client):
    art, named = hostile
    before = image_ids(docker_client)
    result = run_cli("image", "driver", "--modules", str(art), "--tag", "cudabuild-test/hostile:1")
    assert result.returncode == 3, result.stderr
    assert named in result.stderr and "Traceback" not in result.stderr
    assert images_made_since(docker_client, before) == set()
