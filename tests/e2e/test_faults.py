"""Faults leave nothing broken: kills, Ctrl-C, races, a lost engine, a full disk, hostile input."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import docker
import pytest

from tests.helpers import builders_of, run_cli, run_cli_watched, start_cli, wait_for_line

pytestmark = [pytest.mark.engine, pytest.mark.build]
ARGS = ["modules", "--kernel", "latest", "--driver", "470"]  # tesla 470: the quickest real build


def start(cache: Path, *args, env=None) -> subprocess.Popen:
    return start_cli(*(args or ARGS), env={"CUDABUILD_CACHE": str(cache), **(env or {})})


def nothing_half_written(cache: Path):
    results = cache / "results"
    assert all((entry / "manifest.json").is_file() for entry in results.iterdir()), "only whole results"
    assert not list((cache / "kernels").glob("*.partial*"))


@pytest.fixture
def cache(tmp_path):
    c = tmp_path / "cache"
    c.mkdir()
    shared = Path(os.environ.get("CUDABUILD_TEST_STANDINS", Path.home() / ".cache" / "cudabuild-test")) / "downloads"
    shared.mkdir(parents=True, exist_ok=True)
    (c / "downloads").symlink_to(shared)
    return c


def test_sigkill_mid_build_then_two_runs_at_once_rebuild_cleanly_and_once(session_runs):
    """The run's session build is made this way (tests/background.py session_build): a run killed
    mid-build leaves its builder and nothing half-written; then two identical runs at once: one
    reaps the killed run's builder and builds, the other waits for it and answers from the cache."""
    runs, cache = session_runs, session_runs["cache"]
    assert runs["left_by_kill"], "the killed run's builder is still there (it will be reaped)"
    assert runs["results_after_kill"] == runs["results_before"], "the killed run published nothing"
    assert [code for code, _, _ in runs["runs"]] == [0, 0], [err[-3000:] for _, _, err in runs["runs"]]
    data = [json.loads(out) for _, out, _ in runs["runs"]]
    assert sorted(d["cache_hit"] for d in data) == [False, True]
    built, waited = (runs["runs"][[d["cache_hit"] for d in data].index(hit)][2] for hit in (False, True))
    assert "waiting for it" in waited
    assert "removed builder containers left by killed runs" in built
    assert runs["builders_after"] == []
    assert data[0]["modules"] == data[1]["modules"]
    assert not [name for name in runs["tmp_after"] if f"-pid{runs['killed_pid']}-" in name]
    nothing_half_written(cache)


@pytest.mark.parametrize("compile_cache", ["bounded", "off"])
def test_ctrl_c_removes_the_builder_and_exits_130(cache, compile_cache):
    """Before the interrupt, the builder as the engine shows it: the cache's compile cache mounted
    and its bound (CUDABUILD_COMPILE_CACHE_SIZE) in the builder's environment, which build.sh gives
    ccache; with --no-compile-cache, neither."""
    args = (*ARGS, "--no-compile-cache") if compile_cache == "off" else ARGS
    proc = start(cache, *args, env={"CUDABUILD_COMPILE_CACHE_SIZE": "300M"})
    wait_for_line(proc, "==> make modules")
    [builder] = [c for c in builders_of(proc.pid) if c.attrs["Config"]["Cmd"][-1].endswith("/build.sh")]
    mounts = {m["Destination"]: (m["Source"], m["RW"]) for m in builder.attrs["Mounts"]}
    env = dict(item.split("=", 1) for item in builder.attrs["Config"]["Env"])
    if compile_cache == "off":
        assert "/cudabuild/compile-cache" not in mounts and env["COMPILE_CACHE"] == ""
    else:
        assert mounts["/cudabuild/compile-cache"] == (str(cache / "compile-cache"), True)
        assert (env["COMPILE_CACHE"], env["COMPILE_CACHE_SIZE"]) == ("/cudabuild/compile-cache", "300M")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert builders_of(proc.pid) == []
    assert list((cache / "results").iterdir()) == [] and list((cache / "tmp").iterdir()) == []


