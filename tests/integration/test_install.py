"""`cudabuild install` on a fake host root with three fake GPUs and the stub insmod (nothing is
loaded), and the CDI spec it writes, checked against CDI's own JSON schema."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from tests.helpers import DRIVER, cdi_validator, fake_host, host_with_artifact, install_modules, make_artifact, run_cli


@pytest.fixture(scope="module")
def validate():
    return cdi_validator()


@pytest.fixture
def host(tmp_path):
    return host_with_artifact(tmp_path, gpus=3)


def install(host, *extra, env_extra=None):
    root, env, art = host
    return install_modules(root, env, art, *extra, env_extra=env_extra)


def char_device(path: Path) -> tuple[int, int]:
    st = path.stat()
    assert stat.S_ISCHR(st.st_mode), path
    return os.major(st.st_rdev), os.minor(st.st_rdev)


def test_install_loads_in_order_makes_nodes_copies_the_driver_and_writes_a_valid_spec(host, validate):
    root, _, _ = host
    result = install(host, "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert (root / "insmod.log").read_text().split() == ["drm", "nvidia", "nvidia_uvm", "nvidia_modeset", "nvidia_drm"]
    assert data["loaded"] == ["nvidia", "nvidia-uvm", "nvidia-modeset", "nvidia-drm"] and data["changed"] is True
    dev = root / "dev"
    assert [char_device(dev / f"nvidia{i}") for i in range(3)] == [(195, 0), (195, 1), (195, 2)]
    assert char_device(dev / "nvidiactl") == (195, 255) and char_device(dev / "nvidia-modeset") == (195, 254)
    assert char_device(dev / "nvidia-uvm") == (510, 0) and char_device(dev / "nvidia-uvm-tools") == (510, 1)
    lib = root / "run/cudabuild/driver" / DRIVER / "lib"
    assert os.readlink(lib / "libcuda.so.1") == f"libcuda.so.{DRIVER}" and (lib / f"libcuda.so.{DRIVER}").is_file()
    assert (root / "run/cudabuild/driver" / DRIVER / "bin/nvidia-smi").is_file()
    spec = json.loads((root / "run/cdi/cudabuild-nvidia.json").read_text())
    validate(spec)
    assert spec["kind"] == "nvidia.com/gpu" and spec["cdiVersion"] == "0.5.0"  # hostPath on device nodes
    names = [d["name"] for d in spec["devices"]]
    assert names == ["0", "GPU-00000000-fake", "1", "GPU-00000001-fake", "2", "GPU-00000002-fake", "all"]
    gpu1 = next(d for d in spec["devices"] if d["name"] == "1")["containerEdits"]["deviceNodes"]
    assert gpu1 == [{"path": "/dev/nvidia1", "type": "c", "major": 195, "minor": 1, "hostPath": f"{root}/dev/nvidia1"}]
    shared = spec["containerEdits"]
    assert {n["path"] for n in shared["deviceNodes"]} == {"/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools",
                                                          "/dev/nvidia-modeset"}
    mounts = {m["containerPath"]: m["hostPath"] for m in shared["mounts"]}
    assert mounts["/usr/lib/x86_64-linux-gnu/libcuda.so.1"] == str(lib / f"libcuda.so.{DRIVER}")
    assert all(m["options"][0] == "ro" for m in shared["mounts"])
    ready = json.loads((root / "run/cudabuild/driver/ready").read_text())
    assert ready["driver_version"] == DRIVER and data["ready"] == f"{root}/run/cudabuild/driver/ready"


def test_a_second_run_changes_nothing_and_says_so(host):
    root, _, _ = host
    assert install(host).returncode == 0
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if not p.is_symlink()}
    again = install(host)
    assert again.returncode == 0, again.stderr
    assert "already installed: nothing changed" in again.stdout and "nothing (already loaded)" in again.stdout
    assert (root / "insmod.log").read_text().split().count("nvidia") == 1, "nothing loaded twice"
    after = {p: p.stat().st_mtime_ns for p in root.rglob("*") if not p.is_symlink()}
    assert after == before, "no file was touched"


@pytest.mark.parametrize("case,code,fragment", [
    ("another kernel", 11, "cudabuild modules --kernel 6.1.0-47-amd64"),
    ("nouveau", 12, "blacklist nouveau"),
    ("another version", 13, "470.256.02"),
    ("no privilege", 10, "CAP_SYS_MODULE"),
])
def test_the_loaders_refusals_hold(host, case, code, fragment):
    root, _, _ = host
    env_extra = {}
    if case == "another kernel":
        env_extra["CUDABUILD_KERNEL_RELEASE"] = "6.1.0-47-amd64"
    elif case == "nouveau":
        (root / "sys/module/nouveau").mkdir(parents=True)
    elif case == "another version":
        (root / "sys/module/nvidia").mkdir(parents=True)
        (root / "sys/module/nvidia/version").write_text("470.256.02\n")
    else:
        (root / "proc/self/status").write_text("CapEff:\t00000000a80425fb\n")
    result = install(host, env_extra=env_extra)
    assert result.returncode == code, result.stderr
    assert fragment in result.stderr and "Traceback" not in result.stderr
    assert not (root / "run/cdi/cudabuild-nvidia.json").exists() and not (root / "run/cudabuild/driver/ready").exists()


def test_an_installed_module_replaced_afterwards_is_put_back_before_it_is_loaded(host):
    """The hostile tester replaced nvidia-uvm.ko in the installed copy; the next install loaded it
    without notice. Now every install checks the copy's digests against the manifest first."""
    import hashlib
    import shutil

    root, _, art = host
    assert install(host).returncode == 0
    installed = root / "run/cudabuild/driver" / DRIVER / "modules" / "nvidia-uvm.ko"
    verified = hashlib.sha256((art / "modules" / "nvidia-uvm.ko").read_bytes()).hexdigest()
    installed.chmod(0o644)
    installed.write_bytes(b"\x7fELF not the module that was verified\n")
    shutil.rmtree(root / "sys/module/nvidia_uvm")  # as if unloaded since
    (root / "insmod.log").unlink()
    result = install(host)
    assert result.returncode == 0, result.stderr
    assert "changed since it was installed (modules/nvidia-uvm.ko)" in result.stderr
    assert hashlib.sha256(installed.read_bytes()).hexdigest() == verified
    assert (root / "insmod.log").read_text().split() == ["nvidia_uvm"]


