"""Today's platforms, with real inputs: Debian 13 trixie's kernels and drivers from its archive, and
NVIDIA's current branches (580.142 LTS, 595.45.04) built from NVIDIA's released open-module sources
(../shared/nvidia), judged by trixie's own kernel in a QEMU guest, and carried through what a node
and a fleet do with them. The builds run in the background (tests/background.py trixie_builds).

The installers of 580.142 and 595.45.04 carry kernel-open/ as NVIDIA releases it, with nv-kernel.o
and nv-modeset-kernel.o compiled from the same release's src/; their userspace (libcuda,
libnvidia-ml, nvidia-smi, firmware) is a STAND-IN (scripts/standin-open-installer): NVIDIA's
userspace is not open. What the tests check of it is what cudabuild does with it (collect, link,
bake, list in the CDI spec), not NVIDIA's libraries."""

import json
import re
import subprocess
from pathlib import Path

import docker
import pytest

from tests.background import OPEN_580, OPEN_595, ONLY_580
from tests.helpers import (STANDINS, bookworm_archive, cdi_validator, fake_host, run_cli, run_cli_watched,
                           run_device_query)

pytestmark = [pytest.mark.engine, pytest.mark.build]


@pytest.fixture(scope="module")
def trixie(trixie_builds_started) -> dict:
    return trixie_builds_started.wait()


def result(trixie: dict, name: str) -> dict:
    done = trixie[name]
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


def manifest(data: dict) -> dict:
    return json.loads((Path(data["cache_dir"]) / "manifest.json").read_text())


def cache_env(trixie: dict) -> dict:
    return {"CUDABUILD_CACHE": str(trixie["cache"])}


def modinfo(field: str, path: str) -> str:
    return subprocess.run(["/sbin/modinfo", "-F", field, path], capture_output=True, text=True,
                          check=True).stdout.strip()


# ---- 1. Debian 13 trixie ----------------------------------------------------------------------------------
def test_latest_trixie_is_the_newest_kernel_across_its_suites_built_with_debians_550_and_gcc_14(trixie):
    data = result(trixie, "550")
    archive = bookworm_archive("trixie")
    newest = archive.latest_kernel()
    headers = archive.versions(f"linux-headers-{newest}")[0]
    assert data["kernel_release"] == newest and headers.suite.startswith("trixie")
    assert (data["driver_version"], data["flavor"]) == ("550.163.01", "proprietary")
    assert [m["name"] for m in data["modules"]] == ["nvidia", "nvidia-uvm", "nvidia-modeset", "nvidia-drm",
                                                    "nvidia-peermem"]
    for module in data["modules"]:
        assert modinfo("vermagic", module["path"]).startswith(f"{newest} SMP preempt mod_unload modversions")
        sections = subprocess.run(["readelf", "-S", "-W", module["path"]], capture_output=True, text=True).stdout
        assert " .BTF " in sections, f"{module['name']} has BTF, as Debian's own modules (pahole in the builder)"
    log = (Path(data["cache_dir"]) / "build.log").read_text()
    assert "compiler: gcc-14" in log and "x86_64-linux-gnu-gcc-14 (Debian 14" in log
    err = trixie["550"].stderr
    assert "builder base: debian:trixie (gcc 14" in err
    assert "the modules will be unsigned" in err and "--sign-key" in err, "Secure Boot said once"
    assert err.count("the modules will be unsigned") == 1


def test_trixies_real_kernel_runs_the_550_modules_init(trixie):
    data = result(trixie, "550")
    boot = manifest(data)["boot_tests"][-1]
    verdicts = {m["name"]: m for m in boot["modules"]}
    assert boot["verdict"] == "accepted" and boot["kernel"] == data["kernel_release"]
    assert verdicts["nvidia"]["verdict"] == "accepted"
    assert any("NVRM: No NVIDIA GPU found." in line for line in verdicts["nvidia"]["kernel_said"])


