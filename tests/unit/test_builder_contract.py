"""The builder container's contract (cudabuild/compile/contract.py) against the scripts that read it:
every variable a builder script reads is a field of BuilderEnv or one the scripts set themselves, every
field is read by some script, and the step marker is the one lib.sh prints."""

from __future__ import annotations

import re

from cudabuild.compile.contract import STEP_MARK, BuilderEnv
from tests.helpers import REPO

SCRIPTS = sorted((REPO / "builder").glob("*.sh"))
_READ = re.compile(r"\$\{?([A-Z][A-Z0-9_]*)")
_SET = re.compile(r"^\s*(?:export\s+)?([A-Z][A-Z0-9_]*)=", re.MULTILINE)


def test_every_variable_a_script_reads_is_in_the_contract():
    assert SCRIPTS, "builder/*.sh"
    read = {name for path in SCRIPTS for name in _READ.findall(path.read_text())}
    set_here = {name for path in SCRIPTS for name in _SET.findall(path.read_text())}
    unknown = read - set_here - BuilderEnv.variables()
    assert not unknown, f"builder scripts read {sorted(unknown)}, which BuilderEnv does not have"


def test_every_field_of_the_contract_is_read_by_a_script():
    read = {name for path in SCRIPTS for name in _READ.findall(path.read_text())}
    unread = BuilderEnv.variables() - read
    assert not unread, f"BuilderEnv has {sorted(unread)}, which no builder script reads"


def test_to_env_gives_every_variable_and_merged_keeps_what_each_part_sets():
    kernel = BuilderEnv(kernel_source="git", kernel_suffix="-x")
    driver = BuilderEnv(driver_source="run")
    env = BuilderEnv().merged(kernel, driver, jobs="2").to_env()
    assert set(env) == BuilderEnv.variables()  # unset ones are empty, not missing (set -u)
    assert (env["KERNEL_SOURCE"], env["KERNEL_SUFFIX"], env["DRIVER_SOURCE"], env["JOBS"]) == ("git", "-x", "run", "2")
    assert env["WORK"] == "/cudabuild/work" and env["KERNEL_DEBS"] == ""


def test_the_step_marker_is_the_one_lib_sh_prints():
    assert f'echo "{STEP_MARK}$1"' in (REPO / "builder" / "lib.sh").read_text()


def test_a_make_failure_from_a_kernel_api_the_driver_predates_names_it_and_a_driver_that_knows_it():
    from cudabuild.compile.builder import _failure_hint

    tail = ["/cudabuild/work/driver/modules/nvidia-open-kernel/nvidia/nv-pci.c:237:9: error: too few arguments to "
            "function 'pci_resize_resource'; expected 4, have 3", "make[4]: *** [...] Error 1"]
    hint = _failure_hint("make modules", tail)
    assert "predate this kernel's API (too few arguments to function pci_resize_resource)" in hint
    assert "--driver-source run --driver 580.142" in hint
    assert "newer --driver" in _failure_hint("make modules", ["error: something else"])
