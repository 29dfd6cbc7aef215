"""Fetching images over HTTP(S): many at once, each with bounded time, size and retries, every failure a value.

:func:`fetch_many` takes URLs and gives back, in order, each one's body (``bytes``) or an
:class:`~phiclip.images.Unreadable` with stage ``fetch`` and a reason that names no URL (so the
reasons of a run group: ``HTTP 404 Not Found``, ``timeout (read) after 4 tries``, ``too large (over
20000000 bytes)``, ``not an image (Content-Type text/html)``, ``too many redirects (more than 5; a
redirect loop?)``...).

How (:class:`FetchOptions`):

- one ``httpx.AsyncClient`` per process on its own event-loop thread (started on first use, again after
  a ``fork``), at most ``concurrency`` requests in flight in the process and ``per_host`` per host;
- connect and read timeouts, plus a deadline per attempt (a body that never ends fails by time);
- bounded retries with exponential backoff (and jitter) on timeouts, connection errors, 5xx and 429;
  a ``Retry-After`` header (seconds or an HTTP date) is honoured up to ``max_retry_after`` seconds;
- the size limit enforced while streaming (``Content-Length`` checked first; the body is never buffered
  beyond ``max_bytes``); redirects followed up to ``max_redirects``;
- a body whose ``Content-Type`` is text (an HTML error page) fails as not an image; decoding is left to
  the caller's threads (never on the event loop);
- with ``guard`` (:class:`phiclip.netguard.AddressGuard`, what a server sets for URLs its clients name),
  every connection, redirect hops included, goes only to public addresses checked after resolving the
  host (a refused one fails at once, not retried, with a reason starting ``refused (not a public
  address)``); proxies from the environment are then not used.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import email.utils
import os
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from phiclip.images import Unreadable
from phiclip.netguard import AddressGuard, AddressRefused

#: The stage of every fetch failure in ``errors/``.
STAGE_FETCH = "fetch"
#: Statuses retried (with backoff; ``Retry-After`` honoured).
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
_TEXT_TYPES = ("text/", "application/json", "application/xml", "application/xhtml")


@dataclass(frozen=True)
class FetchOptions:
    """How URLs are fetched (see the module docstring); every field has a default."""

    #: Requests in flight in one process (all hosts).
    concurrency: int = 64
    #: Requests in flight to one host.
    per_host: int = 16
    #: Seconds to connect.
    connect_timeout: float = 10.0
    #: Seconds without a byte of the response before it fails.
    read_timeout: float = 30.0
    #: Seconds one attempt may take in all (a body that trickles forever).
    deadline: float = 120.0
    #: Tries after the first on a timeout, a connection error, 5xx or 429.
    retries: int = 3
    #: First backoff (seconds), doubled each retry (with jitter), at most ``max_backoff``.
    backoff: float = 0.5
    max_backoff: float = 10.0
    #: The longest ``Retry-After`` waited for; a longer one fails the image now.
    max_retry_after: float = 60.0
    #: Largest body accepted (bytes).
    max_bytes: int = 20_000_000
    #: Redirects followed.
    max_redirects: int = 5
    #: Use the proxy settings of the environment (``HTTPS_PROXY``...).
    trust_env: bool = True
    user_agent: str = "phiclip (+https://github.com/phiclip)"
    #: Connect only to public addresses (see the module docstring); ``None``: any address.
    guard: AddressGuard | None = None

    @classmethod
    def for_timeout(cls, timeout: float, **settings: Any) -> FetchOptions:
        """Options from one timeout (what ``--fetch-timeout`` sets): seconds without a byte before an attempt
        fails, the connect timeout the same (at most 10 s), an attempt's deadline 4x (at least the default
        ``deadline``); ``settings``: other fields (``per_host`` at most ``concurrency``)."""
        base = cls()
        concurrency = int(settings.pop("concurrency", base.concurrency))
        return cls(read_timeout=timeout, connect_timeout=min(10.0, timeout), deadline=max(base.deadline, 4 * timeout),
                   concurrency=concurrency, per_host=min(base.per_host, concurrency), **settings)

    def validate(self) -> FetchOptions:
        """Check ranges; returns self. Raises ``ValueError`` naming the bad setting."""
        for name in ("concurrency", "per_host", "max_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"fetch {name} must be at least 1, got {getattr(self, name)}")
        for name in ("connect_timeout", "read_timeout", "deadline"):
            if not getattr(self, name) > 0:
                raise ValueError(f"fetch {name} must be positive, got {getattr(self, name)}")
        if self.retries < 0 or self.max_redirects < 0:
            raise ValueError("fetch retries and max_redirects must be 0 or more")
        return self


class _Retry(Exception):
    def __init__(self, reason: str, wait: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.wait = wait


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks to wait (a number, or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class Fetcher:
    """The event-loop thread and client of one process (see :func:`fetcher`)."""

    def __init__(self, opts: FetchOptions) -> None:
        self.opts = opts.validate()
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), name="phiclip-fetch", daemon=True)
        self.thread.start()
        ready.wait()

    def _run(self, ready: threading.Event) -> None:
        import httpx

        asyncio.set_event_loop(self.loop)
        o = self.opts
        limits = httpx.Limits(max_connections=o.concurrency, max_keepalive_connections=o.concurrency)
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(connect=o.connect_timeout, read=o.read_timeout, write=o.read_timeout, pool=None),
            limits=limits, transport=o.guard.transport(limits=limits) if o.guard is not None else None,
            follow_redirects=True, max_redirects=o.max_redirects, trust_env=o.trust_env and o.guard is None,
            headers={"User-Agent": o.user_agent, "Accept": "image/*,*/*;q=0.5"},
        )
        self.gate = asyncio.Semaphore(o.concurrency)
        self.hosts: dict[str, asyncio.Semaphore] = {}
        ready.set()
        self.loop.run_forever()

    def fetch_many(self, urls: Sequence[str]) -> list[bytes | Unreadable]:
        """Each URL's body or why it failed, in order (blocks until all are done)."""
        if not urls:
            return []
        return self.submit_many(urls).result()

    def submit_many(self, urls: Sequence[str]) -> concurrent.futures.Future[list[bytes | Unreadable]]:
        """:meth:`fetch_many` without blocking: a future of its answer (cancelling it stops the fetches)."""
        return asyncio.run_coroutine_threadsafe(self._many(list(urls)), self.loop)

    def fetch_ranges(self, parts: Sequence[tuple[str, int, int]]) -> list[bytes | Unreadable]:
        """``(url, offset, size)`` -> those bytes of each URL (``Range`` requests), in order."""
        if not parts:
            return []
        return asyncio.run_coroutine_threadsafe(self._many([u for u, _, _ in parts], [(o, n) for _, o, n in parts]),
                                                self.loop).result()

    async def _many(self, urls: list[str], ranges: list[tuple[int, int]] | None = None) -> list[bytes | Unreadable]:
        spans: list[tuple[int, int] | None] = list(ranges) if ranges is not None else [None] * len(urls)
        return list(await asyncio.gather(*(self._guarded(u, r) for u, r in zip(urls, spans))))

    async def _guarded(self, url: str, span: tuple[int, int] | None = None) -> bytes | Unreadable:
        try:
            return await self._one(url, span)
        except Exception as e:  # noqa: BLE001 - a failure is a value
            return Unreadable(STAGE_FETCH, f"cannot fetch ({type(e).__name__}: {e})")

    async def _one(self, url: str, span: tuple[int, int] | None = None) -> bytes | Unreadable:
        o = self.opts
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return Unreadable(STAGE_FETCH, "not an http(s) URL")
        host = parts.hostname
        gate = self.hosts.get(host)
        if gate is None:
            gate = self.hosts[host] = asyncio.Semaphore(o.per_host)
        tries = o.retries + 1
        last = ""
        for attempt in range(tries):
            try:
                async with self.gate, gate:
                    return await asyncio.wait_for(self._attempt(url, span), o.deadline)
            except _Retry as r:
                last, wait = r.reason, r.wait
            except asyncio.TimeoutError:
                last, wait = f"timeout (no complete answer within {o.deadline:g} s)", None
            if wait is not None and wait > o.max_retry_after:
                return Unreadable(STAGE_FETCH, f"{last}; Retry-After {wait:.0f} s is longer than {o.max_retry_after:g} s")
            if attempt + 1 < tries:
                backoff = min(o.max_backoff, o.backoff * (2**attempt)) * (0.5 + random.random() / 2)
                await asyncio.sleep(max(backoff, wait or 0.0))
        return Unreadable(STAGE_FETCH, f"{last} after {tries} tries" if tries > 1 else last)

    async def _attempt(self, url: str, span: tuple[int, int] | None = None) -> bytes | Unreadable:
        import httpx

        o = self.opts
        headers = {"Range": f"bytes={span[0]}-{span[0] + span[1] - 1}"} if span is not None else None
        try:
            async with self.client.stream("GET", url, headers=headers) as r:
                status = r.status_code
                if span is not None and status == 200:
                    return Unreadable(STAGE_FETCH, "the server does not answer Range requests (needed to read one "
                                      "sample of a shard URL); download the shards and give local paths")
                if status in RETRY_STATUSES:
                    wait = retry_after_seconds(r.headers.get("retry-after")) if status in (429, 503) else None
                    raise _Retry(f"HTTP {status} {r.reason_phrase}".strip(), wait)
                if status >= 400:
                    return Unreadable(STAGE_FETCH, f"HTTP {status} {r.reason_phrase}".strip())
                if not 200 <= status < 300:
                    return Unreadable(STAGE_FETCH, f"HTTP {status} {r.reason_phrase} (not an image)".strip())
                ctype = r.headers.get("content-type", "").split(";")[0].strip().lower()
                if span is None and ctype.startswith(_TEXT_TYPES):
                    return Unreadable(STAGE_FETCH, f"not an image (Content-Type {ctype})")
                length = r.headers.get("content-length")
                if length is not None and length.isdigit() and int(length) > o.max_bytes:
                    return Unreadable(STAGE_FETCH, f"too large (over {o.max_bytes} bytes)")
                body = bytearray()
                async for chunk in r.aiter_bytes():
                    body += chunk
                    if len(body) > o.max_bytes:
                        return Unreadable(STAGE_FETCH, f"too large (over {o.max_bytes} bytes)")
                if not body:
                    return Unreadable(STAGE_FETCH, "empty body (0 bytes)")
                return bytes(body)
        except AddressRefused as e:
            return Unreadable(STAGE_FETCH, str(e))
        except httpx.TooManyRedirects:
            return Unreadable(STAGE_FETCH, f"too many redirects (more than {o.max_redirects}; a redirect loop?)")
        except httpx.TimeoutException as e:
            kind = {"ConnectTimeout": "connect", "ReadTimeout": "read", "WriteTimeout": "write",
                    "PoolTimeout": "pool"}.get(type(e).__name__, "")
            raise _Retry(f"timeout ({kind})" if kind else "timeout") from None
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError) as e:
            raise _Retry(f"connection failed ({type(e).__name__})") from None
        except httpx.UnsupportedProtocol:
            return Unreadable(STAGE_FETCH, "not an http(s) URL")
        except httpx.InvalidURL:
            return Unreadable(STAGE_FETCH, "not a valid URL")


