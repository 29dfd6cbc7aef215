"""The options each encoder kind reads from its spec (``clip:DIR?normalize=false&max_batch=64``),
as dataclasses with their defaults and meanings, declared once. Torch-free."""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from phiclip.cpu.calibration import DEFAULT_CALIBRATION_IMAGES, MIN_CALIBRATION_IMAGES
from phiclip.encoders.spec import (
    EncoderSpec,
    SpecOptions,
    bool_option,
    choice_option,
    int_option,
    option_choice,
    runtime_option,
)
from phiclip.phi3v.config import MAX_NUM_CROPS
from phiclip.phi3v.prompts import DEFAULT_PRESET, POOLINGS, PRESETS, check_template, default_preset

#: Most images (or texts) per CLIP / SigLIP model call, by default.
DEFAULT_MAX_BATCH = 256



def input_option(help: str) -> Any:
    """A field naming an input (a path, a glob or ``hf:NAME``; ``&``, ``,`` and ``%`` percent-encoded
    in a spec). Only its form is checked here: whether it exists is checked where it is used (a
    spec saved in a manifest is read again elsewhere, where it may not be needed)."""

    def parse(spec: EncoderSpec, key: str) -> str | None:
        raw = spec.options.get(key)
        if raw is None:
            return None
        value = urllib.parse.unquote(raw).strip()
        if not value:
            raise ValueError(f"encoder spec {str(spec)!r}: option {key} is empty; give a folder, a glob, a list of "
                             "paths, a table or hf:NAME")
        return value

    return field(default=None, metadata={"parse": parse, "help": help})


def calibration_option(what: str = "") -> Any:
    """The ``calibration=`` field: the images static int8 through OpenVINO is calibrated on."""
    return input_option(
        "images like the ones you embed (a folder, a glob, a list of paths, a table or hf:NAME): int8 through "
        f"OpenVINO quantises statically, calibrated on {what or 'them'} (runtime=openvino or auto, precision int8)")


def calibration_images_option() -> Any:
    """The ``calibration_images=`` field: how many images ``calibration=`` gives."""
    return int_option(
        DEFAULT_CALIBRATION_IMAGES, f"integer >= {MIN_CALIBRATION_IMAGES}: images taken from calibration= "
        f"(default {DEFAULT_CALIBRATION_IMAGES}, spread evenly over it)", minimum=MIN_CALIBRATION_IMAGES)


@dataclass(frozen=True)
class ContrastiveOptions(SpecOptions):
    """``clip:`` and ``siglip:`` options."""

    normalize: bool = bool_option(True, "true|false: L2-normalise the vectors (default true)")
    max_batch: int = int_option(DEFAULT_MAX_BATCH, "integer >= 1: most inputs per model call (default 256)")
    fast: bool = bool_option(
        True, "true|false: phiclip's CLIP image tower (default true; false: transformers' get_image_features)")
    runtime: str = runtime_option(
        "auto|torch|openvino|onnxruntime: what runs the image and text towers on the CPU (default auto, or "
        "$PHICLIP_RUNTIME: torch and each installed runtime measured once on this CPU, the fastest within the "
        "precision's bound kept; OpenVINO's int8 needs calibration=; phiclip[cpu-runtimes])")
    calibration: str | None = calibration_option()
    calibration_images: int = calibration_images_option()


@dataclass(frozen=True)
class Phi3VOptions(SpecOptions):
    """``phi3v:`` options."""

    num_crops: int | None = int_option(
        None, f"integer from 1 to {MAX_NUM_CROPS}: crops per image (default: the checkpoint's preprocessor_config.json)",
        maximum=MAX_NUM_CROPS, hint="the released checkpoints use 16 (Phi-3-vision) or 4 (Phi-3.5-vision)")
    pooling: str = choice_option(
        "mean", ("mean", "global"),
        "mean|global: mean of the projected image tokens (default), or of the tower's global-view patches")
    normalize: bool = bool_option(True, "true|false: L2-normalise the vectors (default true)")
    max_crops: int | None = int_option(None, "integer >= 1: crops per tower call (default: 4 on the CPU, 64 on GPUs)")
    runtime: str = runtime_option(
        "auto|torch|openvino|onnxruntime: what runs the CLIP tower on the CPU (default auto, or $PHICLIP_RUNTIME: "
        "torch and each installed runtime measured once on this CPU on a tower call's crops, the fastest within the "
        "precision's bound kept; the HD crops, token merge and projection run on torch; OpenVINO's int8 needs "
        "calibration=; phiclip[cpu-runtimes])")
    calibration: str | None = calibration_option("their crops")
    calibration_images: int = calibration_images_option()


