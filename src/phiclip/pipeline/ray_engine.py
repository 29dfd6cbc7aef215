"""The Ray engine (``engine="ray"``, ``phiclip embed --engine ray``): the same plan, step and shard
writer as the local engine, run on Ray Data, from one machine's GPUs to a cluster.

- The pending chunks of the plan (about one batch of records each, carrying their records) are a
  Ray dataset.
- **read + decode + preprocess** run in CPU tasks (``map_batches`` of a function): the step's
  :class:`~phiclip.pipeline.step.Preparer`, with the encoder's CPU side only (the encoder without its
  torch modules), so a bad image fails alone, as an error row, never its block.
- **encode** runs in an actor pool (``map_batches`` of a callable class): each actor loads the model
  once (from its spec, with the vision-only loaders), on ``gpus_per_actor`` GPUs (one by default when
  the cluster has GPUs; fractions share one), and runs the step's
  :class:`~phiclip.pipeline.step.ModelStep` (a model failure is retried once, then stops the run;
  non-finite rows become errors). An actor checks that its model is the one the output records
  (weights fingerprint, precision...), so a node with other weights cannot mix them in.
- **write**: the driver streams the results into the same :class:`~phiclip.pipeline.writer.ShardSink`
  as the local engine: each shard committed atomically when all its records are back, partial work
  flushed every ``flush_seconds``, under the output's lock.

Exactly once: Ray restarts an actor that dies and retries its task, and retries failed tasks; a
result for records already accounted for (a retried task) is dropped by the sink; a killed driver
loses only what was not yet flushed, and a rerun with either engine resumes. The driver needs the
model's description before any work, so for a spec it loads the model once in a probe task with the
actors' resources (and ships its CPU side to the tasks).
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from phiclip.encoders import Encoder, load_encoder
from phiclip.encoders.device import resolve_device_dtype
from phiclip.manifest import differences, stable_description
from phiclip.pipeline.engine import EngineJob, RayOptions
from phiclip.pipeline.local import drive, timed
from phiclip.pipeline.step import Chunk, ModelStep, Preparer, StepResult
from phiclip.pipeline.writer import ShardSink

_CANONICAL = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise RuntimeError("--engine ray needs Ray Data: pip install 'phiclip[ray]' (or use --engine local)") from None
    return ray


def available() -> None:
    """Raise a ``RuntimeError`` saying how to install Ray Data when it is missing."""
    _ray()


def _init(opts: RayOptions) -> Any:
    """Ray, connected to ``opts.address`` (or a running local instance, or a new one)."""
    ray = _ray()
    if not ray.is_initialized():
        path = os.environ.get("PYTHONPATH")
        ray.init(address=opts.address, logging_level=logging.WARNING, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": path}} if path else None)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # phiclip's own bar counts inputs
    ctx.print_on_execution_start = False
    return ray


def placement(opts: RayOptions) -> tuple[float, str, int, float]:
    """``(gpus per actor, actor device, actors, CPUs per actor)`` for this cluster and these options."""
    ray = _init(opts)
    resources = ray.cluster_resources()
    gpus, cpus = float(resources.get("GPU", 0)), float(resources.get("CPU", 1))
    g = opts.gpus_per_actor if opts.gpus_per_actor is not None else (1.0 if gpus else 0.0)
    device = opts.device if opts.device != "auto" else ("cuda" if g > 0 else "cpu")
    if g > 0:  # one actor per GPU (or per fraction); each needs a core to feed its GPU
        return g, device, opts.num_actors or max(1, int(gpus // g)), 1.0
    # CPUs only: actors of up to 4 cores (torch's threads), half the cores left to decoding tasks.
    n = opts.num_actors or max(1, int(cpus // 8))
    return 0.0, device, n, float(max(1, min(4, int(cpus // 2 // n))))


def precision(model: Any, opts: RayOptions) -> str:
    """The compute precision the actors will use (the output's ``settings.precision``)."""

    if isinstance(model, Encoder):
        return str(model.describe().get("dtype", "unknown")).replace("torch.", "")
    requested = _CANONICAL.get(str(opts.precision), str(opts.precision))
    if requested != "auto":
        return requested
    _, device, _, _ = placement(opts)
    if device.startswith("cuda"):
        return "bfloat16"

    return str(resolve_device_dtype("cpu", "auto")[1]).replace("torch.", "")


def cpu_side(encoder: Encoder) -> Encoder:
    """A copy of ``encoder`` without its torch modules and compiled runtime models (OpenVINO / ONNX
    Runtime, which do not pickle): what preprocessing needs, small to ship."""
    import torch

    from phiclip.cpu.runtimes import CompiledPath  # lazy: imports torch, as the line above

    view = copy.copy(encoder)
    for name, value in list(vars(view).items()):
        if isinstance(value, (torch.nn.Module, CompiledPath)):
            setattr(view, name, None)
    return view


class RemoteEncoder:
    """What the driver knows of an encoder loaded by the probe: its description, and its CPU side."""

    def __init__(self, spec: str, info: dict[str, Any]) -> None:
        self.spec = spec
        self.info = info
        self.name, self.dim, self.normalize = info["name"], info["dim"], info["normalize"]
        self.modalities, self.prep = info["modalities"], info["prep"]

    def describe(self) -> dict[str, Any]:
        """The description the probe's encoder gave."""
        return dict(self.info["describe"])


def _probe(spec: str, device: str, precision: str, max_pixels: int | None) -> dict[str, Any]:
    from PIL import Image


    encoder = load_encoder(spec, device=device, dtype=precision)
    encoder.set_max_pixels(max_pixels)
    prep = cpu_side(encoder)
    try:
        prep.collate([prep.preprocess(Image.new("RGB", (48, 40), (90, 120, 30)))])
    except Exception:  # noqa: BLE001 - preprocessing needs a module after all: ship the whole encoder
        prep = encoder
    return {"describe": encoder.describe(), "name": encoder.name, "dim": int(encoder.dim),
            "normalize": bool(getattr(encoder, "normalize", False)), "modalities": frozenset(encoder.modalities),
            "prep": prep}


def load(model: Any, opts: RayOptions, max_pixels: int | None) -> Any:
    """The encoder for the driver: a loaded one as is; for a spec, what a probe task (with the actors'
    resources) loaded: its description and CPU side (:class:`RemoteEncoder`)."""

    if isinstance(model, Encoder):
        model.set_max_pixels(max_pixels)
        return model
    ray = _init(opts)
    g, device, _, _ = placement(opts)
    probe = ray.remote(_probe).options(num_gpus=g, num_cpus=1, max_retries=1)
    try:
        info = ray.get(probe.remote(str(model), device, opts.precision, max_pixels))
    except ray.exceptions.RayTaskError as e:
        cause = e.as_instanceof_cause()
        raise (cause if isinstance(cause, (ValueError, OSError, RuntimeError)) else RuntimeError(str(e))) from None
    return RemoteEncoder(str(model), info)


# --- the remote side ---------------------------------------------------------------------------------
_CACHE: dict[str, Any] = {}


def _pack(values: list[Any]) -> np.ndarray:
    """Objects of this run (pieces, results) as a binary column, serialised by Ray's own pickler."""
    dumps = _ray().cloudpickle.dumps
    arr = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        arr[i] = dumps(v)
    return arr


def _unpack(value: bytes) -> Any:
    return _ray().cloudpickle.loads(value)


def _prepare(batch: dict[str, np.ndarray], prep: list[Any]) -> dict[str, np.ndarray]:
    """CPU task: chunks (shard, positions, records) -> pieces (collated batches and errors)."""
    ray = _ray()
    key = prep[0].hex()
    if key not in _CACHE:  # once per worker process
        _CACHE[key] = ray.get(prep[0])
    template: Preparer = _CACHE[key]
    shards, pieces = [], []
    for shard, positions, records in zip(batch["shard"], batch["positions"], batch["records"]):
        positions = [int(p) for p in positions]
        work = copy.copy(template)
        # The driver's own Record objects, serialised by Ray's pickler as any task argument is.
        work.records = dict(zip(positions, _unpack(records)))  # type: ignore[assignment]
        for piece in work.pieces(Chunk(int(shard), positions)):
            shards.append(int(shard))
            pieces.append(piece)
    return {"shard": np.asarray(shards, dtype=np.int64), "piece": _pack(pieces)}


class _EncodeActor:
    """Actor: loads the encoder once; pieces -> step results."""

    def __init__(self, source: list[Any], device: str, precision: str, max_pixels: int | None, tokens: bool,
                 run_precision: str, expected: dict[str, Any]) -> None:
        if isinstance(source[0], str):

            encoder = load_encoder(source[0], device=device, dtype=precision)
        else:
            encoder = _ray().get(source[0])
        encoder.set_max_pixels(max_pixels)
        diffs = differences(stable_description(expected), stable_description(encoder.describe()))
        if diffs:
            raise RuntimeError(f"this actor's model differs from the one the output records ({'; '.join(diffs[:4])}); "
                               "every node must load the same weights in the same precision (pin --precision)")
        self.step = ModelStep(encoder, with_tokens=tokens, precision=run_precision)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"shard": batch["shard"], "result": _pack([self.step.encode(_unpack(p)) for p in batch["piece"]])}


