"""sha256 of files: streamed in chunks (never a whole file in memory), and many files at once on
several threads (hashlib releases the GIL), which keeps the re-check of a cache hit well under a
second for the ~270 MB a driver is."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_files(paths: Iterable[Path]) -> dict[Path, str]:
    """The sha256 of each path, the largest first so that the threads finish together."""
    ordered = sorted(paths, key=lambda p: p.stat().st_size, reverse=True)
    workers = max(1, min(len(ordered), os.cpu_count() or 1, 8))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip(ordered, pool.map(sha256_file, ordered)))
