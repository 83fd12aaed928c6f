"""Driver upgrades on a running host (a fake host root, the stub insmod and rmmod that imitate the
kernel): who holds the GPU, refusing, draining a real container on the engine, rolling back, the
CDI spec that is never stale or half-written, and uninstall.

The fake proc/ holds two processes: one is a real container's (its real pid, its id in its cgroup
file, an fd link to /dev/nvidia0; its entry goes when the real process ends, as the kernel's
does), the other is in no container and maps libcuda."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from cudabuild.host.holders import POD_NAME, POD_NAMESPACE
from tests.helpers import DRIVER, cdi_validator, fake_host, make_artifact, run_cli, start_cli, wait_for_line

NEW = "550.127.05"
OUTSIDE_PID = 4242


@pytest.fixture(scope="module")
def validate():
    return cdi_validator()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    where = tmp_path_factory.mktemp("artifacts")
    make_artifact(where / DRIVER)
    make_artifact(where / NEW, driver=NEW)
    return {DRIVER: where / DRIVER, NEW: where / NEW}


@pytest.fixture
def host(tmp_path, artifacts):
    """A host with the 535 driver installed by cudabuild and loaded (the stub), three GPUs."""
    root = tmp_path / "host"
    env = fake_host(root, gpus=3)
    done = cli(root, env, "install", "--modules", str(artifacts[DRIVER]))
    assert done.returncode == 0, done.stderr
    (root / "insmod.log").unlink()
    return root, env


def cli(root: Path, env: dict, *args: str, **more):
    return run_cli(*args, "--root", str(root), *(["--cdi-host-root", str(root)] if args[0] in ("install", "uninstall")
                                                 or args[:2] == ("cdi", "generate") else []),
                   env={**env, **{k: str(v) for k, v in more.items()}})


def log(root: Path) -> list[str]:
    path = root / "insmod.log"
    return path.read_text().split() if path.exists() else []


def fake_process(root: Path, pid: int, *, comm: str, cgroup: str, fds=(), maps=()) -> Path:
    """ROOT/proc/PID as the kernel shows a process: comm, cgroup, fd links, maps lines."""
    place = root / "proc" / str(pid)
    (place / "fd").mkdir(parents=True)
    (place / "comm").write_text(comm + "\n")
    (place / "cgroup").write_text(cgroup + "\n")
    for number, target in enumerate(fds, 3):
        (place / "fd" / str(number)).symlink_to(target)
    (place / "maps").write_text("".join(f"7f{i:010x}000-7f{i:010x}fff r-xp 00000000 08:01 {1000 + i} {path}\n"
                                        for i, path in enumerate(maps)))
    return place


def follow(real_pid: int, fake: Path) -> threading.Thread:
    """Remove the fake entry when the real process ends (the kernel removes /proc/PID then)."""
    def watch():
        while os.path.exists(f"/proc/{real_pid}"):
            time.sleep(0.05)
        shutil.rmtree(fake, ignore_errors=True)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def holding_container(docker_client, host):
    """A real running container whose process holds /dev/nvidia0 in the fake proc/."""
    root, _ = host
    container = docker_client.containers.run("debian:bookworm", ["sleep", "600"], detach=True, network_mode="none",
                                             name=f"cudabuild-test-gpu-user-{os.getpid()}-{time.monotonic_ns()}",
                                             labels={POD_NAME: "trainer-0", POD_NAMESPACE: "ml"})  # as the kubelet
    try:
        container.reload()
        pid = container.attrs["State"]["Pid"]
        fake = fake_process(root, pid, comm="sleep", cgroup=f"0::/system.slice/docker-{container.id}.scope",
                            fds=["/dev/nvidia0", "/dev/nvidiactl"])
        follow(pid, fake)
        yield container
    finally:
        container.remove(force=True)


def outside_holder(root: Path) -> Path:
    return fake_process(root, OUTSIDE_PID, comm="python3", cgroup="0::/user.slice/user-0.slice/session-1.scope",
                        maps=[f"/usr/lib/x86_64-linux-gnu/libcuda.so.{DRIVER}", "/usr/lib/x86_64-linux-gnu/libc.so.6"])


def test_holders_lists_a_containers_process_by_its_name_and_one_outside_any_container(host, holding_container):
    root, env = host
    outside_holder(root)
    result = cli(root, env, "holders", "--json")
    assert result.returncode == 0, result.stderr
    found = {h["pid"]: h for h in json.loads(result.stdout)}
    pid = holding_container.attrs["State"]["Pid"]
    assert set(found) == {pid, OUTSIDE_PID}
    assert found[pid]["container_id"] == holding_container.id and found[pid]["container"] == holding_container.name
    assert (found[pid]["pod"], found[pid]["namespace"]) == ("trainer-0", "ml")
    assert found[pid]["holds"] == ["/dev/nvidia0", "/dev/nvidiactl"] and found[pid]["command"] == "sleep"
    assert found[OUTSIDE_PID]["container_id"] is None
    assert found[OUTSIDE_PID]["holds"] == [f"/usr/lib/x86_64-linux-gnu/libcuda.so.{DRIVER}"]  # not libc
    table = cli(root, env, "holders")
    assert f"{holding_container.name} (ml/trainer-0)" in table.stdout and "python3" in table.stdout


def test_an_upgrade_is_refused_while_held_then_drains_the_container_swaps_and_starts_it_again(
        host, holding_container, artifacts, validate):
    root, env = host
    outside = outside_holder(root)
    spec_before = (root / "run/cdi/cudabuild-nvidia.json").read_bytes()
    refused = cli(root, env, "install", "--modules", str(artifacts[NEW]), "--drain")
    assert refused.returncode == 24, refused.stderr
    assert holding_container.name in refused.stderr and f"pid {OUTSIDE_PID} (python3), not in a container" \
        in refused.stderr and "--drain stops only containers the engine runs" in refused.stderr
    assert log(root) == [] and (root / "run/cdi/cudabuild-nvidia.json").read_bytes() == spec_before
    assert not (root / f"run/cudabuild/driver/{NEW}").exists(), "nothing copied for a refused upgrade"
    plain = cli(root, env, "install", "--modules", str(artifacts[NEW]))
    assert plain.returncode == 24 and "pass --drain" not in plain.stderr  # a holder outside: --drain would not do
    shutil.rmtree(outside)
    started_before = holding_container.attrs["State"]["StartedAt"]

    done = cli(root, env, "install", "--modules", str(artifacts[NEW]), "--drain", "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["upgraded_from"] == DRIVER and data["drained"] == [holding_container.name]
    assert log(root) == ["-nvidia_drm", "-nvidia_modeset", "-nvidia_uvm", "-nvidia",
                         "nvidia", "nvidia_uvm", "nvidia_modeset", "nvidia_drm"]
    assert (root / "sys/module/nvidia/version").read_text().strip() == NEW
    holding_container.reload()
    state = holding_container.attrs["State"]
    assert state["Running"] and state["StartedAt"] != started_before, "stopped for real and started again"
    spec = json.loads((root / "run/cdi/cudabuild-nvidia.json").read_text())
    validate(spec)
    assert f"NVIDIA_DRIVER_VERSION={NEW}" in spec["containerEdits"]["env"]
    assert all(NEW in m["hostPath"] for m in spec["containerEdits"]["mounts"])
    assert json.loads((root / "run/cudabuild/driver/ready").read_text())["driver_version"] == NEW
    assert not (root / f"run/cudabuild/driver/{DRIVER}").exists()
    assert cli(root, env, "cdi", "generate", "--check").returncode == 0


def test_a_new_driver_that_does_not_load_is_rolled_back_to_the_old_one(host, artifacts):
    root, env = host
    spec_before = (root / "run/cdi/cudabuild-nvidia.json").read_bytes()
    ready_before = (root / "run/cudabuild/driver/ready").read_bytes()
    failed = cli(root, env, "install", "--modules", str(artifacts[NEW]), FAKE_FAIL_VERSION=NEW)
    assert failed.returncode == 25, failed.stderr
    assert f"NVIDIA {NEW} did not load" in failed.stderr and f"rolled back: NVIDIA {DRIVER} is loaded again" \
        in failed.stderr
    assert log(root) == ["-nvidia_drm", "-nvidia_modeset", "-nvidia_uvm", "-nvidia",  # the old one out
                         "nvidia", "nvidia_uvm",  # the new one: nvidia-uvm refused
                         "-nvidia",  # what loaded of it out again
                         "nvidia", "nvidia_uvm", "nvidia_modeset", "nvidia_drm"]  # the old one back
    assert (root / "sys/module/nvidia/version").read_text().strip() == DRIVER
    assert (root / "run/cdi/cudabuild-nvidia.json").read_bytes() == spec_before
    assert (root / "run/cudabuild/driver/ready").read_bytes() == ready_before
    assert not (root / f"run/cudabuild/driver/{NEW}").exists() and (root / f"run/cudabuild/driver/{DRIVER}").is_dir()
    assert cli(root, env, "cdi", "generate", "--check").returncode == 0


def test_a_kernel_module_that_uses_nvidia_refuses_the_upgrade_before_anything_is_unloaded(host, artifacts):
    """No process holds the GPU, but another module uses nvidia (GPUDirect Storage's nvidia_fs)."""
    root, env = host
    (root / "sys/module/nvidia/holders/nvidia_fs").touch()
    refused = cli(root, env, "install", "--modules", str(artifacts[NEW]))
    assert refused.returncode == 24, refused.stderr
    assert "the kernel module nvidia_fs uses nvidia" in refused.stderr and "rmmod nvidia_fs" in refused.stderr
    assert log(root) == [] and not (root / f"run/cudabuild/driver/{NEW}").exists()


def test_a_substitute_insmod_without_a_substitute_rmmod_refuses_before_anything_changes(host, artifacts, tmp_path):
    """The seams come in pairs: with CUDABUILD_INSMOD set and CUDABUILD_RMMOD not, an upgrade or an
    uninstall would have this machine's rmmod unload what the substitute loaded. The `rmmod` found
    on PATH here is a recorder: it must never run."""
    root, env = host
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "rmmod").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/rmmod-called\n")
    (bin_dir / "rmmod").chmod(0o755)
    half = {k: v for k, v in env.items() if k != "CUDABUILD_RMMOD"}
    half["PATH"] = f"{bin_dir}:{os.environ['PATH']}"
    spec = (root / "run/cdi/cudabuild-nvidia.json").read_bytes()
    for args in (("install", "--modules", str(artifacts[NEW])), ("uninstall",)):
        refused = cli(root, half, *args)
        assert refused.returncode == 3, refused.stderr
        assert "CUDABUILD_INSMOD is set and CUDABUILD_RMMOD is not" in refused.stderr
    assert not (tmp_path / "rmmod-called").exists() and log(root) == []
    assert (root / "run/cdi/cudabuild-nvidia.json").read_bytes() == spec
    assert not (root / f"run/cudabuild/driver/{NEW}").exists() and (root / "sys/module/nvidia").exists()


