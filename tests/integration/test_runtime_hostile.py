"""cudabuild-runtime against what the hostile tester fed it: each is a clear refusal of `create`
(exit 1, one escaped line, bounded), or runc reached as it should be; never a traceback. runc is a
recording stand-in here (--runtime-path): these are the runtime's own decisions. The real engine's
view: tests/integration/test_runtime.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, host_with_artifact, run_cli

RUNTIME = str(Path(sys.executable).parent / "cudabuild-runtime")


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    base = tmp_path_factory.mktemp("runtime-hostile")
    root, env, art = host_with_artifact(base, gpus=2, installed=True)
    runc = base / "runc"
    runc.write_text('#!/bin/sh\necho "$@" >> "$(dirname "$0")/runc.log"\n')
    runc.chmod(0o755)
    return {"root": root, "spec_dir": root / "run/cdi", "runc": runc, "log": base / "runc.log", "base": base}


def bundle(tmp_path: Path, config: object, raw: str | None = None) -> Path:
    b = tmp_path / "bundle"
    b.mkdir(exist_ok=True)
    (b / "config.json").write_text(raw if raw is not None else json.dumps(config))
    return b


def runtime(host, *args, config_file: Path | None = None, script: str = RUNTIME):
    env = {**os.environ, "CUDABUILD_RUNTIME_CONFIG": str(config_file or host["base"] / "no-config.json")}
    return subprocess.run([script, "--runtime-path", str(host["runc"]), "--cdi-spec-dir", str(host["spec_dir"]),
                           "--runtime-log", str(host["base"] / "own.log"), *args],
                          env=env, capture_output=True, text=True, timeout=60)


def oci(env: list) -> dict:
    return {"ociVersion": "1.0.2", "process": {"args": ["sh"], "env": env}, "root": {"path": "rootfs"}}


def reached_runc(host) -> list[str]:
    return host["log"].read_text().splitlines() if host["log"].exists() else []


def refused(result, *words: str) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


def test_a_huge_or_forging_gpu_value_is_logged_bounded_and_escaped(host, tmp_path):
    value = "7\",\"level\":\"info\"\nforged line" + "x" * 1_000_000
    b = bundle(tmp_path, oci([f"NVIDIA_VISIBLE_DEVICES={value}"]))
    runc_log = tmp_path / "runc-log.json"
    result = runtime(host, "--log", str(runc_log), "--log-format", "json", "create", "--bundle", str(b), "c1")
    refused(result, "does not exist")
    assert len(result.stderr) < 5000 and "forged line" in result.stderr  # said, escaped, cut
    for log in (runc_log, host["base"] / "own.log"):
        lines = log.read_text().splitlines()
        assert len(lines[-1]) < 5000 and not any(line.startswith("forged") for line in lines)
    assert json.loads(runc_log.read_text().splitlines()[-1])["level"] == "error"


def test_a_malformed_configuration_never_keeps_state_or_delete_from_runc(host, tmp_path):
    config = tmp_path / "runtime.json"
    config.write_text("{not json")
    for command in (["state", "c1"], ["delete", "--force", "c1"], ["kill", "c1", "KILL"]):
        result = runtime(host, *command, config_file=config)
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
        assert reached_runc(host)[-1] == " ".join(command)
    b = bundle(tmp_path, oci(["NVIDIA_VISIBLE_DEVICES=0"]))
    refused(runtime(host, "create", "--bundle", str(b), "c2", config_file=config), "runtime.json", "fix or remove")


def test_cdi_spec_dirs_as_a_string_is_refused_not_read_as_characters(host, tmp_path):
    config = tmp_path / "runtime.json"
    config.write_text(json.dumps({"cdi_spec_dirs": "/"}))
    b = bundle(tmp_path, oci(["NVIDIA_VISIBLE_DEVICES=0"]))
    refused(runtime(host, "create", "--bundle", str(b), "c3", config_file=config),
            "cdi_spec_dirs must be a list of absolute directories")


@pytest.mark.parametrize("config,raw,words", [
    (None, "this is not json NVIDIA_VISIBLE_DEVICES=0", ["cannot read the bundle"]),
    ({"process": {"env": [5]}, "x": "NVIDIA_VISIBLE_DEVICES"}, None, ["not an OCI runtime spec"]),
    ({"process": ["NVIDIA_VISIBLE_DEVICES=0"]}, None, ["not an OCI runtime spec"]),
    ([1, "NVIDIA_VISIBLE_DEVICES=0"], None, ["not an OCI runtime spec"]),
], ids=["not-json", "env-5", "process-list", "a-list"])
def test_a_bundle_that_is_not_an_oci_spec_is_refused(host, tmp_path, config, raw, words):
    b = bundle(tmp_path, config, raw)
    refused(runtime(host, "create", "--bundle", str(b), "c4"), *words)


def test_a_missing_bundle_or_a_trailing_bundle_flag_is_refused(host, tmp_path):
    refused(runtime(host, "create", "--bundle", str(tmp_path / "nowhere"), "c5"), "has no config.json")
    refused(runtime(host, "create", "c5", "--bundle"), "--bundle has no value")


def test_an_unrelated_broken_spec_does_not_refuse_gpu_containers(host, tmp_path):
    broken = host["spec_dir"] / "zz-other-vendor.json"
    broken.write_text("{broken")
    try:
        b = bundle(tmp_path, oci(["NVIDIA_VISIBLE_DEVICES=0"]))
        result = runtime(host, "create", "--bundle", str(b), "c6")
        assert result.returncode == 0, result.stderr
        edited = json.loads((b / "config.json").read_text())
        assert [d["path"] for d in edited["linux"]["devices"]][-1] == "/dev/nvidia0"
    finally:
        broken.unlink()


def test_a_spec_whose_major_is_a_string_is_refused_not_copied(host, tmp_path):
    spec_dir = tmp_path / "cdi"
    spec_dir.mkdir()
    spec = json.loads((host["spec_dir"] / "cudabuild-nvidia.json").read_text())
    spec["containerEdits"]["deviceNodes"][0]["major"] = "195; rm -rf /"
    (spec_dir / "cudabuild-nvidia.json").write_text(json.dumps(spec))
    b = bundle(tmp_path, oci(["NVIDIA_VISIBLE_DEVICES=0"]))
    before = (b / "config.json").read_text()
    result = subprocess.run([RUNTIME, "--runtime-path", str(host["runc"]), "--cdi-spec-dir", str(spec_dir),
                             "--runtime-log", str(tmp_path / "own.log"), "create", "--bundle", str(b), "c7"],
                            env={**os.environ, "CUDABUILD_RUNTIME_CONFIG": str(tmp_path / "none")},
                            capture_output=True, text=True, timeout=60)
    refused(result, "malformed", "major")
    assert (b / "config.json").read_text() == before


def test_the_checkouts_front_end_finds_the_checkouts_python(host, tmp_path):
    """bin/cudabuild-runtime in a checkout runs .venv's Python, not the system python3 (which has
    no cudabuild), so a GPU container's create reaches the Python side."""
    b = bundle(tmp_path, oci(["NVIDIA_VISIBLE_DEVICES=0"]))
    result = runtime(host, "create", "--bundle", str(b), "c8", script=str(REPO / "bin" / "cudabuild-runtime"))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "/dev/nvidia0" in (b / "config.json").read_text()


