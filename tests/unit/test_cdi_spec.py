"""CDI edits: which a selection gets, and how `cudabuild run` hands them to docker run."""

import json

import pytest

from cudabuild.cdi import spec as cdi
from cudabuild.cdi.run import docker_arguments
from cudabuild.errors import InputError

SPEC = {
    "cdiVersion": "0.3.0", "kind": "nvidia.com/gpu",
    "devices": [{"name": "0", "containerEdits": {"deviceNodes": [{"path": "/dev/nvidia0", "type": "c", "major": 195,
                                                                   "minor": 0}]}},
                {"name": "GPU-a", "containerEdits": {"deviceNodes": [{"path": "/dev/nvidia0", "type": "c",
                                                                       "major": 195, "minor": 0}]}},
                {"name": "1", "containerEdits": {"deviceNodes": [{"path": "/dev/nvidia1", "hostPath": "/h/dev/nvidia1",
                                                                   "type": "c", "major": 195, "minor": 1}]}},
                {"name": "GPU-b", "containerEdits": {"deviceNodes": [{"path": "/dev/nvidia1", "hostPath":
                                                                       "/h/dev/nvidia1", "type": "c", "major": 195,
                                                                       "minor": 1}]}}],
    "containerEdits": {"env": ["NVIDIA_DRIVER_VERSION=535.309.01"],
                       "deviceNodes": [{"path": "/dev/nvidiactl", "type": "c", "major": 195, "minor": 255}],
                       "mounts": [{"hostPath": "/run/x/libcuda.so.535", "containerPath": "/usr/lib/libcuda.so.1",
                                   "options": ["ro", "nosuid", "nodev", "bind"]}]},
}


@pytest.fixture
def spec_dir(tmp_path):
    (tmp_path / "nvidia.json").write_text(json.dumps(SPEC))
    return [tmp_path]


def test_a_gpu_gets_its_node_and_the_shared_edits_once(spec_dir):
    edits = cdi.edits_for(spec_dir, ["1", "GPU-b"])
    assert [n["path"] for n in edits["deviceNodes"]] == ["/dev/nvidiactl", "/dev/nvidia1"]
    assert docker_arguments(edits) == ["--device", "/dev/nvidiactl:/dev/nvidiactl", "--device",
                                       "/h/dev/nvidia1:/dev/nvidia1", "-v",
                                       "/run/x/libcuda.so.535:/usr/lib/libcuda.so.1:ro",
                                       "-e", "NVIDIA_DRIVER_VERSION=535.309.01"]


def test_none_gets_the_driver_without_a_gpu(spec_dir):
    edits = cdi.edits_for(spec_dir, [])
    assert [n["path"] for n in edits["deviceNodes"]] == ["/dev/nvidiactl"] and edits["mounts"]


def test_unknown_devices_and_hooks_are_refused(spec_dir, tmp_path):
    with pytest.raises(InputError, match="no device nvidia.com/gpu=7; they have: 0, 1, GPU-a, GPU-b"):
        cdi.edits_for(spec_dir, ["7"])
    with pytest.raises(InputError, match="no CDI spec of kind nvidia.com/gpu"):
        cdi.edits_for([tmp_path / "empty"], ["0"])
    with pytest.raises(InputError, match="hooks"):
        docker_arguments({"hooks": [{"hookName": "createContainer", "path": "/bin/true"}]})


def test_the_spec_names_gpus_by_index_and_uuid(spec_dir):
    assert [(g.index, g.minor, g.uuid) for g in cdi.gpus_in_spec(spec_dir)] == [(0, 0, "GPU-a"), (1, 1, "GPU-b")]
