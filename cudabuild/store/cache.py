"""The cache: downloads by content, package indices, unpacked kernel trees and extracted
installers, results by key.

Everything is made in a temporary directory inside the cache and renamed into place, so an entry
is either whole or absent; a lock per key keeps two identical builds (or two preparations of the
same kernel tree) from colliding. A full or read-only file system is a CacheError that leaves no
partial file behind."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    from filelock import FileLock

from cudabuild.errors import CacheError

# A cold build unpacks headers and driver sources and compiles them: this much must be free.
BUILD_SPACE_BYTES = 3 * 1024**3
# Writing anything (a package index, a copied installer) needs at least this much beyond its size.
WRITE_MARGIN_BYTES = 16 * 1024**2
SUBDIRS = ("downloads", "index", "kernels", "sources", "results", "tmp", "locks", "logs")
_WRITE_ERRORS = {errno.ENOSPC: "the file system is full", errno.EROFS: "the file system is read-only",
                 errno.EACCES: "permission denied", errno.EDQUOT: "the disk quota is exceeded",
                 errno.EPERM: "operation not permitted"}


def key_of(obj: object) -> str:
    """A stable hash of a JSON-able object."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def write_failure(path: Path, exc: OSError) -> CacheError | None:
    """A CacheError, in words, when `exc` is a write refused for want of space or permission."""
    if exc.errno not in _WRITE_ERRORS:
        return None
    return CacheError(f"cannot write {path}: {_WRITE_ERRORS[exc.errno]}",
                      hint="free space there or make it writable, or point CUDABUILD_CACHE at another directory")


@contextmanager
def writing(partial: Path) -> Iterator[Path]:
    """Write `partial` (a file or a directory); when the write fails for want of space or
    permission, remove it and raise a CacheError."""
    try:
        yield partial
    except OSError as exc:
        if partial.is_dir() and not partial.is_symlink():
            shutil.rmtree(partial, ignore_errors=True)
        else:
            partial.unlink(missing_ok=True)
        failure = write_failure(partial, exc)
        if failure is not None:
            raise failure from exc
        raise


def _size(n: int) -> str:
    return f"{n / 1024**3:.1f} GiB" if n >= 1024**3 else f"{n / 1024**2:.0f} MiB"


def require_space(directory: Path, needed: int, what: str) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise CacheError(
            f"only {_size(free)} free in {directory}; {what} needs {_size(needed)}",
            hint="free space there, or point CUDABUILD_CACHE at a larger file system",
        )


class Cache:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        try:
            for sub in SUBDIRS:
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            probe, probe_path = tempfile.mkstemp(prefix="probe-", dir=self.root / "tmp")
            os.close(probe)
            os.unlink(probe_path)
        except OSError as exc:
            reason = _WRITE_ERRORS.get(exc.errno, exc.strerror or str(exc))
            raise CacheError(f"cannot use the cache directory {self.root}: {reason}",
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
    def sources(self) -> Path:
        return self.root / "sources"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def compile_cache(self) -> Path:
        """ccache's directory, shared by every build of this cache (bounded by
        CUDABUILD_COMPILE_CACHE_SIZE; `--no-compile-cache` leaves it out)."""
        return self.root / "compile-cache"

    def result_dir(self, key: str) -> Path:
        return self.root / "results" / key

    def result(self, key: str) -> Path | None:
        """The published result for `key`, or None. Only whole entries are ever published."""
        path = self.result_dir(key)
        return path if (path / "manifest.json").is_file() else None

    def checked_stats(self, key: str) -> dict | None:
        """What artifact.file_stats gave after the last whole check of the result for `key`."""
        try:
            return json.loads((self.root / "checked" / f"{key}.json").read_text())
        except (OSError, ValueError):
            return None

    def record_checked(self, key: str, stats: dict) -> None:
        """Keep `stats` (artifact.file_stats of the result for `key`, just checked whole), written
        whole or not at all."""
        directory = self.root / "checked"
        directory.mkdir(exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{key[:16]}-")
        with os.fdopen(fd, "w") as out:
            json.dump(stats, out)
        os.replace(temporary, directory / f"{key}.json")

    def lock(self, name: str, *, timeout: float = 3600) -> FileLock:
        from filelock import FileLock  # only to build, or to write: a cache hit takes no lock

        return FileLock(str(self.root / "locks" / f"{name}.lock"), timeout=timeout)

    def acquire(self, name: str, *, on_wait) -> FileLock:
        """Take the lock `name`; when another process holds it, say so and wait."""
        from filelock import Timeout

        lock = self.lock(name)
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

    def workdir(self, prefix: str, *, owner: tuple[int, int] | None = None) -> Path:
        """A fresh temporary directory on the cache's file system (so that rename is atomic),
        named with this process's id so that a later run can tell when its owner is gone;
        given to `owner` (uid, gid) when a container of that user writes into it."""
        path = Path(tempfile.mkdtemp(prefix=f"{prefix}-pid{os.getpid()}.{pid_namespace()}-", dir=self.root / "tmp"))
        if owner is not None:
            os.chown(path, *owner)
        return path

    @staticmethod
    def discard(work: Path, *, tries: int = 50) -> None:
        """Remove a work directory, even while a builder container abandoned with a lost engine
        still writes into it: each pass removes directories, and nothing can be created in a removed
        one, so a few passes end it. What might still be left carries this process's id in its
        name, and the next run's reaper removes it."""
        for _ in range(tries):
            shutil.rmtree(work, ignore_errors=True)
            if not os.path.lexists(work):
                return
            time.sleep(0.1)

    def publish(self, staged: Path, key: str) -> Path:
        """Move a complete `staged` directory into place as the result for `key`."""
        target = self.result_dir(key)
        if target.exists():
            shutil.rmtree(target)  # --no-cache, or an entry without manifest.json: replaceable
        os.replace(staged, target)
        return target

    @staticmethod
    def publish_tree(staged: Path, target: Path) -> Path:
        """Move a complete tree into place (a kernel tree, an extracted installer). When another
        run published the same tree meanwhile, keep that one."""
        try:
            os.rename(staged, target)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            shutil.rmtree(staged, ignore_errors=True)
        return target

    def check_space(self, needed: int = BUILD_SPACE_BYTES) -> None:
        require_space(self.root, needed, "a build")

    def reap_stale(self, *, older_than: float = 6 * 3600) -> list[Path]:
        """Remove what a killed run left: its temporary directories (owner gone, or old).
        Results, kernel trees and extracted installers are never half-written."""
        now = time.time()
        reaped = []
        for entry in (self.root / "tmp").iterdir():
            owner = re.search(r"-pid(\d+)\.(\d+)-", entry.name)
            try:
                dead = owner is not None and not pid_alive(int(owner.group(1)), int(owner.group(2)))
                if dead or now - entry.stat().st_mtime > older_than:
                    shutil.rmtree(entry, ignore_errors=True)
                    reaped.append(entry)
            except FileNotFoundError:
                pass
        return reaped


def pid_namespace() -> int:
    """This process's pid namespace (its inode): a cudabuild in a container (a Swarm job sharing
    the node's cache and engine) numbers its processes in its own namespace."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def pid_alive(pid: int, namespace: int | None = None) -> bool:
    """Whether the owner of a builder or a temporary directory may still run: a process of that id
    in this pid namespace, or any owner in another namespace (whose processes this one cannot see)."""
    if namespace is not None and namespace != pid_namespace():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
