"""``GET /metrics`` (parsed with prometheus-client's own parser: counts after known requests), ``GET /readyz``
(503 while loading or warming up or draining, 200 once ready) and ``/healthz`` staying liveness."""

from __future__ import annotations

import base64
import io
import threading
import time
from typing import Any

import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from phiclip.serve import build_service, create_app
from phiclip.serve.app import start_draining

from .conftest import Built, colour_loader, make_app, serve_options


def _png(rgb: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), rgb).save(buf, format="PNG")
    return buf.getvalue()


def scrape(client: Any, **kw: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``/metrics`` as ``{(sample name, sorted labels): value}``."""
    r = client.get("/metrics", **kw)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(r.text) for s in fam.samples}


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (0 when none)."""
    return sum(v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items())


def wait_ready(client: Any, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, client.get("/readyz").json()
        time.sleep(0.02)


def test_metrics_count_known_requests(colour_collection: Built) -> None:
    app, service = make_app([colour_collection.path], serve_options(), load=colour_loader())
    item = colour_collection.records[0]["id"]
    uri = "data:image/png;base64," + base64.b64encode(_png((0, 200, 0))).decode()
    with TestClient(app) as client:
        wait_ready(client)
        for w in ("red", "green", "blue"):
            assert client.get("/api/search", params={"text": w, "k": 2}).status_code == 200
        assert client.post("/v1/embeddings", json={"input": ["red", "blue", uri]}).status_code == 200
        for _ in range(2):  # a miss, then a cache hit
            assert client.get(f"/api/items/colours/{item}/thumbnail").status_code == 200
        assert client.get("/api/items/colours/no-such-id/thumbnail").status_code == 404
        assert client.get("/no/such/route").status_code == 404
        m = scrape(client)

    assert value(m, "phiclip_requests_total", route="/api/search", method="GET", status="200") == 3
    assert value(m, "phiclip_requests_total", route="/v1/embeddings", method="POST", status="200") == 1
    thumb = "/api/items/{collection}/{item_id}/thumbnail"  # the route's template, not each id
    assert value(m, "phiclip_requests_total", route=thumb, status="200") == 2
    assert value(m, "phiclip_requests_total", route=thumb, status="404") == 1
    assert value(m, "phiclip_requests_total", route="other", status="404") == 1
    assert value(m, "phiclip_request_seconds_count", route="/api/search") == 3
    assert value(m, "phiclip_readyz_total") == 0 and value(m, "phiclip_requests_total", route="/readyz") >= 1
    spec = colour_collection.spec
    assert value(m, "phiclip_inputs_total", encoder=spec, kind="text") == 5  # 3 searches + 2 texts
    assert value(m, "phiclip_inputs_total", encoder=spec, kind="image") == 1
    # every input went through one batch; the histograms add up to the same counts
    assert value(m, "phiclip_batch_size_sum", encoder=spec) == 6
    batches = value(m, "phiclip_batch_size_count", encoder=spec)
    assert 2 <= batches <= 5 and value(m, "phiclip_model_seconds_count", encoder=spec) == batches
    assert value(m, "phiclip_queue_wait_seconds_count", encoder=spec) == 5  # 3 search jobs + 2 embeddings jobs
    assert value(m, "phiclip_queue_depth", encoder=spec) == 0
    assert value(m, "phiclip_thumbnails_total") == 2 and value(m, "phiclip_thumbnail_cache_hits_total") == 1
    assert value(m, "phiclip_ready") == 1
    info = [dict(ls) for (n, ls), v in m.items() if n == "phiclip_model_info" and v == 1]
    assert info == [{"collection": "colours", "encoder": spec, "precision": "unknown", "fingerprint": ""}]


def test_model_info_of_a_real_model_and_registries_apart(clip_collection: Built, colour_collection: Built) -> None:
    app1, _ = make_app([clip_collection.path], serve_options())
    app2, _ = make_app([colour_collection.path], serve_options(), load=colour_loader())
    with TestClient(app1) as c1, TestClient(app2) as c2:
        assert c1.get("/api/search", params={"text": "red"}).status_code == 200
        m1, m2 = scrape(c1), scrape(c2)
    info = next(dict(ls) for (n, ls), _ in m1.items() if n == "phiclip_model_info")
    assert info["encoder"] == clip_collection.spec and info["precision"] == "float32"
    assert info["fingerprint"].startswith("sha256:")
    # each app its own registry: the other app's request is not counted here
    assert value(m1, "phiclip_requests_total", route="/api/search") == 1
    assert value(m2, "phiclip_requests_total", route="/api/search") == 0


def test_metrics_behind_the_token_unless_open(colour_collection: Built) -> None:
    for open_, status in ((False, 401), (True, 200)):
        app, _ = make_app([colour_collection.path], serve_options(token="tok", metrics_open=open_), load=colour_loader())
        with TestClient(app) as client:
            assert client.get("/metrics").status_code == status
            assert client.get("/metrics", headers={"Authorization": "Bearer tok"}).status_code == 200
            assert client.get("/readyz").status_code in (200, 503)  # open, like /healthz
            assert client.get("/healthz").status_code == 200
            m = scrape(client, headers={"Authorization": "Bearer tok"})
            assert value(m, "phiclip_requests_total", route="/metrics", status="401") == (0 if open_ else 1)


def test_readyz_waits_for_the_warm_up_batch(colour_collection: Built) -> None:
    gate, entered = threading.Event(), threading.Event()

    def load(spec: str, **kw: Any) -> Any:
        enc = colour_loader()(spec)
        inner = enc.encode_batch

        def encode_batch(batch: Any, **kw: Any) -> Any:
            entered.set()
            assert gate.wait(30)
            return inner(batch, **kw)

        enc.encode_batch = encode_batch
        return enc

    app, _ = make_app([colour_collection.path], serve_options(), load=load)
    with TestClient(app) as client:
        assert entered.wait(10)  # the warm-up batch is in the model
        r = client.get("/readyz")
        assert r.status_code == 503 and r.headers["retry-after"]
        assert any("warming up" in w for w in r.json()["waiting_for"])
        assert client.get("/healthz").status_code == 200  # liveness all along
        assert value(scrape(client), "phiclip_ready") == 0
        gate.set()
        wait_ready(client)
        assert client.get("/readyz").json() == {"status": "ready", "waiting_for": []}
        start_draining(app)  # what SIGTERM does first
        r = client.get("/readyz")
        assert r.status_code == 503 and "draining" in r.json()["waiting_for"][0]
        assert client.get("/api/search", params={"text": "red"}).status_code == 200  # still answered


def test_readyz_while_loading_in_the_background(colour_collection: Built) -> None:
    release = threading.Event()
    opts = serve_options()

    def loader() -> Any:
        assert release.wait(30)
        return build_service([colour_collection.path], opts, load=colour_loader())

    loaded: list[Any] = []
    app = create_app(loader, options=opts, on_loaded=loaded.append)
    with TestClient(app) as client:
        r = client.get("/readyz")
        assert r.status_code == 503 and "loading" in r.json()["waiting_for"][0]
        busy = client.get("/api/search", params={"text": "red"})
        assert busy.status_code == 503 and busy.headers["retry-after"] == "5" and "loading" in busy.json()["error"]["message"]
        assert client.get("/healthz").status_code == 200 and client.get("/metrics").status_code == 200
        release.set()
        wait_ready(client)
        assert loaded and client.get("/api/search", params={"text": "red"}).json()["results"][0]["label"] == "red"


def test_a_failed_load_is_reported(tmp_path: Any) -> None:
    failures: list[BaseException] = []

    def loader() -> Any:
        raise ValueError("no encoder here")

    app = create_app(loader, options=serve_options(), on_fatal=failures.append)
    with TestClient(app) as client:
        deadline = time.monotonic() + 10
        while not failures:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        r = client.get("/readyz")
        assert r.status_code == 503 and "loading failed: ValueError: no encoder here" in r.json()["waiting_for"][0]
    assert isinstance(failures[0], ValueError)


@pytest.mark.parametrize("bad", [dict(engine="spark"), dict(replicas=2), dict(engine="ray", min_replicas=2),
                                 dict(engine="ray", min_replicas=3, max_replicas=2), dict(drain_s=-1)])
def test_engine_options_are_checked(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        serve_options(**bad).validate()