def test_tesla_535_builds_for_trixie_and_the_open_550_says_why_it_cannot(trixie):
    tesla = result(trixie, "535 cloud")
    assert (tesla["driver_version"], tesla["flavor"]) == ("535.274.02", "proprietary")
    assert "nvidia-tesla-535-kernel-source" in trixie["535 cloud"].stderr
    assert modinfo("version", tesla["modules"][0]["path"]) == "535.274.02"
    userspace = [f["path"] for f in manifest(tesla)["userspace"]]
    assert "lib/libcuda.so.535.274.02" in userspace, "libnvidia-tesla-535-cuda1's library"
    # contrib's nvidia-open-kernel-source 550.163.01 (trixie's -2 and backports' -4~bpo13+1 alike) calls
    # pci_resize_resource() with three arguments; trixie's 6.12 kernels have the fourth (exclude_bars),
    # which 580's conftest knows: the build fails at make and says which driver supports the kernel
    opened = trixie["550 open"]
    assert opened.returncode == 6, opened.stderr[-3000:]
    assert "nvidia-open-kernel-source 550.163.01-4~bpo13+1" in opened.stderr and "(--backports)" in opened.stderr
    assert "predate this kernel's API (too few arguments to function pci_resize_resource)" in opened.stderr
    assert "--driver-source run --driver 580.142" in opened.stderr


def test_a_cloud_kernel_has_no_drm_and_the_build_says_it_left_nvidia_drm_out(trixie):
    cloud = result(trixie, "535 cloud")  # asked for nvidia,nvidia-modeset,nvidia-drm
    assert cloud["kernel_release"] == trixie["cloud_release"]
    assert [m["name"] for m in cloud["modules"]] == ["nvidia", "nvidia-modeset"]
    said = trixie["535 cloud"].stderr
    assert "has no DRM" in said and "nvidia-drm is left out" in said


def test_an_rt_kernel_is_refused_before_any_download_unless_asked(trixie, tmp_path):
    refused, created = run_cli_watched("modules", "--kernel", trixie["rt_release"], "--only-modules", "nvidia",
                                       env={"CUDABUILD_CACHE": str(tmp_path / "cache")})
    assert refused.returncode == 3, refused.stderr
    assert "PREEMPT_RT" in refused.stderr and "--ignore-preempt-rt" in refused.stderr
    assert created == [] and "download" not in refused.stderr
    asked = result(trixie, "rt")
    assert asked["kernel_release"] == trixie["rt_release"]
    assert "IGNORE_PREEMPT_RT_PRESENCE=1" in (Path(asked["cache_dir"]) / "build.log").read_text()


def test_a_kernel_past_what_debians_driver_was_tested_with_is_refused_naming_a_driver_for_it(tmp_path):
    archive = bookworm_archive("trixie")
    newer = next((r for r in archive.kernel_releases() if r.startswith("7.") and r.endswith("+deb13-amd64")), None)
    if newer is None:
        pytest.skip("trixie-backports has no 7.x kernel today")
    refused, created = run_cli_watched("modules", "--kernel", newer, env={"CUDABUILD_CACHE": str(tmp_path / "c")})
    assert refused.returncode == 3 and created == []
    assert "6.15" in refused.stderr and "--driver-source run --driver 580" in refused.stderr
    assert "download" not in refused.stderr


def test_a_trixie_host_builds_for_itself_by_default(trixie, tmp_path):
    """Plain `cudabuild modules` on a trixie host: its os-release and its running kernel decide."""
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "os-release").write_text('PRETTY_NAME="Debian GNU/Linux 13 (trixie)"\nID=debian\n'
                                                  "VERSION_ID=\"13\"\nVERSION_CODENAME=trixie\n")
    done = run_cli("modules", "--json", env={**cache_env(trixie), "CUDABUILD_ROOT": str(tmp_path),
                                             "CUDABUILD_KERNEL_RELEASE": trixie["latest"]})
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["cache_hit"] is True and data["cache_dir"] == result(trixie, "550")["cache_dir"]
    assert f"kernel: {trixie['latest']} (this host's `uname -r`" in done.stderr


def test_a_bookworm_host_running_a_backports_kernel_finds_its_headers_in_backports():
    """Planned only (nothing built): bookworm-backports' 6.12 kernel, no --distribution given."""
    import os

    from cudabuild.compile.plan import plan_modules
    from cudabuild.settings import Services, Settings
    from cudabuild.ui import Reporter

    archive = bookworm_archive()  # a release only bookworm-backports has (bookworm-security carries some 6.12 too)
    backports = next(r for r in archive.kernel_releases() if r.endswith("+deb12-amd64")
                     and r not in archive.kernel_releases(backports=False))
    settings = Settings.from_env({**os.environ, "CUDABUILD_CACHE": str(STANDINS / "standin-cache")})
    plan = plan_modules(settings.build_options({"kernel": backports}), Services(settings, reporter=Reporter(quiet=True)))
    assert plan.options.distribution == "bookworm"
    assert {p.suite for p in plan.kernel.downloads} == {"bookworm-backports"}
    assert plan.kernel.gcc_major == 12 and plan.builder.base == "debian:bookworm"
    assert plan.driver.version.startswith("535."), "bookworm's own driver, not a backported one"


