"""Bulk embedding: inputs -> records -> decode + preprocess (threads on the CPU, worker processes beside a
GPU) -> encoder -> atomic Parquet shards.

:mod:`.sources` lists inputs, :mod:`.writer` writes shards and the manifest, :mod:`.runner` ties
them together (:func:`embed`, :func:`embed_text`). Importing this package is cheap; torch is
imported when a run starts.
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
