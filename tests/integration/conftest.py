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
    """Names of cudabuild builder containers; a test asserts none is left behind."""
    def names():
        return [c.name for c in docker_client.containers.list(all=True, filters={"label": "io.cudabuild.role=builder"})]
    return names
