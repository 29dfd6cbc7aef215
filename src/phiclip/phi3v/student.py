"""A student vision tower in Phi-3-vision's image path (another CLIP-like tower instead of ViT-L/14-336).

The released image path cuts an image into 336-px crops (an ``h x w`` grid plus a global view),
runs each through CLIP ViT-L/14-336 (a 24 x 24 patch grid), merges 2 x 2 patches (12 x 12 tokens of
4 x 1024 channels), adds the learnt separators and projects to the language model's width. The
student keeps all of that except the tower:

- :class:`StudentImageProcessor` cuts the same ``h x w`` crop grid (computed with the released
  arithmetic at 336 px, so it never differs) at the student's input size ``S``: the image is resized
  to the released size times ``S / 336`` and padded with white to ``(h*S, w*S)``; the global view is
  the bicubic ``S x S`` of that canvas. ``image_sizes`` stay in the released 336-px units, so the
  token count of every image, and the language model's sequence length, are the released ones.
- :class:`StudentVisionTower` runs the student (a transformers ``CLIPVisionModel`` or
  ``SiglipVisionModel``, up to its chosen layer) and resamples its ``g x g`` patch grid to 24 x 24
  (bilinear; antialiased when shrinking), which the inherited 2 x 2 merge turns into 12 x 12.
- :class:`StudentImageEmbedding` is :class:`~phiclip.phi3v.modeling.Phi3VImageEmbedding` with that
  tower: separators and projection are ``4 * D_student`` wide, everything else (token layout,
  separators, projection, pooling, the merge into text) is inherited unchanged.

A checkpoint of it is a Phi-3-vision checkpoint whose ``config.json`` has
``img_processor.name == "phiclip_student_vision"`` with the student's description under
``img_processor.student``, and whose ``preprocessor_config.json`` has ``image_processor_type ==
"PhiclipStudentImageProcessor"`` with ``crop_size``. ``Phi3VImageEmbedding.from_pretrained`` and
``Phi3VImageProcessor.from_pretrained`` hand such checkpoints to these classes.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from phiclip.images import DEFAULT_MAX_PIXELS, ImageInput, load_image
from phiclip.phi3v.config import CROP_SIZE, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Phi3VVisionConfig
from phiclip.phi3v.modeling import Phi3VImageEmbedding, real_crops_per_image
from phiclip.phi3v.processing import (
    Phi3VImageInputs,
    hd_size,
    normalization,
    num_tokens_for_hd_size,
    resized_size,
)

#: ``img_processor.name`` of a student checkpoint.
STUDENT_TOWER_NAME = "phiclip_student_vision"
#: ``image_processor_type`` of a student checkpoint's ``preprocessor_config.json``.
STUDENT_PROCESSOR_TYPE = "PhiclipStudentImageProcessor"
#: The patch grid per crop that Phi-3-vision's token layout expects (336 / 14).
TARGET_GRID = CROP_SIZE // 14
#: transformers vision models a student can be.
STUDENT_MODEL_TYPES = ("clip_vision_model", "siglip_vision_model")


# ==============================================================================================
# Preprocessing
# ==============================================================================================
class StudentImageProcessor:
    """The HD transform with crops of ``crop_size`` pixels (see the module docstring).

    ``preprocess_image(image) -> (crops (1 + h*w, 3, S, S), (H, W))`` with ``(H, W)`` the released
    canvas size in 336-px units (what ``image_sizes`` holds).
    """

    def __init__(self, crop_size: int, num_crops: int = 16, image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
                 image_std: Sequence[float] = OPENAI_CLIP_STD, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
        if int(crop_size) < 1:
            raise ValueError(f"crop_size must be positive, got {crop_size}")
        if not isinstance(num_crops, (int, np.integer)) or num_crops < 1:
            raise ValueError(f"num_crops must be an integer >= 1, got {num_crops!r}")
        self.crop_size = int(crop_size)
        self.num_crops = int(num_crops)
        self.image_mean, self.image_std, self._mean, self._std = normalization(image_mean, image_std)
        self.max_pixels = max_pixels

    # --- files ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """``preprocessor_config.json`` contents (also what decides the pixels, for manifests)."""
        return {
            "image_processor_type": STUDENT_PROCESSOR_TYPE,
            "processor_class": "Phi3VProcessor",
            "name": "phiclip_student_hd_transform",
            "crop_size": self.crop_size,
            "num_crops": self.num_crops,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "resize": f"PIL bilinear to the released size times {self.crop_size}/{CROP_SIZE}, white padding to whole crops",
            "global_view": f"bicubic (align_corners=False) of the normalised canvas to {self.crop_size}x{self.crop_size}",
        }

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``preprocessor_config.json``."""
        path = Path(directory) / "preprocessor_config.json"
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_dict(cls, d: dict[str, Any], **kwargs: Any) -> StudentImageProcessor:
        """From ``preprocessor_config.json`` contents; keyword arguments override them."""
        args = {"crop_size": d.get("crop_size"), "num_crops": d.get("num_crops", 16),
                "image_mean": d.get("image_mean", OPENAI_CLIP_MEAN), "image_std": d.get("image_std", OPENAI_CLIP_STD)}
        if args["crop_size"] is None:
            raise ValueError("a student preprocessor_config.json needs crop_size (the student's input size)")
        args.update(kwargs)
        return cls(**args)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any) -> StudentImageProcessor:
        """Read ``preprocessor_config.json`` from a local directory or a hub id."""
        from phiclip.phi3v.weights import resolve_file

        file = resolve_file(path, "preprocessor_config.json")
        return cls.from_dict(json.loads(Path(file).read_text(encoding="utf-8")), **kwargs)  # type: ignore[arg-type]

    # --- pixels -----------------------------------------------------------------------------
    def canvas(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        """One RGB image -> ``(normalised canvas (3, h*S, w*S), (H, W) in 336-px units)``."""
        width, height = image.size
        H, W = hd_size(width, height, self.num_crops)  # the released canvas: decides h and w
        h, w = H // CROP_SIZE, W // CROP_SIZE
        s = self.crop_size
        if self.max_pixels is not None and h * s * w * s > self.max_pixels:
            raise ValueError(f"image {width}x{height} needs a {w * s}x{h * s} canvas, over the pixel limit of {self.max_pixels}")
        rw, rh = resized_size(width, height, self.num_crops)  # the released resize, in 336-px units
        new_w = min(w * s, max(1, round(rw * s / CROP_SIZE)))
        new_h = min(h * s, max(1, round(rh * s / CROP_SIZE)))
        resized = np.asarray(image.convert("RGB").resize((new_w, new_h), Image.Resampling.BILINEAR), dtype=np.uint8)
        canvas = torch.ones(3, h * s, w * s)
        top, left = int((h * s - new_h) / 2), int((w * s - new_w) / 2)  # centred white padding, as released
        canvas[:, top : top + new_h, left : left + new_w] = torch.from_numpy(resized.transpose(2, 0, 1).copy()).float() / 255.0
        return (canvas - self._mean) / self._std, (H, W)

    def crops_from_canvas(self, canvas: torch.Tensor) -> torch.Tensor:
        """``(3, h*S, w*S)`` -> ``(1 + h*w, 3, S, S)``: global view, then the crops row-major."""
        s = self.crop_size
        _, ch, cw = canvas.shape
        h, w = ch // s, cw // s
        glb = F.interpolate(canvas[None], size=(s, s), mode="bicubic", align_corners=False)  # (1, 3, S, S)
        # (3, h*S, w*S) -> (3, h, S, w, S) -> (h, w, 3, S, S) -> (h*w, 3, S, S)
        tiles = canvas.view(3, h, s, w, s).permute(1, 3, 0, 2, 4).reshape(h * w, 3, s, s)
        return torch.cat([glb, tiles], dim=0)

    def preprocess_image(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        """One RGB PIL image -> ``(crops (1 + h*w, 3, S, S), (H, W))``."""
        canvas, size = self.canvas(image)
        return self.crops_from_canvas(canvas), size

    def __call__(self, images: ImageInput | Sequence[ImageInput], *, padding: bool = True,
                 return_tensors: str = "pt") -> Phi3VImageInputs:
        """Like :class:`~phiclip.phi3v.processing.Phi3VImageProcessor`: padded ``(n, N + 1, 3, S, S)``
        pixel values (or a list without ``padding``), ``image_sizes`` in 336-px units, token counts."""
        if return_tensors != "pt":
            raise ValueError(f"return_tensors={return_tensors!r} is not supported; use 'pt'")
        batch = list(images) if isinstance(images, (list, tuple)) else [images]
        if not batch:
            raise ValueError("no images given; pass a list with at least one image")
        results = [self.preprocess_image(load_image(im, max_pixels=self.max_pixels)) for im in batch]
        sizes = torch.tensor([r[1] for r in results], dtype=torch.int64)
        tokens = [num_tokens_for_hd_size(h, w) for h, w in sizes.tolist()]
        if not padding:
            return Phi3VImageInputs(pixel_values=[r[0] for r in results], image_sizes=sizes, num_img_tokens=tokens)
        s = self.crop_size
        out = torch.zeros(len(batch), self.num_crops + 1, 3, s, s)
        for i, (crops, _) in enumerate(results):
            out[i, : crops.shape[0]] = crops
        return Phi3VImageInputs(pixel_values=out, image_sizes=sizes, num_img_tokens=tokens)


def is_student_processor_config(d: dict[str, Any]) -> bool:
    """Whether a ``preprocessor_config.json``'s contents describe a student's processor."""
    return isinstance(d, dict) and d.get("image_processor_type") == STUDENT_PROCESSOR_TYPE


def is_student_processor_file(path: str | Path) -> bool:
    """Whether a ``preprocessor_config.json`` file describes a student's processor (False when it
    cannot be read: the released loader then reports the problem)."""
    try:
        return is_student_processor_config(json.loads(Path(path).read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return False


# ==============================================================================================
# The tower
# ==============================================================================================
def _hf_vision_model(model_type: str, hf_config: dict[str, Any]) -> nn.Module:
    """A transformers vision model from its config dict, without a pooling head; returns the module
    whose children are ``embeddings``, ``encoder``... (transformers 4 nests it under ``vision_model``)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    if model_type == "clip_vision_model":
        model: nn.Module = CLIPVisionModel(CLIPVisionConfig(**hf_config))
    elif model_type == "siglip_vision_model":
        model = SiglipVisionModel(SiglipVisionConfig(**{**hf_config, "vision_use_head": False}))
    else:
        raise ValueError(f"student model_type {model_type!r} is not one of {', '.join(STUDENT_MODEL_TYPES)}")
    return getattr(model, "vision_model", model)


def _materialize_buffers(module: nn.Module, incompatible: Any) -> None:
    """Give transformers' ``embeddings.position_ids`` (an ``arange``, not saved) real storage."""
    emb = module.vision_model.embeddings  # type: ignore[union-attr]
    ids = getattr(emb, "position_ids", None)
    if ids is not None and ids.is_meta:
        device = emb.position_embedding.weight.device
        n = emb.position_embedding.weight.shape[0]
        emb.register_buffer("position_ids", torch.arange(n, device=device).expand((1, -1)), persistent=False)


class StudentVisionTower(nn.Module):
    """``(C, 3, S, S)`` crops -> ``(C, 576, D)``: the student's patch features after its first
    ``num_layers_run`` layers (CLS dropped), resampled from ``g x g`` to 24 x 24.

    ``vision_model`` holds the transformers module with the checkpoint's own parameter names,
    truncated to the layers run; its final norm (never read here) is removed.
    """

    def __init__(self, student: dict[str, Any]) -> None:
        super().__init__()
        self.model_type = student["model_type"]
        cfg = dict(student["hf_config"])
        self.num_layers_run = int(student["num_layers_run"])
        if not 1 <= self.num_layers_run <= int(cfg["num_hidden_layers"]):
            raise ValueError(f"student num_layers_run {self.num_layers_run} is out of range for "
                             f"{cfg['num_hidden_layers']} layers")
        self.image_size, self.patch_size = int(cfg["image_size"]), int(cfg["patch_size"])
        if self.image_size % self.patch_size:
            raise ValueError(f"student image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        self.grid = self.image_size // self.patch_size
        self.has_cls = self.model_type == "clip_vision_model"
        vision = _hf_vision_model(self.model_type, cfg)
        vision.encoder.layers = vision.encoder.layers[: self.num_layers_run]
        vision.post_layernorm = nn.Identity()  # the hidden state is read before it
        self.vision_model = vision
        # Built on the meta device and loaded with assign=True, the non-persistent buffers
        # (position_ids) would stay meta; rebuild them where the weights landed.
        self.register_load_state_dict_post_hook(_materialize_buffers)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        c = pixel_values.shape[0]
        hidden = self.vision_model(pixel_values=pixel_values).last_hidden_state  # (C, [1 +] g*g, D)
        patches = hidden[:, 1:] if self.has_cls else hidden  # (C, g*g, D)
        g, d = self.grid, patches.shape[-1]
        grid = patches.transpose(1, 2).reshape(c, d, g, g)  # (C, D, g, g)
        if g != TARGET_GRID:
            grid = F.interpolate(grid, size=(TARGET_GRID, TARGET_GRID), mode="bilinear", align_corners=False,
                                 antialias=g > TARGET_GRID)  # (C, D, 24, 24)
        return grid.flatten(2).transpose(1, 2)  # (C, 576, D)


# ==============================================================================================
# The image embedding
# ==============================================================================================
def _stand_in(config: Phi3VVisionConfig) -> Phi3VVisionConfig:
    """The config the parent class is built from: the released 336-px / patch-14 layout with a
    0-layer tower of the student's width (replaced by the student right after)."""
    d = copy.deepcopy(config.to_dict())
    width = int(config.image_dim_out)
    d["img_processor"]["vision_config"] = {
        "hidden_size": width, "intermediate_size": width, "num_hidden_layers": 1, "num_attention_heads": 1,
        "image_size": CROP_SIZE, "patch_size": 14, "num_channels": 3, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    }
    d["img_processor"]["layer_idx"] = 0
    d["img_processor"]["type_feature"] = "patch"
    return Phi3VVisionConfig.from_dict(d)


def _as_config(config: Any) -> Phi3VVisionConfig:
    if isinstance(config, Phi3VVisionConfig):
        return config
    if isinstance(config, dict):
        return Phi3VVisionConfig.from_dict(config)
    raise ValueError(f"a student image embedding takes a Phi3VVisionConfig or a config.json dict, got {type(config).__name__}")


class StudentImageEmbedding(Phi3VImageEmbedding):
    """Phi-3-vision's image embedding with a student tower (see the module docstring).

    ``config.img_processor`` must name ``phiclip_student_vision`` and hold ``student``:
    ``{"model_type", "hf_config", "num_layers_run", ...}``; ``image_dim_out`` is the student's width.
    Inputs: crops of ``crop_size`` pixels from :class:`StudentImageProcessor`, ``image_sizes`` in
    336-px units.
    """

    def __init__(self, config: Any, wte: nn.Embedding | None = None, *, max_crops_per_batch: int | None = None,
                 **embd_layer: Any) -> None:
        cfg = _as_config(config)
        student = cfg.img_processor.get("student")
        if cfg.img_processor.get("name") != STUDENT_TOWER_NAME or not isinstance(student, dict):
            raise ValueError(f"img_processor.name must be {STUDENT_TOWER_NAME!r} with an img_processor.student description")
        super().__init__(_stand_in(cfg), wte, max_crops_per_batch=max_crops_per_batch, **embd_layer)
        if not self.use_hd_transform:
            raise ValueError("a student tower needs the HD transform (embd_layer.use_hd_transform true)")
        self.config = cfg
        self.img_processor = StudentVisionTower(student)
        if int(student["hf_config"]["hidden_size"]) != self.image_dim_out:
            raise ValueError(f"img_processor.image_dim_out {self.image_dim_out} differs from the student's hidden_size "
                             f"{student['hf_config']['hidden_size']}")
        self.num_layers_run = self.img_processor.num_layers_run
        self.layer_idx = int(cfg.img_processor.get("layer_idx", -1))
        self.crop_size = self.img_processor.image_size
        self.student = dict(student)

    def crop_features(self, crops: torch.Tensor) -> torch.Tensor:
        """``(C, 3, S, S)`` -> ``(C, 576, D)``, in chunks of ``max_crops_per_batch`` (default 16 on the
        CPU, 64 on GPUs)."""
        param = self.img_processor.vision_model.embeddings.patch_embedding.weight
        step = self.max_crops_per_batch or (16 if param.device.type == "cpu" else 64)
        outs = []
        for start in range(0, crops.shape[0], step):
            chunk = crops[start : start + step].to(device=param.device, dtype=param.dtype, non_blocking=True)
            outs.append(self.img_processor(chunk))
        return torch.cat(outs, dim=0)

    def _real_crops(self, pixel_values: torch.Tensor | Sequence[torch.Tensor], grids: list[tuple[int, int]]) -> torch.Tensor:
        """The real crops of every image (global view first): ``(sum_i 1 + h_i*w_i, 3, S, S)``."""
        per_image = real_crops_per_image(pixel_values, grids, self.crop_size, grid_unit=CROP_SIZE,
                                         note=" (the student's crop size)")
        return torch.cat(per_image, dim=0)

    def processor(self, num_crops: int = 16, image_mean: Sequence[float] | None = None,
                  image_std: Sequence[float] | None = None) -> StudentImageProcessor:
        """A processor for this tower (mean/std default to the student's, from its description)."""
        return StudentImageProcessor(self.crop_size, num_crops, image_mean or self.student.get("image_mean", OPENAI_CLIP_MEAN),
                                     image_std or self.student.get("image_std", OPENAI_CLIP_STD))


def student_class_for(config: Phi3VVisionConfig) -> type[StudentImageEmbedding] | None:
    """The class that loads a config naming a student tower, else None (the hook in
    ``Phi3VImageEmbedding.from_pretrained``)."""
    return StudentImageEmbedding if config.img_processor.get("name") == STUDENT_TOWER_NAME else None


def student_layers_run(num_hidden_layers: int, layer_idx: int) -> int:
    """Layers run for a hidden-states index (``-1``: all; ``-2``: all but the last; ``k >= 1``: k)."""
    n = int(num_hidden_layers)
    run = layer_idx if layer_idx >= 0 else n + 1 + layer_idx
    if not 1 <= run <= n:
        raise ValueError(f"student layer {layer_idx} is out of range for a {n}-layer tower (use -1 .. -{n}, or 1 .. {n})")
    return run


__all__ = [
    "STUDENT_PROCESSOR_TYPE",
    "STUDENT_TOWER_NAME",
    "StudentImageEmbedding",
    "StudentImageProcessor",
    "StudentVisionTower",
    "is_student_processor_config",
    "is_student_processor_file",
    "student_class_for",
    "student_layers_run",
]
