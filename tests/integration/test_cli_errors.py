"""Bad input and a missing engine: a clear message, the right exit code, nothing left behind."""

import os
from pathlib import Path

import pytest

from cudabuild.errors import EngineError, InputError
from tests.helpers import run_here as run_cli  # in this process: these are refusals


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def assert_nothing_left(cache: Path, builder_containers, before):
    results = cache / "results"
    assert not results.exists() or list(results.iterdir()) == [], "no cache entry may be written"
    tmp = cache / "tmp"
    assert not tmp.exists() or list(tmp.iterdir()) == []
    assert builder_containers() == before, "no builder container may be left behind"


def test_help_explains_every_option_and_the_exit_codes():
    result = run_cli("modules", "--help")
    assert result.returncode == 0
    for option in ("--kernel", "--driver", "--kernel-source", "--driver-source", "--output", "--jobs",
                   "--no-cache", "--json"):
        assert option in result.stdout
    assert "Examples:" in result.stdout and "Exit codes:" in result.stdout
    version = run_cli("--version")
    assert version.returncode == 0 and "cudabuild, version" in version.stdout


def test_shell_metacharacters_in_the_release_are_refused(cache, builder_containers, tmp_path):
    before = builder_containers()
    marker = tmp_path / "owned"
    result = run_cli("modules", "--kernel", f"x;touch {marker}", "--driver", "535",
                     env={"CUDABUILD_CACHE": str(cache)})
    assert result.returncode == InputError.exit_code
    assert "is not valid" in result.stderr and "fix:" in result.stderr
    assert not marker.exists()
    assert_nothing_left(cache, builder_containers, before)


def test_unknown_kernel_release_lists_the_available_ones(cache, builder_containers):
    before = builder_containers()
    result = run_cli("modules", "--kernel", "4.3.6-coreos", "--driver", "535", "--kernel-source", "debian",
                     env={"CUDABUILD_CACHE": str(cache)})
    assert result.returncode == InputError.exit_code, result.stderr
    assert "no kernel headers for release '4.3.6-coreos'" in result.stderr
    assert "-amd64" in result.stderr.split("fix:", 1)[1], "the fix lists real releases"
    assert_nothing_left(cache, builder_containers, before)


def test_unknown_driver_version_lists_the_available_ones(cache, builder_containers):
    before = builder_containers()
    result = run_cli("modules", "--kernel", "latest", "--driver", "999.99.99", env={"CUDABUILD_CACHE": str(cache)})
    assert result.returncode == InputError.exit_code, result.stderr
    assert "no proprietary NVIDIA driver 999.99.99" in result.stderr
    assert "535." in result.stderr.split("fix:", 1)[1]
    assert_nothing_left(cache, builder_containers, before)


def test_engine_not_running(cache, builder_containers, tmp_path):
    before = builder_containers()
    result = run_cli("modules", "--kernel", "latest", "--driver", "535",
                     env={"CUDABUILD_CACHE": str(cache), "DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock"})
    assert result.returncode == EngineError.exit_code
    assert "does not answer" in result.stderr and "start the engine" in result.stderr
    assert_nothing_left(cache, builder_containers, before)


def test_usage_errors_exit_2():
    result = run_cli("modules", "--jobs", "many")
    assert result.returncode == 2 and "--jobs" in result.stderr


def test_unwritable_cache_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run_cli("modules", "--kernel", "latest", env={"CUDABUILD_CACHE": str(blocker / "cache")})
    assert result.returncode == 8 and "CUDABUILD_CACHE" in result.stderr
    assert os.listdir(tmp_path) == ["file"]


@pytest.mark.parametrize("args,flag", [(["--append", "a;b"], "--append"), (["--timeout", "5"], "--timeout")])
def test_boot_test_errors_name_its_own_flags(args, flag, tmp_path):
    result = run_cli("boot-test", *args, env={"CUDABUILD_CACHE": str(tmp_path / "c")})
    assert result.returncode == 3, result.stderr
    assert flag in result.stderr and "--boot-" not in result.stderr and "Traceback" not in result.stderr


def test_a_bad_engine_timeout_refuses_only_what_needs_the_engine(tmp_path):
    env = {"CUDABUILD_ENGINE_TIMEOUT": "soon", "CUDABUILD_CACHE": str(tmp_path / "cache")}
    assert run_cli("--version", env=env).returncode == 0
    listed = run_cli("cdi", "list", "--root", str(tmp_path), env=env)
    assert listed.returncode == 0, listed.stderr
    refused = run_cli("inspect", "cudabuild/modules:535.309.01-6.1.0-56-amd64", env=env)
    assert refused.returncode == 3, refused.stderr  # bad input
    assert "CUDABUILD_ENGINE_TIMEOUT 'soon' is not a number of seconds" in refused.stderr
    assert "fix: set it to e.g. 20" in refused.stderr and "Traceback" not in refused.stderr
