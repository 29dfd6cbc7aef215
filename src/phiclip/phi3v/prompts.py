"""Prompt templates of the Phi-3-vision embedding methods (the ``phi3v-lm`` encoder's presets), and
the checks a template must pass. Torch-free: spec options are checked with these before anything loads.

A template for images holds ``<|image_1|>`` (the released processor's placeholder) where the image
goes; a template for texts holds ``{text}``; a template for image + text inputs holds both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: The released processor's placeholder pattern: ``<|image_1|>``, ``<|image_2|>``, ...
IMAGE_TAG = re.compile(r"<\|image_(\d+)\|>")
#: Where a text goes in a template.
TEXT_SLOT = "{text}"
#: Where the image goes in a template.
IMAGE_SLOT = "<|image_1|>"
#: How a prompt's last hidden state becomes one vector.
POOLINGS = ("last", "mean")
#: The uses of a template.
TEMPLATE_KINDS = ("image", "text", "mixed")


def image_tags(prompt: str) -> list[int]:
    """The image numbers of the ``<|image_k|>`` placeholders of ``prompt``, in order of appearance."""
    return [int(k) for k in IMAGE_TAG.findall(prompt)]


@dataclass(frozen=True)
class Phi3VLMPreset:
    """How one embedding method prompts and pools Phi-3-vision (see the README for the sources)."""

    name: str
    image_prompt: str
    text_prompt: str
    mixed_prompt: str | None
    pooling: str = "last"
    num_crops: int | None = None
    max_length: int | None = None
    source: str = ""


#: The presets. E5-V's one-word-summary prompts in Phi-3's chat format (E5-V: "<image>\nSummary above
#: image in one word:", "<sent>\nSummary above sentence in one word:", last token); VLM2Vec-Full's
#: instructions for image targets, caption queries and image + question queries (last token, L2,
#: num_crops 4, max_len 256 in its evaluation commands); DSE's passage and query prompts (``eos``,
#: i.e. last-token, pooling, L2, query_max_len 128).
PRESETS: dict[str, Phi3VLMPreset] = {
    "e5v": Phi3VLMPreset(
        name="e5v",
        image_prompt="<|user|>\n<|image_1|>\nSummary above image in one word:<|end|>\n<|assistant|>\n",
        text_prompt="<|user|>\n{text}\nSummary above sentence in one word:<|end|>\n<|assistant|>\n",
        mixed_prompt="<|user|>\n<|image_1|>\n{text}\nSummary above image in one word:<|end|>\n<|assistant|>\n",
        source="E5-V (arXiv:2407.12580) prompts, as in vLLM's examples/offline_inference/vision_language_embedding.py, in Phi-3's chat format",
    ),
    "vlm2vec": Phi3VLMPreset(
        name="vlm2vec",
        image_prompt="<|image_1|> Represent the given image.",
        text_prompt="Find me an everyday image that matches the given caption: {text}",
        mixed_prompt="<|image_1|> Represent the given image with the following question: {text}",
        num_crops=4,
        max_length=256,
        source="TIGER-AI-Lab/VLM2Vec README (v1: usage and eval.py commands); vLLM vision_language_embedding.py run_vlm2vec",
    ),
    "dse": Phi3VLMPreset(
        name="dse",
        image_prompt="<|image_1|>\nWhat is shown in this image?</s>",
        text_prompt="query: {text}</s>",
        mixed_prompt=None,
        max_length=128,
        source="texttron/tevatron examples/dse (collator.py prompts, dse.py eos pooling, README encode commands)",
    ),
}
#: Hub ids whose own preset is the default (lower case).
PRESET_FOR_HUB_ID = {
    "tiger-lab/vlm2vec-full": "vlm2vec",
    "tevatron/dse-phi3-docmatix-v1": "dse",
    "tevatron/dse-phi3-docmatix-v2": "dse",
}
DEFAULT_PRESET = "e5v"


def default_preset(location: str) -> str:
    """The preset a location gets when the spec names none."""
    return PRESET_FOR_HUB_ID.get(str(location).strip().lower(), DEFAULT_PRESET)


def check_template(kind: str, template: str | None) -> None:
    """A prompt template fits its use: ``image`` has ``<|image_1|>`` once and no ``{text}``;
    ``text`` has ``{text}`` and no image placeholder; ``mixed`` has both (``None`` allowed:
    mixed inputs are then refused). Raises ``ValueError`` naming the template."""
    if kind not in TEMPLATE_KINDS:
        raise ValueError(f"template kind {kind!r} is not one of {', '.join(TEMPLATE_KINDS)}")
    if template is None and kind == "mixed":
        return
    if not isinstance(template, str) or not template:
        raise ValueError(f"the {kind} prompt must be a non-empty string, got {template!r}")
    tags = image_tags(template)
    want_image, want_text = kind in ("image", "mixed"), kind in ("text", "mixed")
    if want_image and tags != [1]:
        raise ValueError(f"the {kind} prompt {template!r} must contain {IMAGE_SLOT} exactly once (and no other image placeholder)")
    if not want_image and tags:
        raise ValueError(f"the {kind} prompt {template!r} must not contain an image placeholder")
    if want_text and TEXT_SLOT not in template:
        raise ValueError(f"the {kind} prompt {template!r} must contain {TEXT_SLOT} where the text goes")
    if not want_text and TEXT_SLOT in template:
        raise ValueError(f"the {kind} prompt {template!r} must not contain {TEXT_SLOT}")


__all__ = [
    "DEFAULT_PRESET",
    "IMAGE_SLOT",
    "IMAGE_TAG",
    "POOLINGS",
    "PRESETS",
    "PRESET_FOR_HUB_ID",
    "TEMPLATE_KINDS",
    "TEXT_SLOT",
    "Phi3VLMPreset",
    "check_template",
    "default_preset",
    "image_tags",
]
