"""The engine wrapper and image publishing against the real engine."""

import json

import pytest

from cudabuild.build.engine import Engine, Mount
from cudabuild.build.modules import publish_image
from cudabuild.ui import Reporter


@pytest.fixture
def engine(docker_client):
    return Engine.from_env()


def test_container_is_removed_when_its_block_fails(engine, docker_client, tmp_path):
    (tmp_path / "hello").write_text("hi\n")
    seen = None
    with pytest.raises(RuntimeError):
        with engine.container(image="debian:bookworm", command=["cat", "/in/hello"],
                              mounts=[Mount(str(tmp_path), "/in")], name_prefix="cudabuild-test") as c:
            seen = c.name
            assert list(c.lines()) == ["hi"] and c.wait() == 0
            raise RuntimeError("the caller failed")
    assert not docker_client.containers.list(all=True, filters={"name": seen})


def test_modules_image_has_exactly_one_layer_and_the_labels(engine, tmp_path):
    result = tmp_path / "result"
    (result / "modules").mkdir(parents=True)
    (result / "modules" / "nvidia.ko").write_bytes(b"\x7fELF fake")
    (result / "build.log").write_text("not shipped\n")
    manifest = {"driver_version": "535.309.01", "kernel_release": "6.1.0-56-amd64", "flavor": "proprietary",
                "vermagic": "6.1.0-56-amd64 SMP ", "created": "2026-11-22T00:00:00+00:00",
                "modules": [{"file": "nvidia.ko", "sha256": "ab" * 32}]}
    (result / "manifest.json").write_text(json.dumps(manifest))
    tag = "cudabuild/modules:test-one-layer"
    try:
        publish_image(engine, result, manifest, tag=tag, key="k1", reporter=Reporter(quiet=True))
        info = engine.image(tag)
        assert len(info["RootFS"]["Layers"]) == 1
        labels = info["Config"]["Labels"]
        assert labels["io.cudabuild.sources.git-release"] == "6.1.0-56-amd64"
        assert labels["org.opencontainers.image.version"] == "535.309.01"
        assert labels["io.cudabuild.build.modules"] == "nvidia.ko@sha256:" + "ab" * 32
        files = set()
        import tarfile, io
        layer_tar = b"".join(engine.save(tag))
        with tarfile.open(fileobj=io.BytesIO(layer_tar)) as outer:
            for member in outer.getmembers():
                if member.name.endswith("layer.tar"):
                    with tarfile.open(fileobj=outer.extractfile(member)) as layer:
                        files |= set(layer.getnames())
        assert {"manifest.json", "modules/nvidia.ko"} <= files and "build.log" not in files
        # Publishing the same key again reuses the image.
        first = engine.image_id(tag)
        publish_image(engine, result, manifest, tag=tag, key="k1", reporter=Reporter(quiet=True))
        assert engine.image_id(tag) == first
    finally:
        engine.remove_image(tag)
