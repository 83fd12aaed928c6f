"""The classic path: a kernel from a git tag (served by git daemon on 127.0.0.1), drivers from
.run installers (served over HTTP on 127.0.0.1), built for real, in the background from the first
e2e test and in a cache of their own (tests/background.py git_builds)."""

import json
import re
import subprocess
from pathlib import Path

import docker
import pytest

from tests.background import RELEASE_SUFFIX, git_build
from tests.helpers import cdi_validator, fake_host, run_cli

pytestmark = [pytest.mark.engine, pytest.mark.build]


def modinfo(field: str, path) -> str:
    return subprocess.run(["/sbin/modinfo", "-F", field, str(path)], capture_output=True, text=True,
                          check=True).stdout.strip()


def steps(data) -> dict:
    return {s["name"].split(" (")[0]: s["status"] for s in data["steps"]}


def crc_disagreements(modules_dir: Path, release: str, symvers: Path, tmp_path: Path) -> list[str]:
    extra = tmp_path / "lib" / "modules" / release / "extra"
    extra.mkdir(parents=True)
    for ko in modules_dir.glob("*.ko"):
        (extra / ko.name).symlink_to(ko)
    check = subprocess.run(["/sbin/depmod", "-b", str(tmp_path), "-e", "-E", str(symvers), release],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    return [line for line in check.stderr.splitlines() if "disagrees about version" in line]


@pytest.fixture(scope="session")
def git_results(git_builds_started) -> dict:
    """The background builds (tests/background.py git_builds), waited for: nothing writes to their
    cache after this."""
    return git_builds_started.wait()


@pytest.fixture(scope="session")
def git_cache(git_results) -> Path:
    return git_results["cache"]


@pytest.fixture(scope="session")
def git_535(git_results):
    """535 from an installer in NVIDIA's layout that our stand-in script did not write, built,
    verified and published."""
    result = git_results["535"]
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout)


def test_git_tag_and_run_installer_build_the_modules_asked_for(git_535, kernel_repo, target_kernel_files, tmp_path):
    """nvidia and nvidia-modeset from the .run (the second links against the first's symbols, so
    the CRC check below covers a module's imports from another of ours as well as the kernel's)."""
    release = kernel_repo["version"] + RELEASE_SUFFIX
    assert git_535["kernel_release"] == release
    assert [m["name"] for m in git_535["modules"]] == ["nvidia", "nvidia-modeset"]
    for m in git_535["modules"]:
        assert modinfo("vermagic", m["path"]) == f"{release} SMP preempt mod_unload modversions"
        assert modinfo("version", m["path"]) == "535.309.01"
    assert modinfo("license", git_535["modules"][0]["path"]) == "NVIDIA", "proprietary unless --flavor open"
    assert steps(git_535)["fetch kernel source"] == "done"
    assert steps(git_535)["prepare kernel"] == "done"
    modules_dir = Path(git_535["modules"][0]["path"]).parent
    assert crc_disagreements(modules_dir, release, target_kernel_files["symvers"], tmp_path) == []
    lib = modules_dir.parent / "userspace" / "lib"
    assert (lib / "libcuda.so.1").resolve().name == "libcuda.so.535.309.01"


def test_a_rebuild_with_the_warm_compile_cache_gives_the_same_modules(git_535, git_results):
    """The 535 build again (--no-cache): ccache answers the compiles, NVIDIA's conftest answers
    come back from the compile cache, verification runs as after any build, and the stripped
    modules are byte for byte those of the first build, whose compiles ran for real."""
    result = git_results["535 again"]
    assert result.returncode == 0, result.stderr[-4000:]
    again = json.loads(result.stdout)
    assert again["cache_hit"] is False and again["origin"] == "built"
    first_use, use = git_535["compile_cache"], again["compile_cache"]
    assert first_use["misses"] > 0, first_use  # the first build compiled its objects for real
    # the same compiles again (only those that make objects go through ccache: not conftest's
    # probes), nearly all answered
    assert use["hits"] + use["misses"] == first_use["hits"] + first_use["misses"], (first_use, use)
    assert use["misses"] * 10 <= use["hits"], use
    assert steps(again)["verify modules"] == "done"
    assert [(m["name"], m["sha256"]) for m in again["modules"]] == [(m["name"], m["sha256"]) for m in git_535["modules"]]
    log = (Path(again["cache_dir"]) / "build.log").read_text()
    assert "conftest: the answers of an earlier build of the same sources for this kernel" in log
    assert "compile cache:" in result.stderr


