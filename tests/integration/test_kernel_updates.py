"""A node across kernel updates, against a real registry on 127.0.0.1 (Debian's docker-registry) and
a fake host root with the stub insmod: the kernel-agnostic install pulls the running kernel's build
over the registry's HTTP API (no engine), the next kernel is staged, `ready` gates the reboot, a
reboot with the registry gone installs from what was staged, another driver version stands in when
the configured one has no build (and says so), and Debian's kernel hook stages a new kernel.

The builds are small real artifacts (gcc-made modules with the kernel's vermagic and the driver's
version, tests/helpers.make_artifact); tests/e2e/test_one_image_every_kernel.py runs the driver container itself
with real builds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from cudabuild.artifact import image_tag
from tests.helpers import (DRIVER, REPO, fake_host, make_artifact, reboot_fake_host, run_cli, start_cli,
                           wait_for_line)

RUNNING = "6.1.0-47-amd64"
NEXT = "6.1.0-56-amd64"
OTHER = "6.1.0-58-amd64"  # a kernel no registry has a build for


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A registry holding 535.309.01 for RUNNING and NEXT, as REPO/modules:TAG."""
    from tests.registry import LocalRegistry

    base = tmp_path_factory.mktemp("node-registry")
    with LocalRegistry(base / "data") as running:
        for release in (RUNNING, NEXT):
            push_build(running, base / release, release, DRIVER)
        yield running


def push_build(registry, where: Path, release: str, driver: str) -> str:
    manifest = make_artifact(where, release=release, driver=driver)
    tag = image_tag("modules", driver, "proprietary", release).split(":", 1)[1]
    ref = f"{registry.repo()}/modules:{tag}"
    registry.push_directory(ref, where, manifest.labels())
    return ref


def host_for(tmp_path: Path, *, running: str = RUNNING) -> tuple[Path, dict]:
    host = tmp_path / "host"
    env = fake_host(host, gpus=2)
    env["CUDABUILD_KERNEL_RELEASE"] = running
    (host / "boot").mkdir()
    (host / "boot" / f"vmlinuz-{running}").write_bytes(b"kernel")
    return host, env


def install(host: Path, env: dict, *args: str):
    return run_cli("install", "--root", str(host), "--cdi-host-root", str(host), *args, env=env)


def ready_file(host: Path) -> dict:
    return json.loads((host / "run/cudabuild/driver/ready").read_text())


def staged(host: Path) -> dict[str, list[str]]:
    """The builds staged per kernel (a pull still under way is a hidden directory, left out)."""
    top = host / "var/lib/cudabuild/staged"
    return {r.name: sorted(p.name for p in r.iterdir() if not p.name.startswith("."))
            for r in sorted(top.iterdir())} if top.exists() else {}


def reboot(host: Path, env: dict, release: str) -> dict:
    """A reboot into `release`: what it clears, and the kernel seam changed."""
    reboot_fake_host(host)
    return {**env, "CUDABUILD_KERNEL_RELEASE": release}


