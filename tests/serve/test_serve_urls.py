"""Images by URL in ``/v1/embeddings`` and ``image_url`` of ``POST /api/search``, and the server-side request
forgery guard in front of them.

Every live request goes to a server on a loopback address (127.0.0.0/8, ``localhost``, ``::1``), under the
``loopback_only`` tripwire (tests/conftest.py) that refuses any other resolution or connection: a guard
with a bug fails these tests, it never reaches another machine. The other ranges are covered by
tests/test_netguard.py through the address check itself.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from inputs._http import FaultServer
from starlette.testclient import TestClient
from typer.testing import CliRunner

from phiclip.fetch import FetchOptions
from phiclip.netguard import AddressGuard, refusal
from phiclip.serve import app as serve_app

from .conftest import Built, colour_loader, make_app, serve_options, vectors_close
from .test_serve_api import _error
from .test_serve_metrics import scrape, value


@pytest.fixture()
def images(colour_collection: Built) -> Iterator[FaultServer]:
    """A loopback server that also serves the colour collection's PNGs under /files/NAME.png."""
    server = FaultServer()
    for r in colour_collection.records:
        server.files[f"/files/{Path(r['path']).name}"] = Path(r["path"])
    try:
        yield server
    finally:
        server.close()


def _client(colour_collection: Built, **options: Any) -> Any:
    app, service = make_app([colour_collection.path], serve_options(fetch_timeout_s=1.0, fetch_retries=0, **options),
                            load=colour_loader())
    client = TestClient(app)
    client.service = service  # type: ignore[attr-defined]
    return client


def _uri(path: str) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def test_loopback_urls_are_refused_naming_the_url_the_reason_and_the_flag(
        loopback_only: list[str], colour_collection: Built, images: FaultServer) -> None:
    port = images.httpd.server_address[1]
    urls = [images.url("/files/red0.png"), f"http://localhost:{port}/files/red0.png",
            f"http://[::1]:{port}/files/red0.png", f"http://127.9.9.9:{port}/files/red0.png"]
    with _client(colour_collection) as client:
        for url in urls:
            err = _error(client.post("/v1/embeddings", json={"input": ["red", url]}), 400, f"input[1] {url}: ",
                         "refused (not a public address)", "loopback address", "--allow-private-urls")
            assert "resolves to" in err["message"] if "localhost" in url else True
            _error(client.post("/api/search", json={"image_url": url}), 400, f"image_url {url}: ", "loopback address",
                   "--allow-private-urls")
            _error(client.post("/api/search", data={"image_url": url}), 400, "--allow-private-urls")
        samples = scrape(client)
    assert value(samples, "phiclip_url_fetches_total", outcome="refused") == 3 * len(urls)
    assert value(samples, "phiclip_url_fetches_total", outcome="fetched") == 0
    assert images.hits == {} and loopback_only == []


def test_a_redirect_to_a_refused_address_is_refused(
        loopback_only: list[str], colour_collection: Built, images: FaultServer) -> None:
    with _client(colour_collection) as client:
        # 127.0.0.1 stands in for a public address; the redirect's hop to 127.0.0.2 is checked on its own
        client.service.fetch_options = dataclasses.replace(
            client.service.fetch_options,
            guard=AddressGuard(policy=lambda ip: None if str(ip) == "127.0.0.1" else refusal(ip)))
        hop = f"http://127.0.0.2:{images.httpd.server_address[1]}/files/red0.png"
        url = images.url("/redirect?to=" + hop)
        _error(client.post("/v1/embeddings", json={"input": [url]}), 400, f"input[0] {url}: ",
               "127.0.0.2 is a loopback address", "--allow-private-urls")
        assert client.post("/v1/embeddings", json={"input": [images.url("/files/red0.png")]}).status_code == 200
    assert images.hits["/redirect"] == 1 and loopback_only == []


