"""Options resolve the same way for every command that builds, and git kernels are known by the
commit their tag names. Real HTTP server and real git on 127.0.0.1 / the file system."""

from __future__ import annotations

import subprocess

import pytest

from cudabuild.artifact import image_tag
from cudabuild.errors import FetchError
from cudabuild.sources.git import tag_commit
from tests.helpers import run_cli


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_image_with_kernel_uses_the_mirror_like_modules(http_server, tmp_path, how):
    """`image --kernel` takes the build options of `modules`: here an (empty) mirror, which both
    commands must ask, and name in the error."""
    mirror, security = f"{http_server.url}/debian", f"{http_server.url}/debian-security"
    args = ["--apt-mirror", mirror, "--apt-security-mirror", security] if how == "flag" else []
    env = {"CUDABUILD_CACHE": str(tmp_path / "cache")}
    if how == "environment":
        env.update(CUDABUILD_APT_MIRROR=mirror, CUDABUILD_APT_SECURITY_MIRROR=security)
    for command in (["modules"], ["image", "--base", "debian:bookworm"]):
        result = run_cli(*command, "--kernel", "latest", "--driver", "535", *args, env=env)
        assert result.returncode == 5, result.stderr
        assert f"no Packages index found for bookworm at {mirror}" in result.stderr


def test_a_missing_base_image_is_one_error_for_every_command(tmp_path):
    from tests.helpers import make_artifact

    make_artifact(tmp_path / "a")
    result = run_cli("image", "--base", "cudabuild-test/no-such-base:1", "--modules", str(tmp_path / "a"),
                     env={"CUDABUILD_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 4, result.stderr
    assert "base image cudabuild-test/no-such-base:1 is not in the engine and cannot be pulled" in result.stderr


def test_tags_keep_flavors_apart_and_have_no_plus():
    assert image_tag("cudabuild/modules", "550.163.01", "proprietary", "6.12.117+deb13-amd64") == \
        "cudabuild/modules:550.163.01-6.12.117_deb13-amd64"
    assert image_tag("cudabuild/cuda", "535.261.03", "open", "6.1.0-47-amd64") == \
        "cudabuild/cuda:535.261.03-open-6.1.0-47-amd64"


def git(*args, cwd):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                   capture_output=True)


def test_a_moved_tag_is_another_kernel_and_offline_the_remembered_one_is_used(tmp_path):
    repo = tmp_path / "linux"
    repo.mkdir()
    git("init", "-q", cwd=repo)
    (repo / "Makefile").write_text("VERSION = 6\n")
    git("add", ".", cwd=repo)
    git("commit", "-qm", "one", cwd=repo)
    git("tag", "-a", "-m", "v6.1.192", "v6.1.192", cwd=repo)  # annotated: peeled to its commit
    store, notes = tmp_path / "store", []
    store.mkdir()
    url = f"file://{repo}"
    first = tag_commit(url, "v6.1.192", store=store, note=notes.append)
    assert first == subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    (repo / "Makefile").write_text("VERSION = 6\nPATCHLEVEL = 1\n")
    git("commit", "-qam", "two", cwd=repo)
    git("tag", "-f", "-a", "-m", "moved", "v6.1.192", cwd=repo)
    moved = tag_commit(url, "v6.1.192", store=store, note=notes.append)
    assert moved != first, "a moved tag names another commit, so another kernel tree and another key"
    (repo / ".git").rename(tmp_path / "gone")
    assert tag_commit(url, "v6.1.192", store=store, note=notes.append) == moved
    assert notes and "using the commit it named before" in notes[-1]
    with pytest.raises(FetchError, match="cannot list the tags"):
        tag_commit(url, "v6.1.193", store=store, note=notes.append)
