import pytest

from cudabuild.errors import InputError
from cudabuild.options import BuildOptions, validate_driver, validate_release
from cudabuild.nvidia import expected_modules


@pytest.mark.parametrize("release", ["6.1.0-56-amd64", "4.3.6-coreos", "5.15.0+", "6.12.117+deb13-amd64"])
def test_real_releases_are_accepted(release):
    assert validate_release(release) == release


@pytest.mark.parametrize("release", ["x;touch /tmp/owned", "../../etc", "", "-rf", "a b", "6.1$(id)", "a/b",
                                     "x" * 200])
def test_hostile_or_malformed_releases_are_refused_with_the_fix(release):
    with pytest.raises(InputError) as info:
        validate_release(release)
    assert "uname -r" in info.value.render()


@pytest.mark.parametrize("driver", ["535", "535.309", "535.309.01", "470.256.02"])
def test_driver_versions_and_branches(driver):
    assert validate_driver(driver) == driver


@pytest.mark.parametrize("driver", ["latest", "535;id", "35", "535.309.01.1", "../535"])
def test_bad_driver_versions(driver):
    with pytest.raises(InputError, match="not valid"):
        validate_driver(driver)


def test_options_validate_every_field():
    with pytest.raises(InputError, match="--jobs"):
        BuildOptions(jobs=0)
    with pytest.raises(InputError, match="--apt-mirror"):
        BuildOptions(apt_mirror="file:///etc; rm -rf /")
    with pytest.raises(InputError, match="--flavor"):
        BuildOptions(flavor="closed")
    assert BuildOptions(kernel="latest", driver="535").kernel == "latest"


def test_module_set_follows_the_driver_release():
    assert expected_modules("535.309.01") == ["nvidia", "nvidia-uvm", "nvidia-modeset", "nvidia-drm",
                                              "nvidia-peermem"]
    assert expected_modules("352.39") == ["nvidia", "nvidia-uvm"]
    assert expected_modules("361.42") == ["nvidia", "nvidia-uvm", "nvidia-modeset"]
    assert expected_modules("390.157") == ["nvidia", "nvidia-uvm", "nvidia-modeset", "nvidia-drm"]


@pytest.mark.parametrize("value,built", [
    ("nvidia-uvm,nvidia", ("nvidia", "nvidia-uvm")),  # in load order, whatever order they are given in
    ("nvidia", ("nvidia",)),
    (" nvidia , nvidia-modeset,nvidia-drm ", ("nvidia", "nvidia-modeset", "nvidia-drm")),
])
def test_only_modules_builds_the_subset_in_load_order(value, built):
    from cudabuild.nvidia import modules_to_build

    assert BuildOptions(only_modules=value).only_modules == value
    assert modules_to_build("535.309.01", value) == built
    assert modules_to_build("535.309.01", None) == tuple(expected_modules("535.309.01"))


@pytest.mark.parametrize("value,said", [
    ("nvidia,nvidia-drm", "nvidia-drm needs nvidia-modeset"),
    ("nvidia-uvm", "nvidia-uvm needs nvidia"),
    ("nvidia,nvidia-vgpu", "'nvidia-vgpu' is not an NVIDIA module"),
    (",", "names no module"),
])
def test_only_modules_that_cannot_work_are_refused_with_the_fix(value, said):
    with pytest.raises(InputError) as info:
        BuildOptions(only_modules=value)
    assert said in info.value.message and info.value.hint


def test_only_modules_the_driver_does_not_have_is_refused_before_anything_is_fetched():
    with pytest.raises(InputError, match="NVIDIA 340.108 has no nvidia-peermem"):
        BuildOptions(driver="340.108", driver_source="run", only_modules="nvidia,nvidia-peermem")


def test_a_build_of_fewer_modules_has_its_own_tag():
    from cudabuild.artifact import image_tag

    full = image_tag("cudabuild/modules", "535.309.01", "proprietary", "6.1.0-57-amd64",
                     modules=tuple(expected_modules("535.309.01")))
    assert full == "cudabuild/modules:535.309.01-6.1.0-57-amd64"
    assert image_tag("cudabuild/modules", "535.309.01", "open", "6.1.0-57-amd64", "ab" * 32,
                     modules=("nvidia", "nvidia-uvm")) == \
        "cudabuild/modules:535.309.01-open-only.nvidia_uvm-signed.abababababab-6.1.0-57-amd64"


# ---- Debian's releases of every suite, and NVIDIA's branches (FACTS.md) -----------------------------------------
@pytest.mark.parametrize("release, distribution", [
    ("6.12.117+deb13-amd64", "trixie"), ("6.12.115+deb13.1-amd64", "trixie"), ("6.12.117+deb13-cloud-amd64", "trixie"),
    ("6.12.117+deb13-rt-amd64", "trixie"), ("6.12.95+deb12-amd64", "bookworm"), ("7.2.13+deb14-amd64", "forky"),
    ("6.1.0-57-amd64", "bookworm"), ("5.10.0-30-amd64", "bullseye")])
def test_a_debian_release_names_its_own_distribution_whatever_the_host_runs(release, distribution):
    from cudabuild.nvidia import DEBIAN_RELEASE_RE, debian_distribution

    assert DEBIAN_RELEASE_RE.fullmatch(release)
    assert debian_distribution(release, "trixie")[0] == distribution
    assert debian_distribution(release, None)[0] == distribution


def test_other_releases_take_the_hosts_debian_then_bookworm():
    from cudabuild.nvidia import DEBIAN_RELEASE_RE, debian_distribution

    for release in ("4.3.6-coreos", "6.12.60-flatcar", "6.12.117+deb13-arm64", None):
        assert release is None or not DEBIAN_RELEASE_RE.fullmatch(release)
        assert debian_distribution(release, "trixie") == ("trixie", "this host's Debian release (/etc/os-release)")
        assert debian_distribution(release, None)[0] == "bookworm"


def test_open_modules_are_the_default_from_560_and_the_only_ones_from_590():
    from cudabuild.nvidia import default_flavor, require_flavor

    assert [default_flavor(v) for v in ("535.309.01", "550.163.01", "560.28.03", "580.142", "595.45.04")] == \
        ["proprietary", "proprietary", "open", "open", "open"]
    require_flavor("580.142", "proprietary")  # the last branch with them
    for asked in ({"driver": "595.45.04", "flavor": "proprietary"}, {"driver": "595", "flavor": "proprietary"}):
        with pytest.raises(InputError) as info:
            BuildOptions(**asked, **({"driver_source": "run"} if "." in asked["driver"] else {}))
        text = info.value.render()
        assert "only the open modules" in text and "Maxwell, Pascal and Volta" in text and "580" in text
    with pytest.raises(InputError, match="from 515 on"):
        require_flavor("470.256.02", "open")
    assert BuildOptions(driver="595.45.04", driver_source="run").flavor is None  # decided by the plan, by version