def test_allowed_urls_embed_as_their_bytes_do(loopback_only: list[str], colour_collection: Built,
                                              images: FaultServer) -> None:
    red, blue = (next(r for r in colour_collection.records if r["id"] == i) for i in ("red-0", "blue-1"))
    port = images.httpd.server_address[1]
    red_url, blue_url = images.url("/files/red0.png"), f"http://localhost:{port}/files/blue1.png"
    redirected = images.url("/redirect?to=" + red_url)
    with _client(colour_collection, allow_private_urls=True) as client:
        by_url = client.post("/v1/embeddings", json={"input": ["red", red_url, _uri(blue["path"]), blue_url, redirected]})
        assert by_url.status_code == 200, by_url.text
        got = [d["embedding"] for d in by_url.json()["data"]]
        by_bytes = client.post("/v1/embeddings", json={"input": [_uri(red["path"]), _uri(blue["path"])]}).json()["data"]
        assert vectors_close(got[1], by_bytes[0]["embedding"]) and vectors_close(got[4], by_bytes[0]["embedding"])
        assert vectors_close(got[3], by_bytes[1]["embedding"]) and vectors_close(got[2], by_bytes[1]["embedding"])
        text = client.post("/v1/embeddings", json={"input": ["red"]}).json()["data"][0]["embedding"]
        assert vectors_close(got[0], text)
        # /api/search: by URL, by a data: URI in image_url, and by upload: the same results
        upload = client.post("/api/search", files={"image": ("r.png", Path(red["path"]).read_bytes(), "image/png")},
                             data={"k": "4"}).json()
        for image_url in (red_url, _uri(red["path"])):
            for body in (client.post("/api/search", json={"image_url": image_url, "k": 4}).json(),
                         client.post("/api/search", data={"image_url": image_url, "k": "4"}).json()):
                assert [r["id"] for r in body["results"]] == [r["id"] for r in upload["results"]], body
                assert body["results"][0]["id"] == "red-0" and body["query"]["image_url"].startswith(image_url[:50])
        samples = scrape(client)
    assert value(samples, "phiclip_url_fetches_total", outcome="fetched") == 5
    assert images.hits["/files/red0.png"] == 4 and loopback_only == []


def test_fetch_failures_are_400_or_413_naming_the_url(loopback_only: list[str], colour_collection: Built,
                                                      images: FaultServer) -> None:
    with _client(colour_collection, allow_private_urls=True, max_upload_bytes=200_000, timeout_s=3.0) as client:
        for path, status, fragment in [("/missing.jpg", 400, "cannot fetch the image: HTTP 404 Not Found"),
                                       ("/page.jpg", 400, "not an image (Content-Type text/html)"),
                                       ("/huge.jpg", 413, "too large (over 200000 bytes)"),
                                       ("/hang.jpg", 400, "timeout"),
                                       ("/trunc.jpg", 400, "truncated")]:
            url = images.url(path)
            _error(client.post("/v1/embeddings", json={"input": ["red", url]}), status, f"input[1] {url}", fragment)
        samples = scrape(client)
    assert value(samples, "phiclip_url_fetches_total", outcome="failed") == 4
    assert loopback_only == []


def test_which_strings_are_urls_data_uris_or_texts(loopback_only: list[str], colour: Any) -> None:
    for text in ("data: 42 rows", "http://a b", "see https://example.com/x.jpg", "httpx://nope", "DATA :x,"):
        assert colour.post("/v1/embeddings", json={"input": [text]}).status_code == 200, text  # texts
    _error(colour.post("/v1/embeddings", json={"input": ["a", "data:text/plain,hello"]}), 400,
           "input[1]: a data: URI must hold an image as data:image/<type>;base64")
    _error(colour.post("/v1/embeddings", json={"input": ["data:image/svg+xml,<svg/>"]}), 400, "data:image/<type>;base64")
    _error(colour.post("/api/search", json={"image": "http://127.0.0.1:9/a.png"}), 400, "send an image's URL as 'image_url'")
    _error(colour.post("/api/search", json={"image_url": "ftp://127.0.0.1/a.png"}), 400,
           "image_url must be an image's http(s) URL, a data:image/...;base64, URI or the URL of an item")
    assert loopback_only == []


@pytest.fixture()
def colour(colour_collection: Built) -> Iterator[Any]:
    with _client(colour_collection, max_inputs=4, max_text_chars=50) as client:
        yield client


def test_an_item_url_of_this_server_is_not_fetched(loopback_only: list[str], colour: Any) -> None:
    hit = colour.get("/api/search", params={"text": "red", "k": 1}).json()["results"][0]
    thumb = hit["thumbnail"]
    for image_url in (thumb, "http://testserver" + thumb, "http://127.0.0.1:8000" + thumb, "http://[::1]:8000" + thumb):
        body = colour.post("/api/search", json={"image_url": image_url, "k": 1}).json()
        assert body["query"] == {"id": hit["id"], "collection": "colours"}, (image_url, body)
    assert loopback_only == []


def test_cli_flags(monkeypatch: pytest.MonkeyPatch, colour_collection: Built) -> None:
    from phiclip.cli import app

    seen: dict[str, Any] = {}
    monkeypatch.setattr(serve_app, "run_server", lambda paths, options, say: seen.update(options=options))
    res = CliRunner().invoke(app, ["serve", str(colour_collection.path)])
    assert res.exit_code == 0, res.output
    opts = seen["options"]
    assert not opts.allow_private_urls and opts.fetch_options().guard == AddressGuard()
    res = CliRunner().invoke(app, ["serve", str(colour_collection.path), "--allow-private-urls", "--fetch-timeout", "3",
                                   "--fetch-retries", "0", "--max-upload-mb", "1"])
    assert res.exit_code == 0, res.output
    fetch = seen["options"].fetch_options()
    assert fetch == FetchOptions.for_timeout(3.0, retries=0, max_bytes=2**20) and fetch.guard is None
