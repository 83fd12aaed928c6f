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

from tests.helpers import RELEASE, REPO, fake_host, make_artifact, run_cli

NODE_REGISTRY = "registry.example:5000/gpu"


@pytest.fixture(scope="module")
def images(tmp_path_factory, docker_client):
    art = tmp_path_factory.mktemp("deploy") / "artifact"
    make_artifact(art)
    made = {}
    for kind in ("driver", "kmm"):
        result = run_cli("image", kind, "--modules", str(art), "--tag", f"cudabuild-test/{kind}:1", "--json")
        assert result.returncode == 0, result.stderr
        made[kind] = json.loads(result.stdout)["image"]
    # The kernel-agnostic driver image (no modules; its builds come from the registry it names).
    result = run_cli("image", "driver", "--registry", NODE_REGISTRY, "--driver", "535", "--no-push",
                     "--tag", "cudabuild-test/driver-any:1", "--json")
    assert result.returncode == 0, result.stderr
    made["any"] = json.loads(result.stdout)["image"]
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


def test_one_daemonset_serves_every_kernel(images, tmp_path):
    """`deploy kubernetes` of the kernel-agnostic image: one DaemonSet on every node with an NVIDIA
    device, whatever its kernel, started as the image says; strict validation; KMM refused."""
    import yaml

    validate = str(Path(sys.executable).parent / "kubernetes-validate")
    out = tmp_path / "k8s"
    result = run_cli("deploy", "kubernetes", "--image", images["any"], "--registry", NODE_REGISTRY, "--output",
                     str(out))
    assert result.returncode == 0, result.stderr
    files = sorted(out.glob("*.yaml"))
    assert [f.name for f in files] == ["cudabuild-driver.yaml", "namespace.yaml"]
    check = subprocess.run([validate, "-k", "1.30.0", "--strict", *map(str, files)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    daemonset = yaml.safe_load(files[0].read_text())
    spec = daemonset["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"feature.node.kubernetes.io/pci-10de.present": "true"}, "no kernel selector"
    [container] = spec["containers"]
    assert container["image"] == f"{NODE_REGISTRY}/driver-any:1"
    assert container["args"] == ["--registry", NODE_REGISTRY, "--driver", "535", "--wait"]
    kmm = run_cli("deploy", "kubernetes", "--image", images["any"], "--kmm")
    assert kmm.returncode == 3 and "kernel-agnostic" in kmm.stderr


def test_one_ecs_daemon_service_and_one_swarm_command_serve_every_kernel(images, tmp_path):
    import botocore.session
    import botocore.validate

    root = tmp_path / "node"
    fake_host(root, gpus=1)
    d = root / "proc/driver/nvidia/gpus/0000:01:00.0"
    d.mkdir(parents=True)
    (d / "information").write_text("Device Minor: \t 0\nGPU UUID: \t GPU-00000000-node\n")
    (root / "sys/module/nvidia").mkdir(parents=True)
    (root / "sys/module/nvidia/version").write_text("535.309.01\n")
    ecs = run_cli("deploy", "ecs", "--root", str(root), "--image", images["any"], "--json")
    assert ecs.returncode == 0, ecs.stderr
    files = json.loads(ecs.stdout)
    assert "cudabuild-driver.task.json" in files and "cudabuild-driver.service.json" in files
    model = botocore.session.get_session().get_service_model("ecs")
    report = botocore.validate.ParamValidator().validate(files["cudabuild-driver.task.json"],
                                                        model.operation_model("RegisterTaskDefinition").input_shape)
    assert not report.has_errors(), report.generate_report()
    assert files["cudabuild-driver.task.json"]["containerDefinitions"][0]["command"][-1] == "--wait"
    swarm = run_cli("deploy", "swarm", "--root", str(root), "--image", images["any"], "--json")
    assert swarm.returncode == 0, swarm.stderr
    install = json.loads(swarm.stdout)["install-driver.sh"]
    assert "uname -r" not in install and "--network host" in install and f"--registry {NODE_REGISTRY}" in install


def test_systemd_units_pass_systemd_analyze_verify(tmp_path):
    """The node's units (driver at boot, the next kernel staged hourly) and a build host's prebuild
    units: `systemd-analyze verify` accepts them without a word (it warns of an unknown key and
    fails on a command that is not there), and they run what they say."""
    cudabuild = str(REPO / ".venv" / "bin" / "cudabuild")
    out = tmp_path / "units"
    node = run_cli("deploy", "systemd", "--registry", NODE_REGISTRY, "--driver", "535", "--cudabuild-path", cudabuild,
                   "--output", str(out))
    assert node.returncode == 0, node.stderr
    prebuild = run_cli("deploy", "systemd", "--prebuild", "--registry", NODE_REGISTRY, "--drivers",
                       "550,run:580.142,run:595.45.04",
                       "--cudabuild-path", cudabuild, "--output", str(out))
    assert prebuild.returncode == 0, prebuild.stderr
    files = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))  # and deploy's own record
    assert files == ["60-cudabuild-cdi-refresh.rules", "cudabuild-cdi-refresh.service", "cudabuild-driver.service",
                     "cudabuild-prebuild.service", "cudabuild-prebuild.timer", "cudabuild-stage.service",
                     "cudabuild-stage.timer"]
    units = files[1:]
    verify = subprocess.run(["systemd-analyze", "verify", *units], cwd=out, capture_output=True, text=True)
    assert verify.returncode == 0 and verify.stdout + verify.stderr == "", verify.stdout + verify.stderr
    driver = (out / "cudabuild-driver.service").read_text()
    assert f"ExecStart={cudabuild} install --registry {NODE_REGISTRY} --driver 535\n" in driver
    for unit in ("cudabuild-driver.service", "cudabuild-cdi-refresh.service"):
        assert "Before=docker.service containerd.service podman.service" in (out / unit).read_text()
    refresh = (out / "cudabuild-cdi-refresh.service").read_text()
    assert f"ExecStart={cudabuild} cdi generate --if-loaded\n" in refresh and "WantedBy=multi-user.target" in refresh
    rule = [line for line in (out / "60-cudabuild-cdi-refresh.rules").read_text().splitlines()
            if line and not line.startswith("#")]
    assert rule == ['ACTION=="add", SUBSYSTEM=="module", KERNEL=="nvidia|nvidia_uvm|nvidia_modeset", '
                    'RUN+="/usr/bin/systemctl --no-block start cudabuild-cdi-refresh.service"']
    only = run_cli("deploy", "systemd", "--cdi-refresh", "--cudabuild-path", cudabuild, "--json")
    assert only.returncode == 0 and sorted(json.loads(only.stdout)) == files[:2]
    assert f"--kernels-from /etc/cudabuild/kernels --drivers 550,run:580.142,run:595.45.04 --registry {NODE_REGISTRY} " \
        "--boot-test" in \
        (out / "cudabuild-prebuild.service").read_text()
    refused = run_cli("deploy", "systemd", "--prebuild", "--registry", NODE_REGISTRY)
    assert refused.returncode == 3 and "--drivers" in refused.stderr


def test_the_prebuild_cronjob_validates_strictly(images, tmp_path):
    import yaml

    out = tmp_path / "k8s"
    result = run_cli("deploy", "kubernetes", "--image", images["any"], "--registry", NODE_REGISTRY, "--prebuild",
                     "--drivers", "550,run:580.142", "--output", str(out))
    assert result.returncode == 0, result.stderr
    cronjob = out / "cudabuild-prebuild.yaml"
    check = subprocess.run([str(Path(sys.executable).parent / "kubernetes-validate"), "-k", "1.30.0", "--strict",
                            str(cronjob)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    pod = yaml.safe_load(cronjob.read_text())["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["args"][:5] == ["matrix", "--kernels-from", "/etc/cudabuild/kernels", "--drivers",
                                                 "550,run:580.142"], "Debian's and NVIDIA's drivers side by side"
    wrong = run_cli("deploy", "kubernetes", "--image", images["any"], "--registry", NODE_REGISTRY, "--prebuild",
                    "--drivers", "nvidia:580.142")
    assert wrong.returncode != 0 and "names no driver source" in wrong.stderr
    assert pod["containers"][0]["image"].startswith(f"{NODE_REGISTRY}/cudabuild:")
    refused = run_cli("deploy", "kubernetes", "--image", images["any"], "--prebuild", "--drivers", "535")
    assert refused.returncode == 3 and "--registry" in refused.stderr


def test_systemd_units_take_no_injected_lines_and_escape_what_systemd_expands():
    from cudabuild.node.config import NodeConfig
    from cudabuild.deploy import systemd
    from cudabuild.errors import InputError

    config = NodeConfig(driver="535", registry="registry.example:5000/gpu")
    with pytest.raises(InputError, match="--cudabuild-path"):
        systemd.node_files(cudabuild='/usr/local/bin/cudabuild\nExecStart=/bin/sh -c "touch /tmp/PWNED"\n#',
                           config=config)
    with pytest.raises(InputError, match="--cudabuild-path"):
        systemd.node_files(cudabuild="cudabuild", config=config)
    for schedule in ("daily\nUnit=evil.service", "not a calendar"):
        with pytest.raises(InputError, match="--schedule"):
            systemd.prebuild_files(cudabuild="/usr/local/bin/cudabuild", registry="r.example/x", drivers="535",
                                   schedule=schedule)
    assert systemd.command_line(["/usr/bin/echo", "100%", "$HOME", 'a "b" c\\d']) == \
        '/usr/bin/echo "100%%" "$$HOME" "a \\"b\\" c\\\\d"'
    with pytest.raises(InputError, match="control character"):
        systemd.command_line(["/usr/bin/echo", "a\nb"])
