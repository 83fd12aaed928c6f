"""Amazon ECS: the driver as a daemon service (privileged, the host's root, schedulingStrategy
DAEMON), the node's configuration (the runtime registered as `nvidia`, ECS_ENABLE_GPU_SUPPORT,
nvidia-gpu-info.json from its GPUs), and a workload in two shapes: GPUs by resourceRequirements
(through the runtime), and the seed's hand-written volumes and devices for hosts without it.
Field names: aws/amazon-ecs-agent and botocore's ECS model, which the tests validate against."""

from __future__ import annotations

from cudabuild.deploy import EXAMPLE_IMAGE, DriverImage, File, HostFacts
from cudabuild.host.layout import driver_dir
from cudabuild.errors import InputError

NODE_DRIVER = "/usr/local/nvidia"  # where the seed's shape mounts the driver in the container


def driver_task(image: DriverImage) -> dict:
    family = "cudabuild-driver" if image.every_kernel else f"cudabuild-driver-{image.kernel_release}"
    return {
        "family": family.replace(".", "-").replace("+", "-"),
        "requiresCompatibilities": ["EC2"], "networkMode": "host", "pidMode": "host",
        "volumes": [{"name": "host-root", "host": {"sourcePath": "/"}}],
        "containerDefinitions": [{
            "name": "driver", "image": image.ref, "essential": True, "privileged": True, "memory": 512,
            "command": list(image.args), "mountPoints": [{"sourceVolume": "host-root", "containerPath": "/host"}],
        }],
    }


def driver_service(image: DriverImage, task: dict) -> dict:
    return {"serviceName": task["family"], "taskDefinition": task["family"], "schedulingStrategy": "DAEMON",
            "launchType": "EC2"}


def workload_gpu() -> dict:
    return {"family": "gpu-example", "requiresCompatibilities": ["EC2"],
            "containerDefinitions": [{"name": "gpu-example", "image": EXAMPLE_IMAGE, "essential": True,
                                      "memory": 512, "command": ["nvidia-smi"],
                                      "resourceRequirements": [{"type": "GPU", "value": "1"}]}]}


def workload_seed(host: HostFacts, version: str) -> dict:
    """The seed's shape (nvidia-docker 1.0 by hand): the driver directory as a volume, the nodes as
    devices, the libraries on LD_LIBRARY_PATH; for hosts whose agent has no GPU support."""
    nodes = ["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"] + [f"/dev/nvidia{g.minor}" for g in host.gpus]
    return {"family": "gpu-example-seed", "requiresCompatibilities": ["EC2"],
            "volumes": [{"name": "nvidia-driver", "host": {"sourcePath": f"/{driver_dir(version)}"}}],
            "containerDefinitions": [{
                "name": "gpu-example", "image": EXAMPLE_IMAGE, "essential": True, "memory": 512,
                "command": ["nvidia-smi"],
                "mountPoints": [{"sourceVolume": "nvidia-driver", "containerPath": NODE_DRIVER, "readOnly": True}],
                "environment": [{"name": "LD_LIBRARY_PATH", "value": f"{NODE_DRIVER}/lib"},
                                {"name": "PATH", "value": f"{NODE_DRIVER}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:"
                                                          "/usr/bin:/sbin:/bin"}],
                "linuxParameters": {"devices": [{"hostPath": n, "containerPath": n, "permissions": ["read", "write"]}
                                                for n in nodes]},
            }]}


def files(images: list[DriverImage], host: HostFacts, *, runtime_path: str) -> list[File]:
    version = host.driver_version or next((i.driver_version for i in images if not i.every_kernel), None)
    if version is None:
        raise InputError("the node's driver version names the seed workload's driver directory, and this node "
                         "has no driver loaded", hint="run it on a node after the driver container installed, or "
                                                     "pass --root")
    out = []
    for image in images:
        task = driver_task(image)
        out += [File(f"{task['family']}.task.json", task), File(f"{task['family']}.service.json",
                                                                driver_service(image, task))]
    out += [
        File("ecs.config", "ECS_ENABLE_GPU_SUPPORT=true\n"),
        File("daemon.json", {"runtimes": {"nvidia": {"path": runtime_path}}}),
        File("nvidia-gpu-info.json", {"DriverVersion": version, "GPUIDs": [g.uuid for g in host.gpus]}),
        File("gpu-example.task.json", workload_gpu()),
        File("gpu-example-seed.task.json", workload_seed(host, version)),
    ]
    return out
