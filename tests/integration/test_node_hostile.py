"""The node's day-2 paths on hosts as they are (issue 30): fake roots laid out like real hosts
(Debian's links, an ESP, Flatcar's /boot), a real registry on 127.0.0.1, the stub insmod and rmmod.
Nothing is removed through a link; the reboot gate never says ready for a kernel without its driver;
a what-if boot test judges only the configuration it ran under."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import DRIVER, fake_host, host_with_artifact, make_artifact, run_cli
from tests.integration.test_kernel_updates import NEXT, RUNNING, host_for, install, registry  # noqa: F401

STUB = Path("/usr/lib/systemd/boot/efi/linuxx64.efi.stub")  # systemd-boot-efi (scripts/setup)


def gate(host: Path, env: dict, *args: str):
    return run_cli("ready", "--kernel", "next", "--root", str(host), *args, env=env)


def bzimage(path: Path, release: str) -> None:
    """A kernel image as the x86 boot protocol lays out its header: 'HdrS' at 0x202, the
    kernel_version pointer at 0x20e (relative to 0x200), the version string where it points."""
    data = bytearray(0x800)
    data[0x1FE:0x200] = b"\x55\xaa"
    data[0x202:0x206] = b"HdrS"
    data[0x20E:0x210] = (0x400 - 0x200).to_bytes(2, "little")
    text = f"{release} (builder@localhost) #1 SMP PREEMPT_DYNAMIC\0".encode()
    data[0x400:0x400 + len(text)] = text
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))


def uki(path: Path, release: str, tmp: Path) -> None:
    """A Type #2 unified kernel image made as systemd documents (objcopy onto systemd's EFI stub),
    with the release in its .uname section."""
    (tmp / "uname").write_text(release)
    bzimage(tmp / "linux", release)
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["objcopy", "--add-section", f".uname={tmp / 'uname'}", "--change-section-vma", ".uname=0x20000",
                    "--add-section", f".linux={tmp / 'linux'}", "--change-section-vma", ".linux=0x2000000",
                    str(STUB), str(path)], check=True)


def bls(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# Each: a way a distribution installs the next kernel, with no /boot/vmlinuz-NEXT.
WAYS = {
    "BLS entry on the ESP (/boot/efi)": lambda h, t: bls(h / "boot/efi/loader/entries/debian-next.conf",
                                                          f"title Debian\nversion {NEXT}\nlinux /{NEXT}/linux\n"),
    "BLS entry on the ESP (/efi)": lambda h, t: bls(h / "efi/loader/entries/x-next.conf",
                                                     f"title Debian\nlinux /vmlinuz-{NEXT}\n"),
    "BLS line with a tab": lambda h, t: bls(h / "boot/loader/entries/tab.conf", f"title x\nlinux\t/vmlinuz-{NEXT}\n"),
    "BLS entry over 64 KiB": lambda h, t: bls(h / "boot/loader/entries/long.conf",
                                               "title x\n" + "# padding\n" * 8000 + f"linux /vmlinuz-{NEXT}\n"),
    "unified kernel image (EFI/Linux)": lambda h, t: uki(h / "boot/efi/EFI/Linux/debian-next.efi", NEXT, t),
    "Flatcar's vmlinuz-b": lambda h, t: (bzimage(h / "boot/flatcar/vmlinuz-a", RUNNING),
                                         bzimage(h / "boot/flatcar/vmlinuz-b", NEXT)),
}


@pytest.mark.parametrize("way", list(WAYS))
def test_the_gate_finds_the_next_kernel_however_it_was_installed(tmp_path, registry, way):  # noqa: F811
    host, env = host_for(tmp_path)
    assert install(host, env, "--registry", registry.repo(), "--driver", "535").returncode == 0
    assert gate(host, env).returncode == 0, "no newer kernel: the running one is next"
    (tmp_path / "work").mkdir()
    WAYS[way](host, tmp_path / "work")
    held = gate(host, env, "--json")
    assert held.returncode == 23, held.stderr
    assert json.loads(held.stdout)["kernel"] == NEXT and NEXT in held.stderr
    staging = run_cli("stage", "--kernel", "next", "--root", str(host), env=env)
    assert staging.returncode == 0, staging.stderr
    assert gate(host, env).returncode == 0


def test_a_next_kernel_that_cannot_be_read_holds_the_gate_and_keeps_what_is_staged(tmp_path, registry):  # noqa: F811
    host, env = host_for(tmp_path)
    assert install(host, env, "--registry", registry.repo(), "--driver", "535").returncode == 0
    (host / "var/lib/cudabuild/staged/6.1.0-41-amd64/old").mkdir(parents=True)  # a kernel's build, kept
    (host / "boot/flatcar").mkdir()
    (host / "boot/flatcar/vmlinuz-b").write_bytes(b"not a kernel image")
    held = gate(host, env)
    assert held.returncode == 23 and "cannot be determined" in held.stderr and "vmlinuz-b" in held.stderr
    assert "Traceback" not in held.stderr
    staging = run_cli("stage", "--kernel", NEXT, "--root", str(host), env=env)
    assert staging.returncode == 0, staging.stderr
    assert "nothing staged was pruned" in staging.stderr
    assert (host / "var/lib/cudabuild/staged/6.1.0-41-amd64/old").is_dir()
    # An unreadable /boot (here a loop of links): no pruning either, and the gate holds.
    (host / "boot/flatcar/vmlinuz-b").unlink()
    shutil.rmtree(host / "boot")
    (host / "boot").symlink_to("boot")
    assert gate(host, env).returncode == 23
    staging = run_cli("stage", "--kernel", NEXT, "--root", str(host), env=env)
    assert staging.returncode == 0 and (host / "var/lib/cudabuild/staged/6.1.0-41-amd64").is_dir(), staging.stderr


def test_next_is_the_kernel_that_boots_not_every_file_in_boot(tmp_path):
    host, env = host_for(tmp_path)
    boot = host / "boot"
    for name in (f"vmlinuz-{RUNNING}.efi.signed", "vmlinuz-6.1.0-60-cloud-amd64", "vmlinuz-6.1.0-60-rt-amd64",
                 f"vmlinuz-{NEXT}.dpkg-tmp"):
        (boot / name).write_bytes(b"kernel")
    bzimage(boot / "vmlinuz-linux-lts", "6.1.0-40-amd64")  # named without its release: read from its header
    status = run_cli("status", "--root", str(host), "--json", env=env)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["next_kernel"] is None, "only other flavours and older kernels: none is next"
    # The boot loader's default entry wins where it is known.
    bls(boot / "loader/entries/a.conf", "title a\nlinux /vmlinuz-6.1.0-60-cloud-amd64\n")
    bls(boot / "loader/loader.conf", "timeout 3\ndefault a.conf\n")
    said = json.loads(run_cli("status", "--root", str(host), "--json", env=env).stdout)
    assert said["next_kernel"] == "6.1.0-60-cloud-amd64"


# ---- part 1: nothing deleted through a link ------------------------------------------------------------
def test_a_staged_kernel_that_is_a_link_to_the_root_is_never_pruned(tmp_path, registry):  # noqa: F811
    host, env = host_for(tmp_path)
    (host / "etc").mkdir()
    (host / "etc/keep").write_text("the host's data\n")
    (host / "var/lib/cudabuild/staged").mkdir(parents=True)
    (host / "var/lib/cudabuild/staged/6.1.0-41-amd64").symlink_to("/")
    (host / "boot" / f"vmlinuz-{NEXT}").write_bytes(b"kernel")
    result = run_cli("stage", "--kernel", "next", "--registry", registry.repo(), "--driver", "535",
                     "--root", str(host), env=env)
    assert result.returncode == 0, result.stderr
    assert (host / "etc/keep").read_text() == "the host's data\n" and (host / "boot" / f"vmlinuz-{NEXT}").exists()
    assert (host / "var/lib/cudabuild/staged/6.1.0-41-amd64").is_symlink()
    assert "not pruned" in result.stderr and "6.1.0-41-amd64" in result.stderr
    # cudabuild's own staged/ directory a link: refused, naming it, before anything is written.
    shutil.rmtree(host / "var/lib/cudabuild/staged")
    (host / "var/lib/cudabuild/staged").symlink_to("/etc")
    refused = run_cli("stage", "--kernel", "next", "--root", str(host), env=env)
    assert refused.returncode == 3, refused.stderr
    assert "staged is a symbolic link" in refused.stderr and os.listdir(host / "etc") == ["keep"]


@pytest.fixture
def installed(tmp_path):
    """A host with 535 installed by cudabuild and loaded (the stub), and a second driver's build."""
    root, env, _ = host_with_artifact(tmp_path, gpus=2, installed=True)
    make_artifact(tmp_path / "new", driver="550.127.05")
    return root, env, tmp_path


