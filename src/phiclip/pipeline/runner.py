"""Bulk embedding: inputs -> decode + preprocess workers -> cost-sized batches -> encoder -> shards.

The flow of :func:`embed`:

1. **list** (:mod:`.sources`): records with stable ids in a stable order, cut into shards.
2. **check the output**: a new folder gets a manifest first; an existing one must hold the same run
   (model and its weights, settings, inputs), otherwise it is refused with a message naming what
   differs (other weights: the old and new ``weights_fingerprint`` of ``Encoder.describe()``). A
   lock file (``.phiclip.lock``, present only while a run holds it) keeps two runs from writing to
   one folder. A folder that is neither empty nor a phiclip output is refused before anything is
   written in it; a folder this run created is removed again if the run fails before its manifest.
   The files of a folder or glob that are not inputs are named in ``errors/skipped.parquet``.
3. **read + decode + preprocess** chunks of the pending shards: :func:`phiclip.images.try_load_image`
   then ``encoder.preprocess``, then the good items are grouped into batches whose summed
   ``encoder.item_cost`` stays within ``batch_size`` and collated. Failures come back as error
   records, never as exceptions. Where this runs depends on the device (see *Who prepares the
   inputs* below).
4. **encode** in the main process (under ``torch.inference_mode``, bf16 autocast on CUDA).
5. **write** (:mod:`.writer`): when every record of a shard is accounted for, the shard's
   embeddings and errors are committed atomically. A shard is the unit of resume: a rerun redoes
   exactly the shards whose embeddings file is missing, so after any crash (even SIGKILL) and a
   rerun every input is exactly once in embeddings + errors.

Who prepares the inputs: with a GPU the model leaves the CPU free, so ``num_workers`` processes (a
torch ``DataLoader``; default ``min(4, CPUs)``) decode and preprocess while the model runs. On the
CPU the model's matrix products already use every core, and worker processes competing with them
slow both down (a preempted thread stalls the whole parallel matrix product), so the default there
is ``num_workers=0``: each chunk is decoded and preprocessed on a pool of as many threads as torch
uses (PIL releases the GIL), then the model runs; the two take turns at the whole machine.

Workers and the encoder: on Linux the workers are started with ``fork``, so they share the loaded
encoder (model included) without pickling it; they call only its CPU-side ``preprocess``,
``collate`` and ``item_cost``. Where ``fork`` is not available the encoder is pickled into each
worker (slower to start); ``num_workers=0`` does everything in-process.

An exception from the model itself (``encode_batch``) is not an input's fault: the batch is tried
once more, then the run stops with the error, keeping every committed shard for the rerun to
resume. Outputs that are not finite (NaN/inf) become error records of stage ``encode``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from phiclip import schema
from phiclip.encoders.base import default_prep_threads
from phiclip.images import DEFAULT_MAX_PIXELS
from phiclip.pipeline.sources import (
    InputError,
    InputListing,
    Record,
    list_inputs,
    list_texts,
    plan_shards,
    record_id,
)
from phiclip.pipeline.writer import (
    VECTOR_DTYPES,
    OutputError,
    ShardResult,
    ShardWriter,
    read_manifest,
    write_manifest,
)

#: Keys of ``Encoder.describe()`` that may change between runs without changing the vectors.
VOLATILE_ENCODER_KEYS = frozenset({"device"})
#: Key of ``Encoder.describe()`` (and so of ``manifest["encoder"]``) that identifies the weights.
WEIGHTS_KEY = "weights_fingerprint"
LOCK_FILE = ".phiclip.lock"


def default_num_workers(device: str = "cuda") -> int:
    """Worker processes for an encoder on ``device``: ``min(4, CPUs)`` beside an accelerator (CUDA,
    MPS...), 0 on the CPU (there the inputs are prepared on a thread pool between model calls; see
    the module docstring)."""
    if str(device).split(":")[0] == "cpu":
        return 0
    return min(4, os.cpu_count() or 1)


@dataclass
class EmbedOptions:
    """Every setting of a bulk run, with its default (declared here only; the CLI and
    :func:`embed` keyword arguments fill this object)."""

    #: Cost budget of one batch: images for CLIP/SigLIP, crops for Phi-3-vision (``Encoder.item_cost``).
    batch_size: int = 64
    #: Decode/preprocess processes; ``None``: ``min(4, CPUs)`` with a GPU, 0 on the CPU; ``0``: in the
    #: main process, on a thread pool between model calls.
    num_workers: int | None = None
    #: Inputs per output shard (the unit of resume).
    shard_size: int = 4096
    #: dtype of the stored vectors: ``float16`` or ``float32``.
    dtype: str = "float16"
    #: ``auto`` (CUDA when present), ``cpu``, ``cuda``, ``cuda:1``...
    device: str = "auto"
    #: Compute dtype of the model: ``auto`` (bfloat16 on CUDA, float32 on CPU), ``float32``, ``bfloat16``, ``float16``.
    precision: str = "auto"
    #: Images with more pixels than this are refused as decompression bombs (``None``: no limit).
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    #: Also write the full token sequences (Phi-3-vision) to ``tokens/``.
    tokens: bool = False
    #: Table/dataset column with the images (or texts); ``None``: guessed from names and types.
    column: str | None = None
    #: Split of a Hugging Face dataset.
    split: str = "train"
    #: Show a progress bar (stderr).
    progress: bool = True

    def validate(self) -> EmbedOptions:
        """Check ranges and choices; returns self. Raises ``ValueError`` naming the bad setting."""
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be at least 1, got {self.shard_size}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"num_workers must be 0 (in-process) or more, got {self.num_workers}")
        if self.dtype not in VECTOR_DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {', '.join(VECTOR_DTYPES)}")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise ValueError(f"max_pixels must be positive (or None for no limit), got {self.max_pixels}")
        return self

    def workers(self, device: str) -> int:
        """The resolved number of worker processes for an encoder on ``device``."""
        return default_num_workers(device) if self.num_workers is None else self.num_workers


def make_options(options: EmbedOptions | None = None, **settings: Any) -> EmbedOptions:
    """``options`` (or the defaults) with ``settings`` replaced; unknown names raise ``TypeError``."""
    names = {f.name for f in dataclasses.fields(EmbedOptions)}
    unknown = sorted(set(settings) - names)
    if unknown:
        raise TypeError(f"unknown setting(s) {unknown}; known: {sorted(names)}")
    return dataclasses.replace(options or EmbedOptions(), **settings).validate()


@dataclass
class EmbedResult:
    """What a run did. ``skipped``: inputs already done by an earlier run of the same command;
    ``duplicates``: repeated inputs listed once; ``ignored``: entries that are not inputs (the files
    among them are named in ``errors/skipped.parquet`` with the stage ``skip``)."""

    output: Path
    status: str  # "completed" | "already_complete"
    inputs: int
    embedded: int
    failed: int
    skipped: int
    duplicates: int = 0
    ignored: int = 0
    processed: int = 0  # inputs embedded or failed by this run
    seconds: float = 0.0  # wall time of the whole call
    timings: dict[str, float] = field(default_factory=dict)  # per stage, seconds

    @property
    def items_per_second(self) -> float:
        """Inputs processed by this run per second of its embedding loop."""
        loop = self.timings.get("loop", 0.0)
        return self.processed / loop if loop > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        d = dataclasses.asdict(self)
        d["output"] = str(self.output)
        d["items_per_second"] = self.items_per_second
        return d


# --- output folder checks --------------------------------------------------------------------------
def _busy(root: Path) -> OutputError:
    return OutputError(
        f"{root}: another phiclip run is writing to this folder; wait for it to finish or choose another --output"
    )


def _acquire_lock(root: Path) -> int:
    """Open and lock ``ROOT/.phiclip.lock``; returns its descriptor. The file must still be the one at
    that path once locked: a run that finishes unlinks the file it holds, so one that locked the
    unlinked file tries again on a new one."""
    import fcntl

    path = root / LOCK_FILE
    for _attempt in range(20):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            raise OutputError(f"{root}: the folder disappeared while this run started; run the command again") from None
        except OSError as e:
            raise OutputError(
                f"{root}: cannot create the lock file {LOCK_FILE} in it ({e.strerror or e}); choose a folder you can "
                "write to for --output"
            ) from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise _busy(root) from None
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(os.fstat(fd), current):
            return fd
        os.close(fd)  # locked a file that the run before us unlinked as it finished: take the new one
    raise _busy(root)


def _release_lock(root: Path, fd: int) -> None:
    """Unlink the lock file (while still holding it, and only if it is ours), then unlock."""
    path = root / LOCK_FILE
    try:
        with contextlib.suppress(OSError):
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                path.unlink()
    finally:
        os.close(fd)


@contextlib.contextmanager
def _output_lock(root: Path) -> Iterator[None]:
    """An exclusive POSIX record lock on ``ROOT/.phiclip.lock`` (released by the kernel when the
    process dies, and not inherited by forked workers). The file exists only while a run holds it:
    it is unlinked, still locked, when the run ends, successful or not."""
    try:
        import fcntl  # noqa: F401
    except ImportError:  # pragma: no cover - Windows: no lock
        yield
        return
    fd = _acquire_lock(root)
    try:
        yield
    finally:
        _release_lock(root, fd)


def _make_output_folder(root: Path) -> bool:
    """Create ``root`` (and its parents) if needed; returns True only if this call created it, so that
    of two runs started at once on a new folder exactly one counts as its creator."""
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        root.mkdir()
        return True
    except FileExistsError:
        if root.is_dir():
            return False
        raise OutputError(f"{root}: exists and is not a folder; give a folder for --output") from None
    except OSError as e:
        raise OutputError(f"{root}: cannot create the output folder ({e.strerror or e}); choose another --output") from None


def _check_fresh_folder(root: Path) -> None:
    ours = {schema.EMBEDDINGS_DIR, schema.ERRORS_DIR, schema.TOKENS_DIR}
    for p in root.iterdir():
        if p.name.startswith("."):
            continue
        if p.is_dir() and p.name in ours and not any(p.iterdir()):
            continue
        raise OutputError(
            f"{root}: the folder is not empty and has no {schema.MANIFEST_FILE} (it is not a phiclip output); "
            "choose a new or empty --output folder"
        )


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    if old != new:
        return [f"{prefix.rstrip('.')}: {old!r} before, {new!r} now"]
    return []


def _refuse_if_different(root: Path, what: str, old: Any, new: Any) -> None:
    diffs = _differences(old, new)
    if diffs:
        shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
        raise OutputError(
            f"{root} already holds a run with a different {what} ({shown}). Rerun with the same model and "
            "settings to finish or reuse it, or choose another --output folder."
        )


def _stable_description(describe: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in describe.items() if k not in VOLATILE_ENCODER_KEYS}


def _refuse_if_weights_changed(root: Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    """Refuse to add vectors from other weights to an output (see :data:`WEIGHTS_KEY`).

    An output whose manifest records no fingerprint while the encoder now reports one is refused too:
    nothing says its shards come from these weights (it was written by an older phiclip, or by an
    encoder that did not report its weights), and mixing two models is silent and unrepairable,
    while starting a new folder costs only time.
    """
    old_fp, new_fp = old.get(WEIGHTS_KEY), new.get(WEIGHTS_KEY)
    if old_fp == new_fp:
        return
    if old_fp is None:
        raise OutputError(
            f"{root}: its manifest records no weights fingerprint (written by an older phiclip, or by an encoder "
            "that does not report its weights), so it cannot be checked that the shards already written come from "
            f"these weights (new {new_fp}); embed into a new --output folder, or delete this one to start over"
        )
    raise OutputError(
        f"{root}: weights changed: old {old_fp} new {new_fp}; the shards already written come from the old weights "
        "and this run would mix two models. Put the old weights back (or pin the same hub revision) to finish it, "
        "or embed into a new --output folder"
    )


# --- shards in progress ------------------------------------------------------------------------------
@dataclass
class _ShardBuffer:
    size: int
    seen: int = 0
    positions: list[int] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    vectors: list[np.ndarray] = field(default_factory=list)
    tokens: list[np.ndarray] = field(default_factory=list)
    errors: list[tuple[int, str, str]] = field(default_factory=list)

    def result(self, records: Sequence[Record], kind: str, with_tokens: bool) -> ShardResult:
        order = np.argsort(np.asarray(self.positions, dtype=np.int64), kind="stable")
        emb = np.concatenate(self.vectors, axis=0)[order] if self.vectors else None
        res = ShardResult(embeddings=emb)
        for i in order:
            rec = records[self.positions[i]]
            res.ids.append(rec.id)
            res.sources.append(rec.source)
            if kind == "text":
                res.texts.append(str(rec.locator))
            else:
                res.widths.append(self.sizes[i][0])
                res.heights.append(self.sizes[i][1])
        if with_tokens:
            res.tokens = [self.tokens[i] for i in order]
        for pos, stage, reason in sorted(self.errors):
            rec = records[pos]
            res.errors.append((rec.id, rec.source, stage, reason))
        return res


def _accept(buf: _ShardBuffer, positions: Sequence[int], sizes: Sequence[tuple[int, int]], vectors: np.ndarray,
            tokens: list[np.ndarray] | None) -> int:
    """Add encoded rows; rows that are not finite become errors. Returns how many failed."""
    vectors = np.asarray(vectors, dtype=np.float32)
    finite = np.isfinite(vectors).all(axis=1)
    if tokens is not None:
        finite &= np.array([bool(np.isfinite(t).all()) for t in tokens], dtype=bool)
    keep = np.flatnonzero(finite)
    for i in np.flatnonzero(~finite):
        buf.errors.append((positions[i], "encode", "the model returned non-finite values (NaN or inf)"))
    buf.positions.extend(positions[i] for i in keep)
    buf.sizes.extend(sizes[i] for i in keep)
    buf.vectors.append(vectors[keep])
    if tokens is not None:
        buf.tokens.extend(np.asarray(tokens[i], dtype=np.float32) for i in keep)
    return int(len(finite) - len(keep))


# --- the worker side ---------------------------------------------------------------------------------
@dataclass
class _Chunk:
    shard: int
    start: int
    stop: int


@dataclass
class _ChunkOut:
    """A piece of a chunk: ``count`` records, each either in the (at most one) batch or in ``errors``."""

    shard: int
    count: int
    # (positions, (width, height) per item, collated batch)
    batches: list[tuple[list[int], list[tuple[int, int]], Any]]
    errors: list[tuple[int, str, str]]
    seconds: float


def _identity(x: Any) -> Any:
    return x


def _read_error(payload: Any) -> str | None:
    """Why a path cannot be read, checked before opening it (a FIFO would block forever), or None."""
    if not isinstance(payload, str):
        return None
    try:
        st = os.stat(payload)
    except FileNotFoundError:
        if os.path.islink(payload):
            target = schema.path_to_source(os.readlink(payload))
            return f"a broken symbolic link (its target {target} does not exist); fix or remove the link"
        return "no such file; check the path"
    except PermissionError as e:
        return f"cannot read ({e.strerror}); check its permissions"
    except OSError as e:
        return f"cannot read ({e.strerror or e})"
    if stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode):
        return None  # load_image names the problems of these (a folder, an empty or unreadable file)
    return "not a regular file (a FIFO, socket or device); remove it from the input"


@dataclass
class _ImageWork:
    """What a worker needs: the records, how to read them, and the encoder's CPU-side steps."""

    records: list[Record]
    reader: Any
    preprocess: Callable[[Any], Any]
    collate: Callable[[Sequence[Any]], Any]
    item_cost: Callable[[Any], int]
    max_pixels: int | None
    budget: int
    keep_alpha: bool = False

    def _prepare(self, rec: Record, payload: Any) -> tuple[Any, tuple[int, int], int] | tuple[str, str]:
        """One record -> (item, (width, height), cost), or (stage, reason) when it fails. Safe to
        call from several threads at once."""
        from phiclip.images import try_load_image

        if rec.error is not None:
            return "read", rec.error
        if payload is None:
            return "read", "no image in this row (null)"
        if (why := _read_error(payload)) is not None:
            return "read", why
        try:
            img, err = try_load_image(payload, max_pixels=self.max_pixels, keep_alpha=self.keep_alpha)
        except Exception as e:  # noqa: BLE001 - decoder plugins raise many kinds
            return "decode", f"could not decode ({type(e).__name__}: {e})"
        if err is not None:
            return err.stage, err.reason
        try:
            item = self.preprocess(img)
            cost = max(1, int(self.item_cost(item)))
        except Exception as e:  # noqa: BLE001 - a bad input must not stop the run
            return "preprocess", f"{type(e).__name__}: {e}"
        return item, img.size, cost

    def run(self, chunk: _Chunk, pool: Executor | None = None) -> Iterator[_ChunkOut]:
        """Process a chunk, yielding a piece each time a batch is full (and one at the end), so the
        memory in flight is bounded by the batch budget, not by the chunk. With a thread ``pool``
        the chunk's records are all prepared in parallel first (a chunk is about one batch), so
        that the model, which runs when a piece is yielded, does not compete with them for cores."""
        t0 = time.perf_counter()
        recs = self.records[chunk.start : chunk.stop]
        try:
            payloads = self.reader.read(recs)
        except Exception as e:  # noqa: BLE001 - one unreadable block must not stop the run
            reason = f"cannot read ({type(e).__name__}: {e})"
            errors = [(chunk.start + i, "read", reason) for i in range(len(recs))]
            yield _ChunkOut(chunk.shard, len(recs), [], errors, time.perf_counter() - t0)
            return
        if pool is not None:
            prepared: Iterator[Any] = iter(list(pool.map(self._prepare, recs, payloads)))
        else:
            prepared = (self._prepare(rec, payload) for rec, payload in zip(recs, payloads))
        packer = _CostPacker(self.budget)
        errors: list[tuple[int, str, str]] = []
        count = 0  # records whose outcome is in the current piece
        for i, got in enumerate(prepared):
            pos = chunk.start + i
            if len(got) == 2:
                errors.append((pos, got[0], got[1]))
                count += 1
                continue
            item, size, cost = got
            full = packer.add((pos, size, item, cost), cost)
            if full is not None:  # the group closed before this item: it goes to the next piece
                yield self._piece(chunk.shard, count, full, errors, t0)
                errors, count = [], 0
                t0 = time.perf_counter()
            count += 1
        rest = packer.flush()
        if count or rest:
            yield self._piece(chunk.shard, count, rest, errors, t0)

    def _piece(self, shard: int, count: int, group: list[Any] | None, errors: list[tuple[int, str, str]],
               t0: float) -> _ChunkOut:
        batches = []
        if group:
            try:
                batch = self.collate([g[2] for g in group])
                batches.append(([g[0] for g in group], [g[1] for g in group], batch))
            except Exception as e:  # noqa: BLE001
                errors = errors + [(g[0], "preprocess", f"could not batch ({type(e).__name__}: {e})") for g in group]
        return _ChunkOut(shard, count, batches, errors, time.perf_counter() - t0)


