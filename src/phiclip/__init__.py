"""phiclip: image embeddings with CLIP and Phi-3-vision's image encoder, side by side."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["__version__", "load_encoder", "embed", "search", "compare"]

if TYPE_CHECKING:  # pragma: no cover
    from phiclip.encoders import load_encoder


def __getattr__(name: str) -> Any:
    # Heavy imports (torch, transformers, faiss) happen only when the function is used.
    if name == "load_encoder":
        from phiclip.encoders import load_encoder

        return load_encoder
    if name == "embed":
        from phiclip.pipeline.runner import embed

        return embed
    if name == "search":
        from phiclip.retrieval import search

        return search
    if name == "compare":
        from phiclip.comparison.runner import compare

        return compare
    raise AttributeError(f"module 'phiclip' has no attribute {name!r}")
