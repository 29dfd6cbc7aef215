"""URLs and data: URIs as inputs: the fetcher against a local server with every fault of issue 22."""

from __future__ import annotations

import base64
import time

from phiclip.fetch import FetchOptions, decode_data_uri, fetch_many, retry_after_seconds
from phiclip.inputs import list_inputs
from phiclip.inputs.records import Unreadable

from ._http import FaultServer, jpeg

#: Short limits, so that the faults end quickly.
FAST = FetchOptions(connect_timeout=2, read_timeout=0.5, deadline=3, retries=2, backoff=0.05, max_backoff=0.2,
                    max_bytes=2_000_000, max_redirects=3, trust_env=False)


def test_every_fault_ends_with_its_reason(http_server: FaultServer) -> None:
    paths = ["/img/a.jpg", "/missing.jpg", "/flaky/b.jpg", "/busy/c.jpg", "/hang.jpg", "/huge.jpg",
             "/huge-declared.jpg", "/loop.jpg", "/page.jpg", "/trunc.jpg"]
    t0 = time.perf_counter()
    got = dict(zip(paths, fetch_many([http_server.url(p) for p in paths], FAST)))
    took = time.perf_counter() - t0
    assert got["/img/a.jpg"] == jpeg("a.jpg")
    assert got["/flaky/b.jpg"] == jpeg("b.jpg") and http_server.hits["/flaky/b.jpg"] == 2
    assert got["/busy/c.jpg"] == jpeg("c.jpg") and http_server.hits["/busy/c.jpg"] == 2
    assert got["/missing.jpg"] == Unreadable("fetch", "HTTP 404 Not Found")
    assert got["/hang.jpg"].stage == "fetch" and got["/hang.jpg"].reason.startswith("timeout (read) after 3 tries")
    assert got["/huge.jpg"] == Unreadable("fetch", "too large (over 2000000 bytes)")
    assert got["/huge-declared.jpg"] == Unreadable("fetch", "too large (over 2000000 bytes)")
    assert got["/loop.jpg"].reason.startswith("too many redirects")
    assert got["/page.jpg"] == Unreadable("fetch", "not an image (Content-Type text/html)")
    assert isinstance(got["/trunc.jpg"], bytes)  # fetched; it fails when decoded (tested end to end)
    assert took < 8, f"the faults took {took:.1f} s"


def test_retry_after_waits_and_is_capped(http_server: FaultServer) -> None:
    t0 = time.perf_counter()
    (body,) = fetch_many([http_server.url("/busy/x.jpg")], FAST)
    assert isinstance(body, bytes) and time.perf_counter() - t0 >= 0.9  # Retry-After: 1 honoured
    capped = FetchOptions(retries=2, max_retry_after=0.5, trust_env=False)
    (why,) = fetch_many([http_server.url("/busy/y.jpg")], capped)
    assert why.reason == "HTTP 429 Too Many Requests; Retry-After 1 s is longer than 0.5 s"
    assert retry_after_seconds("3") == 3.0 and retry_after_seconds("junk") is None
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


def test_fetches_run_concurrently_within_the_per_host_limit() -> None:
    server = FaultServer(latency=0.2)
    try:
        urls = [server.url(f"/img/{i}.jpg") for i in range(32)]
        t0 = time.perf_counter()
        got = fetch_many(urls, FetchOptions(per_host=16, trust_env=False))
        took = time.perf_counter() - t0
        assert all(isinstance(g, bytes) for g in got)
        assert 0.35 < took < 4.0, took  # two waves of 16 (0.4 s), not 32 x 0.2 s (6.4 s)
    finally:
        server.close()


def test_data_uris() -> None:
    raw = jpeg("d")
    assert decode_data_uri("data:image/jpeg;base64," + base64.b64encode(raw).decode()) == raw
    assert decode_data_uri("data:text/html,<b>x</b>").reason.startswith("not an image")
    assert decode_data_uri("data:image/png;base64").reason.startswith("not a valid data: URI")


def test_a_list_of_urls_paths_and_data_uris(tmp_path, http_server: FaultServer) -> None:
    img = tmp_path / "local.jpg"
    img.write_bytes(jpeg("local"))
    uri = "data:image/jpeg;base64," + base64.b64encode(jpeg("inline")).decode()
    lst = tmp_path / "list.txt"
    lst.write_text(f"{http_server.url('/img/a.jpg')}\nlocal.jpg\n{uri}\n{http_server.url('/missing.jpg')}\n")
    listing = list_inputs(lst)
    kinds = [r.kind for r in listing.records]
    assert kinds == ["url", "file", "data", "url"]
    assert listing.records[0].source == http_server.url("/img/a.jpg")
    payloads = listing.reader.read(listing.records)
    assert payloads[0] == jpeg("a.jpg") and payloads[1] == str(img) and payloads[2] == jpeg("inline")
    assert payloads[3] == Unreadable("fetch", "HTTP 404 Not Found")


def test_a_table_url_column_keeps_its_captions(tmp_path, http_server: FaultServer) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pa.table({"url": [http_server.url("/img/a.jpg"), http_server.url("/img/b.jpg")], "caption": ["a cat", "a dog"]})
    pq.write_table(t, tmp_path / "t.parquet")
    listing = list_inputs(tmp_path / "t.parquet")
    assert [r.kind for r in listing.records] == ["url", "url"]
    assert [r.captions for r in listing.records] == [("a cat",), ("a dog",)]
