"""`cudabuild install` and `cdi generate` on a host root laid out as Debian lays out a host (absolute
`var/run -> /run`, merged /usr), with symlinks planted under it that lead outside: every path is
resolved inside the root, as a chroot would, and nothing outside the root is written, replaced or
deleted, whatever is planted."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from tests.helpers import DRIVER, fake_host, host_with_artifact, run_cli


def snapshot(directory: Path) -> dict[str, str]:
    """Every entry under `directory`: a file's sha256, a link's target, a device's numbers."""
    out = {}
    for path in sorted(directory.rglob("*")):
        st = path.lstat()
        rel = str(path.relative_to(directory))
        if path.is_symlink():
            out[rel] = "-> " + os.readlink(path)
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif path.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = f"special {st.st_mode:o} {st.st_rdev}"
    return out


@pytest.fixture
def host(tmp_path):
    root, env, art = host_with_artifact(tmp_path, gpus=2)
    outside = tmp_path / "outside"
    (outside / "dir").mkdir(parents=True)
    (outside / "victim").write_text("a file outside the root\n")
    (outside / "daemon.json").write_text('{"keep": true}\n')
    return root, env, art, outside


def install(root, env, art, *extra):
    return run_cli("install", "--modules", str(art), "--root", str(root), *extra, env=env)


def test_on_a_debian_layout_the_spec_goes_to_the_roots_run_cdi(host):
    root, env, art, outside = host
    assert os.readlink(root / "var/run") == "/run"  # absolute, as on Debian
    result = install(root, env, art, "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["cdi_spec"] == "/run/cdi/cudabuild-nvidia.json"
    spec = json.loads((root / "run/cdi/cudabuild-nvidia.json").read_text())
    assert [d["name"] for d in spec["devices"]][-1] == "all"
    assert json.loads((root / "run/cudabuild/driver/ready").read_text())["driver_version"] == DRIVER
    assert not list(root.glob("run/cdi/*.partial")) and not list(root.glob("run/cudabuild/driver/.*"))


# Each: (what is planted, relative to the root) -> (its target: an outside path, absolute or relative).
PLANTED = {
    "the ready file": ("run/cudabuild/driver/ready", "{outside}/victim"),
    "the spec": ("run/cdi/cudabuild-nvidia.json", "{outside}/victim"),
    "the firmware path file": ("sys/module/firmware_class/parameters/path", "{outside}/victim"),
    "ROOT/dev (absolute)": ("dev", "{outside}/dir"),
    "ROOT/dev (relative, climbing out)": ("dev", "../../../../../../../../{outside}/dir"),
    "the driver directory": ("run/cudabuild/driver", "{outside}/dir"),
    "the CDI directory": ("run/cdi", "../../{outside_rel}/dir"),
    "a device node": ("dev/nvidia0", "{outside}/victim"),
    "the GPU's information": ("proc/driver/nvidia/gpus/0000:00:00.0/information", "/dev/zero"),
}


@pytest.mark.parametrize("what", list(PLANTED))
def test_a_planted_symlink_never_leads_outside_the_root(host, what):
    root, env, art, outside = host
    where, target = PLANTED[what]
    target = target.format(outside=outside, outside_rel=os.path.relpath(outside, root))
    planted = root / where
    if planted.is_symlink() or planted.is_file():
        planted.unlink()
    elif planted.is_dir():
        import shutil

        shutil.rmtree(planted)
    planted.parent.mkdir(parents=True, exist_ok=True)
    planted.symlink_to(target)
    before = snapshot(outside)
    result = install(root, env, art)
    assert "Traceback" not in result.stderr, result.stderr
    assert snapshot(outside) == before, f"{what}: something outside the root changed"
    if what == "the GPU's information":
        assert result.returncode == 16 and "information" in result.stderr, result.stderr
        return
    if what == "the driver directory":  # cudabuild's own directory: a link there is refused, never followed
        assert result.returncode == 3, result.stderr
        assert f"{root}/run/cudabuild/driver is a symbolic link" in result.stderr and "rm " in result.stderr
        return
    assert result.returncode == 0, result.stderr
    if what in ("the ready file", "the spec"):
        assert not planted.is_symlink() and planted.is_file()  # the link replaced, not followed
    # The spec is valid and inside the root, wherever the links took it.
    spec_path = next(p for p in root.rglob("cudabuild-nvidia.json") if p.is_file() and not p.is_symlink())
    assert root in spec_path.parents
    assert json.loads(spec_path.read_text())["kind"] == "nvidia.com/gpu"


def test_a_file_where_a_directory_belongs_is_refused_with_the_reason(host):
    root, env, art, outside = host
    (root / "run/cudabuild").mkdir(parents=True)
    (root / "run/cudabuild/driver").write_text("not a directory\n")
    result = install(root, env, art)
    assert result.returncode == 3 and "Traceback" not in result.stderr, result.stderr
    assert "is not a directory" in result.stderr and "driver" in result.stderr


def test_a_symlink_loop_is_refused_with_the_reason(host):
    root, env, art, outside = host
    (root / "run/cudabuild").mkdir(parents=True)
    (root / "run/cudabuild/driver").symlink_to("/run/cudabuild/driver")
    result = install(root, env, art)
    assert result.returncode == 3 and "Traceback" not in result.stderr, result.stderr
    assert f"{root}/run/cudabuild/driver is a symbolic link (to /run/cudabuild/driver)" in result.stderr


def test_cdi_generate_on_a_debian_layout(host, tmp_path):
    root, env, art, outside = host
    assert install(root, env, art).returncode == 0
    (root / "run/cdi/cudabuild-nvidia.json").unlink()
    # The host's own libnvidia-ml, found through merged /usr's `lib -> usr/lib`.
    (root / "lib/x86_64-linux-gnu").mkdir(parents=True)
    (root / f"lib/x86_64-linux-gnu/libnvidia-ml.so.{DRIVER}").write_bytes(b"\x7fELF not really\n")
    result = run_cli("cdi", "generate", "--root", str(root), env=env)
    assert result.returncode == 0, result.stderr
    spec = json.loads((root / "run/cdi/cudabuild-nvidia.json").read_text())
    assert {"hostPath": f"/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.{DRIVER}",
            "containerPath": f"/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.{DRIVER}",
            "options": ["ro", "nosuid", "nodev", "bind"]} in spec["containerEdits"]["mounts"]
    listed = run_cli("cdi", "list", "--root", str(root), "--json", env=env)
    assert listed.returncode == 0 and str(root / "run/cdi/cudabuild-nvidia.json") in json.loads(listed.stdout)["specs"]
    # --output a directory: refused, naming the fix (was a traceback)
    result = run_cli("cdi", "generate", "--root", str(root), "--output", str(tmp_path), env=env)
    assert result.returncode == 3 and "is a directory" in result.stderr and "Traceback" not in result.stderr


def test_a_read_only_root_is_refused_with_the_fix(host, tmp_path):
    import subprocess

    root, env, art, outside = host
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(ro)]).returncode != 0:
        pytest.fail("this test mounts a tmpfs and must run as root")
    try:
        env = fake_host(ro, gpus=1)
        (ro / "run/cudabuild/driver").mkdir(parents=True)
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        result = install(ro, env, art)
        assert result.returncode == 3, result.stderr
        assert "read-only" in result.stderr and "Traceback" not in result.stderr
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)


