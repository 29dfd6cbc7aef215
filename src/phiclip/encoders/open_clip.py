"""open_clip checkpoints as CLIP encoders (kind ``open_clip``): ``open_clip:PATH_OR_HUB_ID``.

The weights are loaded without open_clip onto transformers' ``CLIPModel``
(:mod:`phiclip.open_clip.loading`), so everything the CLIP encoder does (embed, embed-text, search,
eval and zero-shot, compare, serve, fine-tuning, the fast image path, bfloat16 and int8 on the CPU,
OpenVINO / ONNX Runtime) works unchanged; images go through open_clip's own transform
(:class:`~phiclip.open_clip.preprocessing.OpenCLIPPreprocessor`) and texts through open_clip's
tokenizer (:class:`~phiclip.open_clip.tokenizer.OpenCLIPTokenizer`).
"""

from __future__ import annotations

from typing import Any

from phiclip.encoders.clip import CLIPEncoder
from phiclip.encoders.device import Placement
from phiclip.encoders.options import ContrastiveOptions
from phiclip.encoders.spec import EncoderSpec
from phiclip.open_clip.loading import load_open_clip
from phiclip.open_clip.preprocessing import OpenCLIPPreprocessor
from phiclip.open_clip.tokenizer import OpenCLIPTokenizer


class OpenCLIPEncoder(CLIPEncoder):
    """An open_clip CLIP (ViT image and text towers) on transformers' ``CLIPModel``."""

    kind = "open_clip"
    model_type = "open_clip"
    model_class_name = "CLIPModel"
    text_padding = "max_length"  # open_clip's tokenizer always fills context_length
    keeps_alpha = True  # open_clip converts to RGB after resizing (alpha dropped)
    open_clip_info: dict[str, Any] | None = None

    @classmethod
    def build(cls, spec: EncoderSpec, options: ContrastiveOptions, placement: Placement) -> OpenCLIPEncoder:
        """Load ``open_clip:PATH_OR_HUB_ID`` (the registry's builder).

        Raises:
            ValueError: a bad location; an open_clip architecture phiclip does not load
                (:class:`~phiclip.open_clip.config.UnsupportedOpenCLIP`, naming it and what is supported).
        """
        if spec.kind != cls.kind:
            raise ValueError(f"encoder spec {str(spec)!r} is not a {cls.kind}: spec")
        loaded = load_open_clip(spec.location)
        model = loaded.model.to(placement.device).eval()
        preprocessor = OpenCLIPPreprocessor(loaded.config.preprocess)
        tokenizer = OpenCLIPTokenizer(loaded.config.context_length, loaded.config.tokenizer_clean)
        encoder = cls(spec, model, preprocessor, tokenizer, placement=placement,  # type: ignore[arg-type]
                      options=options, weights_fingerprint=loaded.checkpoint.fingerprint_later())
        encoder.checkpoint = loaded.checkpoint
        encoder.open_clip_info = {
            "architecture": loaded.config.architecture, "weights_file": loaded.weights_file,
            "logit_bias": None if loaded.logit_bias is None else loaded.logit_bias.flatten().tolist(),
            "tokenizer": tokenizer.describe(),
        }
        return encoder

    def description(self) -> Any:
        desc = super().description()
        desc.details["model_type"] = "open_clip"
        desc.details["open_clip"] = self.open_clip_info
        return desc


__all__ = ["OpenCLIPEncoder"]
