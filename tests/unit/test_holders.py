"""Reading who holds the GPU from a proc tree: the container id in each engine's cgroup paths,
device nodes and driver libraries among a process's files and maps (and nothing else)."""

from __future__ import annotations

import pytest

from cudabuild.host import holders
from cudabuild.host.root import HostRoot

ID = "3f4e" + "a" * 60


@pytest.mark.parametrize("cgroup", [
    f"0::/system.slice/docker-{ID}.scope",  # Docker, systemd driver, cgroup v2
    f"12:memory:/docker/{ID}\n11:cpu,cpuacct:/docker/{ID}",  # Docker, cgroupfs driver, cgroup v1
    f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1234_5678.slice/cri-containerd-{ID}.scope",
    f"0::/kubepods/besteffort/pod0b1c2d3e-1111-2222-3333-444455556666/{ID}",  # kubelet, cgroupfs
    f"0::/machine.slice/libpod-{ID}.scope/container",  # Podman
])
def test_the_container_id_is_read_from_every_engines_cgroup_path(tmp_path, cgroup):
    place = tmp_path / "proc/77"
    (place / "fd").mkdir(parents=True)
    (place / "fd/5").symlink_to("/dev/nvidia-uvm")
    (place / "cgroup").write_text(cgroup + "\n")
    (place / "comm").write_text("python3\n")
    [found] = holders.scan(HostRoot(tmp_path))
    assert found.container_id == ID and found.holds == ("/dev/nvidia-uvm",) and found.command == "python3"


def test_a_process_outside_containers_and_one_that_holds_nothing(tmp_path):
    for pid, target in (("10", "/dev/nvidiactl"), ("11", "/dev/null"), ("12", "/dev/nvidia-caps/nvidia-cap1")):
        (tmp_path / "proc" / pid / "fd").mkdir(parents=True)
        (tmp_path / "proc" / pid / "fd/0").symlink_to(target)
        (tmp_path / "proc" / pid / "cgroup").write_text("0::/user.slice/user-1000.slice/session-2.scope\n")
    (tmp_path / "proc/self").mkdir()
    found = holders.scan(HostRoot(tmp_path))
    assert [(h.pid, h.holds, h.container_id) for h in found] == [(10, ("/dev/nvidiactl",), None),
                                                                 (12, ("/dev/nvidia-caps/nvidia-cap1",), None)]


@pytest.mark.parametrize("path,held", [
    ("/usr/lib/x86_64-linux-gnu/libcuda.so.535.309.01", True),
    ("/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.535.309.01 (deleted)", True),  # replaced under a running process
    ("/usr/lib/x86_64-linux-gnu/libEGL_nvidia.so.0", True),
    ("/dev/nvidia0", True),
    ("/dev/nvidia255x", False),
    ("/usr/lib/x86_64-linux-gnu/libcudart.so.12", False),  # the CUDA runtime is the application's, not the driver
    ("/usr/lib/x86_64-linux-gnu/libc.so.6", False),
    ("[heap]", False),
])
def test_driver_libraries_and_device_nodes_are_told_from_other_files(path, held):
    assert (holders.held_path(path) is not None) is held


def holder(tmp_path, pid: str, *, cgroup: str = "0::/\n", target: str = "/dev/nvidia0"):
    place = tmp_path / "proc" / pid
    (place / "fd").mkdir(parents=True)
    (place / "fd/3").symlink_to(target)
    (place / "cgroup").write_text(cgroup)
    (place / "comm").write_text("app\n")
    return place


def test_a_64_hex_name_in_a_users_session_is_not_a_container(tmp_path):
    holder(tmp_path, "20", cgroup=f"0::/user.slice/user-1000.slice/user@1000.service/app.slice/{ID}.scope\n")
    holder(tmp_path, "21", cgroup=f"0::/system.slice/{ID}.service\n")
    assert [(h.pid, h.container_id) for h in holders.scan(HostRoot(tmp_path))] == [(20, None), (21, None)]


def test_links_fifos_and_odd_names_under_proc_are_never_followed_read_or_crashed_on(tmp_path):
    import os
    import threading

    outside = tmp_path / "outside"
    (outside / "fd").mkdir(parents=True)
    (outside / "fd/3").symlink_to("/dev/nvidia0")
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/30").symlink_to(outside)  # a pid entry that leads out of the root
    fifo = holder(tmp_path, "31")
    os.mkfifo(fifo / "maps")  # reading it would block forever
    holder(tmp_path, "²")  # a digit to str.isdigit, not a pid
    found: list = []
    reader = threading.Thread(target=lambda: found.extend(holders.scan(HostRoot(tmp_path))), daemon=True)
    reader.start()
    reader.join(10)
    assert not reader.is_alive(), "scan hung on a FIFO"
    assert [h.pid for h in found] == [31]


def test_escape_sequences_in_names_and_paths_reach_no_terminal(tmp_path):
    place = holder(tmp_path, "40", target="/tmp/\x1b[2J\n/libcuda.so.1")
    (place / "comm").write_text("evil\x1b]0;x\x07\n")
    [found] = holders.scan(HostRoot(tmp_path))
    said = holders.Held([found]).lines()
    assert "\x1b" not in said and "\n" not in said and "\\x1b" in said
