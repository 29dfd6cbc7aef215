"""The local engine: the pending shards of a run through the step (:mod:`.step`) on this machine, into
the shard sink (:class:`.writer.ShardSink`).

Who prepares the inputs: with a GPU the model leaves the CPU free, so ``num_workers`` processes (a
torch ``DataLoader``; default ``min(4, CPUs)``) decode and preprocess while the model runs. On the
CPU the model's matrix products already use every core, and worker processes competing with them
slow both down (a preempted thread stalls the whole parallel matrix product), so the default there
is ``num_workers=0``: each chunk is decoded and preprocessed on a pool of as many threads as torch
uses (PIL releases the GIL), then the model runs; the two take turns at the whole machine.

Workers and the encoder: on Linux the workers are started with ``fork``, so they share the loaded
encoder (model included) without pickling it; they call only its CPU side. Where ``fork`` is not
available the encoder is pickled into each worker (slower to start).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from phiclip.encoders.base import default_prep_threads
from phiclip.pipeline.sources import PayloadReader, Record
from phiclip.pipeline.step import Chunk, ModelStep, Piece, Preparer, StepResult, TextStep
from phiclip.pipeline.writer import ShardSink


@dataclass
class EngineJob:
    """What an engine gets: the records and how to read them, the pending ``units`` (``(shard,
    positions)``), the loaded encoder, the run's options and precision, the sink that writes, the
    timings to add to, and a progress bar."""

    kind: str
    records: Sequence[Record]
    reader: PayloadReader
    units: list[tuple[int, list[int]]]
    encoder: Any
    opts: Any  # EmbedOptions
    precision: str
    sink: ShardSink
    timings: dict[str, float]
    bar: Any


def timed(items: Iterable[Any], timings: dict[str, float], key: str) -> Iterator[Any]:
    """``items``, adding the seconds spent waiting for each one to ``timings[key]``."""
    it = iter(items)
    while True:
        t0 = time.perf_counter()
        item = next(it, None)
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0
        if item is None:
            return
        yield item


def drive(results: Iterator[tuple[int, StepResult]], job: EngineJob) -> int:
    """Feed ``(shard, result)`` pairs to the sink; returns how many records this run accounted for. When
    the run stops early (a model failure, Ctrl-C), what the sink holds is flushed first, so a rerun
    keeps it (unless flushing is off)."""
    processed = 0
    try:
        for shard, res in results:
            for k, v in res.timings.items():
                job.timings[k] = job.timings.get(k, 0.0) + v
            n = job.sink.add(shard, res)
            processed += n
            job.bar.update(n)
            job.bar.set_postfix(failed=job.sink.failed, refresh=False)
    except BaseException:
        if job.sink.flush_seconds is not None:
            with contextlib.suppress(Exception):
                job.sink.flush()
        raise
    finally:
        close = getattr(results, "close", None)
        if close is not None:
            close()
    job.sink.close()
    return processed


def run(job: EngineJob) -> int:
    """Embed the job's pending shards here; returns the records processed."""
    keys = ("read_decode_preprocess", "wait", "encode", "write") if job.kind == "image" else ("encode", "write")
    for key in keys:
        job.timings.setdefault(key, 0.0)
    return drive(_image_results(job) if job.kind == "image" else _text_results(job), job)


def _text_results(job: EngineJob) -> Iterator[tuple[int, StepResult]]:
    step = TextStep(job.encoder, job.records, job.opts.batch_size)
    for shard, positions in job.units:
        yield from step.batches(shard, positions)


def _image_results(job: EngineJob) -> Iterator[tuple[int, StepResult]]:
    prep = Preparer(job.records, job.reader, job.encoder, max_pixels=job.opts.max_pixels, budget=job.opts.batch_size)
    chunks = prep.chunks(job.units)
    model = ModelStep(job.encoder, with_tokens=job.opts.tokens, precision=job.precision)
    nw = min(job.opts.workers(model.device), len(chunks))
    pieces = _worker_pieces(prep, chunks, nw) if nw else prep.in_process(chunks, default_prep_threads())
    try:
        for piece in timed(pieces, job.timings, "wait"):
            yield piece.shard, model.encode(piece)
    finally:
        close = getattr(pieces, "close", None)  # stop the preparing threads, also when the model failed
        if close is not None:
            close()


def _identity(x: Any) -> Any:
    return x


def _worker_pieces(prep: Preparer, chunks: list[Chunk], num_workers: int) -> Iterable[Piece]:
    """The chunks prepared by ``num_workers`` DataLoader processes (chunk k by worker k mod n), in order."""
    from torch.utils.data import DataLoader, IterableDataset, get_worker_info

    class ChunkDataset(IterableDataset):
        def __iter__(self) -> Iterator[Piece]:
            info = get_worker_info()
            wid, n = (0, 1) if info is None else (info.id, info.num_workers)
            for k in range(wid, len(chunks), n):
                yield from prep.pieces(chunks[k])

    return DataLoader(ChunkDataset(), batch_size=None, num_workers=num_workers, collate_fn=_identity,
                      multiprocessing_context=_mp_context(), prefetch_factor=4)


def _mp_context() -> Any:
    import multiprocessing as mp

    if sys.platform.startswith("linux") and "fork" in mp.get_all_start_methods():
        return mp.get_context("fork")
    return None


__all__ = ["EngineJob", "drive", "run", "timed"]