_FETCHERS: dict[tuple[int, FetchOptions], Fetcher] = {}
_LOCK = threading.Lock()


def fetcher(opts: FetchOptions | None = None) -> Fetcher:
    """The :class:`Fetcher` of this process for ``opts`` (a new one after a ``fork``)."""
    opts = opts or FetchOptions()
    key = (os.getpid(), opts)
    with _LOCK:
        got = _FETCHERS.get(key)
        if got is None:
            got = _FETCHERS[key] = Fetcher(opts)
    return got


def fetch_many(urls: Sequence[str], opts: FetchOptions | None = None) -> list[bytes | Unreadable]:
    """Fetch ``urls`` concurrently: each one's body or an :class:`Unreadable` (see the module docstring)."""
    return fetcher(opts).fetch_many(urls)


def fetch_ranges(parts: Sequence[tuple[str, int, int]], opts: FetchOptions | None = None) -> list[bytes | Unreadable]:
    """``(url, offset, size)`` -> those bytes of each URL (``Range`` requests), or an :class:`Unreadable`."""
    return fetcher(opts).fetch_ranges(parts)


def is_url(text: str) -> bool:
    """Whether a text is an ``http(s)://`` URL (what a list line or a table cell may hold instead of a path)."""
    head = text[:8].lower()
    return head.startswith(("http://", "https://"))


