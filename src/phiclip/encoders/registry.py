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
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phiclip import hub
from phiclip.encoders.device import Placement, resolve_placement, warn_if_slow_cpu_dtype
from phiclip.encoders.family_options import DinoOptions, FamilyOptions, Siglip2Options
from phiclip.encoders.options import ContrastiveOptions, Phi3VLMOptions, Phi3VOptions
from phiclip.encoders.spec import EncoderSpec, SpecOptions, split_spec
from phiclip.hub import CheckpointError
from phiclip.models.checkpoint import check_field, load_json_file

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
    #: Other ``model_type`` values this kind loads too (``siglip2``: the fixed-resolution SigLIP 2
    #: checkpoints, saved in SigLIP's layout); the kind found for a kindless spec is the first row
    #: that names a ``model_type`` (:func:`kind_for_location`).
    also_loads: tuple[str, ...] = ()
    #: Whether its encoders embed text (``embed-text``, text queries, zero-shot); ``text_when`` qualifies it
    #: where only some checkpoints of the kind have a text side (:func:`text_kinds`).
    text: bool = False
    text_when: str = ""

    @property
    def model_types(self) -> tuple[str, ...]:
        """Every ``model_type`` this kind loads (its own first)."""
        return (self.model_type, *self.also_loads)

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
                    summary="CLIP through transformers (image and text)", transformers_config=True, text=True),
        EncoderKind("siglip", "siglip", "phiclip.encoders.clip", "SigLIPEncoder", ContrastiveOptions, int8=True,
                    summary="SigLIP through transformers (image and text)", transformers_config=True, text=True),
        EncoderKind("phi3v", "phi3_v", "phiclip.encoders.phi3v", "Phi3VEncoder", Phi3VOptions, int8=True,
                    summary="Phi-3-vision's image path, pooled (images)"),
        EncoderKind("phi3v-lm", "phi3_v", "phiclip.encoders.phi3v_lm", "Phi3VLMEncoder", Phi3VLMOptions, int8=False,
                    summary="Phi-3-vision's image path and language model, pooled (image, text, both)", text=True),
        EncoderKind("open_clip", "open_clip", "phiclip.encoders.open_clip", "OpenCLIPEncoder", ContrastiveOptions,
                    int8=True, summary="open_clip CLIP checkpoints (ViT towers) as transformers CLIP, without open_clip",
                    config_file="open_clip_config.json", text=True),
        EncoderKind("siglip2", "siglip2", "phiclip.encoders.siglip2", "Siglip2Encoder", Siglip2Options, int8=True,
                    summary="SigLIP 2 through transformers, NaFlex and fixed resolution (image and text)",
                    transformers_config=True, also_loads=("siglip",), text=True),
        EncoderKind("metaclip2", "metaclip_2", "phiclip.encoders.metaclip2", "MetaClip2Encoder", FamilyOptions,
                    int8=True, summary="MetaCLIP 2 through transformers (image and text)", transformers_config=True,
                    text=True),
        EncoderKind("aimv2", "aimv2", "phiclip.encoders.aimv2", "Aimv2Encoder", FamilyOptions, int8=True,
                    summary="AIMv2 through transformers (images; LiT checkpoints: image and text)",
                    transformers_config=True, also_loads=("aimv2_vision_model",), text=True, text_when="LiT checkpoints"),
        EncoderKind("dinov2", "dinov2", "phiclip.encoders.dino", "Dinov2Encoder", DinoOptions, int8=True,
                    summary="DINOv2 with or without registers through transformers (images)",
                    transformers_config=True, also_loads=("dinov2_with_registers",)),
        EncoderKind("dinov3", "dinov3_vit", "phiclip.encoders.dino", "Dinov3Encoder", DinoOptions, int8=True,
                    summary="DINOv3 ViT through transformers (images)", transformers_config=True),
    )
}
#: The kinds, in registry order (the prefix of ``kind:location``).
SPEC_KINDS: tuple[str, ...] = tuple(KINDS)
#: Kinds whose encoders run ``precision="int8"`` (on the CPU).
INT8_KINDS: tuple[str, ...] = tuple(k for k, v in KINDS.items() if v.int8)


def text_kinds() -> tuple[str, ...]:
    """The kinds whose encoders embed text, from :data:`KINDS` (``aimv2 (LiT checkpoints)``: only some)."""
    return tuple(f"{k.name} ({k.text_when})" if k.text_when else k.name for k in KINDS.values() if k.text)