def uninstall(root: Path, env: dict):
    return run_cli("uninstall", "--root", str(root), "--cdi-host-root", str(root), env=env)


def test_uninstall_never_removes_through_a_link(installed):
    root, env, tmp = installed
    (root / "etc/ssh").mkdir(parents=True)
    (root / "etc/ssh/sshd_config").write_text("keep\n")
    driver = root / "run/cudabuild/driver"
    shutil.move(driver, tmp / "moved")
    driver.symlink_to("/etc")
    refused = uninstall(root, env)
    assert refused.returncode == 3, refused.stderr
    assert "driver is a symbolic link" in refused.stderr and (root / "etc/ssh/sshd_config").exists()
    assert (root / "run/cdi/cudabuild-nvidia.json").exists(), "refused before anything changed"
    driver.unlink()
    shutil.move(tmp / "moved", driver)
    # A link named like a device node: left alone, never followed to what it names.
    os.mknod(root / "dev/null", 0o20666, os.makedev(1, 3))
    (root / "dev/nvidia8").symlink_to("/dev/null")
    done = uninstall(root, env)
    assert done.returncode == 0, done.stderr
    assert (root / "dev/null").exists() and (root / "dev/nvidia8").is_symlink()
    assert not (root / "dev/nvidia0").exists() and not (root / f"run/cudabuild/driver/{DRIVER}").exists()


