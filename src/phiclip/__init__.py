"""phiclip: image embeddings with CLIP and Phi-3-vision's image encoder, side by side.

The public functions below are loaded on first use (PEP 562 ``__getattr__``), so ``import phiclip`` and
``phiclip --help`` stay free of torch, transformers and faiss:

- :func:`load_encoder` (:mod:`phiclip.encoders`): an encoder from a spec such as ``clip:openai/clip-vit-base-patch32``;
- :func:`encode_images` (:mod:`phiclip.pipeline.step`): vectors of a few images with a loaded encoder;
- :func:`embed` (:mod:`phiclip.pipeline.runner`): bulk embedding of a folder, table or dataset to Parquet;
- :func:`search` (:mod:`phiclip.retrieval`): nearest stored vectors to a text or image;
- :func:`compare` (:mod:`phiclip.comparison.runner`): encoders side by side, as an HTML report.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from phiclip.version import __version__

__all__ = ["__version__", "compare", "embed", "encode_images", "load_encoder", "search"]

if TYPE_CHECKING:  # pragma: no cover
    from phiclip.comparison.runner import compare
    from phiclip.encoders import load_encoder
    from phiclip.pipeline.runner import embed
    from phiclip.pipeline.step import encode_images
    from phiclip.retrieval import search


def __getattr__(name: str) -> Any:
    if name == "load_encoder":
        from phiclip.encoders import load_encoder  # lazy: pulls in torch and transformers

        return load_encoder
    if name == "encode_images":
        from phiclip.pipeline.step import encode_images  # lazy: pulls in torch

        return encode_images
    if name == "embed":
        from phiclip.pipeline.runner import embed  # lazy: pulls in the encoders (torch, transformers)

        return embed
    if name == "search":
        from phiclip.retrieval import search  # lazy: pulls in faiss and the encoders

        return search
    if name == "compare":
        from phiclip.comparison.runner import compare  # lazy: pulls in the encoders and the report

        return compare
    raise AttributeError(f"module 'phiclip' has no attribute {name!r}")
