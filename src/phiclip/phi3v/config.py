"""What ``config.json`` and ``preprocessor_config.json`` of a Phi-3-vision checkpoint say.

Defaults are the released checkpoints' values (``microsoft/Phi-3-vision-128k-instruct``); each
implicit default of the released code is commented where it applies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phiclip.hub import CheckpointError
from phiclip.models.checkpoint import (
    check_field,
    check_image_processor_values,
    check_mean_std,
    load_json_file,
)
from phiclip.models.clip_config import CLIPVisionConfig

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

#: Tokens per crop side after the 2x2 merge of the released tower's 24x24 patch grid (336 / 14 / 2).
MERGED_GRID = 12


def num_tokens_for_crop_grid(rows: int, cols: int, merged_grid: int = MERGED_GRID) -> int:
    """Image tokens of an image cut into ``rows x cols`` crops, ``m = merged_grid`` tokens per crop
    side: ``rows*cols + 1`` crops of ``m*m`` tokens (the sub-images and the global view), ``rows*m + m``
    row-end separators (``sub_GN``) and one ``glb_GN``: ``(h*w + 1) * 144 + 1 + (h + 1) * 12`` as released."""
    return (rows * cols + 1) * merged_grid**2 + 1 + (rows + 1) * merged_grid

#: The most crops an image may be cut into. The released models use 16 (Phi-3-vision) and 4
#: (Phi-3.5-vision); 64 leaves room for experiments while bounding an image's HD canvas to
#: 64 * 336 * 336 = 7.2 M pixels (87 MB as float32) and its tower work to 65 crops.
MAX_NUM_CROPS = 64

def check_num_crops(value: Any, source: str | Path, *, error: type[ValueError] = CheckpointError) -> int:
    """``num_crops``: an integer from 1 to :data:`MAX_NUM_CROPS` (``"4"``, 4.7, 0, 1e9 are refused)."""
    return int(check_field(value, "num_crops", source, minimum=1, maximum=MAX_NUM_CROPS, error=error,
                           hint="the released checkpoints use 16 (Phi-3-vision) or 4 (Phi-3.5-vision)"))


@dataclass
class Phi3VImageProcessorConfig:
    """``preprocessor_config.json``: ``num_crops`` (16 for Phi-3-vision, 4 for Phi-3.5-vision), mean, std."""

    num_crops: int = 16
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | Path = "preprocessor_config.json") -> Phi3VImageProcessorConfig:
        """Read and check the settings (``source`` names the file in error messages)."""
        check_image_processor_values(d, source)
        mean, std = check_mean_std(d, source, default=(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD))  # type: ignore[misc]
        return cls(
            num_crops=check_num_crops(d.get("num_crops", 16), source),  # absent -> 16 (released processor)
            image_mean=mean,  # type: ignore[arg-type]
            image_std=std,  # type: ignore[arg-type]
        )

    @classmethod
    def from_json_file(cls, path: str | Path) -> Phi3VImageProcessorConfig:
        return cls.from_dict(load_json_file(path), source=path)


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
        return int(self.img_processor.get("image_dim_out", self.vision_config.hidden_size))

    @property
    def vision_config(self) -> CLIPVisionConfig:
        """The CLIP tower's config: ViT-L/14-336 unless ``img_processor.vision_config`` (phiclip's
        extension, used for tiny test towers) overrides some or all of it."""
        return self._vision_config()

    def _vision_config(self, source: str | Path = "config.json") -> CLIPVisionConfig:
        return CLIPVisionConfig.from_dict({**CLIP_VIT_L14_336, **(self.img_processor.get("vision_config") or {})},
                                          source, prefix="img_processor.vision_config.")

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | Path = "config.json") -> Phi3VVisionConfig:
        """Read and check every field the image path uses, for type and range; ``source`` names the
        file in error messages (:class:`~phiclip.hub.CheckpointError`). Which model type the file
        holds, and its sizes, are checked where it is opened (:func:`phiclip.checkpoints.open_checkpoint`)."""
        check_field(d, "(the whole file)", source, kind="dict")
        missing = [k for k in ("img_processor", "embd_layer") if k not in d]
        if missing:
            raise CheckpointError(
                f"{source} has no {', '.join(missing)}: this is not a Phi-3-vision checkpoint "
                "(expected keys img_processor and embd_layer, as in microsoft/Phi-3-vision-128k-instruct)"
            )
        img = check_field(d["img_processor"], "img_processor", source, kind="dict")
        layer = check_field(d["embd_layer"], "embd_layer", source, kind="dict",
                            hint='e.g. {"embedding_cls": "image", "use_hd_transform": true, ...} as released')
        hidden_key = "hidden_size" if "hidden_size" in d else "n_embd"
        pdrop = d.get("embd_pdrop", d.get("embed_pdrop", 0.0))
        config = cls(
            hidden_size=check_field(d.get(hidden_key, 3072), hidden_key, source, minimum=1),
            vocab_size=check_field(d.get("vocab_size", 32064), "vocab_size", source, minimum=1),
            embd_pdrop=float(check_field(0.0 if pdrop is None else pdrop, "embd_pdrop", source, kind="number", minimum=0, maximum=1)),
            img_processor=dict(img),
            embd_layer=dict(layer),
        )
        for key in ("use_hd_transform", "with_learnable_separator"):
            if key in layer:
                check_field(layer[key], f"embd_layer.{key}", source, kind="bool")
        for key in ("hd_transform_order", "projection_cls"):
            if key in layer:
                check_field(layer[key], f"embd_layer.{key}", source, kind="str")
        if img.get("vision_config") is not None:
            check_field(img["vision_config"], "img_processor.vision_config", source, kind="dict")
        if "type_feature" in img:
            check_field(img["type_feature"], "img_processor.type_feature", source, kind="str")
        n = config._vision_config(source).num_hidden_layers  # checks the tower's fields
        # hidden_states has n + 1 entries, so layer_idx runs from -(n + 1) to n.
        check_field(img.get("layer_idx", -2), "img_processor.layer_idx", source, minimum=-(n + 1), maximum=n,
                    hint=f"the tower has {n} layers")
        if "image_dim_out" in img:
            check_field(img["image_dim_out"], "img_processor.image_dim_out", source, minimum=1)
        return config

    @classmethod
    def from_json_file(cls, path: str | Path) -> Phi3VVisionConfig:
        return cls.from_dict(load_json_file(path), source=path)

    def to_dict(self) -> dict[str, Any]:
        return {
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "embd_pdrop": self.embd_pdrop,
            "img_processor": dict(self.img_processor),
            "embd_layer": dict(self.embd_layer),
        }
