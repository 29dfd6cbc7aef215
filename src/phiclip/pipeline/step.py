"""The one embedding loop: records in; vectors, tokens, sizes, errors (as values) and per-stage timings out.

Every engine, and :func:`embed_payloads` for in-memory use, runs its inputs through the same two
halves, so that an engine can run them in different places:

1. **prepare** (CPU, :class:`Preparer`): read the payloads (``reader.read``: each record's
   :class:`~phiclip.inputs.records.Source`, by its kind, gives a path or bytes, or an
   :class:`~phiclip.inputs.records.Unreadable` with its stage and reason; see :mod:`phiclip.inputs.sources`;
   a network source is read a few chunks ahead on a thread, so fetching overlaps encoding), decode them
   (:func:`phiclip.images.try_load_image`, refusing images over ``max_pixels``), ``encoder.preprocess``
   each (on a thread pool when given one: PIL releases the GIL), then pack consecutive good items into
   batches whose summed ``encoder.item_cost`` stays within the budget (:class:`CostPacker`) and
   ``encoder.collate`` them. Each batch comes out as a :class:`Piece` with the errors met on the way,
   so the memory in flight is one batch. A failure is an ``(position, stage, reason)`` value, never an
   exception: one unreadable input never stops the others.
2. **encode** (model, :class:`ModelStep`): ``encoder.encode_batch`` under ``torch.inference_mode``
   (bfloat16 autocast on CUDA when that is the run's precision). An exception from the model is not
   an input's fault: the batch is tried once more, then a ``RuntimeError`` names the batch. Rows that
   are not finite (NaN/inf) become errors of stage ``encode``.

:func:`encode_images` (images in memory -> vectors, an exception naming every input that failed) is
the Python user's way in; it lives here, not on the encoder, so that encoders never import the pipeline.

Texts take :class:`TextStep` (``encoder.encode_texts`` on consecutive records, same retry and checks).
A :class:`StepResult` is what a step returns: rows by record position, errors and timings.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from phiclip.encoders.base import Encoder, default_prep_threads
from phiclip.images import ImageDecodeError, ImageInput, describe_source, try_load_image
from phiclip.inputs.records import PayloadReader, Record, RecordReader, Unreadable

#: ``(position, stage, reason)``: an input that failed, by its position in the step's records.
Error = tuple[int, str, str]
#: The end of the message when the model fails inside a bulk run.
RUN_HINT = ("shards already written are kept and rerunning the same command resumes; if it ran out of memory, "
            "lower --batch-size")


@dataclass(kw_only=True)
class StepResult:
    """Rows of one step (or of several, with :meth:`add`), by record position.

    ``positions[i]`` is the record of row i of :attr:`embeddings` (``sizes[i]`` its (width, height),
    ``tokens[i]`` its token sequence when asked for); ``errors`` are the inputs that failed;
    ``timings`` are seconds per stage.
    """

    dim: int
    positions: list[int] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    blocks: list[np.ndarray] = field(default_factory=list)
    tokens: list[np.ndarray] | None = None
    errors: list[Error] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def embeddings(self) -> np.ndarray:
        """(rows, dim) float32, row i for ``positions[i]``."""
        if not self.blocks:
            return np.zeros((0, self.dim), np.float32)
        return self.blocks[0] if len(self.blocks) == 1 else np.concatenate(self.blocks, axis=0)

    @property
    def count(self) -> int:
        """Records accounted for (embedded or failed)."""
        return len(self.positions) + len(self.errors)

    def accounted(self) -> list[int]:
        """Positions of every record accounted for."""
        return self.positions + [e[0] for e in self.errors]

    def add(self, other: StepResult) -> StepResult:
        """Append ``other``'s rows, errors and timings; returns self."""
        self.positions += other.positions
        self.sizes += other.sizes
        self.blocks += other.blocks
        if other.tokens is not None:
            self.tokens = (self.tokens or []) + other.tokens
        self.errors += other.errors
        for k, v in other.timings.items():
            self.timings[k] = self.timings.get(k, 0.0) + v
        return self

    def only(self, keep: Callable[[int], bool]) -> StepResult:
        """The rows and errors whose position ``keep`` accepts (timings kept)."""
        rows = [i for i, p in enumerate(self.positions) if keep(p)]
        emb = self.embeddings
        return StepResult(dim=self.dim, positions=[self.positions[i] for i in rows], sizes=[self.sizes[i] for i in rows],
                          blocks=[emb[rows]] if rows else [],
                          tokens=[self.tokens[i] for i in rows] if self.tokens is not None else None,
                          errors=[e for e in self.errors if keep(e[0])], timings=dict(self.timings))

    def in_order(self, n: int) -> np.ndarray:
        """(n, dim) vectors of positions ``0..n-1`` when every one was embedded (see :meth:`raise_for_errors`)."""
        out = np.zeros((n, self.dim), np.float32)
        if self.positions:
            out[np.asarray(self.positions, dtype=np.int64)] = self.embeddings
        return out

    def raise_for_errors(self, names: Sequence[str]) -> None:
        """Raise :class:`InputsFailed` naming every failed input (``names[position]``), if any failed."""
        if self.errors:
            raise InputsFailed([(p, names[p], stage, reason) for p, stage, reason in sorted(self.errors)])


