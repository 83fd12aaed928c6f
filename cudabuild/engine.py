"""The Docker engine behind one small class. Nothing else in cudabuild imports `docker`.

The engine is found the way the docker CLI finds it (DOCKER_HOST, DOCKER_TLS_VERIFY,
DOCKER_CERT_PATH, from the command's Settings), so a remote engine needs no flag of ours."""

from __future__ import annotations

import http.client
import json
import os
import secrets
import socket
import urllib.parse
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from cudabuild.artifact import LABEL_PREFIX
from cudabuild.store.cache import pid_alive, pid_namespace
from cudabuild.errors import LOG_TAIL_LINES, BuildError, EngineError, InputError, RegistryError, shown
from cudabuild.lazy import lazy_import

# Loaded at first use: a cache hit asks the engine a few questions about images, which the local
# socket answers over plain HTTP (LocalSocket) in less time than the SDK takes to import.
docker = lazy_import("docker")
requests = lazy_import("requests")

# Later requests may take as long as an image build step (the first one's limit is a setting:
# settings.ENGINE_ANSWER_TIMEOUT, CUDABUILD_ENGINE_TIMEOUT).
OPERATION_TIMEOUT = 600

ENGINE_HINT = ("start the engine (`sudo dockerd &`, `sudo systemctl start docker`, or `bash scripts/setup`), "
               "or point DOCKER_HOST at a running one")


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool = True


class Container:
    """A started container; the engine removes it when the `with` block ends."""

    def __init__(self, container) -> None:
        self._container = container
        self.name = container.name

    def lines(self) -> Iterator[str]:
        """Its output (stdout and stderr), line by line, until it exits."""
        buffer = b""
        try:
            for chunk in self._container.logs(stream=True, follow=True):
                buffer += chunk
                *complete, buffer = buffer.split(b"\n")
                for line in complete:
                    yield line.decode("utf-8", "replace")
        except (docker.errors.APIError, requests.RequestException, OSError) as exc:
            raise _lost(self.name, exc) from exc
        if buffer:
            yield buffer.decode("utf-8", "replace")

    def wait(self) -> int:
        try:
            return int(self._container.wait()["StatusCode"])
        except (docker.errors.APIError, requests.RequestException, OSError) as exc:
            raise _lost(self.name, exc) from exc


def _lost(name: str, exc: BaseException) -> EngineError:
    return EngineError(f"lost the Docker engine while {name} was running ({_short(exc)}); nothing was published",
                       hint="check that the engine is running and run again: the build starts over cleanly, and "
                       "the abandoned builder container is removed by the next run")


class LocalSocket:
    """Read-only questions (GET) to an engine on a local Unix socket, with the standard library."""

    def __init__(self, path: str, timeout: float) -> None:
        self.path, self.timeout = path, timeout

    def get(self, path: str) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("localhost", timeout=self.timeout)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.path)
            connection.sock = sock
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()
            sock.close()