class _CostPacker:
    """Packs items into consecutive groups whose summed cost stays within ``budget`` (an item
    costlier than the budget alone forms its own group)."""

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


def _group_by_cost(items: Sequence[tuple[int, Any, Any, int]], budget: int) -> list[list[tuple[int, Any, Any, int]]]:
    """Groups of consecutive items (cost in the last field) as the workers form batches."""
    packer = _CostPacker(budget)
    groups = [g for it in items if (g := packer.add(it, it[3])) is not None]
    last = packer.flush()
    return groups + ([last] if last else [])


def _chunk_dataset(work: _ImageWork, chunks: list[_Chunk]) -> Any:
    from torch.utils.data import IterableDataset, get_worker_info

    class ChunkDataset(IterableDataset):
        """Chunk k goes to worker k mod num_workers; the loader hands them back in order."""

        def __iter__(self) -> Iterator[_ChunkOut]:
            info = get_worker_info()
            wid, n = (0, 1) if info is None else (info.id, info.num_workers)
            for k in range(wid, len(chunks), n):
                yield from work.run(chunks[k])

    return ChunkDataset()


def _in_process_pieces(work: _ImageWork, chunks: list[_Chunk], threads: int) -> Iterator[_ChunkOut]:
    """The chunks prepared in this process, each on a pool of ``threads`` threads, in order."""
    if threads <= 1:
        for chunk in chunks:
            yield from work.run(chunk)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="phiclip-prep") as pool:
        for chunk in chunks:
            yield from work.run(chunk, pool)


