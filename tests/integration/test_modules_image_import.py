"""A modules image that was not built with this cache (`docker pull`ed, or made on another machine)
works with `cudabuild image --modules`: it is read from the image, checked as a registry pull is,
and put in the cache. A tampered one is refused and leaves nothing behind. (With a real build and
a real `docker pull` from a registry: tests/e2e/test_registry.py.)"""

from __future__ import annotations

import os
import json

import pytest

from cudabuild import artifact
from cudabuild.settings import Settings
from cudabuild.compile.publish import publish_image
from cudabuild.ui import Reporter
from tests.helpers import image_ids, images_made_since, make_artifact, make_userspace_hostile, run_cli

RELEASE = "6.1.192-cudabuild-test"  # not a Debian kernel: no Module.symvers to fetch


@pytest.fixture
def modules_image(tmp_path, docker_client):
    """Made by another cache: cudabuild's own publisher, from an artifact outside this test's cache."""
    made = []

    def make(name: str, hostile: str | None = None) -> tuple[str, str]:
        art = tmp_path / name / "payload"
        manifest = make_artifact(art, release=RELEASE)
        tag = f"cudabuild-test/modules-elsewhere:{name}"
        made.append(tag)
        if not hostile:
            publish_image(Settings.from_env(os.environ).engine(), artifact.load(art), tag=tag, reporter=Reporter(quiet=True),
                          work=tmp_path / name / "work")
            return tag, ""
        # Changed after cudabuild made it, digests kept true, the labels the same: as the hostile tester did.
        named = make_userspace_hostile(art, hostile)
        (art.parent / "Dockerfile").write_text("FROM scratch\nCOPY payload/ /\n")
        docker_client.images.build(path=str(art.parent), tag=tag, labels=manifest.labels(), rm=True)
        return tag, named

    yield make
    for tag in made:
        docker_client.images.remove(tag, force=True)


def test_an_image_from_another_cache_is_read_checked_and_cached(modules_image, tmp_path, docker_client):
    tag, _ = modules_image("good")
    cache = tmp_path / "empty-cache"
    result = run_cli("image", "driver", "--modules", tag, "--tag", "cudabuild-test/driver-elsewhere:1", "--json",
                     env={"CUDABUILD_CACHE": str(cache)})
    try:
        assert result.returncode == 0, result.stderr
        assert "it was not built with this cache" in result.stderr
        assert f"symbol CRCs not checked: {RELEASE} is not a Debian kernel" in result.stderr
        key = docker_client.images.get(tag).labels["io.cudabuild.key"]
        assert (cache / "results" / key / "manifest.json").is_file()
        assert json.loads(result.stdout)["image"]
        again = run_cli("image", "driver", "--modules", tag, "--tag", "cudabuild-test/driver-elsewhere:1",
                        env={"CUDABUILD_CACHE": str(cache)})
        assert again.returncode == 0 and "not built with this cache" not in again.stderr  # now it is
    finally:
        docker_client.images.remove("cudabuild-test/driver-elsewhere:1", force=True)


def test_a_tampered_image_from_elsewhere_is_refused_naming_the_file(modules_image, tmp_path, docker_client):
    tag, named = modules_image("hostile", "libc-added")
    cache = tmp_path / "empty-cache"
    before = image_ids(docker_client)
    result = run_cli("image", "driver", "--modules", tag, "--tag", "cudabuild-test/driver-hostile:1",
                     env={"CUDABUILD_CACHE": str(cache)})
    assert result.returncode == 7, result.stderr
    assert f"refused {tag}" in result.stderr and named in result.stderr and "Traceback" not in result.stderr
    assert not list((cache / "results").iterdir()) and not list((cache / "tmp").iterdir())
    assert images_made_since(docker_client, before) == set()


def test_an_image_without_cudabuilds_labels_is_refused(tmp_path):
    result = run_cli("image", "driver", "--modules", "debian:bookworm", env={"CUDABUILD_CACHE": str(tmp_path / "c")})
    assert result.returncode == 3 and "not a cudabuild modules image" in result.stderr
