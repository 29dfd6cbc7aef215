"""``phiclip serve --engine ray``: the encoder on 2 Ray Serve replicas (a local Ray on loopback, a tiny CLIP)
behind the same routes; ``/metrics`` counts exactly the requests sent and the inputs embedded by every
replica; killing one replica's process answers each request in flight with 200 or 503 + Retry-After,
never a hang, and Ray Serve starts a replacement. Without Ray Serve: a clear error naming the extra."""

from __future__ import annotations

import base64
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from phiclip.serve import ServeOptions, build_service, create_app

from .conftest import Built, live_server
from .test_serve_metrics import value

SRC = Path(__file__).resolve().parents[2] / "src"
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray's own (pydantic) warnings


def test_without_ray_serve_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch, colour_collection: Built) -> None:
    from phiclip.cli import app
    from phiclip.serve import ray_engine

    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(RuntimeError, match=r"pip install 'phiclip\[ray\]'"):
        ray_engine.available()
    res = CliRunner().invoke(app, ["serve", str(colour_collection.path), "--port", "0", "--engine", "ray"])
    assert res.exit_code == 1 and "phiclip[ray]" in res.output and "serving on" not in res.output, res.output
    res = CliRunner().invoke(app, ["serve", str(colour_collection.path), "--port", "0", "--replicas", "2"])
    assert res.exit_code == 1 and "--engine ray" in res.output, res.output


@pytest.fixture(scope="module")
def local_ray() -> Iterator[Any]:
    try:
        import ray
        import ray.serve  # noqa: F401
    except ImportError:
        pytest.skip("ray[serve] is not installed (pip install 'phiclip[ray]'; CI installs that extra)")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # nothing leaves this machine
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level=logging.WARNING,
             log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(SRC)}})
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.mark.timeout(150)
def test_two_replicas_count_and_survive_a_killed_replica(local_ray: Any, clip_collection: Built) -> None:
    # each replica holds a batch 0.4 s for more inputs: requests are in flight at the replicas when one is killed
    opts = ServeOptions(engine="ray", replicas=2, cpus_per_replica=0.5, batch_wait_ms=400, max_batch=256,
                        timeout_s=20)
    service = build_service([clip_collection.path], opts)
    app = create_app(service)
    spec = clip_collection.spec
    uris = ["data:image/png;base64," + base64.b64encode(Path(r["path"]).read_bytes()).decode()
            for r in clip_collection.records[:3]]
    with live_server(app) as base, ThreadPoolExecutor(12) as pool:
        assert httpx.get(base + "/readyz").status_code == 200

        def send(i: int) -> httpx.Response:
            if i % 2:
                return httpx.get(base + "/api/search", params={"text": f"red {i}", "k": 3}, timeout=60)
            return httpx.post(base + "/v1/embeddings", json={"input": [f"text {i}", *uris]}, timeout=60)

        sent = 24
        answers = list(pool.map(send, range(sent)))
        assert [r.status_code for r in answers] == [200] * sent
        stats = httpx.get(base + "/api/stats").json()["batchers"][spec]
        m = {(s, ls): v for (s, ls), v in _scrape(base).items()}
        counted = (value(m, "phiclip_requests_total", route="/api/search")
                   + value(m, "phiclip_requests_total", route="/v1/embeddings"))
        assert counted == sent
        assert value(m, "phiclip_inputs_total", encoder=spec, kind="image") == 3 * sent / 2
        assert value(m, "phiclip_inputs_total", encoder=spec, kind="text") == sent
        assert value(m, "phiclip_batch_size_sum", encoder=spec) == 4 * sent / 2 + sent / 2  # from both replicas
        assert value(m, "phiclip_queue_wait_seconds_count", encoder=spec) == sent + sent / 2  # jobs
        assert value(m, "phiclip_replicas", encoder=spec) == 2
        assert len(stats["replica_pids"]) == 2, stats  # both replicas answered

        # kill one replica while 12 requests are in flight
        victim = stats["replica_pids"][0]
        t0 = time.monotonic()
        futures = [pool.submit(send, i) for i in range(12)]
        deadline = time.monotonic() + 10
        while httpx.get(base + "/api/stats").json()["batchers"][spec]["queue_depth"] < 12:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(victim, signal.SIGKILL)
        answers = [f.result(60) for f in futures]
        assert time.monotonic() - t0 < opts.timeout_s + 5  # nothing hung
        codes = sorted(r.status_code for r in answers)
        assert set(codes) <= {200, 503} and 200 in codes, codes
        assert all(r.headers.get("retry-after") for r in answers if r.status_code == 503)
        # Ray Serve replaces the replica; requests are answered again, by two replicas
        deadline = time.monotonic() + 60
        while True:
            ok = send(1).status_code == 200
            if ok and httpx.get(base + "/api/stats").json()["batchers"][spec]["replicas"] == 2:
                break
            assert time.monotonic() < deadline, httpx.get(base + "/api/stats").json()
            time.sleep(0.5)
        m = _scrape(base)
        assert (value(m, "phiclip_requests_total", route="/api/search")
                + value(m, "phiclip_requests_total", route="/v1/embeddings")) >= sent + 12


def _scrape(base: str) -> dict[Any, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(base + "/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}