def test_second_driver_reuses_the_prepared_kernel(git_535, git_results, tmp_path):
    """470 as a compute-only driver (--only-modules nvidia,nvidia-uvm, NVIDIA's NV_KERNEL_MODULES),
    built after 535 in the same cache: the kernel fetched and prepared for 535 is reused, and the
    artifact and its image hold the two modules, verified like any build."""
    result = git_results["470"]
    assert result.returncode == 0, result.stderr[-4000:]
    data = json.loads(result.stdout)
    assert steps(data)["fetch kernel source"] == "cached", "no clone for a kernel already fetched"
    assert steps(data)["prepare kernel"] == "cached", "no modules_prepare for a kernel already prepared"
    assert data["driver_version"] == "470.256.02"
    assert data["compile_cache"] is None and "compile cache" not in result.stderr, "--no-compile-cache"
    assert [m["name"] for m in data["modules"]] == ["nvidia", "nvidia-uvm"]
    assert sorted(p.name for p in Path(data["modules"][0]["path"]).parent.iterdir()) == ["nvidia-uvm.ko", "nvidia.ko"]
    for m in data["modules"]:
        assert modinfo("vermagic", m["path"]).startswith(data["kernel_release"] + " ")
    assert data["modules_image"] == f"cudabuild/modules:470.256.02-only.nvidia_uvm-{data['kernel_release']}"
    labels = docker.from_env().images.get(data["modules_image"]).labels
    assert [entry.split("@")[0] for entry in labels["io.cudabuild.modules"].split(",")] == ["nvidia.ko", "nvidia-uvm.ko"]
    # On a node (a fake root, the stub insmod): the loader loads the two in order, and the CDI spec
    # lists the nodes that exist (no nvidia-modeset).
    host = tmp_path / "host"
    env = {**fake_host(host, gpus=1), "CUDABUILD_KERNEL_RELEASE": data["kernel_release"], "FAKE_VERSION": "470.256.02"}
    installed = run_cli("install", "--modules", data["cache_dir"], "--root", str(host), "--cdi-host-root", str(host),
                        "--json", env=env)
    assert installed.returncode == 0, installed.stderr
    assert [m for m in (host / "insmod.log").read_text().split() if m.startswith("nvidia")] == ["nvidia", "nvidia_uvm"]
    spec = json.loads((host / "run/cdi/cudabuild-nvidia.json").read_text())
    cdi_validator()(spec)
    assert {n["path"] for n in spec["containerEdits"]["deviceNodes"]} == {"/dev/nvidiactl", "/dev/nvidia-uvm",
                                                                          "/dev/nvidia-uvm-tools"}


def tree_files(root: Path, *, skip=(".git",)) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in root.rglob("*")
            if p.is_file() and not p.is_symlink() and p.relative_to(root).parts[0] not in skip}


# What modules_prepare writes that a module build reads, byte for byte. The rest of the prepared
# tree differs by the clone's own path (host programs, kbuild's .cmd dependency files) or by the
# time it was made (include/generated/compile.h, which only the kernel's own version.c reads).
PREPARED_CONTENT = re.compile(r"\.config|Module\.symvers|(include/(generated|config)|arch/x86/include/generated)/"
                              r"(.*/)?[^/]*(?<!\.cmd)")
NOT_READ_BY_MODULES = {"include/generated/compile.h"}


def test_sparse_fetch_is_small_and_prepares_the_same_tree(git_results, git_535):
    """A full checkout of the same tag, fetched and prepared (not compiled again; in the
    background after the git builds, tests/background.py prepared_checkouts): the sparse clone
    has a fifth of its objects, every header a module build can include, and a prepared tree with
    the same generated files; the sparse tree's modules are the ones git_535 verified."""
    trees = git_results["trees"]
    assert trees is not None, "the git builds failed (test_git_tag_and_run_installer_build_the_modules_asked_for says how)"
    if isinstance(trees, Exception):
        raise trees
    (sparse_clone, sparse_prepared), (full_clone, full_prepared) = trees["sparse"], trees["full"]
    assert sparse_prepared != full_prepared and sparse_clone != full_clone

    def objects(clone: Path) -> int:
        return sum(p.stat().st_size for p in (clone / ".git" / "objects").rglob("*") if p.is_file())

    assert (sparse_clone / ".git" / "info" / "sparse-checkout").exists()
    assert objects(sparse_clone) <= 0.20 * objects(full_clone), (objects(sparse_clone), objects(full_clone))
    # Every header a module build can include is in the sparse checkout, the same bytes.
    sparse_files, full_files = tree_files(sparse_clone), tree_files(full_clone)
    headers = [name for name in full_files if re.match(r"(include|arch/x86/include)/.*\.h$", name)]
    assert len(headers) > 1000
    missing = [name for name in headers if name not in sparse_files]
    assert missing == [], missing[:20]
    assert all(sparse_files[n].read_bytes() == full_files[n].read_bytes() for n in headers)
    # The prepared trees: the same files, and the same generated configuration, headers and symbols.
    sparse_out, full_out = tree_files(sparse_prepared, skip=()), tree_files(full_prepared, skip=())
    assert set(sparse_out) == set(full_out), sorted(set(sparse_out) ^ set(full_out))[:20]
    generated = [name for name in full_out if PREPARED_CONTENT.fullmatch(name) and name not in NOT_READ_BY_MODULES]
    assert "include/generated/autoconf.h" in generated and "Module.symvers" in generated
    differ = [n for n in generated if sparse_out[n].read_bytes() != full_out[n].read_bytes()]
    assert differ == [], differ


