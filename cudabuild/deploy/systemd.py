"""systemd units for a host: the node's driver for whatever kernel it runs (and the next kernel
staged), and a build host's prebuild (a service and a timer that build, boot-test and push the fleet's kernels ahead of need).
`systemd-analyze verify` passes on them (the tests run it)."""

from __future__ import annotations

import re
import shutil
import subprocess

from cudabuild.deploy import File
from cudabuild.errors import InputError, shown

KERNELS_FILE = "/etc/cudabuild/kernels"  # the fleet's kernel releases, one per line (matrix --kernels-from)
_PLAIN_WORD = re.compile(r"[A-Za-z0-9_@+=:,./-]+")
_PROGRAM = re.compile(r"/[A-Za-z0-9_@+.,/-]+")


def _unit(sections: list[tuple[str, list[tuple[str, str]]]]) -> str:
    """A unit file; a value with a control character (a newline would start a line of its own,
    `Unit=evil.service`) is refused."""
    lines = []
    for name, entries in sections:
        lines.append(f"[{name}]")
        for key, value in entries:
            if not value.isprintable():
                raise InputError(f"{key}={shown(value)} holds a control character (a newline?), which would write "
                                 "lines of its own into the unit", hint="pass a value on one line")
            lines.append(f"{key}={value}")
        lines.append("")
    return "\n".join(lines)


def command_line(words: list[str]) -> str:
    """An ExecStart= command line as systemd.service(5) reads it: a word with anything but plain
    characters double-quoted (\\ and \" escaped), and every word's % (a specifier) and $ (a
    variable) doubled, so that each reaches the program as written."""
    out = []
    for word in words:
        if not word.isprintable():
            raise InputError(f"{shown(word)} holds a control character and cannot be put into a unit",
                             hint="pass a value on one line")
        text = word.replace("%", "%%").replace("$", "$$")
        if not _PLAIN_WORD.fullmatch(word):
            text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
        out.append(text)
    return " ".join(out)


def program_path(path: str) -> str:
    """--cudabuild-path: an absolute path of plain characters (systemd runs it as the command)."""
    if not _PROGRAM.fullmatch(path) or "/../" in path + "/":
        raise InputError(f"--cudabuild-path {shown(path)} is not an absolute path of plain characters",
                         hint="pass where cudabuild is on the host, e.g. /usr/local/bin/cudabuild")
    return path


def calendar(schedule: str) -> str:
    """--schedule: a systemd calendar event, as `systemd-analyze calendar` reads it."""
    if not schedule.isprintable() or not schedule.strip():
        raise InputError(f"--schedule {shown(schedule)} is not a calendar event on one line",
                         hint="pass e.g. daily, hourly or 'Mon *-*-* 03:00:00' (man systemd.time)")
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if not re.fullmatch(r"[A-Za-z0-9 *:,./~-]+", schedule):
            raise InputError(f"--schedule {shown(schedule)} is not a calendar event",
                             hint="pass e.g. daily, hourly or 'Mon *-*-* 03:00:00' (man systemd.time)")
        return schedule
    checked = subprocess.run([analyze, "calendar", schedule], capture_output=True, text=True)
    if checked.returncode != 0:
        raise InputError(f"--schedule {shown(schedule)} is not a calendar event systemd reads "
                         f"({(checked.stderr.strip().splitlines() or ['invalid'])[-1][:120]})",
                         hint="pass e.g. daily, hourly or 'Mon *-*-* 03:00:00' (man systemd.time)")
    return schedule


