"""Real local servers and helpers shared by the integration and e2e tests."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Stand-ins and downloads shared between runs (not results: each run builds its own).
STANDINS = Path(os.environ.get("CUDABUILD_TEST_STANDINS", Path.home() / ".cache" / "cudabuild-test"))
CDI_SCHEMA_PACKAGE = "golang-github-container-orchestrated-devices-container-device-interface-dev"
RELEASE = "6.1.0-56-amd64"
DRIVER = "535.309.01"
VERMAGIC = f"{RELEASE} SMP preempt mod_unload modversions "
MODULES = ("nvidia", "nvidia-uvm", "nvidia-modeset", "nvidia-drm", "nvidia-peermem")


def compile_module(directory, name, *, vermagic=VERMAGIC, version=DRIVER, crcs=None, depends=""):
    """A real ELF object with the sections a kernel module has (.modinfo, __versions), made by gcc."""
    crcs = {"module_layout": 0x12345678, "_printk": 0x0BADF00D} if crcs is None else crcs
    lines = [f'__attribute__((section(".modinfo"), used)) static const char m{i}[] = "{text}";'
             for i, text in enumerate([f"vermagic={vermagic}", f"name={name.replace('-', '_')}", f"depends={depends}"]
                                      + ([f"version={version}"] if version else []))]
    if crcs:
        lines.append("struct modversion_info { unsigned long crc; char name[56]; };")
        entries = ", ".join(f'{{{crc:#x}, "{sym}"}}' for sym, crc in crcs.items())
        lines.append(f'__attribute__((section("__versions"), used)) static const struct modversion_info v[] = {{{entries}}};')
    source = Path(directory) / f"{name}.c"
    source.write_text("\n".join(lines) + "\n")
    subprocess.run(["gcc", "-c", "-o", str(Path(directory) / f"{name}.ko"), str(source)], check=True)
    source.unlink()


def make_artifact(root: Path, *, release: str = RELEASE, driver: str = DRIVER, modules=MODULES,
                  key: str | None = None, flavor: str = "proprietary"):
    """A small, valid artifact directory: gcc-built modules, a stand-in libcuda with its SONAME
    link, nvidia-smi, and the manifest written by cudabuild's own artifact module."""
    from cudabuild.artifact import Manifest, describe_userspace
    from cudabuild.verify import read_module

    root = Path(root)
    (root / "modules").mkdir(parents=True)
    for name in modules:
        compile_module(root / "modules", name, vermagic=f"{release} SMP preempt mod_unload modversions ",
                       version=driver, depends="drm" if name == "nvidia" else "")
    lib = root / "userspace" / "lib"
    lib.mkdir(parents=True)
    (lib / f"libcuda.so.{driver}").write_bytes(b"\x7fELF stand-in libcuda")
    (lib / "libcuda.so.1").symlink_to(f"libcuda.so.{driver}")
    (root / "userspace" / "bin").mkdir()
    smi = root / "userspace" / "bin" / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho nvidia-smi stand-in\n")
    smi.chmod(0o755)
    infos = [read_module(root / "modules" / f"{name}.ko") for name in modules]
    manifest = Manifest(key=key or hashlib.sha256(str(root).encode()).hexdigest(),
                        created="2026-11-22T00:00:00+00:00", kernel_release=release, driver_version=driver,
                        flavor=flavor, vermagic=infos[0].vermagic,
                        modules=tuple(infos),
                        userspace=describe_userspace(root / "userspace"))
    manifest.write(root)
    return manifest


HOSTILE_USERSPACE = ("libc-added", "hostile-soname")


def make_userspace_hostile(root: Path, how: str) -> str:
    """Change an artifact's userspace as the hostile tester did, with the manifest rewritten to
    match (digests and sizes true), so that only the names give it away; the file to be named.
    libc-added: userspace/lib/libc.so.6 listed beside the driver's libraries.
    hostile-soname: libcuda replaced by a real shared library whose DT_SONAME is ../../bin/sh."""
    import json

    from cudabuild.digests import sha256_file

    manifest_path = root / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    lib = root / "userspace" / "lib"
    if how == "libc-added":
        target = lib / "libc.so.6"
        target.write_bytes(b"\x7fELF not the C library\n")
        manifest["userspace"].append({"path": "lib/libc.so.6"})
        named = "libc.so.6"
    else:
        [target] = [p for p in lib.iterdir() if p.name.startswith("libcuda.so.") and not p.is_symlink()]
        source = root.parent / "hostile.c"
        source.write_text("int cuInit(unsigned int flags) { return 100; }\n")
        target.chmod(0o644)
        subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,-soname,../../bin/sh", "-o", str(target), str(source)],
                       check=True)
        named = f"userspace/lib/{target.name}"
    for entry in manifest["userspace"]:
        if entry["path"] == f"lib/{target.name}":
            entry.update(size=target.stat().st_size, sha256=sha256_file(target))
    manifest_path.chmod(0o644)
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return named


