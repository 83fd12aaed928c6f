"""Kubernetes: a namespace and one privileged driver DaemonSet for every kernel (the
kernel-agnostic driver image, on every node with an NVIDIA PCI device), or one per kernel (the
GPU Operator's precompiled mode: nodeSelector on Node Feature Discovery's kernel label, the image
of that kernel), readiness from the ready file; or, with --kmm, a KMM Module with a kernelMapping per
kernel (fields checked against KMM's CRD: moduleName is the topmost module, modulesLoadingOrder
lists it and then what it needs)."""

from __future__ import annotations

import re

from cudabuild.deploy import READY_FILE, DriverImage, File

NAMESPACE = "cudabuild"
KERNEL_LABEL = "feature.node.kubernetes.io/kernel-version.full"
NVIDIA_PCI_LABEL = "feature.node.kubernetes.io/pci-10de.present"


def _name(kernel: str) -> str:
    return ("cudabuild-driver-" + re.sub(r"[^a-z0-9-]+", "-", kernel.lower()).strip("-"))[:63]


def label_value(kernel: str) -> str:
    """A release as a label value can hold it (no '+': Node Feature Discovery writes it so too)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", kernel)[:63]


def namespace() -> dict:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}


def daemonset(image: DriverImage) -> dict:
    """A driver DaemonSet: for one kernel (its nodes chosen by Node Feature Discovery's kernel
    label), or, for the kernel-agnostic image, for every node with an NVIDIA PCI device, whatever
    its kernel (the container finds the kernel's build; rolling, since a restart of the driver
    container keeps the driver loaded)."""
    if image.every_kernel:
        labels = {"app.kubernetes.io/name": "cudabuild-driver", "cudabuild.io/kernel": "any"}
        name, selector = "cudabuild-driver", {NVIDIA_PCI_LABEL: "true"}
    else:
        labels = {"app.kubernetes.io/name": "cudabuild-driver",
                  "cudabuild.io/kernel": label_value(image.kernel_release)}
        name, selector = _name(image.kernel_release), {KERNEL_LABEL: label_value(image.kernel_release)}
    probe = {"exec": {"command": ["test", "-f", f"/host{READY_FILE}"]}, "periodSeconds": 10}
    return {
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": labels},
        "spec": {
            "selector": {"matchLabels": labels},
            "updateStrategy": {"type": "OnDelete"},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "nodeSelector": selector,
                    "hostPID": True,
                    "priorityClassName": "system-node-critical",
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                    "containers": [{
                        "name": "driver", "image": image.ref, "args": list(image.args),
                        "securityContext": {"privileged": True},
                        "volumeMounts": [{"name": "host-root", "mountPath": "/host",
                                          "mountPropagation": "HostToContainer"}],
                        "startupProbe": {**probe, "failureThreshold": 60},
                        "readinessProbe": probe,
                    }],
                    "volumes": [{"name": "host-root", "hostPath": {"path": "/", "type": "Directory"}}],
                    "terminationGracePeriodSeconds": 30,
                },
            },
        },
    }


def kmm_module(images: list[DriverImage]) -> dict:
    return {
        "apiVersion": "kmm.sigs.x-k8s.io/v1beta1", "kind": "Module",
        "metadata": {"name": "nvidia", "namespace": NAMESPACE},
        "spec": {
            "selector": {NVIDIA_PCI_LABEL: "true"},
            "moduleLoader": {"container": {
                "modprobe": {"moduleName": "nvidia_drm", "dirName": "/opt", "firmwarePath": "/firmware",
                             "modulesLoadingOrder": _kmm_loading_order()},
                "inTreeModulesToRemove": ["nouveau"],
                "kernelMappings": [{"literal": i.kernel_release, "containerImage": i.ref} for i in images],
            }},
        },
    }


def files(images: list[DriverImage], *, kmm: bool) -> list[File]:
    if kmm:
        return [File("namespace.yaml", namespace()), File("module.yaml", kmm_module(images))]
    return [File("namespace.yaml", namespace())] + [File(f"{daemonset(i)['metadata']['name']}.yaml", daemonset(i))
                                                    for i in images]


def _kmm_loading_order() -> list[str]:
    """KMM's modulesLoadingOrder: the top module first, down to nvidia (the load order reversed,
    in the kernel's names); images/nvidia-devices.conf is where the order is written."""
    from cudabuild.deliver.devices import facts

    return [m.replace("-", "_") for m in reversed(facts().load_order)]


BUILDER_LABEL = "cudabuild.io/builder"  # the node that builds (it has a Docker engine)
FLEET_KERNELS = "cudabuild-fleet-kernels"  # the ConfigMap that lists the fleet's kernels


def prebuild_file(*, registry: str, drivers: str, schedule: str) -> File:
    """A CronJob that runs `cudabuild matrix --kernels-from` the ConfigMap cudabuild-fleet-kernels
    (key `kernels`: the nodes' kernel releases, e.g. from kubectl get nodes), boot-tested, pushed to
    the registry; cells the registry holds are not built again. It runs cudabuild's own image on a
    node labelled cudabuild.io/builder=true, with that node's Docker engine."""
    import cudabuild

    args = ["matrix", "--kernels-from", "/etc/cudabuild/kernels", "--drivers", drivers, "--registry", registry,
            "--boot-test", "--json"]
    pod = {
        "restartPolicy": "Never",
        "nodeSelector": {BUILDER_LABEL: "true"},
        "containers": [{
            "name": "prebuild", "image": f"{registry}/cudabuild:{cudabuild.__version__}", "args": args,
            "volumeMounts": [{"name": "kernels", "mountPath": "/etc/cudabuild"},
                             {"name": "docker", "mountPath": "/var/run/docker.sock"},
                             {"name": "cache", "mountPath": "/var/cache/cudabuild"}],
            "env": [{"name": "CUDABUILD_CACHE", "value": "/var/cache/cudabuild"}],
        }],
        "volumes": [{"name": "kernels", "configMap": {"name": FLEET_KERNELS,
                                                      "items": [{"key": "kernels", "path": "kernels"}]}},
                    {"name": "docker", "hostPath": {"path": "/var/run/docker.sock", "type": "Socket"}},
                    {"name": "cache", "hostPath": {"path": "/var/cache/cudabuild", "type": "DirectoryOrCreate"}}],
    }
    cronjob = {
        "apiVersion": "batch/v1", "kind": "CronJob",
        "metadata": {"name": "cudabuild-prebuild", "namespace": NAMESPACE},
        "spec": {"schedule": schedule, "concurrencyPolicy": "Forbid",
                 "jobTemplate": {"spec": {"backoffLimit": 0, "template": {"spec": pod}}}},
    }
    return File("cudabuild-prebuild.yaml", cronjob)