class InputsFailed(ImageDecodeError):
    """Inputs of an in-memory call could not be embedded; ``failures`` holds ``(index, source, stage,
    reason)`` of each (an :class:`~phiclip.images.ImageDecodeError` for the first, naming the others)."""

    def __init__(self, failures: list[tuple[int, str, str, str]]) -> None:
        self.failures = failures
        _, source, stage, reason = failures[0]
        if len(failures) > 1:
            others = "; ".join(f"{s} ({st}: {r})" for _, s, st, r in failures[1:4])
            more = f" and {len(failures) - 4} more" if len(failures) > 4 else ""
            reason = f"{reason} (and {len(failures) - 1} other input(s) failed: {others}{more})"
        super().__init__(source, reason, stage=stage)


# --- prepare ------------------------------------------------------------------------------------------
@dataclass
class Chunk:
    """Records of one shard prepared together (about one batch)."""

    shard: int
    positions: list[int]


@dataclass(kw_only=True)
class Piece:
    """Prepared records of one shard: at most one collated ``batch`` (of the records at ``positions``,
    images of ``sizes``) and the records that failed on the way."""

    shard: int
    positions: list[int]
    sizes: list[tuple[int, int]]
    batch: Any
    errors: list[Error]
    seconds: float
    #: Source of the first record of the batch (to name it if the model fails on it).
    first_source: str = ""

    @property
    def count(self) -> int:
        """Records accounted for by this piece."""
        return len(self.positions) + len(self.errors)


