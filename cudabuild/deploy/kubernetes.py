"""Kubernetes: a namespace and one privileged driver DaemonSet per kernel (the GPU Operator's
precompiled mode: nodeSelector on Node Feature Discovery's kernel label, the image of that
kernel), readiness from the ready file; or, with --kmm, a KMM Module with a kernelMapping per
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
    labels = {"app.kubernetes.io/name": "cudabuild-driver", "cudabuild.io/kernel": label_value(image.kernel_release)}
    probe = {"exec": {"command": ["test", "-f", f"/host{READY_FILE}"]}, "periodSeconds": 10}
    return {
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": _name(image.kernel_release), "namespace": NAMESPACE, "labels": labels},
        "spec": {
            "selector": {"matchLabels": labels},
            "updateStrategy": {"type": "OnDelete"},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "nodeSelector": {KERNEL_LABEL: label_value(image.kernel_release)},
                    "hostPID": True,
                    "priorityClassName": "system-node-critical",
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                    "containers": [{
                        "name": "driver", "image": image.ref, "args": ["--wait"],
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
