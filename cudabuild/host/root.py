"""A host's file system seen under a root (`--root`, /host in the driver container), resolved as a
chroot would resolve it.

On Debian `/var/run` is a symlink to `/run`, an absolute one; under /host it must lead to /host/run,
not to the container's own /run. Every path that install, `cdi generate` and the loader read or
write under a root goes through here: each component is opened relative to its directory with
O_NOFOLLOW, a symlink's target is taken inside the root (an absolute one from the root, `..` never
above it), files are written as a temporary name made with O_EXCL|O_NOFOLLOW and renamed into place,
and a path that cannot be resolved inside the root (a loop, a file where a directory must be) is
refused with the reason. Reads are bounded in size."""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from cudabuild.errors import InputError, printable, shown

MAX_LINKS = 40  # as the kernel's ELOOP
READ_LIMIT = 1 << 20  # bytes read of a file the host's driver or a spec describes
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


# What cudabuild makes on a host: below these, no component is ever a link that cudabuild follows
# (the system's own links above them, such as Debian's /var/run -> /run, are resolved inside the root).
OWNED_TOPS = ("run/cudabuild", "var/lib/cudabuild")


class HostPathError(InputError):
    """A path under the root that cannot be resolved or used inside it."""


class NotThereError(HostPathError):
    """A path under the root that does not exist, or has a file where a directory belongs."""


class NotOursError(HostPathError):
    """A link, or something cudabuild never makes, where cudabuild keeps its own files: refused
    rather than followed or removed (exit 3)."""


def _parts(rel: str | PurePosixPath) -> list[str]:
    return [p for p in PurePosixPath("/", rel).parts[1:] if p not in ("", ".")]


