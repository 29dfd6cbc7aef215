"""MetaCLIP 2 encoders through transformers (kind ``metaclip2``): ``metaclip2:facebook/metaclip-2-worldwide-huge-quickgelu``.

``MetaClip2Model`` (worldwide, multilingual CLIP): images through the checkpoint's CLIP image
processor (PIL path, :class:`~phiclip.encoders.clip_preprocessing.ImagePreprocessor`), then
``get_image_features``; texts through its tokenizer (XLM-RoBERTa's for the released ones), padded to
the longest text, then ``get_text_features`` (the state at the first end-of-text token, projected).
L2-normalised unless ``normalize=false``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from phiclip.encoders.clip import _pooled
from phiclip.encoders.transformers_family import FamilyEncoder

if TYPE_CHECKING:
    import torch


class MetaClip2Encoder(FamilyEncoder):
    """MetaCLIP 2 (``MetaClip2Model``): image and text."""

    kind = "metaclip2"
    model_classes = {"metaclip_2": "MetaClip2Model"}
    text_padding = "longest"

    @classmethod
    def _has_text(cls, config: Any) -> bool:
        return True

    def _image_dim(self) -> int:
        return int(self.model.config.projection_dim)

    def _image_modules(self) -> tuple[Any, ...]:
        return (self.model.vision_model, self.model.visual_projection)

    def _image_features(self, batch: Any) -> torch.Tensor:
        return _pooled(self.model.get_image_features(pixel_values=batch))

    def _details(self) -> dict[str, Any]:
        vision = self.model.config.vision_config
        return {"image_size": int(vision.image_size), "patch_size": int(vision.patch_size)}


__all__ = ["MetaClip2Encoder"]
