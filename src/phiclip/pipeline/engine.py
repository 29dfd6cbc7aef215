"""The engine seam: what an engine is (:class:`Engine`), what it gets (:class:`EngineJob`) and its typed
options (:class:`LocalOptions`, :class:`RayOptions`); the runner picks one from its table
(:data:`phiclip.pipeline.runner.ENGINES`).

An engine embeds the pending shards of a run: it runs the step of :mod:`.step` over ``job.units`` and
feeds every :class:`~.step.StepResult` to the :class:`~.writer.ShardSink`, which commits the shards.
The plan, the output folder and the manifest are not its business (:mod:`.job` does them). A new
engine is a module with a class that implements :class:`Engine`, an options dataclass here, and one
entry in the runner's ``ENGINES``. This module is cheap to import: the engines themselves (which import
torch-side code) are loaded when one is picked.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from phiclip.inputs.records import PayloadReader, Record
from phiclip.pipeline.writer import ShardSink

if TYPE_CHECKING:  # pragma: no cover
    from phiclip.encoders.base import Encoder


@dataclass(kw_only=True)
class EngineJob:
    """What an engine gets: the records and how to read them, the pending ``units`` (``(shard,
    positions)``), the loaded encoder, the step's settings (cost budget of a batch, pixel limit, token
    sequences), the run's precision, the timings to add to, and a progress bar."""

    kind: str
    records: Sequence[Record]
    reader: PayloadReader
    units: list[tuple[int, list[int]]]
    encoder: Encoder
    batch_size: int
    max_pixels: int | None
    tokens: bool
    precision: str
    timings: dict[str, float]
    bar: Any
    #: Stop the run (:class:`TooManyFailures`) when this run's failures pass this (``None``: never); see
    #: :meth:`phiclip.pipeline.runner.EmbedOptions.failure_limit`.
    max_failures: Any = None


class TooManyFailures(RuntimeError):
    """The run stopped early: more inputs failed than ``max_failures`` allows. ``reasons`` holds ``((stage,
    reason), count)`` of this run's failures, most frequent first."""

    def __init__(self, message: str, reasons: list[tuple[tuple[str, str], int]]) -> None:
        super().__init__(message)
        self.reasons = reasons


class Engine(Protocol):
    """An engine (see the module docstring). ``model`` is an encoder spec or a loaded encoder."""

    def precision(self, model: Any) -> str:
        """The compute precision the vectors will come from (the output's ``settings.precision``)."""
        ...

    def load(self, model: Any, max_pixels: int | None) -> Encoder:
        """The encoder the driver uses (its ``describe()`` goes into the manifest), with ``max_pixels`` set."""
        ...

    def run(self, job: EngineJob, sink: ShardSink) -> int:
        """Embed the job's pending shards into ``sink``; returns the records this run accounted for."""
        ...


def default_num_workers(device: str = "cuda") -> int:
    """Worker processes for an encoder on ``device``: ``min(4, CPUs)`` beside an accelerator (CUDA,
    MPS...), 0 on the CPU (there the inputs are prepared on a thread pool between model calls; see
    :mod:`.local`)."""
    if str(device).split(":")[0] == "cpu":
        return 0
    return min(4, os.cpu_count() or 1)


@dataclass(frozen=True, kw_only=True)
class LocalOptions:
    """Options of the local engine (:mod:`.local`)."""

    #: ``auto`` (CUDA when present), ``cpu``, ``cuda``, ``cuda:1``... (where a spec is loaded).
    device: str = "auto"
    #: Compute dtype asked for (``auto``, ``float32``, ``bfloat16``...).
    precision: str = "auto"
    #: Decode/preprocess processes; ``None``: :func:`default_num_workers` of the encoder's device.
    num_workers: int | None = None

    def workers(self, device: str) -> int:
        """The resolved number of worker processes for an encoder on ``device``."""
        return default_num_workers(device) if self.num_workers is None else self.num_workers


@dataclass(frozen=True, kw_only=True)
class RayOptions:
    """Options of the Ray engine (:mod:`.ray_engine`)."""

    #: ``auto`` (CUDA when the actors have GPUs), ``cpu``, ``cuda``...: where the actors run the model.
    device: str = "auto"
    #: Compute dtype asked for (``auto``, ``float32``, ``bfloat16``...).
    precision: str = "auto"
    #: The cluster to join (``auto``, ``ray://host:10001``...); ``None``: a running local instance, or a new one.
    address: str | None = None
    #: GPUs per encoding actor (fractions share a GPU); ``None``: 1 when the cluster has GPUs, else 0.
    gpus_per_actor: float | None = None
    #: Encoding actors; ``None``: one per GPU, or one on a CPU-only cluster.
    num_actors: int | None = None


__all__ = ["Engine", "EngineJob", "TooManyFailures", "LocalOptions", "RayOptions", "default_num_workers"]