@dataclass
class Served:
    data: bytes
    status: int = 200
    fail_times: int = 0          # answer 500 this many times first
    cut_after: int | None = None  # close the connection after this many bytes, once
    requests: list = field(default_factory=list)


class FileServer:
    """An HTTP server on 127.0.0.1 that serves byte strings with Range support, and can fail on
    purpose: a status, some 500s before success, a connection cut part-way."""

    def __init__(self) -> None:
        self.files: dict[str, Served] = {}
        files = self.files

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):  # noqa: N802 - http.server's name
                served = files.get(self.path)
                if served is None:
                    self.send_error(404)
                    return
                served.requests.append(dict(self.headers))
                if served.status != 200:
                    self.send_error(served.status)
                    return
                if served.fail_times:
                    served.fail_times -= 1
                    self.send_error(500)
                    return
                start = 0
                if self.headers.get("Range", "").startswith("bytes="):
                    start = int(self.headers["Range"][6:].split("-")[0])
                    if start >= len(served.data):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(served.data) - 1}/{len(served.data)}")
                else:
                    self.send_response(200)
                body = served.data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if served.cut_after is not None:
                    cut, served.cut_after = served.cut_after, None
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def serve(self, path: str, data: bytes, **kw) -> Served:
        self.files[path] = Served(data, **kw)
        return self.files[path]

    def __enter__(self) -> "FileServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def run_cli(*args: str, env: dict | None = None, timeout: float = 1800) -> subprocess.CompletedProcess:
    """Run the installed `cudabuild` as a user would, in a separate process."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("CUDABUILD_KEEP_BUILDER", None)
    exe = Path(sys.executable).parent / "cudabuild"
    return subprocess.run([str(exe), *args], env=full_env, capture_output=True, text=True, timeout=timeout)


def start_cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    """The installed `cudabuild` started as a user would, not waited for (to be killed, or raced)."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("CUDABUILD_KEEP_BUILDER", None)
    exe = Path(sys.executable).parent / "cudabuild"
    return subprocess.Popen([str(exe), *args], env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for_line(proc: subprocess.Popen, text: str, timeout: float = 600) -> str:
    """Read the process's stderr until a line holds `text`; what was read."""
    import time

    seen, deadline = "", time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen += line
        if text in line:
            return seen
    raise AssertionError(f"{text!r} never appeared:\n{seen}")


def run_cli_watched(*args: str, env: dict | None = None, timeout: float = 1800):
    """run_cli, and the containers created on the main engine while the command ran, but those
    another cudabuild process made: the suite's background builds (tests/background.py) run at
    the same time, and cudabuild labels its builders with its own pid (io.cudabuild.pid)."""
    import time

    import docker

    started_ns = time.time_ns()
    proc = start_cli(*args, env=env)
    out, err = proc.communicate(timeout=timeout)
    events = docker.from_env().events(since=started_ns // 10**9 - 1, until=int(time.time()) + 1, decode=True,
                                      filters={"type": "container", "event": "create"})
    created = [e for e in events if e["timeNano"] >= started_ns
               and e["Actor"]["Attributes"].get("io.cudabuild.pid", str(proc.pid)) == str(proc.pid)]
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), created


# The images the suite's background builds make on the main engine (tests/background.py): their
# builder images, modules images and cudabuild's own image, with the layers a build made on the way.
BACKGROUND_TAGS = ("cudabuild/builder:", "cudabuild/modules:", "cudabuild/cudabuild:")


