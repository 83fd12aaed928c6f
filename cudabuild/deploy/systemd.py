"""systemd units for a host: the node's driver for whatever kernel it runs (and the next kernel
staged), and a build host's prebuild (a service and a timer that build, boot-test and push the fleet's kernels ahead of need).
`systemd-analyze verify` passes on them (the tests run it)."""

from __future__ import annotations

import shlex

from cudabuild.deploy import File

KERNELS_FILE = "/etc/cudabuild/kernels"  # the fleet's kernel releases, one per line (matrix --kernels-from)


def _unit(sections: list[tuple[str, list[tuple[str, str]]]]) -> str:
    lines = []
    for name, entries in sections:
        lines.append(f"[{name}]")
        lines += [f"{key}={value}" for key, value in entries]
        lines.append("")
    return "\n".join(lines)


def node_files(*, cudabuild: str, config) -> list[File]:
    """The node's units. cudabuild-driver.service installs the driver for the running kernel at
    boot (its staged build, else the registry's, else the fallback; cudabuild install --registry),
    before the container engines start, so that they start with the CDI spec written.
    cudabuild-stage.service and .timer stage the next kernel's build, hourly and after boot, so
    that a reboot needs no network; `cudabuild ready --kernel next` then says whether it may."""
    install = [cudabuild, "install", *config.args()]  # config: staging.NodeConfig
    stage = [cudabuild, "stage", "--kernel", "next", *config.args()]
    service = _unit([
        ("Unit", [("Description", "cudabuild: the NVIDIA driver for the running kernel"),
                  ("Wants", "network-online.target"), ("After", "network-online.target"),
                  ("Before", "docker.service containerd.service podman.service")]),
        ("Service", [("Type", "oneshot"), ("RemainAfterExit", "yes"), ("ExecStart", shlex.join(install))]),
        ("Install", [("WantedBy", "multi-user.target")]),
    ])
    staging = _unit([
        ("Unit", [("Description", "cudabuild: stage the next kernel's NVIDIA driver"),
                  ("Wants", "network-online.target"), ("After", "network-online.target cudabuild-driver.service")]),
        ("Service", [("Type", "oneshot"), ("ExecStart", shlex.join(stage)), ("Nice", "10")]),
    ])
    timer = _unit([
        ("Unit", [("Description", "cudabuild: stage the next kernel's NVIDIA driver, hourly")]),
        ("Timer", [("OnBootSec", "5min"), ("OnUnitActiveSec", "1h")]),
        ("Install", [("WantedBy", "timers.target")]),
    ])
    return [File("cudabuild-driver.service", service), File("cudabuild-stage.service", staging),
            File("cudabuild-stage.timer", timer)]


def prebuild_files(*, cudabuild: str, registry: str, drivers: str, schedule: str) -> list[File]:
    """cudabuild-prebuild.service and .timer: `cudabuild matrix --kernels-from KERNELS_FILE` on a
    schedule, boot-tested, pushed to the registry; cells the registry holds are not built again."""
    command = [cudabuild, "matrix", "--kernels-from", KERNELS_FILE, "--drivers", drivers, "--registry", registry,
               "--boot-test", "--json"]
    service = _unit([
        ("Unit", [("Description", "cudabuild: build, boot-test and push the fleet's kernels' NVIDIA modules"),
                  ("Wants", "network-online.target"), ("After", "network-online.target docker.service"),
                  ("ConditionPathExists", KERNELS_FILE)]),
        ("Service", [("Type", "oneshot"), ("ExecStart", shlex.join(command)), ("Nice", "10")]),
    ])
    timer = _unit([
        ("Unit", [("Description", "cudabuild: build the fleet's kernels ahead of need, on a schedule")]),
        ("Timer", [("OnCalendar", schedule), ("Persistent", "true"), ("RandomizedDelaySec", "15min")]),
        ("Install", [("WantedBy", "timers.target")]),
    ])
    return [File("cudabuild-prebuild.service", service), File("cudabuild-prebuild.timer", timer)]