class Engine:
    def __init__(self, client, where: str = "unix:///var/run/docker.sock", *,
                 local: LocalSocket | None = None, connect: Callable[[], object] | None = None) -> None:
        self._client = client
        self._connect = connect  # makes the SDK's client when `client` is first asked for
        self.local = local  # answers image questions without the SDK, on a local socket
        self.where = where  # DOCKER_HOST, or the local socket

    @property
    def client(self):
        """The docker SDK's client (made at first use)."""
        if self._client is None and self._connect is not None:
            self._client = self._connect()
        return self._client

    @classmethod
    def connect(cls, env: Mapping[str, str], *, answer_timeout: float) -> "Engine":
        """The engine the docker SDK's variables in `env` name (the local socket without them),
        once it has answered within `answer_timeout` seconds. Use Settings.engine()."""
        env, answer = dict(env), answer_timeout
        where = env.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        if where.startswith("unix://") and not env.get("DOCKER_TLS_VERIFY") and not env.get("DOCKER_CERT_PATH"):
            local = LocalSocket(where[len("unix://"):], answer)
            try:
                status, _ = local.get("/_ping")
            except (OSError, http.client.HTTPException) as exc:
                raise _not_answering(where, answer, exc) from exc
            if status != 200:
                raise EngineError(f"the Docker engine at {shown(where)} does not answer (its ping said HTTP "
                                  f"{status})", hint=ENGINE_HINT)
            local.timeout = OPERATION_TIMEOUT
            return cls(None, where, local=local, connect=lambda: _sdk_client(env, where, answer, ping=False))
        return cls(_sdk_client(env, where, answer), where)

    # ---- images ----------------------------------------------------------------------------
    def image_id(self, ref: str) -> str | None:
        found = self.inspect_image(ref)
        return found["Id"] if found else None

    def image(self, ref: str) -> dict:
        """The engine's inspect data of an image."""
        found = self.inspect_image(ref)
        if found is None:
            raise EngineError(f"image {ref} does not exist in the engine", hint="build it first, or check the name")
        return found

    def inspect_image(self, ref: str) -> dict | None:
        """The inspect data of an image, None when the engine has no such image."""
        if self.local is None:
            return self._sdk_inspect(self.client.api.inspect_image, ref, f"image {ref}")
        return self._local_json(f"/images/{urllib.parse.quote(ref, safe='/:@')}/json", f"image {ref}")

    @staticmethod
    def _sdk_inspect(ask: Callable[[str], dict], ref: str, what: str) -> dict | None:
        """The SDK's inspect of `ref` (an image's or a container's), None when the engine has none."""
        try:
            return ask(ref)
        except docker.errors.NotFound:
            return None
        except (docker.errors.APIError, requests.RequestException) as exc:
            raise EngineError(f"cannot inspect {what}: {_short(exc)}", hint=ENGINE_HINT) from exc

    def _local_json(self, path: str, what: str) -> dict | None:
        """GET `path` on the local socket: its JSON, None for a 404."""
        try:
            status, body = self.local.get(path)
        except (OSError, http.client.HTTPException) as exc:
            raise EngineError(f"cannot inspect {what}: {_short(exc)}", hint=ENGINE_HINT) from exc
        if status == 404:
            return None
        if status != 200:
            raise EngineError(f"cannot inspect {what}: the engine said HTTP {status} "
                              f"({body[:200].decode('utf-8', 'replace').strip()})", hint=ENGINE_HINT)
        return json.loads(body)

    def pull(self, ref: str) -> str | None:
        """Pull `ref`; None when no registry has it or none can be reached."""
        try:
            self.client.api.pull(ref)  # blocks until done; the repository:tag form pulls one tag
        except (docker.errors.APIError, requests.RequestException):
            return None
        return self.image_id(ref)

    def ensure_image(self, ref: str, *, what: str, hint: str) -> dict:
        """The inspect data of `ref`: present in the engine, else pulled, else an EngineError."""
        if self.image_id(ref) is None and self.pull(ref) is None:
            raise EngineError(f"the {what} {ref} is not in the engine and cannot be pulled",
                              hint=f"pull or load it (`docker pull {ref}`), {hint}")
        return self.image(ref)

    def build(self, *, context: IO[bytes], tag: str, labels: Mapping[str, str] | None = None,
              on_line: Callable[[str], None] = lambda line: None, network: str = "host") -> str:
        """Build from a tar context; stream the classic builder's output to `on_line`. The image
        the tag named before, when the build leaves it without a tag, is removed."""
        tail: list[str] = []
        image_id = None
        previous = self.image_id(tag)
        try:
            stream = self.client.api.build(fileobj=context, custom_context=True, tag=tag, rm=True,
                                           forcerm=True, network_mode=network, labels=dict(labels or {}),
                                           decode=True)
            for chunk in stream:
                if "stream" in chunk:
                    for line in chunk["stream"].splitlines():
                        tail = (tail + [line])[-LOG_TAIL_LINES:]
                        on_line(line)
                if "aux" in chunk and "ID" in chunk["aux"]:
                    image_id = chunk["aux"]["ID"]
                if "error" in chunk:
                    raise BuildError(f"building image {tag} failed: {chunk['error'].strip()}",
                                     log_tail="\n".join(tail),
                                     hint="read the output above; a package mirror may be unreachable")
        except docker.errors.APIError as exc:
            raise EngineError(f"the engine refused to build {tag}: {_short(exc)}", hint=ENGINE_HINT) from exc
        except requests.RequestException as exc:
            raise EngineError(f"lost the engine while building {tag}: {_short(exc)}", hint=ENGINE_HINT) from exc
        image_id = image_id or self.image(tag)["Id"]
        if previous and previous != image_id:
            self._remove_if_dangling(previous)
        return image_id

    def load(self, archive: Path, *, tag: str) -> str:
        """`docker load` of an image archive made by cudabuild (artifact/image.py) naming `tag`; the
        image the tag named before, when this leaves it without a tag, is removed."""
        previous = self.image_id(tag)
        try:
            with open(archive, "rb") as data:
                for _ in self.client.api.load_image(data, quiet=True):
                    pass
        except docker.errors.APIError as exc:
            raise EngineError(f"the engine refused to load {tag}: {_short(exc)}", hint=ENGINE_HINT) from exc
        except requests.RequestException as exc:
            raise EngineError(f"lost the engine while loading {tag}: {_short(exc)}", hint=ENGINE_HINT) from exc
        image_id = self.image(tag)["Id"]
        if previous and previous != image_id:
            self._remove_if_dangling(previous)
        return image_id

    def _remove_if_dangling(self, image_id: str) -> None:
        try:
            if not self.client.api.inspect_image(image_id).get("RepoTags"):
                self.client.api.remove_image(image_id, noprune=False)
        except (docker.errors.APIError, requests.RequestException):
            pass  # still used by a container or another image: the engine keeps it

    def push(self, image: str, ref: str) -> None:
        """Tag `image` as `ref` and push it; a RegistryError says why the registry would not take it."""
        repository, _, tag = ref.rpartition(":")
        hint = "check that the registry runs and accepts pushes (`docker login` for one that asks)"
        try:
            self.client.api.tag(image, repository, tag)
            for chunk in self.client.api.push(repository, tag=tag, stream=True, decode=True):
                if "error" in chunk:
                    raise RegistryError(f"the registry refused the push of {ref}: {shown(chunk['error'].strip())}",
                                        hint=hint, exit_code=RegistryError.PUSH_REFUSED)
        except (docker.errors.APIError, requests.RequestException) as exc:
            raise RegistryError(f"pushing {ref} failed: {_short(exc)}", hint=hint,
                                exit_code=RegistryError.PUSH_REFUSED) from exc
        finally:
            self.untag(ref)

    def untag(self, ref: str) -> None:
        """Remove the name `ref`, never an image another name still holds."""
        try:
            self.client.api.remove_image(ref, noprune=False)
        except (docker.errors.APIError, requests.RequestException):
            pass  # not there, or the image's only name and in use: left as it is

    def require_shared_files(self) -> None:
        """A build bind-mounts this machine's cache into its containers: the engine must run here."""
        scheme, _, rest = self.where.partition("://")
        host = rest.rsplit("@", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0].strip("[]")
        if scheme in ("unix", "npipe", "") or host in ("127.0.0.1", "localhost", "::1"):
            return
        raise InputError(f"DOCKER_HOST {shown(self.where)} is an engine on another machine: a build bind-mounts "
                         "this machine's cache (downloads, kernel trees, its work directory) into its containers, "
                         "which that engine cannot see. Nothing was started",
                         hint="run cudabuild on that machine, unset DOCKER_HOST, or build there with cudabuild "
                              "matrix --backend swarm (each node runs cudabuild beside its own engine)")

    def tagged(self, label: str) -> list[str]:
        """The tags of the images carrying `label` (key or key=value)."""
        try:
            return sorted(tag for image in self.client.images.list(filters={"label": label}) for tag in image.tags)
        except (docker.errors.APIError, requests.RequestException) as exc:
            raise EngineError(f"cannot list images: {_short(exc)}", hint=ENGINE_HINT) from exc

    def remove_image(self, ref: str) -> None:
        try:
            self.client.images.remove(ref, force=True)
        except docker.errors.ImageNotFound:
            pass

    def save(self, ref: str) -> Iterator[bytes]:
        return self.client.images.get(ref).save(named=False)

    # ---- containers ------------------------------------------------------------------------
    @contextmanager
    def container(self, *, image: str, command: list[str], mounts: list[Mount] = (),
                  environment: Mapping[str, str] | None = None, name_prefix: str = "cudabuild",
                  user: str | None = None, network: str = "none", labels: Mapping[str, str] | None = None,
                  keep: bool = False) -> Iterator[Container]:
        """Create and start a container; remove it when the block ends, however it ends.

        With `keep` a container whose block failed is left for debugging, and its name is
        reported. It runs with no capabilities and cannot gain privileges (setuid programs)."""
        name = f"{name_prefix}-{secrets.token_hex(4)}"
        owner = {f"{LABEL_PREFIX}.pid": str(os.getpid()), f"{LABEL_PREFIX}.pidns": str(pid_namespace()),
                 f"{LABEL_PREFIX}.host": socket.gethostname(),
                 f"{LABEL_PREFIX}.kept": "1" if keep else "0"}
        volumes = {m.source: {"bind": m.target, "mode": "ro" if m.read_only else "rw"} for m in mounts}
        try:
            container = self.client.containers.create(
                image, command=command, name=name, volumes=volumes, environment=dict(environment or {}),
                user=user, network_mode=network,
                labels={f"{LABEL_PREFIX}.role": "builder", **owner, **(labels or {})},
                working_dir="/", detach=True, cap_drop=["ALL"], security_opt=["no-new-privileges"])
        except (docker.errors.APIError, requests.RequestException) as exc:
            raise EngineError(f"cannot create a container from {image}: {_short(exc)}", hint=ENGINE_HINT) from exc
        failed = False
        try:
            container.start()
            yield Container(container)
        except BaseException:
            failed = True
            raise
        finally:
            if failed and keep:
                try:
                    container.stop(timeout=1)
                except Exception:  # noqa: BLE001 - best effort: the container may already be gone
                    pass
                print(f"kept the failed builder container {name} for debugging: docker commit {name} debug && "
                      f"docker run -it --rm debug sh; docker rm {name} when done", file=sys.stderr)
            else:
                try:
                    container.remove(force=True)
                except (docker.errors.APIError, requests.RequestException):
                    pass

    def inspect_container(self, ref: str) -> dict | None:
        """The engine's inspect data of a container (by id or name), None when it has none such."""
        if self.local is None:
            return self._sdk_inspect(self.client.api.inspect_container, ref, f"container {ref}")
        return self._local_json(f"/containers/{urllib.parse.quote(ref, safe='')}/json", f"container {ref}")

    def stop_container(self, ref: str, *, timeout: int) -> None:
        """Stop a running container (SIGTERM, then SIGKILL after `timeout` s), as `docker stop`."""
        try:
            self.client.api.stop(ref, timeout=timeout)
        except (docker.errors.APIError, requests.RequestException) as exc:
            raise EngineError(f"cannot stop container {ref}: {_short(exc)}", hint=ENGINE_HINT) from exc

    def start_container(self, ref: str) -> None:
        try:
            self.client.api.start(ref)
        except (docker.errors.APIError, requests.RequestException) as exc:
            raise EngineError(f"cannot start container {ref}: {_short(exc)}",
                              hint=f"start it by hand: docker start {ref}") from exc

    def containers(self, *, label: str) -> list[str]:
        """Names of containers (running or not) carrying `label`."""
        return [c.name for c in self.client.containers.list(all=True, filters={"label": label})]

    def reap_builders(self) -> tuple[list[str], int]:
        """Remove builder containers whose cudabuild process on this host is gone (killed, say);
        return their names and how many builders are still in use by live processes."""
        reaped, alive = [], 0
        host = socket.gethostname()
        for c in self.client.containers.list(all=True, filters={"label": f"{LABEL_PREFIX}.role=builder"}):
            labels = c.labels
            if labels.get(f"{LABEL_PREFIX}.host") != host or not labels.get(f"{LABEL_PREFIX}.pid", "").isdigit():
                continue
            namespace = labels.get(f"{LABEL_PREFIX}.pidns", "")
            if pid_alive(int(labels[f"{LABEL_PREFIX}.pid"]), int(namespace) if namespace.isdigit() else None):
                alive += 1
                continue
            if labels.get(f"{LABEL_PREFIX}.kept") == "1":
                continue  # the user asked to keep it for debugging
            try:
                c.remove(force=True)
                reaped.append(c.name)
            except docker.errors.APIError:
                pass
        return reaped, alive


    # ---- Swarm: a build as a replicated job (cudabuild/compile/backends.py) ---------------------
    def swarm_state(self) -> dict:
        """This engine's Swarm: LocalNodeState, ControlAvailable, ... ({} when it has none)."""
        return self.client.info().get("Swarm") or {}

    def create_job_service(self, *, image: str, args: list[str], name: str, binds: list[tuple[str, str]],
                           env: Mapping[str, str], labels: Mapping[str, str]) -> str:
        """A replicated-job service that runs once (no restart) on the host network, with each
        (source, target) of `binds` bind-mounted; its id."""
        import docker.types

        mounts = [docker.types.Mount(target=target, source=source, type="bind") for source, target in binds]
        service = self.client.services.create(
            image, args=list(args), name=name, mode=docker.types.ServiceMode("replicated-job"), networks=["host"],
            mounts=mounts, env=[f"{k}={v}" for k, v in sorted(env.items())],
            restart_policy=docker.types.RestartPolicy(condition="none"), labels=dict(labels))
        return service.id

    def service_tasks(self, service_id: str) -> list[dict]:
        return self.client.api.tasks(filters={"service": service_id})

    def node(self, node_id: str) -> dict:
        return self.client.api.inspect_node(node_id)

    def service_logs(self, service_id: str, *, stderr: bool) -> bytes:
        """A service's standard output, or its standard error, as far as it goes now."""
        raw = self.client.api.service_logs(service_id, follow=False, stdout=not stderr, stderr=stderr)
        return raw if isinstance(raw, bytes) else b"".join(raw)

    def remove_service(self, service_id: str) -> None:
        """Remove a service; one already gone is no error."""
        try:
            self.client.api.remove_service(service_id)
        except (docker.errors.APIError, requests.RequestException):
            pass