def test_cdi_list_passes_over_a_spec_whose_devices_are_not_objects(host, tmp_path):
    other = host["spec_dir"] / "other.json"
    other.write_text(json.dumps({"cdiVersion": "0.5.0", "kind": "example.com/x", "devices": [5, "a"]}))
    try:
        result = run_cli("cdi", "list", "--root", str(host["root"]), "--json")
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
        assert str(other) not in json.loads(result.stdout)["specs"]
        assert "nvidia.com/gpu=all" in json.loads(result.stdout)["devices"]
    finally:
        other.unlink()


@pytest.mark.parametrize("variable", ["NVIDIA_VISIBLE_DEVICES", "DOCKER_RESOURCE_GPU", "NV_GPU"])
def test_the_front_end_takes_the_gpu_variables_from_the_device_facts(host, tmp_path, variable):
    """The shell front end sends a create to Python exactly when config.json names one of
    nvidia-devices.conf's SELECTION_VARIABLES. Laid out as in a checkout (bin/ beside images/),
    with a python3 beside it that only says it was started."""
    import shutil

    checkout = tmp_path / "checkout"
    (checkout / "bin").mkdir(parents=True)
    (checkout / "images").mkdir()
    shutil.copy2(REPO / "bin" / "cudabuild-runtime", checkout / "bin" / "cudabuild-runtime")
    shutil.copy2(REPO / "images" / "nvidia-devices.conf", checkout / "images" / "nvidia-devices.conf")
    marker = tmp_path / "python-started"
    (checkout / "bin" / "python3").write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    (checkout / "bin" / "python3").chmod(0o755)
    facts = (REPO / "images" / "nvidia-devices.conf").read_text()
    assert variable in facts.split("SELECTION_VARIABLES=", 1)[1].split("\n", 1)[0].split()
    env = {**os.environ, "CUDABUILD_RUNTIME_CONFIG": str(tmp_path / "none")}
    for names_gpu in (False, True):
        b = bundle(tmp_path, oci(["PATH=/bin"] + ([f"{variable}=0"] if names_gpu else [])))
        result = subprocess.run([str(checkout / "bin" / "cudabuild-runtime"), "--runtime-path", str(host["runc"]),
                                 "create", "--bundle", str(b), "c9"], env=env, capture_output=True, text=True,
                                timeout=60)
        assert marker.exists() == names_gpu, (names_gpu, result.stderr)
        assert (result.returncode == 0) != names_gpu  # no GPU: runc, straight from the shell