def test_an_installed_driver_that_is_a_link_is_never_removed_by_an_upgrade(installed):
    root, env, tmp = installed
    precious = root / "srv/precious"
    shutil.copytree(root / f"run/cudabuild/driver/{DRIVER}", precious, symlinks=True)
    shutil.rmtree(root / f"run/cudabuild/driver/{DRIVER}")
    (root / f"run/cudabuild/driver/{DRIVER}").symlink_to("/srv/precious")
    result = run_cli("install", "--modules", str(tmp / "new"), "--root", str(root), "--cdi-host-root", str(root),
                     env=env)
    assert result.returncode == 13, result.stderr
    assert "not installed by cudabuild" in result.stderr
    assert (precious / "manifest.json").is_file() and (precious / "loader.sh").is_file()


def test_a_rollback_never_runs_a_planted_line(installed):
    root, env, tmp = installed
    loader = root / f"run/cudabuild/driver/{DRIVER}/loader.sh"
    loader.write_text(loader.read_text().replace("\n", f"\ntouch {tmp}/PWNED\n", 1))
    failed = run_cli("install", "--modules", str(tmp / "new"), "--root", str(root), "--cdi-host-root", str(root),
                     env={**env, "FAKE_FAIL_VERSION": "550.127.05"})
    assert failed.returncode == 25, failed.stderr
    assert not (tmp / "PWNED").exists(), "the old copy's loader was written again before it ran"
    assert "PWNED" not in loader.read_text()
    assert (root / "sys/module/nvidia/version").read_text().strip() == DRIVER, "the old driver is loaded again"


