"""The built wheel, installed into a fresh virtual environment, works away from the checkout."""

import subprocess

import pytest

from tests.helpers import REPO


@pytest.fixture(scope="module")
def wheel(wheel_install_started):
    """cudabuild installed from its wheel into a fresh virtual environment, as a pip user has it,
    and the tool image it made (tests/background.py install_wheel, started at the session's first
    test: pip waits on PyPI)."""
    return wheel_install_started.wait()


@pytest.fixture(scope="module")
def installed(wheel):
    return wheel["venv"], wheel["away"]


def test_wheel_ships_the_builder_scripts_templates_and_profiles(installed):
    venv, away = installed
    version = subprocess.run([str(venv / "bin" / "cudabuild"), "--version"], cwd=away, capture_output=True,
                             text=True, check=True)
    assert "cudabuild, version" in version.stdout
    runtime = subprocess.run([str(venv / "bin" / "cudabuild-runtime"), "--cdi-spec-dir", "/nowhere", "--version"],
                             cwd=away, capture_output=True, text=True)
    assert runtime.returncode == 0 and "runc version" in runtime.stdout, "the runtime passes what it need not change"
    python_side = subprocess.run([str(venv / "bin" / "python"), "-m", "cudabuild.cdi.runtime", "--version"],
                                 cwd=away, capture_output=True, text=True)
    assert python_side.returncode == 0 and "runc version" in python_side.stdout
    probe = ("from cudabuild.resources import resource_dir\n"
             "from cudabuild.compile.builder import render_template\n"
             "for name in ('builder', 'dockerfiles', 'images'):\n"
             "    print(resource_dir(name))\n"
             "assert (resource_dir('builder') / 'build.sh').is_file()\n"
             "assert 'FROM debian:bookworm' in render_template('builder.Dockerfile.j2', base='debian:bookworm',"
             " packages=['gcc'], apt_sources=None)\n")
    found = subprocess.run([str(venv / "bin" / "python"), "-c", probe], cwd=away, capture_output=True, text=True)
    assert found.returncode == 0, found.stderr
    for line in found.stdout.splitlines():
        assert line.startswith(str(venv)), f"{line} must come from the installed wheel, not the checkout"


def test_image_tool_makes_the_tool_image_without_a_checkout(wheel, docker_client):
    """`cudabuild image tool --no-cache` from a pip-installed cudabuild, run away from any checkout
    (tests/background.py install_wheel): the image the matrix runs on the nodes, and the cudabuild
    inside it is the installed one."""
    import json

    import cudabuild

    tag = f"cudabuild/cudabuild:{cudabuild.__version__}"
    made = wheel["tool_image"]
    assert made.returncode == 0, made.stderr
    report = json.loads(made.stdout)
    assert report["image"] == tag and report["reused"] is False
    image = docker_client.images.get(tag)
    assert image.labels["io.cudabuild.role"] == "tool" and image.labels["io.cudabuild.version"] == cudabuild.__version__
    ran = docker_client.containers.run(tag, ["--version"], remove=True, network_mode="none").decode()
    assert f"cudabuild, version {cudabuild.__version__}" in ran
    runtime = docker_client.containers.run(tag, remove=True, network_mode="none", entrypoint=["sh", "-c"],
                                           command=["command -v cudabuild-runtime && python3 -c "
                                                    "'import cudabuild.fleet.toolimage'"]).decode()
    assert "cudabuild-runtime" in runtime

    # The checkout's own cudabuild (an editable install: its wheel built by pip from the source)
    # holds the same files, so the image is used as it is; --no-cache makes it again.
    again = subprocess.run([str(REPO / ".venv" / "bin" / "cudabuild"), "image", "tool", "--json"],
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == {**report, "reused": True}
    assert docker_client.images.get(tag).labels["io.cudabuild.wheel"] == report["wheel"]