def _mp_context(num_workers: int) -> Any:
    if num_workers == 0:
        return None
    import multiprocessing as mp

    if sys.platform.startswith("linux") and "fork" in mp.get_all_start_methods():
        return mp.get_context("fork")
    return None


# --- the run -------------------------------------------------------------------------------------------
def _load(model: Any, opts: EmbedOptions) -> Any:
    from phiclip.encoders import Encoder, load_encoder

    encoder = model if isinstance(model, Encoder) else load_encoder(model, device=opts.device, dtype=opts.precision)
    encoder.set_max_pixels(opts.max_pixels)  # also bounds what preprocessing builds (Phi-3-vision's HD canvas)
    return encoder


def _is_spec(model: Any) -> bool:
    from phiclip.encoders import EncoderSpec

    return isinstance(model, (str, EncoderSpec))


def _model_spec(model: Any) -> str:
    """The normalised spec string of a spec, or the ``name`` of a loaded encoder."""
    if _is_spec(model):
        from phiclip.encoders import parse_spec

        return str(parse_spec(str(model)))
    return str(getattr(model, "name", type(model).__name__))


def _precision(model: Any, opts: EmbedOptions) -> str:
    """The compute dtype name the vectors come from (``float32``, ``bfloat16``...)."""
    if _is_spec(model):
        from phiclip.encoders import resolve_device_dtype

        return str(resolve_device_dtype(opts.device, opts.precision)[1]).replace("torch.", "")
    return str(model.describe().get("dtype", "unknown")).replace("torch.", "")


