import functools
import json
import socket
import subprocess
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.helpers import REPO, STANDINS


@pytest.fixture(scope="session", autouse=True)
def removes_the_images_it_makes():
    """Every image the e2e tests make (modules and runtime images) is removed at the end. Builder
    images stay: like the base images and downloads, they are the toolchain a later run reuses."""
    import docker

    client = docker.from_env()
    before = {i.id for i in client.images.list(all=True)}
    yield
    for image in client.images.list():
        if image.id not in before and not any(t.startswith("cudabuild/builder:") for t in image.tags):
            try:
                client.images.remove(image.id, force=True)
            except docker.errors.APIError:
                pass


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A real registry (Debian's docker-registry) on 127.0.0.1, its own per test module."""
    from tests.registry import LocalRegistry

    with LocalRegistry(tmp_path_factory.mktemp("registry")) as running:
        yield running


def new_cache(tmp_path_factory, name: str = "cache") -> Path:
    """A new cache: results must be built, not found. Downloaded packages (checked by sha256
    against Debian's index) are shared between runs to spare the mirror."""
    cache = tmp_path_factory.mktemp(name)
    shared = STANDINS / "downloads"
    shared.mkdir(parents=True, exist_ok=True)
    (cache / "downloads").symlink_to(shared, target_is_directory=True)
    return cache


@pytest.fixture(scope="session")
def fresh_cache(tmp_path_factory) -> Path:
    """The session build's cache (session_runs)."""
    return new_cache(tmp_path_factory)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def kernel_repo():
    """linux-source-6.1 as a linux-stable-like repository, served by git daemon on 127.0.0.1."""
    made = subprocess.run(["bash", str(REPO / "scripts" / "standin-kernel-repo"), str(STANDINS)],
                          capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    tag = made.stdout.strip().splitlines()[-1]
    port = free_port()
    daemon = subprocess.Popen(["git", "daemon", "--reuseaddr", "--listen=127.0.0.1", f"--port={port}",
                               f"--base-path={STANDINS}", "--export-all", "--enable=upload-pack", str(STANDINS)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"git://127.0.0.1:{port}/linux-stable.git"
    for _ in range(50):
        if subprocess.run(["git", "ls-remote", url], capture_output=True).returncode == 0:
            break
        time.sleep(0.2)
    yield {"url": url, "tag": tag, "version": tag.lstrip("v")}
    daemon.terminate()
    daemon.wait(10)


@pytest.fixture(scope="session")
def installers():
    """.run stand-ins made from Debian's packages, served over HTTP on 127.0.0.1."""
    directory = STANDINS / "installers"
    for version in ("535.309.01", "470.256.02", "535.261.03"):
        made = subprocess.run([sys.executable, str(REPO / "scripts" / "standin-installer"), version,
                               str(directory), "--cache", str(STANDINS / "standin-cache")],
                              capture_output=True, text=True)
        assert made.returncode == 0, made.stderr
    independent_installer(directory, "535.309.01")
    handler = functools.partial(QuietHandler, directory=str(directory))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield {"url": f"http://127.0.0.1:{server.server_address[1]}", "dir": directory}
    server.shutdown()
    server.server_close()


def independent_installer(directory: Path, version: str) -> Path:
    """directory/independent/NVIDIA-Linux-x86_64-VERSION.run: the stand-in's tree, as its own stub
    extracts it (with its embedded zstd), made again into an installer by tests/helpers.make_nvidia_run,
    which follows NVIDIA's layout with coreutils and the zstd command, not scripts/makeself.py."""
    from cudabuild.errors import InputError
    from cudabuild.sources.run import check_installer
    from tests.helpers import make_nvidia_run

    out = directory / "independent" / f"NVIDIA-Linux-x86_64-{version}.run"
    standin = directory / out.name
    if out.exists():
        try:
            if check_installer(out).compression == "zstd" and out.stat().st_mtime >= standin.stat().st_mtime:
                return out
        except InputError:
            pass
    out.parent.mkdir(exist_ok=True)
    work = out.parent / f".work-{version}"
    subprocess.run(["rm", "-rf", str(work)], check=True)
    work.mkdir()
    try:
        subprocess.run(["sh", str(standin), "-x", "--target", str(work / "tree")], check=True, capture_output=True)
        return make_nvidia_run(work / "tree", version, "zstd", out)
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=True)


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="session")
def target_kernel_files(kernel_repo, tmp_path_factory):
    """The .config and Module.symvers of Debian's build of the same kernel version, as a user
    would take them from the target host."""
    from debian.debfile import DebFile

    from cudabuild.cache import Cache
    from cudabuild.sources.debian import DebianArchive
    from cudabuild.fetch import Fetcher
    from cudabuild.ui import Reporter

    reporter = Reporter(quiet=True)
    cache = Cache(STANDINS / "standin-cache")
    fetcher = Fetcher(reporter=reporter)
    archive = DebianArchive(cache=cache, fetcher=fetcher, reporter=reporter, mirror="http://deb.debian.org/debian",
                            security_mirror="http://deb.debian.org/debian-security", distribution="bookworm")
    release = next(r for r in archive.kernel_releases()
                   if r.endswith("-amd64") and r.count("-") == 2
                   and archive.versions(f"linux-headers-{r}")[0].upstream_version == kernel_repo["version"])
    headers = archive.versions(f"linux-headers-{release}")[0]
    deb = fetcher.fetch(headers.url, store=cache.downloads, sha256=headers.sha256, size=headers.size)
    out = tmp_path_factory.mktemp("target")
    package = DebFile(str(deb))
    try:
        data = package.data.tgz()
        for name, target in ((".config", "config"), ("Module.symvers", "Module.symvers")):
            member = next(m for m in data.getmembers() if m.name.endswith(f"linux-headers-{release}/{name}"))
            (out / target).write_bytes(data.extractfile(member).read())
    finally:
        package.close()
    return {"config": out / "config", "symvers": out / "Module.symvers", "debian_release": release}


@pytest.fixture(scope="session")
def session_runs(fresh_cache, tmp_path_factory) -> dict:
    """The run's one build of Debian's newest bookworm kernel with Debian's current 535 driver, made
    the way test_faults needs a fresh-cache build: a first run is killed (SIGKILL) in the middle of
    its compile; then two identical runs (each with its own --output) start at once: one reaps the
    killed run's builder and builds, the other waits for it and answers from the cache. What each
    saw is kept for test_faults; `build` is the run that built."""
    import signal

    from tests.helpers import builders_of, start_cli, wait_for_line

    env = {"CUDABUILD_CACHE": str(fresh_cache)}
    args = ["modules", "--kernel", "latest", "--driver", "535", "--json"]
    results = fresh_cache / "results"
    before = set(results.iterdir()) if results.exists() else set()
    killed = start_cli(*args, env=env)
    wait_for_line(killed, "==> make modules")
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    left = [c.name for c in builders_of(killed.pid)]
    after_kill = set(results.iterdir()) if results.exists() else set()
    outputs = [tmp_path_factory.mktemp("out") / "nvidia" for _ in range(2)]
    racers = [start_cli(*args, "--output", str(out), env=env) for out in outputs]
    outs = [p.communicate(timeout=1800) for p in racers]
    ran = [(p.returncode, out, err) for p, (out, err) in zip(racers, outs)]
    return {"killed_pid": killed.pid, "left_by_kill": left, "results_before": before, "results_after_kill": after_kill,
            "runs": ran, "outputs": outputs, "builders_after": [c.name for c in builders_of(killed.pid)],
            "tmp_after": [p.name for p in (fresh_cache / "tmp").iterdir()], "cache": fresh_cache}


@pytest.fixture(scope="session")
def git_builds_started(kernel_repo, target_kernel_files, installers, tmp_path_factory):
    """test_git_run.py's builds (tests/background.py git_builds), in a cache of their own, started
    in the background at the first e2e test."""
    from tests.background import Started, git_builds

    started = Started(git_builds, new_cache(tmp_path_factory, "git-cache"), kernel_repo, target_kernel_files,
                      installers)
    yield started
    started.executor.shutdown()


@pytest.fixture(scope="session")
def swarm_matrix_started(build, installers, tmp_path_factory):
    """test_matrix.py's Swarm run (tests/background.py swarm_matrix_run), started in the background
    once the session's build (whose images it copies) exists, with a registry and a cache of its
    own; its second engine lives for the session."""
    from tests.background import Started, swarm_matrix_run
    from tests.registry import LocalRegistry

    with LocalRegistry(tmp_path_factory.mktemp("swarm-registry")) as registry:
        started = Started(swarm_matrix_run, build, new_cache(tmp_path_factory, "swarm-cache"), registry, installers,
                          tmp_path_factory.mktemp("swarm"))
        yield started
        try:
            started.wait()["engine"].stop()
        except Exception:  # the tests that wait for it report its error; swarm_matrix_run stops its engine
            pass
        started.executor.shutdown()


@pytest.fixture(scope="session", autouse=True)
def starts_the_background_builds(request):
    """At the first e2e test, starts the background builds this session's tests need: the git
    builds at once, the Swarm run once the session's build is made."""
    needed = {name for item in request.session.items for name in item.fixturenames}
    for name in ("git_builds_started", "swarm_matrix_started"):
        if name in needed:
            request.getfixturevalue(name)


@pytest.fixture(scope="session")
def build(session_runs):
    """Debian's newest bookworm kernel with Debian's current 535 driver, built once per run: the
    racing run that built it (session_runs), its --output, the cache and its progress."""
    for (code, out, err), output in zip(session_runs["runs"], session_runs["outputs"]):
        assert code == 0, err[-4000:]
        data = json.loads(out)
        if not data["cache_hit"]:
            return data, output, session_runs["cache"], err
    raise AssertionError("neither racing run built: " + " | ".join(err[-1000:] for _, _, err in session_runs["runs"]))
