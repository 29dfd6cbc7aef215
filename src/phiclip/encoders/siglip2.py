"""SigLIP 2 encoders through transformers (kind ``siglip2``): ``siglip2:google/siglip2-base-patch16-naflex``.

Two layouts load under the one kind:

- **NaFlex** (``model_type`` ``siglip2``, ``Siglip2Model``): images keep their aspect ratio with a
  variable number of patches (at most ``max_num_patches``, a spec option; default the checkpoint's
  processor, 256 for the released ones), preprocessed by
  :class:`~phiclip.encoders.siglip2_preprocessing.NaFlexPreprocessor` (equal to
  ``Siglip2ImageProcessor``'s PIL path); a batch of images of different aspect ratios is padded to
  ``max_num_patches`` with the patch attention mask, as the processor does.
- **fixed resolution** (google/siglip2-*-224, -256, -384, -512: ``model_type`` ``siglip``,
  ``SiglipModel``, Gemma's tokenizer): SigLIP's square resize
  (:class:`~phiclip.encoders.clip_preprocessing.ImagePreprocessor`). ``siglip:`` loads these too;
  ``siglip2:`` records the family.

Image vectors are ``get_image_features`` (the vision tower's attention-pooling head), text vectors
``get_text_features`` for texts padded to the maximum length (64 for the released checkpoints), as
``Siglip2Processor`` pads them; L2-normalised unless ``normalize=false``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from phiclip.checkpoints import Checkpoint
from phiclip.encoders.clip import _pooled
from phiclip.encoders.clip_preprocessing import ImagePreprocessor, ProcessorPreprocessor
from phiclip.encoders.siglip2_preprocessing import NaFlexPreprocessor
from phiclip.encoders.spec import EncoderSpec
from phiclip.encoders.transformers_family import FamilyEncoder, load_image_processor

if TYPE_CHECKING:
    import torch


class Siglip2Encoder(FamilyEncoder):
    """SigLIP 2, NaFlex (``Siglip2Model``) or fixed resolution (``SiglipModel``); image and text."""

    kind = "siglip2"
    model_classes = {"siglip2": "Siglip2Model", "siglip": "SiglipModel"}
    text_padding = "max_length"

    @property
    def naflex(self) -> bool:
        return isinstance(self.preprocessor, NaFlexPreprocessor)

    @classmethod
    def _check_config(cls, spec: EncoderSpec, config: Any, options: Any) -> None:
        if getattr(config.vision_config, "vision_use_head", True) is False:
            raise ValueError(f"encoder spec {str(spec)!r}: the vision model has no pooling head (vision_use_head=false), "
                             "so it gives no image vector; use a SigLIP 2 checkpoint with its head")
        if config.model_type == "siglip2" and options.runtime not in ("torch", "auto"):
            raise ValueError(f"encoder spec {str(spec)!r}: runtime={options.runtime} compiles fixed-shape image paths; "
                             "a NaFlex checkpoint's number of patches varies with each image: use runtime=torch or auto "
                             "(torch runs it, in int8 or bfloat16 too)")
        if config.model_type == "siglip" and options.max_num_patches is not None:
            raise ValueError(f"encoder spec {str(spec)!r}: max_num_patches is for NaFlex checkpoints (model_type "
                             "siglip2); this one is a fixed-resolution SigLIP 2 (model_type siglip, "
                             f"{config.vision_config.image_size}px): leave the option out")

    @classmethod
    def _has_text(cls, config: Any) -> bool:
        return True

    @classmethod
    def _preprocessor(cls, spec: EncoderSpec, checkpoint: Checkpoint, config: Any, options: Any,
                      no_code: dict[str, Any]) -> Any:
        processor = load_image_processor(spec, no_code, str(checkpoint.location))
        if config.model_type == "siglip2":
            if not hasattr(processor, "max_num_patches"):
                raise ValueError(f"encoder spec {str(spec)!r}: a NaFlex SigLIP 2 checkpoint needs the Siglip2 image "
                                 f"processor (patch_size, max_num_patches), not {type(processor).__name__}")
            pre = NaFlexPreprocessor.from_image_processor(processor, options.max_num_patches)
            if pre.patch_size != int(config.vision_config.patch_size):
                raise ValueError(f"encoder spec {str(spec)!r}: the image processor's patch_size {pre.patch_size} is "
                                 f"not the vision model's {config.vision_config.patch_size}")
            return pre
        return ImagePreprocessor.from_image_processor(processor) or ProcessorPreprocessor(processor)

    def _image_dim(self) -> int:
        return int(self.model.config.vision_config.hidden_size)

    def _image_modules(self) -> tuple[Any, ...]:
        return (self.model.vision_model,)

    # --- NaFlex batches: the processor's three inputs ------------------------------------------
    def collate(self, items: Sequence[Any]) -> Any:
        """NaFlex: items padded to ``max_num_patches`` (pixel values, patch mask, spatial shapes);
        fixed resolution: (n, 3, H, W)."""
        if self.naflex:
            return self.preprocessor.collate(list(items))
        return super().collate(items)

    def _batch_size(self, batch: Any) -> int:
        return int(batch["pixel_values"].shape[0]) if isinstance(batch, dict) else super()._batch_size(batch)

    def _batch_slice(self, batch: Any, start: int, stop: int) -> Any:
        if isinstance(batch, dict):
            return {k: v[start:stop].to(self.device) for k, v in batch.items()}
        return super()._batch_slice(batch, start, stop)

    def _image_features(self, batch: Any) -> torch.Tensor:
        if isinstance(batch, dict):
            return _pooled(self.model.get_image_features(**batch))
        return _pooled(self.model.get_image_features(pixel_values=batch))

    def _details(self) -> dict[str, Any]:
        vision = self.model.config.vision_config
        return {"layout": "naflex" if self.naflex else "fixed", "patch_size": int(vision.patch_size),
                "image_size": None if self.naflex else int(vision.image_size),
                "max_num_patches": self.preprocessor.max_num_patches if self.naflex else None}


__all__ = ["Siglip2Encoder"]
