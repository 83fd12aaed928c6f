"""Everything cudabuild takes from its environment, read once, when a command starts, from an
explicit mapping (`Settings.from_env(os.environ)` in the CLI; tests pass their own). Every command
receives this one frozen value; no other module reads `os.environ`.

What is here:
- the option defaults set by `CUDABUILD_*` variables (the flag of the same name wins; see
  options.ENVIRONMENT and Settings.build_options),
- where things are: the cache (CUDABUILD_CACHE), Docker's client configuration (DOCKER_CONFIG),
- the compile cache's bound (CUDABUILD_COMPILE_CACHE_SIZE),
- how to reach and wait for the engine (DOCKER_HOST and the SDK's own variables, passed to it as
  they are; CUDABUILD_ENGINE_TIMEOUT), and how often to retry a download (CUDABUILD_DOWNLOAD_RETRIES),
- secrets a build may need (KBUILD_SIGN_PIN: kept out of every repr),
- this machine's facts that stand in for a default (the CPU count for --jobs, `uname -r` for --kernel and
  the running kernel of a node; CUDABUILD_KERNEL_RELEASE stands in for it, as for the loader; a Debian
  host's VERSION_CODENAME for --distribution, read under CUDABUILD_ROOT where that is set),
- how to talk to people (CI, NO_COLOR), and
- the environment as it was, for the child processes that inherit it (the loader, `docker run`).

The OCI runtime (cdi/runtime.py) is its own program, started by the engine for each container;
it reads its one variable, CUDABUILD_RUNTIME_CONFIG, at its own entry."""

from __future__ import annotations

import os
import platform
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from types import MappingProxyType

import platformdirs

from cudabuild.errors import InputError, shown
from cudabuild.options import ENVIRONMENT, BuildOptions, environment_value

# How long to wait for the engine to answer its first request, in seconds (CUDABUILD_ENGINE_TIMEOUT).
ENGINE_ANSWER_TIMEOUT = 20.0
# How many times a failed download is tried again, with backoff 1, 2, 4, 8... s (CUDABUILD_DOWNLOAD_RETRIES).
DOWNLOAD_RETRIES = 4
MAX_DOWNLOAD_RETRIES = 10
# The compile cache's bound, in ccache's units (CUDABUILD_COMPILE_CACHE_SIZE): a build of Debian's 535
# (the five modules) keeps about 40 MB there, compressed; this holds about a hundred builds.
COMPILE_CACHE_SIZE = "4G"
COMPILE_CACHE_SIZE_RE = re.compile(r"[1-9][0-9]{0,5}(\.[0-9]+)?[KMGT]i?")


def debian_codename(os_release: Path) -> str | None:
    """VERSION_CODENAME of a Debian host's os-release (ID=debian); None on any other host, or
    where the file cannot be read."""
    try:
        text = os_release.read_text(errors="replace")[:16384]
    except OSError:
        return None
    fields = {}
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if sep:
            fields[name.strip()] = value.strip().strip("\"'")
    codename = fields.get("VERSION_CODENAME", "")
    return codename if fields.get("ID") == "debian" and re.fullmatch(r"[a-z]{1,32}", codename) else None


