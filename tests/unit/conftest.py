"""Unit tests run with no engine and no processes: anything that tries to reach one fails loudly."""

import subprocess
import threading

import docker
import pytest


class _Forbidden(AssertionError):
    pass


@pytest.fixture(autouse=True)
def mock_protection(monkeypatch):
    """Refuses in the test's own thread; the suite's background builds (tests/background.py, in
    threads of their own) run processes while the unit tests run, and keep doing so."""
    def refusing(name, original):
        def refuse(*args, **kwargs):
            if threading.current_thread() is not threading.main_thread():
                return original(*args, **kwargs)
            raise _Forbidden(f"unit tests must not run processes or reach an engine: {name} {args[:1]}")
        return refuse

    for name in ("run", "Popen", "call", "check_call", "check_output"):
        monkeypatch.setattr(subprocess, name, refusing(name, getattr(subprocess, name)))
    monkeypatch.setattr(docker, "from_env", refusing("docker.from_env", docker.from_env))
    monkeypatch.setattr(docker, "DockerClient", refusing("docker.DockerClient", docker.DockerClient))
    monkeypatch.setattr(docker.APIClient, "__init__", refusing("docker.APIClient", docker.APIClient.__init__))