def _autocast(encoder: Any, precision: str) -> contextlib.AbstractContextManager[Any]:
    import torch

    device = str(encoder.describe().get("device", "cpu"))
    if device.startswith("cuda") and precision == "bfloat16":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _encode_images(encoder: Any, batch: Any, with_tokens: bool, amp: Any, where: str) -> Any:
    import torch

    last: Exception | None = None
    for _attempt in range(2):
        try:
            with torch.inference_mode(), amp:
                return encoder.encode_batch(batch, with_tokens=with_tokens)
        except (ValueError, TypeError):
            raise  # a wrong request (e.g. --tokens for a model without tokens): retrying cannot help
        except Exception as e:  # noqa: BLE001 - retried once, then reported with context
            last = e
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    raise RuntimeError(
        f"the model failed on {where} ({type(last).__name__}: {last}); shards already written are kept and "
        "rerunning the same command resumes; if it ran out of memory, lower --batch-size"
    ) from last


def _progress(total: int, initial: int, unit: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit=unit, desc="embedding", disable=not enabled,
                dynamic_ncols=True, smoothing=0.05, file=sys.stderr)


def _prepare_output(root: Path, identity: dict[str, Any]) -> tuple[dict[str, Any] | None, bool]:
    """Check ``root`` against this run. Returns (existing manifest or None, whether it is complete)."""
    existing = read_manifest(root)
    if existing is None:
        _check_fresh_folder(root)
        return None, False
    if "dim" not in existing:
        raise OutputError(
            f"{root / schema.MANIFEST_FILE}: field 'dim' is missing; the manifest was edited or damaged: restore it, "
            "or embed again into a new --output folder"
        )
    old_identity = {k: existing.get(k) for k in identity}
    _refuse_if_different(root, "model, settings or inputs", old_identity, identity)
    return existing, bool(existing.get("complete"))