def test_an_upgrade_to_another_kernels_build_unloads_nothing(installed):
    root, env, tmp = installed
    make_artifact(tmp / "other-kernel", driver="550.127.05", release="6.1.0-99-amd64")
    (root / "insmod.log").unlink()
    refused = run_cli("install", "--modules", str(tmp / "other-kernel"), "--root", str(root), "--cdi-host-root",
                      str(root), env=env)
    assert refused.returncode == 11, refused.stderr
    assert "6.1.0-99-amd64" in refused.stderr and "nothing was unloaded" in refused.stderr
    assert not (root / "insmod.log").exists() or "-nvidia" not in (root / "insmod.log").read_text()


# ---- part 2: a staged build that no longer holds, or is not the node's ------------------------------------
def next_kernel_staged(tmp_path: Path, registry) -> tuple[Path, dict]:  # noqa: F811
    """A node running 535 from the registry, with NEXT installed and its build staged: ready."""
    host, env = host_for(tmp_path)
    assert install(host, env, "--registry", registry.repo(), "--driver", "535").returncode == 0
    (host / "boot" / f"vmlinuz-{NEXT}").write_bytes(b"kernel")
    assert run_cli("stage", "--kernel", "next", "--root", str(host), env=env).returncode == 0
    assert gate(host, env).returncode == 0
    return host, env


def test_headers_installed_after_staging_make_a_contradicted_build_not_ready(tmp_path, registry):  # noqa: F811
    host, env = next_kernel_staged(tmp_path, registry)
    symvers = host / f"usr/lib/modules/{NEXT}/build/Module.symvers"  # Debian's headers (lib -> usr/lib)
    symvers.parent.mkdir(parents=True)
    symvers.write_text("0xdeadbeef\t_printk\tvmlinux\tEXPORT_SYMBOL\n"
                       "0x12345678\tmodule_layout\tvmlinux\tEXPORT_SYMBOL\n")
    held = gate(host, env)
    assert held.returncode == 23, held.stderr
    assert "_printk" in held.stderr and NEXT in held.stderr


def test_a_staged_build_of_the_other_flavour_or_driver_is_not_ready(tmp_path, registry):  # noqa: F811
    host, env = next_kernel_staged(tmp_path, registry)
    assert gate(host, env, "--flavor", "open").returncode == 23, "a proprietary build is not the open one"
    assert gate(host, env, "--driver", "550").returncode == 23


# ---- part 4: what the registry serves is what was asked for ------------------------------------------
def test_a_build_under_another_drivers_tag_is_refused_and_a_broken_newest_tag_is_passed_over(tmp_path):
    import requests

    from cudabuild.artifact import image_tag
    from tests.registry import LocalRegistry

    release = "6.1.0-45-amd64"
    with LocalRegistry(tmp_path / "registry") as reg:
        # 550 pushed under a 535 tag: never installed as 535.
        wrong = make_artifact(tmp_path / "wrong", release=release, driver="550.127.05")
        reg.push_directory(f"{reg.repo()}/modules:535.400.01-{release}", tmp_path / "wrong", wrong.labels())
        host, env = host_for(tmp_path / "a", running=release)
        refused = install(host, env, "--registry", reg.repo(), "--driver", "535", "--no-fallback")
        assert refused.returncode == 23, refused.stderr
        assert "it is driver 550.127.05, but its tag names 535.400.01" in refused.stderr
        assert not (host / "run/cudabuild/driver/ready").exists() and not (host / "run/cudabuild/driver/550.127.05").exists()

        # The newest tag's config blob gone (HTTP 404): said, and the older good build is installed.
        good = make_artifact(tmp_path / "good", release=release, driver=DRIVER)
        reg.push_directory(f"{reg.repo()}/modules:{image_tag('modules', DRIVER, 'proprietary', release).split(':')[1]}",
                           tmp_path / "good", good.labels())
        newest = make_artifact(tmp_path / "newest", release=release, driver="535.500.01")
        tag = f"535.500.01-{release}"
        reg.push_directory(f"{reg.repo()}/modules:{tag}", tmp_path / "newest", newest.labels())
        name = reg.repo().split("/", 1)[1]
        manifest = requests.get(f"http://{reg.repo().split('/')[0]}/v2/{name}/modules/manifests/{tag}",
                                headers={"Accept": "application/vnd.oci.image.manifest.v1+json, "
                                                   "application/vnd.docker.distribution.manifest.v2+json"}).json()
        config = manifest["config"]["digest"].split(":")[1]
        blob = next((tmp_path / "registry").rglob(f"blobs/sha256/{config[:2]}/{config}/data"))
        blob.unlink()
        host, env = host_for(tmp_path / "b", running=release)
        done = install(host, env, "--registry", reg.repo(), "--driver", "535", "--no-fallback")
        assert done.returncode == 0, done.stderr
        assert "535.500.01" in done.stderr and "trying the next" in done.stderr
        assert json.loads((host / "run/cudabuild/driver/ready").read_text())["driver"] == DRIVER