# ---- 2. NVIDIA's current branches, open by default -----------------------------------------------------
def test_580_builds_the_open_modules_by_default_from_nvidias_sources_for_a_trixie_kernel(trixie):
    data = result(trixie, "580")
    assert (data["driver_version"], data["flavor"]) == (OPEN_580, "open")
    assert "NVIDIA's default from 560 on" in trixie["580"].stderr
    assert [m["name"] for m in data["modules"]] == ["nvidia", "nvidia-uvm", "nvidia-modeset", "nvidia-drm",
                                                    "nvidia-peermem"]
    nvidia = data["modules"][0]["path"]
    assert modinfo("version", nvidia) == OPEN_580 and modinfo("license", nvidia) == "Dual MIT/GPL"
    assert modinfo("vermagic", nvidia).startswith(trixie["latest"] + " ")
    # the userspace is the installer's stand-in, collected as a real installer's is
    lib = Path(data["cache_dir"]) / "userspace" / "lib"
    assert (lib / "libcuda.so.1").resolve().name == f"libcuda.so.{OPEN_580}"
    assert b"cudabuild stand-in userspace" in (lib / f"libcuda.so.{OPEN_580}").read_bytes()


def test_trixies_real_kernel_runs_the_580_open_modules_init(trixie):
    boot = manifest(result(trixie, "580"))["boot_tests"][-1]
    assert boot["verdict"] == "accepted"
    nvidia = next(m for m in boot["modules"] if m["name"] == "nvidia")
    said = "\n".join(nvidia["kernel_said"])
    # what the open modules print without a GPU, and the kernel's own word that their init ran
    assert "NVRM: No NVIDIA GPU found." in said and re.search(r"initcall nvidia_init_module\S* \[nvidia\] returned -19", said)


def test_a_580_build_for_another_trixie_abi_is_refused_by_that_kernel(trixie, tmp_path):
    archive = bookworm_archive("trixie")
    other = next(r for r in archive.kernel_releases(backports=False)
                 if r.endswith("+deb13-amd64") and r != trixie["latest"])
    image = archive.kernel_image(other)
    deb = archive.fetcher.fetch(image.url, store=STANDINS / "downloads", sha256=image.sha256, size=image.size)
    judged = run_cli("boot-test", "--modules", result(trixie, "580")["modules_image"], "--kernel-image", str(deb),
                     "--json", env=cache_env(trixie))
    assert judged.returncode == 7, judged.stderr
    verdict = json.loads(judged.stdout) if judged.stdout.strip() else None
    assert "refused nvidia.ko" in judged.stderr and other in judged.stderr
    assert verdict is None or verdict["verdict"] == "rejected"


def test_595_builds_open_for_a_bookworm_kernel_and_refuses_proprietary_before_any_build(trixie, tmp_path):
    data = result(trixie, "595 bookworm")
    assert (data["driver_version"], data["flavor"], data["kernel_release"]) == (OPEN_595, "open", trixie["bookworm"])
    assert modinfo("version", data["modules"][0]["path"]) == OPEN_595
    url = trixie["installer_url"].format(OPEN_595)
    refused, created = run_cli_watched("modules", "--kernel", trixie["latest"], "--driver-source", "run",
                                       "--installer", url, "--flavor", "proprietary",
                                       env={"CUDABUILD_CACHE": str(tmp_path / "c")})
    assert refused.returncode == 3 and created == []
    assert "only the open modules" in refused.stderr and "Maxwell, Pascal and Volta" in refused.stderr


