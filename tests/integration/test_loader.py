"""The loader, run with sh against a fake root and a stub insmod that imitates the kernel.
Nothing here loads a real module."""

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.helpers import REPO

LOADER = REPO / "images" / "loader.sh"
RELEASE = "6.1.0-56-amd64"
VERSION = "535.309.01"
ALL_CAPS = "000001ffffffffff"
NO_SYS_MODULE = "00000000a80425fb"  # docker's default set: no CAP_SYS_MODULE (bit 16)

STUB_INSMOD = r"""#!/bin/sh
# Imitates the kernel loading a module: sysfs entry, its version (the module's own modinfo, as the
# kernel reads it; FAKE_VERSION for a module without one), the modules it uses list it among their
# holders, /proc/devices, GPU entries.
set -eu
ko=$1
name=$(basename "$ko" .ko | tr - _)
echo "$name" >> "$FAKE_ROOT/insmod.log"
[ "${FAKE_FAIL:-}" = "$name" ] && { echo "insmod: ERROR: could not insert module $ko: Invalid argument" >&2; exit 1; }
version=$(LC_ALL=C grep -a -z -m1 '^version=' "$ko" 2>/dev/null | tr -d '\000' | sed 's/^version=//')
# FAKE_FAIL_VERSION=V: nvidia-uvm of version V does not load (its nvidia.ko has loaded by then)
[ -z "${FAKE_FAIL_VERSION:-}" ] || [ "$FAKE_FAIL_VERSION" != "$version" ] || [ "$name" != nvidia_uvm ] || {
    echo "insmod: ERROR: could not insert module $ko: Unknown symbol in module" >&2; exit 1; }
mkdir -p "$FAKE_ROOT/sys/module/$name/holders"
echo "${version:-$FAKE_VERSION}" > "$FAKE_ROOT/sys/module/$name/version"
case "$name" in
    nvidia_uvm|nvidia_modeset|nvidia_peermem) uses=nvidia ;;
    nvidia_drm) uses=nvidia_modeset ;;
    *) uses="" ;;
esac
if [ -n "$uses" ] && [ -d "$FAKE_ROOT/sys/module/$uses" ]; then
    mkdir -p "$FAKE_ROOT/sys/module/$uses/holders"
    : > "$FAKE_ROOT/sys/module/$uses/holders/$name"
fi
case "$name" in
    nvidia)
        echo "195 nvidia" >> "$FAKE_ROOT/proc/devices"
        i=0
        while [ "$i" -lt "$FAKE_GPUS" ]; do
            d="$FAKE_ROOT/proc/driver/nvidia/gpus/0000:0$((i + 1)):00.0"
            mkdir -p "$d"
            printf 'Model: \t\t NVIDIA H100\nDevice Minor: \t %s\nGPU UUID: \t GPU-0000000%s-fake\n' "$i" "$i" > "$d/information"
            i=$((i + 1))
        done ;;
    nvidia_uvm) echo "510 nvidia-uvm" >> "$FAKE_ROOT/proc/devices" ;;
esac
"""
# Imitates the kernel unloading a module: refused while other modules use it, or (nvidia) while a
# process has one of its device nodes open (a fake fd link under FAKE_ROOT/proc); else its sysfs
# entry, holder entries and /proc lines go. Each module asked for is logged as "-NAME".
# FAKE_RMMOD_FAIL=NAME: the kernel refuses that one (busy: a holder that appeared meanwhile).
STUB_RMMOD = r"""#!/bin/sh
set -eu
name=$(echo "$1" | tr - _)
echo "-$name" >> "$FAKE_ROOT/insmod.log"
[ -d "$FAKE_ROOT/sys/module/$name" ] || { echo "rmmod: ERROR: Module $name is not currently loaded" >&2; exit 1; }
[ "${FAKE_RMMOD_FAIL:-}" != "$name" ] || { echo "rmmod: ERROR: could not remove module $name: Device or resource busy" >&2; exit 1; }
if [ -n "$(ls "$FAKE_ROOT/sys/module/$name/holders" 2>/dev/null)" ]; then
    echo "rmmod: ERROR: Module $name is in use by: $(ls "$FAKE_ROOT/sys/module/$name/holders" | tr '\n' ' ')" >&2; exit 1
fi
if [ "$name" = nvidia ]; then
    for fd in "$FAKE_ROOT"/proc/[0-9]*/fd/*; do
        case "$(readlink "$fd" 2>/dev/null)" in /dev/nvidia*) echo "rmmod: ERROR: Module nvidia is in use" >&2; exit 1 ;; esac
    done
fi
rm -rf "$FAKE_ROOT/sys/module/$name"
rm -f "$FAKE_ROOT"/sys/module/*/holders/"$name"
case "$name" in
    nvidia) sed -i '/ nvidia$/d' "$FAKE_ROOT/proc/devices"; rm -rf "$FAKE_ROOT"/proc/driver/nvidia/gpus/* ;;
    nvidia_uvm) sed -i '/ nvidia-uvm$/d' "$FAKE_ROOT/proc/devices" ;;
esac
"""


