"""Encoders: one interface (:class:`Encoder`) for CLIP, SigLIP and Phi-3-vision, built from a spec."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from phiclip.encoders.base import EncodedBatch, Encoder, EncoderSpec, parse_spec


def _build_clip(spec: EncoderSpec, **kw: Any) -> Encoder:
    from phiclip.encoders.clip import CLIPEncoder

    return CLIPEncoder.from_spec(spec, **kw)


def _build_siglip(spec: EncoderSpec, **kw: Any) -> Encoder:
    from phiclip.encoders.clip import SigLIPEncoder

    return SigLIPEncoder.from_spec(spec, **kw)


def _build_phi3v(spec: EncoderSpec, **kw: Any) -> Encoder:
    from phiclip.encoders.phi3v import Phi3VEncoder

    return Phi3VEncoder.from_spec(spec, **kw)


#: kind -> builder(spec, device=..., dtype=...). The one place new kinds are registered.
BUILDERS: dict[str, Callable[..., Encoder]] = {
    "clip": _build_clip,
    "siglip": _build_siglip,
    "phi3v": _build_phi3v,
}


def load_encoder(spec: str | EncoderSpec, *, device: str = "auto", dtype: str = "auto") -> Encoder:
    """Build an encoder from a spec such as ``clip:openai/clip-vit-base-patch32``,
    ``clip:/path/to/dir`` or ``phi3v:microsoft/Phi-3-vision-128k-instruct?num_crops=4&pooling=mean``.

    Args:
        spec: ``kind:location[?options]``; location is a hub id or a local directory.
        device: ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda``, ``cuda:1``...
        dtype: ``auto`` (bfloat16 on CUDA, float32 on CPU), ``float32``, ``bfloat16``, ``float16``.
    """
    parsed = spec if isinstance(spec, EncoderSpec) else parse_spec(spec)
    return BUILDERS[parsed.kind](parsed, device=device, dtype=dtype)


def resolve_device_dtype(device: str = "auto", dtype: str = "auto") -> tuple[Any, Any]:
    """``auto`` -> (cuda, bfloat16) when CUDA is present, else (cpu, float32)."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dtype == "auto":
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    else:
        names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                 "float16": torch.float16, "fp16": torch.float16}
        if dtype not in names:
            raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(names)}")
        dt = names[dtype]
    return dev, dt


__all__ = ["BUILDERS", "EncodedBatch", "Encoder", "EncoderSpec", "load_encoder", "parse_spec", "resolve_device_dtype"]