def test_concurrent_installs_take_turns(host):
    """Ten installs, two at a time, on one host: each ends 0 (three of ten pairs failed before)."""
    import subprocess
    import sys

    root, env, art = host
    exe = Path(sys.executable).parent / "cudabuild"
    for _ in range(5):
        pair = [subprocess.Popen([str(exe), "install", "--modules", str(art), "--root", str(root)],
                                 env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(2)]
        for process in pair:
            _, err = process.communicate(timeout=120)
            assert process.returncode == 0 and "Traceback" not in err, err
    assert json.loads((root / "run/cudabuild/driver/ready").read_text())["driver_version"] == DRIVER


def test_a_compute_only_build_loads_what_it_has_and_its_spec_lists_the_nodes_that_exist(tmp_path, validate):
    """An artifact of --only-modules nvidia,nvidia-uvm: the loader loads nvidia then nvidia-uvm and
    nothing else, makes no modeset node, and the CDI spec lists only the nodes that exist;
    `inspect` says which modules the build left out."""
    root = tmp_path / "host"
    env = fake_host(root, gpus=1)
    art = tmp_path / "artifact"
    make_artifact(art, modules=("nvidia", "nvidia-uvm"))
    result = run_cli("install", "--modules", str(art), "--root", str(root), "--cdi-host-root", str(root), "--json",
                     env=env)
    assert result.returncode == 0, result.stderr
    assert (root / "insmod.log").read_text().split() == ["drm", "nvidia", "nvidia_uvm"]
    assert json.loads(result.stdout)["loaded"] == ["nvidia", "nvidia-uvm"]
    assert not (root / "dev" / "nvidia-modeset").exists()
    spec = json.loads((root / "run/cdi/cudabuild-nvidia.json").read_text())
    validate(spec)
    assert {n["path"] for n in spec["containerEdits"]["deviceNodes"]} == {"/dev/nvidiactl", "/dev/nvidia-uvm",
                                                                          "/dev/nvidia-uvm-tools"}
    shown = run_cli("inspect", str(art), "--json")
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    assert [m["name"] for m in report["modules"]] == ["nvidia", "nvidia-uvm"]
    assert report["modules_left_out"] == ["nvidia-modeset", "nvidia-drm", "nvidia-peermem"]
