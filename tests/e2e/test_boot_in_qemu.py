"""The real kernel as the judge: Debian's own kernels booted in QEMU (TCG) with the modules built
in this session and the image's real loader. Nothing is loaded on this machine."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from tests.helpers import STANDINS, run_cli

pytestmark = [pytest.mark.engine, pytest.mark.build]


def host_modules() -> set[str]:
    """The modules loaded on this machine: /proc/modules where the kernel loads modules at all (some
    VMs' kernels have no module support), and no NVIDIA module in /sys/module in any case."""
    loaded = set(Path("/proc/modules").read_text().split("\n")) if Path("/proc/modules").exists() else set()
    assert not [m for m in Path("/sys/module").iterdir() if m.name.startswith("nvidia")]
    return {line.split()[0] for line in loaded if line}


@pytest.fixture(scope="module")
def before_modules():
    return host_modules()


@pytest.fixture(scope="module")
def other_kernel_deb(tmp_path_factory) -> Path:
    """Debian's linux-image package of another ABI (6.1.0-47) than the modules were built for."""
    from cudabuild.store.cache import Cache
    from cudabuild.store.fetch import Fetcher
    from cudabuild.sources.debian import DebianArchive
    from cudabuild.ui import Reporter

    reporter = Reporter(quiet=True)
    cache = Cache(STANDINS / "standin-cache")
    archive = DebianArchive(cache=cache, fetcher=Fetcher(reporter=reporter), reporter=reporter,
                            mirror="http://deb.debian.org/debian", security_mirror="http://deb.debian.org/debian-security",
                            distribution="bookworm")
    package = archive.kernel_image("6.1.0-47-amd64")
    stored = Fetcher(reporter=reporter).fetch(package.url, store=cache.downloads, sha256=package.sha256,
                                              size=package.size)
    deb = tmp_path_factory.mktemp("kernel") / package.filename.rsplit("/", 1)[-1]
    deb.symlink_to(stored)
    return deb


def boot(*args, cache: Path) -> tuple[int, dict | None, str]:
    result = run_cli("boot-test", *args, "--json", env={"CUDABUILD_CACHE": str(cache)})
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, json.loads(result.stdout) if result.stdout.strip() else None, result.stderr


def test_modules_boot_test_accepts_nvidia_and_shows_the_real_loader(build, before_modules):
    data, _, cache, _ = build
    result = run_cli("modules", "--kernel", data["kernel_release"], "--driver", data["driver_version"],
                     "--boot-test", "--json", env={"CUDABUILD_CACHE": str(cache)})
    assert result.returncode == 0, result.stderr[-3000:]
    boot_test = json.loads(result.stdout)["boot_test"]
    verdicts = {m["name"]: m for m in boot_test["modules"]}
    assert boot_test["kernel"] == data["kernel_release"] and boot_test["accelerator"] in ("tcg", "kvm")
    assert verdicts["nvidia"]["verdict"] == "accepted"
    assert any("NVRM: No NVIDIA GPU found." in line for line in verdicts["nvidia"]["kernel_said"])
    for dependent in ("nvidia-uvm", "nvidia-modeset", "nvidia-drm"):
        assert verdicts[dependent]["verdict"] == "not tried", verdicts[dependent]
    # The image's real loader ran in the guest, with real insmod, and said why it stopped.
    assert boot_test["loader"]["exit_code"] == 14
    assert any("loading nvidia.ko failed" in line for line in boot_test["loader"]["said"])
    assert boot_test["verdict"] == "accepted" and boot_test["seconds"] > 0
    # The verdict is kept: in the cached manifest, the modules image's labels, and what inspect says.
    inspected = json.loads(run_cli("inspect", data["modules_image"], "--json").stdout)
    assert inspected["boot_test"] == f"accepted by {data['kernel_release']} ({boot_test['accelerator']})"
    assert host_modules() == before_modules, "nothing was loaded on this machine"


def test_a_kernel_the_modules_were_not_built_for_rejects_them(build, other_kernel_deb, tmp_path, before_modules):
    _, output, cache, _ = build
    code, result, stderr = boot("--modules", str(output), "--kernel-image", str(other_kernel_deb), cache=cache)
    assert code == 7, stderr[-2000:]
    nvidia = next(m for m in result["modules"] if m["name"] == "nvidia")
    assert result["kernel"] == "6.1.0-47-amd64"
    assert nvidia["verdict"] == "rejected" and "invalid module format" in nvidia["reason"]
    assert any("nvalid module format" in line for line in nvidia["kernel_said"]), nvidia
    assert "refused nvidia.ko" in stderr and host_modules() == before_modules


def _change_crc(module: Path, symbol: bytes) -> None:
    with open(module, "r+b") as f:
        versions = ELFFile(f).get_section_by_name("__versions")
        offset, size = versions["sh_offset"], versions["sh_size"]
        f.seek(offset)
        data = f.read(size)
        for entry in range(0, size, 64):
            if data[entry + 8:entry + 64].split(b"\0", 1)[0] == symbol:
                (crc,) = struct.unpack_from("<Q", data, entry)
                f.seek(offset + entry)
                f.write(struct.pack("<Q", crc ^ 0x5A5A5A5A))
                return
    raise AssertionError(f"{symbol!r} is not in {module}'s __versions")


def test_a_changed_symbol_crc_is_refused(build, tmp_path, before_modules):
    _, output, cache, _ = build
    changed = tmp_path / "changed"
    shutil.copytree(output, changed, symlinks=True)
    ko = changed / "modules" / "nvidia.ko"
    _change_crc(ko, b"_printk")
    # As it stands, cudabuild's own check refuses it before any boot: the digest is not the manifest's.
    code, _, stderr = boot("--modules", str(changed), cache=cache)
    assert code == 3 and "modules/nvidia.ko has sha256" in stderr
    # With a manifest made to match, the kernel itself judges it.
    manifest = json.loads((changed / "manifest.json").read_text())
    entry = next(m for m in manifest["modules"] if m["name"] == "nvidia")
    entry["sha256"] = hashlib.sha256(ko.read_bytes()).hexdigest()
    (changed / "manifest.json").write_text(json.dumps(manifest))
    code, result, stderr = boot("--modules", str(changed), cache=cache)
    assert code == 7, stderr[-2000:]
    nvidia = next(m for m in result["modules"] if m["name"] == "nvidia")
    assert nvidia["verdict"] == "rejected" and "CRC" in nvidia["reason"]
    assert any("disagrees about version of symbol _printk" in line for line in nvidia["kernel_said"]), nvidia
    assert host_modules() == before_modules


def test_enforced_signatures_reject_unsigned_modules_only_on_nodes_that_enforce_them(build, tmp_path,
                                                                                      before_modules):
    """The what-if question a Secure Boot user asks of the cached build (issue 30, 4b): the verdict
    is kept with the command line it was judged under, and it stops the build only on a node that
    enforces signatures; on every other node the same build stays ready."""
    from tests.helpers import fake_host

    data, output, cache, _ = build
    cached = Path(data["cache_dir"])
    kept = (cached / "manifest.json").read_bytes()
    try:
        code, result, stderr = boot("--modules", str(cached), "--append", "module.sig_enforce=1", cache=cache)
        assert code == 7, stderr[-2000:]
        assert result["append"] == "module.sig_enforce=1"
        nvidia = next(m for m in result["modules"] if m["name"] == "nvidia")
        assert nvidia["verdict"] == "rejected" and "unsigned" in nvidia["reason"], nvidia
        assert host_modules() == before_modules
        recorded = json.loads((cached / "manifest.json").read_text())
        assert [(v["verdict"], v["append"]) for v in recorded["boot_tests"]][-1] == ("rejected", "module.sig_enforce=1")

        # The same build staged on a node for its kernel, as `stage` keeps it.
        release = recorded["kernel_release"]
        root = tmp_path / "node"
        env = {**fake_host(root), "CUDABUILD_KERNEL_RELEASE": release}
        shutil.copytree(cached, root / "var/lib/cudabuild/staged" / release / "build", symlinks=True)
        ready = run_cli("ready", "--kernel", release, "--root", str(root), env=env)
        assert ready.returncode == 0, ready.stderr  # this node does not enforce signatures
        (root / "sys/module/module/parameters").mkdir(parents=True)
        (root / "sys/module/module/parameters/sig_enforce").write_text("Y\n")
        held = run_cli("ready", "--kernel", release, "--root", str(root), env=env)
        assert held.returncode == 23, held.stderr
        assert "rejected it in its boot test with 'module.sig_enforce=1'" in held.stderr
    finally:
        (cached / "manifest.json").write_bytes(kept)  # the session's build as it was, for the other tests


def guests_of(cache: Path) -> list[int]:
    """The QEMU processes booting from this cache (their initramfs is in it)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmdline and cmdline[0].endswith(b"qemu-system-x86_64") and any(str(cache).encode() in a for a in cmdline):
            found.append(int(proc.name))
    return found


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT"])
def test_a_stopped_boot_test_leaves_no_guest_running(build, other_kernel_deb, how):
    """Ctrl-C (SIGINT) or SIGTERM while the guest boots: cudabuild stops, and so does QEMU."""
    import os
    import signal
    import subprocess
    import sys
    import time

    _, output, cache, _ = build
    exe = Path(sys.executable).parent / "cudabuild"
    with subprocess.Popen([str(exe), "boot-test", "--modules", str(output), "--kernel-image", str(other_kernel_deb)],
                          env={**os.environ, "CUDABUILD_CACHE": str(cache)}, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True) as process:
        try:
            for _ in range(600):
                if guests_of(cache) or process.poll() is not None:
                    break
                time.sleep(0.2)
            assert guests_of(cache), f"the guest never started: {process.stderr.read() if process.poll() else ''}"
            process.send_signal(getattr(signal, how))
            assert process.wait(60) != 0
            assert "Traceback" not in process.stderr.read()
            for _ in range(50):
                if not guests_of(cache):
                    break
                time.sleep(0.2)
            assert guests_of(cache) == [], f"QEMU still runs after {how}"
        finally:
            for pid in guests_of(cache):
                os.kill(pid, signal.SIGKILL)
            process.kill()