@pytest.fixture
def fake(tmp_path):
    """A fake root and the image's /opt/cudabuild, for N GPUs."""
    root = tmp_path / "root"
    for d in ("proc/self", "proc/driver/nvidia/gpus", "sys/module/firmware_class/parameters", "dev"):
        (root / d).mkdir(parents=True)
    (root / "proc/self/status").write_text(f"Name:\tsh\nCapEff:\t{ALL_CAPS}\n")
    (root / "proc/devices").write_text("Character devices:\n  1 mem\n")
    (root / "sys/module/firmware_class/parameters/path").write_text("\n")
    home = tmp_path / "opt"
    (home / "modules").mkdir(parents=True)
    (home / "firmware").mkdir()
    modules = ["nvidia", "nvidia-uvm", "nvidia-modeset", "nvidia-drm", "nvidia-peermem"]
    for m in modules:
        (home / "modules" / f"{m}.ko").write_bytes(b"\x7fELF")
    (home / "loader.conf").write_text(f"DRIVER_VERSION={VERSION}\nKERNEL_RELEASE={RELEASE}\n"
                                      f"MODULES={' '.join(modules)}\nKERNEL_DEPENDS=drm\n")
    shutil.copy2(REPO / "images" / "nvidia-devices.conf", home / "nvidia-devices.conf")
    insmod = tmp_path / "insmod"
    insmod.write_text(STUB_INSMOD)
    insmod.chmod(0o755)
    return {"root": root, "home": home, "insmod": insmod, "tmp": tmp_path}


def run_loader(fake, *command, gpus=2, env=None):
    full = {"PATH": os.environ["PATH"], "CUDABUILD_ROOT": str(fake["root"]), "CUDABUILD_HOME": str(fake["home"]),
            "CUDABUILD_INSMOD": str(fake["insmod"]), "CUDABUILD_MODPROBE": str(fake["insmod"]),
            "CUDABUILD_LDCONFIG": "true",
            "CUDABUILD_KERNEL_RELEASE": RELEASE, "FAKE_ROOT": str(fake["root"]), "FAKE_GPUS": str(gpus),
            "FAKE_VERSION": VERSION, **(env or {})}
    return subprocess.run(["sh", str(LOADER), *command], env=full, capture_output=True, text=True, timeout=60)


def loaded(fake) -> list[str]:
    log = fake["root"] / "insmod.log"
    return log.read_text().split() if log.exists() else []


def char_device(path: Path) -> tuple[int, int]:
    st = path.stat()
    assert stat.S_ISCHR(st.st_mode), f"{path} is not a character device"
    assert stat.S_IMODE(st.st_mode) == 0o666
    return os.major(st.st_rdev), os.minor(st.st_rdev)


@pytest.fixture(autouse=True)
def needs_root():
    if os.geteuid() != 0:
        pytest.fail("the loader tests make device nodes with mknod and must run as root")


def test_loads_in_dependency_order_and_runs_the_command(fake):
    result = run_loader(fake, "sh", "-c", "echo hello from the command; exit 7")
    assert result.returncode == 7, result.stderr
    assert result.stdout == "hello from the command\n"
    assert loaded(fake) == ["drm", "nvidia", "nvidia_uvm", "nvidia_modeset", "nvidia_drm"], \
        "the kernel's own drm first (nvidia.ko depends on it), then ours in order"
    assert (fake["root"] / "sys/module/firmware_class/parameters/path").read_text().strip() == str(fake["home"] / "firmware")


def test_peermem_only_when_asked(fake):
    run_loader(fake, "true", env={"NVIDIA_PEERMEM": "1"})
    assert loaded(fake)[-1] == "nvidia_peermem"


def test_device_nodes_for_every_gpu(fake):
    assert run_loader(fake, "true", gpus=3).returncode == 0
    dev = fake["root"] / "dev"
    assert [char_device(dev / f"nvidia{i}") for i in range(3)] == [(195, 0), (195, 1), (195, 2)]
    assert char_device(dev / "nvidiactl") == (195, 255)
    assert char_device(dev / "nvidia-modeset") == (195, 254)
    assert char_device(dev / "nvidia-uvm") == (510, 0)
    assert char_device(dev / "nvidia-uvm-tools") == (510, 1)


