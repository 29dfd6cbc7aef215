"""Dynamic batching in front of one encoder: many requests, one model call at a time.

Requests :meth:`DynamicBatcher.submit` a *job* (one or more texts, or one or more preprocessed
images) and get a :class:`concurrent.futures.Future` of its ``(n, dim)`` vectors. One worker thread
owns the encoder: it takes the oldest job, waits up to ``max_wait_s`` (counted from that job's
arrival) for more, takes jobs while their total cost fits ``max_batch``, and calls the encoder once
per kind (texts with ``encode_texts``, images with ``collate`` + ``encode_batch``). Each job gets
back exactly its own rows; when a batched call fails, every job of it is retried alone, so one
bad job can only fail itself.

The queue is bounded by ``max_queue`` items: a submit that would exceed it raises
:class:`Overloaded` at once (the server answers 503) instead of growing. A job whose future was
cancelled (its request timed out) is dropped before it reaches the model.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from phiclip.encoders.base import Encoder

log = logging.getLogger(__name__)

#: Job kinds.
TEXT = "text"
IMAGE = "image"


class Overloaded(RuntimeError):
    """The batcher's queue is full (or it is shut down); the request should be retried later."""


class InputError(ValueError):
    """An input the encoder cannot take (an unreadable image...): the request is wrong, not the server
    (raised by engines that prepare inputs where the model runs, e.g. Ray Serve replicas)."""


def warm_up_encoder(encoder: Encoder) -> None:
    """One small batch through the model (an image when it has an image side, else a text), so that the
    first request does not pay for lazy initialisation (kernels, allocator, tokenizer)."""
    if "image" in encoder.modalities:
        from PIL import Image

        item = encoder.preprocess(Image.new("RGB", (64, 64), (127, 127, 127)))
        encoder.encode_batch(encoder.collate([item]))
    else:
        encoder.encode_texts(["warm-up"], batch_size=1)


@dataclass
class _Job:
    kind: str
    items: list[Any]
    cost: int
    future: Future
    arrived: float = field(default_factory=time.monotonic)
    taken: float = 0.0  # when the worker took it into a batch


@dataclass
class BatchStats:
    """Counters of one batcher (read with :meth:`DynamicBatcher.stats`)."""

    batches: int = 0  # encoder calls
    items: int = 0  # items encoded
    jobs: int = 0  # jobs answered
    max_batch: int = 0  # largest number of items in one encoder call
    rejected: int = 0  # submits refused because the queue was full
    cancelled: int = 0  # jobs dropped because their request gave up
    failed: int = 0  # jobs answered with an exception
    max_queue_depth: int = 0  # most items waiting at once
    encode_seconds: float = 0.0  # time inside encoder calls


