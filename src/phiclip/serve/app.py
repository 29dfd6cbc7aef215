"""The ``phiclip serve`` application: a Starlette app in front of the collections and their batchers.

Routes (JSON unless said otherwise; errors are ``{"error": {"message", "type", "code"}}`` with the
status: 400 bad input, 401 no or wrong token, 404 unknown collection/item/route, 413 too large,
503 queue full or timed out):

- ``GET /``: the search page (``static/``, served by phiclip, no CDN);
- ``GET /healthz``: liveness (open even with a token);
- ``GET /readyz``: readiness, 200 once every collection and encoder is loaded and warmed up, else 503
  (open even with a token);
- ``GET /metrics``: Prometheus text format (:mod:`phiclip.serve.metrics`; behind the token unless
  ``metrics_open``);
- ``GET /api/collections``: each collection's encoder, size, width, completeness, labels;
- ``GET /api/search?text=...&k=N[&collection=NAME][&label=L]`` (or ``id=ITEM`` instead of ``text``);
- ``POST /api/search``: multipart with an ``image`` file, or ``image_url`` (an image's ``http(s)`` URL,
  fetched; a ``data:image/...;base64,`` URI; or the URL of an item already in a collection: "more
  like this"), or ``id`` of an item, or JSON with the same fields (``image`` as a
  ``data:image/...;base64,`` URI);
- ``GET /api/items/{collection}/{id}/thumbnail[?size=128|256|512]``: a JPEG thumbnail;
- ``GET /map[?collection=NAME]``: the collection's 2-D map, an HTML page (:mod:`phiclip.serve.maps`: a
  ``phiclip map`` output in ``OUT/map/`` or a PCA made at the first request), framed by the search page;
- ``POST /v1/embeddings``: the OpenAI embeddings request and response shape, each input a text, an
  image's ``http(s)`` URL (fetched) or a ``data:image/...;base64,`` URI; ``GET /v1/models``;
- ``GET /api/stats``: batcher, queue and thumbnail cache counters.

CPU work (decoding, preprocessing, thumbnails, FAISS) runs on worker threads, never on the event
loop; the models run only on their batcher's thread.

Images by URL are fetched by :mod:`phiclip.fetch` (``embed``'s fetcher: its timeouts, retries, redirect
limit; the body limited to ``max_upload_bytes``), from public addresses only unless
``allow_private_urls`` (:mod:`phiclip.netguard`: checked after resolving the host, on every redirect
hop, connecting to the address checked); a refused URL is a 400 naming it, the reason and the flag.
The request's ``timeout_s`` bounds the fetch. An input is a URL when it is ``http(s)://`` followed by no
whitespace, and a ``data:`` URI when it starts ``data:`` with no whitespace before its first comma:
only ``data:image/<type>;base64,`` is accepted (decoded here, never fetched), any other is a 400 rather
than a text; every other string is a text.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import contextlib
import hmac
import json
import logging
import os
import re
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import numpy as np

from phiclip.collection.pages import map_page_csp
from phiclip.collection.vectors import CollectionInputError
from phiclip.encoders.base import Encoder
from phiclip.fetch import fetcher
from phiclip.images import ImageDecodeError, Unreadable, load_image
from phiclip.netguard import is_refusal
from phiclip.retrieval import SearchError, require_text_side
from phiclip.serve.batching import IMAGE, TEXT, DynamicBatcher, InputError, Overloaded, warm_up_encoder
from phiclip.serve.collections import (
    LABEL_COLUMN,
    Collection,
    ItemNotFound,
    NoImage,
    decode_upload,
    load_collections,
)
from phiclip.serve.listener import bind_listener
from phiclip.serve.maps import MapCache
from phiclip.serve.metrics import ServeMetrics
from phiclip.serve.options import ServeOptions, is_loopback
from phiclip.serve.thumbnails import DEFAULT_THUMBNAIL_SIZE, THUMBNAIL_SIZES, ThumbnailCache, render_thumbnail
from phiclip.store import EmbeddingStoreError, read_manifest
from phiclip.version import __version__

try:
    import anyio
    import anyio.to_thread
    from starlette.applications import Starlette
    from starlette.datastructures import Headers, UploadFile
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
    from starlette.routing import Match, Mount, Route
    from starlette.staticfiles import StaticFiles
except ImportError as e:  # pragma: no cover - depends on the installation
    raise ImportError(
        f"phiclip serve needs the web stack ({e.name} is missing): pip install 'phiclip[serve]'"
    ) from None

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
#: The cookie the page authenticates with after ``/?token=...``.
TOKEN_COOKIE = "phiclip_token"
_OPEN_PATHS = ("/healthz", "/readyz")
#: The ASGI scope key holding when a request arrived (``time.monotonic()``): its deadline counts from it.
ARRIVED = "phiclip.arrived"
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_DATA_URI = re.compile(r"data:image/[A-Za-z0-9.+-]+;base64,", re.IGNORECASE)
#: An input that is an image's URL (no whitespace), and one shaped as a ``data:`` URI (no whitespace
#: before its first comma); any other string is a text.
_URL_INPUT = re.compile(r"https?://\S+", re.IGNORECASE)
_DATA_INPUT = re.compile(r"data:[^\s,]*,", re.IGNORECASE)
_PRIVATE_HINT = ("this server fetches images only from public addresses (start phiclip serve with "
                 "--allow-private-urls to allow private, loopback and link-local ones)")
_ITEM_PATH = re.compile(r"/api/items/([^/]+)/([^/]+)(?:/thumbnail)?/?")
_PAGE_CSP = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
             "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


class ApiError(Exception):
    """An error answered as JSON with ``status``; ``kind`` is the ``error.type`` field."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.headers = headers


_KIND_OF_STATUS = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                   405: "invalid_request_error", 413: "request_too_large", 503: "overloaded_error"}


