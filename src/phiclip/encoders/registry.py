"""The one registry of encoder kinds: for each, the checkpoints it loads, how to build it and which
options its spec takes.

Spec parsing (:func:`parse_spec`, :func:`check_spec`), checkpoint vetting
(:func:`phiclip.checkpoints.open_checkpoint`: which ``model_type`` values are known, which kind loads
each), loading (:func:`load_encoder`) and ``compare`` all read :data:`KINDS`. A new kind is one
:class:`EncoderKind` row here, its options dataclass (:mod:`phiclip.encoders.options`) and its
encoder module.

A row names its encoder module and class as data: the module is imported when a kind is first
built, so spec parsing and the command line never pay for torch and transformers.
"""

from __future__ import annotations

import dataclasses
import importlib
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
class ModuleBuilder:
    """The default builder of a kind: ``<module>.<encoder_class>.build(spec, options, placement)``,
    the module imported by name when first called."""

    module: str
    encoder_class: str

    def __call__(self, spec: EncoderSpec, options: Any, placement: Placement) -> Encoder:
        encoder_class = getattr(importlib.import_module(self.module), self.encoder_class)
        return encoder_class.build(spec, options, placement)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class EncoderKind:
    """One kind of encoder (the ``kind`` of ``kind:location``): one row of :data:`KINDS`."""

    name: str
    #: The ``model_type`` of the ``config.json`` this kind loads.
    model_type: str
    #: The module that holds the encoder (``compare`` times its import) and the encoder class in it
    #: (its ``build(spec, options, placement)`` is the default builder).
    module: str
    encoder_class: str
    #: The spec options' dataclass; None: the builder reads ``spec.options`` itself.
    options: type[SpecOptions] | None
    #: Whether ``precision="int8"`` (CPU) is available.
    int8: bool
    summary: str
    #: Whether transformers builds the model from ``config.json`` (then an ``auto_map`` there, which
    #: names code for transformers to import, is refused); False: phiclip reads the file as data.
    transformers_config: bool = False
    #: How to build it; None: :class:`ModuleBuilder` of ``module`` and ``encoder_class``.
    builder: Builder = None  # type: ignore[assignment]
    #: The checkpoint's config file (read first, pinned, vetted); another name than ``config.json``
    #: implies ``model_type`` (the file has none).
    config_file: str = "config.json"

    def __post_init__(self) -> None:
        if self.builder is None:
            object.__setattr__(self, "builder", ModuleBuilder(self.module, self.encoder_class))

    def with_builder(self, builder: Builder) -> EncoderKind:
        """The same kind built by ``builder`` (tests put stand-in encoders in the registry this way)."""
        return dataclasses.replace(self, builder=builder)

    def parse_options(self, spec: EncoderSpec) -> SpecOptions | None:
        """The spec's options as this kind's dataclass (a ``ValueError`` naming a bad one)."""
        return None if self.options is None else self.options.from_spec(spec)


#: kind -> its row. The one table of kinds, and of the model types phiclip loads.
KINDS: dict[str, EncoderKind] = {
    k.name: k
    for k in (
        EncoderKind("clip", "clip", "phiclip.encoders.clip", "CLIPEncoder", ContrastiveOptions, int8=True,
                    summary="CLIP through transformers (image and text)", transformers_config=True),
        EncoderKind("siglip", "siglip", "phiclip.encoders.clip", "SigLIPEncoder", ContrastiveOptions, int8=True,
                    summary="SigLIP through transformers (image and text)", transformers_config=True),
        EncoderKind("phi3v", "phi3_v", "phiclip.encoders.phi3v", "Phi3VEncoder", Phi3VOptions, int8=True,
                    summary="Phi-3-vision's image path, pooled (images)"),
        EncoderKind("phi3v-lm", "phi3_v", "phiclip.encoders.phi3v_lm", "Phi3VLMEncoder", Phi3VLMOptions, int8=False,
                    summary="Phi-3-vision's image path and language model, pooled (image, text, both)"),
        EncoderKind("open_clip", "open_clip", "phiclip.encoders.open_clip", "OpenCLIPEncoder", ContrastiveOptions,
                    int8=True, summary="open_clip CLIP checkpoints (ViT towers) as transformers CLIP, without open_clip",
                    config_file="open_clip_config.json"),
    )
}
#: The kinds, in registry order (the prefix of ``kind:location``).
SPEC_KINDS: tuple[str, ...] = tuple(KINDS)
#: Kinds whose encoders run ``precision="int8"`` (on the CPU).
INT8_KINDS: tuple[str, ...] = tuple(k for k, v in KINDS.items() if v.int8)


def kinds_for_model_type(model_type: str) -> tuple[EncoderKind, ...]:
    """The kinds that load checkpoints of ``model_type`` (registry order; empty: phiclip loads none)."""
    return tuple(k for k in KINDS.values() if k.model_type == model_type)


def known_model_types() -> tuple[str, ...]:
    """Every ``model_type`` some kind loads (registry order)."""
    return tuple(dict.fromkeys(k.model_type for k in KINDS.values()))


def parse_spec(spec: str) -> EncoderSpec:
    """Parse ``kind:location[?key=value&key=value]`` (the kind must be registered).

    >>> parse_spec("clip:openai/clip-vit-base-patch32")
    EncoderSpec(kind='clip', location='openai/clip-vit-base-patch32', options={})
    >>> parse_spec("phi3v:/models/phi3v?num_crops=4&pooling=global").options
    {'num_crops': '4', 'pooling': 'global'}

    Raises:
        ValueError: for an unknown kind, an empty location or a malformed option.
    """
    return split_spec(spec, tuple(KINDS))


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
            and bfloat16, measured: see :mod:`phiclip.precision`), ``float32``, ``bfloat16``,
            ``float16``, or ``int8`` (CPU; the kinds in :data:`INT8_KINDS`: see :mod:`phiclip.quantize`).

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


__all__ = [
    "INT8_KINDS",
    "KINDS",
    "SPEC_KINDS",
    "EncoderKind",
    "ModuleBuilder",
    "check_spec",
    "kinds_for_model_type",
    "known_model_types",
    "load_encoder",
    "parse_spec",
]
