"""Resolution against a Packages index written here (the archive itself is used in e2e tests)."""

import lzma

import pytest

from cudabuild.store.cache import Cache
from cudabuild.sources.debian import DebianArchive, kernel_supported
from cudabuild.errors import InputError
from cudabuild.ui import Reporter

INDEX = """\
Package: linux-headers-6.1.0-56-amd64
Architecture: amd64
Version: 6.1.192-2
Depends: linux-headers-6.1.0-56-common (= 6.1.192-2), linux-kbuild-6.1 (>= 6.1.192-2), linux-compiler-gcc-12-x86
Filename: pool/main/l/linux/linux-headers-6.1.0-56-amd64_6.1.192-2_amd64.deb
Size: 100
SHA256: {h}1

Package: linux-headers-6.1.0-56-common
Architecture: all
Version: 6.1.192-2
Filename: pool/main/l/linux/common.deb
Size: 100
SHA256: {h}2

Package: linux-kbuild-6.1
Architecture: amd64
Version: 6.1.170-1
Filename: pool/main/l/linux/kbuild-old.deb
Size: 100
SHA256: {h}3

Package: linux-kbuild-6.1
Architecture: amd64
Version: 6.1.192-2
Filename: pool/main/l/linux/kbuild.deb
Size: 100
SHA256: {h}4

Package: linux-headers-6.1.0-47-amd64
Architecture: amd64
Version: 6.1.170-1
Depends: linux-headers-6.1.0-47-common (= 6.1.170-1), linux-kbuild-6.1 (>= 6.1.170-1)
Filename: pool/main/l/linux/h47.deb
Size: 100
SHA256: {h}5

Package: nvidia-kernel-source
Architecture: amd64
Version: 535.309.01-0+deb12u1
Filename: pool/non-free/n/nvidia/src.deb
Size: 100
SHA256: {h}6

Package: nvidia-tesla-470-kernel-source
Architecture: amd64
Version: 470.256.02-1~deb12u1
Filename: pool/non-free/n/nvidia/src470.deb
Size: 100
SHA256: {h}7

Package: bash
Architecture: amd64
Version: 5.2
Filename: pool/main/b/bash.deb
Size: 100
SHA256: {h}8
""".format(h="a" * 63)

USERSPACE = "".join(f"""
Package: {name}
Architecture: amd64
Version: {version}
Filename: pool/non-free/n/{name}_{version}.deb
Size: 10
SHA256: {"b" * 64}
""" for name, version in [("libcuda1", "535.309.01-0+deb12u1"), ("libnvidia-ml1", "535.309.01-0+deb12u1"),
                          ("libnvidia-ptxjitcompiler1", "535.309.01-0+deb12u1"),
                          ("nvidia-smi", "535.309.01-0+deb12u1"),
                          ("libnvidia-tesla-470-cuda1", "470.256.02-1~deb12u1"),
                          ("libnvidia-tesla-470-ml1", "470.256.02-1~deb12u1"),
                          ("libnvidia-tesla-470-ptxjitcompiler1", "470.256.02-1~deb12u1"),
                          ("nvidia-tesla-470-smi", "470.256.02-1~deb12u1")])


class StubFetcher:
    """Serves one Packages.xz for the main suite; nothing for the others."""

    def __init__(self, text: str):
        self.data = lzma.compress(text.encode())
        self.urls = []

    def get_bytes(self, url):
        self.urls.append(url)
        return self.data if "/dists/bookworm/main/" in url else None


def make_archive(path, text):
    return DebianArchive(cache=Cache(path), fetcher=StubFetcher(text), reporter=Reporter(quiet=True),
                         mirror="http://mirror.test/debian", security_mirror="http://mirror.test/security",
                         distribution="bookworm")


@pytest.fixture
def archive(tmp_path):
    return make_archive(tmp_path, INDEX + USERSPACE)


