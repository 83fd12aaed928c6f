"""What cudabuild tells people: named steps with durations and notes on stderr (colour only on a
terminal without NO_COLOR), download bars from real byte counts. Results for machines (--json)
go to stdout from the CLI; nothing here writes to stdout."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, TextIO


@dataclass
class Step:
    name: str
    seconds: float = 0.0
    status: str = "done"  # done | cached | failed


@dataclass
class Reporter:
    stream: TextIO = field(default_factory=lambda: sys.stderr)
    quiet: bool = False
    steps: list[Step] = field(default_factory=list)
    ci: bool = False  # under CI: no progress bars (Settings.ci)
    no_color: bool = False  # NO_COLOR (Settings.no_color)

    @property
    def interactive(self) -> bool:
        return self.stream.isatty() and not self.ci

    def _colour(self, code: str, text: str) -> str:
        if not self.stream.isatty() or self.no_color:
            return text
        return f"\033[{code}m{text}\033[0m"

    def note(self, message: str) -> None:
        """A line the user should read: a default taken, a choice made."""
        if not self.quiet:
            print(self._colour("2", "    ") + message, file=self.stream, flush=True)

    def warn(self, message: str) -> None:
        print(self._colour("33", "warning: ") + message, file=self.stream, flush=True)

    def cached(self, name: str, why: str) -> None:
        """A step that had nothing to do, and why."""
        self.steps.append(Step(name, 0.0, "cached"))
        if not self.quiet:
            print(self._colour("1;34", "==> ") + f"{name}: {why}", file=self.stream, flush=True)

    def start(self, name: str) -> Step:
        """Announce a step; `finish` it with its duration."""
        entry = Step(name)
        self.steps.append(entry)
        if not self.quiet:
            print(self._colour("1;34", "==> ") + name, file=self.stream, flush=True)
        return entry

    def finish(self, entry: Step, seconds: float) -> None:
        entry.seconds = round(seconds, 2)
        if not self.quiet:
            print(self._colour("32", "    done") + f" in {format_seconds(entry.seconds)}",
                  file=self.stream, flush=True)

    @contextmanager
    def step(self, name: str) -> Iterator[Step]:
        entry = self.start(name)
        start = time.monotonic()
        try:
            yield entry
        except BaseException:
            entry.status = "failed"
            entry.seconds = round(time.monotonic() - start, 2)
            raise
        self.finish(entry, time.monotonic() - start)

    def progress_bar(self, total: int | None, desc: str, initial: int = 0):
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True,
                    unit_divisor=1024, file=self.stream, leave=False,
                    disable=self.quiet or not self.interactive)


def format_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes}m{rest:02d}s"


@dataclass
class Report:
    """A command's result as the library made it: its data (what --json prints) and its text (what
    people read), written side by side where the result is made. `error`, when set, is raised once
    the result has been shown (a gate that answers no, a stale spec, a refused boot test); `exit_code`
    ends the command with that code without an error's message (a matrix with failed cells);
    `to_stderr`: the text is a note about what was written elsewhere; `notes`: lines for stderr
    beside a text that is data (a matrix's summary beside its Kubernetes Jobs)."""

    data: object
    lines: list[str] = field(default_factory=list)
    error: Exception | None = None
    exit_code: int = 0
    to_stderr: bool = False
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> object:
        return self.data

    def text(self) -> str:
        return "\n".join(self.lines)
