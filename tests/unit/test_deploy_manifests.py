"""What `cudabuild deploy` prints, checked by the anchors' own validators: botocore's ECS model
(RegisterTaskDefinition, CreateService) and kubernetes-validate for Kubernetes 1.30, strict."""

import json

import botocore.session
import botocore.validate
import kubernetes_validate
import pytest
import yaml

from cudabuild.host.devices import Gpu
from cudabuild.deploy import DriverImage, HostFacts, as_pulled, ecs, kubernetes, swarm

IMAGES = [DriverImage(ref="registry.example:5000/cudabuild/driver:535.309.01-6.1.0-56-amd64",
                      kernel_release="6.1.0-56-amd64", driver_version="535.309.01", kind="driver"),
          DriverImage(ref="registry.example:5000/cudabuild/driver:535.309.01-6.12.117_deb13-amd64",
                      kernel_release="6.12.117+deb13-amd64", driver_version="535.309.01", kind="driver")]
HOST = HostFacts(driver_version="535.309.01",
                 gpus=tuple(Gpu(index=i, minor=i, uuid=f"GPU-0000000{i}-fake", bus_id="") for i in range(3)))


def ecs_validate(operation: str, params: dict) -> None:
    shape = botocore.session.get_session().get_service_model("ecs").operation_model(operation).input_shape
    report = botocore.validate.ParamValidator().validate(params, shape)
    assert not report.has_errors(), report.generate_report()


def test_ecs_task_definitions_and_the_daemon_service_pass_botocores_model():
    files = {f.name: f for f in ecs.files(IMAGES, HOST, runtime_path="/usr/local/bin/cudabuild-runtime")}
    tasks = [f for name, f in files.items() if name.endswith(".task.json")]
    assert len(tasks) == 4  # a driver per kernel, and the workload in two shapes
    for f in tasks:
        ecs_validate("RegisterTaskDefinition", json.loads(f.text()))
    for name, f in files.items():
        if name.endswith(".service.json"):
            service = json.loads(f.text())
            ecs_validate("CreateService", service)
            assert service["schedulingStrategy"] == "DAEMON"
    driver = json.loads(files["cudabuild-driver-6-1-0-56-amd64.task.json"].text())["containerDefinitions"][0]
    assert driver["privileged"] is True and driver["mountPoints"][0]["containerPath"] == "/host"
    gpu = json.loads(files["gpu-example.task.json"].text())["containerDefinitions"][0]
    assert gpu["resourceRequirements"] == [{"type": "GPU", "value": "1"}]
    seed = json.loads(files["gpu-example-seed.task.json"].text())["containerDefinitions"][0]
    assert {d["hostPath"] for d in seed["linuxParameters"]["devices"]} >= {"/dev/nvidia2", "/dev/nvidiactl"}
    assert json.loads(files["nvidia-gpu-info.json"].text()) == {
        "DriverVersion": "535.309.01", "GPUIDs": ["GPU-00000000-fake", "GPU-00000001-fake", "GPU-00000002-fake"]}
    assert json.loads(files["daemon.json"].text())["runtimes"]["nvidia"]["path"] == "/usr/local/bin/cudabuild-runtime"
    assert "ECS_ENABLE_GPU_SUPPORT=true" in files["ecs.config"].text()


@pytest.mark.parametrize("kmm", [False, True])
def test_kubernetes_manifests_pass_kubernetes_validate_strict_for_1_30(kmm):
    images = [DriverImage(ref=i.ref.replace("driver", "kmm"), kernel_release=i.kernel_release,
                          driver_version=i.driver_version, kind="kmm") for i in IMAGES] if kmm else IMAGES
    files = kubernetes.files(images, kmm=kmm)
    docs = [doc for f in files for doc in yaml.safe_load_all(f.text())]
    checked = 0
    for doc in docs:
        if doc["kind"] == "Module":
            with pytest.raises(kubernetes_validate.SchemaNotFoundError):  # a CRD: no schema of Kubernetes' own
                kubernetes_validate.validate(doc, "1.30.0", strict=True)
            container = doc["spec"]["moduleLoader"]["container"]
            assert container["modprobe"]["modulesLoadingOrder"][0] == container["modprobe"]["moduleName"]
            assert [m["literal"] for m in container["kernelMappings"]] == ["6.1.0-56-amd64", "6.12.117+deb13-amd64"]
            continue
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
        checked += 1
    assert checked == (1 if kmm else 3)
    if not kmm:
        ds = docs[1]["spec"]["template"]["spec"]
        assert ds["nodeSelector"] == {"feature.node.kubernetes.io/kernel-version.full": "6.1.0-56-amd64"}
        assert ds["hostPID"] and ds["containers"][0]["securityContext"]["privileged"]
        assert ds["priorityClassName"] == "system-node-critical" and docs[1]["spec"]["updateStrategy"]["type"] == "OnDelete"
        assert ds["containers"][0]["startupProbe"]["exec"]["command"] == ["test", "-f", "/host/run/cudabuild/driver/ready"]
        assert docs[2]["spec"]["template"]["spec"]["nodeSelector"][
            "feature.node.kubernetes.io/kernel-version.full"] == "6.12.117_deb13-amd64"


def test_swarm_daemon_json_names_each_gpu_and_the_runtime():
    files = {f.name: f for f in swarm.files(IMAGES, HOST, runtime_path="/opt/cudabuild-runtime")}
    daemon = json.loads(files["daemon.json"].text())
    assert daemon["node-generic-resources"] == ["gpu=GPU-00000000-fake", "gpu=GPU-00000001-fake",
                                                "gpu=GPU-00000002-fake"]
    assert daemon["default-runtime"] == "cudabuild" and daemon["runtimes"]["cudabuild"]["path"] == "/opt/cudabuild-runtime"
    stack = yaml.safe_load(files["stack.yaml"].text())
    assert stack["services"]["gpu-example"]["deploy"]["resources"]["reservations"]["generic_resources"] == [
        {"discrete_resource_spec": {"kind": "gpu", "value": 1}}]
    assert "6.12.117+deb13-amd64) image=" in files["install-driver.sh"].text()


def test_images_are_named_as_nodes_pull_them():
    assert as_pulled("cudabuild/driver:535-6.1", None) == "cudabuild/driver:535-6.1"
    assert as_pulled("cudabuild/driver:535-6.1", "127.0.0.1:5055/cudabuild") == "127.0.0.1:5055/cudabuild/driver:535-6.1"


def test_kubernetes_yaml_has_no_anchors_and_its_cronjob_schedule_is_checked():
    from cudabuild.errors import InputError

    files = kubernetes.files(IMAGES, kmm=False) + kubernetes.files(IMAGES, kmm=True)
    files.append(kubernetes.prebuild_file(registry="registry.example:5000/gpu", drivers="535", schedule="*/30 1-5 * * MON"))
    for f in files:
        text = f.text()
        assert "&id" not in text and "*id" not in text, f.name
        for doc in yaml.safe_load_all(text):
            assert doc
    for bad in ("61 3 * * *", "0 3 * *", "0 3 * * *\nx", "5-1 * * * *", "0 3 * 13 *", "*/0 * * * *"):
        with pytest.raises(InputError, match="--schedule"):
            kubernetes.cron_schedule(bad)