def test_kernel_packages_follow_the_headers_dependencies(archive):
    packages, gcc = archive.kernel_packages("6.1.0-56-amd64")
    assert [(p.name, p.version) for p in packages] == [
        ("linux-headers-6.1.0-56-amd64", "6.1.192-2"), ("linux-headers-6.1.0-56-common", "6.1.192-2"),
        ("linux-kbuild-6.1", "6.1.192-2")]
    assert gcc == 12
    assert packages[0].url == ("http://mirror.test/debian/pool/main/l/linux/"
                               "linux-headers-6.1.0-56-amd64_6.1.192-2_amd64.deb")


def test_unknown_kernel_lists_what_exists(archive):
    with pytest.raises(InputError) as info:
        archive.kernel_packages("9.9.9-amd64")
    text = info.value.render()
    assert "9.9.9-amd64" in text and "6.1.0-56-amd64, 6.1.0-47-amd64" in text


def test_latest_kernel_is_the_newest_headers(archive):
    assert archive.latest_kernel() == "6.1.0-56-amd64"


def test_driver_branch_resolves_to_its_newest_release_with_matching_userspace(archive):
    source, userspace, version = archive.driver_packages("535", "proprietary", "6.1.0-56-amd64")
    assert (source.name, version) == ("nvidia-kernel-source", "535.309.01")
    assert {p.name for p in userspace} == {"libcuda1", "libnvidia-ml1", "libnvidia-ptxjitcompiler1", "nvidia-smi"}
    assert all(p.upstream_version == "535.309.01" for p in userspace)


def test_tesla_branch_uses_its_own_package_names(archive):
    source, userspace, version = archive.driver_packages("470.256.02", "proprietary", "6.1.0-56-amd64")
    assert source.name == "nvidia-tesla-470-kernel-source" and version == "470.256.02"
    assert {p.name for p in userspace} >= {"libnvidia-tesla-470-cuda1", "libnvidia-tesla-470-ml1"}


def test_missing_userspace_of_the_same_version_is_an_error(tmp_path):
    without_smi = (INDEX + USERSPACE).replace("Package: nvidia-smi\n", "Package: nvidia-smi-other\n")
    with pytest.raises(InputError, match="no nvidia-smi of that version"):
        make_archive(tmp_path, without_smi).driver_packages("535", "proprietary", "6.1.0-56-amd64")


def test_unknown_driver_lists_the_versions(archive):
    with pytest.raises(InputError) as info:
        archive.driver_packages("999.1.1", "proprietary", "6.1.0-56-amd64")
    assert "535.309.01, 470.256.02" in info.value.render()


def test_default_driver_is_the_newest_that_supports_the_kernel(archive):
    assert archive.driver_packages(None, "proprietary", "6.1.0-56-amd64")[2] == "535.309.01"


def test_index_is_cached(archive):
    archive.packages()
    fetched = len(archive.fetcher.urls)
    again = DebianArchive(cache=archive.cache, fetcher=archive.fetcher, reporter=Reporter(quiet=True),
                          mirror="http://mirror.test/debian", security_mirror="http://mirror.test/security",
                          distribution="bookworm")
    assert "nvidia-kernel-source" in again.packages()
    assert len(archive.fetcher.urls) == fetched


def test_support_table():
    assert kernel_supported("535.309.01", "6.1.0-56-amd64")
    assert kernel_supported("470.256.02", "6.9.1")
    assert not kernel_supported("470.256.02", "6.12.117")
    assert not kernel_supported("352.39", "4.4.0")
    assert kernel_supported("352.39", "4.3.6-coreos")
    assert kernel_supported("580.1", "6.14")


# ---- Debian 13 trixie (FACTS.md, "Debian 13 trixie"): release names, suites, the compiler ----------------
def _headers(release, version, common, *, compiler="gcc-14", sha="c"):
    return f"""
Package: linux-headers-{release}
Architecture: amd64
Version: {version}
Depends: linux-base (>= 4.12~), linux-headers-{common} (= {version}), linux-image-{release} (= {version}) | linux-image-{release}-unsigned (= {version}), linux-kbuild-{release.rsplit('-', 1)[0].removesuffix('-cloud').removesuffix('-rt')}, {compiler}
Filename: pool/main/l/linux/linux-headers-{release}_{version}_amd64.deb
Size: 100
SHA256: {sha * 64}

Package: linux-headers-{common}
Architecture: all
Version: {version}
Filename: pool/main/l/linux/linux-headers-{common}_{version}_all.deb
Size: 100
SHA256: {sha * 64}
"""