# ---- part 7: state a node reads, written by someone else ---------------------------------------------
@pytest.mark.parametrize("ready", ["[1, 2, 3]", '"ready"', "{not json", "[" * 100000])
def test_status_says_what_is_wrong_with_a_ready_file_and_never_calls_it_ready(tmp_path, ready):
    host, env = host_for(tmp_path)
    (host / "run/cudabuild/driver").mkdir(parents=True)
    (host / "run/cudabuild/driver/ready").write_text(ready)
    result = run_cli("status", "--root", str(host), "--json", env=env)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    said = json.loads(result.stdout)
    assert said["ready"] is False and said["driver"] is None
    assert any("ready" in p for p in said["problems"]), said["problems"]


@pytest.mark.parametrize("config", ["[" * 100000, '{"driver": "abc"}', '{"driver": 535}', '{"fallback": "no"}', "[]"])
def test_a_malformed_node_configuration_is_refused_by_name_never_taken_as_any_driver(tmp_path, config):
    host, env = host_for(tmp_path)
    (host / "var/lib/cudabuild").mkdir(parents=True)
    (host / "var/lib/cudabuild/node.json").write_text(config)
    for command in (["ready", "--kernel", "next"], ["stage", "--kernel", "next"]):
        result = run_cli(*command, "--root", str(host), env=env)
        assert result.returncode == 3 and "Traceback" not in result.stderr, (command, result.stderr)
        assert "node.json" in result.stderr and "configure the node again" in result.stderr
    status = run_cli("status", "--root", str(host), "--json", env=env)
    assert status.returncode == 0, status.stderr
    assert any("node.json" in p for p in json.loads(status.stdout)["problems"])


BAD_MOUNTS = {"strings": ["abc", "def"], "numbers": [1, 2], "a string": "abc",
              "NUL in hostPath": [{"hostPath": "/lib/x\u0000y", "containerPath": "/x"}],
              "5,000 characters": [{"hostPath": "/" + "a" * 5000, "containerPath": "/x"}],
              "an escape sequence": [{"hostPath": "/\u001b[2J/gone", "containerPath": "/\u001b]0;x\u0007"}]}


@pytest.mark.parametrize("how", list(BAD_MOUNTS))
def test_cdi_check_says_a_spec_with_malformed_mounts_is_stale(installed, how):
    root, env, _ = installed
    spec_path = root / "run/cdi/cudabuild-nvidia.json"
    spec = json.loads(spec_path.read_text())
    spec["containerEdits"]["mounts"] = BAD_MOUNTS[how]
    spec_path.write_text(json.dumps(spec))
    result = run_cli("cdi", "generate", "--check", "--root", str(root), "--cdi-host-root", str(root), env=env)
    assert result.returncode == 26 and "Traceback" not in result.stderr, result.stderr
    assert "stale" in result.stderr and "\x1b" not in result.stderr


