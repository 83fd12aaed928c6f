"""The settings: one frozen value read once from an explicit environment mapping, which every
command receives; no other module of the package reads the process's environment."""

import ast
import dataclasses
from pathlib import Path

import pytest

import cudabuild
from cudabuild.errors import InputError
from cudabuild.settings import DOWNLOAD_RETRIES, ENGINE_ANSWER_TIMEOUT, Settings

PACKAGE = Path(cudabuild.__file__).parent


def test_settings_come_from_the_mapping_given_not_the_process(monkeypatch):
    monkeypatch.setenv("CUDABUILD_CACHE", "/from/the/process")
    settings = Settings.from_env({"CUDABUILD_CACHE": "/srv/cache", "DOCKER_CONFIG": "/srv/docker",
                                  "CUDABUILD_ENGINE_TIMEOUT": "7.5", "CUDABUILD_REGISTRY": "127.0.0.1:5055/team",
                                  "CUDABUILD_KEEP_BUILDER": "no", "CI": "true"})
    assert settings.cache_dir == Path("/srv/cache") and settings.docker_config == Path("/srv/docker")
    assert settings.engine_timeout == 7.5 and settings.ci and not settings.no_color
    assert settings.option_values == {"registry": "127.0.0.1:5055/team", "keep_builder": False}
    empty = Settings.from_env({})
    assert empty.cache_dir != Path("/from/the/process") and empty.engine_timeout == ENGINE_ANSWER_TIMEOUT
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.cache_dir = Path("/elsewhere")  # frozen
    assert settings.cache_dir == Path("/srv/cache")


def test_the_signing_pin_is_never_shown():
    settings = Settings.from_env({"KBUILD_SIGN_PIN": "hunter2-pin"})
    assert settings.sign_pin == "hunter2-pin"
    assert "hunter2-pin" not in repr(settings) and "hunter2-pin" not in str(settings)


@pytest.mark.parametrize("value", ["soon", "-1", "0", "1e9"])
def test_an_engine_timeout_that_is_not_seconds_is_refused_when_an_engine_is_asked_for(value):
    settings = Settings.from_env({"CUDABUILD_ENGINE_TIMEOUT": value})  # a command that needs no engine runs
    with pytest.raises(InputError) as refused:
        settings.engine()  # refused before the docker SDK is reached (tests/unit/conftest.py)
    assert "CUDABUILD_ENGINE_TIMEOUT" in refused.value.message and value in refused.value.message
    assert refused.value.hint


def test_download_retries_come_from_the_environment_and_reach_the_downloader():
    from cudabuild.ui import Reporter

    reporter = Reporter(quiet=True)
    assert Settings.from_env({}).fetcher(reporter).retries == DOWNLOAD_RETRIES
    assert Settings.from_env({"CUDABUILD_DOWNLOAD_RETRIES": "0"}).fetcher(reporter).retries == 0
    assert Settings.from_env({"CUDABUILD_DOWNLOAD_RETRIES": "7"}).fetcher(reporter).retries == 7


@pytest.mark.parametrize("value", ["many", "-1", "11", "2.5"])
def test_download_retries_that_are_not_a_count_are_refused_when_a_download_is_asked_for(value):
    from cudabuild.ui import Reporter

    settings = Settings.from_env({"CUDABUILD_DOWNLOAD_RETRIES": value})  # a command that downloads nothing runs
    with pytest.raises(InputError) as refused:
        settings.fetcher(Reporter(quiet=True))
    assert "CUDABUILD_DOWNLOAD_RETRIES" in refused.value.message and value in refused.value.message
    assert refused.value.hint


def test_flags_win_over_the_environment_and_a_bad_variable_is_named():
    settings = Settings.from_env({"CUDABUILD_DISTRIBUTION": "trixie", "CUDABUILD_APT_MIRROR": "ftp://mirror"})
    with pytest.raises(InputError) as refused:
        settings.build_options({})
    assert "CUDABUILD_APT_MIRROR" in refused.value.message
    options = settings.build_options({"apt_mirror": "http://mirror.example/debian"})
    assert options.distribution == "trixie" and options.apt_mirror == "http://mirror.example/debian"
    assert options.jobs is None, "the CPU count is the building machine's, decided when the build is planned"


def _reads_environ(path: Path) -> list[int]:
    tree = ast.parse(path.read_text())
    return [node.lineno for node in ast.walk(tree)
            if (isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "environb")
                and isinstance(node.value, ast.Name) and node.value.id == "os")]


def test_only_the_entries_read_the_process_environment():
    """cli.invoke (and the group, when called without it) and the OCI runtime's own entry; every
    other module gets the settings."""
    readers = {str(p.relative_to(PACKAGE)): lines for p in PACKAGE.rglob("*.py") if (lines := _reads_environ(p))}
    assert set(readers) == {"cli/main.py", "cdi/runtime.py"}, readers
    assert len(readers["cli/main.py"]) == 2 and len(readers["cdi/runtime.py"]) == 1, readers


@pytest.mark.parametrize("value,bound", [("", "4G"), ("500M", "500M"), ("1.5G", "1.5G"), ("2Gi", "2Gi")])
def test_the_compile_cache_bound_comes_from_the_environment(value, bound):
    assert Settings.from_env({"CUDABUILD_COMPILE_CACHE_SIZE": value}).compile_cache_bound() == bound


@pytest.mark.parametrize("value", ["lots", "0G", "-1G", "5 G", "5G;rm -rf /"])
def test_a_compile_cache_bound_that_is_not_a_size_is_refused_when_a_build_asks_for_it(value):
    settings = Settings.from_env({"CUDABUILD_COMPILE_CACHE_SIZE": value})  # a command that builds nothing runs
    with pytest.raises(InputError) as refused:
        settings.compile_cache_bound()
    assert "CUDABUILD_COMPILE_CACHE_SIZE" in refused.value.message and "--no-compile-cache" in refused.value.hint


def test_the_compile_cache_is_on_unless_turned_off_by_flag_or_environment():

    assert Settings.from_env({}).build_options({}).compile_cache is True
    assert Settings.from_env({"CUDABUILD_COMPILE_CACHE": "0"}).build_options({}).compile_cache is False
    on = Settings.from_env({"CUDABUILD_COMPILE_CACHE": "0"})
    assert on.build_options({"compile_cache": True}).compile_cache is True  # the flag wins


def test_a_debian_hosts_codename_is_read_under_cudabuild_root(tmp_path):
    (tmp_path / "etc").mkdir()
    os_release = tmp_path / "etc" / "os-release"
    os_release.write_text('PRETTY_NAME="Debian GNU/Linux 13 (trixie)"\nVERSION_CODENAME=trixie\nID=debian\n')
    assert Settings.from_env({"CUDABUILD_ROOT": str(tmp_path)}).host_codename == "trixie"
    os_release.write_text('ID=ubuntu\nVERSION_CODENAME=noble\n')  # not Debian's archive
    assert Settings.from_env({"CUDABUILD_ROOT": str(tmp_path)}).host_codename is None
    os_release.unlink()
    assert Settings.from_env({"CUDABUILD_ROOT": str(tmp_path)}).host_codename is None
