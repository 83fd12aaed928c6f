"""The suite's builds, run in the background from the session's first test (tests/conftest.py
starts those the selected tests need): the session's build (Debian's newest kernel with Debian's
535, made the way tests/e2e/test_faults.py checks), the git tag + .run builds of
tests/e2e/test_git_run.py (535, then 470 on the kernel 535 prepared) in a cache of their own, and
the Swarm matrix of tests/e2e/test_matrix.py once the session's build exists. Started at the first
e2e test, they left one core idle while the unit and integration tests ran (they use one), and a
quarter of the time after (the boot tests' QEMU runs one thread; pushes and pulls compress in
one); the tests that check a background build wait for it. Their builders carry their own process's pid (io.cudabuild.pid),
which tests/helpers.run_cli_watched uses to tell them from the builders of the command under test."""

from __future__ import annotations

import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.dockerd import SecondEngine
from tests.helpers import REPO, run_cli


class Started:
    """Work running in a thread of its own; `wait` gives its result or raises its error."""

    def __init__(self, function, *args) -> None:
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="background")
        self.future = self.executor.submit(function, *args)

    def wait(self, timeout: float = 2400):
        return self.future.result(timeout=timeout)


# ---- the wheel (tests/integration/test_wheel.py) -----------------------------------------------------
def install_wheel(base: Path) -> dict:
    """cudabuild's wheel, built by pip from the checkout and installed with its dependencies into a
    fresh virtual environment, run away from the checkout to make cudabuild's own image
    (`cudabuild image tool --no-cache`: the wheels fetched by pip, the image built, not taken from
    an earlier run). Both wait on PyPI more than they work, so they go on beside the other tests."""
    import os

    import sys

    wheels = base / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(REPO)],
                   check=True, capture_output=True)
    [wheel] = wheels.glob("cudabuild-*.whl")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)], check=True, capture_output=True)
    away = base / "elsewhere"
    away.mkdir()
    tool_image = subprocess.run([str(venv / "bin" / "cudabuild"), "image", "tool", "--no-cache", "--json"], cwd=away,
                                capture_output=True, text=True,
                                env={**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}"})
    return {"venv": venv, "away": away, "tool_image": tool_image}


# ---- the session's build (tests/conftest.py session_runs, build) --------------------------------------
SESSION_BUILD = ("modules", "--kernel", "latest", "--driver", "535", "--json")


def session_build(cache: Path, outputs: list[Path]) -> dict:
    """The run's one build of Debian's newest bookworm kernel with Debian's current 535 driver, made
    the way test_faults needs a fresh-cache build: a first run is killed (SIGKILL) in the middle of
    its compile; then two identical runs (each with its own --output) start at once: one reaps the
    killed run's builder and builds, the other waits for it and answers from the cache. What each
    saw is kept for test_faults."""
    import signal

    from tests.helpers import builders_of, start_cli, wait_for_line

    env = {"CUDABUILD_CACHE": str(cache)}
    results = cache / "results"
    before = set(results.iterdir()) if results.exists() else set()
    killed = start_cli(*SESSION_BUILD, env=env)
    wait_for_line(killed, "==> make modules")
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    left = [c.name for c in builders_of(killed.pid)]
    after_kill = set(results.iterdir()) if results.exists() else set()
    racers = [start_cli(*SESSION_BUILD, "--output", str(out), env=env) for out in outputs]
    outs = [p.communicate(timeout=1800) for p in racers]
    ran = [(p.returncode, out, err) for p, (out, err) in zip(racers, outs)]
    return {"killed_pid": killed.pid, "left_by_kill": left, "results_before": before, "results_after_kill": after_kill,
            "runs": ran, "outputs": outputs, "builders_after": [c.name for c in builders_of(killed.pid)],
            "tmp_after": [p.name for p in (cache / "tmp").iterdir()], "cache": cache}


def built(runs: dict) -> tuple:
    """The racing run that built: its --json answer, its --output, the cache and its progress."""
    for (code, out, err), output in zip(runs["runs"], runs["outputs"]):
        assert code == 0, err[-4000:]
        data = json.loads(out)
        if not data["cache_hit"]:
            return data, output, runs["cache"], err
    raise AssertionError("neither racing run built: " + " | ".join(err[-1000:] for _, _, err in runs["runs"]))


# ---- git tag + .run (tests/e2e/test_git_run.py) ---------------------------------------------------
RELEASE_SUFFIX = "-test"


def git_build(cache, kernel_repo, files, installer_url, *extra, release=None, env=None):
    release = release or kernel_repo["version"] + RELEASE_SUFFIX
    return run_cli("modules", "--kernel", release, "--kernel-source", "git", "--kernel-repo", kernel_repo["url"],
                   "--kernel-config", str(files["config"]), "--symvers", str(files["symvers"]),
                   "--driver-source", "run", "--installer", installer_url, "--json", *extra,
                   env={"CUDABUILD_CACHE": str(cache), **(env or {})})


def git_builds(cache, kernel_repo, files, installers) -> dict:
    """535 from an installer in NVIDIA's layout that our stand-in script did not write (zstd, an
    embedded zstd; tests/conftest.py independent_installer), nvidia and nvidia-modeset (the five
    from the same 535 sources are the session build's, and nvidia-uvm, two thirds of the compile,
    is the 470 build's), then 470 as a compute-only driver on the kernel 535 fetched and prepared
    (without the compile cache), then the 535 build again with --no-cache (the compile cache warm); then the same tag fetched as a full checkout and
    prepared, for test_sparse_fetch_is_small_and_prepares_the_same_tree."""
    ask_535 = (f"{installers['url']}/independent/NVIDIA-Linux-x86_64-535.309.01.run", "--only-modules",
               "nvidia,nvidia-modeset")
    first = git_build(cache, kernel_repo, files, *ask_535)
    second, again, trees = None, None, None
    if first.returncode == 0:
        second = git_build(cache, kernel_repo, files, f"{installers['url']}/NVIDIA-Linux-x86_64-470.256.02.run",
                           "--only-modules", "nvidia,nvidia-uvm", "--no-compile-cache")
        again = git_build(cache, kernel_repo, files, *ask_535, "--no-cache")  # the compile cache is warm
        try:
            trees = prepared_checkouts(cache, kernel_repo, files, installers)
        except Exception as exc:  # the test that checks the trees reports it; the builds' tests stand
            trees = exc
    return {"cache": cache, "535": first, "470": second, "535 again": again, "trees": trees}


def prepared_checkouts(cache, kernel_repo, files, installers) -> dict:
    """The kernel of the git builds as each checkout fetches and prepares it (the sparse one is
    the builds' own, in the cache): {"sparse"|"full": (clone, prepared tree)}."""
    import os

    from cudabuild.compile.plan import plan_modules
    from cudabuild.compile.steps import prepare_kernel
    from cudabuild.settings import Services, Settings
    from cudabuild.ui import Reporter

    settings = Settings.from_env({**os.environ, "CUDABUILD_CACHE": str(cache)})
    flags = {"kernel": kernel_repo["version"] + RELEASE_SUFFIX, "kernel_source": "git",
             "kernel_repo": kernel_repo["url"], "kernel_config": str(files["config"]),
             "symvers": str(files["symvers"]), "driver_source": "run",
             "installer": f"{installers['url']}/independent/NVIDIA-Linux-x86_64-535.309.01.run"}
    reporter = Reporter(quiet=True)
    services = Services(settings, reporter=reporter)
    trees = {}
    for checkout in ("sparse", "full"):
        plan = plan_modules(settings.build_options({**flags, "kernel_checkout": checkout}), services)
        trees[checkout] = (cache / "kernels" / plan.kernel.clone["dir"], prepare_kernel(plan, reporter=reporter))
    return trees


# ---- the Swarm matrix (tests/e2e/test_matrix.py) -----------------------------------------------------
OLDER = "6.1.0-47-amd64"  # bookworm's headers that Debian's open 535.261.03 still builds against (FACTS.md)
OPEN = "535.261.03"
# The two modules whose proprietary builds differ from the open ones (NVIDIA's binary cores): the
# open build is the open path's, and the cells compile no more than it needs (uvm, drm and peermem
# are the same sources in both flavors, and built for real by the suite's other builds).
ONLY = ("--only-modules", "nvidia,nvidia-modeset")


def swarm_matrix_run(session: Started, cache, registry, installers, base: Path) -> dict:
    """Once the session's build is made: a second engine, a one-node Swarm manager with the base and builder images the run's build
    used (nothing can be pulled from Docker Hub here), cudabuild's own image in the registry, and
    the matrix of two cells, with a cache of its own."""
    data = built(session.wait())[0]
    manifest = json.loads((Path(data["cache_dir"]) / "manifest.json").read_text())
    engine = SecondEngine(base, {}).start()
    try:
        # Ports of its own: the Swarm of tests/integration/test_runtime.py may run at the same time
        # (the second to start logs that gossip's 7946 is taken; a one-node Swarm with host
        # networking does not gossip, and its jobs run: measured here).
        engine.docker("swarm", "init", "--advertise-addr", "127.0.0.1", "--listen-addr", "127.0.0.1:2378",
                      "--data-path-port", "4790")
        engine.load(manifest["builder_image"]["base"], manifest["builder_image"]["tag"])
        made = subprocess.run(["bash", str(REPO / "scripts" / "tool-image"), registry.repo()], capture_output=True,
                              text=True, timeout=900)
        assert made.returncode == 0, made.stderr[-3000:]
        result, services = matrix(engine, cache, registry, "--kernels", f"{data['kernel_release']},{OLDER}",
                                  "--drivers", OPEN, "--flavors", "open", *ONLY, "--driver-source", "run",
                                  "--installer", installer_url(installers))
    except BaseException:
        engine.stop()
        raise
    return {"engine": engine, "registry": registry, "cache": cache, "result": result, "services": services}


def matrix(swarm, cache, registry, *args):
    since = int(time.time()) - 1
    result = run_cli("matrix", "--backend", "swarm", "--registry", registry.repo(), "--node-socket",
                     str(swarm.socket), *args, env={"CUDABUILD_CACHE": str(cache), "DOCKER_HOST": swarm.host},
                     timeout=1800)
    created = swarm.docker("events", "--since", str(since), "--until", str(int(time.time()) + 1), "--filter",
                           "type=service", "--filter", "event=create", "--format", "{{.Actor.Attributes.name}}")
    return result, [name for name in created.stdout.splitlines() if name]


def installer_url(installers) -> str:
    return f"{installers['url']}/NVIDIA-Linux-x86_64-{OPEN}.run"




# ---- Debian 13 trixie and NVIDIA's current branches (tests/e2e/test_trixie.py) ------------------------
# What each build adds to the suite (measured on this machine kind, 2 cores): Debian's 550 for
# trixie's newest kernel, the five modules, with its boot test (the one full trixie compile, and
# the one of Debian's nvidia-uvm on a 6.12 kernel), about 2.5 min; 580.142 open from NVIDIA's released
# sources for the same kernel, the five modules (the open nvidia-uvm is compiled by no other build),
# with its boot test, about 2 min; 595.45.04 for the session's bookworm
# kernel and the rt build of nvidia.ko alone (each a path of its own: another branch, another
# flavour's config), tesla-535's nvidia + nvidia-modeset for the cloud kernel, and the
# open 550's nvidia.ko, which fails in a few seconds (its sources predate trixie's kernels): about
# 40 s each. With test_trixie.py's own commands, about 7 minutes of the suite's two cores.
OPEN_580, OPEN_595 = "580.142", "595.45.04"
ONLY_580: tuple[str, ...] = ()  # the five modules: the matrix test's 580 cell is this build


def open_installers(directory: Path) -> None:
    """NVIDIA-Linux-x86_64-{580.142,595.45.04}.run made from NVIDIA's released open-module sources
    (../shared/nvidia; scripts/standin-open-installer: src/ compiled once per machine and kept with
    the stand-ins, kernel-open/ as released, a stand-in userspace), beside the other installers."""
    import sys

    for version in (OPEN_580, OPEN_595):
        made = subprocess.run([sys.executable, str(REPO / "scripts" / "standin-open-installer"), version,
                               str(directory)], capture_output=True, text=True)
        assert made.returncode == 0, made.stderr[-3000:]


def trixie_builds(cache: Path, installers: dict, bookworm_release: str) -> dict:
    """The trixie and current-branch builds, in one cache of their own, one after another."""
    from tests.helpers import bookworm_archive

    open_installers(installers["dir"])
    env = {"CUDABUILD_CACHE": str(cache)}
    archive = bookworm_archive("trixie")
    latest, cloud, rt = (archive.latest_kernel(f) for f in ("amd64", "cloud-amd64", "rt-amd64"))
    run_url = f"{installers['url']}/NVIDIA-Linux-x86_64-{{}}.run"
    done = {"cache": cache, "latest": latest, "cloud_release": cloud, "rt_release": rt, "bookworm": bookworm_release,
            "installer_url": run_url}

    def build(name: str, *args: str) -> None:
        done[name] = run_cli("modules", *args, "--json", env=env, timeout=1800)

    build("550", "--kernel", "latest", "--distribution", "trixie", "--boot-test")
    build("580", "--kernel", latest, "--driver-source", "run", "--installer", run_url.format(OPEN_580),
          *ONLY_580, "--boot-test")
    build("595 bookworm", "--kernel", bookworm_release, "--driver-source", "run", "--installer",
          run_url.format(OPEN_595), "--only-modules", "nvidia")
    # trixie's tesla-535 for the cloud kernel, which has no DRM: nvidia-drm asked for and left out
    build("535 cloud", "--kernel", cloud, "--driver", "535", "--only-modules", "nvidia,nvidia-modeset,nvidia-drm")
    build("550 open", "--kernel", latest, "--flavor", "open", "--backports", "--only-modules", "nvidia")
    build("rt", "--kernel", rt, "--only-modules", "nvidia", "--ignore-preempt-rt")
    return done
