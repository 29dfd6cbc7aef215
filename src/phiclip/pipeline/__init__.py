"""Bulk embedding: inputs -> records -> decode + preprocess (threads on the CPU, worker processes beside a
GPU, or Ray tasks) -> encoder -> atomic Parquet shards.

:mod:`.sources` lists inputs, :mod:`.plan` cuts them into shards (and plans ``--update``),
:mod:`.output` owns the output folder (lock, identity; the manifest itself is :mod:`phiclip.manifest`'s),
:mod:`.step` is the one embedding loop (and :func:`~.step.encode_images` for images in memory),
:mod:`.writer` writes shards and fragments, :mod:`.engine` is the engine seam (the :class:`~.engine.Engine`
protocol, ``run(job, sink)``, and its typed options) that :mod:`.local` and :mod:`.ray_engine`
implement, :mod:`.job` is one run from the claimed folder to the final manifest, and :mod:`.runner` is
the public API (:func:`embed`, :func:`embed_text`) with the table of engines. Importing this package is
cheap; torch is imported when a run starts.
"""

from __future__ import annotations

from phiclip.pipeline.runner import EmbedOptions, EmbedResult, embed, embed_text
from phiclip.pipeline.sources import InputError, InputListing, Record, list_inputs, list_texts, plan_shards
from phiclip.pipeline.writer import OutputError, ShardWriter

__all__ = [
    "EmbedOptions",
    "EmbedResult",
    "InputError",
    "InputListing",
    "OutputError",
    "Record",
    "ShardWriter",
    "embed",
    "embed_text",
    "list_inputs",
    "list_texts",
    "plan_shards",
]