def test_one_driver_for_every_kernel_next_kernel_staged_and_a_reboot_without_the_registry(tmp_path, registry):
    host, env = host_for(tmp_path)
    # 1. The running kernel's build, from the registry's HTTP API (no engine: DOCKER_HOST leads nowhere).
    env["DOCKER_HOST"] = f"unix://{tmp_path}/no-engine.sock"
    first = install(host, env, "--registry", registry.repo(), "--driver", "535", "--json")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["driver_version"] == DRIVER
    state = ready_file(host)
    assert (state["kernel"], state["driver"], state["source"], state["fallback_from"]) == \
        (RUNNING, DRIVER, "registry", None)
    assert state["ref"].endswith(f"/modules:{DRIVER}-{RUNNING}")
    assert (host / "run/cdi/cudabuild-nvidia.json").is_file() and "nvidia" in (host / "insmod.log").read_text()
    assert list(staged(host)) == [RUNNING]

    # 2. A new kernel installed (Debian's /boot): not ready until its build is staged.
    (host / "boot" / f"vmlinuz-{NEXT}").write_bytes(b"kernel")
    gate = run_cli("ready", "--kernel", "next", "--root", str(host), "--json", env=env)
    assert gate.returncode == 23, gate.stderr
    assert json.loads(gate.stdout)["kernel"] == NEXT and NEXT in gate.stderr and "cudabuild stage" in gate.stderr
    staging = run_cli("stage", "--kernel", "next", "--root", str(host), "--json", env=env)
    assert staging.returncode == 0, staging.stderr
    assert json.loads(staging.stdout)["kernel"] == NEXT and set(staged(host)) == {RUNNING, NEXT}
    gate = run_cli("ready", "--kernel", "next", "--root", str(host), env=env)
    assert gate.returncode == 0, gate.stderr
    assert f"kernel {NEXT}" in gate.stdout
    # A staged copy that changed on disk is not whole: not ready, and staging again replaces it.
    [build] = staged(host)[NEXT]
    module = host / "var/lib/cudabuild/staged" / NEXT / build / "modules" / "nvidia.ko"
    module.write_bytes(module.read_bytes() + b"\0")
    assert run_cli("ready", "--kernel", "next", "--root", str(host), env=env).returncode == 23
    assert run_cli("stage", "--kernel", "next", "--root", str(host), env=env).returncode == 0
    assert run_cli("ready", "--kernel", "next", "--root", str(host), env=env).returncode == 0
    assert staged(host)[NEXT] == [build]

    # 3. The "reboot" into NEXT with the registry stopped: installed from the staged build.
    after = reboot(host, env, NEXT)
    registry.__exit__(None, None, None)
    try:
        again = install(host, after, "--json")  # the driver and registry the node was configured with
    finally:
        registry.__enter__()  # for the other tests of this module
    assert again.returncode == 0, again.stderr
    state = ready_file(host)
    assert (state["kernel"], state["source"]) == (NEXT, "staged"), state
    status = run_cli("status", "--root", str(host), "--json", env=after)
    assert status.returncode == 0, status.stderr
    said = json.loads(status.stdout)
    assert said["running_kernel"] == NEXT and said["driver"]["source"] == "staged"
    assert said["config"] == {"driver": "535", "registry": registry.repo(), "fallback": True,
                              "flavor": "proprietary", "installed": DRIVER}, "the node records its flavour and driver"


def test_a_kernel_whose_build_is_missing_is_not_ready_and_the_reason_names_it(tmp_path, registry):
    host, env = host_for(tmp_path)
    assert install(host, env, "--registry", registry.repo(), "--driver", "535").returncode == 0
    (host / "boot/loader/entries").mkdir(parents=True)  # an ostree host's BLS entry, no /boot/vmlinuz-OTHER
    (host / "boot/loader/entries/ostree-1.conf").write_text(
        f"title Fedora CoreOS (ostree:0)\nversion 2\nlinux /ostree/fcos-0123/vmlinuz-{OTHER}\n"
        f"initrd /ostree/fcos-0123/initramfs-{OTHER}.img\noptions root=UUID=x\n")
    gate = run_cli("ready", "--kernel", "next", "--root", str(host), env=env)
    assert gate.returncode == 23 and OTHER in gate.stderr and "535" in gate.stderr
    staging = run_cli("stage", "--kernel", "next", "--root", str(host), env=env)
    assert staging.returncode == 23
    assert OTHER in staging.stderr and "535" in staging.stderr and registry.repo() in staging.stderr
    assert list(staged(host)) == [RUNNING], "nothing half-staged"


def test_the_waiting_driver_container_stages_the_next_kernel_by_itself(tmp_path, registry):
    host, env = host_for(tmp_path)
    (host / "boot/loader/entries").mkdir(parents=True)
    proc = start_cli("install", "--root", str(host), "--cdi-host-root", str(host), "--registry", registry.repo(),
                     "--driver", "535", "--wait", "--poll", "1", env=env)
    try:
        deadline = time.monotonic() + 60
        while not (host / "run/cudabuild/driver/ready").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ready_file(host)["kernel"] == RUNNING
        (host / "boot/loader/entries/ostree-2.conf").write_text(f"title next\nversion 3\nlinux /ostree/x/vmlinuz-{NEXT}\n")
        while not staged(host).get(NEXT) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert staged(host).get(NEXT), "the waiting container staged the next kernel"
        assert run_cli("ready", "--kernel", "next", "--root", str(host), env=env).returncode == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert not (host / "run/cudabuild/driver/ready").exists(), "stopped: the ready file is removed"