class CostPacker:
    """Packs items into consecutive groups whose summed cost stays within ``budget`` (an item costlier
    than the budget alone forms its own group)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.group: list[Any] = []
        self.total = 0

    def add(self, item: Any, cost: int) -> list[Any] | None:
        """Add an item; returns the previous group when this item did not fit in it."""
        closed = None
        if self.group and self.total + cost > self.budget:
            closed = self.flush()
        self.group.append(item)
        self.total += cost
        return closed

    def flush(self) -> list[Any] | None:
        """The open group (None when empty), and start a new one."""
        group, self.group, self.total = self.group or None, [], 0
        return group


class Preparer:
    """The CPU half: records -> :class:`Piece` objects. Picklable with its encoder (worker processes
    and Ray tasks call only the encoder's CPU side: ``preprocess``, ``collate``, ``item_cost``)."""

    def __init__(self, records: Sequence[Record], reader: PayloadReader, encoder: Encoder, *,
                 max_pixels: int | None, budget: int) -> None:
        self.records = records
        self.reader = reader
        self.encoder = encoder
        self.max_pixels = max_pixels
        self.budget = budget
        self.keep_alpha = bool(getattr(encoder, "keeps_alpha", False))

    def chunks(self, units: Iterable[tuple[int, Sequence[int]]]) -> list[Chunk]:
        """``(shard, positions)`` units cut into chunks of about one batch: the budget counts cost units
        (crops for Phi-3-vision), so divide by what a typical record costs, or a few chunks would hold
        every record and leave workers idle."""
        n = max(1, self.budget // max(1, int(self.encoder.typical_item_cost())))
        return [Chunk(shard, list(pos[a : a + n])) for shard, pos in units for a in range(0, len(pos), n)]

    def _prepare(self, rec: Record, payload: Any) -> tuple[Any, tuple[int, int], int] | tuple[str, str]:
        """One record -> (item, (width, height), cost), or (stage, reason). Safe on several threads."""

        if isinstance(payload, Unreadable):  # the record's source said why (see phiclip.inputs.sources)
            return payload.stage, payload.reason
        if rec.error is not None:
            return "read", rec.error
        if payload is None:
            return "read", "no image in this row (null)"
        try:
            img, err = try_load_image(payload, max_pixels=self.max_pixels, keep_alpha=self.keep_alpha)
        except Exception as e:  # noqa: BLE001 - decoder plugins raise many kinds
            return "decode", f"could not decode ({type(e).__name__}: {e})"
        if err is not None:
            return err.stage, err.reason
        try:
            item = self.encoder.preprocess(img)
            cost = max(1, int(self.encoder.item_cost(item)))
        except Exception as e:  # noqa: BLE001 - a bad input must not stop the run
            return "preprocess", f"{type(e).__name__}: {e}"
        return item, img.size, cost

    def read(self, chunk: Chunk) -> list[Any] | BaseException:
        """The payloads of a chunk's records (each a payload or an ``Unreadable``), or the exception the
        reader raised."""
        try:
            return self.reader.read([self.records[p] for p in chunk.positions])
        except Exception as e:  # noqa: BLE001 - one unreadable block must not stop the run
            return e

    def pieces(self, chunk: Chunk, pool: Executor | None = None,
               payloads: list[Any] | BaseException | None = None) -> Iterator[Piece]:
        """Prepare a chunk, yielding a piece each time a batch is full (and one at the end). With a
        thread ``pool`` the chunk's records are all prepared in parallel first (a chunk is about one
        batch), so that the model, which runs when a piece is yielded, does not compete with them.
        ``payloads``: the chunk already read (:meth:`read`, ahead of time)."""
        t0 = time.perf_counter()
        recs = [self.records[p] for p in chunk.positions]
        if payloads is None:
            payloads = self.read(chunk)
        if isinstance(payloads, BaseException):
            e = payloads
            reason = f"cannot read ({type(e).__name__}: {e})"
            yield Piece(shard=chunk.shard, positions=[], sizes=[], batch=None,
                        errors=[(p, "read", reason) for p in chunk.positions], seconds=time.perf_counter() - t0)
            return
        if pool is not None:
            prepared: Iterator[Any] = iter(list(pool.map(self._prepare, recs, payloads)))
        else:
            prepared = (self._prepare(rec, payload) for rec, payload in zip(recs, payloads))
        packer = CostPacker(self.budget)
        errors: list[Error] = []
        for pos, got in zip(chunk.positions, prepared):
            if len(got) == 2:
                errors.append((pos, got[0], got[1]))
                continue
            item, size, cost = got
            full = packer.add((pos, size, item), cost)
            if full is not None:  # the group closed before this item: it goes to the next piece
                yield self._piece(chunk.shard, full, errors, t0)
                errors, t0 = [], time.perf_counter()
        rest = packer.flush()
        if rest or errors:
            yield self._piece(chunk.shard, rest, errors, t0)

    def _piece(self, shard: int, group: list[Any] | None, errors: list[Error], t0: float) -> Piece:
        positions, sizes, batch = [], [], None
        if group:
            try:
                batch = self.encoder.collate([g[2] for g in group])
                positions, sizes = [g[0] for g in group], [g[1] for g in group]
            except Exception as e:  # noqa: BLE001
                errors = errors + [(g[0], "preprocess", f"could not batch ({type(e).__name__}: {e})") for g in group]
        first = self.records[positions[0]].source if positions else ""
        return Piece(shard=shard, positions=positions, sizes=sizes, batch=batch, errors=errors,
                     seconds=time.perf_counter() - t0, first_source=first)

    def in_process(self, chunks: Sequence[Chunk], threads: int) -> Iterator[Piece]:
        """The chunks prepared in this process, each on a pool of ``threads`` threads, in order. When the
        reader asks for it (``reader.prefetch``: a network source), the next chunks are read on their own
        threads while this one is prepared and encoded, at most ``prefetch`` chunks ahead (memory stays
        bounded however long the input). Closing the iterator stops the threads."""
        depth = int(getattr(self.reader, "prefetch", 0) or 0)
        with contextlib.ExitStack() as stack:
            pool = (stack.enter_context(ThreadPoolExecutor(threads, thread_name_prefix="phiclip-prep"))
                    if threads > 1 else None)
            if depth <= 0:
                for chunk in chunks:
                    yield from self.pieces(chunk, pool)
                return
            readers = ThreadPoolExecutor(depth, thread_name_prefix="phiclip-read")
            stack.callback(readers.shutdown, wait=False, cancel_futures=True)
            todo = iter(chunks)
            ahead: deque[tuple[Chunk, Future[Any]]] = deque()

            def submit() -> None:
                chunk = next(todo, None)
                if chunk is not None:
                    ahead.append((chunk, readers.submit(self.read, chunk)))

            for _ in range(depth + 1):
                submit()
            while ahead:
                chunk, fut = ahead.popleft()
                payloads = fut.result()
                submit()
                yield from self.pieces(chunk, pool, payloads)


# --- encode -------------------------------------------------------------------------------------------
def _autocast(device: str, precision: str) -> contextlib.AbstractContextManager[Any]:
    import torch

    if device.startswith("cuda") and precision == "bfloat16":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _call_model(fn: Callable[[], Any], where: str, hint: str) -> Any:
    """``fn()``, tried once more if the model raises; a wrong request (ValueError, TypeError) is not retried."""
    import torch

    last: Exception | None = None
    for _attempt in range(2):
        try:
            return fn()
        except (ValueError, TypeError):
            raise  # e.g. --tokens for a model without tokens: retrying cannot help
        except Exception as e:  # noqa: BLE001 - retried once, then reported with context
            last = e
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    raise RuntimeError(f"the model failed on {where} ({type(last).__name__}: {last}); {hint}") from last


def _finite_rows(res: StepResult, positions: Sequence[int], sizes: Sequence[tuple[int, int]], vectors: Any,
                 tokens: list[np.ndarray] | None) -> StepResult:
    """Add encoded rows to ``res``; rows that are not finite become errors of stage ``encode``."""
    vectors = np.asarray(vectors, dtype=np.float32)
    finite = np.isfinite(vectors).all(axis=1)
    if tokens is not None:
        finite &= np.array([bool(np.isfinite(t).all()) for t in tokens], dtype=bool)
    keep = np.flatnonzero(finite)
    res.errors += [(positions[i], "encode", "the model returned non-finite values (NaN or inf)")
                   for i in np.flatnonzero(~finite)]
    res.positions += [positions[i] for i in keep]
    res.sizes += [sizes[i] for i in keep]
    if len(keep):
        res.blocks.append(vectors if len(keep) == len(vectors) else vectors[keep])
    if tokens is not None:
        res.tokens = (res.tokens or []) + [np.asarray(tokens[i], dtype=np.float32) for i in keep]
    return res


class ModelStep:
    """The model half: :class:`Piece` -> :class:`StepResult` (see the module docstring)."""

    def __init__(self, encoder: Encoder, *, with_tokens: bool = False, precision: str | None = None,
                 hint: str = RUN_HINT) -> None:
        describe = encoder.describe()
        self.encoder = encoder
        self.with_tokens = with_tokens
        self.device = str(describe.get("device", "cpu"))
        self.precision = precision or str(describe.get("dtype", "float32")).replace("torch.", "")
        self.hint = hint

    def _encode(self, batch: Any) -> Any:
        import torch

        with torch.inference_mode(), _autocast(self.device, self.precision):
            return self.encoder.encode_batch(batch, with_tokens=self.with_tokens)

    def encode(self, piece: Piece) -> StepResult:
        """Encode the piece's batch; its errors pass through. ``timings["encode"]``: seconds here."""
        t0 = time.perf_counter()
        res = StepResult(dim=int(self.encoder.dim), errors=list(piece.errors))
        if piece.positions:
            where = f"a batch of {len(piece.positions)} inputs starting with {piece.first_source}"
            enc = _call_model(lambda: self._encode(piece.batch), where, self.hint)
            if self.with_tokens and enc.tokens is None:
                raise ValueError(f"{self.encoder.name} does not return token sequences; drop --tokens (it is for "
                                 "Phi-3-vision)")
            _finite_rows(res, piece.positions, piece.sizes, enc.embeddings, enc.tokens if self.with_tokens else None)
        res.timings = {"read_decode_preprocess": piece.seconds, "encode": time.perf_counter() - t0}
        return res


class TextStep:
    """Texts of consecutive records -> :class:`StepResult` (``encoder.encode_texts``)."""

    def __init__(self, encoder: Encoder, records: Sequence[Record], batch_size: int, hint: str = RUN_HINT) -> None:
        self.encoder = encoder
        self.records = records
        self.batch_size = batch_size
        self.hint = hint

    def batches(self, shard: int, positions: Sequence[int]) -> Iterator[tuple[int, StepResult]]:
        """``(shard, result)`` per batch of ``batch_size`` texts of the unit."""
        import torch

        for a in range(0, len(positions), self.batch_size):
            pos = list(positions[a : a + self.batch_size])
            texts = [str(self.records[p].locator) for p in pos]
            t0 = time.perf_counter()

            def run(texts: list[str] = texts) -> Any:
                with torch.inference_mode():
                    return self.encoder.encode_texts(texts, batch_size=len(texts))

            vectors = _call_model(run, f"texts starting at {self.records[pos[0]].source}", self.hint)
            res = _finite_rows(StepResult(dim=int(self.encoder.dim)), pos, [(0, 0)] * len(pos), vectors, None)
            res.timings = {"encode": time.perf_counter() - t0}
            yield shard, res


# --- in memory ----------------------------------------------------------------------------------------
def embed_payloads(encoder: Encoder, payloads: Sequence[Any], *, batch_size: int, max_pixels: int | None,
                   with_tokens: bool = False, threads: int | None = None) -> StepResult:
    """Embed images held in memory (PIL images, uint8 arrays, paths or encoded bytes) with the pipeline's
    loop, in this process (decoding and preprocessing on a thread pool between model calls).

    Args:
        encoder: a loaded :class:`phiclip.encoders.Encoder`.
        payloads: the images; positions in the result are indices into this sequence.
        batch_size: cost budget of one model call (images for CLIP/SigLIP, crops for Phi-3-vision).
        max_pixels: images with more pixels are refused (``None``: no limit). What ``preprocess`` builds
            is bounded by the encoder's own budget (``encoder.set_max_pixels``).
        with_tokens: also return the token sequences (Phi-3-vision).
        threads: preparing threads (default: as many as torch uses).

    Returns:
        A :class:`StepResult`: rows of the inputs that were embedded, and ``errors`` ``(index, stage,
        reason)`` of those that were not (never an exception for a bad input; see
        :meth:`StepResult.raise_for_errors`).

    Raises:
        RuntimeError: the model itself failed twice on a batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    given = [os.fspath(p) if isinstance(p, os.PathLike) else p for p in payloads]
    records = [Record(id=str(i), source=describe_source(p), locator=p, kind="memory") for i, p in enumerate(given)]
    prep = Preparer(records, RecordReader(), encoder, max_pixels=max_pixels, budget=batch_size)
    model = ModelStep(encoder, with_tokens=with_tokens, hint="if it ran out of memory, use a smaller batch size")
    n_threads = min(default_prep_threads() if threads is None else threads, batch_size, max(1, len(records)))
    out = StepResult(dim=int(encoder.dim), tokens=[] if with_tokens else None)
    pieces = prep.in_process(prep.chunks([(0, range(len(records)))]), n_threads)
    try:
        for piece in pieces:
            out.add(model.encode(piece))
    finally:
        pieces.close()
    return out


def encode_images(encoder: Encoder, images: Sequence[ImageInput], batch_size: int = 32) -> np.ndarray:
    """Images (PIL, arrays, paths or bytes) -> (n, dim) float32 embeddings with ``encoder``, through the
    bulk pipeline's loop (:func:`embed_payloads`: decoding and preprocessing on a thread pool between
    model calls, about ``batch_size`` images per model call, images over the encoder's ``max_pixels``
    refused).

    Raises:
        InputsFailed: (an ``ImageDecodeError``) naming every input that could not be embedded, after
            trying all of them.
    """
    budget = max(1, batch_size) * max(1, int(encoder.typical_item_cost()))  # the loop's budget counts item costs
    res = embed_payloads(encoder, images, batch_size=budget, max_pixels=encoder.max_pixels)
    res.raise_for_errors([describe_source(im) for im in images])
    return res.in_order(len(images))


__all__ = ["Chunk", "CostPacker", "InputsFailed", "ModelStep", "Piece", "Preparer", "StepResult", "TextStep",
           "embed_payloads", "encode_images"]