def test_an_old_driver_the_kernel_will_not_unload_stays_loaded_whole(host, artifacts):
    """The kernel refuses nvidia half-way through the unloading (busy: a holder came meanwhile):
    what was unloaded is loaded again, and nothing changed."""
    root, env = host
    spec_before = (root / "run/cdi/cudabuild-nvidia.json").read_bytes()
    failed = cli(root, env, "install", "--modules", str(artifacts[NEW]), FAKE_RMMOD_FAIL="nvidia")
    assert failed.returncode == 25, failed.stderr
    assert "unloading nvidia failed: rmmod: ERROR: could not remove module nvidia: Device or resource busy" \
        in failed.stderr and f"NVIDIA {DRIVER} is loaded again and nothing changed" in failed.stderr
    assert log(root) == ["-nvidia_drm", "-nvidia_modeset", "-nvidia_uvm", "-nvidia",  # nvidia refused
                         "nvidia_uvm", "nvidia_modeset", "nvidia_drm"]  # the rest of the old one back
    assert (root / "sys/module/nvidia_uvm/version").read_text().strip() == DRIVER
    assert (root / "run/cdi/cudabuild-nvidia.json").read_bytes() == spec_before
    assert (root / "run/cudabuild/driver/ready").exists()
    assert not (root / f"run/cudabuild/driver/{NEW}").exists()


