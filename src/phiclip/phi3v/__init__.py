"""Phi-3-vision's image path, exact and vision-only: the HD processor and the image embedding.

The names below load their modules (and torch) when first used, on purpose: the configuration
(:mod:`phiclip.phi3v.config`) is read by torch-free code (spec options, the command line).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from phiclip.phi3v.config import Phi3VImageProcessorConfig, Phi3VVisionConfig
    from phiclip.phi3v.modeling import Phi3ImageEmbedding, Phi3VImageEmbedding
    from phiclip.phi3v.processing import (
        Phi3VImageInputs,
        Phi3VImageProcessor,
        hd_size,
        num_image_tokens,
        num_tokens_for_hd_size,
    )

_HOMES = {
    "Phi3ImageEmbedding": "modeling",
    "Phi3VImageEmbedding": "modeling",
    "Phi3VImageInputs": "processing",
    "Phi3VImageProcessor": "processing",
    "Phi3VImageProcessorConfig": "config",
    "Phi3VVisionConfig": "config",
    "hd_size": "processing",
    "num_image_tokens": "processing",
    "num_tokens_for_hd_size": "processing",
}

__all__ = [
    "Phi3ImageEmbedding",
    "Phi3VImageEmbedding",
    "Phi3VImageInputs",
    "Phi3VImageProcessor",
    "Phi3VImageProcessorConfig",
    "Phi3VVisionConfig",
    "hd_size",
    "num_image_tokens",
    "num_tokens_for_hd_size",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'phiclip.phi3v' has no attribute {name!r}")
    return getattr(importlib.import_module(f"phiclip.phi3v.{home}"), name)