def _kbuild(abi, version):
    return f"""
Package: linux-kbuild-{abi}
Architecture: amd64
Version: {version}
Filename: pool/main/l/linux/linux-kbuild-{abi}_{version}_amd64.deb
Size: 100
SHA256: {"d" * 64}
"""


TRIXIE = {
    "/dists/trixie/main/": _headers("6.12.117+deb13-amd64", "6.12.117-1", "6.12.117+deb13-common")
    + _headers("6.12.117+deb13-rt-amd64", "6.12.117-1", "6.12.117+deb13-common-rt") + _kbuild("6.12.117+deb13", "6.12.117-1")
    + _headers("6.12.115+deb13.1-amd64", "6.12.115-2", "6.12.115+deb13.1-common") + _kbuild("6.12.115+deb13.1", "6.12.115-2")
    + _headers("6.12.107+deb13-amd64", "6.12.107-1", "6.12.107+deb13-common"),
    "/dists/trixie-security/main/": _headers("6.12.118+deb13-amd64", "6.12.118-1", "6.12.118+deb13-common")
    + _kbuild("6.12.118+deb13", "6.12.118-1"),
    "/dists/trixie-backports/main/": _headers("7.2.13+deb13-amd64", "7.2.13-1~bpo13+1", "7.2.13+deb13-common",
                                               compiler="gcc-15-for-host") + _kbuild("7.2.13+deb13", "7.2.13-1~bpo13+1"),
    "/dists/trixie-backports/non-free/": """
Package: nvidia-kernel-source
Architecture: amd64
Version: 550.163.01-4~bpo13+1
Filename: pool/non-free/n/nvidia-graphics-drivers/nvidia-kernel-source_550.163.01-4~bpo13+1_amd64.deb
Size: 100
SHA256: {e}
""".format(e="9" * 64),
    "/dists/trixie/non-free/": """
Package: nvidia-kernel-source
Architecture: amd64
Version: 550.163.01-2
Filename: pool/non-free/n/nvidia-graphics-drivers/nvidia-kernel-source_550.163.01-2_amd64.deb
Size: 100
SHA256: {e}
""".format(e="e" * 64) + "".join(f"""
Package: {name}
Architecture: amd64
Version: 550.163.01-2
Filename: pool/non-free/n/nvidia-graphics-drivers/{name}_550.163.01-2_amd64.deb
Size: 10
SHA256: {"f" * 64}
""" for name in ("libcuda1", "libnvidia-ml1", "libnvidia-ptxjitcompiler1", "nvidia-smi")),
}


class SuiteFetcher:
    """Serves each suite's own Packages.xz, as a mirror does."""

    def __init__(self, by_suite: dict[str, str]):
        self.by_suite = {k: lzma.compress(v.strip().encode() + b"\n") for k, v in by_suite.items()}

    def get_bytes(self, url):
        return next((data for part, data in self.by_suite.items() if part in url), None)


@pytest.fixture
def trixie(tmp_path):
    return DebianArchive(cache=Cache(tmp_path), fetcher=SuiteFetcher(TRIXIE), reporter=Reporter(quiet=True),
                         mirror="http://mirror.test/debian", security_mirror="http://mirror.test/security",
                         distribution="trixie")


def test_trixie_latest_is_the_newest_package_across_the_suite_and_its_security_updates(trixie):
    assert trixie.latest_kernel() == "6.12.118+deb13-amd64"  # trixie-security's, newer than trixie's 6.12.117
    assert trixie.latest_kernel("rt-amd64") == "6.12.117+deb13-rt-amd64"
    # by the package's Debian version, not the name's text: the ABI bump 6.12.115+deb13.1 (6.12.115-2) sits
    # between 6.12.117 and 6.12.107; backports' 7.2 is listed, but never "latest"
    assert trixie.kernel_releases(backports=False) == ["6.12.118+deb13-amd64", "6.12.117+deb13-amd64",
                                                       "6.12.117+deb13-rt-amd64", "6.12.115+deb13.1-amd64",
                                                       "6.12.107+deb13-amd64"]
    assert trixie.kernel_releases()[0] == "7.2.13+deb13-amd64"


