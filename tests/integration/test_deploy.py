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


def test_output_never_replaces_what_deploy_did_not_write(images, tmp_path):
    """A user's own file in --output is refused by name and kept; a link planted at a temporary
    name leads nowhere; `/` and --json with --output are refused; a second deploy updates its own."""
    def deploy(out, *extra):
        return run_cli("deploy", "kubernetes", "--image", images["driver"], "--registry", "registry.example:5000/c",
                       "--output", str(out), *extra)

    out = tmp_path / "k8s"
    assert deploy(out).returncode == 0
    names = sorted(p.name for p in out.glob("*.yaml"))
    again = deploy(out)
    assert again.returncode == 0, again.stderr  # its own files: updated
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / names[0]).write_text("# the user's own\n")
    victim = tmp_path / "victim"
    victim.write_text("outside\n")
    for name in names:
        (mine / f".{name}.partial").symlink_to(victim)
    refused = deploy(mine)
    assert refused.returncode == 3 and names[0] in refused.stderr and "did not write" in refused.stderr
    assert (mine / names[0]).read_text() == "# the user's own\n" and victim.read_text() == "outside\n"
    (mine / names[0]).unlink()
    assert deploy(mine).returncode == 0 and victim.read_text() == "outside\n"
    root = deploy(Path("/"))
    assert root.returncode == 3 and "root directory" in root.stderr
    both = deploy(tmp_path / "x", "--json")
    assert both.returncode == 3 and "choose one" in both.stderr and not (tmp_path / "x").exists()
    for result in (again, refused, root, both):
        assert "Traceback" not in result.stderr