def error_response(status: int, message: str, kind: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON error body every route answers with."""
    body = {"error": {"message": message, "type": kind or _KIND_OF_STATUS.get(status, "server_error"), "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


# === the service: collections, encoders, batchers ==============================================


class Service:
    """What the routes work on: collections by name, one batcher per encoder, the thumbnail cache."""

    def __init__(self, collections: list[Collection], encoders: dict[str, Encoder], options: ServeOptions) -> None:
        if not collections:
            raise ValueError("a server needs at least one collection")
        self.options = options
        self.collections = {c.name: c for c in collections}
        self.default = collections[0].name
        self.encoders = encoders
        self.batchers: dict[str, Any] = {}
        for i, (spec, enc) in enumerate(encoders.items()):
            make = getattr(enc, "make_batcher", None)  # a remote engine's own client (serve.ray_engine)
            self.batchers[spec] = make(options) if make is not None else DynamicBatcher(
                enc, max_batch=options.max_batch, max_wait_s=options.batch_wait_ms / 1000,
                max_queue=options.max_queue, name=f"phiclip-encoder-{i}")
        self.thumbnails = ThumbnailCache(options.thumbnail_cache_bytes)
        self.fetch_options = options.fetch_options()
        self.maps = MapCache()
        self.cpu_limiter: Any = None  # an anyio CapacityLimiter, made in the event loop at startup
        self.metrics: ServeMetrics | None = None
        #: Set on SIGTERM: /readyz answers 503 while requests in flight finish.
        self.draining = False
        #: Called by :meth:`close` (a remote engine's shutdown).
        self.on_close: list[Callable[[], None]] = []

    def attach_metrics(self, metrics: ServeMetrics) -> None:
        """Record into ``metrics``: each batcher's calls, the queue depths, the models' descriptions."""
        self.metrics = metrics
        for spec, b in self.batchers.items():
            b.observer = metrics.batch_observer(spec)
        for c in self.collections.values():
            enc = self.encoder_of(c)
            metrics.set_model_info(c.name, c.spec, _precision_name(enc), str(enc.weights_fingerprint or ""))
        metrics.live.depth = lambda: {spec: b.queue_depth() for spec, b in self.batchers.items()}
        metrics.live.ready = lambda: self.readiness()[0]
        metrics.live.replicas = lambda: {spec: n for spec, b in self.batchers.items()
                                         if (n := getattr(b, "replicas", lambda: None)()) is not None}

    def start(self) -> None:
        """Start the batchers' worker threads; each runs a warm-up batch first (see :meth:`readiness`)."""
        for b in self.batchers.values():
            b.start(warm_up=warm_up_encoder)

    def readiness(self) -> tuple[bool, list[str]]:
        """``(ready, what is not)``: ready once every encoder ran its warm-up batch, and not draining."""
        waiting = []
        for spec, b in self.batchers.items():
            if b.warm_error is not None:
                waiting.append(f"{spec}: the warm-up batch failed ({type(b.warm_error).__name__}: {b.warm_error})")
            elif not b.warmed.is_set():
                waiting.append(f"{spec}: warming up")
        if self.draining:
            waiting.append("shutting down (draining requests in flight)")
        return not waiting, waiting

    def close(self) -> None:
        """Stop the batchers (waiting requests get 503)."""
        for b in self.batchers.values():
            b.close()
        for fn in self.on_close:
            try:
                fn()
            except Exception:  # noqa: BLE001 - shutting down: log, go on
                log.exception("while shutting down")

    # --- lookups --------------------------------------------------------------------------------
    def collection(self, name: str | None) -> Collection:
        """The named collection (the first one when ``name`` is empty); 404 otherwise."""
        if not name:
            return self.collections[self.default]
        coll = self.collections.get(name)
        if coll is None:
            raise ApiError(404, f"no collection named {name!r}; the collections are {sorted(self.collections)}")
        return coll

    def encoder_of(self, coll: Collection) -> Encoder:
        """The loaded encoder of a collection."""
        return self.encoders[coll.spec]

    # --- running the model ----------------------------------------------------------------------
    async def vectors(self, coll: Collection, kind: str, items: list[Any], deadline: float) -> np.ndarray:
        """Queue ``items`` for the collection's encoder and wait (until ``deadline``) for their vectors."""
        batcher = self.batchers[coll.spec]
        if len(items) > batcher.max_queue:  # could never be queued: not a matter of retrying later
            raise ApiError(413, f"{len(items)} inputs are more than the encoder queue holds ({batcher.max_queue}); "
                           "send fewer per request")
        try:
            future = batcher.submit(kind, items)
        except Overloaded as e:
            raise ApiError(503, str(e), "overloaded_error", {"Retry-After": "1"}) from None
        # a local batcher gives a concurrent future; a remote engine a coroutine (cancelled on timeout)
        waitable = asyncio.wrap_future(future) if isinstance(future, concurrent.futures.Future) else future
        try:
            return await asyncio.wait_for(waitable, timeout=max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            if isinstance(future, concurrent.futures.Future):
                future.cancel()
            raise self.timed_out("waiting for the encoder") from None
        except Overloaded as e:
            raise ApiError(503, str(e), "overloaded_error", {"Retry-After": "1"}) from None
        except InputError as e:
            raise ApiError(400, str(e)) from None

    def timed_out(self, doing: str) -> ApiError:
        """The 503 of a request that reached its deadline (``--timeout`` from its arrival)."""
        return ApiError(503, f"timed out after {self.options.timeout_s:g} s {doing}; the server is busy, retry shortly",
                        "timeout_error", {"Retry-After": "1"})

    async def run_cpu(self, fn: Any, *args: Any, deadline: float | None = None) -> Any:
        """``fn(*args)`` on a worker thread, at most as many at once as the CPU limiter allows; with a
        ``deadline``, a 503 when it passes while waiting for a thread (work started is finished first)."""
        if deadline is None:
            return await anyio.to_thread.run_sync(fn, *args, limiter=self.cpu_limiter)
        try:
            with anyio.fail_after(max(0.0, deadline - time.monotonic())):
                return await anyio.to_thread.run_sync(fn, *args, limiter=self.cpu_limiter)
        except TimeoutError:
            raise self.timed_out("waiting to decode") from None

    async def prepare_image(self, coll: Collection, data: bytes | str, name: str, deadline: float | None = None) -> Any:
        """Decode (pixel limit, ``embed``'s messages) and preprocess one image for ``coll``'s encoder."""

        encoder = self.encoder_of(coll)
        max_pixels = self.options.max_pixels
        if getattr(encoder, "remote", False):  # decoded and preprocessed where the model runs (a replica)
            if isinstance(data, str):
                data = await self.run_cpu(Path(data).read_bytes, deadline=deadline)
            return (bytes(data), name)

        def work() -> Any:
            if isinstance(data, str):  # an item's own file
                img = load_image(data, max_pixels=max_pixels, keep_alpha=encoder.keeps_alpha)
            else:
                img = decode_upload(data, name, max_pixels=max_pixels, keep_alpha=encoder.keeps_alpha)
            return encoder.preprocess(img)

        try:
            return await self.run_cpu(work, deadline=deadline)
        except ImageDecodeError as e:
            raise ApiError(400, str(e)) from None
        except (ValueError, RuntimeError) as e:
            raise ApiError(400, f"{name}: cannot be prepared for {coll.spec} ({e})") from None

    async def fetch_images(self, urls: list[tuple[str, str]], deadline: float) -> list[bytes]:
        """The bodies of ``(where, url)`` pairs, fetched concurrently (:mod:`phiclip.fetch`, with the address
        guard unless ``allow_private_urls``) until ``deadline``; a 400 (413: too large) naming the first
        URL that failed, and why."""
        if not urls:
            return []
        future = fetcher(self.fetch_options).submit_many([u for _, u in urls])
        try:
            got = await asyncio.wait_for(asyncio.wrap_future(future), timeout=max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:  # the fetches are cancelled with the wrapped future
            self._count_fetches("failed", len(urls))
            names = ", ".join(f"{where} {_shown_url(url)}" for where, url in urls)
            raise ApiError(400, f"{names}: not fetched within {self.options.timeout_s:g} s (the request's timeout)") \
                from None
        error: ApiError | None = None
        for (where, url), body in zip(urls, got):
            if not isinstance(body, Unreadable):
                self._count_fetches("fetched")
                continue
            refused = is_refusal(body.reason)
            self._count_fetches("refused" if refused else "failed")
            if error is None:
                status = 413 if body.reason.startswith("too large") else 400
                message = f"{where} {_shown_url(url)}: " + (f"{body.reason}; {_PRIVATE_HINT}" if refused
                                                              else f"cannot fetch the image: {body.reason}")
                error = ApiError(status, message)
        if error is not None:
            raise error
        return [bytes(b) for b in got if not isinstance(b, Unreadable)]

    def _count_fetches(self, outcome: str, n: int = 1) -> None:
        if self.metrics is not None:
            self.metrics.observe_fetches(outcome, n)

    def check_text(self, coll: Collection, text: Any, what: str = "text") -> str:
        """A usable text query for ``coll``'s encoder (400 / 413 otherwise)."""
        if not isinstance(text, str):
            raise ApiError(400, f"{what} must be a string, got {type(text).__name__}")
        if not text.strip():
            raise ApiError(400, f"the {what} is empty")
        if len(text) > self.options.max_text_chars:
            raise ApiError(413, f"the {what} has {len(text)} characters, over the limit of {self.options.max_text_chars}")
        try:
            require_text_side(self.encoder_of(coll), coll.name)
        except SearchError as e:
            raise ApiError(400, str(e).replace("query with --image", "search with an image")) from None
        return text

    # --- searching ------------------------------------------------------------------------------
    async def search(self, request: Request, coll: Collection, vector: np.ndarray, k: int, label: str | None,
                     query: dict[str, Any], t0: float) -> JSONResponse:
        """Run the FAISS query off the event loop and answer with the results."""
        if label is not None and LABEL_COLUMN not in coll.fields.column_names:
            raise ApiError(400, f"collection {coll.name!r} has no labels to filter on")
        try:
            pairs = (await anyio.to_thread.run_sync(coll.search, vector, k, label))[0]
        except SearchError as e:
            raise ApiError(400, str(e)) from None
        root = request.scope.get("root_path", "")
        results = []
        for rank, (row, score) in enumerate(pairs, start=1):
            rec = coll.record(row)
            thumb = (f"{root}/api/items/{quote(coll.name, safe='')}/{quote(rec['id'], safe='')}/thumbnail"
                     if coll.kind == "image" else None)
            results.append({"rank": rank, "score": round(score, 6), **rec, "thumbnail": thumb})
        return JSONResponse({
            "collection": coll.name, "encoder": coll.spec, "query": query, "k": k, "label": label,
            "results": results, "took_ms": round((time.perf_counter() - t0) * 1000, 2),
        })

    async def item_vector(self, target: Collection, owner: Collection, row: int, deadline: float) -> np.ndarray:
        """The query vector of an item of ``owner`` for searching ``target``: its stored vector when both
        use the same encoder, else its image (or text) embedded by ``target``'s encoder."""
        if owner.spec == target.spec:
            return await anyio.to_thread.run_sync(owner.stored_vector, row)
        if owner.kind == "text":
            text = self.check_text(target, owner.record(row).get("text") or "", "item's text")
            return await self.vectors(target, TEXT, [text], deadline)
        try:
            payload = owner.image_payload(row)
        except NoImage as e:
            raise ApiError(404, str(e)) from None
        item = await self.prepare_image(target, payload, f"item {owner.record(row)['id']}", deadline)
        return await self.vectors(target, IMAGE, [item], deadline)


def _precision_name(encoder: Encoder) -> str:
    dtype = getattr(encoder, "dtype", None)
    return str(dtype).replace("torch.", "") if dtype is not None else "unknown"


def build_service(paths: list[str | Path], options: ServeOptions | None = None, *, load: Any = None) -> Service:
    """Open the collections and load their encoders (see :func:`phiclip.serve.collections.load_collections`);
    with ``engine="ray"``, deploy them on Ray Serve instead (:func:`phiclip.serve.ray_engine.deploy`)."""
    opts = (options or ServeOptions()).validate()
    if opts.engine == "ray":
        from phiclip.serve import ray_engine  # lazy: optional dependency (ray[serve])

        collections, encoders, shutdown = ray_engine.deploy(list(paths), opts)
        service = Service(collections, encoders, opts)
        service.on_close.append(shutdown)
        return service
    collections, encoders = load_collections(list(paths), device=opts.device, dtype=opts.precision,
                                             allow_incomplete=opts.allow_incomplete, load=load, model=opts.model,
                                             allow_other_weights=opts.allow_other_weights)
    for enc in encoders.values():
        if hasattr(enc, "set_max_pixels"):  # the preprocessing's own pixel budget, as `embed` sets it
            enc.set_max_pixels(opts.max_pixels)
    return Service(collections, encoders, opts)


# === request helpers ===========================================================================


def _int_param(value: Any, name: str, default: int, lo: int, hi: int) -> int:
    if value is None or value == "":
        return default
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ApiError(400, f"{name} must be an integer, got {value!r}") from None
    if not lo <= n <= hi:
        raise ApiError(400, f"{name} must be between {lo} and {hi}, got {n}")
    return n


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        # a large body (images as data: URIs) is parsed off the event loop
        body = await anyio.to_thread.run_sync(json.loads, raw) if len(raw) > 1 << 20 else json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None
    except RecursionError:
        raise ApiError(400, "the request body nests JSON arrays or objects too deeply to parse; send the fields "
                            "this route documents, without deep nesting") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _shown_url(url: str, limit: int = 200) -> str:
    """A URL as an error message shows it (shortened past ``limit`` characters)."""
    return url if len(url) <= limit else url[:limit] + "..."


def _input_kind(value: str) -> str:
    """``url`` (an image's ``http(s)`` URL), ``data`` (shaped as a ``data:`` URI) or ``text``."""
    if _URL_INPUT.fullmatch(value):
        return "url"
    return "data" if _DATA_INPUT.match(value) else "text"


def _decode_data_uri(value: str, max_bytes: int, where: str) -> bytes:
    m = _DATA_URI.match(value)
    if m is None:
        raise ApiError(400, f"{where}: a data: URI must hold an image as data:image/<type>;base64,... (other data: "
                       "URIs are not read, nor embedded as text)")
    b64 = value[m.end():]
    if len(b64) * 3 // 4 > max_bytes + 2:
        raise ApiError(413, f"{where}: the image is about {len(b64) * 3 // 4} bytes, over the limit of {max_bytes}")
    try:
        data = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{where}: the data URI is not valid base64") from None
    if len(data) > max_bytes:
        raise ApiError(413, f"{where}: the image is {len(data)} bytes, over the limit of {max_bytes}")
    return data


def _item_of_url(service: Service, request: Request, image_url: str) -> tuple[str, str] | None:
    """``(collection, id)`` when ``image_url`` is the URL of an item of this server (a path, or a URL whose
    host is the request's ``Host``, a loopback name or an ``--allowed-host``), else None."""
    parts = urlsplit(image_url)
    if parts.netloc:
        host = (parts.hostname or "").lower()
        ours = {request.headers.get("host", "").lower(), *_LOOPBACK_NAMES, *(h.lower() for h in service.options.allowed_hosts)}
        if parts.scheme.lower() not in ("http", "https") or (parts.netloc.lower() not in ours and host not in ours):
            return None
    elif parts.scheme:
        return None
    path = parts.path
    root = request.scope.get("root_path", "")
    if root and path.startswith(root + "/"):
        path = path[len(root):]
    m = _ITEM_PATH.fullmatch(path)
    return None if m is None else (unquote(m.group(1)), unquote(m.group(2)))


def _resolve_item(service: Service, request: Request, image_url: str | None, item_id: str | None,
                  collection: str | None) -> tuple[Collection, int]:
    """An item named by ``image_url`` (a URL of this server's item routes) or by ``id`` -> (collection, row)."""
    if image_url is not None:
        named = _item_of_url(service, request, image_url)
        if named is None:
            raise ApiError(400, "image_url must be an image's http(s) URL, a data:image/...;base64, URI or the URL "
                           "of an item of a collection (.../api/items/NAME/ID/thumbnail)")
        owner = service.collection(named[0])
        item_id = named[1]
    else:
        owner = service.collection(collection)
    try:
        return owner, owner.row_of(str(item_id))
    except ItemNotFound as e:
        raise ApiError(404, str(e)) from None


# === routes ====================================================================================


def _deadline(request: Request, service: Service) -> float:
    """When the request must be answered by: ``timeout_s`` after it arrived (stamped by :class:`_Guard`)."""
    return float(request.scope.get(ARRIVED, time.monotonic())) + service.options.timeout_s


def _service(request: Request) -> Service:
    service = request.app.state.service
    if service is None:
        raise ApiError(503, "the server is still loading its collections and encoders; retry shortly (GET /readyz "
                       "says when it is ready)", "overloaded_error", {"Retry-After": "5"})
    return service


async def index_page(request: Request) -> Response:
    """The search page."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8",
                        headers={"Content-Security-Policy": _PAGE_CSP, "Cache-Control": "no-cache"})


async def healthz(request: Request) -> Response:
    """Liveness: 200 while the server runs."""

    return JSONResponse({"status": "ok", "version": __version__})


async def readyz(request: Request) -> Response:
    """Readiness: 200 once every collection's index and encoder are loaded and each encoder ran a warm-up
    batch; 503 before, and again once a SIGTERM started draining."""
    service = request.app.state.service
    if service is None:
        error = request.app.state.load_error
        waiting = [f"loading failed: {error}" if error else "loading the collections and encoders"]
        ready = False
    else:
        ready, waiting = service.readiness()
    body = {"status": "ready" if ready else "not ready", "waiting_for": waiting}
    return JSONResponse(body, status_code=200 if ready else 503, headers=None if ready else {"Retry-After": "5"})


async def metrics_page(request: Request) -> Response:
    """``GET /metrics``: the Prometheus text format."""
    metrics: ServeMetrics = request.app.state.metrics
    body = await anyio.to_thread.run_sync(metrics.render)  # live gauges may ask a remote engine
    return Response(body, media_type=metrics.content_type)


async def list_collections(request: Request) -> Response:
    """Each collection's encoder, size, width and labels."""
    service = _service(request)
    return JSONResponse({
        "default": service.default,
        "collections": [c.describe(service.encoder_of(c).modalities) for c in service.collections.values()],
    })


async def stats(request: Request) -> Response:
    """Batcher and cache counters."""
    service = _service(request)
    batchers = await anyio.to_thread.run_sync(lambda: {spec: b.stats() for spec, b in service.batchers.items()})
    return JSONResponse({
        "batchers": batchers,
        "thumbnails": service.thumbnails.stats(),
    })


async def search_get(request: Request) -> Response:
    """``GET /api/search?text=...`` (or ``id=...``), ``k``, ``collection``, ``label``."""
    t0 = time.perf_counter()
    service = _service(request)
    q = request.query_params
    coll = service.collection(q.get("collection"))
    k = _int_param(q.get("k"), "k", 10, 1, service.options.max_k)
    label = q.get("label") or None
    deadline = _deadline(request, service)
    if (q.get("text") is None) == (q.get("id") is None):
        raise ApiError(400, "give one query: /api/search?text=a+red+car, or ?id=ITEM for items like one of the "
                       "collection (POST an image to search with it)")
    if q.get("id") is not None:
        owner, row = _resolve_item(service, request, None, q["id"], coll.name)
        vector = await service.item_vector(coll, owner, row, deadline)
        return await service.search(request, coll, vector, k, label, {"id": q["id"], "collection": owner.name}, t0)
    text = service.check_text(coll, q["text"])
    vector = await service.vectors(coll, TEXT, [text], deadline)
    return await service.search(request, coll, vector, k, label, {"text": text}, t0)


async def search_post(request: Request) -> Response:
    """``POST /api/search``: an uploaded image, an image's URL (or ``data:`` URI), or an item's URL or id
    ("more like this")."""
    t0 = time.perf_counter()
    service = _service(request)
    opts = service.options
    ctype = request.headers.get("content-type", "").lower()
    upload: bytes | None = None
    upload_name = "upload"
    if ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        async with request.form(max_files=1, max_fields=16) as form:
            fields: dict[str, Any] = {}
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    if key != "image":
                        raise ApiError(400, f"unexpected file field {key!r}; send the image as 'image'")
                    upload_name = value.filename or "upload"
                    upload = await value.read(opts.max_upload_bytes + 1)
                    if len(upload) > opts.max_upload_bytes:
                        raise ApiError(413, f"{upload_name}: the image is over the limit of {opts.max_upload_bytes} bytes")
                else:
                    fields[key] = value
        if "image" in fields:
            raise ApiError(400, "the 'image' field must be a file upload (multipart/form-data)")
    elif "json" in ctype:
        fields = await _json_body(request)
        if fields.get("image") is not None:
            if not isinstance(fields["image"], str) or _input_kind(fields["image"]) != "data":
                raise ApiError(400, "'image' must be a data:image/...;base64, URI (send an image's URL as 'image_url')")
            upload = await service.run_cpu(_decode_data_uri, fields["image"], opts.max_upload_bytes, "image",
                                           deadline=_deadline(request, service))
            upload_name = "image"
    else:
        raise ApiError(400, "send multipart/form-data with an 'image' file, or JSON with 'image', 'image_url' or 'id' "
                       "(GET /api/search?text=... for text)")
    coll = service.collection(fields.get("collection") or None)
    k = _int_param(fields.get("k"), "k", 10, 1, opts.max_k)
    label = fields.get("label") or None
    if label is not None and not isinstance(label, str):
        raise ApiError(400, "label must be a string")
    image_url, item_id = fields.get("image_url"), fields.get("id")
    given = [x for x in (upload, image_url, item_id) if x is not None]
    if len(given) != 1:
        raise ApiError(400, "give exactly one of: an 'image' file, 'image_url' (an image's URL, or an item's) or 'id'")
    deadline = _deadline(request, service)
    if upload is None and not isinstance(image_url if image_url is not None else item_id, str):
        raise ApiError(400, "image_url and id must be strings")
    query: dict[str, Any] = {"image": upload_name}
    if image_url is not None and _item_of_url(service, request, image_url) is None and _input_kind(image_url) != "text":
        query = {"image_url": _shown_url(image_url)}  # an image by URL (fetched) or a data: URI, not an item
        if _input_kind(image_url) == "url":
            upload = (await service.fetch_images([("image_url", image_url)], deadline))[0]
            upload_name = f"image_url {_shown_url(image_url)}"
        else:
            upload = await service.run_cpu(_decode_data_uri, image_url, opts.max_upload_bytes, "image_url",
                                           deadline=deadline)
            upload_name = "image_url"
    if upload is not None:
        if not upload:
            raise ApiError(400, f"{upload_name}: empty (0 bytes)")
        item = await service.prepare_image(coll, upload, upload_name, deadline)
        vector = await service.vectors(coll, IMAGE, [item], deadline)
        return await service.search(request, coll, vector, k, label, query, t0)
    owner, row = _resolve_item(service, request, image_url, item_id, coll.name if item_id is not None else None)
    if image_url is not None and not fields.get("collection"):
        coll = owner  # "more like this" searches the item's own collection unless told otherwise
    vector = await service.item_vector(coll, owner, row, deadline)
    query = {"id": owner.record(row)["id"], "collection": owner.name}
    return await service.search(request, coll, vector, k, label, query, t0)


async def thumbnail(request: Request) -> Response:
    """``GET /api/items/{collection}/{id}/thumbnail``: a JPEG made from the item's own image."""
    service = _service(request)
    coll = service.collection(request.path_params["collection"])
    item_id = request.path_params["item_id"]
    size = _int_param(request.query_params.get("size"), "size", DEFAULT_THUMBNAIL_SIZE, 1, max(THUMBNAIL_SIZES))
    if size not in THUMBNAIL_SIZES:
        raise ApiError(400, f"size must be one of {', '.join(map(str, THUMBNAIL_SIZES))}, got {size}")
    try:
        row = coll.row_of(item_id)
    except ItemNotFound as e:
        raise ApiError(404, str(e)) from None
    key = (coll.name, item_id, size)
    data = service.thumbnails.get(key)
    hit = data is not None
    if data is None:

        def make() -> bytes:  # reading the source (a file, a Parquet row) and decoding: off the event loop
            return render_thumbnail(coll.image_payload(row), size, max_pixels=service.options.max_pixels)

        try:
            data = await service.run_cpu(make, deadline=_deadline(request, service))
        except (NoImage, ImageDecodeError) as e:
            raise ApiError(404, f"no thumbnail: {e}") from None
        service.thumbnails.put(key, data)
    if service.metrics is not None:
        service.metrics.observe_thumbnail(hit)
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})


async def map_view(request: Request) -> Response:
    """``GET /map?collection=NAME``: the collection's 2-D map page (made at its first request, then kept)."""
    service = _service(request)
    coll = service.collection(request.query_params.get("collection"))
    try:
        page = await service.run_cpu(service.maps.page, coll)
    except (CollectionInputError, EmbeddingStoreError) as e:
        raise ApiError(404, f"no map of collection {coll.name!r}: {e}") from None
    return Response(page, media_type="text/html; charset=utf-8", headers={
        "Content-Security-Policy": map_page_csp(frame_ancestors="'self'"), "X-Frame-Options": "SAMEORIGIN",
        "Cache-Control": "no-cache"})


def _model_collection(service: Service, model: Any) -> Collection:
    if model is None or model == "":
        return service.collection(None)
    if not isinstance(model, str):
        raise ApiError(400, "model must be a string: a collection name or an encoder spec")
    if model in service.collections:
        return service.collections[model]
    for c in service.collections.values():
        if c.spec == model:
            return c
    names = sorted({*service.collections, *(c.spec for c in service.collections.values())})
    raise ApiError(404, f"model {model!r} is not served here; use one of {names}", "model_not_found")


async def embeddings(request: Request) -> Response:
    """``POST /v1/embeddings`` in the OpenAI shape: ``input`` texts, images' ``http(s)`` URLs or
    ``data:image/...;base64,`` URIs (see the module docstring for which is which)."""
    service = _service(request)
    opts = service.options
    body = await _json_body(request)
    coll = _model_collection(service, body.get("model"))
    inputs = body.get("input")
    if isinstance(inputs, str):
        inputs = [inputs]
    if not isinstance(inputs, list) or not inputs:
        raise ApiError(400, "input must be a string or a non-empty list of strings")
    if len(inputs) > opts.max_inputs:
        raise ApiError(413, f"input has {len(inputs)} entries, over the limit of {opts.max_inputs}; split the request")
    if not all(isinstance(x, str) for x in inputs):
        raise ApiError(400, "every input must be a string (token arrays are not supported): a text, an image's "
                       "http(s) URL or a data:image/...;base64, URI")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise ApiError(400, f"encoding_format must be 'float' or 'base64', got {fmt!r}")
    dim = int(coll.index.info.dim)
    if body.get("dimensions") not in (None, dim):
        raise ApiError(400, f"{coll.spec} makes {dim}-d vectors; dimensions={body.get('dimensions')!r} is not available")
    kinds = [_input_kind(x) for x in inputs]
    text_pos = [i for i, kind in enumerate(kinds) if kind == "text"]
    data_pos = [i for i, kind in enumerate(kinds) if kind == "data"]
    url_pos = [i for i, kind in enumerate(kinds) if kind == "url"]
    texts = [service.check_text(coll, inputs[i], f"input[{i}]") for i in text_pos]
    deadline = _deadline(request, service)  # decoding, fetching and the wait for the encoder
    raw = await service.run_cpu(lambda: [_decode_data_uri(inputs[i], opts.max_upload_bytes, f"input[{i}]")
                                         for i in data_pos], deadline=deadline)
    raw += await service.fetch_images([(f"input[{i}]", inputs[i]) for i in url_pos], deadline)
    image_pos = data_pos + url_pos
    names = [f"input[{i}]" for i in data_pos] + [f"input[{i}] {_shown_url(inputs[i])}" for i in url_pos]
    items = list(await asyncio.gather(*(service.prepare_image(coll, data, name, deadline)
                                        for data, name in zip(raw, names))))
    jobs = []
    if texts:
        jobs.append(service.vectors(coll, TEXT, texts, deadline))
    if items:
        jobs.append(service.vectors(coll, IMAGE, items, deadline))
    results = await asyncio.gather(*jobs)
    out = np.zeros((len(inputs), dim), dtype=np.float32)
    r = 0
    if texts:
        out[text_pos] = results[r]
        r += 1
    if items:
        out[image_pos] = results[r]
    data = []
    for i, v in enumerate(out):
        emb: Any = (base64.b64encode(np.ascontiguousarray(v, dtype="<f4").tobytes()).decode("ascii")
                    if fmt == "base64" else v.tolist())
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return JSONResponse({"object": "list", "data": data, "model": coll.name,
                         "usage": {"prompt_tokens": 0, "total_tokens": 0}})


async def models(request: Request) -> Response:
    """``GET /v1/models``: the names ``/v1/embeddings`` accepts as ``model``."""
    service = _service(request)
    data = [{"id": c.name, "object": "model", "owned_by": "phiclip", "encoder": c.spec, "dim": int(c.index.info.dim)}
            for c in service.collections.values()]
    return JSONResponse({"object": "list", "data": data})


# === middleware: host check, token, body limit, headers ========================================


def _route_path(scope: Any) -> str:
    """The request path without the ``root_path`` prefix (uvicorn puts the prefix in ``path``)."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and (path == root or path.startswith(root + "/")):
        return path[len(root):]
    return path


class _Guard:
    """Pure ASGI middleware in front of every route: ``Host`` check (without a token), bearer token
    (or the page's cookie), admission (at most ``max_in_flight`` requests to ``/api/`` and ``/v1/`` being
    answered: 503 + ``Retry-After`` beyond, at once), a limit on the request body, and security headers
    on every response. It stamps each request's arrival time (:data:`ARRIVED`), from which
    ``timeout_s`` bounds every wait of the request (a thread to decode on, a fetch, the encoder)."""

    def __init__(self, app: Any, options: ServeOptions) -> None:
        self.app = app
        self.token = options.token.encode() if options.token else None
        self.max_body = options.max_body_bytes
        self.open_paths = _OPEN_PATHS + (("/metrics",) if options.metrics_open else ())
        self.max_in_flight = options.max_in_flight
        self.in_flight = 0
        names = {h.lower().strip("[]") for h in options.allowed_hosts}
        self.hosts = None if (self.token and not names) else {*names, *_LOOPBACK_NAMES}

    @staticmethod
    async def _send_error(scope: Any, receive: Any, send: Any, status: int, message: str,
                          headers: dict[str, str] | None = None) -> None:
        await error_response(status, message, headers=headers)(scope, receive, send)

    def _host_ok(self, headers: Headers) -> bool:
        if self.hosts is None:
            return True
        host = headers.get("host", "")
        name = host[1:].split("]")[0] if host.startswith("[") else host.rsplit(":", 1)[0] if host.count(":") == 1 else host
        return name.lower() in self.hosts

    def _token_ok(self, headers: Headers) -> bool:
        assert self.token is not None
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer " and hmac.compare_digest(auth[7:].strip().encode(), self.token):
            return True
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get("cookie", ""))
        except Exception:  # noqa: BLE001 - a malformed cookie header is just no cookie
            return False
        morsel = cookie.get(TOKEN_COOKIE)
        return morsel is not None and hmac.compare_digest(morsel.value.encode(), self.token)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope[ARRIVED] = time.monotonic()
        headers = Headers(scope=scope)
        if not self._host_ok(headers):
            await self._send_error(scope, receive, send, 400, f"host {headers.get('host', '')!r} is not accepted; add it with "
                                   "--allowed-host (a reverse proxy's name) or use --token")
            return
        path = _route_path(scope)
        if path == "":  # the bare prefix (/phiclip): the page's relative links need the slash
            await RedirectResponse(f"{scope.get('root_path', '')}/", status_code=307)(scope, receive, send)
            return
        if self.token is not None and path not in self.open_paths and not self._token_ok(headers):
            given = (parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token") or [""])[0]
            if path == "/" and given and hmac.compare_digest(given.encode(), self.token):
                root = scope.get("root_path", "")
                resp = RedirectResponse(f"{root}/", status_code=303)
                resp.set_cookie(TOKEN_COOKIE, given, httponly=True, samesite="strict", path=f"{root}/")
                await resp(scope, receive, send)
                return
            await self._send_error(scope, receive, send, 401, "missing or wrong token: send 'Authorization: Bearer TOKEN' "
                                   "(open the page once as /?token=TOKEN)", {"WWW-Authenticate": "Bearer"})
            return
        admitted = path.startswith("/api/") or path.startswith("/v1/")  # the routes that work; the rest is cheap
        if admitted and self.in_flight >= self.max_in_flight:
            await self._send_error(scope, receive, send, 503, f"the server is answering {self.in_flight} requests, its "
                                   f"limit (--max-in-flight {self.max_in_flight}); retry shortly", {"Retry-After": "1"})
            return
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            await self._send_error(scope, receive, send, 413, f"the request body is {length} bytes, over the limit of {self.max_body}")
            return
        received = 0

        async def limited_receive() -> Any:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise HTTPException(413, f"the request body is over the limit of {self.max_body} bytes")
            return message

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                raw = list(message.get("headers", []))
                raw += [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]
                if not any(name.lower() == b"x-frame-options" for name, _ in raw):  # the map: SAMEORIGIN
                    raw.append((b"x-frame-options", b"DENY"))
                message = {**message, "headers": raw}
            await send(message)

        if not admitted:
            await self.app(scope, limited_receive, send_with_headers)
            return
        self.in_flight += 1  # one event loop: no lock needed
        try:
            await self.app(scope, limited_receive, send_with_headers)
        finally:
            self.in_flight -= 1


class _Metered:
    """Pure ASGI middleware outermost: counts every request by route template, method and status, and
    times it (``phiclip_requests_total``, ``phiclip_request_seconds``), refusals by the guard included."""

    def __init__(self, app: Any, metrics: ServeMetrics, routes: list[Any]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    def _route(self, scope: Any) -> str:
        for route in self.routes:
            try:
                match, _ = route.matches(scope)
            except Exception:  # noqa: BLE001 - an odd path is just "other"
                continue
            if match != Match.NONE:
                return str(route.path or "/")
        return "other"

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500  # what the client sees when the app raises before answering

        async def send_status(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.observe_request(self._route(scope), scope.get("method", ""), status, time.perf_counter() - t0)


# === the application ===========================================================================


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.message, exc.kind, exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = exc.detail if isinstance(exc.detail, str) and exc.detail else f"HTTP {exc.status_code}"
    if exc.status_code == 404:
        message = f"no route {request.url.path}; see GET /api/collections, /api/search, /v1/embeddings"
    return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))


async def _server_error(request: Request, exc: Exception) -> Response:
    log.exception("error while answering %s %s", request.method, request.url.path)
    return error_response(500, f"internal error ({type(exc).__name__}: {exc})", "server_error")


def create_app(service: Service | Callable[[], Service], *, options: ServeOptions | None = None,
               on_fatal: Callable[[BaseException], None] | None = None,
               on_loaded: Callable[[Service], None] | None = None) -> Starlette:
    """The Starlette application over ``service`` (its batchers start, warm up and stop with the app).

    ``service`` may instead be a function that builds it (``options`` then required): it runs on a
    thread once the app starts, so that ``/healthz``, ``/readyz`` (503) and ``/metrics`` answer while
    the collections and encoders load; other routes answer 503 with ``Retry-After`` until then.
    ``on_fatal(error)`` is called when that function fails, ``on_loaded(service)`` when it returns.
    """
    if isinstance(service, Service):
        options = service.options
    elif options is None:
        raise ValueError("create_app(loader) needs options=")
    metrics = ServeMetrics()

    def bring_up(svc: Service, limiter: Any) -> None:
        svc.cpu_limiter = limiter
        svc.attach_metrics(metrics)
        svc.draining = app.state.draining
        svc.start()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        limiter = anyio.CapacityLimiter(max(2, os.cpu_count() or 2))
        stopping = threading.Event()
        if isinstance(service, Service):
            bring_up(service, limiter)
            app.state.service = service
        else:
            loader = service

            def load() -> None:
                try:
                    svc = loader()
                except BaseException as e:  # noqa: BLE001 - reported by on_fatal and /readyz
                    log.error("loading failed: %s: %s", type(e).__name__, e)
                    app.state.load_error = f"{type(e).__name__}: {e}"
                    if on_fatal is not None:
                        on_fatal(e)
                    return
                if stopping.is_set():
                    svc.close()
                    return
                bring_up(svc, limiter)
                app.state.service = svc
                if on_loaded is not None:
                    on_loaded(svc)

            threading.Thread(target=load, name="phiclip-load", daemon=True).start()
        try:
            yield
        finally:
            stopping.set()
            if app.state.service is not None:
                app.state.service.close()

    routes = [
        Route("/", index_page, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_page, methods=["GET"]),
        Route("/api/collections", list_collections, methods=["GET"]),
        Route("/api/stats", stats, methods=["GET"]),
        Route("/api/search", search_get, methods=["GET"]),
        Route("/api/search", search_post, methods=["POST"]),
        Route("/api/items/{collection}/{item_id}/thumbnail", thumbnail, methods=["GET"]),
        Route("/map", map_view, methods=["GET"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={ApiError: _api_error, HTTPException: _http_error, Exception: _server_error},
    )
    app.state.service = None
    app.state.metrics = metrics
    app.state.load_error = None
    app.state.draining = False
    app.add_middleware(_Guard, options=options)
    app.add_middleware(_Metered, metrics=metrics, routes=routes)  # added last: outermost
    return app


def start_draining(app: Starlette) -> None:
    """Mark the app as shutting down: ``/readyz`` answers 503 from now on (requests are still answered)."""
    app.state.draining = True
    if app.state.service is not None:
        app.state.service.draining = True


def run_server(paths: list[str | Path], options: ServeOptions | None = None, *, say: Any = print) -> None:
    """Serve until SIGTERM or Ctrl-C (uvicorn): bind the port, answer ``/healthz`` at once, load the
    collections and encoders on a thread (``/readyz``: 503 until loaded and warmed up), then serve.

    The port is bound before anything loads, so a port in use is reported at once
    (:class:`~phiclip.serve.listener.PortInUseError`), before "serving on". On SIGTERM the server stops
    accepting connections, ``/readyz`` turns 503, requests in flight get up to ``options.drain_s`` seconds
    to finish, and this function returns (the process exits 0); a second SIGTERM stops at once.

    Raises:
        ValueError: a bad setting (e.g. a public address without a token) or a directory that
            cannot be served (also when found while loading: the server then stops).
        PortInUseError: another program listens on the port.
    """
    import uvicorn

    opts = (options or ServeOptions()).validate()
    for path in paths:  # a folder that is not an output is refused before the port is taken
        read_manifest(Path(path).expanduser())
    if opts.engine == "ray":
        from phiclip.serve import ray_engine  # lazy: optional dependency (ray[serve])

        ray_engine.available()  # a missing extra is said before the port is taken
    listener = bind_listener(opts.host, opts.port)
    failures: list[BaseException] = []
    holder: dict[str, Any] = {}

    def fatal(error: BaseException) -> None:
        failures.append(error)
        if "server" in holder:
            holder["server"].should_exit = True

    def loaded(service: Service) -> None:
        for c in service.collections.values():
            say(f"collection {c.name!r}: {len(c)} items, {c.spec} ({c.path})")
        say("loaded; warming up (GET /readyz answers 200 once done)")

    try:
        app = create_app(lambda: build_service(paths, opts), options=opts, on_fatal=fatal, on_loaded=loaded)
        host = f"[{opts.host}]" if ":" in opts.host else opts.host
        port = listener.getsockname()[1]
        say(f"serving on http://{host}:{port}{opts.root_path}/" + ("" if is_loopback(opts.host) else " (token required)")
            + " (loading the collections)")
        config = uvicorn.Config(app, host=opts.host, port=port, root_path=opts.root_path, log_level="info",
                                timeout_graceful_shutdown=opts.drain_s, server_header=False)
        server = _draining_server(config, app, say)
        holder["server"] = server
        server.run(sockets=[listener])
    finally:
        listener.close()
    if failures:
        raise failures[0]


def _draining_server(config: Any, app: Starlette, say: Any) -> Any:
    """uvicorn's server, where SIGTERM drains and then returns (exit 0) instead of re-raising the signal
    once shut down (uvicorn's default: the process then dies by the signal, exit -15)."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            start_draining(app)
            if sig == signal.SIGTERM and not self.should_exit:
                say(f"SIGTERM: not accepting new connections; finishing requests in flight (up to "
                    f"{config.timeout_graceful_shutdown:g} s)")
                self.should_exit = True  # not recorded as a captured signal: no re-raise, exit 0
                return
            super().handle_exit(sig, frame)

    return Server(config)


__all__ = ["ApiError", "STATIC_DIR", "Service", "build_service", "create_app", "error_response", "run_server",
           "start_draining"]
