"""The CLIP vision tower's configuration (torch-free): what :mod:`phiclip.models.clip_vision`
builds, read from a ``vision_config`` dict (Phi-3-vision's ``img_processor.vision_config``) or from
a transformers ``CLIPVisionConfig``."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from phiclip.hub import CheckpointError
from phiclip.models.checkpoint import check_field

#: Activations the tower implements (transformers' names).
SUPPORTED_ACTIVATIONS = ("quick_gelu", "gelu", "gelu_python", "gelu_new", "gelu_pytorch_tanh")


@dataclass(frozen=True)
class CLIPVisionConfig:
    """A CLIP vision tower's sizes. Defaults: CLIP ViT-L/14 at 336 px, the tower of the released
    Phi-3-vision checkpoints (``openai/clip-vit-large-patch14-336``)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @property
    def grid(self) -> int:
        """Patches per side (24 for ViT-L/14-336)."""
        return self.image_size // self.patch_size

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | Path = "config.json", prefix: str = "vision_config.") -> CLIPVisionConfig:
        """Read and check the fields (absent ones take the defaults; others are ignored): positive
        sizes, heads dividing the width, whole patches. Errors name ``source`` and ``prefix + field``."""
        check_field(d, prefix.rstrip(".") or "(the whole file)", source, kind="dict")
        values = {**asdict(cls()), **{k: d[k] for k in cls.__dataclass_fields__ if k in d}}
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "image_size", "patch_size", "num_channels"):
            check_field(values[key], prefix + key, source, minimum=1)
        check_field(values["hidden_act"], prefix + "hidden_act", source, kind="str")
        check_field(values["layer_norm_eps"], prefix + "layer_norm_eps", source, kind="number", minimum=0)
        if values["hidden_size"] % values["num_attention_heads"]:
            raise CheckpointError(
                f"{source}: {prefix}hidden_size {values['hidden_size']} is not divisible by "
                f"{prefix}num_attention_heads {values['num_attention_heads']}"
            )
        if values["image_size"] % values["patch_size"]:
            raise CheckpointError(
                f"{source}: {prefix}image_size {values['image_size']} is not a multiple of "
                f"{prefix}patch_size {values['patch_size']}"
            )
        kinds = {"layer_norm_eps": float, "hidden_act": str}
        return cls(**{k: kinds.get(k, int)(v) for k, v in values.items()})

    @classmethod
    def from_hf(cls, config: Any) -> CLIPVisionConfig:
        """From a transformers ``CLIPVisionConfig`` (or any object with its attributes)."""
        return cls(**{k: getattr(config, k, default) for k, default in asdict(cls()).items()})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


__all__ = ["SUPPORTED_ACTIVATIONS", "CLIPVisionConfig"]
