"""A student vision tower for Phi-3-vision's image path (another CLIP-like tower instead of ViT-L/14-336).

The released image path cuts an image into 336-px crops (an ``h x w`` grid plus a global view),
runs each through CLIP ViT-L/14-336 (a 24 x 24 patch grid), merges 2 x 2 patches (12 x 12 tokens of
4 x 1024 channels), adds the learnt separators and projects to the language model's width. A
student keeps all of that except the tower:

- :class:`StudentVisionTower` (here) runs the student (a transformers ``CLIPVisionModel`` or
  ``SiglipVisionModel``, up to its chosen layer) and resamples its ``g x g`` patch grid to 24 x 24
  (bilinear; antialiased when shrinking), which the inherited 2 x 2 merge turns into 12 x 12.
- :class:`~phiclip.phi3v.processing.StudentImageProcessor` cuts the same ``h x w`` crop grid
  (computed with the released arithmetic at 336 px, so it never differs) at the student's input
  size ``S``; ``image_sizes`` stay in the released 336-px units, so the token count of every image,
  and the language model's sequence length, are the released ones.
- :class:`~phiclip.phi3v.modeling.StudentImageEmbedding` is the image embedding with this tower:
  separators and projection are ``4 * D_student`` wide, everything else is inherited unchanged.

A checkpoint of it is a Phi-3-vision checkpoint whose ``config.json`` has
``img_processor.name == "phiclip_student_vision"`` (:data:`STUDENT_TOWER_NAME`) with the student's
description under ``img_processor.student``, and whose ``preprocessor_config.json`` has
``image_processor_type == "PhiclipStudentImageProcessor"`` (:data:`STUDENT_PROCESSOR_TYPE`) with
``crop_size``. ``Phi3VImageEmbedding.from_pretrained`` and ``Phi3VImageProcessor.from_pretrained``
load such checkpoints as those classes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from phiclip.phi3v.config import CROP_SIZE

#: ``img_processor.name`` of a student checkpoint.
STUDENT_TOWER_NAME = "phiclip_student_vision"
#: ``image_processor_type`` of a student checkpoint's ``preprocessor_config.json``.
STUDENT_PROCESSOR_TYPE = "PhiclipStudentImageProcessor"
#: The patch grid per crop that Phi-3-vision's token layout expects (336 / 14).
TARGET_GRID = CROP_SIZE // 14
#: transformers vision models a student can be.
STUDENT_MODEL_TYPES = ("clip_vision_model", "siglip_vision_model")


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

    @property
    def input_device(self) -> torch.device:
        """Where the tower takes its crops (its weights' device)."""
        return self.vision_model.embeddings.patch_embedding.weight.device

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype the tower takes its crops in (its patch embedding's, kept float by int8)."""
        return self.vision_model.embeddings.patch_embedding.weight.dtype


def student_layers_run(num_hidden_layers: int, layer_idx: int) -> int:
    """Layers run for a hidden-states index (``-1``: all; ``-2``: all but the last; ``k >= 1``: k)."""
    n = int(num_hidden_layers)
    run = layer_idx if layer_idx >= 0 else n + 1 + layer_idx
    if not 1 <= run <= n:
        raise ValueError(f"student layer {layer_idx} is out of range for a {n}-layer tower (use -1 .. -{n}, or 1 .. {n})")
    return run


__all__ = [
    "STUDENT_MODEL_TYPES",
    "STUDENT_PROCESSOR_TYPE",
    "STUDENT_TOWER_NAME",
    "TARGET_GRID",
    "StudentVisionTower",
    "student_layers_run",
]
