"""The Phi-3-vision language-model encoder: images, texts and image + instruction inputs embedded
by the whole model (image path + language model), pooled from its last hidden state.

Spec: ``phi3v-lm:<hub id or directory>[?preset=e5v&num_crops=4&pooling=last&normalize=true&...]``
(:class:`~phiclip.encoders.options.Phi3VLMOptions`, checked when the spec is parsed).

Options:

- ``preset``: ``e5v``, ``vlm2vec`` or ``dse`` (:data:`~phiclip.phi3v.prompts.PRESETS`): prompt
  templates, pooling, ``num_crops`` and ``max_length`` as the method's authors use them. Default:
  ``vlm2vec`` for ``TIGER-Lab/VLM2Vec-Full``, ``dse`` for ``Tevatron/dse-phi3-docmatix-v1``/``-v2``,
  else ``e5v`` (a one-word-summary prompt pair that needs no fine-tuning). Other options override its fields.
- ``image_prompt`` (with ``<|image_1|>``), ``text_prompt`` (with ``{text}``), ``mixed_prompt``
  (with both, for :meth:`Phi3VLMEncoder.encode_mixed`). In a spec, write a newline as ``\\n`` and
  ``&``, ``,`` or ``%`` percent-encoded (``%26``, ``%2C``, ``%25``).
- ``pooling``: ``last`` (the state at the last real token) or ``mean`` (over real tokens).
- ``normalize`` (default true), ``num_crops`` (default: the preset's, else the checkpoint's),
  ``max_length`` (text prompts are cut to this many tokens; prompts with images never are, as in
  the released processor).
- ``max_tokens``: padded prompt tokens per language-model call (default 16384 on GPUs, 4096 on
  the CPU); ``max_crops``: crops per tower call; ``revision``: a hub revision.

Where the files come from follows :func:`phiclip.hub.resolve_location`; device and precision are
the registry's :class:`~phiclip.encoders.device.Placement` (float32, bfloat16 or float16).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from phiclip.checkpoints import open_checkpoint
from phiclip.encoders.base import EncodedBatch, Encoder, EncoderDescription, count_parameters, dtype_name
from phiclip.encoders.device import Placement
from phiclip.encoders.options import Phi3VLMOptions
from phiclip.encoders.spec import EncoderSpec
from phiclip.hub import CheckpointError
from phiclip.images import ImageInput, load_image
from phiclip.models.checkpoint import fingerprint_module
from phiclip.phi3v.language import (
    PADDING_SIDES,
    POOLINGS,
    Phi3VEmbeddingModel,
    PromptTokenizer,
    load_tokenizer,
    pad_prompts,
)
from phiclip.phi3v.processing import Phi3VImageProcessor, num_image_tokens
from phiclip.phi3v.prompts import (
    DEFAULT_PRESET,
    IMAGE_SLOT,
    PRESET_FOR_HUB_ID,
    PRESETS,
    TEXT_SLOT,
    Phi3VLMPreset,
    check_template,
    default_preset,
)

#: Compute precisions the language model runs in.
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

class Phi3VLMEncoder(Encoder):
    """Phi-3-vision (image path + transformers' ``Phi3Model``) as an image and text embedding model.

    Args:
        model: a :class:`~phiclip.phi3v.language.Phi3VEmbeddingModel`.
        processor: the :class:`~phiclip.phi3v.Phi3VImageProcessor` (its ``num_crops`` decides the crops).
        tokenizer: the checkpoint's tokenizer.
        options: the spec's options (:class:`~phiclip.encoders.options.Phi3VLMOptions`): a preset,
            and what overrides it (``num_crops`` and ``max_crops`` are the processor's and model's).
        padding_side: where the prompts of a batch are padded (the vectors do not depend on it).
        precision: what runs and why (:meth:`~phiclip.encoders.device.Placement.record`).
    """

    kind = "phi3v-lm"
    modalities = frozenset({"image", "text"})

    def __init__(
        self,
        model: Any,
        processor: Any,
        tokenizer: Any,
        *,
        name: str,
        options: Phi3VLMOptions | None = None,
        padding_side: str = "right",
        precision: dict[str, Any] | None = None,
    ) -> None:
        options = options or Phi3VLMOptions()
        if options.preset not in PRESETS:
            raise ValueError(f"preset {options.preset!r} is not one of {', '.join(PRESETS)}")
        base = PRESETS[options.preset]
        self.options = options
        self.preset: Phi3VLMPreset = base
        self.image_prompt = options.image_prompt if options.image_prompt is not None else base.image_prompt
        self.text_prompt = options.text_prompt if options.text_prompt is not None else base.text_prompt
        self.mixed_prompt = options.mixed_prompt if options.mixed_prompt is not None else base.mixed_prompt
        for kind, template in (("image", self.image_prompt), ("text", self.text_prompt), ("mixed", self.mixed_prompt)):
            check_template(kind, template)
        self.pooling = options.pooling or base.pooling
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if padding_side not in PADDING_SIDES:
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if not getattr(model.image_embedding, "use_hd_transform", False):
            raise ValueError("the phi3v-lm encoder needs a Phi-3-vision checkpoint with the HD transform (as all released ones)")
        self.model = model
        self.processor = processor
        self.tokenizer = tokenizer
        self.name = name
        self.normalize = bool(options.normalize)
        self.max_length = options.max_length if options.max_length is not None else base.max_length
        self.prompts = PromptTokenizer(tokenizer, self.max_length)
        self.padding_side = padding_side
        self.dim = int(model.hidden_size)
        self.device, self.dtype = model.device, model.dtype
        #: What runs and why (``phiclip.cpu.precision``), as the other encoders record it.
        self.precision = dict(precision or {"requested": dtype_name(self.dtype), "dtype": dtype_name(self.dtype)})
        max_tokens = options.max_tokens
        if max_tokens is not None and int(max_tokens) < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        self.max_tokens = int(max_tokens) if max_tokens is not None else (4096 if self.device.type == "cpu" else 16384)
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(tokenizer, "eos_token_id", None)
        self.pad_id = int(pad) if pad is not None else 0
        self.max_pixels = getattr(processor, "max_pixels", self.max_pixels)
        # A model built in memory (not loaded from a checkpoint) has no fingerprint yet.
        self.weights_fingerprint: str = getattr(model, "weights_fingerprint", None) or fingerprint_module(model)
        # The image prompt is the same for every image: tokenise its text once (workers then only count).
        self._image_chunks, self._image_tags = self.prompts.split(self.image_prompt, 1)

    def set_max_pixels(self, max_pixels: int | None) -> None:
        """The pixel budget of an image's HD canvas (and of decoding in the convenience methods)."""
        super().set_max_pixels(max_pixels)
        self.processor.max_pixels = max_pixels

    @classmethod
    def build(cls, spec: EncoderSpec, options: Phi3VLMOptions, placement: Placement) -> Phi3VLMEncoder:
        """Load the checkpoint a spec names: the builder of the registry (:func:`phiclip.encoders.load_encoder`).

        The checkpoint is opened once (:func:`phiclip.checkpoints.open_checkpoint`: located, pinned
        to one commit, vetted), so a hub id that cannot be reached (and is not cached) fails at once;
        the processor config, the tokenizer and the weights all come from it.

        Raises:
            ValueError: a precision the language model does not run in (int8).
            CheckpointError: a bad location, an unreachable hub id, a missing tokenizer or tensors
                that do not fit the model.
        """
        if placement.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"encoder spec {str(spec)!r}: precision {placement.precision} is not available for "
                             "phi3v-lm; use float32 or bfloat16 (auto: bfloat16 on GPUs)")
        checkpoint = open_checkpoint(spec.location, options.revision, kind=cls.kind)
        num_crops = options.num_crops or PRESETS[options.preset].num_crops
        try:
            processor = Phi3VImageProcessor.from_pretrained(checkpoint, **({"num_crops": num_crops} if num_crops else {}))
        except CheckpointError:
            raise
        except ValueError as e:
            raise ValueError(f"encoder spec {str(spec)!r}: {e}") from None
        tokenizer = load_tokenizer(checkpoint)
        model = Phi3VEmbeddingModel.from_pretrained(checkpoint, torch_dtype=placement.dtype, device=placement.device,
                                                    max_crops_per_batch=options.max_crops)
        return cls(model, processor, tokenizer, name=str(spec), options=options, precision=placement.record())

    # --- items: one prompt with its images ------------------------------------------------------
    def _image_item(self, image: Any) -> tuple[torch.Tensor, tuple[int, int], int]:
        crops, (h, w) = self.processor.preprocess_image(image)
        return crops, (h, w), int(self.model.image_embedding.num_tokens(h, w))

    def prompt_item(self, prompt: str, images: Sequence[Any] = ()) -> dict[str, Any]:
        """One prompt with its (RGB PIL) images, ``<|image_k|>`` for ``images[k-1]`` -> an item
        for :meth:`collate` (ids built exactly as the released processor builds them)."""
        prepared = [self._image_item(im) for im in images]
        ids = self.prompts(prompt, [t for _, _, t in prepared])
        return {"input_ids": torch.tensor(ids, dtype=torch.long), "crops": [c for c, _, _ in prepared],
                "image_sizes": [s for _, s, _ in prepared]}

    def preprocess(self, image: Any) -> dict[str, Any]:
        """RGB PIL image -> the image prompt with its crops: ``{"input_ids", "crops", "image_sizes"}``."""
        crops, size, tokens = self._image_item(image)
        ids = self.prompts.join(self._image_chunks, self._image_tags, [tokens])
        return {"input_ids": torch.tensor(ids, dtype=torch.long), "crops": [crops], "image_sizes": [size]}

    def item_cost(self, item: dict[str, Any]) -> int:
        """Prompt tokens of the item (its image tokens included): what the language model runs on."""
        return int(item["input_ids"].numel())

    def item_crops(self, item: dict[str, Any]) -> int:
        """Tower crops of the item's images (``item_cost`` counts prompt tokens instead)."""
        return sum(int(c.shape[0]) for c in item["crops"])

    def typical_item_cost(self) -> int:
        """Prompt tokens of a 640x480 photo."""
        return num_image_tokens(640, 480, self.processor.num_crops) + sum(len(c) for c in self._image_chunks)

    def collate(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Items stay apart: :meth:`encode_batch` pads them in groups bounded by ``max_tokens``."""
        return {"rows": list(items)}

    def _groups(self, rows: Sequence[dict[str, Any]]) -> list[list[int]]:
        """Row indices, shortest first, cut into groups whose padded size stays within ``max_tokens``
        (a prompt longer than that forms its own group)."""
        order = sorted(range(len(rows)), key=lambda i: rows[i]["input_ids"].numel())
        groups: list[list[int]] = []
        for i in order:
            length = rows[i]["input_ids"].numel()
            if groups and (len(groups[-1]) + 1) * length <= self.max_tokens:
                groups[-1].append(i)
            else:
                groups.append([i])
        return groups

    @torch.inference_mode()
    def encode_batch(self, batch: dict[str, Any], *, with_tokens: bool = False) -> EncodedBatch:
        if with_tokens:
            raise ValueError(f"{self.name} makes one pooled vector per input, no token sequences; "
                             "drop --tokens, or use a phi3v: spec for Phi-3-vision's image tokens")
        rows = batch["rows"]
        out = torch.empty((len(rows), self.dim), dtype=torch.float32)
        for group in self._groups(rows):
            part = [rows[i] for i in group]
            ids, mask = pad_prompts([r["input_ids"] for r in part], pad_id=self.pad_id, side=self.padding_side)
            crops = [c for r in part for c in r["crops"]]
            sizes = torch.tensor([list(s) for r in part for s in r["image_sizes"]], dtype=torch.long).reshape(-1, 2)
            vecs = self.model.embed(ids, mask, crops, sizes, [len(r["crops"]) for r in part],
                                    pooling=self.pooling, normalize=self.normalize)
            out[group] = vecs.float().cpu()
        return EncodedBatch(embeddings=out.numpy())

    # --- convenience ----------------------------------------------------------------------------
    def _encode_items(self, items: Sequence[dict[str, Any]], batch_size: int) -> np.ndarray:
        chunks = [self.encode_batch(self.collate(items[a : a + batch_size])).embeddings
                  for a in range(0, len(items), max(1, batch_size))]
        if not chunks:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(chunks, axis=0).astype(np.float32, copy=False)

    def _load(self, image: ImageInput) -> Any:
        return load_image(image, keep_alpha=self.keeps_alpha, max_pixels=self.max_pixels)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Texts -> (n, dim) float32, each in the text prompt (``{text}`` replaced)."""
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise ValueError(f"texts must be strings; item {bad[0]} is {type(texts[bad[0]]).__name__}")
        items = [self.prompt_item(self.text_prompt.replace(TEXT_SLOT, t)) for t in texts]
        return self._encode_items(items, batch_size)

    def encode_mixed(self, images: Sequence[ImageInput], texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Image + instruction pairs -> (n, dim) float32, each in the mixed prompt (an image query
        with a question, VLM2Vec's image + text -> target tasks)."""
        if self.mixed_prompt is None:
            raise ValueError(f"{self.name}: the {self.preset.name} preset has no prompt for image + text inputs; "
                             "give one with mixed_prompt=... (with <|image_1|> and {text})")
        if len(images) != len(texts):
            raise ValueError(f"encode_mixed needs one text per image, got {len(images)} images and {len(texts)} texts")
        items = [self.prompt_item(self.mixed_prompt.replace(TEXT_SLOT, t), [self._load(im)]) for im, t in zip(images, texts)]
        return self._encode_items(items, batch_size)

    def encode_prompts(self, prompts: Sequence[str], images: Sequence[Sequence[ImageInput]] | None = None,
                       batch_size: int = 32) -> np.ndarray:
        """Raw prompts -> (n, dim) float32: ``images[i]`` are prompt ``i``'s images for its
        ``<|image_1|>``, ``<|image_2|>``, ... placeholders (no template is applied)."""
        images = images if images is not None else [()] * len(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists; give one (possibly empty) list per prompt")
        items = [self.prompt_item(p, [self._load(im) for im in ims]) for p, ims in zip(prompts, images)]
        return self._encode_items(items, batch_size)

    def tokens_per_image(self, width: int, height: int) -> int:
        """Image tokens an image of this size becomes in the prompt, at this encoder's num_crops."""
        return num_image_tokens(width, height, self.processor.num_crops)

    def description(self) -> EncoderDescription:
        """Spec, dim, precision, weights fingerprint; ``options``: the prompts, pooling and lengths in
        use (preset defaults filled in); ``details``: the model classes, the commit the weights came
        from (None: a local folder), attention, tokenizer."""
        lm = self.model.language_model
        return self.described(
            parameters=count_parameters(self.model),  # image path + language model: both make every vector
            preprocessing=self.processor.to_dict(),
            options={
                "preset": self.preset.name,
                "image_prompt": self.image_prompt,
                "text_prompt": self.text_prompt,
                "mixed_prompt": self.mixed_prompt,
                "pooling": self.pooling,
                "normalize": self.normalize,
                "num_crops": self.processor.num_crops,
                "max_length": self.max_length,
            },
            details={
                "model_class": f"{type(self.model.image_embedding).__name__} + transformers.{type(lm).__name__}",
                "revision": getattr(self.model, "revision", None),
                "preset_source": self.preset.source,
                "attn_implementation": getattr(lm.config, "_attn_implementation", None),
                "language_model": {k: getattr(lm.config, k, None) for k in
                                   ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size")},
                "tokenizer": {"class": type(self.tokenizer).__name__, "size": len(self.tokenizer),
                              "bos_token": getattr(self.tokenizer, "bos_token", None)},
            },
        )


__all__ = ["DEFAULT_PRESET", "IMAGE_SLOT", "PRESETS", "PRESET_FOR_HUB_ID", "TEXT_SLOT", "Phi3VLMEncoder", "Phi3VLMPreset",
           "check_template", "default_preset"]
