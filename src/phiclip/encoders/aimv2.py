"""AIMv2 encoders through transformers (kind ``aimv2``): ``aimv2:apple/aimv2-large-patch14-224-lit``.

- **LiT** checkpoints (``model_type`` ``aimv2``, ``Aimv2Model``): image and text. Image vectors are
  ``get_image_features`` (attention-pooling head, projected), text vectors ``get_text_features``
  (the state at the first end-of-text token, projected), texts padded to the longest.
- **image-only** checkpoints (``model_type`` ``aimv2_vision_model``, ``Aimv2VisionModel``): the
  vision model's ``pooler_output`` (its attention-pooling head) when it has a head
  (``use_head``), else the mean of its final (RMS-normed) patch tokens (AIMv2 has no CLS token).

Images go through the checkpoint's CLIP image processor (PIL path). L2-normalised unless
``normalize=false``.

The text tower runs with **eager attention** on purpose: in transformers 5.25 ``Aimv2TextModel``
under SDPA drops its causal mask for a batch without padding (``create_causal_mask`` returns None
and the attention has ``is_causal=False``), so one text alone is embedded bidirectionally and
differs (by about 0.5) from the same text in a padded batch. The eager path always applies the
causal mask (and the padding mask): phiclip matches the eager semantics, so a text's vector does
not depend on what it is batched with. (And the attention mask is always passed: without one the
text tower applies no mask at all.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from phiclip.encoders.clip import _pooled
from phiclip.encoders.spec import EncoderSpec
from phiclip.encoders.transformers_family import FamilyEncoder

if TYPE_CHECKING:
    import torch


class Aimv2Encoder(FamilyEncoder):
    """AIMv2: LiT (``Aimv2Model``, image and text) or image-only (``Aimv2VisionModel``)."""

    kind = "aimv2"
    model_classes = {"aimv2": "Aimv2Model", "aimv2_vision_model": "Aimv2VisionModel"}
    text_padding = "longest"

    @property
    def lit(self) -> bool:
        return self.model.config.model_type == "aimv2"

    @classmethod
    def _check_config(cls, spec: EncoderSpec, config: Any, options: Any) -> None:
        if config.model_type == "aimv2" and getattr(config.vision_config, "use_head", True) is False:
            raise ValueError(f"encoder spec {str(spec)!r}: the LiT vision model has no pooling head (use_head=false), "
                             "so get_image_features gives no image vector; use a checkpoint with its head")

    @classmethod
    def _has_text(cls, config: Any) -> bool:
        return config.model_type == "aimv2"

    @classmethod
    def _prepare_model(cls, model: Any) -> Any:
        if hasattr(model, "text_model"):
            # Eager attention for the text tower: SDPA drops the causal mask of an unpadded batch
            # in transformers 5.25 (see the module docstring); the image tower keeps SDPA.
            model.text_model.set_attn_implementation("eager")
        return model

    def _image_dim(self) -> int:
        config = self.model.config
        return int(config.projection_dim) if self.lit else int(config.hidden_size)

    def _image_modules(self) -> tuple[Any, ...]:
        if self.lit:
            return (self.model.vision_model, self.model.visual_projection)
        return (self.model,)

    def _image_features(self, batch: Any) -> torch.Tensor:
        if self.lit:
            return _pooled(self.model.get_image_features(pixel_values=batch))
        out = self.model(pixel_values=batch)
        return out.pooler_output if out.pooler_output is not None else out.last_hidden_state.mean(dim=1)

    def _details(self) -> dict[str, Any]:
        config = self.model.config
        vision = config.vision_config if self.lit else config
        pooling = "attention-pooling head" + (", projected" if self.lit else "") if vision.use_head \
            else "mean of the patch tokens"
        return {"layout": "lit" if self.lit else "image-only", "image_pooling": pooling,
                "image_size": int(vision.image_size), "patch_size": int(vision.patch_size),
                "text_attention": "eager (causal mask always applied)" if self.lit else None}


__all__ = ["Aimv2Encoder"]