def test_a_directory_where_the_ready_file_belongs_is_refused(host):
    root, env, art, outside = host
    (root / "run/cudabuild/driver/ready").mkdir(parents=True)
    result = install(root, env, art)
    assert result.returncode == 3 and "is a directory" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("minor", ["\u0663", "1" + "0" * 23, "255"], ids=["arabic-indic-3", "10^23", "255"])
def test_a_gpu_minor_that_is_not_one_is_refused(host, minor):
    """The driver's information file names a minor no /dev/nvidiaN can have: the loader (install)
    and cdi generate both refuse it, naming the file."""
    root, env, art, outside = host
    gpu = root / "proc/driver/nvidia/gpus/0000:09:00.0"
    gpu.mkdir(parents=True)
    (gpu / "information").write_text(f"Model: \t NVIDIA H100\nDevice Minor: \t {minor}\nGPU UUID: \t GPU-9-fake\n")
    result = install(root, env, art)
    assert result.returncode == 16 and "information" in result.stderr and "Traceback" not in result.stderr
    (root / "sys/module/nvidia").mkdir(parents=True, exist_ok=True)
    (root / "sys/module/nvidia/version").write_text(f"{DRIVER}\n")
    (root / "lib/x86_64-linux-gnu").mkdir(parents=True, exist_ok=True)
    for lib in ("libcuda", "libnvidia-ml"):
        (root / f"lib/x86_64-linux-gnu/{lib}.so.{DRIVER}").write_bytes(b"\x7fELF not really\n")
    generated = run_cli("cdi", "generate", "--root", str(root), "--output", "-", env=env)
    assert generated.returncode == 3 and "device minor" in generated.stderr and "Traceback" not in generated.stderr


def test_run_gpus_empty_is_an_error(host):
    root, env, art, outside = host
    assert install(root, env, art).returncode == 0
    result = run_cli("run", "--gpus", "", "--cdi-dir", str(root / "run/cdi"), "--dry-run", "--rm", "debian:bookworm",
                     "true", env=env)
    assert result.returncode == 3 and "--gpus is empty" in result.stderr and "Traceback" not in result.stderr