@dataclass
class _Job:
    """One run: what is embedded, where, how, and its shard plan. ``identity`` is what a rerun
    must match (kind, vector dtype, input, settings); ``timings`` collects seconds per stage."""

    kind: str  # "image" | "text"
    listing: InputListing
    root: Path
    opts: EmbedOptions
    plan: list[range]
    identity: dict[str, Any]
    timings: dict[str, float]
    t_start: float

    @property
    def records(self) -> list[Record]:
        return self.listing.records

    def result(self, status: str, counts: dict[str, int], skipped: int, processed: int) -> EmbedResult:
        return EmbedResult(self.root, status, len(self.records), counts["embedded"], counts["failed"], skipped,
                           self.listing.duplicates, self.listing.ignored, processed,
                           time.perf_counter() - self.t_start, self.timings)

    def tick(self, stage: str, t0: float) -> float:
        """Add the seconds since ``t0`` to ``stage``; returns now."""
        now = time.perf_counter()
        self.timings[stage] = self.timings.get(stage, 0.0) + now - t0
        return now


def _run(model: Any, listing: InputListing, output: str | os.PathLike, opts: EmbedOptions, kind: str,
         list_seconds: float = 0.0) -> EmbedResult:
    root = Path(output).expanduser()
    plan = plan_shards(len(listing.records), opts.shard_size)
    settings = {
        "model": _model_spec(model),
        "precision": _precision(model, opts),
        "shard_size": opts.shard_size,
        "max_pixels": opts.max_pixels if kind == "image" else None,
        "tokens": opts.tokens,
        "num_shards": len(plan),
    }
    input_desc = {**listing.description, "num_inputs": len(listing.records), "fingerprint": listing.fingerprint()}
    identity = {"kind": kind, "dtype": opts.dtype, "input": input_desc, "settings": settings}
    job = _Job(kind, listing, root, opts, plan, identity, {"list": list_seconds}, time.perf_counter() - list_seconds)
    if root.is_dir() and read_manifest(root) is None:
        _check_fresh_folder(root)  # a foreign folder is refused before a lock file is made in it
    created = _make_output_folder(root)
    locked = False
    try:
        with _output_lock(root):
            locked = True
            try:
                return _run_locked(job, model)
            except BaseException:
                if created:
                    _remove_empty_parts(root)
                raise
    except BaseException:
        # Only the run that made the folder and held its lock may remove it, and only once its lock
        # file is gone and the folder is empty (rmdir refuses otherwise, e.g. when a new run's lock
        # file is already in it).
        if created and locked and not (root / schema.MANIFEST_FILE).exists():
            with contextlib.suppress(OSError):
                root.rmdir()
        raise