# ---- what goes wrong ---------------------------------------------------------------------------
def assert_no_result(cache: Path, before: set):
    assert set((cache / "results").iterdir()) == before
    assert list((cache / "tmp").iterdir()) == []
    assert not list((cache / "kernels").glob("*.partial*"))


@pytest.fixture
def results_before(git_cache):
    (git_cache / "results").mkdir(parents=True, exist_ok=True)
    return set((git_cache / "results").iterdir())


def test_missing_tag_names_the_tag_the_repository_and_the_nearest(git_cache, kernel_repo, target_kernel_files,
                                                                  installers, results_before):
    result = git_build(git_cache, kernel_repo, target_kernel_files,
                       f"{installers['url']}/NVIDIA-Linux-x86_64-535.309.01.run", release="6.1.999-test")
    assert result.returncode == 3, result.stderr
    assert f"{kernel_repo['url']} has no tag v6.1.999" in result.stderr
    assert kernel_repo["tag"] in result.stderr.split("fix:", 1)[1]
    assert_no_result(git_cache, results_before)


def test_modversions_config_without_symvers_stops_before_building(git_cache, kernel_repo, target_kernel_files,
                                                                  results_before):
    result = run_cli("modules", "--kernel", "6.1.192-test", "--kernel-source", "git", "--kernel-repo",
                     kernel_repo["url"], "--kernel-config", str(target_kernel_files["config"]),
                     "--driver-source", "run", "--driver", "535.309.01", env={"CUDABUILD_CACHE": str(git_cache)})
    assert result.returncode == 3
    assert "CONFIG_MODVERSIONS=y" in result.stderr and "--symvers" in result.stderr
    assert "==>" not in result.stderr, "nothing was started"
    assert_no_result(git_cache, results_before)


def test_truncated_installer_is_a_clear_build_error(git_535, git_cache, kernel_repo, target_kernel_files,
                                                    installers, results_before, tmp_path):
    whole = (installers["dir"] / "NVIDIA-Linux-x86_64-535.309.01.run").read_bytes()
    truncated = tmp_path / "NVIDIA-Linux-x86_64-535.309.01.run"
    truncated.write_bytes(whole[: len(whole) // 3])
    result = git_build(git_cache, kernel_repo, target_kernel_files, str(truncated))
    assert result.returncode == 3, result.stderr[-3000:]
    assert "truncated" in result.stderr and "==>" not in result.stderr, "refused on the host, before any step"
    assert_no_result(git_cache, results_before)


def test_sha256_mismatch_removes_the_download(git_cache, kernel_repo, target_kernel_files, installers,
                                              results_before):
    result = git_build(git_cache, kernel_repo, target_kernel_files,
                       f"{installers['url']}/NVIDIA-Linux-x86_64-470.256.02.run", "--sha256", "0" * 64)
    assert result.returncode == 5
    assert "expected " + "0" * 64 in result.stderr and "deleted" in result.stderr
    assert not (git_cache / "downloads" / ".partial" / ("0" * 64)).exists()
    assert not (git_cache / "downloads" / ("0" * 64)).exists()
    assert_no_result(git_cache, results_before)


@pytest.mark.parametrize("where,fragment", [("/missing/NVIDIA-Linux-x86_64-535.309.01.run", "HTTP 404"),
                                            ("unreachable", "could not download")])
def test_http_404_and_unreachable_server(git_cache, kernel_repo, target_kernel_files, installers, results_before,
                                         where, fragment):
    url = ("http://127.0.0.1:9/NVIDIA-Linux-x86_64-535.309.01.run" if where == "unreachable"
           else installers["url"] + where)
    # One retry, not the default four (1+2+4+8 s of backoff): a 404 is never retried, an
    # unreachable server is, as often as CUDABUILD_DOWNLOAD_RETRIES says.
    result = git_build(git_cache, kernel_repo, target_kernel_files, url, env={"CUDABUILD_DOWNLOAD_RETRIES": "1"})
    assert result.returncode == 5, result.stderr
    assert fragment in result.stderr and "fix:" in result.stderr
    assert result.stderr.count("retrying") == (1 if where == "unreachable" else 0), result.stderr
    assert_no_result(git_cache, results_before)
