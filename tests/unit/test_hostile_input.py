"""Hostile and careless input that needs no engine: each gets a clear error with its documented exit
code, in process (this tier runs nothing and reaches no engine), and never a traceback."""

from __future__ import annotations

import json
import os

import pytest

from cudabuild.cli import invoke
from tests.elf import SHT_NOBITS, module_bytes, write_artifact as artifact_dir

RELEASE, DRIVER = "6.1.0-56-amd64", "535.309.01"
VERMAGIC = f"{RELEASE} SMP preempt mod_unload modversions "
LONG = "x" * 300  # a file name longer than the 255 bytes a file system allows


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDABUILD_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    return tmp_path / "cache"


def cli(capsys, *args: str) -> tuple[int, str]:
    code = invoke(list(args))
    _, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, err


def test_a_valid_artifact_is_inspected(capsys, tmp_path):
    code = invoke(["inspect", str(artifact_dir(tmp_path / "a")), "--json"])
    out, _ = capsys.readouterr()
    assert code == 0 and json.loads(out)["verified"] is True


@pytest.mark.parametrize("args,fragment", [
    (["modules", "--driver", "٥٣٥.٣٠٩.٠١"], "driver version"),
    (["modules", "--kernel", "6.1.0-56-amd٦٤"], "is not valid"),
    (["modules", "--driver-source", "run", "--driver", DRIVER, "--installer", "file:///etc/passwd"], "http(s) URL"),
    (["modules", "--builder-base", "Bad;Image"], "not a valid image reference"),
    (["modules", "--kernel-config", f"/tmp/{LONG}"], "too long"),
    (["modules", "--symvers", f"/tmp/{LONG}"], "too long"),
    (["modules", "--driver-source", "run", "--driver", DRIVER, "--installer", f"/tmp/{LONG}.run"], "too long"),
    (["modules", "--driver-source", "run", "--driver", DRIVER, "--installer", "/etc"], "not a regular file"),
    (["image", "cuda", "--tag", "../x", "--dry-run"], "--tag '../x' is not a valid image reference"),
    (["image", "--base", "debian:bookworm;id", "--dry-run"], "not a valid image reference"),
    (["image", "cuda", "--modules", f"/tmp/{LONG}"], "too long"),
    (["inspect", "Bad Image;x"], "not a valid image reference"),
    (["inspect", f"/tmp/{LONG}"], "too long"),
])
def test_bad_input_is_refused_with_exit_3(capsys, args, fragment):
    code, err = cli(capsys, *args)
    assert code == 3, err
    assert fragment in err and "fix:" in err


def test_a_long_value_is_not_echoed_whole(capsys):
    code, err = cli(capsys, "modules", "--kernel", "x;" * 50_000)
    assert code == 3 and len(err) < 800 and "(100000 characters)" in err


