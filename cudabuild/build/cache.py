"""The cache: downloads by content, package indices, unpacked kernel trees, results by key.

Results are built in a temporary directory inside the cache and renamed into place, so an entry
is either whole or absent; a lock per key keeps two identical builds from colliding."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import platformdirs
from filelock import FileLock, Timeout

from cudabuild.errors import CacheError

# A cold build unpacks headers and driver sources and compiles them: this much must be free.
BUILD_SPACE_BYTES = 3 * 1024**3


def default_cache_dir(env: Mapping[str, str]) -> Path:
    if env.get("CUDABUILD_CACHE"):
        return Path(env["CUDABUILD_CACHE"]).expanduser()
    return Path(platformdirs.user_cache_dir("cudabuild"))


def key_of(obj: object) -> str:
    """A stable hash of a JSON-able object."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


class Cache:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        try:
            for sub in ("downloads", "index", "kernels", "results", "tmp", "locks", "logs"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheError(f"cannot use the cache directory {self.root}: {exc.strerror}",
                             hint="set CUDABUILD_CACHE to a writable directory") from exc

    @property
    def downloads(self) -> Path:
        return self.root / "downloads"

    @property
    def index(self) -> Path:
        return self.root / "index"

    @property
    def kernels(self) -> Path:
        return self.root / "kernels"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def result_dir(self, key: str) -> Path:
        return self.root / "results" / key

    def result(self, key: str) -> Path | None:
        """The published result for `key`, or None. Only whole entries are ever published."""
        path = self.result_dir(key)
        return path if (path / "manifest.json").is_file() else None

    def lock(self, key: str, *, timeout: float = 3600) -> FileLock:
        return FileLock(str(self.root / "locks" / f"{key}.lock"), timeout=timeout)

    def acquire(self, key: str, *, on_wait) -> FileLock:
        """Take the lock for `key`; when another process holds it, say so and wait."""
        lock = self.lock(key)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            on_wait()
            try:
                lock.acquire()
            except Timeout as exc:
                raise CacheError(f"gave up waiting for the lock {lock.lock_file}",
                                 hint="another cudabuild is building the same thing; wait for it") from exc
        return lock

    def workdir(self, prefix: str) -> Path:
        """A fresh temporary directory on the cache's file system (so that rename is atomic),
        named with this process's id so that a later run can tell when its owner is gone."""
        return Path(tempfile.mkdtemp(prefix=f"{prefix}-pid{os.getpid()}-", dir=self.root / "tmp"))

    def publish(self, staged: Path, key: str) -> Path:
        """Move a complete `staged` directory into place as the result for `key`."""
        target = self.result_dir(key)
        if target.exists():
            shutil.rmtree(target)  # an entry without manifest.json: never whole, so replaceable
        os.replace(staged, target)
        return target

    def check_space(self, needed: int = BUILD_SPACE_BYTES) -> None:
        free = shutil.disk_usage(self.root).free
        if free < needed:
            raise CacheError(
                f"only {free / 1024**3:.1f} GiB free in {self.root}; a build needs {needed / 1024**3:.1f} GiB",
                hint="free space there, or point CUDABUILD_CACHE at a larger file system",
            )

    def reap_stale(self, *, older_than: float = 6 * 3600, builders_running: bool = False) -> list[Path]:
        """Remove what a killed run left: its temporary directories (owner gone, or old), and,
        when no builder is running, half-made kernel trees. Results are never half-written."""
        import re

        now = time.time()
        reaped = []
        for entry in (self.root / "tmp").iterdir():
            owner = re.search(r"-pid(\d+)-", entry.name)
            try:
                dead = owner is not None and not pid_alive(int(owner.group(1)))
                if dead or now - entry.stat().st_mtime > older_than:
                    shutil.rmtree(entry, ignore_errors=True)
                    reaped.append(entry)
            except FileNotFoundError:
                pass
        if not builders_running:
            for partial in self.kernels.glob("*.partial.*"):
                shutil.rmtree(partial, ignore_errors=True)
                reaped.append(partial)
        return reaped


def pid_alive(pid: int) -> bool:
    """Whether a process of this host with that id exists (owners of builders and temp dirs)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
