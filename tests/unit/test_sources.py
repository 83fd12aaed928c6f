import pytest

from cudabuild.sources.run import version_from_name
from cudabuild.errors import InputError
from cudabuild.bake.image import check_cuda, load_profile, max_cuda, profiles
from cudabuild.sources.git import gcc_of
from cudabuild.options import BuildOptions
from cudabuild.nvidia import kernel_tag


@pytest.mark.parametrize("release,tag,suffix", [
    ("4.3.6-coreos", "v4.3.6", "-coreos"), ("6.1.192-test", "v6.1.192", "-test"), ("6.1.0-56-amd64", "v6.1", "-56-amd64"),
    ("5.15.0", "v5.15", ""), ("6.12", "v6.12", ""), ("6.6.30+", "v6.6.30", "+")])
def test_tag_and_suffix_from_the_release(release, tag, suffix):
    assert kernel_tag(release) == (tag, suffix)


def test_a_release_without_a_version_has_no_tag():
    with pytest.raises(InputError, match="does not start with a kernel version"):
        kernel_tag("coreos-latest")


@pytest.mark.parametrize("name,version", [("NVIDIA-Linux-x86_64-535.309.01.run", "535.309.01"),
                                          ("NVIDIA-Linux-x86_64-352.39.run", "352.39"),
                                          ("NVIDIA-Linux-x86_64-470.256.02-grid.run", "470.256.02"),
                                          ("driver.run", None)])
def test_installer_version_from_its_name(name, version):
    assert version_from_name(name) == version


def test_gcc_from_the_config_or_the_kernel_era():
    assert gcc_of('CONFIG_CC_VERSION_TEXT="gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0"\n', (6, 1))[0] == 12
    assert gcc_of('CONFIG_CC_VERSION_TEXT="x86_64-linux-gnu-gcc-14 (Debian 14.2.0-19) 14.2.0"\n', (6, 12))[0] == 14
    assert gcc_of("CONFIG_MODVERSIONS=y\n", (4, 3, 6))[0] == 5
    with pytest.raises(InputError, match="clang"):
        gcc_of('CONFIG_CC_VERSION_TEXT="clang version 17.0.6"\n', (6, 6))


def test_run_source_needs_a_full_version_and_open_needs_515():
    with pytest.raises(InputError, match="full version"):
        BuildOptions(driver="535", driver_source="run")
    with pytest.raises(InputError, match="515"):
        BuildOptions(driver="470.256.02", driver_source="run", flavor="open")
    with pytest.raises(InputError, match="--kernel-repo"):
        BuildOptions(kernel_repo="$(reboot)")
    with pytest.raises(InputError, match="--sha256"):
        BuildOptions(sha256="abc")


def test_cuda_table_and_refusal():
    assert max_cuda("535.309.01") == "12.2" and max_cuda("470.256.02") == "11.4" and max_cuda("352.39") is None
    check_cuda("535.309.01", "nvidia/cuda:12.2.2-base-ubuntu22.04", "12.2.2")
    check_cuda("535.309.01", "pytorch", "12.1")
    with pytest.raises(InputError, match="supports CUDA 11.4 at most"):
        check_cuda("470.256.02", "nvidia/cuda:12.2.2-base-ubuntu22.04", "12.2.2")


def test_profiles_name_real_bases_and_smoke_commands():
    found = profiles()
    assert set(found) == {"cuda", "tensorflow", "torch", "device-query", "driver", "kmm"}
    assert all((":" in p.base or p.base == "scratch") and (p.smoke or p.kind != "runtime") for p in found.values())
    assert found["driver"].kind == "driver" and found["cuda"].kind == "runtime"
    assert load_profile(None, "debian:bookworm").base == "debian:bookworm"
    with pytest.raises(InputError, match="not a valid image reference"):
        load_profile(None, "Bad Image;rm")