def test_a_malformed_docker_host_is_input(capsys, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", "tcp://[::1")
    code, err = cli(capsys, "inspect", "debian:bookworm")
    assert code == 3 and "DOCKER_HOST" in err


def test_an_environment_value_is_named_in_the_error(capsys, monkeypatch):
    monkeypatch.setenv("CUDABUILD_APT_MIRROR", "ftp://mirror")
    code, err = cli(capsys, "modules", "--kernel", "latest")
    assert code == 3 and "CUDABUILD_APT_MIRROR" in err


# ---- manifests -----------------------------------------------------------------------------------
def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("case", ["malformed", "list", "missing", "nested", "huge", "dotdot", "injected", "link",
                                  "link-cycle", "link-out"])
def test_hostile_manifests_are_refused(capsys, tmp_path, case):
    root = artifact_dir(tmp_path / "a")
    manifest = root / "manifest.json"
    data = json.loads(manifest.read_text())
    if case == "malformed":
        manifest.write_text('{"format": 1, "modules": [')
    elif case == "list":
        manifest.write_text("[1, 2, 3]")
    elif case == "missing":
        del data["kernel_release"]
        manifest.write_text(json.dumps(data))
    elif case == "nested":
        manifest.write_text(_nested(200_000))
    elif case == "huge":
        with open(manifest, "r+b") as f:
            f.truncate(300 * 1024**2)  # sparse: 300 MB that take no disk
    elif case == "dotdot":
        data["userspace"][0]["path"] = "lib/../../../etc/passwd"
        manifest.write_text(json.dumps(data))
    elif case == "injected":
        data["driver_version"] = '535.1"; echo INJECTED >&2; "'
        manifest.write_text(json.dumps(data))
    elif case == "link":
        manifest.unlink()
        manifest.symlink_to("/etc/hostname")
    elif case in ("link-cycle", "link-out"):
        for entry in data["userspace"]:
            if entry["path"] == "lib/libcuda.so.1":
                entry["link"] = "libcuda.so" if case == "link-cycle" else "../../../../etc/passwd"
        manifest.write_text(json.dumps(data))
    code, err = cli(capsys, "inspect", str(root))
    assert code == 3, err
    assert "INJECTED" not in err.replace("'535.1\"; echo INJECTED", "")
    assert len(err) < 1500


@pytest.mark.parametrize("case,fragment", [
    ("unlisted", "is not listed in the manifest"),
    ("symlink", "is a symbolic link"),
    ("changed", "sha256"),
    ("text", "not an ELF kernel module"),
])
def test_artifact_files_that_are_not_what_the_manifest_says(capsys, tmp_path, case, fragment):
    root = artifact_dir(tmp_path / "a")
    ko = root / "modules" / "nvidia.ko"
    if case == "unlisted":
        (root / "modules" / "extra.ko").write_bytes(ko.read_bytes())
    elif case == "symlink":
        ko.unlink()
        ko.symlink_to("/etc/hostname")
    elif case == "changed":
        ko.write_bytes(ko.read_bytes().replace(b"535.309.01", b"535.309.02"))
    elif case == "text":  # a text file, with a manifest made to match it
        ko.write_text("#!/bin/sh\necho not a module\n")
        data = json.loads((root / "manifest.json").read_text())
        import hashlib
        data["modules"][0].update(size=ko.stat().st_size, sha256=hashlib.sha256(ko.read_bytes()).hexdigest())
        (root / "manifest.json").write_text(json.dumps(data))
    code, err = cli(capsys, "inspect", str(root))
    assert code == 3 and fragment in err, err


# ---- modules -------------------------------------------------------------------------------------
@pytest.mark.parametrize("case,fragment", [
    ("non-utf8", "not a C identifier"),
    ("terabyte", "outside the"),
    ("nobits", "holds no data"),
    ("past-the-end", "outside the"),
    ("no-vermagic", "no vermagic"),
    ("text", "not an ELF kernel module"),
])
def test_hostile_ko_files_are_refused(capsys, tmp_path, case, fragment):
    info = {"vermagic": VERMAGIC, "name": "nvidia", "version": DRIVER}
    data = {
        "non-utf8": lambda: module_bytes(info, {b"\xff\xfe_printk": 1}),
        "terabyte": lambda: module_bytes(info, modinfo_size=1 << 40),
        "nobits": lambda: module_bytes(info, modinfo_type=SHT_NOBITS),
        "past-the-end": lambda: module_bytes(info, modinfo_offset=10_000_000),
        "no-vermagic": lambda: module_bytes({"name": "nvidia"}),
        "text": lambda: b"just text\n",
    }[case]()
    ko = tmp_path / "nvidia.ko"
    ko.write_bytes(data)
    code, err = cli(capsys, "inspect", str(ko))
    assert code == 3 and fragment in err, err


# ---- --output ------------------------------------------------------------------------------------
def test_output_at_the_root_is_refused_before_anything(capsys, cache):
    code, err = cli(capsys, "modules", "--kernel", "latest", "--output", "/")
    assert code == 3 and "directory of the operating system" in err
    assert not cache.exists(), "refused before the cache was even opened"


@pytest.mark.parametrize("target", ["/usr/lib", "/etc", "/tmp"])
def test_output_in_system_directories_is_refused(capsys, target):
    code, err = cli(capsys, "modules", "--kernel", "latest", "--output", target, "--force")
    assert code == 3 and "operating system" in err


def test_output_over_a_directory_of_other_files_is_refused_and_left_alone(capsys, tmp_path, cache):
    out = tmp_path / "mine"
    (out / "modules").mkdir(parents=True)
    (out / "modules" / "notes.txt").write_text("my notes\n")
    (out / "photo.jpg").write_bytes(b"jpeg")
    before = sorted((p.relative_to(out), p.read_bytes() if p.is_file() else None) for p in out.rglob("*"))
    code, err = cli(capsys, "modules", "--kernel", "latest", "--output", str(out))
    assert code == 3 and "not empty" in err and "--force" in err
    code, err = cli(capsys, "modules", "--kernel", "latest", "--output", str(out), "--force")
    assert code == 3 and "never replaces what it did not write" in err
    after = sorted((p.relative_to(out), p.read_bytes() if p.is_file() else None) for p in out.rglob("*"))
    assert after == before and not cache.exists()


def test_output_that_is_a_file_or_unwritable(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    code, err = cli(capsys, "modules", "--output", str(tmp_path / "file"))
    assert code == 3 and "not a directory" in err
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    code, err = cli(capsys, "modules", "--output", str(loop / "x"))
    assert code == 3


def test_an_earlier_output_is_recognised(capsys, tmp_path):
    from cudabuild.compile.publish import check_output

    earlier = artifact_dir(tmp_path / "earlier")
    assert check_output(str(earlier), force=False) == earlier.resolve()
    (earlier / "modules" / "mine.txt").write_text("not cudabuild's")
    with pytest.raises(Exception, match="not empty"):
        check_output(str(earlier), force=False)
    assert os.path.exists(earlier / "modules" / "mine.txt")


def test_a_module_symvers_far_larger_than_a_kernels_is_refused_unread(tmp_path):
    from cudabuild.errors import VerifyError
    from cudabuild.verify import SYMVERS_LIMIT, read_symvers

    huge = tmp_path / "Module.symvers"
    with open(huge, "wb") as f:
        f.truncate(SYMVERS_LIMIT + 1)
    with pytest.raises(VerifyError, match="larger than"):
        read_symvers(huge)


def test_an_error_never_sends_an_escape_sequence_to_the_terminal():
    from cudabuild.errors import HeldError

    said = HeldError("pid 7 (evil\x1b]0;owned\x07) holds /dev/nvidia0", hint="stop \x1b[2J it").render()
    assert "\x1b" not in said and "\x07" not in said
    assert "evil\\x1b]0;owned\\x07" in said and said.count("\n") == 1
