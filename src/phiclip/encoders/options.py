"""The options each encoder kind reads from its spec (``clip:DIR?normalize=false&max_batch=64``),
as dataclasses with their defaults and meanings, declared once. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass

from phiclip.encoders.spec import SpecOptions, bool_option, choice_option, int_option
from phiclip.phi3v.config import MAX_NUM_CROPS

#: Most images (or texts) per CLIP / SigLIP model call, by default.
DEFAULT_MAX_BATCH = 256


@dataclass(frozen=True)
class ContrastiveOptions(SpecOptions):
    """``clip:`` and ``siglip:`` options."""

    normalize: bool = bool_option(True, "true|false: L2-normalise the vectors (default true)")
    max_batch: int = int_option(DEFAULT_MAX_BATCH, "integer >= 1: most inputs per model call (default 256)")
    fast: bool = bool_option(
        True, "true|false: phiclip's CLIP image tower (default true; false: transformers' get_image_features)")


@dataclass(frozen=True)
class Phi3VOptions(SpecOptions):
    """``phi3v:`` options."""

    num_crops: int | None = int_option(
        None, f"integer from 1 to {MAX_NUM_CROPS}: crops per image (default: the checkpoint's preprocessor_config.json)",
        maximum=MAX_NUM_CROPS, hint="the released checkpoints use 16 (Phi-3-vision) or 4 (Phi-3.5-vision)")
    pooling: str = choice_option(
        "mean", ("mean", "global"),
        "mean|global: mean of the projected image tokens (default), or of the tower's global-view patches")
    normalize: bool = bool_option(True, "true|false: L2-normalise the vectors (default true)")
    max_crops: int | None = int_option(None, "integer >= 1: crops per tower call (default: 4 on the CPU, 64 on GPUs)")


__all__ = ["DEFAULT_MAX_BATCH", "ContrastiveOptions", "Phi3VOptions"]
