import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def fresh_cache(tmp_path_factory) -> Path:
    """A new cache for this run: results must be built, not found. Downloaded packages (checked
    by sha256 against Debian's index) are shared between runs to spare the mirror."""
    cache = tmp_path_factory.mktemp("cache")
    shared = Path(os.environ.get("CUDABUILD_TEST_DOWNLOADS", Path.home() / ".cache" / "cudabuild-test-downloads"))
    shared.mkdir(parents=True, exist_ok=True)
    (cache / "downloads").symlink_to(shared, target_is_directory=True)
    return cache
