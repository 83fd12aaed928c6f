"""The engine wrapper and image publishing against the real engine."""

import os
import io
import tarfile

import pytest

from cudabuild import artifact
from cudabuild.compile.builder import tar_context
from cudabuild.settings import Settings
from cudabuild.engine import Mount
from cudabuild.compile.publish import publish_image
from cudabuild.ui import Reporter
from tests.helpers import make_artifact


@pytest.fixture
def engine(docker_client):
    return Settings.from_env(os.environ).engine()


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


def test_modules_image_has_two_layers_the_listed_files_and_the_labels(engine, tmp_path):
    root = tmp_path / "result"
    manifest = make_artifact(root)
    (root / "build.log").write_text("not shipped\n")
    tag = "cudabuild/modules:test-two-layers"
    try:
        publish_image(engine, artifact.load(root), tag=tag, reporter=Reporter(quiet=True), work=tmp_path / "w1")
        info = engine.image(tag)
        assert len(info["RootFS"]["Layers"]) == 2
        labels = info["Config"]["Labels"]
        assert labels["io.cudabuild.kernel-release"] == manifest.kernel_release
        assert labels["org.opencontainers.image.version"] == manifest.driver_version
        assert labels["io.cudabuild.modules"].split(",")[0] == f"nvidia.ko@sha256:{manifest.modules[0].sha256}"
        layers = []
        saved = b"".join(engine.save(tag))
        with tarfile.open(fileobj=io.BytesIO(saved)) as outer:
            import json

            for name in json.load(outer.extractfile("manifest.json"))[0]["Layers"]:
                with tarfile.open(fileobj=outer.extractfile(name)) as layer:
                    layers.append({n for n in layer.getnames() if not n.endswith("/")})
        listed = {"manifest.json"} | {f"modules/{m.file}" for m in manifest.modules} | \
            {f"userspace/{u.path}" for u in manifest.userspace}
        assert layers[0] == {f"userspace/{u.path}" for u in manifest.userspace}, "the first layer: the userspace"
        assert layers[0] | layers[1] == listed, "the image holds what the manifest lists: no Dockerfile, no build.log"
        # Publishing the same key again reuses the image; made again from nothing, it is the same image.
        first = engine.image_id(tag)
        publish_image(engine, artifact.load(root), tag=tag, reporter=Reporter(quiet=True), work=tmp_path / "w2")
        assert engine.image_id(tag) == first
        engine.remove_image(tag)
        publish_image(engine, artifact.load(root), tag=tag, reporter=Reporter(quiet=True), work=tmp_path / "w3")
        assert engine.image_id(tag) == first, "the same files give the same image, byte for byte"
    finally:
        engine.remove_image(tag)


def test_rebuilding_a_tag_leaves_no_dangling_image(engine, tmp_path):
    tag = "cudabuild-test/retag:1"
    ids = []
    try:
        for content in (b"one", b"two"):
            with tar_context({"Dockerfile": b"FROM scratch\nCOPY f /f\n", "f": content}) as context:
                ids.append(engine.build(context=context, tag=tag, network="none"))
        assert ids[0] != ids[1]
        assert engine.image_id(ids[0]) is None, "the image the tag named before is removed, not left dangling"
    finally:
        engine.remove_image(tag)
