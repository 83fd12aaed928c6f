"""Unit tests run with no engine and no processes: anything that tries to reach one fails loudly."""

import subprocess

import docker
import pytest


class _Forbidden(AssertionError):
    pass


@pytest.fixture(autouse=True)
def mock_protection(monkeypatch):
    def refuse(*args, **kwargs):
        raise _Forbidden(f"unit tests must not run processes or reach an engine: {args[:1]}")

    for name in ("run", "Popen", "call", "check_call", "check_output"):
        monkeypatch.setattr(subprocess, name, refuse)
    monkeypatch.setattr(docker, "from_env", refuse)
    monkeypatch.setattr(docker, "DockerClient", refuse)
    monkeypatch.setattr(docker.APIClient, "__init__", refuse)