@dataclass(frozen=True, kw_only=True)
class Settings:
    environ: Mapping[str, str] = field(default_factory=dict, repr=False)  # as it was, for child processes
    option_values: Mapping[str, object] = field(default_factory=dict)  # BuildOptions field -> value
    option_variables: Mapping[str, str] = field(default_factory=dict)  # BuildOptions field -> its variable
    cache_dir: Path = field(default_factory=lambda: Path(platformdirs.user_cache_dir("cudabuild")))
    engine_timeout: float = ENGINE_ANSWER_TIMEOUT
    engine_timeout_invalid: str | None = None  # CUDABUILD_ENGINE_TIMEOUT as given, when it is not seconds
    download_retries: int = DOWNLOAD_RETRIES
    download_retries_invalid: str | None = None  # CUDABUILD_DOWNLOAD_RETRIES as given, when it is not 0-10
    compile_cache_size: str = COMPILE_CACHE_SIZE
    compile_cache_size_invalid: str | None = None  # CUDABUILD_COMPILE_CACHE_SIZE as given, when ccache cannot read it
    docker_config: Path = field(default_factory=lambda: Path.home() / ".docker")
    sign_pin: str | None = field(default=None, repr=False)
    cpu_count: int = field(default_factory=lambda: os.cpu_count() or 1)  # the default of --jobs
    host_release: str = field(default_factory=platform.release)
    host_codename: str | None = None  # a Debian host's VERSION_CODENAME (the default of --distribution)
    ci: bool = False
    no_color: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "Settings":
        env = MappingProxyType(dict(env))
        values, variables = {}, {}
        for name, variable in ENVIRONMENT.items():
            if env.get(variable):
                values[name] = environment_value(name, env[variable])
                variables[name] = variable
        raw_timeout = env.get("CUDABUILD_ENGINE_TIMEOUT") or ""
        timeout, invalid = ENGINE_ANSWER_TIMEOUT, None
        if raw_timeout:  # refused when an engine is asked for: a command that needs none still runs
            try:
                given = float(raw_timeout)
            except ValueError:
                given = None
            if given is not None and 0 < given <= 3600:
                timeout = given
            else:
                invalid = raw_timeout
        raw_retries = env.get("CUDABUILD_DOWNLOAD_RETRIES") or ""
        retries, retries_invalid = DOWNLOAD_RETRIES, None
        if raw_retries:  # refused when a download is asked for
            if raw_retries.isdigit() and int(raw_retries) <= MAX_DOWNLOAD_RETRIES:
                retries = int(raw_retries)
            else:
                retries_invalid = raw_retries
        raw_size = env.get("CUDABUILD_COMPILE_CACHE_SIZE") or ""
        size_invalid = None if not raw_size or COMPILE_CACHE_SIZE_RE.fullmatch(raw_size) else raw_size
        defaults = cls()
        return cls(
            environ=env,
            option_values=MappingProxyType(values),
            option_variables=MappingProxyType(variables),
            cache_dir=Path(env["CUDABUILD_CACHE"]).expanduser() if env.get("CUDABUILD_CACHE") else defaults.cache_dir,
            engine_timeout=timeout,
            engine_timeout_invalid=invalid,
            download_retries=retries,
            download_retries_invalid=retries_invalid,
            compile_cache_size=raw_size if raw_size and size_invalid is None else COMPILE_CACHE_SIZE,
            compile_cache_size_invalid=size_invalid,
            docker_config=Path(env["DOCKER_CONFIG"]) if env.get("DOCKER_CONFIG") else defaults.docker_config,
            sign_pin=env.get("KBUILD_SIGN_PIN") or None,
            host_release=env.get("CUDABUILD_KERNEL_RELEASE") or defaults.host_release,
            host_codename=debian_codename(Path(env.get("CUDABUILD_ROOT") or "/") / "etc" / "os-release"),
            ci="CI" in env,
            no_color="NO_COLOR" in env,
        )

    def build_options(self, flags: Mapping[str, object]) -> BuildOptions:
        """Defaults, then the environment (as the settings read it), then the flags that were given
        (None: not given)."""
        known = {f.name for f in fields(BuildOptions)}
        unknown = set(flags) - known
        if unknown:
            raise TypeError(f"not build options: {sorted(unknown)}")
        values: dict[str, object] = dict(self.option_values)
        from_env = dict(self.option_variables)
        for name, value in flags.items():
            if value is not None:
                values[name] = value
                from_env.pop(name, None)
        try:
            return BuildOptions(**values)
        except InputError as exc:
            for name, variable in from_env.items():
                if f"--{name.replace('_', '-')} " in exc.message or (name == "installer_url" and "template" in exc.message):
                    exc.message += f" (set by the environment variable {variable})"
                    exc.args = (exc.message,)
            raise

    def reporter(self, **kwargs):
        """A Reporter that talks to people as these settings say (no bars under CI, no colour with
        NO_COLOR)."""
        from cudabuild.ui import Reporter

        return Reporter(ci=self.ci, no_color=self.no_color, **kwargs)

    def engine(self):
        """The Docker engine these settings name (DOCKER_HOST and the SDK's variables)."""
        from cudabuild.engine import Engine

        if self.engine_timeout_invalid is not None:
            raise InputError(f"CUDABUILD_ENGINE_TIMEOUT {shown(self.engine_timeout_invalid)} is not a number of "
                             "seconds (0 to 3600)", hint="set it to e.g. 20, or unset it")
        return Engine.connect(self.environ, answer_timeout=self.engine_timeout)

    def compile_cache_bound(self) -> str:
        """The compile cache's bound for a build (refused here, when a build asks for it, if
        CUDABUILD_COMPILE_CACHE_SIZE is not a size ccache reads)."""
        if self.compile_cache_size_invalid is not None:
            raise InputError(f"CUDABUILD_COMPILE_CACHE_SIZE {shown(self.compile_cache_size_invalid)} is not a size",
                             hint="set it like 4G, 500M or 1.5G (ccache's units), or unset it for "
                                  f"{COMPILE_CACHE_SIZE}; --no-compile-cache builds without one")
        return self.compile_cache_size

    def fetcher(self, reporter):
        """The downloader, retrying as CUDABUILD_DOWNLOAD_RETRIES says."""
        from cudabuild.store.fetch import Fetcher

        if self.download_retries_invalid is not None:
            raise InputError(f"CUDABUILD_DOWNLOAD_RETRIES {shown(self.download_retries_invalid)} is not a number "
                             f"of retries (0 to {MAX_DOWNLOAD_RETRIES})", hint="set it to e.g. 4, or unset it")
        return Fetcher(reporter=reporter, retries=self.download_retries)

    def cache(self):
        from cudabuild.store.cache import Cache

        return Cache(self.cache_dir)

    def registry(self, repo: str | None):
        """The store at repo: a registry (HOST[:PORT]/PATH, with Docker's credentials for it) or a
        bundle (oci:DIR); None for none."""
        if not repo:
            return None
        from cudabuild.registry import open_store

        return open_store(repo, docker_config=self.docker_config)

    def registry_repo(self, flag: str | None) -> str | None:
        """The registry a command uses: its --registry flag, else CUDABUILD_REGISTRY (None: neither)."""
        return flag or self.option_values.get("registry") or None