def node_files(*, cudabuild: str, config) -> list[File]:
    """The node's units. cudabuild-driver.service installs the driver for the running kernel at
    boot (its staged build, else the registry's, else the fallback; cudabuild install --registry),
    before the container engines start, so that they start with the CDI spec written.
    cudabuild-stage.service and .timer stage the next kernel's build, hourly and after boot, so
    that a reboot needs no network; `cudabuild ready --kernel next` then says whether it may."""
    cudabuild = program_path(cudabuild)
    install = [cudabuild, "install", *config.args()]  # config: staging.NodeConfig
    stage = [cudabuild, "stage", "--kernel", "next", *config.args()]
    service = _unit([
        ("Unit", [("Description", "cudabuild: the NVIDIA driver for the running kernel"),
                  ("Wants", "network-online.target"), ("After", "network-online.target"),
                  ("Before", "docker.service containerd.service podman.service")]),
        ("Service", [("Type", "oneshot"), ("RemainAfterExit", "yes"), ("ExecStart", command_line(install))]),
        ("Install", [("WantedBy", "multi-user.target")]),
    ])
    staging = _unit([
        ("Unit", [("Description", "cudabuild: stage the next kernel's NVIDIA driver"),
                  ("Wants", "network-online.target"), ("After", "network-online.target cudabuild-driver.service")]),
        ("Service", [("Type", "oneshot"), ("ExecStart", command_line(stage)), ("Nice", "10")]),
    ])
    timer = _unit([
        ("Unit", [("Description", "cudabuild: stage the next kernel's NVIDIA driver, hourly")]),
        ("Timer", [("OnBootSec", "5min"), ("OnUnitActiveSec", "1h")]),
        ("Install", [("WantedBy", "timers.target")]),
    ])
    return [File("cudabuild-driver.service", service), File("cudabuild-stage.service", staging),
            File("cudabuild-stage.timer", timer), *cdi_refresh_files(cudabuild=cudabuild)]


CDI_REFRESH = "cudabuild-cdi-refresh.service"
UDEV_RULE = "60-cudabuild-cdi-refresh.rules"  # goes to /etc/udev/rules.d


def cdi_refresh_files(*, cudabuild: str) -> list[File]:
    """A CDI spec that is never stale: cudabuild-cdi-refresh.service rewrites it from the loaded
    driver and GPUs at boot, before the container engines start, and does nothing (exit 0) while no
    driver is loaded, rather than failing the boot (nvidia-container-toolkit #1611); a udev rule
    runs it again whenever one of the driver's modules loads (as nvidia-ctk's nvidia-cdi-refresh
    does), so that a driver loaded after the engines started still gets its spec."""
    cudabuild = program_path(cudabuild)
    service = _unit([
        ("Unit", [("Description", "cudabuild: rewrite the CDI spec of the loaded NVIDIA driver"),
                  ("After", "systemd-modules-load.service cudabuild-driver.service"),
                  ("Before", "docker.service containerd.service podman.service")]),
        ("Service", [("Type", "oneshot"), ("ExecStart", command_line([cudabuild, "cdi", "generate", "--if-loaded"]))]),
        ("Install", [("WantedBy", "multi-user.target")]),
    ])
    rule = (f"# {UDEV_RULE}: put in /etc/udev/rules.d (cudabuild deploy systemd). When one of the NVIDIA\n"
            "# driver's modules loads, rewrite its CDI spec (the GPUs, nvidia-uvm's device number, nvidia-modeset).\n"
            'ACTION=="add", SUBSYSTEM=="module", KERNEL=="nvidia|nvidia_uvm|nvidia_modeset", '
            f'RUN+="/usr/bin/systemctl --no-block start {CDI_REFRESH}"\n')
    return [File(CDI_REFRESH, service), File(UDEV_RULE, rule)]


def prebuild_files(*, cudabuild: str, registry: str, drivers: str, schedule: str) -> list[File]:
    """cudabuild-prebuild.service and .timer: `cudabuild matrix --kernels-from KERNELS_FILE` on a
    schedule, boot-tested, pushed to the registry; cells the registry holds are not built again."""
    cudabuild, schedule = program_path(cudabuild), calendar(schedule)
    command = [cudabuild, "matrix", "--kernels-from", KERNELS_FILE, "--drivers", drivers, "--registry", registry,
               "--boot-test", "--json"]
    service = _unit([
        ("Unit", [("Description", "cudabuild: build, boot-test and push the fleet's kernels' NVIDIA modules"),
                  ("Wants", "network-online.target"), ("After", "network-online.target docker.service"),
                  ("ConditionPathExists", KERNELS_FILE)]),
        ("Service", [("Type", "oneshot"), ("ExecStart", command_line(command)), ("Nice", "10")]),
    ])
    timer = _unit([
        ("Unit", [("Description", "cudabuild: build the fleet's kernels ahead of need, on a schedule")]),
        ("Timer", [("OnCalendar", schedule), ("Persistent", "true"), ("RandomizedDelaySec", "15min")]),
        ("Install", [("WantedBy", "timers.target")]),
    ])
    return [File("cudabuild-prebuild.service", service), File("cudabuild-prebuild.timer", timer)]