@pytest.mark.parametrize("variable", ["NVIDIA_VISIBLE_DEVICES", "NV_GPU"])
def test_only_the_selected_gpus_by_index_or_uuid(fake, variable):
    assert run_loader(fake, "true", gpus=4, env={variable: "1,GPU-00000003-fake"}).returncode == 0
    nodes = sorted(p.name for p in (fake["root"] / "dev").glob("nvidia[0-9]*"))
    assert nodes == ["nvidia1", "nvidia3"]


def test_same_version_already_loaded_is_not_loaded_again(fake):
    for module in ("drm", "nvidia", "nvidia_uvm", "nvidia_modeset", "nvidia_drm"):
        (fake["root"] / "sys/module" / module).mkdir(parents=True)
        (fake["root"] / "sys/module" / module / "version").write_text(VERSION + "\n")
    result = run_loader(fake, "echo", "ok")
    assert result.returncode == 0 and result.stdout == "ok\n"
    assert loaded(fake) == []
    assert "already loaded" in result.stderr


def test_same_version_loaded_without_uvm_loads_what_is_missing(fake):
    """nvidia (and drm) loaded by someone else, nvidia-uvm not: CUDA needs /dev/nvidia-uvm."""
    for module in ("drm", "nvidia"):
        (fake["root"] / "sys/module" / module).mkdir(parents=True)
        (fake["root"] / "sys/module" / module / "version").write_text(VERSION + "\n")
    result = run_loader(fake, "echo", "ok")
    assert result.returncode == 0, result.stderr
    assert loaded(fake) == ["nvidia_uvm", "nvidia_modeset", "nvidia_drm"]
    assert char_device(fake["root"] / "dev" / "nvidia-uvm") == (510, 0)


def test_unreadable_gpu_information_is_the_loaders_own_error(fake):
    gpu = fake["root"] / "proc/driver/nvidia/gpus/0000:0a:00.0"
    gpu.mkdir(parents=True)  # a GPU entry without its information file
    result = run_loader(fake, "echo", "never")
    assert result.returncode == 16, result.stderr
    assert "cannot read" in result.stderr and "0000:0a:00.0" in result.stderr
    assert "sed:" not in result.stderr and result.stdout == ""


@pytest.mark.parametrize("skip", [False, True])
def test_settings_are_read_not_executed(fake, tmp_path, skip):
    marker = tmp_path / "injected"
    (fake["home"] / "loader.conf").write_text(
        f'DRIVER_VERSION=535.1"; touch {marker}; "\nKERNEL_RELEASE={RELEASE}\nMODULES=nvidia\n')
    result = run_loader(fake, "echo", "never", env={"CUDABUILD_LOADER": "skip"} if skip else {})
    assert result.returncode == 17, result.stderr
    assert "DRIVER_VERSION holds characters a setting may not" in result.stderr
    assert not marker.exists() and result.stdout == ""


def test_another_version_loaded_is_refused_naming_both_and_the_holders(fake):
    module = fake["root"] / "sys/module/nvidia"
    (module / "holders" / "nvidia_uvm").mkdir(parents=True)
    (module / "version").write_text("470.256.02\n")
    (module / "refcnt").write_text("3\n")
    result = run_loader(fake, "echo", "never")
    assert result.returncode == 13
    assert "470.256.02" in result.stderr and VERSION in result.stderr
    assert "nvidia_uvm" in result.stderr and "refcount 3" in result.stderr
    assert result.stdout == "" and loaded(fake) == []


def test_kernel_mismatch_names_both_releases(fake):
    result = run_loader(fake, "true", env={"CUDABUILD_KERNEL_RELEASE": "6.1.0-47-amd64"})
    assert result.returncode == 11
    assert RELEASE in result.stderr and "6.1.0-47-amd64" in result.stderr
    assert "cudabuild modules --kernel 6.1.0-47-amd64" in result.stderr
    assert loaded(fake) == []


def test_enforced_signatures_refuse_unsigned_modules_before_insmod_naming_the_fix(fake):
    (fake["root"] / "sys/module/module/parameters").mkdir(parents=True)
    (fake["root"] / "sys/module/module/parameters/sig_enforce").write_text("Y\n")
    result = run_loader(fake, "true")
    assert result.returncode == 19, result.stderr
    assert "enforces module signatures" in result.stderr and "nvidia.ko is unsigned" in result.stderr
    assert "--sign-key" in result.stderr and "mokutil --import" in result.stderr
    assert loaded(fake) == [], "nothing is loaded, not even the kernel's own drm"


