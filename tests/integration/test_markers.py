"""The suite's markers select what they say (a marker in a conftest.py selects nothing)."""

import subprocess
import sys

from tests.helpers import REPO


def collected(*args: str) -> list[str]:
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                         cwd=REPO, capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if "::" in line]


def test_engine_marker_selects_the_tests_that_use_the_engine():
    engine = collected("-m", "engine", "tests/integration")
    assert any("test_image.py" in t for t in engine) and any("test_engine.py" in t for t in engine)
    assert not any("test_loader.py" in t for t in engine), "the loader's tests need no engine"
    assert collected("-m", "not engine", "tests/unit") == collected("tests/unit")
