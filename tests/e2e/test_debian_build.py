"""A real build: Debian's newest bookworm kernel headers with Debian's current 535 driver."""

import json
import os
import re
import subprocess
from pathlib import Path

import docker
import pytest

from tests.helpers import run_cli_watched

pytestmark = [pytest.mark.engine, pytest.mark.build]


def symvers_of(cache: Path, release: str) -> Path:
    [path] = cache.glob(f"kernels/*/usr/src/linux-headers-{release}/Module.symvers")
    return path


def modinfo(field: str, path: str) -> str:
    return subprocess.run(["/sbin/modinfo", "-F", field, path], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_builds_every_module_of_the_driver(build):
    data, output, _, stderr = build
    assert data["cache_hit"] is False
    assert data["driver_version"].startswith("535.")
    assert [m["name"] for m in data["modules"]] == ["nvidia", "nvidia-uvm", "nvidia-modeset", "nvidia-drm",
                                                    "nvidia-peermem"]
    for step in ("download", "make modules", "verify modules"):
        assert any(s["name"].startswith(step) and s["status"] == "done" for s in data["steps"]), step
    # The image is made, or reused when one with the same content key already exists.
    assert any("modules image" in s["name"] for s in data["steps"])
    assert "==> make modules" in stderr, "progress is shown as named steps"


def test_the_build_ran_unprivileged_with_the_kernel_trees_read_only(build):
    """What the build container itself reported: no root, no capabilities, kernel trees it cannot
    change (build.sh refuses to build otherwise)."""
    data, _, _, _ = build
    log = (Path(data["cache_dir"]) / "build.log").read_text()
    uid = 65534 if os.geteuid() == 0 else os.geteuid()
    assert f"builder: uid {uid}, capabilities 0000000000000000, kernel trees read-only" in log


def test_option_probes_are_answered_once_and_as_the_compiler_answers(build):
    """builder/compiler.sh: in the session's cold build, the compiler ran each distinct option probe
    (a compile of /dev/null) once and the wrapper gave the same answer to the ~1500 repeats of
    NVIDIA's Kbuild; and in the build's own image, the wrapper's answers, first and repeated, are
    the compiler's: exit status, messages, object."""
    data, _, _, _ = build
    log = (Path(data["cache_dir"]) / "build.log").read_text()
    [(asked, again)] = re.findall(r"option probes: (\d+) asked the compiler, (\d+) more answered", log)
    assert 0 < int(asked) < 100 and int(again) > 1000, (asked, again)

    script = """
        set -u; export WORK=/tmp/w; mkdir -p $WORK/bin /tmp/p
        printf '#!/bin/sh\\ncb_real=/usr/bin/gcc-12\\n. /cudabuild/builder/compiler.sh\\n' > $WORK/bin/gcc-12
        chmod 755 $WORK/bin/gcc-12
        for n in 1 2; do for option in -fshort-wchar -fno-such-option -Wno-pointer-sign; do
            for cc in $WORK/bin/gcc-12 /usr/bin/gcc-12; do
                rm -f /tmp/p/o; $cc -Werror -O2 $option -c -x c /dev/null -o /tmp/p/o 2>/tmp/p/err; status=$?
                echo "$n $option $status $(sha256sum < /tmp/p/err | cut -c1-16) $(cat /tmp/p/o 2>/dev/null | sha256sum | cut -c1-16)"
            done
        done; done
        echo $(sort $WORK/compiler-answers.log | uniq -c)
    """
    manifest = json.loads((Path(data["cache_dir"]) / "manifest.json").read_text())
    out = docker.from_env().containers.run(
        manifest["builder_image"]["tag"], ["sh", "-c", script], remove=True, network_mode="none",
        volumes={str(Path(__file__).parents[2] / "builder"): {"bind": "/cudabuild/builder", "mode": "ro"}},
    ).decode().splitlines()
    *answers, counts = out
    assert len(answers) == 12
    for wrapped, compiler in zip(answers[::2], answers[1::2]):
        assert wrapped == compiler  # the same status, messages and object, first asked or repeated
    assert [a.split()[2] for a in answers[:6:2]] == ["0", "1", "0"]  # a probe that fails stays failed
    assert counts.split() == ["3", "again", "3", "asked"]


def test_modinfo_agrees_with_the_request(build):
    data, output, _, _ = build
    for module in data["modules"]:
        for path in (module["path"], str(output / "modules" / Path(module["path"]).name)):
            assert modinfo("vermagic", path).startswith(data["kernel_release"] + " ")
            assert modinfo("version", path) == data["driver_version"]


def test_symbol_crcs_agree_with_the_kernels_module_symvers(build, tmp_path):
    data, output, cache, _ = build
    release = data["kernel_release"]
    extra = tmp_path / "lib" / "modules" / release / "extra"
    extra.mkdir(parents=True)
    for ko in (output / "modules").glob("*.ko"):
        (extra / ko.name).symlink_to(ko)
    symvers = symvers_of(cache, release)
    check = subprocess.run(["/sbin/depmod", "-b", str(tmp_path), "-e", "-E", str(symvers), release],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert "disagrees about version" not in check.stderr
    exported = {line.split("\t")[1]: line.split("\t")[2] for line in symvers.read_text().splitlines()}
    unknown = [line.rsplit(" ", 1)[-1] for line in check.stderr.splitlines() if "needs unknown symbol" in line]
    # depmod only knows vmlinux's symbols and those of the modules beside ours; the rest must be
    # exports of the kernel's own modules (drm, ...), which the kernel's Module.symvers lists.
    assert all(exported.get(sym, "vmlinux") != "vmlinux" for sym in unknown), unknown


def test_output_directory_holds_modules_userspace_and_manifest(build):
    data, output, _, _ = build
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["kernel_release"] == data["kernel_release"]
    assert {m["sha256"] for m in manifest["modules"]} == {m["sha256"] for m in data["modules"]}
    lib = output / "userspace" / "lib"
    assert (lib / "libcuda.so.1").resolve().name == f"libcuda.so.{data['driver_version']}"
    assert (lib / f"libnvidia-ml.so.{data['driver_version']}").is_file()
    assert (output / "userspace" / "bin" / "nvidia-smi").is_file()


def test_modules_image_has_two_layers(build):
    data, _, _, _ = build
    image = docker.from_env().images.get(data["modules_image"])
    assert len(image.attrs["RootFS"]["Layers"]) == 2  # the userspace, then the modules and manifest
    assert image.labels["io.cudabuild.driver-version"] == data["driver_version"]
    assert image.labels["io.cudabuild.kernel-release"] == data["kernel_release"]


def test_second_run_answers_from_the_cache_without_a_container(build):
    data, _, cache, _ = build
    again, created = run_cli_watched("modules", "--kernel", data["kernel_release"], "--driver", data["driver_version"],
                                     "--json", env={"CUDABUILD_CACHE": str(cache)})
    assert again.returncode == 0, again.stderr
    hit = json.loads(again.stdout)
    assert hit["cache_hit"] is True
    assert [m["sha256"] for m in hit["modules"]] == [m["sha256"] for m in data["modules"]]
    assert created == [], "a cache hit starts no container"
