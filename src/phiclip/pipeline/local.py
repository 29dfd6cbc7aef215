"""The local engine (:class:`LocalEngine`, an :class:`~.engine.Engine`): the pending shards of a run
through the step (:mod:`.step`) on this machine, into the shard sink (:class:`.writer.ShardSink`).

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
from collections.abc import Iterable, Iterator
from typing import Any

from phiclip.encoders import Encoder, EncoderSpec, load_encoder
from phiclip.encoders.base import default_prep_threads
from phiclip.encoders.device import resolve_device_dtype
from phiclip.pipeline.engine import EngineJob, LocalOptions, TooManyFailures
from phiclip.pipeline.step import Chunk, ModelStep, Piece, Preparer, StepResult, TextStep
from phiclip.pipeline.writer import ShardSink


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


def drive(results: Iterator[tuple[int, StepResult]], job: EngineJob, sink: ShardSink) -> int:
    """Feed ``(shard, result)`` pairs to the sink; returns how many records this run accounted for. When
    the run stops early (a model failure, Ctrl-C), what the sink holds is flushed first, so a rerun
    keeps it (unless flushing is off)."""
    processed = 0
    try:
        for shard, res in results:
            for k, v in res.timings.items():
                job.timings[k] = job.timings.get(k, 0.0) + v
            n = sink.add(shard, res)
            processed += n
            job.bar.update(n)
            job.bar.set_postfix(failed=sink.failed, refresh=False)
            limit = getattr(job, "max_failures", None)
            if limit is not None and limit.exceeded(sink.failed, processed):
                top = sorted(sink.reasons.items(), key=lambda kv: -kv[1])
                shown = "; ".join(f"{n} x {stage}: {reason}" for (stage, reason), n in top[:3])
                raise TooManyFailures(f"stopped early: {sink.failed} of the {processed} inputs done by this run failed, "
                                      f"more than --max-failures {limit.text} allows (top reasons: {shown}); what was "
                                      "written is kept: fix the input and rerun the same command to resume", top)
    except BaseException:
        if sink.flush_seconds is not None:
            with contextlib.suppress(Exception):
                sink.flush()
        raise
    finally:
        close = getattr(results, "close", None)
        if close is not None:
            close()
    sink.close()
    return processed


class LocalEngine:
    """The local engine (an :class:`~.engine.Engine`): this machine, with its :class:`~.engine.LocalOptions`."""

    def __init__(self, options: LocalOptions) -> None:
        self.options = options

    def precision(self, model: Any) -> str:
        """The compute dtype the vectors come from (``float32``, ``bfloat16``...)."""
        if isinstance(model, (str, EncoderSpec)):
            return str(resolve_device_dtype(self.options.device, self.options.precision)[1]).replace("torch.", "")
        return str(model.describe().get("dtype", "unknown")).replace("torch.", "")

    def load(self, model: Any, max_pixels: int | None) -> Encoder:
        """``model`` as is when loaded, else loaded from its spec on the options' device and precision."""
        encoder = model if isinstance(model, Encoder) else load_encoder(model, device=self.options.device,
                                                                         dtype=self.options.precision)
        encoder.set_max_pixels(max_pixels)  # also bounds what preprocessing builds (Phi-3-vision's HD canvas)
        return encoder

    def run(self, job: EngineJob, sink: ShardSink) -> int:
        """Embed the job's pending shards here; returns the records processed."""
        keys = ("read_decode_preprocess", "wait", "encode", "write") if job.kind == "image" else ("encode", "write")
        for key in keys:
            job.timings.setdefault(key, 0.0)
        results = self._image_results(job) if job.kind == "image" else _text_results(job)
        return drive(results, job, sink)

    def _image_results(self, job: EngineJob) -> Iterator[tuple[int, StepResult]]:
        prep = Preparer(job.records, job.reader, job.encoder, max_pixels=job.max_pixels, budget=job.batch_size)
        chunks = prep.chunks(job.units)
        model = ModelStep(job.encoder, with_tokens=job.tokens, precision=job.precision)
        nw = min(self.options.workers(model.device), len(chunks))
        pieces = _worker_pieces(prep, chunks, nw) if nw else prep.in_process(chunks, default_prep_threads())
        try:
            for piece in timed(pieces, job.timings, "wait"):
                yield piece.shard, model.encode(piece)
        finally:
            close = getattr(pieces, "close", None)  # stop the preparing threads, also when the model failed
            if close is not None:
                close()


def _text_results(job: EngineJob) -> Iterator[tuple[int, StepResult]]:
    step = TextStep(job.encoder, job.records, job.batch_size)
    for shard, positions in job.units:
        yield from step.batches(shard, positions)


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


__all__ = ["LocalEngine", "drive", "timed"]
