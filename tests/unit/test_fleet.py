"""The fleet's pieces without an engine: registry names, the BuildJob value and its command line,
what backends make of a finished job, the Kubernetes Jobs (kubernetes-validate, strict, 1.30), the
kernel list, and the refusals (a hostile saved image, a remote engine)."""

import io
import json
import tarfile
from types import SimpleNamespace

import kubernetes_validate
import pytest

from cudabuild.compile import backends
from cudabuild.store.cache import pid_alive, pid_namespace
from cudabuild.engine import Engine
from cudabuild.compile.job import BuildJob
from cudabuild.errors import InputError, VerifyError
from cudabuild.compile.backends import Outcome
from cudabuild.fleet.matrix import MatrixRequest, MatrixResult, expand_kernels, summary_lines
from cudabuild.artifact import unpack_image
from cudabuild.registry import Registry
from cudabuild.options import BuildOptions, options_from_json, options_to_json, validate_registry

CELL = BuildOptions(kernel="6.1.0-56-amd64", driver="535.261.03", flavor="open",
                    registry="127.0.0.1:5055/cudabuild")
JOB = BuildJob(kernel="6.1.0-56-amd64", driver="535", flavor="open", driver_version="535.261.03",
               argv=("modules", "--options-json", options_to_json(CELL), "--json"), key="ab" * 32,
               tag="cudabuild/modules:535.261.03-open-6.1.0-56-amd64")


@pytest.mark.parametrize("value", ["127.0.0.1:5055/cudabuild", "registry.example/team/gpu", "localhost/x"])
def test_registry_repositories_are_host_and_path(value):
    assert validate_registry(value) == value


@pytest.mark.parametrize("value", ["cudabuild", "127.0.0.1:5055/cudabuild:tag", "127.0.0.1:5055/CUDA",
                                   "team/gpu", "127.0.0.1:5055/x@sha256:" + "0" * 64, ""])
def test_other_values_are_refused_with_the_form_named(value):
    with pytest.raises(InputError) as refused:
        validate_registry(value)
    assert "--registry" in refused.value.message and "HOST[:PORT]/PATH" in refused.value.hint


def test_registry_names_and_transport():
    local = Registry("127.0.0.1:5055/cudabuild")
    assert local.ref("cudabuild/modules:535.309.01-6.1.0-56-amd64") == \
        "127.0.0.1:5055/cudabuild/modules:535.309.01-6.1.0-56-amd64"
    assert local.base_url == "http://127.0.0.1:5055"
    assert Registry("registry.example/gpu").base_url == "https://registry.example"


def test_a_cells_options_go_to_its_build_as_data_and_come_back_the_same():
    cell = BuildOptions(kernel="6.1.0-56-amd64", driver="535.309.01", apt_mirror="http://mirror.example/debian",
                        use_cache=False, jobs=4, boot_timeout=120.0, registry="127.0.0.1:5055/cudabuild")
    assert options_from_json(options_to_json(cell)) == cell
    assert options_from_json(options_to_json(BuildOptions())).jobs is None, "the node's CPU count, not ours"


@pytest.mark.parametrize("data,fragment", [
    ("{not json", "not JSON"),
    ('{"kernel": "6.1.0-56-amd64", "colour": "red"}', "unknown: colour"),
    ('{"jobs": "4"}', "jobs"),
    ('{"use_cache": 1}', "use_cache"),
    ('{"kernel": "6.1.0-56-amd64; rm -rf /"}', "is not valid"),
])
def test_options_data_that_is_not_a_cells_is_refused(data, fragment):
    with pytest.raises(InputError) as refused:
        options_from_json(data)
    assert fragment in refused.value.message


def test_the_files_on_this_machine_an_option_names(tmp_path):
    config = tmp_path / "config"
    config.write_text("CONFIG_MODVERSIONS=y\n")
    options = BuildOptions(kernel="4.3.6-coreos", kernel_config=str(config), symvers="host",
                           installer="https://mirror.example/NVIDIA-Linux-x86_64-535.309.01.run",
                           driver_source="run", driver="535.309.01")
    assert options.local_files() == [("--kernel-config", str(config))]


def test_a_job_has_a_name_for_services_and_files():
    assert JOB.name == "535-open-6-1-0-56-amd64"
    assert JOB.cell == "6.1.0-56-amd64 x 535 (open)"


