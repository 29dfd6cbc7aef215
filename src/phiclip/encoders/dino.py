"""DINOv2 and DINOv3 encoders through transformers (kinds ``dinov2`` and ``dinov3``), image only:
``dinov2:facebook/dinov2-base?pool=cls+mean``, ``dinov3:facebook/dinov3-vits16-pretrain-lvd1689m``.

- ``dinov2``: ``Dinov2Model`` (``model_type`` ``dinov2``) and ``Dinov2WithRegistersModel``
  (``dinov2_with_registers``), images through the checkpoint's ``BitImageProcessor`` (resize the
  shorter side, centre crop; PIL path reimplemented exactly by
  :class:`~phiclip.encoders.clip_preprocessing.ImagePreprocessor`).
- ``dinov3``: ``DINOv3ViTModel`` (``dinov3_vit``), images through
  :class:`~phiclip.encoders.dino_preprocessing.Dinov3Preprocessor` (its processor's steps: rescale,
  antialiased resize, normalise).

The image vector (spec option ``pool``): ``cls`` (the default: the final layer-normed CLS token,
transformers' ``pooler_output``), ``mean`` (the mean of the final layer-normed patch tokens,
register tokens left out) or ``cls+mean`` (both concatenated, DINOv2's linear-probe protocol and
``Dinov2ForImageClassification``'s input: twice the width). L2-normalised unless
``normalize=false``. These encoders have no text side: ``encode_texts`` says so, naming the kind.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from phiclip.checkpoints import Checkpoint
from phiclip.encoders.dino_preprocessing import Dinov3Preprocessor
from phiclip.encoders.spec import EncoderSpec
from phiclip.encoders.transformers_family import FamilyEncoder

if TYPE_CHECKING:
    import torch


class _DinoEncoder(FamilyEncoder):
    """What DINOv2 and DINOv3 share: the vector pooled from the final tokens."""

    @property
    def num_register_tokens(self) -> int:
        return int(getattr(self.model.config, "num_register_tokens", 0) or 0)

    def _image_dim(self) -> int:
        width = int(self.model.config.hidden_size)
        return 2 * width if self.options.pool == "cls+mean" else width  # type: ignore[attr-defined]

    def _image_modules(self) -> tuple[Any, ...]:
        return (self.model,)

    def _image_features(self, batch: Any) -> torch.Tensor:
        import torch

        out = self.model(pixel_values=batch)
        cls_token = out.pooler_output
        pool = self.options.pool  # type: ignore[attr-defined]
        if pool == "cls":
            return cls_token
        patches = out.last_hidden_state[:, 1 + self.num_register_tokens:]
        mean = patches.mean(dim=1)
        return mean if pool == "mean" else torch.cat([cls_token, mean], dim=-1)

    def _details(self) -> dict[str, Any]:
        config = self.model.config
        return {"pool": self.options.pool, "num_register_tokens": self.num_register_tokens,  # type: ignore[attr-defined]
                "patch_size": int(config.patch_size), "hidden_size": int(config.hidden_size)}


class Dinov2Encoder(_DinoEncoder):
    """DINOv2, with or without registers: images only."""

    kind = "dinov2"
    model_classes = {"dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel"}


class Dinov3Encoder(_DinoEncoder):
    """DINOv3 ViT: images only."""

    kind = "dinov3"
    model_classes = {"dinov3_vit": "DINOv3ViTModel"}

    @classmethod
    def _preprocessor(cls, spec: EncoderSpec, checkpoint: Checkpoint, config: Any, options: Any,
                      no_code: dict[str, Any]) -> Any:
        found = checkpoint.image_processor_config()  # checked values; DINOv3's processor is torchvision-only
        try:
            return Dinov3Preprocessor.from_config(found[0] if found is not None else {})
        except ValueError as e:
            raise ValueError(f"encoder spec {str(spec)!r}: {e}") from None


__all__ = ["Dinov2Encoder", "Dinov3Encoder"]
