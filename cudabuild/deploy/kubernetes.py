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
    from cudabuild.host.devices import facts

    return [m.replace("-", "_") for m in reversed(facts().load_order)]


BUILDER_LABEL = "cudabuild.io/builder"  # the node that builds (it has a Docker engine)
FLEET_KERNELS = "cudabuild-fleet-kernels"  # the ConfigMap that lists the fleet's kernels


# A CronJob's schedule (Kubernetes' cron syntax): five fields, or one of its macros.
_CRON_MACROS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
_CRON_FIELDS = (("minute", 0, 59, ()), ("hour", 0, 23, ()), ("day of month", 1, 31, ()),
                ("month", 1, 12, ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")),
                ("day of week", 0, 7, ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")))


def cron_schedule(schedule: str) -> str:
    """--schedule of the CronJob, checked as Kubernetes reads it (InputError naming the field)."""
    from cudabuild.errors import InputError, shown

    hint = "pass five fields (minute hour day-of-month month day-of-week), e.g. '0 3 * * *', or @daily"
    if schedule.strip() in _CRON_MACROS:
        return schedule.strip()
    fields = schedule.split()
    if not schedule.isprintable() or len(fields) != 5:
        raise InputError(f"--schedule {shown(schedule)} is not a cron schedule of five fields", hint=hint)
    for text, (what, low, high, names) in zip(fields, _CRON_FIELDS):
        def value(word: str) -> int:
            if word.upper() in names:
                return names.index(word.upper()) + (1 if what == "month" else 0)
            if not word.isascii() or not word.isdigit() or not low <= int(word) <= high:
                raise InputError(f"--schedule {shown(schedule)}: the {what} {shown(word)} is not {low}-{high}",
                                 hint=hint)
            return int(word)

        for item in text.split(","):
            base, _, step = item.partition("/")
            if step and (not step.isascii() or not step.isdigit() or int(step) == 0):
                raise InputError(f"--schedule {shown(schedule)}: the {what} step {shown(step)} is not a number",
                                 hint=hint)
            if base in ("*", "?"):
                continue
            start, _, end = base.partition("-")
            if value(start) > (value(end) if end else high):
                raise InputError(f"--schedule {shown(schedule)}: the {what} range {shown(base)} runs backwards",
                                 hint=hint)
    return schedule


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
        "spec": {"schedule": cron_schedule(schedule), "concurrencyPolicy": "Forbid",
                 "jobTemplate": {"spec": {"backoffLimit": 0, "template": {"spec": pod}}}},
    }
    return File("cudabuild-prebuild.yaml", cronjob)