def test_a_580_installer_without_proprietary_sources_is_refused_with_the_reason(trixie):
    """The tests' 580 installer carries kernel-open/ only (NVIDIA's proprietary sources are not
    public): --flavor proprietary is refused before make, naming what is missing."""
    refused, created = run_cli_watched("modules", "--kernel", trixie["latest"], "--driver-source", "run",
                                       "--installer", trixie["installer_url"].format(OPEN_580),
                                       "--flavor", "proprietary", env=cache_env(trixie))
    assert refused.returncode == 3 and created == [], refused.stderr
    assert f"the installer of {OPEN_580} has no kernel/Makefile" in refused.stderr
    assert "make modules" not in refused.stderr


# ---- 4. Downstream: image, install, registry, matrix ------------------------------------------------------
def test_a_580_trixie_runtime_image_runs_device_query_on_its_own_libcuda(trixie):
    data = result(trixie, "580")
    made = run_cli("image", "device-query", "--modules", data["cache_dir"], "--json", env=cache_env(trixie))
    assert made.returncode == 0, made.stderr
    tag = json.loads(made.stdout)["image"]
    client = docker.from_env()
    try:
        _, logs = run_device_query(tag)
        assert "CUDA driver API 13.0" in logs and "cuInit failed: CUDA_ERROR_NO_DEVICE" in logs  # the stand-in's answer
        labels = client.images.get(tag).labels
        assert labels["io.cudabuild.kernel-release"] == trixie["latest"]
        assert labels["io.cudabuild.driver-version"] == OPEN_580
    finally:
        client.images.remove(tag, force=True)


def test_install_on_a_trixie_host_loads_580_and_writes_a_valid_cdi_spec(trixie, tmp_path):
    data = result(trixie, "580")
    root = tmp_path / "host"
    env = {**fake_host(root, gpus=1), "CUDABUILD_KERNEL_RELEASE": trixie["latest"], "FAKE_VERSION": OPEN_580}
    done = run_cli("install", "--modules", data["cache_dir"], "--root", str(root), "--cdi-host-root", str(root),
                   "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert {"nvidia", "nvidia-uvm", "nvidia-modeset", "nvidia-drm"} <= set(json.loads(done.stdout)["loaded"])
    spec = json.loads((root / "run/cdi/cudabuild-nvidia.json").read_text())
    cdi_validator()(spec)
    mounted = {m["containerPath"] for m in spec["containerEdits"]["mounts"]}
    assert any(p.endswith(f"libcuda.so.{OPEN_580}") for p in mounted), mounted


def test_the_580_trixie_build_goes_through_a_registry_and_is_verified_against_trixies_symvers(trixie, registry, tmp_path):
    data = result(trixie, "580")
    args = ("modules", "--kernel", trixie["latest"], "--driver-source", "run", "--installer",
            trixie["installer_url"].format(OPEN_580), *ONLY_580, "--registry", registry.repo(), "--json")
    pushed = run_cli(*args, env=cache_env(trixie))
    assert pushed.returncode == 0, pushed.stderr
    assert json.loads(pushed.stdout)["registry"]["pushed"] is True
    node = tmp_path / "node-cache"
    node.mkdir()
    (node / "downloads").symlink_to(STANDINS / "downloads", target_is_directory=True)
    docker.from_env().images.remove(data["modules_image"], force=True)
    pulled, created = run_cli_watched(*args, "--no-build", env={"CUDABUILD_CACHE": str(node)})
    assert pulled.returncode == 0, pulled.stderr
    got = json.loads(pulled.stdout)
    assert got["origin"] == "pulled" and created == []
    assert [m["sha256"] for m in got["modules"]] == [m["sha256"] for m in data["modules"]]
    assert "symbol CRCs not checked" not in pulled.stderr


def test_a_matrix_puts_debians_550_and_nvidias_580_side_by_side_for_a_trixie_kernel(trixie):
    """One kernel, a Debian driver and a .run driver in one matrix: both cells are the background
    builds, answered from the cache."""
    template = trixie["installer_url"].replace("{}", "{version}")
    done = run_cli("matrix", "--kernels", trixie["latest"], "--drivers", f"550,run:{OPEN_580}", *ONLY_580,
                   "--backend", "local", "--json", env={**cache_env(trixie), "CUDABUILD_INSTALLER_URL": template})
    assert done.returncode == 0, done.stderr
    cells = {(c["driver"], c["flavor"]): c for c in json.loads(done.stdout)["cells"]}
    assert set(cells) == {("550", "proprietary"), (f"run:{OPEN_580}", "open")}, cells
    assert all(c["state"] == "cached" for c in cells.values()), cells
