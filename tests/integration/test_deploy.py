"""`cudabuild deploy` from real images (made here from a test artifact) and a fake node: files an
operator applies, checked by `kubernetes-validate --strict` (the command) and botocore."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.helpers import RELEASE, fake_host, make_artifact, run_cli


@pytest.fixture(scope="module")
def images(tmp_path_factory, docker_client):
    art = tmp_path_factory.mktemp("deploy") / "artifact"
    make_artifact(art)
    made = {}
    for kind in ("driver", "kmm"):
        result = run_cli("image", kind, "--modules", str(art), "--tag", f"cudabuild-test/{kind}:1", "--json")
        assert result.returncode == 0, result.stderr
        made[kind] = json.loads(result.stdout)["image"]
    yield made
    for tag in made.values():
        docker_client.images.remove(tag, force=True)


def test_kubernetes_files_validate_strictly_with_and_without_kmm(images, tmp_path):
    validate = str(Path(sys.executable).parent / "kubernetes-validate")
    for kmm, image in ((False, images["driver"]), (True, images["kmm"])):
        out = tmp_path / ("kmm" if kmm else "daemonsets")
        result = run_cli("deploy", "kubernetes", "--image", image, "--registry", "registry.example:5000/cudabuild",
                         "--output", str(out), *(["--kmm"] if kmm else []))
        assert result.returncode == 0, result.stderr
        files = sorted(out.glob("*.yaml"))
        assert len(files) == 2
        check = subprocess.run([validate, "-k", "1.30.0", "--strict", *map(str, files)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        text = "".join(f.read_text() for f in files)
        assert f"registry.example:5000/cudabuild/{'kmm' if kmm else 'driver'}:1" in text
        assert RELEASE in text


def test_the_kmm_image_has_kmms_layout(images, docker_client):
    layer = b"".join(docker_client.images.get(images["kmm"]).save(named=False))
    names = set()
    with tarfile.open(fileobj=io.BytesIO(layer)) as outer:
        for member in outer.getmembers():
            if member.name.endswith("layer.tar"):
                with tarfile.open(fileobj=outer.extractfile(member)) as inner:
                    names |= set(inner.getnames())
    assert f"opt/lib/modules/{RELEASE}/nvidia.ko" in names and f"opt/lib/modules/{RELEASE}/modules.dep" in names
    assert "bin/cp" in names


def test_ecs_files_pass_botocore(images, tmp_path):
    import botocore.session
    import botocore.validate

    root = tmp_path / "node"
    fake_host(root, gpus=2)
    for gpu in range(2):  # a node whose driver reports two GPUs
        d = root / f"proc/driver/nvidia/gpus/0000:0{gpu + 1}:00.0"
        d.mkdir(parents=True)
        (d / "information").write_text(f"Device Minor: \t {gpu}\nGPU UUID: \t GPU-0000000{gpu}-node\n")
    result = run_cli("deploy", "ecs", "--root", str(root), "--image", images["driver"], "--json")
    assert result.returncode == 0, result.stderr
    files = json.loads(result.stdout)
    model = botocore.session.get_session().get_service_model("ecs")
    for name, content in files.items():
        operation = "RegisterTaskDefinition" if name.endswith(".task.json") else \
            "CreateService" if name.endswith(".service.json") else None
        if operation:
            report = botocore.validate.ParamValidator().validate(content, model.operation_model(operation).input_shape)
            assert not report.has_errors(), (name, report.generate_report())
    assert files["nvidia-gpu-info.json"]["GPUIDs"] == ["GPU-00000000-node", "GPU-00000001-node"]


def test_swarm_needs_the_nodes_gpus(images, tmp_path):
    result = run_cli("deploy", "swarm", "--root", str(tmp_path), "--image", images["driver"])
    assert result.returncode == 3 and "no GPUs under" in result.stderr and "cudabuild install" in result.stderr
