"""``phiclip serve --engine ray``: each encoder as a Ray Serve deployment, behind the same HTTP front.

The front process (Starlette, :mod:`phiclip.serve.app`) keeps the collections (indexes, fields,
thumbnails), the routes, the token and the metrics; it loads no model. Each distinct encoder spec
becomes one Ray Serve application of :class:`EncoderReplica` replicas (``--replicas N``, or an
autoscaling range): every replica loads its own copy of the model (on its own GPU where the cluster has
GPUs), decodes and preprocesses the images it is sent, and batches the requests it holds with its own
:class:`~phiclip.serve.batching.DynamicBatcher` before calling the model.

The front talks to a deployment through :class:`RemoteBatcher`, which has the local batcher's interface:
a bound on the inputs in flight (503 beyond), and each answer carries the replica's batch records
(inputs, model time, queue waits) that the front puts in its own ``/metrics``, so the figures add up over
every replica. A replica that dies (killed, out of memory) fails its requests in flight with
:class:`~phiclip.serve.batching.Overloaded`, answered as 503 with ``Retry-After``; Ray Serve starts a
replacement; the front's ``--timeout`` bounds every wait, so nothing hangs.

Networking: a new local Ray instance is started on 127.0.0.1, without its dashboard, with Ray's usage
statistics off (``RAY_USAGE_STATS_ENABLED=0`` unless set) and with no Serve HTTP proxy (the front is the
only HTTP server).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from phiclip.images import ImageDecodeError
from phiclip.retrieval import check_query_encoder, load_query_encoder
from phiclip.serve.batching import IMAGE, DynamicBatcher, InputError, Overloaded, warm_up_encoder
from phiclip.serve.collections import collection_names, decode_upload, open_collection
from phiclip.serve.options import ServeOptions

log = logging.getLogger(__name__)

#: The deployment's name inside each Ray Serve application.
DEPLOYMENT = "phiclip_encoder"


def _ray() -> tuple[Any, Any]:
    try:
        import ray
        from ray import serve
    except ImportError:
        raise RuntimeError("--engine ray needs Ray Serve: pip install 'phiclip[ray]' (ray[serve]), or use "
                           "--engine local") from None
    return ray, serve


def available() -> None:
    """Raise a ``RuntimeError`` naming the extra to install when Ray Serve is missing."""
    _ray()


# === in each replica ===========================================================================


class EncoderReplica:
    """One model copy with its own dynamic batcher (the Ray Serve deployment's class).

    ``embed(kind, items)``: texts, or ``(encoded image bytes, name)`` pairs decoded and preprocessed here;
    answers ``{"vectors", "batches", "pid"}``, or ``{"error"}`` for an input that cannot be read (400 in
    the front) or ``{"overloaded"}`` when this replica's queue is full. ``batches`` holds the records of
    the encoder calls made since the previous answer (each record sent once, for the front's metrics).
    """

    def __init__(self, root: str, manifest: dict[str, Any], others: list[tuple[str, dict[str, Any]]],
                 options: dict[str, Any]) -> None:
        opts = ServeOptions(**options)
        self.encoder = load_query_encoder(Path(root), manifest, opts.model, device=opts.device, dtype=opts.precision,
                                          allow_other_weights=opts.allow_other_weights)
        for path, other in others:  # collections sharing this encoder: the same weights check as local
            check_query_encoder(self.encoder, other, Path(path), override=bool(opts.model),
                                allow_other_weights=opts.allow_other_weights)
        if hasattr(self.encoder, "set_max_pixels"):
            self.encoder.set_max_pixels(opts.max_pixels)
        self.max_pixels = opts.max_pixels
        self._records: list[Any] = []
        self._lock = threading.Lock()
        self.batcher = DynamicBatcher(self.encoder, max_batch=opts.max_batch, max_wait_s=opts.batch_wait_ms / 1000,
                                      max_queue=opts.max_queue, name="phiclip-replica-encoder",
                                      observer=self._record)
        self.batcher.start(warm_up=warm_up_encoder)
        self.batcher.warmed.wait()
        if self.batcher.warm_error is not None:  # the replica fails to start; Serve says so and retries
            raise RuntimeError(f"the warm-up batch failed: {self.batcher.warm_error}")

    def _record(self, record: Any) -> None:
        with self._lock:
            self._records.append(record)

    def _drain(self) -> list[Any]:
        with self._lock:
            out, self._records = self._records, []
        return out

    def describe(self) -> dict[str, Any]:
        enc = self.encoder
        return {"modalities": sorted(enc.modalities), "keeps_alpha": bool(getattr(enc, "keeps_alpha", False)),
                "precision": str(getattr(enc, "dtype", "unknown")).replace("torch.", ""),
                "fingerprint": getattr(enc, "weights_fingerprint", None), "kind": getattr(enc, "kind", None),
                "pid": os.getpid()}

    def _prepare(self, items: list[tuple[bytes, str]]) -> list[Any]:
        out = []
        for data, name in items:
            try:
                img = decode_upload(data, name, max_pixels=self.max_pixels, keep_alpha=self.encoder.keeps_alpha)
                out.append(self.encoder.preprocess(img))
            except ImageDecodeError as e:
                raise InputError(str(e)) from None
            except (ValueError, RuntimeError) as e:
                raise InputError(f"{name}: cannot be prepared for this encoder ({e})") from None
        return out

    async def embed(self, kind: str, items: list[Any]) -> dict[str, Any]:
        try:
            prepared = await asyncio.to_thread(self._prepare, items) if kind == IMAGE else items
            future = self.batcher.submit(kind, prepared)
        except InputError as e:
            return {"error": str(e), "batches": self._drain(), "pid": os.getpid()}
        except Overloaded as e:
            return {"overloaded": str(e), "batches": self._drain(), "pid": os.getpid()}
        try:
            vectors = await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.cancel()
            raise
        return {"vectors": vectors, "batches": self._drain(), "pid": os.getpid()}

    def check_health(self) -> None:
        """Ray Serve's health check: the batcher's thread must be alive."""
        if not self.batcher._thread.is_alive():
            raise RuntimeError("the encoder thread stopped")


# === in the front process ======================================================================


class RemoteBatcher:
    """The front's client of one deployment, with :class:`~phiclip.serve.batching.DynamicBatcher`'s
    interface (``submit`` returns a coroutine here): at most ``max_queue`` inputs in flight."""

    def __init__(self, handle: Any, app_name: str, max_queue: int) -> None:
        self.handle = handle
        self.app_name = app_name
        self.max_queue = max_queue
        self.observer: Any = None
        self.warmed = threading.Event()
        self.warm_error: BaseException | None = None
        self._lock = threading.Lock()
        self._in_flight = 0
        self._closed = False
        self._pids: set[int] = set()
        self._counts = {"jobs": 0, "items": 0, "rejected": 0, "failed": 0, "replica_failures": 0, "max_queue_depth": 0}
        self._replicas: int | None = None
        self._stop = threading.Event()

    def start(self, warm_up: Any = None) -> RemoteBatcher:
        """Start the thread that asks Ray Serve for the running replicas (each replica ran its warm-up batch
        before Ray Serve counted it as running: nothing to warm up here)."""
        threading.Thread(target=self._watch_replicas, name="phiclip-ray-replicas", daemon=True).start()
        self.warmed.set()
        return self

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._stop.set()

    def _watch_replicas(self) -> None:
        """Every 2 s: the replicas running (one thread only: Ray Serve's status calls are kept off the
        request threads, where concurrent ones were seen to hang)."""
        _, serve = _ray()
        while not self._stop.is_set():
            try:
                app = serve.status().applications[self.app_name]
                self._replicas = int(app.deployments[DEPLOYMENT].replica_states.get("RUNNING", 0))
            except Exception:  # noqa: BLE001 - a metric, not a failure of the server
                self._replicas = None
            self._stop.wait(2.0)

    def submit(self, kind: str, items: list[Any]) -> Any:
        n = len(items)
        with self._lock:
            if self._closed:
                raise Overloaded("the server is shutting down")
            if self._in_flight + n > self.max_queue:
                self._counts["rejected"] += 1
                raise Overloaded(f"the encoder queue is full ({self._in_flight} of {self.max_queue} inputs in flight "
                                 "at the replicas); retry shortly")
            self._in_flight += n
            self._counts["max_queue_depth"] = max(self._counts["max_queue_depth"], self._in_flight)
        return self._call(kind, list(items), n)

    async def _call(self, kind: str, items: list[Any], n: int) -> np.ndarray:
        ray, serve = _ray()
        from ray.serve.exceptions import (
            BackPressureError,
            DeploymentUnavailableError,
            ReplicaUnavailableError,
        )

        try:
            response = self.handle.embed.remote(kind, items)
            try:
                out = await response
            except asyncio.CancelledError:  # the request timed out or its client left
                response.cancel()
                raise
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                ray.exceptions.ObjectLostError, ReplicaUnavailableError, DeploymentUnavailableError,
                BackPressureError) as e:
            with self._lock:
                self._counts["replica_failures"] += 1
            log.warning("an encoder replica failed a request: %s", type(e).__name__)
            raise Overloaded("an encoder replica stopped while answering (it is being replaced); retry shortly") from None
        finally:
            with self._lock:
                self._in_flight -= n
        if self.observer is not None:
            for record in out.get("batches", ()):
                self.observer(tuple(record))
        with self._lock:
            self._pids.add(int(out.get("pid", 0)))
        if "error" in out:
            with self._lock:
                self._counts["failed"] += 1
            raise InputError(out["error"])
        if "overloaded" in out:
            with self._lock:
                self._counts["rejected"] += 1
            raise Overloaded(out["overloaded"])
        with self._lock:
            self._counts["jobs"] += 1
            self._counts["items"] += n
        return np.asarray(out["vectors"], dtype=np.float32)

    def queue_depth(self) -> int:
        """Inputs sent to the replicas and not answered yet (waiting there or in the model)."""
        with self._lock:
            return self._in_flight

    def replicas(self) -> int | None:
        """Replicas running (as of at most 2 s ago; ``None`` before the first answer)."""
        return self._replicas

    def stats(self) -> dict[str, Any]:
        with self._lock:
            s: dict[str, Any] = dict(self._counts)
            s.update(queue_depth=self._in_flight, max_queue=self.max_queue, replica_pids=sorted(self._pids))
        s.update(engine="ray", application=self.app_name, replicas=self.replicas())
        return s


class RemoteEncoder:
    """What the front knows of a deployed encoder (its description, asked of a replica); ``remote``:
    images are sent as bytes and prepared in the replicas."""

    remote = True

    def __init__(self, spec: str, handle: Any, app_name: str, info: dict[str, Any]) -> None:
        self.name = spec
        self.handle = handle
        self.app_name = app_name
        self.modalities = frozenset(info["modalities"])
        self.keeps_alpha = bool(info["keeps_alpha"])
        self.dtype = info["precision"]
        self.weights_fingerprint = info.get("fingerprint")
        self.kind = info.get("kind")

    def make_batcher(self, options: ServeOptions) -> RemoteBatcher:
        return RemoteBatcher(self.handle, self.app_name, options.max_queue)


def _init_ray(ray: Any, opts: ServeOptions) -> bool:
    """Connect to ``opts.ray_address`` or start a local instance on loopback; True when this process
    started (and so must stop) Ray."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    path = os.environ.get("PYTHONPATH")
    kw: dict[str, Any] = dict(logging_level=logging.WARNING, log_to_driver=False,
                              runtime_env={"env_vars": {"PYTHONPATH": path}} if path else None)
    if opts.ray_address:
        ray.init(address=opts.ray_address, **kw)
        return True
    ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", **kw)
    return True


def deploy(paths: list[str | Path], opts: ServeOptions) -> tuple[list[Any], dict[str, RemoteEncoder], Any]:
    """Open the collections here and deploy one Ray Serve application per distinct encoder.

    Returns ``(collections, encoders, shutdown)``: ``encoders`` maps each spec to a
    :class:`RemoteEncoder`; ``shutdown()`` deletes the applications (and stops Ray if this call started it).
    """
    ray, serve = _ray()
    if not paths:
        raise ValueError("give at least one output directory of `phiclip embed`")
    roots = [Path(p).expanduser() for p in paths]
    collections = [open_collection(p, n, allow_incomplete=opts.allow_incomplete, model=opts.model)
                   for p, n in zip(roots, collection_names(roots))]
    started = _init_ray(ray, opts)
    serve.start(proxy_location="Disabled")  # no Serve HTTP proxy: the front is the only HTTP server
    gpus = opts.gpus_per_replica
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) and opts.device != "cpu" else 0.0
    device = "cuda" if gpus > 0 and opts.device == "auto" else opts.device
    replica_opts = {f: getattr(opts, f) for f in ("model", "precision", "allow_other_weights", "max_pixels",
                                                   "max_batch", "batch_wait_ms", "max_queue")}
    replica_opts["device"] = device
    scaling: dict[str, Any] = (
        {"autoscaling_config": {"min_replicas": opts.min_replicas, "max_replicas": opts.max_replicas,
                                "initial_replicas": opts.min_replicas, "target_ongoing_requests": opts.max_batch}}
        if opts.min_replicas is not None else {"num_replicas": opts.replicas})
    names: list[str] = []
    encoders: dict[str, RemoteEncoder] = {}

    def shutdown() -> None:
        for name in names:
            try:
                serve.delete(name)
            except Exception:  # noqa: BLE001 - shutting down
                log.exception("deleting the Ray Serve application %s", name)
        if started:
            ray.shutdown()

    try:
        for c in collections:
            if c.spec in encoders:
                continue
            others = [(str(o.path), o.manifest) for o in collections if o.spec == c.spec and o is not c]
            name = f"phiclip-{os.getpid()}-{len(names)}"
            dep = serve.deployment(
                EncoderReplica, name=DEPLOYMENT, max_ongoing_requests=max(8, opts.max_queue),
                ray_actor_options={"num_cpus": opts.cpus_per_replica, "num_gpus": gpus},
                health_check_period_s=2.0, graceful_shutdown_timeout_s=opts.drain_s, **scaling,
            )
            log.info("deploying %s on Ray Serve as %s", c.spec, name)
            handle = serve.run(dep.bind(str(c.path), c.manifest, others, replica_opts), name=name, route_prefix=None)
            names.append(name)
            info = handle.describe.remote().result(timeout_s=120)
            encoders[c.spec] = RemoteEncoder(c.spec, handle, name, info)
    except BaseException:
        shutdown()
        raise
    return collections, encoders, shutdown


__all__ = ["DEPLOYMENT", "EncoderReplica", "RemoteBatcher", "RemoteEncoder", "available", "deploy"]