def test_another_driver_stands_in_and_says_so_unless_the_fallback_is_off(tmp_path, registry):
    host, env = host_for(tmp_path)
    fell = install(host, env, "--registry", registry.repo(), "--driver", "550")
    assert fell.returncode == 0, fell.stderr
    assert "FALLBACK" in fell.stderr and "550" in fell.stderr and DRIVER in fell.stderr
    state = ready_file(host)
    assert (state["driver"], state["fallback_from"]) == (DRIVER, "550")
    said = json.loads(run_cli("status", "--root", str(host), "--json", env=env).stdout)
    assert said["driver"]["fallback_from"] == "550"
    human = run_cli("status", "--root", str(host), env=env)
    assert "FALLBACK from 550" in human.stdout

    strict_host, strict_env = host_for(tmp_path / "strict")
    refused = install(strict_host, strict_env, "--registry", registry.repo(), "--driver", "550", "--no-fallback")
    assert refused.returncode == 23, refused.stderr
    assert "550" in refused.stderr and RUNNING in refused.stderr and "fallback" in refused.stderr
    assert not (strict_host / "run/cudabuild/driver/ready").exists()
    waiting = start_cli("install", "--root", str(strict_host), "--cdi-host-root", str(strict_host), "--registry",
                        registry.repo(), "--driver", "550", "--no-fallback", "--wait", "--poll", "1", env=strict_env)
    try:
        said = wait_for_line(waiting, "not ready: waiting for a verified build of kernel", timeout=60)
    finally:
        waiting.send_signal(signal.SIGTERM)
        waiting.communicate(timeout=30)
    assert "550" in said and registry.repo() in said and RUNNING in said
    assert not (strict_host / "run/cudabuild/driver/ready").exists()


def host_cudabuild(host: Path) -> Path:
    """The host's own cudabuild at /usr/local/bin (this checkout's, run with the fake root's seams)."""
    program = host / "usr/local/bin/cudabuild"
    program.parent.mkdir(parents=True, exist_ok=True)
    program.write_text(f"#!/bin/sh\nexec {REPO / '.venv' / 'bin' / 'cudabuild'} \"$@\"\n")
    program.chmod(0o755)
    return program


