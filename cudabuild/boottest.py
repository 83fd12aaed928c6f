"""The real kernel as the judge: boot the modules' own kernel in a QEMU guest, with the modules and
the image's real loader (images/loader.sh, real insmod) in an initramfs, and read what the kernel
said of each module.

Nothing is loaded on this machine: insmod runs only in the guest, under its own kernel. The guest
is TCG-emulated unless a probe boot shows KVM works here (FACTS.md: /dev/kvm may exist and still
hang), gets a time limit, and is killed when it overruns.

Verdicts, per module:
- accepted: the kernel loaded it, or ran its init (without an NVIDIA GPU, nvidia.ko's init says
  "No NVIDIA GPU found" and fails with ENODEV: vermagic, CRCs and every symbol were accepted);
- rejected, with the kernel's own lines: invalid module format, a symbol whose version disagrees,
  an unknown symbol, an unsigned module under enforced signatures;
- not tried: it needs one of ours that did not load."""

from __future__ import annotations

import errno
import json
import lzma
import os
import platform
import re
import shutil
import signal
import subprocess
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from debian.arfile import ArFile

from cudabuild.artifact import Artifact
from cudabuild.store.cache import Cache
from cudabuild.host import devices
from cudabuild.host.devices import FACTS_FILE
from cudabuild.host.loader import SETTINGS, settings
from cudabuild.digests import sha256_file
from cudabuild.errors import InputError, VerifyError, shown
from cudabuild.options import BOOT_APPEND_RE
from cudabuild.resources import resource_dir, static_busybox
from cudabuild.ui import Reporter
from cudabuild.verify import read_module

MARK = "::cudabuild-boot::"
GUEST_TIMEOUT = 300.0
KVM_PROBE_TIMEOUT = 20.0
GUEST_MEMORY = "2048"
APPLETS = ("sh", "insmod", "modprobe", "mount", "dmesg", "poweroff", "cat", "echo", "uname", "sed", "ls", "tr",
           "mknod", "mkdir", "rm", "touch", "basename", "sort", "true", "false", "sleep")


def _name(module: str) -> str:
    """The kernel's name of a module: '-' and '_' are the same to it."""
    return module.replace("-", "_")


# ---- the kernel image --------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelImage:
    release: str
    vmlinuz: Path
    modules: Path | None  # lib/modules/RELEASE of the image, when it came with its modules
    source: str


def _vmlinuz_release(path: Path) -> str:
    """The release a bzImage names (x86 boot protocol: 'HdrS' at 0x202, the kernel_version
    pointer at 0x20e, relative to 0x200)."""
    with open(path, "rb") as f:
        head = f.read(0x210)
        if len(head) < 0x210 or head[0x202:0x206] != b"HdrS":
            raise InputError(f"--kernel-image {path} is not a Linux kernel image (bzImage)",
                             hint="pass the target's vmlinuz (/boot/vmlinuz-RELEASE, CoreOS /usr/boot/vmlinuz) "
                             "or Debian's linux-image-RELEASE .deb")
        pointer = int.from_bytes(head[0x20E:0x210], "little") + 0x200
        f.seek(pointer)
        text = f.read(256).split(b"\0", 1)[0].decode("ascii", "replace")
    release = text.split(" ", 1)[0]
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}", release):
        raise InputError(f"--kernel-image {path} names no kernel release ({shown(text)})",
                         hint="pass a bzImage of x86_64 Linux")
    return release


IMAGE_TREE_FORMAT = 2  # 2: usr/lib/modules/ kept too (a tree of format 1 lacks trixie's modules)


