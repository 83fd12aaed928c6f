"""Downloads on the host: real progress, resume, retry with backoff (never on a 4xx), sha256
checked, stored by content. A file that fails its checksum is deleted."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

from cudabuild.store.cache import WRITE_MARGIN_BYTES, require_space, write_failure, writing
from cudabuild.digests import sha256_file
from cudabuild.errors import FetchError, InputError, shown
from cudabuild.lazy import lazy_import
from cudabuild.ui import Reporter

requests = lazy_import("requests")  # at the first download: a cache hit downloads nothing

CHUNK = 1 << 16  # small enough that a cut connection loses little of what arrived


def _unfetchable_errors() -> tuple:
    """URLs that no retry can fetch: a scheme requests has no adapter for, or a malformed URL."""
    return requests.exceptions.InvalidSchema, requests.exceptions.MissingSchema, requests.exceptions.InvalidURL


class Fetcher:
    def __init__(self, *, reporter: Reporter, retries: int = 4, backoff: float = 1.0,
                 timeout: float = 30.0, session: "requests.Session | None" = None) -> None:
        self.reporter = reporter
        self.retries = retries
        self.backoff = backoff
        self.timeout = timeout
        self._session = session

    @property
    def session(self) -> "requests.Session":
        if self._session is None:
            self._session = requests.Session()
        return self._session

    def _attempts(self, url: str):
        """Yield attempt numbers; sleep with exponential backoff between them."""
        for attempt in range(self.retries + 1):
            if attempt:
                delay = self.backoff * 2 ** (attempt - 1)
                self.reporter.note(f"retrying {url} in {delay:.0f}s (attempt {attempt + 1} of {self.retries + 1})")
                time.sleep(delay)
            yield attempt

    @staticmethod
    def _client_error(url: str, response: requests.Response) -> FetchError:
        return FetchError(
            f"{url} answered HTTP {response.status_code} {response.reason}",
            hint="check the URL, version and mirror (a 4xx is not retried: the server said no)",
        )

    @staticmethod
    def _unfetchable(url: str, exc: Exception) -> InputError:
        return InputError(f"{shown(url)} cannot be downloaded: {shown(str(exc))}",
                          hint="pass an http:// or https:// URL, or the path of a local file")

    def get_bytes(self, url: str) -> bytes | None:
        """A small file (an index); None when the server says it does not exist (404)."""
        last: Exception | None = None
        for _ in self._attempts(url):
            try:
                response = self.session.get(url, timeout=self.timeout)
            except _unfetchable_errors() as exc:
                raise self._unfetchable(url, exc) from exc
            except requests.RequestException as exc:
                last = exc
                continue
            if response.status_code == 404:
                return None
            if 400 <= response.status_code < 500:
                raise self._client_error(url, response)
            if response.status_code >= 500:
                last = FetchError(f"{url} answered HTTP {response.status_code}")
                continue
            return response.content
        raise FetchError(f"could not fetch {url}: {last}",
                         hint="check the network or the mirror (--apt-mirror / CUDABUILD_APT_MIRROR)")

    def fetch(self, url: str, *, store: Path, sha256: str | None = None, size: int | None = None,
              label: str | None = None) -> Path:
        """Download `url` into the content-addressed `store` and return the stored path.

        With a known sha256 an already stored file is returned at once. An interrupted download
        resumes from its partial file."""
        store.mkdir(parents=True, exist_ok=True)
        if sha256:
            done = store / sha256
            if done.is_file():
                return done
        partial_dir = store / ".partial"
        partial_dir.mkdir(exist_ok=True)
        partial = partial_dir / (sha256 or hashlib.sha256(url.encode()).hexdigest())
        label = label or url.rsplit("/", 1)[-1]
        last: Exception | None = None
        if size is not None:
            require_space(store, size + WRITE_MARGIN_BYTES, f"downloading {label}")
        for _ in self._attempts(url):
            try:
                self._download(url, partial, size=size, label=label)
                break
            except FetchError:
                raise
            except _unfetchable_errors() as exc:
                raise self._unfetchable(url, exc) from exc
            except requests.RequestException as exc:
                last = exc
            except OSError as exc:
                failure = write_failure(partial, exc)
                if failure is not None:  # no room or no permission: no retry, no partial file kept
                    partial.unlink(missing_ok=True)
                    raise failure from exc
                last = exc
        else:
            raise FetchError(f"could not download {url}: {last}",
                             hint="check that the server is reachable; run again to resume")
        digest = sha256_file(partial)
        if sha256 and digest != sha256:
            partial.unlink(missing_ok=True)
            raise FetchError(
                f"{label} from {url} has sha256 {digest}, expected {sha256}; the file was deleted",
                hint="the mirror served different content: check the mirror or the expected checksum",
            )
        final = store / digest
        os.replace(partial, final)
        return final

    def _download(self, url: str, partial: Path, *, size: int | None, label: str) -> None:
        have = partial.stat().st_size if partial.exists() else 0
        if size is not None and have > size:
            partial.unlink()
            have = 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        with self.session.get(url, headers=headers, stream=True, timeout=self.timeout) as response:
            if response.status_code == 416 and size is not None and have == size:
                return  # already complete
            if response.status_code == 416:
                partial.unlink(missing_ok=True)
                raise requests.ConnectionError("server refused to resume; restarting")
            if 400 <= response.status_code < 500:
                raise self._client_error(url, response)
            if response.status_code >= 500:
                raise requests.ConnectionError(f"HTTP {response.status_code}")
            if have and response.status_code != 206:
                have = 0  # the server ignored Range: start again
            if have:
                self.reporter.note(f"resuming {label} at {have} bytes")
            total = size
            if total is None and response.headers.get("Content-Length"):
                total = have + int(response.headers["Content-Length"])
            with open(partial, "ab" if have else "wb") as out, \
                    self.reporter.progress_bar(total, label, initial=have) as bar:
                for chunk in response.iter_content(CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
            got = partial.stat().st_size
            if total is not None and got < total:
                raise requests.ConnectionError(f"connection closed after {got} of {total} bytes")


def store_local(source: Path | bytes, store: Path) -> tuple[Path, str]:
    """Put a local file (or bytes) into the content-addressed store; return its path and sha256."""
    store.mkdir(parents=True, exist_ok=True)
    digest = sha256_file(source) if isinstance(source, Path) else hashlib.sha256(source).hexdigest()
    target = store / digest
    if not target.exists():
        size = source.stat().st_size if isinstance(source, Path) else len(source)
        require_space(store, size + WRITE_MARGIN_BYTES, f"storing a {size}-byte input")
        with writing(store / f"{digest}.partial") as partial:
            if isinstance(source, Path):
                shutil.copyfile(source, partial)
            else:
                partial.write_bytes(source)
            partial.replace(target)
    return target, digest
