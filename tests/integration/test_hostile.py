"""Hostile input that needs a real file system, a real socket or the real engine: a clear error
with its documented exit code (docs/exit-codes.md), nothing written, no image made, never a traceback."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import DRIVER, REPO, image_ids, images_made_since, make_artifact, run_cli

sys.path.insert(0, str(REPO / "scripts"))
from makeself import tar_bytes, write_installer  # noqa: E402


def no_traceback(result) -> None:
    assert "Traceback" not in result.stderr, result.stderr


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a tmpfs of a given size (root only); unmounted at the end."""
    mounted = []

    def make(size: str) -> Path:
        where = tmp_path / f"fs{len(mounted)}"
        where.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)]).returncode != 0:
            pytest.fail("these tests mount a tmpfs and must run as root")
        mounted.append(where)
        return where

    yield make
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_read_only_cache_whose_folders_exist(tmpfs):
    cache = tmpfs("8m")
    for sub in ("downloads", "index", "kernels", "sources", "results", "tmp", "locks", "logs"):
        (cache / sub).mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(cache)], check=True)
    result = run_cli("modules", "--kernel", "latest", env={"CUDABUILD_CACHE": str(cache)})
    no_traceback(result)
    assert result.returncode == 8 and "read-only" in result.stderr and "CUDABUILD_CACHE" in result.stderr


def test_a_tiny_cache_refuses_the_package_index_before_fetching_it(tmpfs):
    cache = tmpfs("4m")
    result = run_cli("modules", "--kernel", "latest", env={"CUDABUILD_CACHE": str(cache)})
    no_traceback(result)
    assert result.returncode == 8, result.stderr
    assert "package index needs" in result.stderr and "reading Debian's package index" not in result.stderr
    assert not [p for p in cache.rglob("*") if p.is_file()], "nothing written, no .tmp or .partial"


def test_a_tiny_cache_refuses_the_installer_copy(tmpfs, tmp_path):
    cache = tmpfs("24m")
    repo = tmp_path / "linux.git"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "Makefile").write_text("VERSION = 6\n")
    subprocess.run(["git", "-C", str(repo), "add", "."], check=True)
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"], check=True)
    subprocess.run(["git", "-C", str(repo), "tag", "v6.1.192"], check=True)
    config = tmp_path / "config"
    config.write_text('CONFIG_CC_VERSION_TEXT="gcc-12 (Debian 12.2.0-14) 12.2.0"\nCONFIG_MODULES=y\n')
    installer = write_installer(tmp_path / f"NVIDIA-Linux-x86_64-{DRIVER}.run", DRIVER,
                                tar_bytes({"kernel/Makefile": (0o644, os.urandom(12 * 1024**2), None)}))
    result = run_cli("modules", "--kernel", "6.1.192-x", "--kernel-source", "git", "--kernel-repo", f"file://{repo}",
                     "--kernel-config", str(config), "--driver-source", "run", "--installer", str(installer),
                     env={"CUDABUILD_CACHE": str(cache)})
    no_traceback(result)
    assert result.returncode == 8, result.stderr
    assert "storing a" in result.stderr and "free in" in result.stderr
    assert not list(cache.rglob("*.partial")) and not list(cache.rglob(f"*{installer.name}*"))


def test_an_engine_that_accepts_but_never_answers(tmp_path):
    path = tmp_path / "silent.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(8)
    held = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        started = time.monotonic()
        result = run_cli("inspect", "debian:bookworm",
                         env={"DOCKER_HOST": f"unix://{path}", "CUDABUILD_ENGINE_TIMEOUT": "2"}, timeout=120)
        took = time.monotonic() - started
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()
    no_traceback(result)
    assert result.returncode == 4 and "no answer within 2 s" in result.stderr, result.stderr
    assert took < 60, "a silent engine is given up on, not waited for for minutes"


# ---- images and artifacts against the real engine ----------------------------------------------
@pytest.fixture
def client(docker_client):
    return docker_client


@pytest.fixture
def images_unchanged(client):
    before = image_ids(client, all_layers=True)
    yield
    assert images_made_since(client, before, all_layers=True) == set(), "no image was made"


def test_an_image_with_some_of_the_labels_but_not_all(client, tmp_path):
    tag = "cudabuild-test/partial-labels:1"
    client.images.build(fileobj=io.BytesIO(b"FROM scratch\nLABEL io.cudabuild.driver-version=535.309.01\n"),
                        tag=tag, rm=True)
    try:
        for args in (["inspect", tag], ["image", "cuda", "--modules", tag]):
            result = run_cli(*args, env={"CUDABUILD_CACHE": str(tmp_path / "cache")})
            no_traceback(result)
            assert result.returncode == 3 and "some of cudabuild's labels but not" in result.stderr, result.stderr
    finally:
        client.images.remove(tag, force=True)


@pytest.mark.parametrize("attack", ["symlinked-ko", "text-ko", "injected-manifest"])
def test_image_refuses_an_artifact_that_is_not_what_it_claims(tmp_path, images_unchanged, attack):
    root = tmp_path / "artifact"
    make_artifact(root)
    ko = root / "modules" / "nvidia.ko"
    manifest = json.loads((root / "manifest.json").read_text())
    if attack == "symlinked-ko":
        ko.unlink()
        ko.symlink_to("/etc/hostname")
    elif attack == "text-ko":
        import hashlib

        ko.write_text("#!/bin/sh\necho I am not a module\n")
        manifest["modules"][0].update(size=ko.stat().st_size, sha256=hashlib.sha256(ko.read_bytes()).hexdigest())
    else:
        manifest["driver_version"] = '535.1"; echo INJECTED >&2; "'
    if attack != "symlinked-ko":
        (root / "manifest.json").write_text(json.dumps(manifest))
    before = sorted((str(p), p.lstat().st_mtime_ns) for p in root.rglob("*"))
    result = run_cli("image", "--base", "debian:bookworm", "--tag", "cudabuild-test/hostile:1", "--modules", str(root),
                     env={"CUDABUILD_CACHE": str(tmp_path / "cache")})
    no_traceback(result)
    assert result.returncode == 3, result.stderr
    assert {"symlinked-ko": "is a symbolic link", "text-ko": "not an ELF kernel module",
            "injected-manifest": "driver_version"}[attack] in result.stderr
    assert sorted((str(p), p.lstat().st_mtime_ns) for p in root.rglob("*")) == before, "nothing changed on disk"


def test_output_on_a_read_only_file_system_is_refused_before_the_build(tmpfs, tmp_path):
    target = tmpfs("1m")
    subprocess.run(["mount", "-o", "remount,ro", str(target)], check=True)
    result = run_cli("modules", "--kernel", "latest", "--output", str(target / "nvidia"),
                     env={"CUDABUILD_CACHE": str(tmp_path / "cache")})
    no_traceback(result)
    assert result.returncode == 3 and "cannot write in" in result.stderr and "Read-only" in result.stderr
    assert not (tmp_path / "cache").exists(), "refused before the cache, the index or the engine"
