"""NVIDIA's .run installers as NVIDIA lays them out (FACTS.md, "The .run installer"), made by a
shell script that follows that layout with coreutils and the real compressors, independently of
scripts/makeself.py (tests/helpers.make_nvidia_run; the e2e build of a git kernel uses one too): the stub's own code extracts each one with its embedded decompressor, and
cudabuild, which never runs either, must read the same tree from it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cudabuild.errors import InputError
from cudabuild.sources.run import check_installer, extract_installer
from tests.helpers import DRIVER, REPO, make_nvidia_run, run_cli

sys.path.insert(0, str(REPO / "scripts"))
from makeself import tar_bytes, write_installer  # noqa: E402

def package_tree(root: Path) -> Path:
    """A package directory as NVIDIA's: kernel/ with a Kbuild tree, the installer, a link, .manifest."""
    root.mkdir()
    (root / "kernel" / "nvidia").mkdir(parents=True)
    (root / "kernel" / "Makefile").write_text("# NVIDIA's kernel/Makefile\nmodules:\n\t@true\n")
    (root / "kernel" / "nvidia" / "nv.c").write_bytes(os.urandom(4096) + b"int nv;\n" * 2000)
    (root / "nvidia-installer").write_bytes(b"\x7fELF" + os.urandom(2048))
    (root / "nvidia-installer").chmod(0o755)
    (root / f"libcuda.so.{DRIVER}").write_bytes(os.urandom(8192))
    (root / "libcuda.so").symlink_to(f"libcuda.so.{DRIVER}")
    (root / ".manifest").write_text(f"NVIDIA\n{DRIVER}\n")
    return root


def tree(root: Path) -> dict[str, object]:
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = ("link", os.readlink(path)) if path.is_symlink() else \
            ("dir",) if path.is_dir() else ("file", path.read_bytes(), path.stat().st_mode & 0o111 != 0)
    return out


def make_run(tmp_path: Path, compression: str, version: str = DRIVER) -> Path:
    source = package_tree(tmp_path / "pkg")
    return make_nvidia_run(source, version, compression, tmp_path / f"NVIDIA-Linux-x86_64-{version}.run")


@pytest.mark.parametrize("compression", ["zstd", "xz", "gzip", "bzip2", "none"])
def test_an_installer_in_nvidias_layout_reads_as_its_own_stub_extracts_it(tmp_path, compression):
    run = make_run(tmp_path, compression)
    checked = check_installer(run)
    assert checked.version == DRIVER and checked.targetdir == f"NVIDIA-Linux-x86_64-{DRIVER}"
    assert checked.compression == {"gzip": "gz", "bzip2": "bz2"}.get(compression, compression)
    tool = shutil.which(compression) if compression != "none" else None  # embedded, never run
    assert checked.decompressor == (Path(tool).stat().st_size + 1 if tool else 0)
    # The stub's own code, run by a real shell with its embedded decompressor, against cudabuild's reading.
    by_stub = tmp_path / "by-stub"
    by_stub.mkdir()
    subprocess.run(["sh", str(run), "-x"], cwd=by_stub, check=True, capture_output=True)
    ours = tmp_path / "ours"
    extract_installer(run, checked, ours)
    expected = tree(by_stub / f"NVIDIA-Linux-x86_64-{DRIVER}")
    assert "kernel/nvidia/nv.c" in expected and expected["libcuda.so"] == ("link", f"libcuda.so.{DRIVER}")
    assert tree(ours) == expected