def _preset_option(help: str) -> Any:
    """The ``preset`` field: one of :data:`~phiclip.phi3v.prompts.PRESETS`; left out, the location's
    own (:func:`~phiclip.phi3v.prompts.default_preset`)."""

    def parse(spec: EncoderSpec, key: str) -> str:
        raw = spec.options.get(key)
        if raw is None or not raw.strip():
            return default_preset(spec.location)
        if raw.strip() not in PRESETS:
            raise ValueError(f"encoder spec {str(spec)!r}: preset {raw!r} is not one of {', '.join(PRESETS)}")
        return raw.strip()

    return field(default=DEFAULT_PRESET, metadata={"parse": parse, "help": help})


def _prompt_option(kind: str, help: str) -> Any:
    """A prompt template field (``None``: the preset's), checked by
    :func:`~phiclip.phi3v.prompts.check_template`. In a spec a newline is written ``\\n`` and
    ``&``, ``,``, ``%`` percent-encoded (``%26``, ``%2C``, ``%25``)."""

    def parse(spec: EncoderSpec, key: str) -> str | None:
        raw = spec.options.get(key)
        if raw is None:
            return None
        template = urllib.parse.unquote(raw).replace("\\n", "\n")
        try:
            check_template(kind, template)
        except ValueError as e:
            raise ValueError(f"encoder spec {str(spec)!r}: option {key}: {e}") from None
        return template

    return field(default=None, metadata={"parse": parse, "help": help})


def _text_option(help: str) -> Any:
    """A free-text field (``None`` when left out or empty)."""

    def parse(spec: EncoderSpec, key: str) -> str | None:
        raw = (spec.options.get(key) or "").strip()
        return raw or None

    return field(default=None, metadata={"parse": parse, "help": help})


@dataclass(frozen=True)
class Phi3VLMOptions(SpecOptions):
    """``phi3v-lm:`` options. ``None``: the preset's value (``num_crops``: then the checkpoint's)."""

    preset: str = _preset_option(
        f"{'|'.join(PRESETS)}: prompts, pooling, num_crops and max_length of one embedding method "
        "(default: vlm2vec for TIGER-Lab/VLM2Vec-Full, dse for Tevatron/dse-phi3-docmatix-*, else e5v)")
    image_prompt: str | None = _prompt_option(
        "image", "template with <|image_1|> for images (default: the preset's; newline as \\n, & as %26, , as %2C)")
    text_prompt: str | None = _prompt_option("text", "template with {text} for texts (default: the preset's)")
    mixed_prompt: str | None = _prompt_option(
        "mixed", "template with <|image_1|> and {text} for image + text inputs (default: the preset's)")
    pooling: str | None = field(default=None, metadata={
        "parse": lambda spec, key: option_choice(spec, key, None, POOLINGS),  # type: ignore[arg-type]
        "help": "last|mean: the state at the last real token, or the mean over real tokens (default: the preset's)"})
    normalize: bool = bool_option(True, "true|false: L2-normalise the vectors (default true)")
    num_crops: int | None = int_option(
        None, f"integer from 1 to {MAX_NUM_CROPS}: crops per image (default: the preset's, else the checkpoint's)",
        maximum=MAX_NUM_CROPS, hint="the released checkpoints use 16 (Phi-3-vision) or 4 (Phi-3.5-vision)")
    max_length: int | None = int_option(
        None, "integer >= 1: text prompts cut to this many tokens (default: the preset's; prompts with images never are)")
    max_tokens: int | None = int_option(
        None, "integer >= 1: padded prompt tokens per language-model call (default 4096 on the CPU, 16384 on GPUs)")
    max_crops: int | None = int_option(None, "integer >= 1: crops per tower call (default: 4 on the CPU, 64 on GPUs)")
    revision: str | None = _text_option("a hub revision (branch, tag or commit) for a hub id (default: main)")


__all__ = ["DEFAULT_MAX_BATCH", "ContrastiveOptions", "Phi3VLMOptions", "Phi3VOptions", "calibration_images_option", "calibration_option", "input_option"]
