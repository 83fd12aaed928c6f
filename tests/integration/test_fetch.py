"""Downloads against a real HTTP server on 127.0.0.1."""

import hashlib

import pytest

from cudabuild.errors import FetchError
from cudabuild.store.fetch import Fetcher
from cudabuild.ui import Reporter

DATA = bytes(range(256)) * 4096  # 1 MiB
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def fetcher():
    return Fetcher(reporter=Reporter(quiet=True), retries=2, backoff=0.01, timeout=5)


def test_download_is_verified_and_stored_by_content(http_server, fetcher, tmp_path):
    served = http_server.serve("/f.deb", DATA)
    path = fetcher.fetch(f"{http_server.url}/f.deb", store=tmp_path, sha256=SHA, size=len(DATA))
    assert path == tmp_path / SHA and path.read_bytes() == DATA
    fetcher.fetch(f"{http_server.url}/f.deb", store=tmp_path, sha256=SHA)
    assert len(served.requests) == 1, "a stored file is not downloaded again"


def test_checksum_mismatch_deletes_the_file(http_server, fetcher, tmp_path):
    http_server.serve("/f.deb", DATA)
    with pytest.raises(FetchError, match="expected " + "0" * 64) as info:
        fetcher.fetch(f"{http_server.url}/f.deb", store=tmp_path, sha256="0" * 64)
    assert "deleted" in info.value.message
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_client_errors_are_not_retried(http_server, fetcher, tmp_path):
    served = http_server.serve("/gone.deb", DATA, status=404)
    with pytest.raises(FetchError, match="HTTP 404"):
        fetcher.fetch(f"{http_server.url}/gone.deb", store=tmp_path, sha256=SHA)
    assert len(served.requests) == 1


def test_server_errors_are_retried(http_server, fetcher, tmp_path):
    served = http_server.serve("/flaky.deb", DATA, fail_times=2)
    assert fetcher.fetch(f"{http_server.url}/flaky.deb", store=tmp_path, sha256=SHA).read_bytes() == DATA
    assert len(served.requests) == 3


def test_interrupted_download_resumes_where_it_stopped(http_server, fetcher, tmp_path):
    served = http_server.serve("/big.deb", DATA, cut_after=300_000)
    path = fetcher.fetch(f"{http_server.url}/big.deb", store=tmp_path, sha256=SHA, size=len(DATA))
    assert path.read_bytes() == DATA
    assert len(served.requests) == 2
    resumed_at = int(served.requests[1]["Range"].removeprefix("bytes=").rstrip("-"))
    assert 200_000 <= resumed_at <= 300_000, "the second request continues from what the first one wrote"


def test_unreachable_server_is_a_clear_error(fetcher, tmp_path):
    with pytest.raises(FetchError, match="could not download http://127.0.0.1:9/") as info:
        fetcher.fetch("http://127.0.0.1:9/x.deb", store=tmp_path, sha256=SHA)
    assert "reachable" in info.value.hint
