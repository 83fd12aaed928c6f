"""Which kernel a host boots next: /boot/vmlinuz-RELEASE (Debian) and Boot Loader Specification
entries (ostree hosts such as Fedora CoreOS), releases ordered as dpkg orders versions."""

from cudabuild.host import kernels
from cudabuild.node.config import NodeConfig
from cudabuild.node.staging import registry_candidates
from cudabuild.host.root import HostRoot


def test_the_newest_installed_kernel_newer_than_the_running_one_is_next(tmp_path):
    (tmp_path / "boot").mkdir()
    for release in ("6.1.0-9-amd64", "6.1.0-47-amd64", "6.1.0-56-amd64"):
        (tmp_path / "boot" / f"vmlinuz-{release}").write_bytes(b"")
    (tmp_path / "boot" / "vmlinuz-6.1.0-99-amd64.dpkg-new").write_bytes(b"")  # dpkg still unpacking: not installed
    (tmp_path / "boot" / "config-6.1.0-100-amd64").write_text("")  # not a kernel image
    host = HostRoot(tmp_path)
    assert kernels.installed(host) == {"6.1.0-9-amd64", "6.1.0-47-amd64", "6.1.0-56-amd64"}
    assert kernels.next_kernel(host, "6.1.0-47-amd64") == "6.1.0-56-amd64"
    assert kernels.newer("6.1.0-56-amd64", "6.1.0-9-amd64"), "numerically, not as text"
    assert kernels.next_kernel(HostRoot(tmp_path), "6.1.0-999-amd64") is None


def test_bls_entries_name_the_kernel_in_their_linux_line(tmp_path):
    entries = tmp_path / "boot" / "loader" / "entries"
    entries.mkdir(parents=True)
    (entries / "ostree-1-fedora-coreos.conf").write_text(
        "title Fedora CoreOS 39.20231101.3.0 (ostree:1)\nversion 1\n"
        "linux /ostree/fedora-coreos-3f2a/vmlinuz-6.5.6-300.fc39.x86_64\n"
        "initrd /ostree/fedora-coreos-3f2a/initramfs-6.5.6-300.fc39.x86_64.img\noptions root=UUID=x\n")
    (entries / "ostree-2-fedora-coreos.conf").write_text(
        "title Fedora CoreOS 39.20231119.3.0 (ostree:0)\nversion 2\n"
        "linux /ostree/fedora-coreos-9c1b/vmlinuz-6.5.11-300.fc39.x86_64\n")
    (entries / "notes.txt").write_text("linux /vmlinuz-9.9.9\n")  # not an entry
    host = HostRoot(tmp_path)
    assert kernels.installed(host) == {"6.5.6-300.fc39.x86_64", "6.5.11-300.fc39.x86_64"}
    assert kernels.next_kernel(host, "6.5.6-300.fc39.x86_64") == "6.5.11-300.fc39.x86_64"


def test_a_node_config_wants_its_branch_or_its_version():
    assert NodeConfig(driver="535").wants("535.309.01") and not NodeConfig(driver="535").wants("550.54.14")
    assert NodeConfig(driver="535.309.01").wants("535.309.01")
    assert not NodeConfig(driver="535.309").wants("535.3090.1")
    assert NodeConfig().wants("470.256.02") and NodeConfig().shown_driver == "any"


class _Tags:
    def __init__(self, tags):
        self._tags = tags

    def tags(self, repository):
        assert repository == "modules"
        return self._tags


def test_registry_candidates_for_a_kernel_newest_driver_and_full_sets_first():
    tags = ["535.309.01-6.1.0-56-amd64", "535.261.03-open-only.nvidia_modeset-6.1.0-56-amd64",
            "550.54.14-only.nvidia_uvm-6.1.0-56-amd64", "550.54.14-6.1.0-56-amd64", "535.309.01-6.1.0-47-amd64",
            "latest", "535.309.01-signed.0123456789ab-6.1.0-56-amd64_x"]
    found = registry_candidates(_Tags(tags), "6.1.0-56-amd64")
    assert [t for t, _ in found] == ["550.54.14-6.1.0-56-amd64", "550.54.14-only.nvidia_uvm-6.1.0-56-amd64",
                                     "535.309.01-6.1.0-56-amd64",
                                     "535.261.03-open-only.nvidia_modeset-6.1.0-56-amd64"]