def test_a_finished_job_becomes_its_outcome(tmp_path):
    ok = backends.outcome_of(JOB, 0, json.dumps({"origin": "pulled", "driver_version": "535.261.03"}), "progress\n",
                             seconds=3, log_path=tmp_path / "ok.log")
    assert ok.state == "pulled" and ok.result["driver_version"] == "535.261.03"
    stderr = ("==> make modules\nerror: the build failed in step 'make modules' (exit code 2)\n"
              "--- last lines of the build log ---\n"
              "nv-pci.c:223:9: error: too few arguments to function 'pci_resize_resource'\n---\n"
              "whole log: /cache/logs/x.log\nfix: read the compiler's lines above\n")
    failed = backends.outcome_of(JOB, 6, "", stderr, seconds=60, log_path=tmp_path / "failed.log",
                                 reason="task: non-zero exit (6)")
    assert failed.state == "failed"
    assert failed.error == "the build failed in step 'make modules' (exit code 2)"
    assert (tmp_path / "failed.log").read_text().startswith("==> make modules")
    table = "\n".join(summary_lines(MatrixResult(backend="swarm", registry=None, outcomes=[ok, failed])))
    assert "nv-pci.c:223:9: error: too few arguments to function 'pci_resize_resource'" in table
    assert "535.261.03  open    pulled" in table
    silent = backends.outcome_of(JOB, None, "", "", seconds=1, log_path=tmp_path / "gone.log",
                                 reason="its node went away")
    assert silent.error == "its node went away"


def test_the_report_says_per_cell_whether_the_kernel_accepted_its_modules():
    """The JSON report's boot_test per cell: a build's boot test (its result), a registry's image
    label (a cell not built again), or None when it was not boot-tested."""
    verdict = {"verdict": "accepted", "kernel": "6.1.0-56-amd64", "accelerator": "tcg", "modules": []}
    built = Outcome(JOB, "built", result={"driver_version": "535.261.03", "boot_test": verdict})
    held = Outcome(JOB, "in-registry", result={"boot_test": "rejected by 6.1.0-56-amd64 (tcg)"})
    untested = Outcome(JOB, "cached", result={"driver_version": "535.261.03", "boot_test": None})
    cells = MatrixResult(backend="local", registry=None, outcomes=[built, held, untested]).to_json()["cells"]
    assert [c["boot_test"] for c in cells] == ["accepted by 6.1.0-56-amd64 (tcg)", "rejected by 6.1.0-56-amd64 (tcg)",
                                               None]


class _HungSwarm:
    """An engine (cudabuild/engine.py's Swarm methods) whose one task runs for ever; what run_swarm
    asks of it, recorded."""

    def __init__(self):
        self.removed, self.created = [], []

    def create_job_service(self, **kw):
        self.created.append(kw)
        return "svc1"

    def service_tasks(self, service_id):
        return [{"CreatedAt": "1", "NodeID": "n1", "Status": {"State": "running"}}]

    def node(self, node_id):
        return {"Status": {"State": "ready"}}

    def service_logs(self, service_id, *, stderr):
        return b"==> make modules\n" if stderr else b""

    def remove_service(self, service_id):
        self.removed.append(service_id)


def test_a_swarm_job_past_its_time_limit_is_failed_and_removed(tmp_path):
    swarm, states = _HungSwarm(), []
    place = backends.SwarmPlace(image="127.0.0.1:5055/cudabuild/cudabuild:0.1.0", socket="/var/run/docker.sock",
                                cache_paths=("/var/cache/cudabuild",), cache="/var/cache/cudabuild")
    [outcome] = backends.run_swarm(swarm, [JOB], place=place, parallel=1, logs=tmp_path, run_id="r1", timeout=0,
                                   poll=0, on_state=lambda job, state, detail: states.append(state))
    assert outcome.state == "failed" and outcome.error == "it did not finish within 0 s"
    assert swarm.removed == ["svc1"] and states == ["queued"]
    [created] = swarm.created
    assert created["binds"] == [("/var/cache/cudabuild", "/var/cache/cudabuild"),
                                ("/var/run/docker.sock", "/var/run/docker.sock")]
    assert created["env"]["CUDABUILD_CACHE"] == "/var/cache/cudabuild"


def test_kubernetes_jobs_validate_strictly_against_1_30():
    [job] = backends.kubernetes_jobs([JOB], image="127.0.0.1:5055/cudabuild/cudabuild:0.1.0",
                                     cache="/var/cache/cudabuild")
    kubernetes_validate.validate(job, "1.30.0", strict=True)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == list(JOB.argv)
    assert {"name": "CUDABUILD_CACHE", "value": "/var/cache/cudabuild"} in container["env"]
    volumes = {v["name"]: v["hostPath"] for v in job["spec"]["template"]["spec"]["volumes"]}
    assert volumes["cache"]["path"] == "/var/cache/cudabuild"  # the same path on the node and inside
    assert job["spec"]["backoffLimit"] == 0


