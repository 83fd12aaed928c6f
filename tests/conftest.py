"""The session's shared parts: markers by what a test uses (every test that needs the engine
fixture, directly or through another fixture, is marked `engine`, so `-m engine` / `-m "not engine"`
select what they say), the real servers the e2e tests use (git daemon, HTTP, the installers), and
the builds that run in the background from the session's first test (tests/background.py)."""

import functools
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.helpers import REPO, STANDINS

# The tests that press Ctrl-C (SIGINT) on a cudabuild they started need it to act as from a
# terminal. A shell without job control starts a background job with SIGINT ignored, and the
# children inherit that; a handler here makes theirs the default again (a handler is reset at exec).
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


# The e2e modules in the order their background work is done (tests/background.py): those that
# need only the session's build first, then the Swarm run's, then the git chain's, the last to
# end. The e2e tests that wait for nothing but the session's build then run while the other builds
# still compile, instead of after them on one core.
E2E_ORDER = ("test_boot_in_qemu", "test_debian_build", "test_faults", "test_registry", "test_runtime_image",
             "test_signed_build", "test_one_image_every_kernel", "test_matrix", "test_git_run", "test_trixie")


def pytest_collection_modifyitems(items):
    for item in items:
        if "docker_client" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.engine)
    e2e = REPO / "tests" / "e2e"

    def rank(item) -> int:
        if e2e not in item.path.parents:
            return -1
        return E2E_ORDER.index(item.path.stem) if item.path.stem in E2E_ORDER else len(E2E_ORDER)

    items.sort(key=rank)  # stable: the unit and integration tests keep their order, and each module its own


@pytest.fixture(scope="session")
def removes_the_images_it_makes():
    """Every image the e2e tests and the background builds make (modules and runtime images) is
    removed at the end (asked for first when a session has e2e tests). Builder
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


@pytest.fixture(scope="session")
def session_build_started(fresh_cache, tmp_path_factory):
    """The session's build (tests/background.py session_build), started in the background at the
    session's first test."""
    from tests.background import Started, session_build

    started = Started(session_build, fresh_cache, [tmp_path_factory.mktemp("out") / "nvidia" for _ in range(2)])
    yield started
    started.executor.shutdown()


@pytest.fixture(scope="session")
def session_runs(session_build_started) -> dict:
    """What the session's build saw: the killed run, the two racing runs (test_faults checks them)."""
    return session_build_started.wait()


@pytest.fixture(scope="session")
def build(session_runs):
    """Debian's newest bookworm kernel with Debian's current 535 driver, built once per run: the
    racing run that built it (session_runs), its --output, the cache and its progress."""
    from tests.background import built

    return built(session_runs)


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
    from tests.helpers import bookworm_archive, debian_headers_files

    archive = bookworm_archive()
    release = next(r for r in archive.kernel_releases(backports=False)
                   if r.endswith("-amd64") and r.count("-") == 2
                   and archive.versions(f"linux-headers-{r}")[0].upstream_version == kernel_repo["version"])
    out = tmp_path_factory.mktemp("target")
    debian_headers_files(release, {".config": out / "config", "Module.symvers": out / "Module.symvers"})
    return {"config": out / "config", "symvers": out / "Module.symvers", "debian_release": release}


@pytest.fixture(scope="session")
def git_builds_started(kernel_repo, target_kernel_files, installers, tmp_path_factory):
    """test_git_run.py's builds (tests/background.py git_builds), in a cache of their own, started
    in the background at the session's first test."""
    from tests.background import Started, git_builds

    started = Started(git_builds, new_cache(tmp_path_factory, "git-cache"), kernel_repo, target_kernel_files,
                      installers)
    yield started
    started.executor.shutdown()


@pytest.fixture(scope="session")
def swarm_matrix_started(session_build_started, installers, tmp_path_factory):
    """test_matrix.py's Swarm run (tests/background.py swarm_matrix_run), started in the background
    once the session's build (whose images it copies) exists, with a registry and a cache of its
    own; its second engine lives for the session."""
    from tests.background import Started, swarm_matrix_run
    from tests.registry import LocalRegistry

    with LocalRegistry(tmp_path_factory.mktemp("swarm-registry")) as registry:
        started = Started(swarm_matrix_run, session_build_started, new_cache(tmp_path_factory, "swarm-cache"), registry, installers,
                          tmp_path_factory.mktemp("swarm"))
        yield started
        try:
            started.wait()["engine"].stop()
        except Exception:  # the tests that wait for it report its error; swarm_matrix_run stops its engine
            pass
        started.executor.shutdown()


@pytest.fixture(scope="session")
def trixie_builds_started(installers, tmp_path_factory):
    """test_trixie.py's builds (tests/background.py trixie_builds), in a cache of their own, started
    in the background at the session's first test; with them, the installers of 580.142 and
    595.45.04 made from NVIDIA's released open-module sources (once per machine)."""
    from tests.background import Started, trixie_builds
    from tests.helpers import bookworm_archive

    bookworm = bookworm_archive().latest_kernel()
    started = Started(trixie_builds, new_cache(tmp_path_factory, "trixie-cache"), installers, bookworm)
    yield started
    started.executor.shutdown()


@pytest.fixture(scope="session")
def wheel_install_started(tmp_path_factory):
    """test_wheel.py's installed wheel (tests/background.py install_wheel), made in the background."""
    from tests.background import Started, install_wheel

    started = Started(install_wheel, tmp_path_factory.mktemp("wheel"))
    yield started
    started.executor.shutdown()


BACKGROUND = ("wheel_install_started", "session_build_started", "git_builds_started", "trixie_builds_started",
              "swarm_matrix_started")


@pytest.fixture(scope="session", autouse=True)
def starts_the_background_builds(request):
    """At the session's first test, starts the background builds the selected tests need (the
    session's build and the git builds at once, the Swarm run once the session's build is made),
    so that they use the core the unit and integration tests leave idle."""
    needed = {name for item in request.session.items for name in item.fixturenames}
    if any(REPO / "tests" / "e2e" in item.path.parents for item in request.session.items):
        request.getfixturevalue("removes_the_images_it_makes")
    for name in BACKGROUND:
        if name in needed:
            request.getfixturevalue(name)