def _remove_empty_parts(root: Path) -> None:
    """Remove the empty subfolders of an output folder this run created, when it failed before
    writing its manifest (called while holding the lock)."""
    if (root / schema.MANIFEST_FILE).exists():
        return
    for name in (schema.EMBEDDINGS_DIR, schema.ERRORS_DIR, schema.TOKENS_DIR):
        with contextlib.suppress(OSError):
            (root / name).rmdir()  # only if empty


def _skipped_rows(listing: InputListing) -> list[tuple[str, str, str, str]]:
    """``(id, source, "skip", reason)`` of each file the listing did not take as an input."""
    return [(record_id(os.fsencode(path)), schema.path_to_source(path), schema.STAGE_SKIP, reason)
            for path, reason in listing.skipped]


def _run_locked(job: _Job, model: Any) -> EmbedResult:
    from phiclip import __version__

    t0 = time.perf_counter()
    existing, complete = _prepare_output(job.root, job.identity)
    probe = ShardWriter(job.root, kind=job.kind, dim=int(existing["dim"]) if existing else 1, dtype=job.opts.dtype)
    done = probe.done_shards() & set(range(len(job.plan)))
    skipped = sum(len(job.plan[s]) for s in done)
    if existing is not None and complete and len(done) == len(job.plan):
        return job.result("already_complete", probe.counts(range(len(job.plan))), skipped, 0)

    import pyarrow.parquet  # noqa: F401 - imported before the loop so that its timings are the work's
    import torch.utils.data  # noqa: F401

    encoder = _load(model, job.opts)
    job.tick("setup", t0)
    if job.kind == "text" and "text" not in encoder.modalities:
        raise InputError(f"{encoder.name} embeds images only; embed-text needs a model with a text side (CLIP, SigLIP)")
    describe = dict(encoder.describe())
    describe.setdefault("spec", encoder.name)
    if existing is not None:
        _refuse_if_weights_changed(job.root, existing.get("encoder") or {}, describe)
        _refuse_if_different(job.root, "model", _stable_description(existing.get("encoder") or {}),
                             _stable_description(describe))
    counts_base = {"inputs": len(job.records), "duplicates": job.listing.duplicates, "ignored": job.listing.ignored}
    manifest: dict[str, Any] = {
        "phiclip_version": __version__,
        "kind": job.kind,
        "encoder": describe,
        "dim": int(encoder.dim),
        "dtype": job.opts.dtype,
        "normalized": bool(getattr(encoder, "normalize", False)),
        "input": job.identity["input"],
        "settings": job.identity["settings"],
        "counts": {**counts_base, "embedded": 0, "failed": 0},
        "complete": False,
    }
    pending = [s for s in range(len(job.plan)) if s not in done]
    if existing is None:
        write_manifest(job.root, manifest)  # first, so that a rerun can always compare
    elif complete and pending:  # a finished output lost shards: it is unfinished until repaired
        write_manifest(job.root, {**existing, "complete": False})
    writer = ShardWriter(job.root, kind=job.kind, dim=encoder.dim, dtype=job.opts.dtype)
    writer.prepare(pending)
    writer.write_skipped(_skipped_rows(job.listing))

    bar = _progress(len(job.records), skipped, "img" if job.kind == "image" else "text", job.opts.progress)
    t_loop = time.perf_counter()
    try:
        embed_shards = _embed_image_shards if job.kind == "image" else _embed_text_shards
        processed = embed_shards(job, encoder, pending, writer, bar)
    finally:
        bar.close()
    job.tick("loop", t_loop)

    counts = writer.counts(range(len(job.plan)))
    if counts["embedded"] + counts["failed"] != len(job.records):
        raise OutputError(
            f"{job.root}: the shards hold {counts['embedded']} embedded + {counts['failed']} failed rows for "
            f"{len(job.records)} inputs; the folder was changed during the run: embed again into a new --output folder"
        )
    manifest["counts"] = {**counts_base, **counts}
    manifest["complete"] = True
    manifest["timings"] = {k: round(v, 4) for k, v in job.timings.items()}
    write_manifest(job.root, manifest)
    return job.result("completed", counts, skipped, processed)


