"""The one registry of encoder kinds: for each, how to build it and which options its spec takes.

Spec parsing (:func:`parse_spec`, :func:`check_spec`), loading (:func:`load_encoder`) and
``compare`` all read :data:`KINDS`; a new kind is one :class:`EncoderKind` entry here, its options
dataclass (:mod:`phiclip.encoders.options`) and its encoder module.

The builders import their encoder modules when called, on purpose: those import torch and
transformers, which spec parsing and the command line must not pay for.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from phiclip.encoders.device import Placement, resolve_placement, warn_if_slow_cpu_dtype
from phiclip.encoders.options import ContrastiveOptions, Phi3VLMOptions, Phi3VOptions
from phiclip.encoders.spec import EncoderSpec, SpecOptions, split_spec
from phiclip.hub import CheckpointError

if TYPE_CHECKING:
    from phiclip.encoders.base import Encoder

#: ``builder(spec, options, placement) -> Encoder``; ``options`` is the kind's dataclass (or None).
Builder = Callable[[EncoderSpec, Any, Placement], "Encoder"]


@dataclass(frozen=True)
class EncoderKind:
    """One kind of encoder (the ``kind`` of ``kind:location``)."""

    name: str
    builder: Builder
    #: The spec options' dataclass; None: the builder reads ``spec.options`` itself.
    options: type[SpecOptions] | None
    #: Whether ``precision="int8"`` (CPU) is available.
    int8: bool
    #: The module that holds the encoder (imported by the builder; ``compare`` times its import).
    module: str
    summary: str

    def with_builder(self, builder: Builder) -> EncoderKind:
        """The same kind built by ``builder`` (tests put stand-in encoders in the registry this way)."""
        return dataclasses.replace(self, builder=builder)

    def parse_options(self, spec: EncoderSpec) -> SpecOptions | None:
        """The spec's options as this kind's dataclass (a ``ValueError`` naming a bad one)."""
        return None if self.options is None else self.options.from_spec(spec)


def _build_clip(spec: EncoderSpec, options: Any, placement: Placement) -> Encoder:
    from phiclip.encoders.clip import CLIPEncoder

    return CLIPEncoder.build(spec, options, placement)


def _build_siglip(spec: EncoderSpec, options: Any, placement: Placement) -> Encoder:
    from phiclip.encoders.clip import SigLIPEncoder

    return SigLIPEncoder.build(spec, options, placement)


def _build_phi3v(spec: EncoderSpec, options: Any, placement: Placement) -> Encoder:
    from phiclip.encoders.phi3v import Phi3VEncoder

    return Phi3VEncoder.build(spec, options, placement)


def _build_phi3v_lm(spec: EncoderSpec, options: Any, placement: Placement) -> Encoder:
    from phiclip.encoders.phi3v_lm import Phi3VLMEncoder

    return Phi3VLMEncoder.build(spec, options, placement)


#: kind -> how to build it. The one place new kinds are registered.
KINDS: dict[str, EncoderKind] = {
    k.name: k
    for k in (
        EncoderKind("clip", _build_clip, ContrastiveOptions, int8=True, module="phiclip.encoders.clip",
                    summary="CLIP through transformers (image and text)"),
        EncoderKind("siglip", _build_siglip, ContrastiveOptions, int8=True, module="phiclip.encoders.clip",
                    summary="SigLIP through transformers (image and text)"),
        EncoderKind("phi3v", _build_phi3v, Phi3VOptions, int8=True, module="phiclip.encoders.phi3v",
                    summary="Phi-3-vision's image path, pooled (images)"),
        EncoderKind("phi3v-lm", _build_phi3v_lm, Phi3VLMOptions, int8=False, module="phiclip.encoders.phi3v_lm",
                    summary="Phi-3-vision's image path and language model, pooled (image, text, both)"),
    )
}
#: The kinds, in registry order (the prefix of ``kind:location``).
SPEC_KINDS: tuple[str, ...] = tuple(KINDS)
#: Kinds whose encoders run ``precision="int8"`` (on the CPU).
INT8_KINDS: tuple[str, ...] = tuple(k for k, v in KINDS.items() if v.int8)


def parse_spec(spec: str) -> EncoderSpec:
    """Parse ``kind:location[?key=value&key=value]`` (the kind must be registered).

    >>> parse_spec("clip:openai/clip-vit-base-patch32")
    EncoderSpec(kind='clip', location='openai/clip-vit-base-patch32', options={})
    >>> parse_spec("phi3v:/models/phi3v?num_crops=4&pooling=global").options
    {'num_crops': '4', 'pooling': 'global'}

    Raises:
        ValueError: for an unknown kind, an empty location or a malformed option.
    """
    return split_spec(spec, SPEC_KINDS)


def check_spec(spec: str | EncoderSpec) -> EncoderSpec:
    """:func:`parse_spec`, and the options checked against the kind's (before anything loads)."""
    parsed = spec if isinstance(spec, EncoderSpec) else parse_spec(spec)
    KINDS[parsed.kind].parse_options(parsed)
    return parsed


def load_encoder(spec: str | EncoderSpec, *, device: str = "auto", dtype: str = "auto") -> Encoder:
    """Build an encoder from a spec such as ``clip:openai/clip-vit-base-patch32``,
    ``clip:/path/to/dir`` or ``phi3v:microsoft/Phi-3-vision-128k-instruct?num_crops=4&pooling=mean``.

    Args:
        spec: ``kind:location[?options]``; location is a hub id or a local directory.
        device: ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda``, ``cuda:1``...
        dtype: the compute precision: ``auto`` (bfloat16 on CUDA; on the CPU the faster of float32
            and bfloat16, measured: see :mod:`phiclip.cpu.precision`), ``float32``, ``bfloat16``,
            ``float16``, or ``int8`` (CPU; the kinds in :data:`INT8_KINDS`: see :mod:`phiclip.cpu.int8`).

    Raises:
        ValueError: a bad spec, option, device or precision (before anything loads), or a
            checkpoint that cannot be loaded (:class:`~phiclip.hub.CheckpointError`).
    """
    parsed = spec if isinstance(spec, EncoderSpec) else parse_spec(spec)
    kind = KINDS[parsed.kind]
    options = kind.parse_options(parsed)
    placement = resolve_placement(device, dtype)
    if placement.precision == "int8" and not kind.int8:
        raise ValueError(f"encoder spec {str(parsed)!r}: precision int8 is available for {', '.join(INT8_KINDS)}; "
                         "use float32 or bfloat16 for this kind")
    warn_if_slow_cpu_dtype(placement.device, placement.dtype)
    try:
        return kind.builder(parsed, options, placement)
    except CheckpointError as e:  # name the spec the user wrote
        if str(e).startswith("encoder spec "):
            raise
        raise CheckpointError(f"encoder spec {str(parsed)!r}: {e}") from None


__all__ = ["INT8_KINDS", "KINDS", "SPEC_KINDS", "EncoderKind", "check_spec", "load_encoder", "parse_spec"]
