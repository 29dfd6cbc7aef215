"""Encoders: one interface (:class:`Encoder`) for CLIP, SigLIP and Phi-3-vision, built from a spec."""

from __future__ import annotations

import platform
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
    warn_if_slow_cpu_dtype(*resolve_device_dtype(device, dtype))
    return BUILDERS[parsed.kind](parsed, device=device, dtype=dtype)


def slow_cpu_dtype_reason(device: Any, dtype: Any) -> str | None:
    """Why ``dtype`` would be slower than float32 on this CPU, or None. Without AMX tiles, a CPU's
    16-bit matrix products run no faster than float32 ones (bench/native/isa_peak.c measures the
    AVX512-BF16 dot product at half the float32 FMA rate on this project's machine) and pay for
    conversions on top."""
    import torch

    if torch.device(device).type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return None
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return None  # AMX is an x86 feature; other CPUs (e.g. Arm with BF16 instructions) differ
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        has_amx = bool(probe()) if probe is not None else True  # unknown: do not claim anything
    except Exception:  # noqa: BLE001 - a private probe; its absence must not break loading
        has_amx = True
    if has_amx:
        return None
    name = str(dtype).replace("torch.", "")
    return (f"{name} on this CPU (no AMX tiles) runs matrix products at about half the float32 rate; "
            "float32 (dtype auto on the CPU) is faster here and exact")


def warn_if_slow_cpu_dtype(device: Any, dtype: Any) -> None:
    """A ``UserWarning`` with :func:`slow_cpu_dtype_reason`, when there is one."""
    import warnings

    reason = slow_cpu_dtype_reason(device, dtype)
    if reason is not None:
        warnings.warn(reason, UserWarning, stacklevel=3)


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


__all__ = ["BUILDERS", "EncodedBatch", "Encoder", "EncoderSpec", "load_encoder", "parse_spec", "resolve_device_dtype",
           "slow_cpu_dtype_reason", "warn_if_slow_cpu_dtype"]
