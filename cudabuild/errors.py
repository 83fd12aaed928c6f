"""One exception hierarchy; each class has its own exit code (docs/exit-codes.md, made from EXIT_CODES below, and --help).

Every message says what failed, why, and what to do about it.
"""

from __future__ import annotations

# How many of a failed log's last lines an error shows (build logs, image builds, guest consoles).
LOG_TAIL_LINES = 30
# Values longer than this are cut in messages: a 100 kB argument is not echoed whole.
SHOWN_MAX = 80


def shown(value: object, limit: int = SHOWN_MAX) -> str:
    """A user's value as a message shows it: quoted, and cut when it is long."""
    text = repr(value) if isinstance(value, str) else repr(str(value))
    if len(text) <= limit:
        return text
    return f"{text[:limit - 1]}...' ({len(str(value))} characters)"


def printable(value: object) -> str:
    """Text read from a host (a process's name, a path, a file's content) made safe for a terminal:
    control characters, escape sequences and newlines written as Python escapes them."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class CudabuildError(Exception):
    """Base of every error cudabuild reports to a user."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None, log_tail: str | None = None,
                 log_path: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.log_tail = log_tail
        self.log_path = log_path

    def render(self) -> str:
        # A message may carry what a host or a file said (a process's name, a path): every line of it
        # with its control characters (an escape sequence) escaped before it reaches a terminal.
        def lines(text: str) -> str:
            return "\n".join(printable(line) for line in str(text).rstrip("\n").split("\n"))

        parts = [f"error: {lines(self.message)}"]
        if self.log_tail:
            parts.append("--- last lines of the build log ---")
            parts.append(lines(self.log_tail))
            parts.append("---")
        if self.log_path:
            parts.append(f"whole log: {printable(self.log_path)}")
        if self.hint:
            parts.append(f"fix: {lines(self.hint)}")
        return "\n".join(parts)


class InputError(CudabuildError):
    """A value given by the user is malformed, or names something that does not exist."""

    exit_code = 3


class ArtifactError(InputError):
    """A modules artifact (a directory, an image, a cache entry) is not what its manifest says:
    a file missing, changed, unlisted or a link; a malformed manifest. It is never used."""


class EngineError(CudabuildError):
    """The Docker engine cannot be reached or refused an operation."""

    exit_code = 4


class FetchError(CudabuildError):
    """A download or a package index could not be fetched or failed its checksum."""

    exit_code = 5


class BuildError(CudabuildError):
    """The build inside the builder container failed."""

    exit_code = 6


class VerifyError(CudabuildError):
    """Modules were built but are not what was asked for (missing, wrong vermagic, version, CRCs)."""

    exit_code = 7