def images_made_since(client, before: set[str], *, all_layers: bool = False, settle: float = 180) -> set[str]:
    """Ids of the images that appeared since `before`, but those of the background builds: an image
    tagged as one of theirs, and its ancestors (the layers a classic build commits on the way). A
    new image that is not yet explained may be a background build's layer whose build has not
    finished: it is looked at again until `settle` seconds have passed, then reported."""
    import time

    deadline = time.monotonic() + settle
    while True:
        listed = client.api.images(all=all_layers or None)
        parents = {i["Id"]: i.get("ParentId") or None for i in client.api.images(all=True)}
        theirs = set()
        for image in listed:
            if any(tag.startswith(BACKGROUND_TAGS) for tag in image.get("RepoTags") or ()):
                ident = image["Id"]
                while ident and ident not in theirs:
                    theirs.add(ident)
                    ident = parents.get(ident)
        unexplained = {i["Id"] for i in listed} - before - theirs
        if not unexplained or time.monotonic() > deadline:
            return unexplained
        time.sleep(3)


def image_ids(client, *, all_layers: bool = False) -> set[str]:
    return {i["Id"] for i in client.api.images(all=all_layers or None)}


def left_behind(created: list[dict]) -> list[str]:
    """Which of the containers in docker events `created` (run_cli_watched) still exist."""
    import docker

    client = docker.from_env()
    return [c.name for c in client.containers.list(all=True) if c.id in {e["Actor"]["ID"] for e in created}]


def builders_of(pid: int) -> list:
    """The builder containers a cudabuild process (by pid) started."""
    import docker

    return docker.from_env().containers.list(all=True, filters={"label": f"io.cudabuild.pid={pid}"})


# NVIDIA's layout, written with the tools the format is defined by: line 1 the shebang, lines 2-3
# CRCsum (cksum) and MD5 (md5sum) of `tail -n +4`, then the assignments and the stub's code, the
# decompressor binary from line skip_decompress for size_decompress lines, the payload from line skip.
MAKE_RUN = r'''
set -eu
dir=$1 version=$2 comp=$3 out=$4
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$dir" && tar cf - $(find . -maxdepth 1 -mindepth 1 | sort)) > "$work/payload.tar"
case $comp in
    zstd)  zstd -q -3 -c "$work/payload.tar" > "$work/payload"; dec=$(command -v zstd) ;;
    xz)    xz -c -3 -T0 "$work/payload.tar" > "$work/payload"; dec=$(command -v xz) ;;
    gzip)  gzip -c "$work/payload.tar" > "$work/payload"; dec=$(command -v gzip) ;;
    bzip2) bzip2 -c "$work/payload.tar" > "$work/payload"; dec=$(command -v bzip2) ;;
    none)  cp "$work/payload.tar" "$work/payload"; dec= ;;
esac
if [ -n "$dec" ]; then { cat "$dec"; echo; } > "$work/dec"; else : > "$work/dec"; fi
size=$(wc -l < "$work/dec")
body() {
cat <<EOF
skip=$1
skip_decompress=$2
size_decompress=$size
label="NVIDIA Accelerated Graphics Driver for Linux-x86_64 $version"
version_string=$version
pkg_version=1
script=./nvidia-installer
targetdir=NVIDIA-Linux-x86_64-$version
scriptargs=""
keep=n
TARGET_OS="Linux"
TARGET_ARCH="x86_64"
[ "\${1:-}" = -x ] || { echo "pass -x" >&2; exit 1; }
[ ! -e "\$targetdir" ] || exit 1
mkdir "\$targetdir"
if [ "\$size_decompress" -gt 0 ]; then
    d=\$(mktemp); tail -n +\$skip_decompress "\$0" | head -n \$size_decompress > "\$d"; chmod +x "\$d"
    tail -n +\$skip "\$0" | "\$d" -dc | tar xf - -C "\$targetdir"; s=\$?; rm -f "\$d"; exit \$s
fi
tail -n +\$skip "\$0" | tar xf - -C "\$targetdir"
exit \$?
EOF
}
lines=$(body 0 0 | wc -l)
skip_decompress=$((3 + lines + 1))
if [ "$size" -eq 0 ]; then skip_decompress=0; skip=$((3 + lines + 1)); else skip=$((skip_decompress + size)); fi
{ body $skip $skip_decompress; cat "$work/dec" "$work/payload"; } > "$work/tail"
crc=$(cksum < "$work/tail" | cut -d' ' -f1)
md5=$(md5sum < "$work/tail" | cut -d' ' -f1)
{ printf '#! /bin/sh\nCRCsum=%s\nMD5=%s\n' "$crc" "$md5"; cat "$work/tail"; } > "$out"
chmod +x "$out"
'''