def test_debian_codename_expands_to_every_amd64_abi():
    releases = {"bookworm": ["6.1.0-56-amd64", "6.1.0-56-cloud-amd64", "6.1.0-55-amd64", "6.1.0-56-rt-amd64"],
                "trixie": ["6.12.117+deb13-amd64", "6.12.117+deb13-cloud-amd64", "6.12.115+deb13.1-amd64",
                           "6.12.115+deb13-rt-amd64"]}
    asked = []

    def archive_for(codename):
        def kernel_releases(*, backports=True):
            asked.append(backports)
            return releases[codename]
        return SimpleNamespace(kernel_releases=kernel_releases)

    assert expand_kernels("debian:bookworm,6.1.0-56-amd64,4.3.6-coreos", archive_for) == \
        ["6.1.0-56-amd64", "6.1.0-55-amd64", "4.3.6-coreos"]
    # trixie's releases (UPSTREAM+debN[.ABI]-FLAVOUR), the amd64 flavour only, never backports'
    assert expand_kernels("debian:trixie", archive_for) == ["6.12.117+deb13-amd64", "6.12.115+deb13.1-amd64"]
    assert asked == [False, False]
    with pytest.raises(InputError, match="names nothing"):
        expand_kernels(" , ", archive_for)


@pytest.mark.parametrize("kwargs, message", [
    ({"drivers": ["53x"]}, "driver version"), ({"flavors": ["closed"]}, "not a flavor"),
    ({"parallel": 0}, "--parallel 0"), ({"node_cache": "cache"}, "absolute path")])
def test_matrix_requests_are_checked(kwargs, message):
    values = {"kernels": ["6.1.0-56-amd64"], "drivers": ["535"], "flavors": ["proprietary"], **kwargs}
    with pytest.raises(InputError, match=message):
        MatrixRequest(**values)


def saved_image(tmp_path, members: list[tuple[tarfile.TarInfo, bytes]]):
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    path = tmp_path / "saved.tar"
    with tarfile.open(path, "w") as saved:
        for name, data in (("manifest.json", json.dumps([{"Layers": ["layer.tar"]}]).encode()),
                           ("layer.tar", layer.getvalue())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            saved.addfile(info, io.BytesIO(data))
    return path


def member(name, data=b"x", kind=tarfile.REGTYPE, link=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(data) if kind == tarfile.REGTYPE else 0
    return info, data


@pytest.mark.parametrize("bad", [member("modules/../../etc/passwd"), member("userspace/lib/x", kind=tarfile.SYMTYPE,
                                                                             link="/etc/shadow"),
                                 member("modules/nvidia.ko", kind=tarfile.CHRTYPE)])
def test_a_saved_image_with_hostile_members_is_refused(tmp_path, bad):
    saved = saved_image(tmp_path, [member("manifest.json", b"{}"), bad])
    with pytest.raises(VerifyError, match="never writes"):
        unpack_image(saved, tmp_path / "out")
    assert not (tmp_path / "etc").exists()


def test_a_saved_image_keeps_only_the_artifacts_parts(tmp_path):
    saved = saved_image(tmp_path, [member("manifest.json", b"{}"), member("modules/nvidia.ko", b"ELF"),
                                   member("etc/motd", b"hello")])
    unpack_image(saved, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.json", "modules"]


@pytest.mark.parametrize("where", ["tcp://build-host.example:2376", "ssh://me@build-host"])
def test_a_remote_engine_is_refused_before_a_build(where):
    with pytest.raises(InputError, match="another machine.*Nothing was started"):
        Engine(client=None, where=where).require_shared_files()


@pytest.mark.parametrize("where", ["unix:///var/run/docker.sock", "tcp://127.0.0.1:2375", "tcp://localhost:2375"])
def test_a_local_engine_is_used(where):
    assert Engine(client=None, where=where).require_shared_files() is None  # no refusal: the build may start


def test_owners_in_another_pid_namespace_are_never_reaped():
    assert pid_alive(2**22 + 1, pid_namespace() + 1) is True  # a container's cudabuild: its pids are not ours
    assert pid_alive(2**22 + 1, pid_namespace()) is False


def test_test_modules_have_unique_names():
    """pytest imports test files by their base name (no __init__.py): a second test_x.py in another
    directory stops the whole collection, so CI would run nothing."""
    from collections import Counter
    from pathlib import Path

    names = Counter(p.name for p in Path(__file__).resolve().parents[1].rglob("test_*.py"))
    assert [name for name, count in names.items() if count > 1] == []