def needs_text_message(name: str) -> str:
    """Why an image-only encoder (``name``) cannot embed texts, naming the kinds that can."""
    return f"{name} embeds images only; embed-text needs a model with a text side: {', '.join(text_kinds())}"


def kinds_for_model_type(model_type: str) -> tuple[EncoderKind, ...]:
    """The kinds that load checkpoints of ``model_type`` (registry order; empty: phiclip loads none)."""
    return tuple(k for k in KINDS.values() if model_type in k.model_types)


def known_model_types() -> tuple[str, ...]:
    """Every ``model_type`` some kind loads (registry order)."""
    return tuple(dict.fromkeys(t for k in KINDS.values() for t in k.model_types))


def kind_for_location(location: str | Path, *, revision: str | None = None) -> str:
    """The kind that loads the checkpoint at ``location`` (a local folder or a hub id), from its
    ``config.json``'s ``model_type`` (the first row of :data:`KINDS` that loads it: ``siglip`` for a
    SigLIP-layout checkpoint, ``phi3v`` for Phi-3-vision), or from a config file that only one kind
    has (``open_clip_config.json``).

    Raises:
        CheckpointError: no config file, or a ``model_type`` no kind loads (naming the known ones).
    """
    loc = hub.resolve_location(location)
    config_path = hub.resolve_file(loc, "config.json", required=False, revision=revision)
    if config_path is None:
        for kind in KINDS.values():
            if kind.config_file != "config.json" and hub.resolve_file(loc, kind.config_file, required=False,
                                                                      revision=revision) is not None:
                return kind.name
        raise CheckpointError(f"{loc}: no config.json, so the kind cannot be found; write the spec as "
                              f"'KIND:{loc}' with KIND one of {', '.join(KINDS)}")
    config = check_field(load_json_file(config_path, "the checkpoint's config is damaged"), "(the whole file)",
                         config_path, kind="dict")
    model_type = config.get("model_type")
    kinds = kinds_for_model_type(model_type) if isinstance(model_type, str) else ()
    if not kinds:
        raise CheckpointError(f"{config_path}: model_type {model_type!r} is not one phiclip loads "
                              f"({', '.join(known_model_types())}); phiclip never runs code from a checkpoint")
    return kinds[0].name


def resolve_spec(spec: str | EncoderSpec) -> EncoderSpec:
    """:func:`parse_spec`, and for a spec without a kind (``/models/dinov2``, ``google/siglip2-base-patch16-naflex``,
    ``DIR?pool=mean``) the kind found from the checkpoint's ``config.json`` (:func:`kind_for_location`).
    A spec whose text before the first ``:`` is a known kind is read as ``kind:location``; one whose text
    before it looks like a kind but is none (``clp:/models/x``), and that names no existing path, is refused
    as an unknown kind.

    Raises:
        ValueError: a malformed spec; CheckpointError: a kindless spec whose checkpoint names no known kind.
    """
    if isinstance(spec, EncoderSpec):
        return spec
    head = spec.split(":", 1)[0].strip().lower() if isinstance(spec, str) and ":" in spec else None
    if head in KINDS or not isinstance(spec, str) or not spec.strip():
        return parse_spec(spec)
    location = spec.partition("?")[0].strip()
    if head is not None and re.fullmatch(r"[a-z][a-z0-9_.-]+", head) and not Path(location).expanduser().exists():
        return parse_spec(spec)  # 'clp:/models/x': a mistyped kind, named as such (no hub id or folder has a ':')
    return parse_spec(f"{kind_for_location(location)}:{spec.strip()}")


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
        spec: ``kind:location[?options]``; location is a hub id or a local directory. Without
            ``kind:``, the kind is found from the checkpoint's ``config.json`` (:func:`resolve_spec`).
        device: ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda``, ``cuda:1``...
        dtype: the compute precision: ``auto`` (bfloat16 on CUDA; on the CPU the faster of float32
            and bfloat16, measured: see :mod:`phiclip.cpu.precision`), ``float32``, ``bfloat16``,
            ``float16``, or ``int8`` (CPU; the kinds in :data:`INT8_KINDS`: see :mod:`phiclip.cpu.int8`).

    Raises:
        ValueError: a bad spec, option, device or precision (before anything loads), or a
            checkpoint that cannot be loaded (:class:`~phiclip.hub.CheckpointError`).
    """
    parsed = resolve_spec(spec)
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
    "kind_for_location",
    "kinds_for_model_type",
    "known_model_types",
    "load_encoder",
    "needs_text_message",
    "parse_spec",
    "resolve_spec",
    "text_kinds",
]
