"""What ``config.json`` and ``preprocessor_config.json`` of a Phi-3-vision checkpoint say.

Defaults are the released checkpoints' values (``microsoft/Phi-3-vision-128k-instruct``); each
implicit default of the released code is commented where it applies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: The tower named by ``img_processor.model_name`` in the released configs: CLIP ViT-L/14 at 336 px.
CLIP_VIT_L14_336: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "num_channels": 3,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
}

#: Crop size of the HD transform (fixed by the released processor).
CROP_SIZE = 336


@dataclass
class Phi3VImageProcessorConfig:
    """``preprocessor_config.json``: ``num_crops`` (16 for Phi-3-vision, 4 for Phi-3.5-vision), mean, std."""

    num_crops: int = 16
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Phi3VImageProcessorConfig:
        return cls(
            num_crops=int(d.get("num_crops", 16)),
            image_mean=tuple(d.get("image_mean", OPENAI_CLIP_MEAN)),  # type: ignore[arg-type]
            image_std=tuple(d.get("image_std", OPENAI_CLIP_STD)),  # type: ignore[arg-type]
        )


@dataclass
class Phi3VVisionConfig:
    """The parts of a Phi-3-vision ``config.json`` the image path reads.

    Attributes mirror the checkpoint: ``hidden_size`` is the LM width tokens are projected to,
    ``img_processor`` and ``embd_layer`` keep their original dict form (so code written against
    the released sample, which reads ``config.img_processor[...]`` and ``**config.embd_layer``,
    works on this object), and the derived fields below read them with the released defaults.
    """

    hidden_size: int = 3072
    vocab_size: int = 32064
    embd_pdrop: float = 0.0
    img_processor: dict[str, Any] = field(
        default_factory=lambda: {
            "name": "clip_vision_model",
            "model_name": "openai/clip-vit-large-patch14-336",
            "image_dim_out": 1024,
            "num_img_tokens": 144,
        }
    )
    embd_layer: dict[str, Any] = field(
        default_factory=lambda: {
            "embedding_cls": "image",
            "hd_transform_order": "sub_glb",
            "projection_cls": "mlp",
            "use_hd_transform": True,
            "with_learnable_separator": True,
        }
    )

    # --- derived views, with the released code's defaults -----------------------------------
    @property
    def layer_idx(self) -> int:
        return int(self.img_processor.get("layer_idx", -2))  # absent -> -2 (hidden_states[-2])

    @property
    def type_feature(self) -> str:
        return str(self.img_processor.get("type_feature", "patch"))  # absent -> "patch" (drop CLS)

    @property
    def image_dim_out(self) -> int:
        return int(self.img_processor.get("image_dim_out", self.vision_config["hidden_size"]))

    @property
    def vision_config(self) -> dict[str, Any]:
        """The CLIP tower's config: ViT-L/14-336 unless ``img_processor.vision_config`` (phiclip's
        extension, used for tiny test towers) overrides some or all of it."""
        cfg = dict(CLIP_VIT_L14_336)
        cfg.update(self.img_processor.get("vision_config") or {})
        return cfg

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Phi3VVisionConfig:
        missing = [k for k in ("img_processor", "embd_layer") if k not in d]
        if missing:
            raise ValueError(
                f"config.json has no {', '.join(missing)}: this is not a Phi-3-vision checkpoint "
                "(expected keys img_processor and embd_layer, as in microsoft/Phi-3-vision-128k-instruct)"
            )
        return cls(
            hidden_size=int(d.get("hidden_size", d.get("n_embd", 3072))),
            vocab_size=int(d.get("vocab_size", 32064)),
            embd_pdrop=float(d.get("embd_pdrop", d.get("embed_pdrop", 0.0)) or 0.0),
            img_processor=dict(d["img_processor"]),
            embd_layer=dict(d["embd_layer"]),
        )

    @classmethod
    def from_json_file(cls, path: str | Path) -> Phi3VVisionConfig:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict[str, Any]:
        return {
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "embd_pdrop": self.embd_pdrop,
            "img_processor": dict(self.img_processor),
            "embd_layer": dict(self.embd_layer),
        }
