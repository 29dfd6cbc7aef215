"""Encoders: one interface (:class:`Encoder`) for CLIP, SigLIP and Phi-3-vision, built from a spec.

- :mod:`~phiclip.encoders.spec`: ``kind:location?options`` and the option dataclasses' machinery.
- :mod:`~phiclip.encoders.registry`: the kinds (builder + options), :func:`load_encoder`.
- :mod:`~phiclip.encoders.device`: device and compute precision, decided once.
- :mod:`~phiclip.encoders.base`: :class:`Encoder` and its typed :class:`EncoderDescription`.
- one module per kind: :mod:`~phiclip.encoders.clip`, :mod:`~phiclip.encoders.phi3v`, ...

Importing this package imports neither torch nor transformers.
"""

from __future__ import annotations

from phiclip.encoders.base import EncodedBatch, Encoder, EncoderDescription
from phiclip.encoders.device import (
    Placement,
    precision_record,
    resolve_device_dtype,
    resolve_placement,
    slow_cpu_dtype_reason,
    warn_if_slow_cpu_dtype,
)
from phiclip.encoders.registry import (
    INT8_KINDS,
    KINDS,
    SPEC_KINDS,
    EncoderKind,
    check_spec,
    load_encoder,
    parse_spec,
)
from phiclip.encoders.spec import EncoderSpec, SpecOptions

__all__ = [
    "INT8_KINDS",
    "KINDS",
    "SPEC_KINDS",
    "EncodedBatch",
    "Encoder",
    "EncoderDescription",
    "EncoderKind",
    "EncoderSpec",
    "Placement",
    "SpecOptions",
    "check_spec",
    "load_encoder",
    "parse_spec",
    "precision_record",
    "resolve_device_dtype",
    "resolve_placement",
    "slow_cpu_dtype_reason",
    "warn_if_slow_cpu_dtype",
]