def test_check_fails_when_a_gpu_is_gone_and_passes_once_the_spec_is_rewritten(host):
    root, env = host
    assert cli(root, env, "cdi", "generate", "--check").returncode == 0
    shutil.rmtree(root / "proc/driver/nvidia/gpus/0000:03:00.0")
    stale = cli(root, env, "cdi", "generate", "--check", "--json")
    assert stale.returncode == 26, stale.stderr
    assert json.loads(stale.stdout)["differences"] == ["GPU GPU-00000002-fake is in the spec but gone"]
    assert "GPU-00000002-fake is in the spec but gone" in stale.stderr and "cudabuild cdi generate" in stale.stderr
    assert cli(root, env, "cdi", "generate").returncode == 0
    assert cli(root, env, "cdi", "generate", "--check").returncode == 0
    # a library the spec mounts is gone: stale too
    (root / f"run/cudabuild/driver/{DRIVER}/lib/libcuda.so.{DRIVER}").unlink()
    gone = cli(root, env, "cdi", "generate", "--check")
    assert gone.returncode == 26 and f"libcuda.so.{DRIVER} (mounted at" in gone.stderr


def test_a_spec_is_never_seen_half_written(host):
    """A reader in a loop while the spec is rewritten 300 times, alternating between 3 GPUs and 2:
    every read is a whole spec of one or the other."""
    from cudabuild.cdi import spec as cdi
    from cudabuild.host.root import HostRoot

    root, _ = host
    spec_path = root / "run/cdi/cudabuild-nvidia.json"
    gpu = root / "proc/driver/nvidia/gpus/0000:03:00.0"
    info = (gpu / "information").read_text()
    specs = []
    for present in (True, False):
        if not present:
            shutil.rmtree(gpu)
        specs.append(cdi.encode(cdi.for_loaded(HostRoot(root), host_root=str(root))))
    assert len(specs[0]) != len(specs[1])
    seen, bad, stop = {0: 0, 1: 0}, [], threading.Event()

    def reader():
        while not stop.is_set():
            data = spec_path.read_bytes()
            if data in specs:
                seen[specs.index(data)] += 1
            else:
                bad.append(data[:200])

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(300):
            if i % 2:
                shutil.rmtree(gpu, ignore_errors=True)
            else:
                gpu.mkdir(exist_ok=True)
                (gpu / "information").write_text(info)
            cdi.write(cdi.for_loaded(HostRoot(root), host_root=str(root)), HostRoot(root))
    finally:
        stop.set()
        thread.join()
    assert bad == [] and seen[0] > 0 and seen[1] > 0, (len(bad), seen)
    assert not [p for p in spec_path.parent.iterdir() if p != spec_path], "no temporary file left"