def _embed_image_shards(job: _Job, encoder: Any, pending: list[int], writer: ShardWriter, bar: Any) -> int:
    """Decode/preprocess in workers, encode here, commit each shard when all its records are back."""
    from torch.utils.data import DataLoader

    opts, plan, records = job.opts, job.plan, job.records
    # A chunk holds about one batch of records: the batch budget counts cost units (crops for
    # Phi-3-vision), so divide by what a typical record costs, or a few chunks would hold every
    # record and leave workers idle.
    chunk_len = max(1, opts.batch_size // max(1, encoder.typical_item_cost()))
    chunks = [_Chunk(s, a, min(a + chunk_len, plan[s].stop)) for s in pending for a in range(plan[s].start, plan[s].stop, chunk_len)]
    work = _ImageWork(records, job.listing.reader, encoder.preprocess, encoder.collate, encoder.item_cost,
                      opts.max_pixels, opts.batch_size, keep_alpha=getattr(encoder, "keeps_alpha", False))
    nw = min(opts.workers(str(encoder.describe().get("device", "cpu"))), len(chunks))
    if nw:
        loader = DataLoader(_chunk_dataset(work, chunks), batch_size=None, num_workers=nw, collate_fn=_identity,
                            multiprocessing_context=_mp_context(nw), prefetch_factor=4)
    else:
        loader = _in_process_pieces(work, chunks, default_prep_threads())
    amp = _autocast(encoder, job.identity["settings"]["precision"])
    buffers: dict[int, _ShardBuffer] = {}
    failed = processed = 0
    for key in ("read_decode_preprocess", "wait", "encode", "write"):
        job.timings.setdefault(key, 0.0)
    pieces = iter(loader)
    try:
        while True:
            t0 = time.perf_counter()
            out: _ChunkOut | None = next(pieces, None)
            if out is None:
                break
            t0 = job.tick("wait", t0)
            job.timings["read_decode_preprocess"] += out.seconds
            buf = buffers.setdefault(out.shard, _ShardBuffer(len(plan[out.shard])))
            for positions, sizes, batch in out.batches:
                where = f"a batch of {len(positions)} inputs starting with {records[positions[0]].source}"
                enc = _encode_images(encoder, batch, opts.tokens, amp, where)
                if opts.tokens and enc.tokens is None:
                    raise ValueError(f"{encoder.name} does not return token sequences; drop --tokens (it is for Phi-3-vision)")
                failed += _accept(buf, positions, sizes, enc.embeddings, enc.tokens if opts.tokens else None)
            t0 = job.tick("encode", t0)
            buf.errors.extend(out.errors)
            failed += len(out.errors)
            buf.seen += out.count
            processed += out.count
            bar.update(out.count)
            bar.set_postfix(failed=failed, refresh=False)
            if buf.seen == buf.size:
                writer.write_shard(out.shard, buf.result(records, "image", opts.tokens))
                del buffers[out.shard]
                job.tick("write", t0)
    finally:
        # Stop the preparing threads now (in-process runs), also when the model or the writer failed.
        close = getattr(pieces, "close", None)
        if close is not None:
            close()
    if buffers:  # every chunk came back, so every shard must have been written
        raise RuntimeError(f"internal error: shards {sorted(buffers)} did not receive all their records")
    return processed


def _embed_text_shards(job: _Job, encoder: Any, pending: list[int], writer: ShardWriter, bar: Any) -> int:
    """Tokenise and encode texts in the main process, shard by shard."""
    import torch

    opts, plan, records = job.opts, job.plan, job.records
    processed = 0
    for s in pending:
        buf = _ShardBuffer(len(plan[s]))
        for a in range(plan[s].start, plan[s].stop, opts.batch_size):
            positions = list(range(a, min(a + opts.batch_size, plan[s].stop)))
            texts = [str(records[p].locator) for p in positions]
            t0 = time.perf_counter()
            try:
                with torch.inference_mode():
                    vectors = encoder.encode_texts(texts, batch_size=len(texts))
            except Exception as e:
                raise RuntimeError(
                    f"the model failed on texts starting at {records[positions[0]].source} ({type(e).__name__}: {e}); "
                    "shards already written are kept and rerunning the same command resumes"
                ) from e
            job.tick("encode", t0)
            _accept(buf, positions, [(0, 0)] * len(positions), vectors, None)
            buf.seen += len(positions)
            processed += len(positions)
            bar.update(len(positions))
        t0 = time.perf_counter()
        writer.write_shard(s, buf.result(records, "text", False))
        job.tick("write", t0)
    return processed


# --- public API ----------------------------------------------------------------------------------------
def embed(model: Any, input: str | os.PathLike, output: str | os.PathLike, options: EmbedOptions | None = None,
          **settings: Any) -> EmbedResult:
    """Embed every image of ``input`` into ``output`` (Parquet shards + manifest + errors table).

    Args:
        model: an encoder spec (``clip:openai/clip-vit-base-patch32``, ``phi3v:DIR?num_crops=4``...)
            or a loaded :class:`phiclip.encoders.Encoder`.
        input: a folder, a glob, a text file of paths, a Parquet/CSV table, or ``hf:DATASET``.
        output: the output folder; rerunning the same call resumes an interrupted run.
        options: an :class:`EmbedOptions`; ``settings`` override its fields by name
            (``batch_size``, ``num_workers``, ``shard_size``, ``dtype``, ``device``, ``precision``,
            ``max_pixels``, ``tokens``, ``column``, ``split``, ``progress``).

    Returns:
        :class:`EmbedResult` with the output folder and the counts.

    Raises:
        InputError: no inputs, or an input that cannot be listed.
        OutputError: the output folder holds a different run, or another run is writing to it.
    """
    opts = make_options(options, **settings)
    t0 = time.perf_counter()
    listing = list_inputs(input, column=opts.column, split=opts.split)
    if not listing.records:
        shown = ", ".join(os.path.basename(schema.path_to_source(p)) for p, _ in listing.skipped[:3])
        raise InputError(
            f"{schema.path_to_source(input)}: no images found ({listing.ignored} entries skipped: no image extension, "
            f"hidden, or blank{'; e.g. ' + shown if shown else ''}); point --input at a folder or list of "
            ".jpg/.png/... files"
        )
    return _run(model, listing, output, opts, "image", list_seconds=time.perf_counter() - t0)


def embed_text(model: Any, input: str | os.PathLike, output: str | os.PathLike, options: EmbedOptions | None = None,
               **settings: Any) -> EmbedResult:
    """Embed the texts of ``input`` (a .txt file, one text per line; a Parquet/CSV table with a text
    column; or ``hf:DATASET``) with a model that has a text side. Same output layout, resume and
    refusal rules as :func:`embed`; rows have a ``text`` column instead of width/height."""
    opts = make_options(options, **settings)
    t0 = time.perf_counter()
    listing = list_texts(input, column=opts.column, split=opts.split)
    if not listing.records:
        raise InputError(f"{input}: no texts found (blank lines are skipped); put one text per line")
    return _run(model, listing, output, opts, "text", list_seconds=time.perf_counter() - t0)