class DynamicBatcher:
    """Feeds one encoder from a bounded queue on one worker thread (see the module docstring).

    Args:
        encoder: a :class:`phiclip.encoders.Encoder`; only the worker thread calls its model.
        max_batch: the most items (cost units: images, or Phi-3-vision crops) per encoder call.
        max_wait_s: how long the oldest waiting job may wait for others to join its batch.
        max_queue: the most items waiting; more raises :class:`Overloaded`.
        name: the worker thread's name.
        observer: called after each successful encoder call with ``(kind, inputs, model seconds, queue
            wait of each job)`` (the server's metrics); on the worker thread, so it must be quick.
    """

    def __init__(self, encoder: Encoder, *, max_batch: int = 32, max_wait_s: float = 0.005, max_queue: int = 256,
                 name: str = "phiclip-encoder", observer: Callable[[tuple[str, int, float, list[float]]], None] | None = None
                 ) -> None:
        if max_batch < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError(f"max_batch ({max_batch}) and max_queue ({max_queue}) must be >= 1, max_wait_s >= 0")
        self.encoder = encoder
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._jobs: collections.deque[_Job] = collections.deque()
        self._queued_items = 0
        self._cond = threading.Condition()
        self._closed = False
        self._stats = BatchStats()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started = False
        self._warm_up: Callable[[Any], None] | None = None
        self.observer = observer
        #: Set once the worker thread ran the warm-up (or had none to run); ``warm_error``: what it raised.
        self.warmed = threading.Event()
        self.warm_error: BaseException | None = None

    # --- public ---------------------------------------------------------------------------------
    def start(self, warm_up: Callable[[Any], None] | None = None) -> DynamicBatcher:
        """Start the worker thread (once). ``warm_up(encoder)``, when given, runs first on that thread (the
        only one that calls the model), before any job: :attr:`warmed` is set once it ran, and
        :attr:`warm_error` holds what it raised (jobs are still answered)."""
        with self._cond:
            if not self._started:
                self._started = True
                self._warm_up = warm_up
                self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Stop taking jobs, fail the waiting ones with :class:`Overloaded`, and join the worker."""
        with self._cond:
            self._closed = True
            waiting = list(self._jobs)
            self._jobs.clear()
            self._queued_items = 0
            self._cond.notify_all()
        for job in waiting:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(Overloaded("the server is shutting down"))
        if self._started:
            self._thread.join(timeout)

    def submit(self, kind: str, items: Sequence[Any]) -> Future:
        """Queue one job: ``kind`` is ``"text"`` (strings) or ``"image"`` (outputs of the encoder's
        ``preprocess``). Returns a future of the job's ``(len(items), dim)`` float32 vectors.

        Raises:
            Overloaded: the queue cannot take ``len(items)`` more items, or the batcher is closed.
            ValueError: an unknown kind or an empty job.
        """
        if kind not in (TEXT, IMAGE):
            raise ValueError(f"job kind {kind!r} is not {TEXT!r} or {IMAGE!r}")
        if not items:
            raise ValueError("a job needs at least one item")
        cost = len(items) if kind == TEXT else sum(max(1, int(self.encoder.item_cost(it))) for it in items)
        job = _Job(kind, list(items), cost, Future())
        with self._cond:
            if self._closed:
                raise Overloaded("the server is shutting down")
            if self._queued_items + len(items) > self.max_queue:
                self._stats.rejected += 1
                raise Overloaded(
                    f"the encoder queue is full ({self._queued_items} of {self.max_queue} items waiting); retry shortly"
                )
            self._jobs.append(job)
            self._queued_items += len(items)
            self._stats.max_queue_depth = max(self._stats.max_queue_depth, self._queued_items)
            self._cond.notify_all()
        return job.future

    def queue_depth(self) -> int:
        """Items waiting for the model now."""
        with self._cond:
            return self._queued_items

    def stats(self) -> dict[str, Any]:
        """A snapshot of the counters, with the queue depth and the limits."""
        with self._cond:
            s = dict(self._stats.__dict__)
            s.update(queue_depth=self._queued_items, max_queue=self.max_queue, max_batch_size=self.max_batch,
                     max_wait_ms=round(self.max_wait_s * 1000, 3))
        s["encode_seconds"] = round(s["encode_seconds"], 4)
        s["mean_batch"] = round(s["items"] / s["batches"], 3) if s["batches"] else 0.0
        return s

    # --- worker ---------------------------------------------------------------------------------
    def _take(self) -> list[_Job] | None:
        """Wait for jobs, then return the next batch of them (``None`` when closed)."""
        with self._cond:
            while True:
                while not self._jobs and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return None
                self._drop_cancelled()
                if not self._jobs:
                    continue
                deadline = self._jobs[0].arrived + self.max_wait_s
                while not self._closed and sum(j.cost for j in self._jobs) < self.max_batch:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if self._closed:
                    return None
                self._drop_cancelled()
                batch: list[_Job] = []
                cost = 0
                now = time.monotonic()
                while self._jobs and (not batch or cost + self._jobs[0].cost <= self.max_batch):
                    job = self._jobs.popleft()
                    job.taken = now
                    self._queued_items -= len(job.items)
                    cost += job.cost
                    batch.append(job)
                if batch:
                    return batch

    def _drop_cancelled(self) -> None:
        """Remove jobs whose request gave up (caller holds the lock)."""
        kept: collections.deque[_Job] = collections.deque()
        for job in self._jobs:
            if job.future.cancelled():
                self._queued_items -= len(job.items)
                self._stats.cancelled += 1
            else:
                kept.append(job)
        self._jobs = kept

    def _encode(self, kind: str, items: list[Any]) -> np.ndarray:
        """Encode ``items`` in calls of at most ``max_batch`` cost (a job larger than that is split)."""
        if kind == TEXT:
            out = self.encoder.encode_texts(items, batch_size=self.max_batch)
        else:
            parts, chunk, cost = [], [], 0
            for it in items:
                c = max(1, int(self.encoder.item_cost(it)))
                if chunk and cost + c > self.max_batch:
                    parts.append(chunk)
                    chunk, cost = [], 0
                chunk.append(it)
                cost += c
            parts.append(chunk)
            out = np.concatenate(
                [np.asarray(self.encoder.encode_batch(self.encoder.collate(p)).embeddings, dtype=np.float32) for p in parts]
            )
        out = np.asarray(out, dtype=np.float32)
        if out.ndim != 2 or out.shape[0] != len(items):
            raise RuntimeError(f"the encoder returned {out.shape} for {len(items)} {kind} inputs")
        return out

    def _answer(self, kind: str, jobs: list[_Job]) -> None:
        """One encoder call for ``jobs`` (all of ``kind``); each job gets its own rows."""
        items = [it for j in jobs for it in j.items]
        t0 = time.perf_counter()
        try:
            vectors = self._encode(kind, items)
        except Exception as e:  # noqa: BLE001 - reported to the waiting requests
            seconds = time.perf_counter() - t0
            with self._cond:
                self._stats.encode_seconds += seconds
            if len(jobs) > 1:  # isolate the job that fails: each alone
                for job in jobs:
                    self._answer(kind, [job])
                return
            with self._cond:
                self._stats.failed += 1
            jobs[0].future.set_exception(e)
            return
        seconds = time.perf_counter() - t0
        with self._cond:
            self._stats.batches += 1
            self._stats.items += len(items)
            self._stats.jobs += len(jobs)
            self._stats.max_batch = max(self._stats.max_batch, len(items))
            self._stats.encode_seconds += seconds
        if self.observer is not None:
            try:
                self.observer((kind, len(items), seconds, [j.taken - j.arrived for j in jobs]))
            except Exception:  # noqa: BLE001 - metrics must never fail a request
                log.exception("the batch observer failed")
        start = 0
        for job in jobs:
            job.future.set_result(vectors[start : start + len(job.items)].copy())
            start += len(job.items)

    def _run(self) -> None:
        if self._warm_up is not None:
            t0 = time.perf_counter()
            try:
                self._warm_up(self.encoder)
                log.info("%s: warm-up batch in %.2f s", self._thread.name, time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001 - reported through warm_error (the server is not ready)
                log.exception("%s: the warm-up batch failed", self._thread.name)
                self.warm_error = e
        self.warmed.set()
        while True:
            batch = self._take()
            if batch is None:
                return
            live: dict[str, list[_Job]] = {TEXT: [], IMAGE: []}
            for job in batch:
                if job.future.set_running_or_notify_cancel():  # False: cancelled while waiting
                    live[job.kind].append(job)
                else:
                    with self._cond:
                        self._stats.cancelled += 1
            for kind, jobs in live.items():
                if jobs:
                    self._answer(kind, jobs)


__all__ = ["IMAGE", "TEXT", "BatchStats", "DynamicBatcher", "InputError", "Overloaded", "warm_up_encoder"]