class EngineProxy:
    """A unix socket that forwards to the real engine, and can be cut: to its clients, the engine
    went away in the middle of a build."""

    def __init__(self, path: Path, target: str = "/var/run/docker.sock"):
        self.path, self.target, self.conns = path, target, []
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(str(path))
        self.server.listen(16)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX)
            upstream.connect(self.target)
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a, b):
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self):
        self.server.close()
        os.unlink(self.path)
        for s in self.conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass


def test_engine_lost_during_a_build_is_a_clear_error(cache, tmp_path):
    proxy = EngineProxy(tmp_path / "engine.sock")
    proc = start(cache, env={"DOCKER_HOST": f"unix://{tmp_path}/engine.sock"})
    wait_for_line(proc, "==> make modules")
    proxy.cut()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 4, err
    assert "lost the Docker engine" in err and "nothing was published" in err
    assert list((cache / "results").iterdir()) == [] and list((cache / "tmp").iterdir()) == []
    # The abandoned builder is still on the engine; the next run's reaper removes it.
    from cudabuild.settings import Settings

    reaped, _ = Settings.from_env(os.environ).engine().reap_builders()
    assert builders_of(proc.pid) == [] and reaped


def test_too_little_space_is_refused_before_starting(tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(small)]).returncode != 0:
        pytest.fail("this test mounts a small tmpfs and must run as root")
    try:
        result = run_cli(*ARGS, env={"CUDABUILD_CACHE": str(small)})
        assert result.returncode == 8, result.stderr
        assert f"free in {small}" in result.stderr and "needs 3.0 GiB" in result.stderr
        assert "CUDABUILD_CACHE" in result.stderr
        assert list((small / "results").iterdir()) == [] and list((small / "downloads").iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


@pytest.mark.parametrize("option,value,fragment", [
    ("--kernel", "6.1.0;id>{marker}", "is not valid"),
    ("--kernel", "../../../etc/passwd", "is not valid"),
    ("--driver", "535$(touch {marker})", "is not valid"),
    ("--kernel-repo", "git://x/`touch {marker}`", "--kernel-repo"),
    ("--installer", "http://127.0.0.1/a b;touch {marker}.run", "not a valid http(s) URL"),
    ("--sha256", "../../etc", "--sha256"),
    ("--apt-mirror", "http://x/$(touch {marker})", "--apt-mirror"),
])
def test_hostile_strings_are_refused(tmp_path, option, value, fragment):
    cache, marker = tmp_path / "cache", tmp_path / "owned"
    result = run_cli("modules", "--kernel", "latest", "--driver-source", "run", "--driver", "535.309.01",
                     option, value.format(marker=marker), env={"CUDABUILD_CACHE": str(cache)})
    assert result.returncode == 3, result.stderr
    assert fragment in result.stderr
    assert not marker.exists(), "nothing in a value ran"


def test_hostile_image_tag_and_base(tmp_path):
    for args, what in ((["--base", "debian:bookworm;id", "--dry-run"], "--base"), (["cuda", "--tag", "../x"], "--tag")):
        result = run_cli("image", *args, env={"CUDABUILD_CACHE": str(tmp_path)})
        assert result.returncode == 3 and f"{what} " in result.stderr and "fix:" in result.stderr, result.stderr


def test_symvers_that_is_not_one(tmp_path):
    config = tmp_path / "config"
    config.write_text("CONFIG_MODVERSIONS=y\n")
    result = run_cli("modules", "--kernel", "6.1.192-x", "--kernel-source", "git", "--kernel-config", str(config),
                     "--symvers", "/etc/passwd", "--driver-source", "run", "--driver", "535.309.01",
                     env={"CUDABUILD_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 3 and "not a Module.symvers line" in result.stderr


@pytest.mark.parametrize("member,link", [("../../kernels/evil", None), ("/tmp/cudabuild-evil", None),
                                         ("kernel/evil-link", "../../../../../tmp/cudabuild-evil"),
                                         ("kernel/abs-link", "/etc/passwd")])
def test_an_installer_that_writes_outside_its_target_is_refused(cache, tmp_path, member, link):
    """A .run whose archive holds ../ members, absolute paths or links pointing out: refused on the
    host, before any container starts, with nothing written outside (or inside) the cache."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    from makeself import tar_bytes, write_installer

    entries = {"kernel/Makefile": (0o644, b"all:\n", None),
               member: (0o777, None, link) if link else (0o644, b"owned\n", None)}
    run = write_installer(tmp_path / "NVIDIA-Linux-x86_64-535.309.01.run", "535.309.01", tar_bytes(entries))
    result, created = run_cli_watched("modules", "--kernel", "latest", "--driver-source", "run", "--installer",
                                      str(run), env={"CUDABUILD_CACHE": str(cache)})
    assert result.returncode == 3, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "nothing was extracted" in result.stderr
    assert not Path("/tmp/cudabuild-evil").exists() and not list(cache.rglob("*evil*"))
    assert list((cache / "results").iterdir()) == [] and list((cache / "sources").iterdir()) == []
    assert created == [], "no container starts for an installer that fails its check"


def copied_cache(build, tmp_path) -> tuple[Path, Path]:
    """A cache holding a copy of the session's result (and its index): (the cache, the entry)."""
    import shutil

    data, _, cache, _ = build
    planted = tmp_path / "cache"
    planted.mkdir()
    (planted / "downloads").symlink_to(cache / "downloads")
    shutil.copytree(cache / "index", planted / "index")
    entry = Path(data["cache_dir"])
    copy = planted / "results" / entry.name
    shutil.copytree(entry, copy, symlinks=True)
    return planted, copy


def test_a_cached_file_changed_in_place_after_a_hit_is_refused(build, tmp_path):
    """A cache hit reads again only what changed since the last whole check (the cache keeps each
    file's inode, size, mtime and ctime): a byte changed in place, the mtime put back, is found by
    its ctime and refused by its sha256."""
    data, _, _, _ = build
    planted, copy = copied_cache(build, tmp_path)
    ask = ("modules", "--kernel", data["kernel_release"], "--driver", data["driver_version"], "--json")
    for _ in range(2):  # the first hit checks whole and keeps the stats, the second reads them
        hit = run_cli(*ask, env={"CUDABUILD_CACHE": str(planted)})
        assert hit.returncode == 0 and json.loads(hit.stdout)["cache_hit"] is True, hit.stderr[-2000:]
    assert (planted / "checked" / f"{copy.name}.json").is_file()
    library = copy / "userspace" / "lib" / f"libcuda.so.{data['driver_version']}"
    before = library.stat()
    with open(library, "r+b") as f:
        f.seek(before.st_size // 2)
        byte = f.read(1)
        f.seek(before.st_size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(library, ns=(before.st_atime_ns, before.st_mtime_ns))
    refused = run_cli(*ask, env={"CUDABUILD_CACHE": str(planted)})
    assert refused.returncode == 3, refused.stderr[-2000:]
    assert f"userspace/lib/libcuda.so.{data['driver_version']} has sha256" in refused.stderr
    assert "changed after it was built" in refused.stderr and "Traceback" not in refused.stderr


def test_a_planted_cache_entry_is_refused(build, tmp_path):
    """A result in the cache whose files are not what its manifest says (a modules file swapped
    for another) is refused on the cache hit: nothing published, the entry left as it is."""
    data, _, _, _ = build
    planted, copy = copied_cache(build, tmp_path)
    fake = copy / "modules" / "nvidia.ko"
    fake.unlink()
    fake.write_bytes(b"\x7fELF" + b"\0" * 1024)  # not the module the manifest lists
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file() and p.stat().st_size < 1 << 20}
    client = docker.from_env()
    image_before = client.images.get(data["modules_image"]).id
    result = run_cli("modules", "--kernel", data["kernel_release"], "--driver", data["driver_version"],
                     env={"CUDABUILD_CACHE": str(planted)})
    assert result.returncode == 3, result.stderr[-2000:]
    assert "modules/nvidia.ko has 1028 bytes" in result.stderr and "--no-cache" in result.stderr
    assert "Traceback" not in result.stderr
    assert client.images.get(data["modules_image"]).id == image_before, "no image was published"
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file() and p.stat().st_size < 1 << 20} == before
