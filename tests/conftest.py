"""Markers by what a test uses: every test that needs the engine fixture (directly or through
another fixture) is marked `engine`, so `-m engine` / `-m "not engine"` select what they say."""

import pytest


def pytest_collection_modifyitems(items):
    for item in items:
        if "docker_client" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.engine)