def read_regular(name, limit: int, *, dir_fd: int | None = None) -> bytes | None:
    """At most `limit` bytes of the regular file `name` (relative to `dir_fd` when given), opened
    without following a link and without blocking: None for a FIFO, a device or a directory, which
    are never read. OSError when it cannot be opened or read."""
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        chunks, size = [], 0
        while size < limit:
            chunk = os.read(fd, min(1 << 20, limit - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


class HostRoot:
    """The host's file system under `root`. Paths given to it are the host's (`/var/run/cdi`)."""

    def __init__(self, root: Path | str) -> None:
        self.given = Path(os.path.abspath(root))
        self.root = Path(os.path.realpath(root))

    def __repr__(self) -> str:
        return f"HostRoot({str(self.root)!r})"

    # ---- resolving -------------------------------------------------------------------------------
    @contextmanager
    def directory(self, rel: str | PurePosixPath, *, create: bool = False) -> Iterator[int]:
        """A file descriptor of the directory `rel`, every component resolved inside the root;
        missing ones made (mode 0755) when `create`. HostPathError when it cannot be."""
        fds = [self._open_root()]
        try:
            self._walk(fds, _parts(rel), rel, create=create)
            yield fds[-1]
        finally:
            for fd in fds:
                os.close(fd)

    def _open_root(self) -> int:
        try:
            return os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise HostPathError(f"the root {self.root} cannot be opened: {exc.strerror}",
                                hint="pass the host's file system as --root (a directory)") from exc

    def _walk(self, fds: list[int], parts: list[str], rel, *, create: bool, missing_ok: bool = False) -> list[str]:
        """Open each directory of `parts` onto `fds`; with `missing_ok`, stop at the first that does
        not exist and return what is left of the path (else [])."""
        links = 0
        pending = list(parts)
        while pending:
            name = pending.pop(0)
            if name == "..":
                if len(fds) > 1:
                    os.close(fds.pop())
                continue
            try:
                fds.append(os.open(name, _DIR_FLAGS, dir_fd=fds[-1]))
                continue
            except FileNotFoundError:
                if missing_ok:
                    return [name, *pending]
                if not create:
                    raise NotThereError(f"{self.show(rel)} does not exist (no {shown(name)})",
                                        hint="check --root and that the driver is installed there") from None
                try:
                    os.mkdir(name, 0o755, dir_fd=fds[-1])
                except FileExistsError:
                    pass  # made meanwhile: opened (and checked) below
                except OSError as exc:
                    raise self.error(rel, exc) from exc
                pending.insert(0, name)
                continue
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise self.error(rel, exc) from exc
            # A symlink (ELOOP with O_NOFOLLOW) or not a directory (ENOTDIR).
            target = self._readlink(name, fds[-1])
            if target is None:
                raise NotThereError(f"{self.show(rel)}: {shown(name)} is not a directory",
                                    hint="remove or move what is there; cudabuild needs a directory")
            links += 1
            if links > MAX_LINKS:
                raise HostPathError(f"{self.show(rel)}: too many symbolic links (a loop?)",
                                    hint="fix the links under the root")
            if target.startswith("/"):
                while len(fds) > 1:
                    os.close(fds.pop())
            pending[:0] = _parts(target) if target.startswith("/") else [p for p in target.split("/") if p not in ("", ".")]
        return []

    @staticmethod
    def _readlink(name: str, dir_fd: int) -> str | None:
        try:
            return os.readlink(name, dir_fd=dir_fd)
        except OSError:
            return None

    def error(self, rel, exc: OSError) -> HostPathError:
        """An OSError met at `rel` under the root, said as a HostPathError with its fix."""
        if exc.errno == errno.EROFS:
            return HostPathError(f"{self.show(rel)} is on a read-only file system",
                                 hint="mount the host's root read-write where cudabuild installs (e.g. -v /:/host)")
        return HostPathError(f"{self.show(rel)}: {exc.strerror}", hint="check --root and the permissions there")

    def resolve(self, rel: str | PurePosixPath) -> Path:
        """The path as this process reaches it, every directory resolved inside the root; the last
        component is followed too while it is a symlink (inside the root). It may not exist: what
        does not is taken as written, `..` never above the root."""
        parts = _parts(rel)
        for _ in range(MAX_LINKS):
            if not parts:
                return self.root
            fds = [self._open_root()]
            try:
                left = self._walk(fds, parts[:-1], rel, create=False, missing_ok=True)
                here = self._where(fds[-1])
                name = parts[-1]
                if left:  # a directory on the way does not exist: the rest is taken lexically
                    path = PurePosixPath("/", *self._rel(here).parts)
                    for part in [*left, name]:
                        path = path.parent if part == ".." else path / part
                    return self.root / str(path).lstrip("/")
                if name == "..":
                    return here.parent if here != self.root else here
                target = self._readlink(name, fds[-1])
                if target is None:
                    return here / name
            finally:
                for fd in fds:
                    os.close(fd)
            parts = _parts(target) if target.startswith("/") else _parts(
                PurePosixPath("/", *self._rel(here).parts, target))
        raise HostPathError(f"{self.show(rel)}: too many symbolic links (a loop?)", hint="fix the links under the root")

    def _where(self, fd: int) -> Path:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))

    def _rel(self, path: Path) -> PurePosixPath:
        path = Path(os.path.abspath(path))
        try:
            return PurePosixPath(path.relative_to(self.root))
        except ValueError:
            return PurePosixPath(path.relative_to(self.given))  # a path named through the root as given

    def host_path(self, path: Path, host_root: str = "/") -> str:
        """Where the host sees `path` (a path under the root as this process sees it)."""
        return str(PurePosixPath(host_root) / self._rel(Path(path)))

    def show(self, rel) -> str:
        """A path under the root as a message says it: whole, its control characters escaped."""
        return printable(self.root / str(rel).lstrip("/"))

    # ---- reading ---------------------------------------------------------------------------------
    def is_dir(self, rel) -> bool:
        try:
            return self.resolve(rel).is_dir()
        except HostPathError:
            return False

    def exists(self, rel) -> bool:
        """Whether the name `rel` exists (a link counts, followed or not)."""
        parts = _parts(rel)
        if not parts:
            return True
        try:
            with self.directory(PurePosixPath("/", *parts[:-1])) as fd:
                os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
                return True
        except (HostPathError, FileNotFoundError, NotADirectoryError):
            return False
        except OSError:
            return True

    def read_bytes(self, rel, *, limit: int = READ_LIMIT) -> bytes:
        """At most `limit` bytes of a regular file (HostPathError past that, or for anything else)."""
        path = self.resolve(rel)
        try:
            data = read_regular(path, limit + 1)
        except OSError as exc:
            raise self.error(rel, exc) from exc
        if data is None:
            raise HostPathError(f"{self.show(rel)} is not a regular file", hint="check what is there")
        if len(data) > limit:
            raise HostPathError(f"{self.show(rel)} is larger than {limit} bytes, more than it can hold",
                                hint="check what is there; it is not what the driver writes")
        return data

    def read_text(self, rel, *, limit: int = READ_LIMIT) -> str:
        return self.read_bytes(rel, limit=limit).decode(errors="replace")

    def listdir(self, rel) -> list[str]:
        """The names in a directory (none when it does not exist)."""
        try:
            with self.directory(rel) as fd:
                return sorted(os.listdir(fd))
        except HostPathError:
            return []

    # ---- writing ---------------------------------------------------------------------------------
    def makedirs(self, rel) -> Path:
        with self.directory(rel, create=True) as fd:
            return self._where(fd)

    def write_atomic(self, rel, data: bytes, *, mode: int = 0o644) -> tuple[Path, bool]:
        """Write a file whole: a new temporary name (O_EXCL|O_NOFOLLOW) in the resolved directory,
        then a rename over the name, which replaces what is there rather than following it. Whether
        the content changed."""
        parts = _parts(rel)
        parent, name = PurePosixPath("/", *parts[:-1]), parts[-1]
        with self.directory(parent, create=True) as fd:
            where = self._where(fd) / name
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    raise HostPathError(f"{self.show(rel)} is a directory, where cudabuild writes a file",
                                        hint="remove or move that directory")
                if stat.S_ISREG(st.st_mode) and st.st_size == len(data):
                    current = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                    try:
                        if os.read(current, len(data) + 1) == data:
                            return where, False
                    finally:
                        os.close(current)
            except FileNotFoundError:
                pass
            tmp = f".{name}.{secrets.token_hex(6)}.partial"
            try:
                out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode,
                              dir_fd=fd)
            except OSError as exc:
                raise self.error(rel, exc) from exc
            try:
                with os.fdopen(out, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fchmod(f.fileno(), mode)  # not the umask's
                    os.fsync(f.fileno())
                os.replace(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
            except BaseException:
                try:
                    os.unlink(tmp, dir_fd=fd)
                except OSError:
                    pass
                raise
            return where, True

    @contextmanager
    def lock(self, rel, *, timeout: float = 600.0, waiting=None) -> Iterator[None]:
        """An exclusive lock (flock) on the file `rel`, made if missing without following a link
        planted there; `waiting()` is called once if another holder makes us wait."""
        import fcntl
        import time

        parts = _parts(rel)
        parent = PurePosixPath("/", *parts[:-1])
        try:
            self._owned_split(parent)
            opened = self.owned_directory(parent, create=True)
        except ValueError:
            opened = self.directory(parent, create=True)
        with opened as fd:
            try:
                lock_fd = os.open(parts[-1], os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=fd)
            except OSError as exc:
                raise self.error(rel, exc) from exc
        try:
            deadline, told = time.monotonic() + timeout, False
            while True:
                try:
                    fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise HostPathError(f"{self.show(rel)} is held by another cudabuild for over {timeout:.0f} s",
                                            hint="wait for the other install to finish, or stop it") from None
                    if waiting and not told:
                        waiting()
                        told = True
                    time.sleep(0.1)
            yield
        finally:
            os.close(lock_fd)  # releases the lock

    # ---- what cudabuild made (OWNED_TOPS): never through a link -----------------------------------------
    def _owned_split(self, rel) -> tuple[list[str], list[str]]:
        parts = _parts(rel)
        for top in OWNED_TOPS:
            head = _parts(top)
            if parts[:len(head)] == head:
                return parts[:len(head) - 1], parts[len(head) - 1:]
        raise ValueError(f"{rel} is not under {', '.join(OWNED_TOPS)}")

    def not_ours(self, rel, fd: int, name: str) -> NotOursError:
        """The refusal of what is at `name` (in the directory `fd`), where cudabuild keeps its own."""
        target = self._readlink(name, fd)
        where = printable(self._where(fd) / name)
        if target is not None:
            return NotOursError(f"{where} is a symbolic link (to {printable(target)}), where cudabuild keeps its own "
                                "files: cudabuild never writes or removes through a link",
                                hint=f"remove the link (rm {where}) if nothing needs it, then run again")
        return NotOursError(f"{where} is not a directory cudabuild made", hint=f"move {where} away, then run again")

    @contextmanager
    def owned_directory(self, rel, *, create: bool = False) -> Iterator[int]:
        """A descriptor of one of cudabuild's own directories (under OWNED_TOPS): the system's part
        of the path resolved inside the root, every component from cudabuild's own on opened
        without following a link (NotOursError naming it). Missing ones are made with `create`,
        else NotThereError."""
        system, own = self._owned_split(rel)
        with self.directory(PurePosixPath("/", *system), create=create) as base:
            fd = os.dup(base)
        try:
            for name in own:
                if create:
                    try:
                        os.mkdir(name, 0o755, dir_fd=fd)
                    except FileExistsError:
                        pass  # there already (a link there is refused when it is opened)
                    except OSError as exc:
                        raise self.error(rel, exc) from exc
                try:
                    step = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    raise NotThereError(f"{self.show(rel)} does not exist",
                                        hint="nothing of cudabuild's is there") from None
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise self.not_ours(rel, fd, name) from None
                    raise self.error(rel, exc) from exc
                os.close(fd)
                fd = step
            yield fd
        finally:
            os.close(fd)

    def owned_path(self, rel, *, create: bool = False) -> Path:
        """Where one of cudabuild's own directories is, checked as owned_directory checks it."""
        with self.owned_directory(rel, create=create) as fd:
            return self._where(fd)

    def owned_entries(self, rel) -> list[tuple[str, os.stat_result]]:
        """The names in one of cudabuild's own directories with their lstat (none when it does not
        exist); NotOursError when the directory itself is reached through a link."""
        try:
            with self.owned_directory(rel) as fd:
                out = []
                for name in sorted(os.listdir(fd)):
                    try:
                        out.append((name, os.stat(name, dir_fd=fd, follow_symlinks=False)))
                    except FileNotFoundError:
                        continue
                return out
        except NotOursError:
            raise
        except HostPathError:
            return []

    def remove_owned(self, rel) -> bool:
        """Remove a directory tree or file cudabuild made under OWNED_TOPS, found with lstat: a link
        there is refused (NotOursError, naming it), never followed; nothing inside is followed
        either. Whether something was removed."""
        import shutil

        parts = _parts(rel)
        try:
            with self.owned_directory(PurePosixPath("/", *parts[:-1])) as fd:
                name = parts[-1]
                try:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    return False
                if stat.S_ISLNK(st.st_mode):
                    raise self.not_ours(rel, fd, name)
                if stat.S_ISDIR(st.st_mode):
                    shutil.rmtree(name, dir_fd=fd)
                elif stat.S_ISREG(st.st_mode):
                    os.unlink(name, dir_fd=fd)
                else:
                    raise self.not_ours(rel, fd, name)
                return True
        except NotOursError:
            raise
        except HostPathError:
            return False

    def remove_file(self, rel) -> None:
        """Remove a file or symlink that cudabuild wrote (never a directory; the link itself, not
        what it points to)."""
        parts = _parts(rel)
        try:
            with self.directory(PurePosixPath("/", *parts[:-1])) as fd:
                os.unlink(parts[-1], dir_fd=fd)
        except (HostPathError, FileNotFoundError):
            pass