def unpack_kernel_deb(deb: Path, cache: Cache, reporter: Reporter, *, source: str | None = None) -> KernelImage:
    """A Debian linux-image .deb: its vmlinuz and its modules (lib/modules/, or usr/lib/modules/ as
    trixie's merged-/usr packages ship them; kept as lib/modules/), unpacked once (by the .deb's
    content) into the cache; other members are skipped, unsafe ones refused."""
    digest = sha256_file(deb)
    target = cache.kernels / f"image-{IMAGE_TREE_FORMAT}-{digest[:24]}"
    if not target.is_dir():
        with cache.lock(f"tree-{target.name}"):
            if not target.is_dir():
                with reporter.step(f"unpack kernel image {source or deb.name}"):
                    staging = cache.workdir("image")
                    try:
                        _unpack_deb(deb, staging / "tree")
                        cache.publish_tree(staging / "tree", target)
                    finally:
                        shutil.rmtree(staging, ignore_errors=True)
    kernels = sorted((target / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise InputError(f"{deb} holds no boot/vmlinuz-*: it is not a linux-image package",
                         hint="pass Debian's linux-image-RELEASE .deb, or the vmlinuz itself")
    release = kernels[0].name.removeprefix("vmlinuz-")
    modules = target / "lib" / "modules" / release
    return KernelImage(release=release, vmlinuz=kernels[0], modules=modules if modules.is_dir() else None,
                       source=source or deb.name)


def _unpack_deb(deb: Path, dest: Path) -> None:
    dest.mkdir(parents=True)
    try:
        archive = ArFile(str(deb))
        member = next((m for m in archive.getmembers() if m.name.startswith("data.tar")), None)
        if member is None:
            raise InputError(f"{deb} is not a Debian package (no data.tar)", hint="pass a linux-image .deb")
        mode = {"xz": "r|xz", "gz": "r|gz", "zst": None}.get(member.name.rsplit(".", 1)[-1], "r|")
        if mode is None:
            raise InputError(f"{deb}: its data is zstd-compressed, which cudabuild cannot unpack yet",
                             hint="pass the vmlinuz itself with --kernel-image")
        with tarfile.open(fileobj=member, mode=mode) as tar:
            for entry in tar:
                name = PurePosixPath(entry.name.removeprefix("./"))
                if name.parts[:2] == ("usr", "lib"):  # merged /usr (trixie on): usr/lib/modules/R/...
                    name = PurePosixPath(*name.parts[1:])
                if not name.parts or name.parts[0] not in ("boot", "lib") or ".." in name.parts:
                    continue
                if name.parts[0] == "lib" and name.parts[1:2] != ("modules",):
                    continue
                if not (entry.isfile() or entry.isdir()):
                    continue  # links (build/, source/) point into the build host's tree
                entry.name = str(name)
                tar.extract(entry, dest, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    except (OSError, tarfile.TarError, lzma.LZMAError, EOFError) as exc:
        shutil.rmtree(dest, ignore_errors=True)
        raise InputError(f"{deb} cannot be unpacked ({shown(str(exc))})", hint="download it again") from exc
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def kernel_image_from_file(value: str, cache: Cache, reporter: Reporter) -> KernelImage:
    from cudabuild.options import existing_file

    path = existing_file(value, "--kernel-image", "the target's vmlinuz or Debian's linux-image-RELEASE .deb")
    with open(path, "rb") as f:
        is_deb = f.read(8) == b"!<arch>\n"
    if is_deb:
        return unpack_kernel_deb(path, cache, reporter)
    return KernelImage(release=_vmlinuz_release(path), vmlinuz=path, modules=None, source=str(path))


# ---- the kernel's own modules ours need --------------------------------------------------------
def kernel_modules_needed(image: KernelImage, roots: tuple[str, ...]) -> tuple[list[Path], list[str]]:
    """The image's modules that `roots` need, dependencies first (from each module's own
    .modinfo `depends`), and the names the image does not have."""
    if image.modules is None:
        return [], list(roots)
    by_name: dict[str, Path] = {}
    for path in image.modules.rglob("*.ko*"):
        stem = path.name.split(".ko", 1)[0]
        by_name.setdefault(_name(stem), path)
    ordered: list[Path] = []
    missing: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        key = _name(name)
        if key in seen:
            return
        seen.add(key)
        path = by_name.get(key)
        if path is None:
            missing.append(name)
            return
        for dep in _depends(path):
            visit(dep)
        ordered.append(path)

    for root in roots:
        visit(root)
    return ordered, missing


def _depends(path: Path) -> tuple[str, ...]:
    if path.suffix == ".xz":
        data = lzma.decompress(path.read_bytes())
        tmp = path.with_name(path.name + ".probe")
        try:
            tmp.write_bytes(data)
            return read_module(tmp, digest=False).depends
        finally:
            tmp.unlink(missing_ok=True)
    return read_module(path, digest=False).depends


# ---- the initramfs ------------------------------------------------------------------------------
def make_initramfs(checked: Artifact, image: KernelImage, dependencies: list[Path], into: Path) -> Path:
    """The guest's root: busybox, the kernel's modules ours need (with a modules.dep), the
    artifact's modules, the real loader with its settings, and /init. Written as a newc cpio."""
    root = into / "root"
    for d in ("bin", "proc", "sys", "dev", "tmp", "cudabuild", "opt/cudabuild/modules"):
        (root / d).mkdir(parents=True)
    shutil.copy2(static_busybox(), root / "bin" / "busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    boot = resource_dir("images") / "boot"
    for script in ("init", "insmod"):
        target = root / ("init" if script == "init" else "cudabuild/insmod")
        shutil.copy2(boot / script, target)
        target.chmod(0o755)
    home = root / "opt" / "cudabuild"
    shutil.copy2(resource_dir("images") / "loader.sh", home / "loader.sh")
    shutil.copy2(resource_dir("images") / FACTS_FILE, home / FACTS_FILE)
    (home / "loader.sh").chmod(0o755)
    (home / SETTINGS).write_text(settings(checked.manifest))
    for m in checked.manifest.modules:
        shutil.copy2(checked.module_path(m.name), home / "modules" / m.file)
    ours = {_name(m.name) for m in checked.manifest.modules}
    lines = []
    facts = devices.facts()  # the load order, written once (images/nvidia-devices.conf)
    for name in (*facts.load_order, *facts.optional_modules):
        if name in {m.name for m in checked.manifest.modules}:
            needs = [d for d in checked.manifest.module(name).depends if _name(d) in ours]
            lines.append(" ".join([name, *needs]))
    (root / "cudabuild" / "modules.list").write_text("\n".join(lines) + "\n")
    release_dir = root / "lib" / "modules" / image.release
    release_dir.mkdir(parents=True)
    dep_lines, placed = [], []
    for path in dependencies:
        rel = Path("kernel") / path.name.split(".ko", 1)[0]
        target = release_dir / f"{rel}.ko"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(lzma.decompress(path.read_bytes()) if path.suffix == ".xz" else path.read_bytes())
        deps = [f"kernel/{p.name.split('.ko', 1)[0]}.ko" for p in placed
                if _name(p.name.split(".ko", 1)[0]) in {_name(d) for d in _depends(path)}]
        dep_lines.append(f"{rel}.ko: {' '.join(reversed(deps))}".rstrip())
        placed.append(path)
    (release_dir / "modules.dep").write_text("\n".join(dep_lines) + "\n")
    initrd = into / "initrd.cpio"
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    with open(initrd, "wb") as out:
        cpio = subprocess.run(["cpio", "-o", "-H", "newc", "-R", "0:0", "--quiet"], cwd=root,
                              input="\n".join([".", *names]).encode(), stdout=out, stderr=subprocess.PIPE)
    if cpio.returncode != 0:
        raise InputError(f"cpio could not write the guest's initramfs: {cpio.stderr.decode(errors='replace')[-300:]}",
                         hint="install cpio (bash scripts/setup does)")
    return initrd


# ---- the guest -----------------------------------------------------------------------------------
def _qemu() -> str:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise InputError("the boot test needs QEMU on this host",
                         hint="install it: apt-get install qemu-system-x86 (bash scripts/setup does)")
    return qemu


def run_guest(image: KernelImage, initrd: Path, *, append: str, accel: str, timeout: float) -> tuple[list[str], bool]:
    """Boot, collect the console; kill the guest when it overruns. (lines, finished in time)."""
    accel_args = ["-accel", "kvm", "-cpu", "host"] if accel == "kvm" else ["-accel", "tcg,thread=multi", "-cpu", "max"]
    command = [_qemu(), *accel_args, "-m", GUEST_MEMORY, "-smp", "2", "-nographic", "-no-reboot",
               "-kernel", str(image.vmlinuz), "-initrd", str(initrd),
               "-append", f"console=ttyS0 quiet panic=-1 initcall_debug {append}".strip()]
    def stop(signum, frame):  # SIGTERM ends us as Ctrl-C does: through the cleanup below
        raise SystemExit(128 + signum)

    import threading

    previous = signal.signal(signal.SIGTERM, stop) if threading.current_thread() is threading.main_thread() else None
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)  # its own group: Ctrl-C reaches us, and we stop it
    try:
        out, _ = proc.communicate(timeout=timeout)
        finished = True
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        finished = False
    except BaseException:  # Ctrl-C, SIGTERM, anything: the guest never outlives us
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    lines = [re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\r", "", line) for line in out.decode("utf-8", "replace").splitlines()]
    return lines, finished


def accelerator(image: KernelImage, cache: Cache, reporter: Reporter) -> str:
    """kvm when /dev/kvm is usable and a probe boot finished with it (remembered per QEMU and host
    kernel), else tcg."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    version = subprocess.run([_qemu(), "--version"], capture_output=True, text=True).stdout.split("\n", 1)[0]
    record = cache.root / "boot-kvm.json"
    key = f"{version} on {platform.release()}"
    known = json.loads(record.read_text()) if record.is_file() else {}
    if key not in known:
        with reporter.step("probe KVM with a small boot (TCG otherwise)"):
            staging = cache.workdir("kvm-probe")
            try:
                root = staging / "root"
                (root / "bin").mkdir(parents=True)
                shutil.copy2(static_busybox(), root / "bin" / "busybox")
                (root / "init").write_text(f"#!/bin/busybox sh\n/bin/busybox echo {MARK}probe\n/bin/busybox poweroff -f\n")
                (root / "init").chmod(0o755)
                initrd = staging / "probe.cpio"
                with open(initrd, "wb") as out:
                    subprocess.run(["cpio", "-o", "-H", "newc", "-R", "0:0", "--quiet"], cwd=root, stdout=out,
                                   input=b".\nbin\nbin/busybox\ninit", check=True)
                lines, finished = run_guest(image, initrd, append="", accel="kvm", timeout=KVM_PROBE_TIMEOUT)
                known[key] = finished and f"{MARK}probe" in lines
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        tmp = record.with_suffix(".partial")
        tmp.write_text(json.dumps(known))
        tmp.replace(record)
    return "kvm" if known[key] else "tcg"


# ---- verdicts ------------------------------------------------------------------------------------
@dataclass
class ModuleVerdict:
    name: str
    verdict: str  # accepted | rejected | not tried
    reason: str
    kernel_said: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"name": self.name, "verdict": self.verdict, "reason": self.reason, "kernel_said": self.kernel_said}


_REJECTIONS = [
    (re.compile(r"[Ii]nvalid module format|Exec format error"), "invalid module format: not built for this kernel"),
    (re.compile(r"disagrees about version of symbol"), "a symbol's version (CRC) disagrees with the kernel's"),
    (re.compile(r"Key was rejected|Loading of unsigned module is rejected|Required key not available"),
     "unsigned, and the kernel enforces module signatures"),
    (re.compile(r"Unknown symbol"), "it uses a symbol the kernel does not export"),
]


# What the kernel itself says of any out-of-tree module it loads: a note, not the module speaking.
_KERNEL_NOTES = re.compile(r"taints kernel|module verification failed|Disabling lock debugging")


def _module_spoke(name: str, kernel: list[str]) -> bool:
    """Whether the module's own init printed (so the kernel had loaded it and run it)."""
    own = re.compile(rf"^(\[\s*[0-9.]+\]\s*)?(NVRM:|{re.escape(name)}[ :]|{re.escape(_name(name))}[ :])")
    return any(own.search(line) and not _KERNEL_NOTES.search(line) for line in kernel)


def _initcall_returned(name: str, kernel: list[str]) -> str | None:
    """What the module's init returned, as the kernel logs it with initcall_debug on the command line
    ("initcall nv_mem_client_init+0x0/0xff0 [nvidia_peermem] returned -22 after 2 usecs"); None when
    the kernel never ran it (it refused the module first)."""
    pattern = re.compile(rf"initcall \S+ \[{re.escape(_name(name))}\] returned (-?[0-9]+)")
    for line in kernel:
        m = pattern.search(line)
        if m and m.group(1) != "0":
            return m.group(1)
    return None


def judge(name: str, code: int, said: list[str], kernel: list[str]) -> ModuleVerdict:
    """The kernel's refusals (format, symbol versions, unknown symbols, signatures) reject a module;
    an init that ran and declined (no GPU, no InfiniBand peer memory) is the module accepted."""
    text = "\n".join(said + kernel)
    if code == 0:
        return ModuleVerdict(name, "accepted", "the kernel loaded it", kernel)
    for pattern, reason in _REJECTIONS:
        if pattern.search(text):
            return ModuleVerdict(name, "rejected", reason, kernel + said)
    if "No NVIDIA GPU found" in text:
        return ModuleVerdict(name, "accepted", "the kernel ran its init, which found no NVIDIA GPU in the guest "
                             "(vermagic, symbol versions and every symbol were accepted)", kernel + said)
    ran = _initcall_returned(name, kernel)
    if ran is not None:  # the kernel's own word (initcall_debug): it loaded the module and ran its init
        return ModuleVerdict(name, "accepted", f"the kernel loaded it and ran its init, which returned {ran} "
                             f"({errno.errorcode.get(-int(ran), 'an error')}; e.g. nvidia-peermem without "
                             "InfiniBand peer memory); vermagic, symbol versions and every symbol were accepted",
                             kernel + said)
    if _module_spoke(name, kernel):
        error = said[-1].rsplit(": ", 1)[-1] if said else f"exit {code}"
        return ModuleVerdict(name, "accepted", f"the kernel loaded it and ran its init, which declined ({error}); "
                             "vermagic, symbol versions and every symbol were accepted", kernel + said)
    return ModuleVerdict(name, "rejected", "the kernel refused it", kernel + said)


@dataclass
class BootTest:
    kernel: str
    kernel_image: str
    accelerator: str
    append: str
    seconds: float
    modules: list[ModuleVerdict]
    loader_exit: int | None
    loader_said: list[str]
    notes: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        return "rejected" if any(m.verdict == "rejected" for m in self.modules) else "accepted"

    def to_json(self) -> dict:
        return {"verdict": self.verdict, "kernel": self.kernel, "kernel_image": self.kernel_image,
                "accelerator": self.accelerator, "append": self.append, "seconds": self.seconds,
                "loader": {"exit_code": self.loader_exit, "said": self.loader_said},
                "modules": [m.to_json() for m in self.modules], "notes": self.notes}

    def text(self) -> str:
        return "\n".join(lines_of(self.to_json()))


def lines_of(result: dict) -> list[str]:
    """A boot test as people read it: the kernel, each module's verdict with the kernel's own
    lines, and the real loader's word (from its JSON, as a manifest keeps it)."""
    lines = [f"boot test: kernel {result['kernel']} ({result['kernel_image']}), QEMU {result['accelerator']}, "
             f"{result['seconds']:g} s" + (f", appended: {result['append']}" if result["append"] else "")]
    for m in result["modules"]:
        lines.append(f"  {m['name'] + '.ko':<20} {m['verdict']:<10} {m['reason']}")
        lines += [f"  {'':<31}{line}" for line in m["kernel_said"][-4:]]
    loader = result["loader"]
    if loader["exit_code"] is not None:
        said = "; ".join(loader["said"][-2:]) or "nothing"
        lines.append(f"  the image's loader in the guest: exit {loader['exit_code']}: {said}")
    lines += [f"  note: {note}" for note in result["notes"]]
    lines.append(f"verdict: {result['verdict']}")
    return lines


def parse_console(lines: list[str], checked: Artifact, *, image: KernelImage, accel: str, append: str,
                  seconds: float) -> BootTest:
    reports = [line.split(MARK, 1)[1] for line in lines if MARK in line]
    kernel, loader_exit, loader_said, notes = image.release, None, [], []
    attempts: dict[str, tuple[int, list[str], list[str]]] = {}
    skipped: dict[str, list[str]] = {}
    for report in reports:
        word, _, rest = report.partition(" ")
        if word == "kernel":
            kernel = rest
        elif word == "loader-says":
            loader_said.append(rest)
        elif word == "loader-exit" and rest.isdigit():
            loader_exit = int(rest)
        elif word == "attempt":
            name, _, code = rest.partition(" ")
            attempts[name] = (int(code) if code.isdigit() else 1, [], [])
        elif word in ("said", "dmesg"):
            name, _, text = rest.partition(" ")
            if name in attempts:
                attempts[name][1 if word == "said" else 2].append(text)
        elif word == "skip":
            name, *needs = rest.split()
            skipped[name] = needs
        elif word == "no-kernel-module":
            notes.append(f"the kernel image has no module {rest}, which the NVIDIA modules use")
    verdicts = []
    for m in checked.manifest.modules:
        if m.name in attempts:
            code, said, said_by_kernel = attempts[m.name]
            verdicts.append(judge(m.name, code, said, said_by_kernel))
        elif m.name in skipped:
            verdicts.append(ModuleVerdict(m.name, "not tried", f"it needs {', '.join(skipped[m.name])}, which did "
                                          "not load"))
        else:
            verdicts.append(ModuleVerdict(m.name, "not tried", "the guest did not reach it"))
    return BootTest(kernel=kernel, kernel_image=image.source, accelerator=accel, append=append,
                    seconds=round(seconds, 1), modules=verdicts, loader_exit=loader_exit, loader_said=loader_said,
                    notes=notes)


def boot_test(checked: Artifact, image: KernelImage, *, cache: Cache, reporter: Reporter, append: str = "",
              timeout: float = GUEST_TIMEOUT) -> BootTest:
    """Boot `image` with the artifact's modules and the real loader; the kernel's verdicts."""
    if not BOOT_APPEND_RE.fullmatch(append):
        raise InputError(f"--append {shown(append)} is not a list of kernel parameters",
                         hint="pass e.g. --append module.sig_enforce=1 (letters, digits, _ . , = : / + -)")
    accel = accelerator(image, cache, reporter)
    staging = cache.workdir("boot")
    try:
        with reporter.step(f"boot-test in a QEMU guest ({accel}) with kernel {image.release}"):
            needed = checked.manifest.kernel_depends
            dependencies, missing = kernel_modules_needed(image, needed)
            initrd = make_initramfs(checked, image, dependencies, staging)
            started = time.monotonic()
            lines, finished = run_guest(image, initrd, append=append, accel=accel, timeout=timeout)
            seconds = time.monotonic() - started
        (cache.logs / f"boot-{checked.manifest.key[:16]}-{time.strftime('%Y%m%dT%H%M%S')}.log").write_text(
            "\n".join(lines) + "\n")
        if not finished or not any(line.split(MARK, 1)[1] == "done" for line in lines if MARK in line):
            tail = "\n".join(lines[-30:])
            why = f"did not finish within {timeout:g} s and was killed" if not finished else "stopped before the end"
            raise VerifyError(f"the boot-test guest (kernel {image.release}, {accel}) {why}",
                              log_tail=tail, hint="read the console's last lines above: a module that crashes the "
                              "kernel stops the guest; raise the limit on a slow host (modules --boot-timeout, "
                              "boot-test --timeout)")
        result = parse_console(lines, checked, image=image, accel=accel, append=append, seconds=seconds)
        if missing and image.modules is not None:
            result.notes.append(f"the kernel image has no module {', '.join(missing)}")
        if image.modules is None and needed:
            result.notes.append(f"the kernel image came without its modules ({', '.join(needed)} could not be "
                                "loaded): pass Debian's linux-image .deb for a full test")
        return result
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---- for commands --------------------------------------------------------------------------------
def kernel_image_for(checked: Artifact, *, kernel_image: str | None, archive, cache: Cache, fetcher,
                     reporter: Reporter) -> KernelImage | None:
    """The kernel to boot: --kernel-image, else the Debian release's own linux-image package,
    else None (a git kernel: only the user has its vmlinuz)."""
    if kernel_image is not None:
        return kernel_image_from_file(kernel_image, cache, reporter)
    if checked.manifest.kernel_source.get("kind") != "debian":
        return None
    package = archive().kernel_image(checked.manifest.kernel_release)
    name = f"{package.name} {package.version}"
    if not (cache.downloads / package.sha256).is_file():
        with reporter.step(f"download {name} ({package.size / 1024**2:.0f} MiB, the kernel to boot)"):
            fetcher.fetch(package.url, store=cache.downloads, sha256=package.sha256, size=package.size,
                          label=package.filename.rsplit("/", 1)[-1])
    return unpack_kernel_deb(cache.downloads / package.sha256, cache, reporter, source=name)


def run_for(checked: Artifact, *, kernel_image: str | None, append: str, timeout: float, archive, cache: Cache,
            fetcher, reporter: Reporter) -> BootTest | None:
    """The boot test of an artifact, or None (said in a note) when there is no kernel to boot."""
    image = kernel_image_for(checked, kernel_image=kernel_image, archive=archive, cache=cache, fetcher=fetcher,
                             reporter=reporter)
    if image is None:
        reporter.note(f"boot test skipped: kernel {checked.manifest.kernel_release} came from git, and only you have "
                      "its image; pass --kernel-image FILE (the target's vmlinuz, e.g. /boot/vmlinuz-RELEASE)")
        return None
    if image.release != checked.manifest.kernel_release:
        reporter.note(f"booting {image.release}, not {checked.manifest.kernel_release} (the modules' kernel): "
                      "the kernel is expected to refuse them")
    return boot_test(checked, image, cache=cache, reporter=reporter, append=append, timeout=timeout)


def record(checked: Artifact, result: BootTest) -> Artifact:
    """The artifact with the boot test in its manifest (rewritten atomically), kept beside the
    verdicts of other kernel command lines: a what-if test (--append module.sig_enforce=1) judges
    that configuration only (node/staging.py boot_verdict)."""
    import dataclasses

    from cudabuild.artifact import MAX_BOOT_TESTS

    verdict = result.to_json()
    others = [v for v in checked.manifest.verdicts if v.get("append", "") != verdict["append"]]
    kept = others[-(MAX_BOOT_TESTS - 1):]
    manifest = dataclasses.replace(checked.manifest, boot_test=verdict, boot_tests=(*kept, verdict))
    manifest.write(checked.root)
    return Artifact(root=checked.root, manifest=manifest)


def refuse_rejected(result: BootTest) -> None:
    """A VerifyError (exit 7) naming what the kernel refused, with its own lines."""
    rejected = [m for m in result.modules if m.verdict == "rejected"]
    if not rejected:
        return
    lines = [f"{m.name}: {line}" for m in rejected for line in m.kernel_said]
    raise VerifyError(f"kernel {result.kernel} refused {', '.join(m.name + '.ko' for m in rejected)} in a QEMU guest: "
                      + "; ".join(f"{m.name}: {m.reason}" for m in rejected),
                      log_tail="\n".join(lines[-30:]),
                      hint="build the modules for this kernel (cudabuild modules --kernel RELEASE), with its own "
                      "Module.symvers; for signature refusals build with a key the host enrolled")