def _sdk_client(env: dict, where: str, answer: float, *, ping: bool = True):
    """The docker SDK's client for `where`, once the engine has answered within `answer` seconds
    (it asks the engine its API version; `ping` asks once more, for an engine not asked before)."""
    from docker.utils.utils import parse_host

    try:
        parse_host(where, False, bool(env.get("DOCKER_TLS_VERIFY")))
    except (docker.errors.DockerException, ValueError) as exc:
        raise InputError(f"DOCKER_HOST {shown(where)} is not an engine address the docker SDK can use "
                         f"({_short(exc)})",
                         hint="set DOCKER_HOST like unix:///var/run/docker.sock or tcp://host:2376, "
                         "or unset it for the local engine") from exc
    try:
        client = docker.from_env(environment=env, timeout=answer)  # asks the engine its API version
        if ping:
            client.ping()
    except (docker.errors.DockerException, requests.RequestException) as exc:
        raise _not_answering(where, answer, exc) from exc
    client.api.timeout = OPERATION_TIMEOUT
    return client


def _not_answering(where: str, answer: float, exc: BaseException) -> EngineError:
    why = (f"no answer within {answer:g} s" if isinstance(exc, (TimeoutError, socket.timeout))
           or "timed out" in str(exc).lower() or type(exc).__name__ in ("Timeout", "ReadTimeout", "ConnectTimeout")
           else _short(exc))
    return EngineError(f"the Docker engine at {shown(where)} does not answer ({why})", hint=ENGINE_HINT)


def _short(exc: BaseException) -> str:
    text = str(exc)
    if getattr(exc, "explanation", None):  # the docker SDK's APIError: the engine's own words
        text = str(exc.explanation)
    return text.splitlines()[0][:300] if text else type(exc).__name__


__all__ = ["Engine", "Mount", "Container", "LABEL_PREFIX"]