def test_trixie_build_tree_is_headers_common_and_kbuild_of_one_abi_with_gcc_14(trixie):
    packages, gcc = trixie.kernel_packages("6.12.115+deb13.1-amd64")
    assert [p.name for p in packages] == ["linux-headers-6.12.115+deb13.1-amd64",
                                          "linux-headers-6.12.115+deb13.1-common", "linux-kbuild-6.12.115+deb13.1"]
    assert gcc == 14
    rt, _ = trixie.kernel_packages("6.12.117+deb13-rt-amd64")
    assert rt[1].name == "linux-headers-6.12.117+deb13-common-rt"
    # the 7.x kernels name their compiler gcc-N-for-host; found in backports without being told
    assert trixie.kernel_packages("7.2.13+deb13-amd64")[1] == 15


def test_a_kernel_past_what_debians_driver_was_tested_with_is_refused_before_any_download(trixie):
    source, userspace, version = trixie.driver_packages(None, "proprietary", "6.12.118+deb13-amd64")
    assert version == "550.163.01" and [p.name for p in userspace][:2] == ["libcuda1", "libnvidia-ml1"]
    assert source.version == "550.163.01-2"  # trixie's own, not backports' rebuild of it
    for request in (None, "550"):
        with pytest.raises(InputError) as info:
            trixie.driver_packages(request, "proprietary", "7.2.13+deb13-amd64")
        text = info.value.render()
        assert "7.2.13+deb13-amd64" in text and "6.15" in text and "--driver-source run --driver 580" in text


def test_backports_drivers_are_taken_only_when_asked_and_said_otherwise(tmp_path):
    from cudabuild.sources.debian import newer_in_backports

    asked = DebianArchive(cache=Cache(tmp_path), fetcher=SuiteFetcher(TRIXIE), reporter=Reporter(quiet=True),
                          mirror="http://mirror.test/debian", security_mirror="http://mirror.test/security",
                          distribution="trixie", driver_backports=True)
    source, _, version = asked.driver_packages(None, "proprietary", "6.12.118+deb13-amd64")
    assert (source.version, source.suite, version) == ("550.163.01-4~bpo13+1", "trixie-backports", "550.163.01")
    plain = DebianArchive(cache=Cache(tmp_path / "plain"), fetcher=SuiteFetcher(TRIXIE), reporter=Reporter(quiet=True),
                          mirror="http://mirror.test/debian", security_mirror="http://mirror.test/security",
                          distribution="trixie")
    source, _, _ = plain.driver_packages(None, "proprietary", "6.12.118+deb13-amd64")
    assert newer_in_backports(plain, source).version == "550.163.01-4~bpo13+1"
    assert newer_in_backports(asked, source) is None


def test_latest_follows_the_distributions_own_kernel_line_not_a_second_one(tmp_path):
    """Bookworm's security suite carries linux-6.12 (6.12.x+deb12) beside its own 6.1 line; a
    bookworm host's apt upgrade follows linux-headers-amd64, and so does latest."""
    second = _headers("6.12.57+deb12-amd64", "6.12.57-1~deb12u1", "6.12.57+deb12-common", compiler="gcc-12")
    meta = """
Package: linux-headers-amd64
Architecture: amd64
Version: 6.1.192-2
Depends: linux-headers-6.1.0-56-amd64 (= 6.1.192-2)
Filename: pool/main/l/linux-signed-amd64/linux-headers-amd64_6.1.192-2_amd64.deb
Size: 10
SHA256: {s}
""".format(s="1" * 64)
    archive = make_archive(tmp_path, INDEX + USERSPACE + second + meta)
    assert archive.kernel_releases(backports=False)[0] == "6.12.57+deb12-amd64"
    assert archive.latest_kernel() == "6.1.0-56-amd64"
    # without the metapackage (a mirror that filters it), the newest of all
    assert make_archive(tmp_path / "bare", INDEX + USERSPACE + second).latest_kernel() == "6.12.57+deb12-amd64"