def make_nvidia_run(source: Path, version: str, compression: str, out: Path) -> Path:
    """`out`, an installer of `source`'s contents laid out as NVIDIA's makeself lays it out
    (MAKE_RUN), with `compression` (zstd, xz, gzip, bzip2 or none) and that compressor embedded."""
    subprocess.run(["sh", "-c", MAKE_RUN, "make-run", str(source), version, compression, str(out)], check=True)
    return out


def run_here(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The command line in this process (cudabuild.cli.invoke), its settings read from os.environ
    with `env` laid over it (the process's environment is not changed): what run_cli checks, without
    a new interpreter. For refusals, --help and other quick answers; a build or anything that must be
    killed runs with run_cli."""
    import contextlib
    import gc
    import io
    import warnings

    from cudabuild.cli import invoke

    full_env = {**os.environ, **(env or {})}
    full_env.pop("CUDABUILD_KEEP_BUILDER", None)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = invoke(list(args), env=full_env)
    with warnings.catch_warnings():  # a command's engine connection is closed by its process's exit, not here
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    return subprocess.CompletedProcess(["cudabuild", *args], code, out.getvalue(), err.getvalue())


def fake_host(root: Path, *, gpus: int = 3) -> dict:
    """A host's /proc, /sys and /dev under `root`, laid out as Debian lays out a host (`var/run -> /run`
    and `var/lock -> /run/lock`, absolute; merged /usr: `lib -> usr/lib`, `bin -> usr/bin`, ...),
    and the stub insmod (tests/integration/test_loader.py) that imitates the kernel: the loader's
    seams point at them. Returns the environment to run with."""
    from tests.integration.test_loader import STUB_INSMOD, STUB_RMMOD

    debian_layout(root)
    for d in ("proc/self", "proc/driver/nvidia/gpus", "sys/module/firmware_class/parameters", "dev"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "proc/self/status").write_text("Name:\tsh\nCapEff:\t000001ffffffffff\n")
    (root / "proc/devices").write_text("Character devices:\n  1 mem\n")
    (root / "sys/module/firmware_class/parameters/path").write_text("\n")
    (root / "insmod").write_text(STUB_INSMOD)
    (root / "insmod").chmod(0o755)
    (root / "rmmod").write_text(STUB_RMMOD)
    (root / "rmmod").chmod(0o755)
    return {"CUDABUILD_INSMOD": str(root / "insmod"), "CUDABUILD_MODPROBE": str(root / "insmod"),
            "CUDABUILD_RMMOD": str(root / "rmmod"),
            "CUDABUILD_KERNEL_RELEASE": RELEASE, "FAKE_ROOT": str(root), "FAKE_GPUS": str(gpus), "FAKE_VERSION": DRIVER}


def install_modules(root: Path, env: dict, modules: Path, *extra: str, env_extra: dict | None = None):
    """`cudabuild install --modules MODULES` on a fake host, the CDI spec's paths under the same root."""
    return run_cli("install", "--modules", str(modules), "--root", str(root), "--cdi-host-root", str(root), *extra,
                   env={**env, **(env_extra or {})})


def host_with_artifact(base: Path, *, gpus: int = 3, installed: bool = False) -> tuple[Path, dict, Path]:
    """The fixture of a host-side test: a fake host under BASE/host with GPUS GPUs, a small valid
    artifact in BASE/artifact, and, with `installed`, that artifact installed there. (root, env, artifact)."""
    root, art = base / "host", base / "artifact"
    env = fake_host(root, gpus=gpus)
    make_artifact(art)
    if installed:
        done = install_modules(root, env, art)
        assert done.returncode == 0, done.stderr
    return root, env, art


def reboot_fake_host(root: Path) -> None:
    """What a reboot clears on a fake_host root: the loaded modules, /run, the device nodes, the
    stub insmod's log. What is on disk (/var/lib, /boot, /etc) stays."""
    import shutil

    for module in (root / "sys/module").glob("nvidia*"):
        shutil.rmtree(module)
    shutil.rmtree(root / "proc/driver/nvidia/gpus")
    (root / "proc/driver/nvidia/gpus").mkdir()
    (root / "proc/devices").write_text("Character devices:\n  1 mem\n")
    for rel in ("run/cudabuild", "run/cdi"):
        shutil.rmtree(root / rel, ignore_errors=True)
    for dev in (root / "dev").glob("nvidia*"):
        shutil.rmtree(dev) if dev.is_dir() else dev.unlink()
    (root / "insmod.log").unlink(missing_ok=True)


def debian_layout(root: Path) -> None:
    """Debian 12's own links at the top of a root: absolute /var/run and /var/lock, merged /usr."""
    for d in ("run/lock", "var", "usr/lib", "usr/bin", "usr/sbin", "usr/lib64"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for link, target in (("var/run", "/run"), ("var/lock", "/run/lock"), ("lib", "usr/lib"), ("bin", "usr/bin"),
                         ("sbin", "usr/sbin"), ("lib64", "usr/lib64")):
        if not (root / link).is_symlink():
            (root / link).symlink_to(target)


def cdi_validator():
    """A validator of CDI's own JSON schema, as Debian ships it (downloaded once with apt-get), that
    checks a spec and its shared containerEdits (which that schema's top level does not describe)."""
    import json
    import tempfile

    from debian.debfile import DebFile
    from jsonschema import Draft7Validator
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT7

    where = STANDINS / "cdi-schema"
    if not (where / "defs.json").is_file():
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(["apt-get", "download", "-q", CDI_SCHEMA_PACKAGE], cwd=tmp, check=True,
                           capture_output=True)
            [deb] = Path(tmp).glob("*.deb")
            package = DebFile(str(deb))
            where.mkdir(parents=True, exist_ok=True)
            for member in package.data.tgz().getmembers():
                if member.name.endswith(("/schema/schema.json", "/schema/defs.json")):
                    (where / Path(member.name).name).write_bytes(package.data.tgz().extractfile(member).read())
            package.close()
    schema = json.loads((where / "schema.json").read_text())
    defs = json.loads((where / "defs.json").read_text())
    registry = Registry().with_resource("defs.json", Resource.from_contents(defs, default_specification=DRAFT7))
    whole = Draft7Validator(schema, registry=registry)
    edits = Draft7Validator({"$ref": "defs.json#/definitions/containerEdits"}, registry=registry)

    def validate(spec: dict) -> None:
        whole.validate(spec)
        edits.validate(spec.get("containerEdits", {}))

    return validate


def bookworm_archive(distribution: str = "bookworm"):
    """Debian bookworm's archive (or another suite's), read with cudabuild's own reader (its index
    and packages cached with the stand-ins)."""
    from cudabuild.store.cache import Cache
    from cudabuild.store.fetch import Fetcher
    from cudabuild.sources.debian import DebianArchive
    from cudabuild.ui import Reporter

    reporter = Reporter(quiet=True)
    return DebianArchive(cache=Cache(STANDINS / "standin-cache"), fetcher=Fetcher(reporter=reporter),
                         reporter=reporter, mirror="http://deb.debian.org/debian",
                         security_mirror="http://deb.debian.org/debian-security", distribution=distribution)


def debian_headers_files(release: str, files: dict[str, Path]) -> None:
    """Files of Debian's linux-headers-RELEASE package (by name in its tree: ".config",
    "Module.symvers"), as a user takes them from a host, written where `files` says."""
    from debian.debfile import DebFile

    archive = bookworm_archive()
    headers = archive.versions(f"linux-headers-{release}")[0]
    deb = archive.fetcher.fetch(headers.url, store=archive.cache.downloads, sha256=headers.sha256, size=headers.size)
    package = DebFile(str(deb))
    try:
        data = package.data.tgz()
        for name, target in files.items():
            member = next(m for m in data.getmembers() if m.name.endswith(f"linux-headers-{release}/{name}"))
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data.extractfile(member).read())
    finally:
        package.close()


def debian_debs(names: list[str], version: str) -> list[Path]:
    """Debian's .debs of these packages at `version` (upstream), fetched once into the shared
    stand-ins cache and checked against the archive's index."""
    from cudabuild.store.cache import Cache
    from cudabuild.store.fetch import Fetcher
    from cudabuild.sources.debian import DebianArchive
    from cudabuild.ui import Reporter

    reporter = Reporter(quiet=True)
    cache = Cache(STANDINS / "standin-cache")
    fetcher = Fetcher(reporter=reporter)
    archive = DebianArchive(cache=cache, fetcher=fetcher, reporter=reporter, mirror="http://deb.debian.org/debian",
                            security_mirror="http://deb.debian.org/debian-security", distribution="bookworm")
    paths = []
    for name in names:
        package = next(p for p in archive.versions(name) if p.upstream_version == version)
        paths.append(fetcher.fetch(package.url, store=cache.downloads, sha256=package.sha256, size=package.size))
    return paths


def unpack_debs(debs: list[Path], root: Path) -> None:
    """The files of these .debs under `root`, as dpkg would put them (links kept)."""
    from debian.debfile import DebFile

    for deb in debs:
        package = DebFile(str(deb))
        try:
            data = package.data.tgz()
            for member in data.getmembers():
                if member.isfile() or member.issym() or member.isdir():
                    data.extract(member, root, filter="data")
        finally:
            package.close()


def make_signing_key(directory: Path, name: str = "cudabuild test key", *, passphrase: str | None = None) -> dict:
    """A fresh key and self-signed certificate, as a user makes one for Secure Boot (FACTS.md)."""
    directory.mkdir(parents=True, exist_ok=True)
    key, cert = directory / "key.pem", directory / "cert.pem"
    protect = ["-passout", f"pass:{passphrase}"] if passphrase else ["-nodes"]
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-keyout", str(key), "-out", str(cert),
                    "-days", "30", "-subj", f"/CN={name}", "-addext", "extendedKeyUsage=codeSigning", *protect],
                   check=True, capture_output=True)
    der = directory / "cert.der"
    subprocess.run(["openssl", "x509", "-in", str(cert), "-outform", "DER", "-out", str(der)], check=True)
    return {"key": key, "cert": cert, "der": der, "subject": name}


