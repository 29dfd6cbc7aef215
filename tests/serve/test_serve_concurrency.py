"""Many requests at once against a real uvicorn server: batched answers equal one-at-a-time answers,
the model is never called from two threads, and a full queue answers 503 instead of growing."""

from __future__ import annotations

import base64
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from .conftest import (
    Built,
    RecordingEncoder,
    colour_loader,
    live_server,
    make_app,
    serve_options,
    vectors_close,
)

pytestmark = pytest.mark.timeout(180)


def _requests(built: Built) -> list[tuple[str, str, dict[str, Any]]]:
    """Distinct requests of every kind that reaches the model: text search, image search, embeddings."""
    words = ["red", "green", "blue", "yellow", "circle", "a photo"]
    out: list[tuple[str, str, dict[str, Any]]] = []
    for i, w in enumerate(words):
        out.append(("GET", "/api/search", {"params": {"text": f"{w} {i}", "k": 5}}))
        out.append(("POST", "/v1/embeddings", {"json": {"input": [f"{w} thing", f"not {w}"][: 1 + i % 2]}}))
    for r in built.records[:6]:
        data = Path(r["path"]).read_bytes()
        out.append(("POST", "/api/search", {"files": {"image": ("q.png", data, "image/png")}, "data": {"k": "5"}}))
        uri = "data:image/png;base64," + base64.b64encode(data).decode()
        out.append(("POST", "/v1/embeddings", {"json": {"input": [uri, "and a text"]}}))
    return out


