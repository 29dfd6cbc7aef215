"""Phi-3-vision's image path, exact and vision-only: the HD processor and the image embedding."""

from phiclip.phi3v.config import Phi3VImageProcessorConfig, Phi3VVisionConfig
from phiclip.phi3v.modeling import Phi3ImageEmbedding, Phi3VImageEmbedding
from phiclip.phi3v.processing import (
    Phi3VImageInputs,
    Phi3VImageProcessor,
    hd_size,
    num_image_tokens,
    num_tokens_for_hd_size,
)

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