def test_uninstall_is_refused_while_held_and_removes_everything_in_order_when_not(host):
    root, env = host
    holder = outside_holder(root)
    refused = cli(root, env, "uninstall")
    assert refused.returncode == 24 and f"pid {OUTSIDE_PID} (python3)" in refused.stderr
    assert log(root) == [] and (root / "run/cdi/cudabuild-nvidia.json").exists()
    shutil.rmtree(holder)
    done = cli(root, env, "uninstall", "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert log(root) == ["-nvidia_drm", "-nvidia_modeset", "-nvidia_uvm", "-nvidia"]
    removed = [str(Path(p).relative_to(root)) for p in data["removed"]]
    assert removed[0] == "run/cdi/cudabuild-nvidia.json" and removed[-2:] == [f"run/cudabuild/driver/{DRIVER}",
                                                                              "run/cudabuild/driver/ready"]
    assert sorted(removed[1:-2]) == ["dev/nvidia-modeset", "dev/nvidia-uvm", "dev/nvidia-uvm-tools", "dev/nvidia0",
                                     "dev/nvidia1", "dev/nvidia2", "dev/nvidiactl"]
    assert not (root / "sys/module/nvidia").exists() and not list((root / "dev").iterdir())
    assert not (root / "run/cdi/cudabuild-nvidia.json").exists() and not (root / "run/cudabuild/driver/ready").exists()
    assert cli(root, env, "cdi", "generate", "--check").returncode == 0  # no driver, no spec: nothing stale
    again = cli(root, env, "uninstall")
    assert again.returncode == 0 and "no NVIDIA driver was loaded" in again.stdout


def test_with_no_driver_loaded_the_refresh_unit_does_nothing_and_succeeds(tmp_path):
    root = tmp_path / "host"
    env = fake_host(root)
    result = cli(root, env, "cdi", "generate", "--if-loaded")
    assert result.returncode == 0 and "nothing to do" in result.stderr
    assert not (root / "run/cdi").exists()
    assert cli(root, env, "cdi", "generate").returncode == 3  # without --if-loaded: no driver is an error


def test_the_driver_container_rewrites_a_stale_spec_and_on_stop_leaves_the_driver_and_a_valid_spec(host, artifacts):
    root, env = host
    proc = start_cli("install", "--modules", str(artifacts[DRIVER]), "--root", str(root), "--cdi-host-root",
                     str(root), "--wait", "--cdi-interval", "1", env=env)
    try:
        wait_for_line(proc, "waiting until stopped", timeout=60)
        shutil.rmtree(root / "proc/driver/nvidia/gpus/0000:02:00.0")
        wait_for_line(proc, "the CDI spec was stale (GPU GPU-00000001-fake is in the spec but gone): rewritten",
                      timeout=30)
        assert cli(root, env, "cdi", "generate", "--check").returncode == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert (root / "sys/module/nvidia").is_dir() and not (root / "run/cudabuild/driver/ready").exists()
    assert cli(root, env, "cdi", "generate", "--check").returncode == 0


def test_drain_never_stops_a_container_for_a_process_outside_it(host, holding_container, artifacts):
    """A process in a user's session scope whose name is a running container's id (64 hex): not a
    container's process, so --drain refuses and the unrelated container keeps running."""
    root, env = host
    shutil.rmtree(root / "proc" / str(holding_container.attrs["State"]["Pid"]))
    fake_process(root, OUTSIDE_PID, comm="python3", cgroup=f"0::/user.slice/user-0.slice/{holding_container.id}.scope",
                 fds=["/dev/nvidia0"])
    started = holding_container.attrs["State"]["StartedAt"]
    refused = cli(root, env, "install", "--modules", str(artifacts[NEW]), "--drain")
    assert refused.returncode == 24, refused.stderr
    assert f"pid {OUTSIDE_PID} (python3), not in a container" in refused.stderr
    holding_container.reload()
    assert holding_container.status == "running" and holding_container.attrs["State"]["StartedAt"] == started
    assert log(root) == [], "nothing unloaded"