def _same(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Equal answers, up to float rounding (a batch may sum in another order); ids equal where the
    scores are not tied."""
    if "data" in a:
        assert len(a["data"]) == len(b["data"])
        for x, y in zip(a["data"], b["data"]):
            assert x["index"] == y["index"] and vectors_close(x["embedding"], y["embedding"], 1e-5)
        return
    sa = np.array([r["score"] for r in a["results"]])
    sb = np.array([r["score"] for r in b["results"]])
    assert np.allclose(sa, sb, atol=1e-5)
    for i, (x, y) in enumerate(zip(a["results"], b["results"])):
        tied = any(abs(sa[i] - sa[j]) < 1e-4 for j in range(len(sa)) if j != i)
        if not tied:
            assert x["id"] == y["id"], (i, x, y)


def test_concurrent_answers_equal_serial_answers(clip_collection: Built) -> None:
    from phiclip.encoders import load_encoder

    recorders: list[RecordingEncoder] = []

    def load(spec: str, **kw: Any) -> Any:
        enc = load_encoder(spec, **kw)
        recorders.append(RecordingEncoder(enc))
        return enc

    app, service = make_app([clip_collection.path], serve_options(batch_wait_ms=20, max_batch=16), load=load)
    reqs = _requests(clip_collection)
    with live_server(app) as base, httpx.Client(base_url=base, timeout=60) as client:
        serial = []
        for method, path, kw in reqs:
            r = client.request(method, path, **kw)
            assert r.status_code == 200, r.text
            serial.append(r.json())
        serial_calls = len(recorders[0].calls)
        start = threading.Barrier(len(reqs))

        def one(i: int) -> dict[str, Any]:
            method, path, kw = reqs[i]
            with httpx.Client(base_url=base, timeout=60) as c:  # one connection per client thread
                start.wait(30)
                r = c.request(method, path, **kw)
            assert r.status_code == 200, r.text
            return r.json()

        with ThreadPoolExecutor(len(reqs)) as pool:
            together = list(pool.map(one, range(len(reqs))))
        stats = client.get("/api/stats").json()["batchers"][clip_collection.spec]
    rec = recorders[0]
    for a, b in zip(serial, together):
        _same(a, b)
    assert stats["max_batch"] > 1, stats  # requests did share encoder calls
    assert len(rec.calls) - serial_calls < len(reqs)  # fewer model calls than requests
    assert rec.overlaps == 0 and len(rec.threads) == 1  # one thread, never two calls at once
    assert stats["rejected"] == 0 and stats["failed"] == 0 and stats["queue_depth"] == 0


def _gated_app(built: Built, **opts: Any) -> tuple[Any, Any, threading.Event, threading.Event]:
    """The colour collection with an encoder whose text calls wait for a gate."""
    gate, entered = threading.Event(), threading.Event()

    def load(spec: str, **kw: Any) -> Any:
        enc = colour_loader()(spec)
        inner = enc.encode_texts

        def encode_texts(texts: Any, batch_size: int = 256) -> Any:
            entered.set()
            assert gate.wait(30)
            return inner(texts, batch_size)

        enc.encode_texts = encode_texts
        return enc

    app, service = make_app([built.path], serve_options(**opts), load=load)
    return app, service, gate, entered


def test_full_queue_answers_503_and_never_grows(colour_collection: Built) -> None:
    app, service, gate, entered = _gated_app(colour_collection, max_queue=3, max_batch=1, batch_wait_ms=0)
    with live_server(app) as base:
        with ThreadPoolExecutor(16) as pool:
            def ask(i: int) -> httpx.Response:
                with httpx.Client(base_url=base, timeout=30) as c:
                    return c.get("/api/search", params={"text": f"red {i}", "k": 1})

            first = pool.submit(ask, 0)
            assert entered.wait(10)  # the model holds request 0; the queue is empty
            rest = [pool.submit(ask, i) for i in range(1, 16)]
            while sum(f.done() for f in rest) < 12:  # 3 wait in the queue, 12 are turned away
                threading.Event().wait(0.02)
            assert service.batchers[colour_collection.spec].queue_depth() == 3
            gate.set()
            answers = [first.result(30), *(f.result(30) for f in rest)]
        codes = sorted(r.status_code for r in answers)
        assert codes == [200] * 4 + [503] * 12, codes
        busy = next(r for r in answers if r.status_code == 503)
        assert "queue is full" in busy.json()["error"]["message"] and busy.headers["retry-after"] == "1"
        assert all(r.json()["results"][0]["label"] == "red" for r in answers if r.status_code == 200)
        stats = httpx.get(base + "/api/stats").json()["batchers"][colour_collection.spec]
        assert stats["max_queue_depth"] == 3 and stats["rejected"] == 12 and stats["jobs"] == 4


def test_request_timeout_is_503_and_drops_the_job(colour_collection: Built) -> None:
    app, service, gate, entered = _gated_app(colour_collection, timeout_s=0.5, max_batch=1, batch_wait_ms=0)
    with live_server(app) as base, ThreadPoolExecutor(2) as pool:
        slow = pool.submit(httpx.get, base + "/api/search", params={"text": "red"}, timeout=30)
        assert entered.wait(10)
        late = httpx.get(base + "/api/search", params={"text": "blue"}, timeout=30)  # waits behind "red"
        assert late.status_code == 503 and "timed out after 0.5 s" in late.json()["error"]["message"]
        gate.set()
        assert slow.result(30).status_code == 503  # it also waited over 0.5 s
        stats = httpx.get(base + "/api/stats").json()["batchers"][colour_collection.spec]
        assert stats["cancelled"] == 1 and stats["jobs"] == 1  # "blue" never reached the model
        ok = httpx.get(base + "/api/search", params={"text": "green"}, timeout=30)
        assert ok.status_code == 200 and ok.json()["results"][0]["label"] == "green"


def test_requests_beyond_max_in_flight_get_503_at_once(colour_collection: Built) -> None:
    # the encoder queue is roomy: what turns requests away here is the bound on requests being answered
    app, service, gate, entered = _gated_app(colour_collection, max_in_flight=3, max_queue=100, max_batch=1,
                                             batch_wait_ms=0)
    with live_server(app) as base, ThreadPoolExecutor(12) as pool:
        def ask(i: int) -> httpx.Response:
            return httpx.get(base + "/api/search", params={"text": f"red {i}", "k": 1}, timeout=30)

        held = [pool.submit(ask, 0)]
        assert entered.wait(10)
        held += [pool.submit(ask, i) for i in (1, 2)]
        while service.batchers[colour_collection.spec].queue_depth() < 2:
            threading.Event().wait(0.02)
        turned_away = [ask(i) for i in range(3, 8)]  # answered while 3 are in flight, without waiting
        assert [r.status_code for r in turned_away] == [503] * 5
        assert all(r.headers["retry-after"] == "1" and "--max-in-flight 3" in r.json()["error"]["message"]
                   for r in turned_away)
        assert httpx.get(base + "/readyz").status_code == 200  # probes are not counted
        gate.set()
        assert [f.result(30).status_code for f in held] == [200] * 3
        assert ask(9).status_code == 200


def test_a_request_waiting_for_a_decoding_thread_ends_at_its_deadline(colour_collection: Built) -> None:
    release, started, armed = threading.Event(), threading.Event(), threading.Event()

    def load(spec: str, **kw: Any) -> Any:
        enc = colour_loader()(spec)
        inner = enc.preprocess

        def preprocess(img: Any) -> Any:
            if armed.is_set() and not started.is_set():  # the first upload holds the only decoding thread
                started.set()
                assert release.wait(30)
            return inner(img)

        enc.preprocess = preprocess
        return enc

    app, service = make_app([colour_collection.path], serve_options(timeout_s=0.5), load=load)
    png = Path(colour_collection.records[0]["path"]).read_bytes()
    with live_server(app) as base, ThreadPoolExecutor(2) as pool:
        while httpx.get(base + "/readyz").status_code != 200:  # the warm-up batch preprocesses too
            threading.Event().wait(0.02)
        service.cpu_limiter.total_tokens = 1
        armed.set()

        def upload() -> httpx.Response:
            return httpx.post(base + "/api/search", files={"image": ("a.png", png, "image/png")}, timeout=30)

        first = pool.submit(upload)
        assert started.wait(10)
        late = upload()
        assert late.status_code == 503 and late.headers["retry-after"] == "1"
        assert "timed out after 0.5 s waiting to decode" in late.json()["error"]["message"]
        release.set()
        assert first.result(30).status_code == 503  # its own deadline passed while it was held


def test_behind_a_proxy_prefix(colour_collection: Built) -> None:
    """--root-path /phiclip, as behind `location /phiclip/ { proxy_pass http://127.0.0.1:PORT/; }`:
    requests arrive without the prefix, URLs in answers carry it, the token cookie is scoped to it."""
    app, _ = make_app([colour_collection.path], serve_options(token="tok", root_path="/phiclip"), load=colour_loader())
    auth = {"Authorization": "Bearer tok"}
    with live_server(app, root_path="/phiclip") as base:
        assert httpx.get(base + "/healthz").status_code == 200
        hit = httpx.get(base + "/api/search", params={"text": "red"}, headers=auth).json()["results"][0]
        assert hit["thumbnail"] == f"/phiclip/api/items/colours/{hit['id']}/thumbnail" and hit["label"] == "red"
        assert httpx.get(base + hit["thumbnail"][len("/phiclip"):], headers=auth).status_code == 200
        like = httpx.post(base + "/api/search", json={"image_url": hit["thumbnail"]}, headers=auth).json()
        assert like["results"][0]["id"] == hit["id"] and like["query"]["id"] == hit["id"]
        page = httpx.get(base + "/?token=tok")
        assert page.status_code == 303 and page.headers["location"] == "/phiclip/"
        assert "Path=/phiclip/" in page.headers["set-cookie"]
        assert httpx.get(base + "/", cookies={"phiclip_token": "tok"}).status_code == 200
        assert httpx.get(base + "/api/search", params={"text": "red"}).status_code == 401