class LoaderError(CudabuildError):
    """The loader refused to load the driver (`cudabuild install`): its own exit codes 10-19 and
    message (no privilege, another kernel, nouveau, another version loaded, a module refused, ...)."""

    def __init__(self, message: str, *, exit_code: int, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.exit_code = exit_code


class RegistryError(CudabuildError):
    """The registry cannot be reached (9), refused a push (20), or does not have what was asked
    for (21)."""

    exit_code = 9
    PUSH_REFUSED = 20
    NOT_THERE = 21

    def __init__(self, message: str, *, hint: str | None = None, exit_code: int | None = None) -> None:
        super().__init__(message, hint=hint)
        if exit_code is not None:
            self.exit_code = exit_code


class NoBuildError(CudabuildError):
    """No verified build for a kernel and driver where a node looks (staged on the host, the
    registry): `stage`, `ready` and a driver container that does not wait."""

    exit_code = 23


class HeldError(CudabuildError):
    """The GPU is in use: processes hold its device nodes or map the driver (each is named), so the
    driver cannot be changed or removed now (install of another version, uninstall)."""

    exit_code = 24


class RolledBackError(CudabuildError):
    """A driver upgrade failed and the driver that was loaded before is loaded again, with its CDI
    spec and ready file: the host still has a working driver."""

    exit_code = 25


class StaleSpecError(CudabuildError):
    """The CDI spec on disk does not describe the loaded driver and GPUs (cdi generate --check)."""

    exit_code = 26


class TrustError(CudabuildError):
    """An image is refused by its signature or attestations (--verify-key): unsigned, signed by
    another key, or its provenance names other inputs than its labels. Nothing of it was unpacked."""

    exit_code = 27


class CacheError(CudabuildError):
    """The cache cannot be used (no space, not writable, lock not obtained)."""

    exit_code = 8


EXIT_INTERRUPTED = 130
MATRIX_FAILED = 22

EXIT_CODES: list[tuple[int, str]] = [
    (0, "success"),
    (1, "unexpected error (a bug: please report it with the output)"),
    (2, "usage error (unknown option, missing argument)"),
    (InputError.exit_code, "bad input: malformed value, unknown kernel release or driver version (the message lists "
                           "what exists); an artifact, installer or image that is not what it claims (refused, never "
                           "used)"),
    (EngineError.exit_code, "Docker engine not reachable or failed"),
    (FetchError.exit_code, "download or package index failed"),
    (BuildError.exit_code, "module build failed (the last lines of the log and the log's path are shown)"),
    (VerifyError.exit_code, "built modules failed verification (or the kernel refused them in a boot test)"),
    (CacheError.exit_code, "cache unusable (space, permissions, lock)"),
    (RegistryError.exit_code, "registry unreachable (--registry); a result built meanwhile is kept, and the message "
                              "says where"),
    (10, "install: the loader's own refusals, 10-19 (the table below; `cudabuild install --help`)"),
    (RegistryError.PUSH_REFUSED, "the registry refused a push; the local result is kept"),
    (RegistryError.NOT_THERE, "the registry does not have what was asked for (--no-build, cudabuild's own image for "
                              "matrix --backend swarm)"),
    (MATRIX_FAILED, "matrix: one or more cells failed (each is named with its log's last lines; the others finished)"),
    (NoBuildError.exit_code, "no verified build for the kernel and driver, staged or in the registry (stage, ready, "
                             "install --registry without --wait)"),
    (HeldError.exit_code, "the GPU is in use: every process that holds it is named (install of another version, "
                          "uninstall; see cudabuild holders)"),
    (RolledBackError.exit_code, "a driver upgrade failed and was rolled back: the old driver is loaded again, with "
                                "its CDI spec and ready file"),
    (StaleSpecError.exit_code, "cdi generate --check: the spec on disk does not match the loaded driver and GPUs (each "
                               "difference is named)"),
    (TrustError.exit_code, "--verify-key: the image is unsigned, signed by another key, or its provenance names other "
                           "inputs than its labels; nothing of it was unpacked"),
    (EXIT_INTERRUPTED, "interrupted (Ctrl-C); the builder container was removed, nothing was published"),
]

# The loader's refusals (images/loader.sh), in a runtime image and in `cudabuild install`.
LOADER_EXIT_CODES: list[tuple[int, str]] = [
    (10, "no CAP_SYS_MODULE: run it as root, or --privileged in a container"),
    (11, "the running kernel is not the modules' kernel"),
    (12, "nouveau holds the GPUs"),
    (13, "another NVIDIA version is loaded (its holders are named)"),
    (14, "a module failed to load (the kernel's reason is in dmesg)"),
    (15, "a runtime image was run without a command (pass one after the image name)"),
    (16, "the GPUs' information in /proc/driver/nvidia cannot be read"),
    (17, "the loader's settings are malformed"),
    (18, "the GPU selection names a GPU that does not exist"),
    (19, "the kernel enforces module signatures and the modules are unsigned"),
]


def exit_codes_page() -> str:
    """docs/exit-codes.md, made from the tables above (scripts/exit-codes-page writes it; a test
    fails when the page and the code differ)."""
    def table(rows):
        return "| code | meaning |\n|---|---|\n" + "".join(f"| {code} | {meaning} |\n" for code, meaning in rows)

    return ("# Exit codes\n\n"
            "<!-- Made by scripts/exit-codes-page from cudabuild/errors.py (EXIT_CODES, LOADER_EXIT_CODES); "
            "do not edit by hand. -->\n\n"
            "Every command exits with one of these; the message on stderr says what was wrong and, on a line "
            "starting `fix:`, what to do.\n\n" + table(EXIT_CODES) +
            "\n## The loader's refusals (10-19)\n\n"
            "The loader (`images/loader.sh`) in a runtime image, and `cudabuild install`, which runs the same "
            "loader:\n\n" + table(LOADER_EXIT_CODES))