class RayEngine:
    """The Ray engine (an :class:`~.engine.Engine`), with its :class:`~.engine.RayOptions`; checks on
    creation that Ray Data is installed."""

    def __init__(self, options: RayOptions) -> None:
        available()
        self.options = options

    def precision(self, model: Any) -> str:
        """The compute precision the actors will use (:func:`precision`)."""
        return precision(model, self.options)

    def load(self, model: Any, max_pixels: int | None) -> Any:
        """The driver's encoder (:func:`load`)."""
        return load(model, self.options, max_pixels)

    def run(self, job: EngineJob, sink: ShardSink) -> int:
        """Embed the job's pending shards on Ray; returns the records processed."""
        if job.kind != "image":
            raise ValueError("engine ray embeds images; embed texts with the local engine (engine='local')")
        for key in ("read_decode_preprocess", "wait", "encode", "write"):
            job.timings.setdefault(key, 0.0)
        return drive(_results(job, self.options), job, sink)


def _results(job: EngineJob, opts: RayOptions) -> Iterator[tuple[int, StepResult]]:
    ray = _init(opts)
    g, device, n, actor_cpus = placement(opts)
    enc = job.encoder
    remote = isinstance(enc, RemoteEncoder)
    template = Preparer([], job.reader, enc.prep if remote else cpu_side(enc), max_pixels=job.max_pixels,
                        budget=job.batch_size)
    chunks = template.chunks(job.units)
    if not chunks:
        return
    refs = [ray.put(template), enc.spec if remote else ray.put(enc)]  # held here for the whole run
    items = [{"shard": c.shard, "positions": c.positions,
              "records": ray.cloudpickle.dumps([job.records[p] for p in c.positions])} for c in chunks]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 1 + len(items) // 4, 10_000)))
    # One CPU per task. Ray fuses these tasks into the actors when both ask for the same resources (a
    # CPU-only machine of up to 3 cores): then each actor decodes, then encodes, as the local engine does.
    ds = ds.map_batches(_prepare, batch_size=1, batch_format="numpy", fn_kwargs={"prep": [refs[0]]}, num_cpus=1)
    ds = ds.map_batches(
        _EncodeActor, batch_size=1, batch_format="numpy", num_gpus=g or None, num_cpus=actor_cpus,
        compute=ray.data.ActorPoolStrategy(size=n),
        fn_constructor_kwargs={"source": [refs[1]], "device": device, "precision": opts.precision,
                               "max_pixels": job.max_pixels, "tokens": job.tokens, "run_precision": job.precision,
                               "expected": enc.describe()},
    )
    t0, first = time.perf_counter(), True
    for row in timed(ds.iter_rows(), job.timings, "wait"):
        if first:  # planning, starting the actors (each loads the model) and the first batch; part of "wait"
            job.timings["startup"], first = time.perf_counter() - t0, False
        yield int(row["shard"]), _unpack(row["result"])


__all__ = ["RayEngine", "RemoteEncoder", "available", "cpu_side", "load", "placement", "precision"]
