"""The userspace driver unpacked once and linked into each build's result (compile/steps.py
_link_tree): the same files, modes and SONAME links as the tree, sharing its inodes."""

import os
import stat

from cudabuild.compile.steps import _link_tree


def _tree(root):
    lib = root / "lib"
    lib.mkdir(parents=True)
    (lib / "libcuda.so.535.309.01").write_bytes(b"\x7fELF cuda")
    os.symlink("libcuda.so.535.309.01", lib / "libcuda.so.1")
    (root / "bin").mkdir()
    (root / "bin" / "nvidia-smi").write_bytes(b"#!smi")
    os.chmod(root / "bin" / "nvidia-smi", 0o755)
    (root / "firmware" / "nvidia" / "535.309.01").mkdir(parents=True)
    (root / "firmware" / "nvidia" / "535.309.01" / "gsp_ga10x.bin").write_bytes(b"gsp")
    os.chmod(root / "firmware", 0o555)  # a directory that is not writable: filled before its mode is set
    return root


def test_the_result_holds_the_trees_files_by_hard_link(tmp_path):
    source = _tree(tmp_path / "tree" / "userspace")
    target = tmp_path / "out" / "userspace"
    target.parent.mkdir()
    _link_tree(source, target)
    names = sorted(str(p.relative_to(target)) for p in target.rglob("*"))
    assert names == sorted(str(p.relative_to(source)) for p in source.rglob("*"))
    assert os.readlink(target / "lib" / "libcuda.so.1") == "libcuda.so.535.309.01"
    assert (target / "lib" / "libcuda.so.1").read_bytes() == b"\x7fELF cuda"
    assert (target / "bin" / "nvidia-smi").stat().st_ino == (source / "bin" / "nvidia-smi").stat().st_ino
    assert stat.S_IMODE((target / "bin" / "nvidia-smi").stat().st_mode) == 0o755
    assert stat.S_IMODE((target / "firmware").stat().st_mode) == 0o555
    assert (target / "firmware" / "nvidia" / "535.309.01" / "gsp_ga10x.bin").read_bytes() == b"gsp"
