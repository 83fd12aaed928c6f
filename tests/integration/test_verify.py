"""Verification against real ELF objects compiled here with the sections a kernel module has."""

import shutil

import pytest

from cudabuild.errors import VerifyError
from cudabuild.verify import read_module, read_symvers, verify_modules

from tests.helpers import RELEASE, VERMAGIC, compile_module

SYMVERS = "0x12345678\tmodule_layout\tvmlinux\tEXPORT_SYMBOL\t\n0x0badf00d\t_printk\tvmlinux\tEXPORT_SYMBOL\t\n"


@pytest.fixture
def built(tmp_path):
    if shutil.which("gcc") is None:
        pytest.fail("gcc is needed to compile test modules")
    for name in ("nvidia", "nvidia-uvm"):
        compile_module(tmp_path, name)
    (tmp_path / "Module.symvers").write_text(SYMVERS)
    return tmp_path


def check(directory, **kw):
    args = dict(release=RELEASE, driver_version="535.309.01", expected=["nvidia", "nvidia-uvm"],
                symvers=directory / "Module.symvers", modversions=True)
    return verify_modules(directory, **{**args, **kw})


def test_good_modules_pass_and_their_fields_are_read(built):
    infos = check(built)
    assert [i.name for i in infos] == ["nvidia", "nvidia-uvm"]
    assert infos[0].vermagic == VERMAGIC and infos[0].version == "535.309.01"
    assert infos[0].crcs == {"module_layout": 0x12345678, "_printk": 0x0BADF00D}
    assert len(infos[0].sha256) == 64


def test_vermagic_of_another_release_is_refused(built):
    compile_module(built, "nvidia-uvm", vermagic="6.1.0-5 SMP preempt mod_unload modversions ")
    with pytest.raises(VerifyError, match="nvidia-uvm.ko has vermagic '6.1.0-5 SMP"):
        check(built)
    # A release that merely starts with the target's is another release too.
    compile_module(built, "nvidia-uvm", vermagic="6.1.0-56-amd64-custom SMP ")
    with pytest.raises(VerifyError, match="not for kernel 6.1.0-56-amd64"):
        check(built)


def test_version_must_equal_the_driver(built):
    compile_module(built, "nvidia", version="535.261.03")
    with pytest.raises(VerifyError, match="nvidia.ko has version '535.261.03', expected 535.309.01"):
        check(built)


def test_a_module_without_a_version_is_accepted_except_nvidia(built):
    compile_module(built, "nvidia-uvm", version=None)  # as tesla 470's nvidia-uvm
    check(built)
    compile_module(built, "nvidia", version=None)
    with pytest.raises(VerifyError, match="nvidia.ko has version None"):
        check(built)


def test_crc_that_disagrees_with_the_kernel_is_refused(built):
    compile_module(built, "nvidia", crcs={"module_layout": 0x12345678, "_printk": 0x11111111})
    with pytest.raises(VerifyError, match="_printk with CRC 0x11111111, the kernel exports 0x0badf00d"):
        check(built)


def test_modules_without_crcs_are_refused_when_the_kernel_has_modversions(built):
    compile_module(built, "nvidia", crcs={})
    with pytest.raises(VerifyError, match="no symbol CRCs"):
        check(built)
    check(built, modversions=False, symvers=None)


def test_every_problem_is_named_at_once(built):
    (built / "nvidia-uvm.ko").unlink()
    compile_module(built, "nvidia", version="1.2.3")
    with pytest.raises(VerifyError) as info:
        check(built)
    assert "nvidia-uvm.ko is missing" in info.value.message and "version '1.2.3'" in info.value.message


def test_not_a_module_and_not_a_symvers(tmp_path):
    (tmp_path / "nvidia.ko").write_text("#!/bin/sh\n")
    with pytest.raises(VerifyError, match="not.*ELF|ELF"):
        read_module(tmp_path / "nvidia.ko")
    (tmp_path / "Module.symvers").write_text("hello world\n")
    with pytest.raises(VerifyError, match="line 1 is not a Module.symvers line"):
        read_symvers(tmp_path / "Module.symvers")
