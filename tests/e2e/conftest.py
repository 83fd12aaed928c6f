"""The e2e tests' own fixtures; the session's builds and servers are in tests/conftest.py."""

import pytest


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A real registry (Debian's docker-registry) on 127.0.0.1, its own per test module."""
    from tests.registry import LocalRegistry

    with LocalRegistry(tmp_path_factory.mktemp("registry")) as running:
        yield running
