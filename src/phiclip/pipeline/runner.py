"""Bulk embedding, the public API: :func:`embed`, :func:`embed_text`, :class:`EmbedOptions`,
:class:`EmbedResult`; it lists the inputs, chooses the engine and claims the output folder, and
:mod:`.job` does the rest of the run.

The flow of :func:`embed`, module by module:

1. **list** (:mod:`.sources`): records with stable ids in a stable order.
2. **claim and check the output** (:mod:`.output`, from :mod:`.job` on): lock the folder; an existing
   output must hold the same run (model and weights, settings, inputs), otherwise the run is refused
   naming what differs.
3. **plan** (:mod:`.plan`): shards of records for a new output, the same shards for a resume, or new
   shards for the inputs added since (``update``); inputs no longer listed are kept or pruned.
4. **load** the encoder and check it against the output.
5. **run an engine** over the pending shards, picked from :data:`ENGINES` (the
   :class:`~.engine.Engine` protocol): :mod:`.local` (this machine) or :mod:`.ray_engine` (a Ray cluster). Both run the one step of :mod:`.step` (decode + preprocess, batch, encode; errors as
   values) and feed a :class:`.writer.ShardSink`, which commits each shard atomically when all its
   records are back and flushes partial work as fragments every ``flush_seconds``. A rerun redoes only
   what is neither in a committed shard nor in a fragment, so after any crash (even SIGKILL) every
   input ends up exactly once in embeddings + errors.
6. **commit** the manifest: counts, ``complete``, timings.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from phiclip import schema
from phiclip.encoders import EncoderSpec
from phiclip.encoders.registry import resolve_spec
from phiclip.encoders.spec import absolute_spec
from phiclip.images import DEFAULT_MAX_PIXELS
from phiclip.pipeline.engine import Engine, LocalOptions, RayOptions, default_num_workers
from phiclip.pipeline.job import EmbedResult, run_locked
from phiclip.pipeline.output import LOCK_FILE, OutputDir
from phiclip.pipeline.output import output_lock as _output_lock
from phiclip.pipeline.sources import InputError, InputListing, InputOptions, list_inputs, list_texts
from phiclip.schema import VECTOR_DTYPES


def _local_engine(opts: EmbedOptions) -> Engine:
    # lazy: the engine imports pipeline.step -> the encoders' torch side; `phiclip --help` imports this module
    from phiclip.pipeline.local import LocalEngine

    return LocalEngine(LocalOptions(device=opts.device, precision=opts.precision, num_workers=opts.num_workers))


def _ray_engine(opts: EmbedOptions) -> Engine:
    # lazy: Ray is optional, and the engine imports pipeline.step; `phiclip --help` imports this module
    from phiclip.pipeline.ray_engine import RayEngine

    return RayEngine(RayOptions(device=opts.device, precision=opts.precision, address=opts.ray_address,
                                gpus_per_actor=opts.gpus_per_actor, num_actors=opts.num_actors))


#: The engines ``engine=`` (``--engine``) accepts, each built from the run's :class:`EmbedOptions` (an
#: :class:`~.engine.Engine`; building it checks that it can run, e.g. that Ray is installed).
ENGINES: dict[str, Callable[[EmbedOptions], Engine]] = {"local": _local_engine, "ray": _ray_engine}


def engine_for(opts: EmbedOptions) -> Engine:
    """The engine ``opts.engine`` names (:data:`ENGINES`), built from ``opts``."""
    return ENGINES[opts.validate().engine](opts)


@dataclass(frozen=True)
class FailureLimit:
    """``--max-failures``: a count (``count``) or a share of the inputs done so far (``share``, 0-1)."""

    text: str
    count: int | None = None
    share: float | None = None
    #: Inputs that must be done before a share is judged.
    min_done: int = 100

    @classmethod
    def parse(cls, value: int | str, total: int | None = None) -> FailureLimit:
        """``5`` / ``"5"`` -> at most 5 failures; ``"2.5%"`` -> at most 2.5 % of the inputs done.

        Raises:
            ValueError: not a count or a percentage.
        """
        text = str(value).strip()
        try:
            if text.endswith("%"):
                share = float(text[:-1]) / 100
                if not 0 <= share <= 1:
                    raise ValueError
                return cls(text, share=share, min_done=min(100, total) if total else 100)
            count = int(text)
            if count < 0:
                raise ValueError
            return cls(text, count=count)
        except ValueError:
            raise ValueError(f"max_failures {value!r} is not a count (10) or a percentage (5%)") from None

    def exceeded(self, failed: int, done: int) -> bool:
        """Whether ``failed`` of ``done`` inputs pass the limit."""
        if self.count is not None:
            return failed > self.count
        assert self.share is not None
        return done >= self.min_done and failed > self.share * done


@dataclass(kw_only=True)
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
    #: Split of a Hugging Face dataset (``None``: the input's ``?split=``, else ``train``).
    split: str | None = None
    #: Show a progress bar (stderr).
    progress: bool = True
    #: Embed only the inputs that are not in the output yet (a growing folder) into new shards.
    update: bool = False
    #: With ``update``: remove the rows of inputs that are no longer listed (else they are kept).
    prune: bool = False
    #: Write partial work of the shards in progress at least this often (seconds; ``None``: only whole
    #: shards), so a crash loses at most about this much work.
    flush_seconds: float | None = 30.0
    #: ``local`` (this machine) or ``ray`` (Ray Data: a local Ray instance or a cluster).
    engine: str = "local"
    #: Ray: the cluster to join (``auto``, ``ray://host:10001``...); ``None``: a running local instance, or a new one.
    ray_address: str | None = None
    #: Ray: GPUs per encoding actor (fractions share a GPU); ``None``: 1 when the cluster has GPUs, else 0.
    gpus_per_actor: float | None = None
    #: Ray: encoding actors; ``None``: one per GPU (``GPUs / gpus_per_actor``), or one on a CPU-only cluster.
    num_actors: int | None = None
    #: Embed again only the failed inputs of the output (same model, settings and input), replacing their rows.
    retry_failed: bool = False
    #: Stop early (non-zero) when failures pass ``N`` (a count) or ``"P%"`` (of the inputs done by this run,
    #: judged once at least 100 of them, or all, are done); ``None``: never.
    max_failures: int | str | None = None
    #: How URLs are fetched (:class:`phiclip.fetch.FetchOptions`; ``None``: its defaults: 64 in flight...).
    fetch: Any = None

    def failure_limit(self, total: int | None = None) -> FailureLimit | None:
        """``max_failures`` parsed (``None``: no limit)."""
        return None if self.max_failures is None else FailureLimit.parse(self.max_failures, total)

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
        if self.flush_seconds is not None and not self.flush_seconds > 0:
            raise ValueError(f"flush_seconds must be positive (or None to write whole shards only), got {self.flush_seconds}")
        if self.prune and not self.update:
            raise ValueError("prune removes the rows of inputs that an update no longer finds; use it with update "
                             "(--update --prune)")
        if self.engine not in ENGINES:
            raise ValueError(f"engine {self.engine!r} is not one of {', '.join(ENGINES)}")
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            raise ValueError(f"gpus_per_actor must be 0 or more, got {self.gpus_per_actor}")
        if self.num_actors is not None and self.num_actors < 1:
            raise ValueError(f"num_actors must be at least 1, got {self.num_actors}")
        self.failure_limit()  # validates
        if self.retry_failed and self.update:
            raise ValueError("retry_failed reruns the failed inputs of a finished run; run --update on its own first")
        if self.fetch is not None:
            self.fetch.validate()
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


# --- the run -------------------------------------------------------------------------------------------
def _model_spec(model: Any) -> str:
    """The normalised spec string of a spec (its kind found from the checkpoint's config.json when left out; a
    local folder as its absolute path, so that the output can be searched from anywhere), or the ``name`` of a
    loaded encoder."""
    if isinstance(model, (str, EncoderSpec)):
        return absolute_spec(str(resolve_spec(str(model))))
    return str(getattr(model, "name", type(model).__name__))


def _run(model: Any, listing: InputListing, output: str | os.PathLike, opts: EmbedOptions, kind: str,
         list_seconds: float = 0.0) -> EmbedResult:
    t_start = time.perf_counter() - list_seconds
    engine = engine_for(opts)  # for Ray, checked to be installed before anything is written
    settings = {
        "model": _model_spec(model),
        "precision": engine.precision(model),
        "shard_size": opts.shard_size,
        "max_pixels": opts.max_pixels if kind == "image" else None,
        "tokens": opts.tokens,
    }
    input_desc = {**listing.description, "num_inputs": len(listing.records), "fingerprint": listing.fingerprint()}
    identity = {"kind": kind, "dtype": opts.dtype, "input": input_desc, "settings": settings}
    out = OutputDir(output, kind=kind, dtype=opts.dtype)
    with out.claimed(lock=_output_lock):
        res = run_locked(model, listing, out, opts, identity, engine, {"list": list_seconds})
    res.seconds = time.perf_counter() - t_start
    return res


# --- public API ----------------------------------------------------------------------------------------
def embed(model: Any, input: str | os.PathLike, output: str | os.PathLike, options: EmbedOptions | None = None,
          **settings: Any) -> EmbedResult:
    """Embed every image of ``input`` into ``output`` (Parquet shards + manifest + errors table).

    Args:
        model: an encoder spec (``clip:openai/clip-vit-base-patch32``, ``phi3v:DIR?num_crops=4``...)
            or a loaded :class:`phiclip.encoders.Encoder`.
        input: a folder, a glob, a text file of paths or URLs, a Parquet/CSV table (paths, URLs or
            bytes), WebDataset shards (``shards/{000..099}.tar``, shard URLs), or ``hf:DATASET``.
        output: the output folder; rerunning the same call resumes an interrupted run.
        options: an :class:`EmbedOptions`; ``settings`` override its fields by name
            (``batch_size``, ``num_workers``, ``shard_size``, ``dtype``, ``device``, ``precision``,
            ``max_pixels``, ``tokens``, ``column``, ``split``, ``progress``, ``update``, ``prune``,
            ``flush_seconds``, ``engine``, ``ray_address``, ``gpus_per_actor``, ``num_actors``,
            ``retry_failed``, ``max_failures``, ``fetch``).

    Returns:
        :class:`EmbedResult` with the output folder and the counts.

    Raises:
        InputError: no inputs, or an input that cannot be listed.
        OutputError: the output folder holds a different run (for changed inputs: use ``update``),
            or another run is writing to it.
    """
    opts = make_options(options, **settings)
    t0 = time.perf_counter()
    listing = list_inputs(input, column=opts.column, split=opts.split, options=InputOptions(fetch=opts.fetch))
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


__all__ = ["ENGINES", "LOCK_FILE", "EmbedOptions", "FailureLimit", "EmbedResult", "default_num_workers", "embed", "embed_text",
           "engine_for", "make_options"]