def test_install_wait_rewrites_a_malformed_spec_and_removes_its_ready_file_when_stopped(tmp_path):
    import signal
    import time

    from tests.helpers import start_cli

    root = tmp_path / "host"
    env = fake_host(root, gpus=2)
    make_artifact(tmp_path / "build")
    proc = start_cli("install", "--modules", str(tmp_path / "build"), "--root", str(root), "--cdi-host-root",
                     str(root), "--wait", "--cdi-interval", "1", env=env)
    try:
        ready, spec_path = root / "run/cudabuild/driver/ready", root / "run/cdi/cudabuild-nvidia.json"
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ready.exists()
        spec = json.loads(spec_path.read_text())
        spec["containerEdits"]["mounts"] = "abc"
        spec_path.write_text(json.dumps(spec))
        while json.loads(spec_path.read_text())["containerEdits"]["mounts"] == "abc" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert isinstance(json.loads(spec_path.read_text())["containerEdits"]["mounts"], list), "rewritten"
        assert proc.poll() is None, "still serving"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert not ready.exists()


def test_a_killed_pulls_leftovers_are_removed_by_the_next_stage(tmp_path, registry):  # noqa: F811
    host, env = host_for(tmp_path)
    assert install(host, env, "--registry", registry.repo(), "--driver", "535").returncode == 0
    left = host / "var/lib/cudabuild/staged" / NEXT / ".pull-killed"
    (left / "modules").mkdir(parents=True)
    (left / "modules/nvidia.ko").write_bytes(b"half a layer")
    (host / "boot" / f"vmlinuz-{NEXT}").write_bytes(b"kernel")
    assert run_cli("stage", "--kernel", "next", "--root", str(host), env=env).returncode == 0
    assert not left.exists()


def test_a_node_for_any_driver_keeps_the_one_it_installed_across_a_kernel_update(tmp_path):
    from tests.integration.test_kernel_updates import push_build
    from tests.registry import LocalRegistry

    with LocalRegistry(tmp_path / "registry") as reg:
        push_build(reg, tmp_path / "running", RUNNING, DRIVER)
        push_build(reg, tmp_path / "next", NEXT, DRIVER)
        push_build(reg, tmp_path / "newer", NEXT, "535.400.01")  # a newer driver, for the next kernel only
        host, env = host_for(tmp_path)
        assert install(host, env, "--registry", reg.repo()).returncode == 0  # no --driver: any
        (host / "boot" / f"vmlinuz-{NEXT}").write_bytes(b"kernel")
        staging = run_cli("stage", "--kernel", "next", "--root", str(host), "--json", env=env)
        assert staging.returncode == 0, staging.stderr
        assert json.loads(staging.stdout)["driver"] == DRIVER, "the driver the node runs, not a newer one unasked"
        assert gate(host, env).returncode == 0

        # The waiting driver container stages the same for the next kernel by itself.
        import signal
        import time

        from tests.helpers import start_cli

        host, env = host_for(tmp_path / "waiting")
        proc = start_cli("install", "--root", str(host), "--cdi-host-root", str(host), "--registry", reg.repo(),
                         "--wait", "--poll", "1", env=env)
        try:
            deadline = time.monotonic() + 60
            while not (host / "run/cudabuild/driver/ready").exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            (host / "boot" / f"vmlinuz-{NEXT}").write_bytes(b"kernel")
            staged_next = host / "var/lib/cudabuild/staged" / NEXT
            while not (staged_next.is_dir() and [p for p in staged_next.iterdir() if not p.name.startswith(".")]) \
                    and time.monotonic() < deadline:
                time.sleep(0.2)
            assert [p.name.split("-", 1)[0] for p in staged_next.iterdir() if not p.name.startswith(".")] == [DRIVER]
            assert gate(host, env).returncode == 0
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=30)
