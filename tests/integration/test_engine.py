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


def test_modules_image_has_exactly_one_layer_the_listed_files_and_the_labels(engine, tmp_path):
    root = tmp_path / "result"
    manifest = make_artifact(root)
    (root / "build.log").write_text("not shipped\n")
    tag = "cudabuild/modules:test-one-layer"
    try:
        publish_image(engine, artifact.load(root), tag=tag, reporter=Reporter(quiet=True))
        info = engine.image(tag)
        assert len(info["RootFS"]["Layers"]) == 1
        labels = info["Config"]["Labels"]
        assert labels["io.cudabuild.kernel-release"] == manifest.kernel_release
        assert labels["org.opencontainers.image.version"] == manifest.driver_version
        assert labels["io.cudabuild.modules"].split(",")[0] == f"nvidia.ko@sha256:{manifest.modules[0].sha256}"
        files = set()
        layer_tar = b"".join(engine.save(tag))
        with tarfile.open(fileobj=io.BytesIO(layer_tar)) as outer:
            for member in outer.getmembers():
                if member.name.endswith("layer.tar"):
                    with tarfile.open(fileobj=outer.extractfile(member)) as layer:
                        files |= {name for name in layer.getnames() if not name.endswith("/")}
        listed = {"manifest.json"} | {f"modules/{m.file}" for m in manifest.modules} | \
            {f"userspace/{u.path}" for u in manifest.userspace}
        dirs = {"modules", "userspace", "userspace/lib", "userspace/bin"}
        assert files - dirs == listed, "the image holds what the manifest lists: no Dockerfile, no build.log"
        # Publishing the same key again reuses the image.
        first = engine.image_id(tag)
        publish_image(engine, artifact.load(root), tag=tag, reporter=Reporter(quiet=True))
        assert engine.image_id(tag) == first
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
