"""Every setting of ``phiclip serve``, with its default (declared here only; the CLI fills this object).

Light on purpose: importing it loads neither the web stack nor the models.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from phiclip.fetch import FetchOptions
from phiclip.images import DEFAULT_MAX_PIXELS
from phiclip.netguard import AddressGuard

MIB = 1024 * 1024


@dataclass
class ServeOptions:
    """Settings of one server."""

    #: Address to bind: loopback by default; any other address needs ``token``.
    host: str = "127.0.0.1"
    port: int = 8000
    #: When set, every route but ``/healthz`` needs ``Authorization: Bearer TOKEN`` (or the cookie the
    #: page sets after ``/?token=TOKEN``).
    token: str | None = None
    #: Where the encoders run and in what precision (as for ``phiclip search``).
    device: str = "auto"
    precision: str = "auto"
    #: Dynamic batching: the most items per encoder call, and how long the oldest waiting request
    #: may wait for others to join its batch.
    max_batch: int = 32
    batch_wait_ms: float = 5.0
    #: The most items waiting for an encoder; beyond it requests get 503 at once.
    max_queue: int = 256
    #: Seconds from a request's arrival until it gets 503 if not answered: every wait (a thread to decode
    #: on, fetching its URLs, the encoder) ends by then.
    timeout_s: float = 30.0
    #: The most requests to ``/api/`` and ``/v1/`` answered at once; beyond, 503 with ``Retry-After`` at
    #: once (what bounds the work before the encoder queue: reading, decoding, fetching).
    max_in_flight: int = 128
    #: The largest uploaded image (bytes) and the largest request body (bytes): 413 beyond.
    max_upload_bytes: int = 16 * MIB
    max_body_bytes: int = 48 * MIB
    #: The most entries in one ``/v1/embeddings`` ``input`` list (413 beyond), the longest text
    #: (characters, 413 beyond) and the most results of one search (400 beyond).
    max_inputs: int = 64
    max_text_chars: int = 2000
    max_k: int = 200
    #: Uploaded images with more pixels are refused (as ``phiclip embed`` does); ``None``: no limit.
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    #: Bytes of generated thumbnails kept in memory.
    thumbnail_cache_bytes: int = 64 * MIB
    #: Host names accepted in the ``Host`` header besides loopback ones (e.g. the name a reverse
    #: proxy forwards). Without a token, only loopback names and these are accepted.
    allowed_hosts: tuple[str, ...] = field(default_factory=tuple)
    #: Serve outputs of unfinished ``phiclip embed`` runs (``complete: false``) instead of refusing them.
    allow_incomplete: bool = False
    #: The path prefix the server is mounted under behind a reverse proxy (e.g. ``/phiclip``).
    root_path: str = ""
    #: An encoder spec used in place of each output's recorded one (a checkpoint that moved); refused
    #: when its weights differ from the recorded ones unless ``allow_other_weights``.
    model: str | None = None
    allow_other_weights: bool = False
    #: ``GET /metrics`` open like ``/healthz`` (True) or, when a token is set, behind it like every other
    #: route (False, the default: metrics name the collections and models).
    metrics_open: bool = False
    #: On SIGTERM: stop accepting, then give requests in flight up to this many seconds to finish (those
    #: still running after it are cut); then exit 0. Below Kubernetes' default 30 s grace period.
    drain_s: float = 25.0
    #: Where the encoders run: ``local`` (in this process, one batcher thread per encoder) or ``ray``
    #: (a Ray Serve deployment per encoder, one model copy per replica, each batching on its own).
    engine: str = "local"
    #: Ray engine: a fixed number of replicas, or an autoscaling range (``min_replicas``..``max_replicas``).
    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    #: Ray engine: the cluster to join (``None``: a running local instance, else a new local one).
    ray_address: str | None = None
    #: Ray engine: GPUs per replica (``None``: 1 where the cluster has GPUs and ``device`` is not ``cpu``),
    #: CPUs per replica (what Ray reserves; torch in a replica uses as many threads).
    gpus_per_replica: float | None = None
    cpus_per_replica: float = 1.0
    #: Images by URL (``/v1/embeddings`` inputs, ``image_url`` of ``/api/search``) are fetched only from
    #: public addresses, checked after resolving the host and on every redirect
    #: (:mod:`phiclip.netguard`); True also allows private, loopback and link-local ones.
    allow_private_urls: bool = False
    #: Fetching those URLs (:mod:`phiclip.fetch`, as ``embed`` fetches its URL inputs): seconds without a
    #: byte before an attempt fails, and retries (on timeouts, 5xx, 429). The request's ``timeout_s``
    #: bounds the whole fetch; the body's limit is ``max_upload_bytes``.
    fetch_timeout_s: float = 10.0
    fetch_retries: int = 1

    def fetch_options(self) -> FetchOptions:
        """How this server fetches images by URL (the address guard unless ``allow_private_urls``)."""
        return FetchOptions.for_timeout(self.fetch_timeout_s, retries=self.fetch_retries,
                                        max_bytes=self.max_upload_bytes,
                                        guard=None if self.allow_private_urls else AddressGuard())

    def validate(self) -> ServeOptions:
        """Check ranges and the host/token rule; returns self. Raises ``ValueError`` naming the setting."""
        for name in ("max_batch", "max_queue", "max_in_flight", "max_upload_bytes", "max_body_bytes", "max_inputs", "max_text_chars",
                     "max_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_wait_ms < 0 or self.timeout_s <= 0:
            raise ValueError(f"batch_wait_ms must be >= 0 and timeout_s > 0 (got {self.batch_wait_ms}, {self.timeout_s})")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0-65535, got {self.port}")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise ValueError(f"max_pixels must be positive (or None for no limit), got {self.max_pixels}")
        if self.token is not None and not self.token.strip():
            raise ValueError("the token is empty; give a long random string (e.g. `openssl rand -hex 32`)")
        if self.root_path and (not self.root_path.startswith("/") or self.root_path.endswith("/")):
            raise ValueError(f"root_path {self.root_path!r} must start with '/' and not end with one (e.g. /phiclip)")
        if self.fetch_timeout_s <= 0 or self.fetch_retries < 0:
            raise ValueError(f"fetch_timeout_s must be > 0 and fetch_retries >= 0 (got {self.fetch_timeout_s}, "
                             f"{self.fetch_retries})")
        if self.drain_s < 0:
            raise ValueError(f"drain_s must be >= 0, got {self.drain_s}")
        if self.engine not in ("local", "ray"):
            raise ValueError(f"engine must be 'local' or 'ray', got {self.engine!r}")
        if self.replicas < 1 or self.cpus_per_replica <= 0 or (self.gpus_per_replica or 0) < 0:
            raise ValueError(f"replicas must be >= 1 and cpus_per_replica > 0 (got {self.replicas}, {self.cpus_per_replica})")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("give both --min-replicas and --max-replicas for autoscaling (or --replicas N)")
        if self.min_replicas is not None and not 0 < self.min_replicas <= (self.max_replicas or 0):
            raise ValueError(f"need 1 <= min_replicas <= max_replicas, got {self.min_replicas}..{self.max_replicas}")
        if self.engine == "local" and (self.replicas != 1 or self.min_replicas is not None or self.ray_address):
            raise ValueError("--replicas, --min-replicas/--max-replicas and --ray-address need --engine ray")
        if not is_loopback(self.host) and not self.token:
            raise ValueError(
                f"binding to {self.host} would open the API to the network without authentication; pass "
                "--token SECRET (clients send 'Authorization: Bearer SECRET'), or keep the default 127.0.0.1 "
                "behind a reverse proxy"
            )
        return self


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) only accepts connections from this machine."""
    if host.strip().lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


__all__ = ["MIB", "ServeOptions", "is_loopback"]