def test_debians_kernel_hook_stages_the_new_kernel_and_never_fails_a_kernel_install(tmp_path, registry):
    host, env = host_for(tmp_path)
    program = host_cudabuild(host)
    made = install(host, env, "--registry", registry.repo(), "--driver", "535", "--kernel-hook")
    assert made.returncode == 0, made.stderr
    hook = host / "etc/kernel/postinst.d/cudabuild"
    assert os.access(hook, os.X_OK)
    assert f"cudabuild='{program}'" in hook.read_text(), "the host's cudabuild, by its absolute path"
    hook_env = {**env, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}  # dpkg's PATH: no .venv on it
    (host / "boot" / f"vmlinuz-{NEXT}").write_bytes(b"kernel")
    ran = subprocess.run([str(hook), NEXT, f"/boot/vmlinuz-{NEXT}"], env=hook_env, capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    assert NEXT in staged(host)

    # A kernel with no build: the hook says so and exits 0, and the gate holds the reboot.
    (host / "boot" / f"vmlinuz-{OTHER}").write_bytes(b"kernel")
    failed = subprocess.run([str(hook), OTHER, f"/boot/vmlinuz-{OTHER}"], env=hook_env, capture_output=True, text=True)
    assert failed.returncode == 0, failed.stderr
    assert OTHER in failed.stderr and registry.repo() in failed.stderr and "not staged" in failed.stderr
    assert run_cli("ready", "--kernel", "next", "--root", str(host), env=env).returncode == 23

    # As Debian's kernel postinst runs the hooks: run-parts --exit-on-error; the later hooks still run,
    # whatever failed inside ours (no build, its cudabuild gone).
    hooks = tmp_path / "postinst.d"
    hooks.mkdir()
    (hooks / "cudabuild").write_bytes(hook.read_bytes())
    (hooks / "cudabuild").chmod(0o755)
    for later in ("dkms", "initramfs-tools", "zz-update-grub"):
        (hooks / later).write_text(f"#!/bin/sh\necho {later} \"$@\" >> {tmp_path}/ran\n")
        (hooks / later).chmod(0o755)
    for case in ("no build", "no cudabuild"):
        if case == "no cudabuild":
            program.unlink()
        (tmp_path / "ran").unlink(missing_ok=True)
        parts = subprocess.run(["run-parts", "--report", "--exit-on-error", f"--arg={OTHER}",
                                f"--arg=/boot/vmlinuz-{OTHER}", str(hooks)], env=hook_env, capture_output=True,
                               text=True)
        assert parts.returncode == 0, (case, parts.stderr)
        assert (tmp_path / "ran").read_text().split("\n")[:3] == [f"{h} {OTHER} /boot/vmlinuz-{OTHER}" for h in
                                                                  ("dkms", "initramfs-tools", "zz-update-grub")], case
        assert OTHER in parts.stderr, case


def test_a_driver_container_writes_no_hook_the_host_cannot_run(tmp_path, registry):
    host, env = host_for(tmp_path)  # no cudabuild on the host's file system
    made = install(host, env, "--registry", registry.repo(), "--driver", "535", "--kernel-hook")
    assert made.returncode == 0, made.stderr
    assert not (host / "etc/kernel/postinst.d/cudabuild").exists()
    assert "no kernel hook written" in made.stderr and "/usr/local/bin/cudabuild" in made.stderr


def test_a_layer_changed_in_the_registry_is_refused_and_nothing_is_staged(tmp_path):
    """The registry's stored layer rewritten on its disk (the registry serves it as it is): the
    node checks the blob against its digest, refuses it, stages nothing and says why."""
    from tests.registry import LocalRegistry

    release = "6.1.0-44-amd64"
    with LocalRegistry(tmp_path / "registry") as tampered:
        ref = push_build(tampered, tmp_path / "build", release, DRIVER)
        blobs = sorted((tmp_path / "registry" / "data").rglob("blobs/sha256/*/*/data"), key=lambda p: p.stat().st_size)
        layer = blobs[-1]  # the largest blob: the layer (the others are the config and the manifest)
        data = bytearray(layer.read_bytes())
        data[len(data) // 2] ^= 0xFF
        layer.write_bytes(bytes(data))
        host, env = host_for(tmp_path, running=release)
        refused = install(host, env, "--registry", tampered.repo(), "--driver", "535", "--no-fallback")
    assert refused.returncode == 23, refused.stderr
    assert "does not match its digest" in refused.stderr and ref in refused.stderr
    assert staged(host) == {release: []}, "nothing staged, no partial pull left"
    assert not (host / "run/cudabuild/driver/ready").exists()


def test_a_trixie_node_with_580_open_stages_its_next_kernels_in_package_order(tmp_path):
    """Debian 13's kernels with NVIDIA's 580 (open, the default from 560): a node running
    6.12.107+deb13 installs 580 from the registry; 6.12.117+deb13 and the ABI bump 6.12.115+deb13.1 are
    installed; the next kernel is 6.12.117 (6.12.115-2 is older than 6.12.117-1, whatever the name's
    ".1" looks like), staged and gated, the reboot installs it from what was staged; then the boot
    loader's default names 6.12.115+deb13.1, which becomes the next kernel, staged in turn."""
    from tests.registry import LocalRegistry

    first, second, bump = "6.12.107+deb13-amd64", "6.12.117+deb13-amd64", "6.12.115+deb13.1-amd64"
    driver = "580.142"
    with LocalRegistry(tmp_path / "registry") as trixie:
        for release in (first, second, bump):
            manifest = make_artifact(tmp_path / "builds" / release, release=release, driver=driver, flavor="open")
            tag = image_tag("modules", driver, "open", release).split(":", 1)[1]
            trixie.push_directory(f"{trixie.repo()}/modules:{tag}", tmp_path / "builds" / release, manifest.labels())
        host, env = host_for(tmp_path, running=first)
        env["FAKE_VERSION"] = driver
        done = install(host, env, "--registry", trixie.repo(), "--driver", "580", "--json")
        assert done.returncode == 0, done.stderr
        state = ready_file(host)
        assert (state["kernel"], state["driver"], state["flavor"]) == (first, driver, "open")
        for release in (second, bump):
            (host / "boot" / f"vmlinuz-{release}").write_bytes(b"kernel")
        gate = run_cli("ready", "--kernel", "next", "--root", str(host), "--json", env=env)
        assert gate.returncode == 23 and json.loads(gate.stdout)["kernel"] == second, gate.stdout
        assert run_cli("stage", "--kernel", "next", "--root", str(host), env=env).returncode == 0
        assert run_cli("ready", "--kernel", "next", "--root", str(host), env=env).returncode == 0
        assert set(staged(host)) == {first, second}

        after = reboot(host, env, second)
        again = install(host, after, "--json")
        assert again.returncode == 0, again.stderr
        assert (ready_file(host)["kernel"], ready_file(host)["source"]) == (second, "staged")
        gate = run_cli("ready", "--kernel", "next", "--root", str(host), "--json", env=after)
        assert gate.returncode == 0, "6.12.115+deb13.1 is older: the running kernel is the next one"

        (host / "boot/loader/entries").mkdir(parents=True)
        (host / "boot/loader/entries/debian-bump.conf").write_text(f"title Debian\nlinux /vmlinuz-{bump}\n")
        (host / "boot/loader/loader.conf").write_text("default debian-bump.conf\n")
        gate = run_cli("ready", "--kernel", "next", "--root", str(host), "--json", env=after)
        assert gate.returncode == 23 and json.loads(gate.stdout)["kernel"] == bump
        staging = run_cli("stage", "--kernel", "next", "--root", str(host), "--json", env=after)
        assert staging.returncode == 0, staging.stderr
        assert run_cli("ready", "--kernel", "next", "--root", str(host), env=after).returncode == 0
        assert bump in staged(host)
