"""Prometheus metrics of one ``phiclip serve`` application (``GET /metrics``, the text format).

Each :class:`ServeMetrics` has its own ``CollectorRegistry`` (no process-global state: two apps in one
process, as in the tests, count apart). What it holds:

- ``phiclip_requests_total{route,method,status}`` and ``phiclip_request_seconds{route}``: every HTTP
  request, by route *template* (``/api/items/{collection}/{item_id}/thumbnail``, not the id), ``other``
  for unknown paths, counted in the front process whatever engine embeds;
- ``phiclip_queue_wait_seconds{encoder,kind}``: how long each job waited for its batch;
  ``phiclip_model_seconds{encoder,kind}``: each encoder call; ``phiclip_batch_size{encoder,kind}``:
  inputs per encoder call; ``phiclip_inputs_total{encoder,kind}``: inputs embedded (``text``/``image``).
  With ``--engine ray`` the replicas measure these and send them back with their answers; the front
  process records them here, so they add up over every replica;
- ``phiclip_queue_depth{encoder}``: inputs waiting now (read at scrape time);
- ``phiclip_thumbnails_total`` (served) and ``phiclip_thumbnail_cache_hits_total``;
- ``phiclip_url_fetches_total{outcome}``: images by URL, ``fetched``, ``refused`` (not a public address)
  or ``failed`` (HTTP error, timeout, too large...);
- ``phiclip_model_info{collection,encoder,precision,fingerprint}`` (value 1), ``phiclip_ready`` (0/1),
  ``phiclip_replicas{encoder}`` (replicas running, Ray engine only).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

try:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.exposition import CONTENT_TYPE_LATEST
except ImportError as e:  # pragma: no cover - depends on the installation
    raise ImportError(
        f"phiclip serve needs prometheus-client for /metrics ({e.name} is missing): pip install 'phiclip[serve]'"
    ) from None

#: Buckets (seconds) of the latency histograms: 1 ms to 60 s.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Buckets of the batch-size histogram (inputs per encoder call).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

#: What one encoder call reports: ``(kind, inputs, model seconds, queue wait of each job in it)``.
BatchRecord = tuple[str, int, float, Sequence[float]]


class _LiveGauges:
    """Gauges read when scraped: queue depth per encoder, readiness and replica counts."""

    def __init__(self) -> None:
        self.depth: Callable[[], dict[str, int]] = dict
        self.replicas: Callable[[], dict[str, int]] = dict
        self.ready: Callable[[], bool] = lambda: False

    def describe(self) -> Iterable[Any]:
        return []  # values come from collect() only (nothing to check at registration)

    def collect(self) -> Iterable[Any]:
        depth = GaugeMetricFamily("phiclip_queue_depth", "Inputs waiting for an encoder now.", labels=["encoder"])
        for spec, n in sorted(self.depth().items()):
            depth.add_metric([spec], n)
        yield depth
        yield GaugeMetricFamily("phiclip_ready", "1 once every collection is loaded and warmed up (/readyz).",
                                value=1 if self.ready() else 0)
        replicas = self.replicas()
        if replicas:
            g = GaugeMetricFamily("phiclip_replicas", "Encoder replicas running (--engine ray).", labels=["encoder"])
            for spec, n in sorted(replicas.items()):
                g.add_metric([spec], n)
            yield g


class ServeMetrics:
    """The counters and histograms of one app, in a registry of its own (:meth:`render` for ``/metrics``)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("phiclip_requests", "HTTP requests answered, by route template and status.",
                                ["route", "method", "status"], registry=r)
        self.request_seconds = Histogram("phiclip_request_seconds", "Time to answer a request (whole request).",
                                         ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("phiclip_queue_wait_seconds", "Time a job waited in the queue for its batch.",
                                    ["encoder", "kind"], buckets=LATENCY_BUCKETS, registry=r)
        self.model_seconds = Histogram("phiclip_model_seconds", "Time of one encoder call (one batch).",
                                       ["encoder", "kind"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("phiclip_batch_size", "Inputs per encoder call.", ["encoder", "kind"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.inputs = Counter("phiclip_inputs", "Inputs embedded, by kind (text or image).", ["encoder", "kind"],
                              registry=r)
        self.thumbnails = Counter("phiclip_thumbnails", "Thumbnails served.", registry=r)
        self.thumbnail_hits = Counter("phiclip_thumbnail_cache_hits", "Thumbnails served from the cache.", registry=r)
        self.url_fetches = Counter("phiclip_url_fetches", "Images by URL: fetched, refused (not a public address) "
                                   "or failed.", ["outcome"], registry=r)
        self.model_info = Gauge("phiclip_model_info", "The encoder of each collection (value 1).",
                                ["collection", "encoder", "precision", "fingerprint"], registry=r)
        self.live = _LiveGauges()
        r.register(self.live)
        self._lock = threading.Lock()

    # --- recording ----------------------------------------------------------------------------
    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.request_seconds.labels(route).observe(seconds)

    def observe_batch(self, encoder: str, record: BatchRecord) -> None:
        """One encoder call: its inputs, its time and the queue wait of each of its jobs."""
        kind, n, seconds, waits = record
        self.model_seconds.labels(encoder, kind).observe(seconds)
        self.batch_size.labels(encoder, kind).observe(n)
        self.inputs.labels(encoder, kind).inc(n)
        hist = self.queue_wait.labels(encoder, kind)
        for w in waits:
            hist.observe(max(0.0, w))

    def batch_observer(self, encoder: str) -> Callable[[BatchRecord], None]:
        """A callback for :class:`~phiclip.serve.batching.DynamicBatcher` recording under ``encoder``."""
        return lambda record: self.observe_batch(encoder, record)

    def observe_thumbnail(self, cache_hit: bool) -> None:
        self.thumbnails.inc()
        if cache_hit:
            self.thumbnail_hits.inc()

    def observe_fetches(self, outcome: str, n: int = 1) -> None:
        """``n`` image URLs ended as ``outcome`` (``fetched``, ``refused``, ``failed``)."""
        self.url_fetches.labels(outcome).inc(n)

    def set_model_info(self, collection: str, encoder: str, precision: str, fingerprint: str) -> None:
        self.model_info.labels(collection, encoder, precision, fingerprint).set(1)

    # --- exposition ---------------------------------------------------------------------------
    def render(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)


__all__ = ["BATCH_BUCKETS", "LATENCY_BUCKETS", "BatchRecord", "ServeMetrics"]