def is_data_uri(text: str) -> bool:
    """Whether a text is a ``data:`` URI."""
    return text[:5].lower() == "data:"


def decode_data_uri(uri: str) -> bytes | Unreadable:
    """The bytes of a ``data:[<type>][;base64],<data>`` URI, or why not."""
    import base64
    import binascii
    from urllib.parse import unquote_to_bytes

    head, comma, data = uri.partition(",")
    if not comma:
        return Unreadable("read", "not a valid data: URI (no comma)")
    meta = head[5:].split(";")
    ctype = meta[0].strip().lower()
    if ctype.startswith(_TEXT_TYPES):
        return Unreadable("read", f"not an image (data: URI of type {ctype})")
    try:
        raw = base64.b64decode(data, validate=False) if "base64" in (m.strip().lower() for m in meta[1:]) \
            else unquote_to_bytes(data)
    except (binascii.Error, ValueError) as e:
        return Unreadable("read", f"not a valid data: URI ({e})")
    return raw if raw else Unreadable("read", "empty data: URI (0 bytes)")


def shown_uri(uri: str, limit: int = 80) -> str:
    """A ``data:`` URI shortened for the ``source`` column (its type and size)."""
    if len(uri) <= limit:
        return uri
    head = uri.split(",", 1)[0]
    return f"{head},...({len(uri)} characters)"


__all__ = ["STAGE_FETCH", "FetchOptions", "Fetcher", "decode_data_uri", "fetch_many", "fetch_ranges", "fetcher", "is_data_uri",
           "is_url", "retry_after_seconds", "shown_uri"]