def test_a_release_candidate_comes_before_its_release_and_flavours_stay_apart(tmp_path):
    assert kernels.newest(["6.2.0-rc7", "6.2.0"]) == "6.2.0"
    assert kernels.newer("6.2.0", "6.2.0-rc7") and not kernels.newer("6.2.0-rc7", "6.2.0")
    assert {kernels.flavour(r) for r in ("6.1.0-57-amd64", "6.1.0-9-amd64")} == {"-amd64"}
    assert kernels.flavour("6.1.0-57-cloud-amd64") == "-cloud-amd64" and kernels.flavour("6.1.0-57-rt-amd64") == "-rt-amd64"
    assert kernels.flavour("6.5.6-300.fc39.x86_64") == kernels.flavour("6.7.1-200.fc40.x86_64") == ".x86_64"
    (tmp_path / "boot").mkdir()
    for name in ("vmlinuz-6.2.0-rc7", "vmlinuz-6.1.0-60-cloud-amd64", "vmlinuz-6.1.0-57-amd64.efi.signed"):
        (tmp_path / "boot" / name).write_bytes(b"")
    host = HostRoot(tmp_path)
    assert kernels.next_kernel(host, "6.2.0") is None, "an rc is older than its release"
    assert kernels.next_kernel(host, "6.1.0-57-amd64") is None, "another flavour and a signed copy are not next"


def test_trixies_kernels_are_ordered_as_their_packages_are_and_an_abi_bump_is_the_same_line(tmp_path):
    """Debian 13's releases (FACTS.md): 6.12.115+deb13.1 is an ABI bump of 6.12.115 (package 6.12.115-2),
    older than 6.12.117+deb13 (6.12.117-1); its flavour is the same line as the others'."""
    assert len({kernels.flavour(r) for r in ("6.12.107+deb13-amd64", "6.12.115+deb13.1-amd64", "6.12.117+deb13-amd64",
                                              "6.12.95+deb12-amd64", "6.1.0-57-amd64")}) == 1
    assert kernels.flavour("6.12.117+deb13-cloud-amd64") == "-cloud-amd64"
    (tmp_path / "boot").mkdir()
    for release in ("6.12.107+deb13-amd64", "6.12.115+deb13.1-amd64", "6.12.117+deb13-amd64",
                    "6.12.118+deb13-rt-amd64"):
        (tmp_path / "boot" / f"vmlinuz-{release}").write_bytes(b"")
    host = HostRoot(tmp_path)
    assert kernels.next_kernel(host, "6.12.107+deb13-amd64") == "6.12.117+deb13-amd64"
    assert kernels.next_kernel(host, "6.12.117+deb13-amd64") is None, "6.12.115+deb13.1 is older, the rt kernel another line"
    assert kernels.next_kernel(host, "6.12.115+deb13-amd64") == "6.12.117+deb13-amd64"
    (tmp_path / "boot" / "vmlinuz-6.12.117+deb13-amd64").unlink()
    assert kernels.next_kernel(host, "6.12.115+deb13-amd64") == "6.12.115+deb13.1-amd64", "the ABI bump is newer"
    # a bookworm host with bookworm-backports' 6.12 installed boots it next
    for release in ("6.12.107+deb13-amd64", "6.12.115+deb13.1-amd64"):
        (tmp_path / "boot" / f"vmlinuz-{release}").unlink()
    (tmp_path / "boot" / "vmlinuz-6.12.95+deb12-amd64").write_bytes(b"")
    assert kernels.next_kernel(host, "6.1.0-57-amd64") == "6.12.95+deb12-amd64"


def test_trixies_relative_build_link_leads_to_the_headers_inside_the_host_root(tmp_path):
    """Trixie links /usr/lib/modules/R/build -> ../../../src/linux-headers-R (bookworm's link was
    absolute), under a merged /usr (lib -> usr/lib): the node finds the kernel's Module.symvers there."""
    from cudabuild.node.staging import host_symvers

    release = "6.12.118+deb13-amd64"
    (tmp_path / "usr/src" / f"linux-headers-{release}").mkdir(parents=True)
    (tmp_path / "usr/src" / f"linux-headers-{release}" / "Module.symvers").write_text("0x1\t_printk\tvmlinux\tEXPORT_SYMBOL\t\n")
    (tmp_path / "usr/lib/modules" / release).mkdir(parents=True)
    (tmp_path / "usr/lib/modules" / release / "build").symlink_to(f"../../../src/linux-headers-{release}")
    (tmp_path / "lib").symlink_to("usr/lib")
    found = host_symvers(HostRoot(tmp_path), release)
    assert found is not None and found.resolve() == (tmp_path / "usr/src" / f"linux-headers-{release}" / "Module.symvers")
