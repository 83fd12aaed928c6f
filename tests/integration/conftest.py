import os

import docker
import pytest

from tests.helpers import FileServer


@pytest.fixture(scope="session")
def docker_client():
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        pytest.fail(f"integration tests need a running Docker engine (run `bash scripts/setup`): {exc}")
    return client


@pytest.fixture
def http_server():
    with FileServer() as server:
        yield server


@pytest.fixture
def builder_containers(docker_client):
    """Names of the builder containers this process's cudabuild made (the CLI run in-process, by
    its io.cudabuild.pid label: the suite's background builds run beside it); a test asserts none
    is left behind."""
    def names():
        mine = ["io.cudabuild.role=builder", f"io.cudabuild.pid={os.getpid()}"]
        return [c.name for c in docker_client.containers.list(all=True, filters={"label": mine})]
    return names