def sign_like_sign_file(module: Path, key: Path, cert: Path, *, digest: str = "sha256") -> None:
    """Append a module signature as the kernel's scripts/sign-file does: a detached CMS signature
    without attributes or certificates, struct module_signature (id type 2: PKCS#7) and the magic."""
    import struct

    signature = module.with_suffix(".p7s")
    subprocess.run(["openssl", "cms", "-sign", "-binary", "-noattr", "-nocerts", "-nosmimecap", "-outform", "DER",
                    "-md", digest, "-signer", str(cert), "-inkey", str(key), "-in", str(module),
                    "-out", str(signature)], check=True, capture_output=True)
    raw = signature.read_bytes()
    signature.unlink()
    with open(module, "ab") as f:
        f.write(raw + struct.pack(">BBBBB3xI", 0, 0, 2, 0, 0, len(raw)) + b"~Module signature appended~\n")


def openssl_verifies(module: Path, cert: Path, workdir: Path) -> bool:
    """FACTS.md's check, independent of cudabuild: cut off magic, struct and the PKCS#7, then
    `openssl cms -verify` the module's own bytes against the certificate."""
    import struct

    data = module.read_bytes()
    magic = b"~Module signature appended~\n"
    assert data.endswith(magic), f"{module.name} is not signed"
    sig_len = struct.unpack(">I", data[-len(magic) - 4:-len(magic)])[0]
    end = len(data) - len(magic) - 12
    (workdir / "sig.p7s").write_bytes(data[end - sig_len:end])
    (workdir / "content").write_bytes(data[:end - sig_len])
    check = subprocess.run(["openssl", "cms", "-verify", "-binary", "-inform", "DER", "-in", str(workdir / "sig.p7s"),
                            "-content", str(workdir / "content"), "-certfile", str(cert), "-noverify", "-nointern",
                            "-out", "/dev/null"], capture_output=True, text=True)
    return check.returncode == 0


def run_device_query(tag: str) -> tuple[int, str]:
    """A runtime image's device-query run as a user runs it on a machine without a GPU (no network,
    the loader skipped): its exit status and output; the container removed."""
    import docker

    container = docker.from_env().containers.run(tag, detach=True, network_mode="none",
                                                 environment={"CUDABUILD_LOADER": "skip"})
    try:
        code = container.wait()["StatusCode"]
        return code, container.logs().decode()
    finally:
        container.remove(force=True)