def test_a_changed_payload_byte_is_refused_by_its_md5(tmp_path):
    run = make_run(tmp_path, "zstd")
    offset = check_installer(run).offset
    data = bytearray(run.read_bytes())
    data[offset + (len(data) - offset) // 2] ^= 0x01
    run.write_bytes(bytes(data))
    with pytest.raises(InputError, match="MD5"):
        check_installer(run)


def test_a_changed_installer_stops_the_build_before_anything_runs(tmp_path):
    """Through the CLI: exit 3 naming the MD5, before any kernel tree, container or cache entry."""
    run = make_run(tmp_path, "zstd")
    data = bytearray(run.read_bytes())
    data[-100] ^= 0x01
    run.write_bytes(bytes(data))
    cache = tmp_path / "cache"
    repo = tmp_path / "linux.git"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "Makefile").write_text("VERSION = 6\n")
    subprocess.run(["git", "-C", str(repo), "add", "."], check=True)
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"],
                   check=True)
    subprocess.run(["git", "-C", str(repo), "tag", "v6.1.192"], check=True)
    config = tmp_path / "config"
    config.write_text('CONFIG_CC_VERSION_TEXT="gcc-12 (Debian 12.2.0-14) 12.2.0"\nCONFIG_MODULES=y\n')
    result = run_cli("modules", "--kernel", "6.1.192-x", "--kernel-source", "git", "--kernel-repo",
                     f"file://{repo}", "--kernel-config", str(config),
                     "--driver-source", "run", "--installer", str(run),
                     env={"CUDABUILD_CACHE": str(cache)})
    assert result.returncode == 3, result.stderr
    assert "MD5" in result.stderr and "Traceback" not in result.stderr
    assert not [p for p in cache.rglob("*") if p.is_file() and "sources" in p.parts]


@pytest.mark.parametrize("version,compression", [("535.309.01", "zstd"), ("470.256.02", "xz")])
def test_the_stand_ins_are_laid_out_as_nvidias(tmp_path, version, compression):
    """scripts/makeself.py (the stand-ins' writer) gives the layout of NVIDIA's installer of that
    version: zstd from 530.30.02 on, xz before, each with its decompressor embedded; and the same
    tree as the independent writer above."""
    source = package_tree(tmp_path / "pkg")
    entries = {}
    for path in source.rglob("*"):
        rel = str(path.relative_to(source))
        entries[rel] = (0o777, None, os.readlink(path)) if path.is_symlink() else \
            (0o755, None, None) if path.is_dir() else (path.stat().st_mode, path.read_bytes(), None)
    run = write_installer(tmp_path / f"NVIDIA-Linux-x86_64-{version}.run", version, tar_bytes(entries))
    checked = check_installer(run)
    assert checked.compression == compression and checked.decompressor > 0
    by_stub = tmp_path / "by-stub"
    by_stub.mkdir()
    subprocess.run(["sh", str(run), "-x"], cwd=by_stub, check=True, capture_output=True)
    ours = tmp_path / "ours"
    extract_installer(run, checked, ours)
    assert tree(ours) == tree(by_stub / f"NVIDIA-Linux-x86_64-{version}") == tree(source)


DEBIAN_PYTHON = Path("/usr/bin/python3")  # Debian 12's own: 3.11.2, whose tarfile has no data filter


@pytest.mark.skipif(not DEBIAN_PYTHON.exists(), reason="needs Debian 12's /usr/bin/python3")
def test_a_python_without_tarfiles_data_filter_extracts_the_same_readable_tree(tmp_path):
    """Before 3.11.4 (Debian 12's 3.11.2, the Python of cudabuild's own image that Swarm and
    Kubernetes jobs run) tarfile has no data filter: the tree must still have the filter's modes,
    so that the unprivileged builder can enter every directory and read every source."""
    check = subprocess.run([str(DEBIAN_PYTHON), "-c", "import tarfile; print(hasattr(tarfile, 'data_filter'))"],
                           capture_output=True, text=True, check=True)
    assert check.stdout.strip() == "False", "this Python has the filter: the test would not test the fallback"
    run = make_run(tmp_path, "zstd")
    ours = tmp_path / "ours"
    extract_installer(run, check_installer(run), ours)
    fallback = tmp_path / "fallback"
    site = next(Path(sys.prefix, "lib").glob("python3*/site-packages"))  # zstandard, built for CPython 3.11
    code = ("import sys; from pathlib import Path; from cudabuild.sources.run import check_installer, "
            "extract_installer; run = Path(sys.argv[1]); extract_installer(run, check_installer(run), Path(sys.argv[2]))")
    done = subprocess.run([str(DEBIAN_PYTHON), "-c", code, str(run), str(fallback)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": f"{REPO}:{site}"})
    assert done.returncode == 0, done.stderr

    def modes(root: Path) -> dict[str, int]:
        return {str(p.relative_to(root)): p.lstat().st_mode & 0o7777 for p in root.rglob("*") if not p.is_symlink()}

    assert tree(fallback) == tree(ours)
    assert modes(fallback) == modes(ours)
    assert all(mode & 0o005 == 0o005 for name, mode in modes(fallback).items() if (fallback / name).is_dir())
