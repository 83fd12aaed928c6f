"""cudabuild-runtime's Python side: what it takes out of runc's arguments, what it edits, and that
its shell front end (bin/cudabuild-runtime) knows the same options."""

import re

from cudabuild.cdi.runtime import OUR_OPTIONS, apply_edits, bundle_of, command_of, split
from tests.helpers import REPO

SHIM = ["--root", "/run/docker/runtime-runc/moby", "--log", "/run/x/log.json", "--log-format", "json", "create",
        "--bundle", "/run/x/bundle", "--pid-file", "/run/x/pid", "abc123"]


def test_our_options_are_taken_out_and_runcs_command_found():
    ours, rest = split(["--cdi-spec-dir", "/a", "--cdi-spec-dir=/b", "--runtime-path", "/usr/sbin/runc", *SHIM])
    assert ours == {"cdi_spec_dirs": ["/a", "/b"], "runtime_path": "/usr/sbin/runc"} and rest == SHIM
    command, at = command_of(rest)
    assert command == "create" and bundle_of(rest, at) == "/run/x/bundle"
    assert command_of(["--root", "/x", "start", "abc"])[0] == "start"


def test_the_shell_front_end_knows_the_same_options():
    front = (REPO / "bin" / "cudabuild-runtime").read_text()
    assert set(re.findall(r"--(?:cdi-spec-dir|runtime-path|runtime-log)", front)) == set(OUR_OPTIONS)


def test_edits_go_into_the_oci_spec_with_the_cgroup_rule_that_allows_them():
    spec = {"process": {"env": ["PATH=/bin", "NVIDIA_VISIBLE_DEVICES=1"]}, "mounts": [], "linux": {}}
    apply_edits(spec, {"deviceNodes": [{"path": "/dev/nvidia1", "hostPath": "/h/dev/nvidia1", "type": "c",
                                        "major": 195, "minor": 1}],
                       "mounts": [{"hostPath": "/h/libcuda.so.535", "containerPath": "/usr/lib/libcuda.so.1",
                                   "options": ["ro", "nosuid", "nodev", "bind"]}],
                       "env": ["NVIDIA_DRIVER_VERSION=535.309.01"],
                       "hooks": [{"hookName": "createContainer", "path": "/bin/true", "args": ["true"]}]})
    assert spec["linux"]["devices"] == [{"path": "/dev/nvidia1", "type": "c", "major": 195, "minor": 1,
                                         "fileMode": 0o666, "uid": 0, "gid": 0}]
    assert spec["linux"]["resources"]["devices"] == [{"allow": True, "type": "c", "major": 195, "minor": 1,
                                                      "access": "rwm"}]
    assert spec["mounts"] == [{"destination": "/usr/lib/libcuda.so.1", "source": "/h/libcuda.so.535", "type": "bind",
                               "options": ["ro", "nosuid", "nodev", "bind"]}]
    assert "NVIDIA_DRIVER_VERSION=535.309.01" in spec["process"]["env"]
    assert spec["hooks"] == {"createContainer": [{"path": "/bin/true", "args": ["true"]}]}