class Services:
    """What one command works with, made once when it starts and passed down: the reporter, the
    cache, the downloader, the engine (connected when first asked for, so that bad input is refused
    before any engine is needed, and then the same one), and registries by repository."""

    def __init__(self, settings: Settings, *, reporter=None, engine=None) -> None:
        self.settings = settings
        self.reporter = reporter if reporter is not None else settings.reporter()
        self._engine = engine

    def engine(self):
        """The engine, connected on first use."""
        if self._engine is None:
            self._engine = self.settings.engine()
        return self._engine

    @cached_property
    def cache(self):
        return self.settings.cache()

    @cached_property
    def fetcher(self):
        return self.settings.fetcher(self.reporter)

    def registry(self, repo: str | None):
        """The Registry at `repo` (None: none). A flag's value that falls back to CUDABUILD_REGISTRY
        goes through Settings.registry_repo first; resolved options carry theirs already."""
        return self.settings.registry(repo)

    def quiet(self) -> "Services":
        """The same services for work whose progress is not shown (a matrix plans each cell): the
        same settings, cache and engine (connected now), a reporter that says nothing."""
        from cudabuild.ui import Reporter

        twin = Services(self.settings, reporter=Reporter(quiet=True), engine=self.engine())
        twin.cache = self.cache  # the cached property's value, set: one Cache for both
        return twin
