"""The boot test's verdicts, from what real kernels printed (FACTS.md, and a guest of this project:
Debian's 6.1.0-56-amd64 with cudabuild's 535.309.01 modules)."""

from pathlib import Path

from cudabuild import artifact
from cudabuild.boottest import KernelImage, judge, parse_console
from tests.elf import write_artifact

MARK = "::cudabuild-boot::"
# The console of a real boot test (the kernel's own lines about each insmod, as the guest reported them).
CONSOLE = """\
c::cudabuild-boot::kernel 6.1.0-56-amd64
[    3.1] some kernel line outside our markers
::cudabuild-boot::sig_enforce N
::cudabuild-boot::loader-says insmod: can't insert '/opt/cudabuild/modules/nvidia.ko': No such device
::cudabuild-boot::loader-says cudabuild-loader: loading nvidia.ko failed; the kernel's reason is in dmesg (dmesg | tail)
::cudabuild-boot::loader-exit 14
::cudabuild-boot::attempt nvidia 19
::cudabuild-boot::said nvidia insmod: can't insert '/opt/cudabuild/modules/nvidia.ko': No such device
::cudabuild-boot::dmesg nvidia [    6.626791] nvidia: loading out-of-tree module taints kernel.
::cudabuild-boot::dmesg nvidia [    7.431361] nvidia: module verification failed: signature and/or required key missing - tainting kernel
::cudabuild-boot::dmesg nvidia [    8.419067] NVRM: No NVIDIA GPU found.
::cudabuild-boot::skip nvidia-uvm nvidia
::cudabuild-boot::skip nvidia-modeset nvidia
::cudabuild-boot::skip nvidia-drm nvidia-modeset
::cudabuild-boot::attempt nvidia-peermem 22
::cudabuild-boot::said nvidia-peermem insmod: can't insert '/opt/cudabuild/modules/nvidia-peermem.ko': Invalid argument
::cudabuild-boot::dmesg nvidia-peermem [   12.866857] nvidia-peermem nv_mem_client_init:551 ERROR module compiled without IB peer memory symbols present
::cudabuild-boot::done
"""


def test_a_real_boot_is_read_into_verdicts(tmp_path):
    root = write_artifact(tmp_path / "a", modules=(("nvidia", "drm"), ("nvidia-uvm", "nvidia"),
                                                   ("nvidia-modeset", "nvidia,video"),
                                                   ("nvidia-drm", "drm,drm_kms_helper,nvidia-modeset"),
                                                   ("nvidia-peermem", "")))
    image = KernelImage(release="6.1.0-56-amd64", vmlinuz=Path("/v"), modules=None, source="linux-image")
    result = parse_console(CONSOLE.splitlines(), artifact.load(root), image=image, accel="tcg", append="",
                           seconds=20.2)
    verdicts = {m.name: m.verdict for m in result.modules}
    assert verdicts == {"nvidia": "accepted", "nvidia-uvm": "not tried", "nvidia-modeset": "not tried",
                        "nvidia-drm": "not tried", "nvidia-peermem": "accepted"}
    assert result.verdict == "accepted" and result.kernel == "6.1.0-56-amd64"
    assert result.loader_exit == 14 and any("loading nvidia.ko failed" in line for line in result.loader_said)
    nvidia = result.modules[0]
    assert "no NVIDIA GPU" in nvidia.reason and any("No NVIDIA GPU found" in line for line in nvidia.kernel_said)
    assert "declined (Invalid argument)" in result.modules[-1].reason
    assert result.to_json()["modules"][1]["reason"] == "it needs nvidia, which did not load"


def test_the_kernels_refusals_are_rejections():
    refusals = {
        "insmod: can't insert 'nvidia.ko': invalid module format": "invalid module format",
        "[ 5.1] nvidia: disagrees about version of symbol _printk": "disagrees",
        "insmod: can't insert 'nvidia.ko': Key was rejected by service": "unsigned",
        "[ 5.1] nvidia: Unknown symbol drm_gem_object_free (err -2)": "does not export",
    }
    for line, reason in refusals.items():
        verdict = judge("nvidia", 1, [line], [])
        assert verdict.verdict == "rejected" and reason in verdict.reason, line
    # A signature-taint note followed by an unknown failure is not the module's init speaking.
    quiet = judge("nvidia", 1, ["insmod: can't insert: Operation not permitted"],
                  ["[ 7.4] nvidia: module verification failed: signature and/or required key missing - tainting kernel"])
    assert quiet.verdict == "rejected"
    assert judge("nvidia-uvm", 0, [], []).verdict == "accepted"


def _bzimage(release: str) -> bytes:
    """The x86 boot protocol's header: 'HdrS' at 0x202, kernel_version pointer (minus 0x200) at 0x20e."""
    data = bytearray(0x400)
    data[0x202:0x206] = b"HdrS"
    data[0x20E:0x210] = (0x300 - 0x200).to_bytes(2, "little")
    text = f"{release} (debian-kernel@lists.debian.org) #1 SMP PREEMPT_DYNAMIC".encode()
    data[0x300:0x300 + len(text)] = text
    return bytes(data)


def test_the_release_is_read_from_a_bzimage(tmp_path):
    import pytest

    from cudabuild.boottest import kernel_image_from_file
    from cudabuild.store.cache import Cache
    from cudabuild.errors import InputError
    from cudabuild.ui import Reporter

    vmlinuz = tmp_path / "vmlinuz"
    vmlinuz.write_bytes(_bzimage("6.1.192-test"))
    image = kernel_image_from_file(str(vmlinuz), Cache(tmp_path / "cache"), Reporter(quiet=True))
    assert image.release == "6.1.192-test" and image.modules is None
    (tmp_path / "text").write_text("not a kernel\n" * 100)
    with pytest.raises(InputError, match="not a Linux kernel image"):
        kernel_image_from_file(str(tmp_path / "text"), Cache(tmp_path / "cache"), Reporter(quiet=True))


def test_boot_parameters_are_checked():
    import pytest

    from cudabuild.errors import InputError
    from cudabuild.options import BuildOptions

    assert BuildOptions(boot_append="module.sig_enforce=1 loglevel=7").boot_append
    with pytest.raises(InputError, match="--boot-append"):
        BuildOptions(boot_append="init=/bin/sh; reboot")