def test_enforced_signatures_load_signed_modules(fake, tmp_path):
    from tests.helpers import make_signing_key, sign_like_sign_file

    (fake["root"] / "sys/module/module/parameters").mkdir(parents=True)
    (fake["root"] / "sys/module/module/parameters/sig_enforce").write_text("Y\n")
    keys = make_signing_key(tmp_path / "keys")
    for ko in (fake["home"] / "modules").glob("*.ko"):
        sign_like_sign_file(ko, keys["key"], keys["cert"])
    result = run_loader(fake, "true")
    assert result.returncode == 0, result.stderr
    assert loaded(fake)[:2] == ["drm", "nvidia"]
    assert "the modules are signed" in result.stderr


def test_unenforced_signatures_load_unsigned_modules(fake):
    (fake["root"] / "sys/module/module/parameters").mkdir(parents=True)
    (fake["root"] / "sys/module/module/parameters/sig_enforce").write_text("N\n")
    assert run_loader(fake, "true").returncode == 0
    assert "nvidia" in loaded(fake)


def test_nouveau_is_refused(fake):
    (fake["root"] / "sys/module/nouveau").mkdir(parents=True)
    result = run_loader(fake, "true")
    assert result.returncode == 12 and "blacklist nouveau" in result.stderr
    assert loaded(fake) == []


def test_without_cap_sys_module_it_says_privileged(fake):
    (fake["root"] / "proc/self/status").write_text(f"CapEff:\t{NO_SYS_MODULE}\n")
    result = run_loader(fake, "true")
    assert result.returncode == 10 and "--privileged" in result.stderr
    assert loaded(fake) == []


def test_a_module_that_fails_to_load_stops_with_the_reason(fake):
    result = run_loader(fake, "true", env={"FAKE_FAIL": "nvidia_uvm"})
    assert result.returncode == 14 and "nvidia-uvm.ko failed" in result.stderr and "dmesg" in result.stderr
    assert loaded(fake) == ["drm", "nvidia", "nvidia_uvm"]


def test_skip_runs_the_command_without_loading(fake):
    (fake["root"] / "proc/self/status").write_text(f"CapEff:\t{NO_SYS_MODULE}\n")
    result = run_loader(fake, "sh", "-c", "exit 3", env={"CUDABUILD_LOADER": "skip"})
    assert result.returncode == 3 and loaded(fake) == []


SELECTIONS = [
    ({}, "all"),
    ({"NVIDIA_VISIBLE_DEVICES": "1,GPU-00000003-fake"}, [1, 3]),
    ({"NV_GPU": "2", "NVIDIA_VISIBLE_DEVICES": "all"}, [2]),
    ({"DOCKER_RESOURCE_GPU": "GPU-00000000-fake", "NVIDIA_VISIBLE_DEVICES": "all"}, [0]),
    ({"NVIDIA_VISIBLE_DEVICES": "none"}, []),
    ({"NVIDIA_VISIBLE_DEVICES": "7"}, "error"),
    ({"NV_GPU": "GPU-nope"}, "error"),
]


@pytest.mark.parametrize("env,expected", SELECTIONS)
def test_the_loader_and_the_python_side_select_the_same_gpus(fake, env, expected):
    """One selection: the loader (shell) and cudabuild.host.devices (run, the runtime) agree,
    from the same facts (which variables, in which order)."""
    from cudabuild.host import devices
    from cudabuild.host.root import HostRoot
    from cudabuild.errors import InputError

    result = run_loader(fake, "true", gpus=4, env=env)
    available = devices.gpus(HostRoot(fake["root"]))
    chosen = devices.requested(env)
    try:
        python = devices.select(available, chosen[1] if chosen else "all")
        python_nodes = sorted(f"nvidia{g.minor}" for g in python)
    except InputError:
        python_nodes = "error"
    loader_nodes = sorted(p.name for p in (fake["root"] / "dev").glob("nvidia[0-9]*")) if result.returncode == 0 \
        else "error"
    assert loader_nodes == python_nodes
    if expected == "error":
        assert result.returncode == 18 and "does not exist" in result.stderr and "GPU-00000002-fake" in result.stderr
    elif expected != "all":
        assert loader_nodes == [f"nvidia{i}" for i in expected]
