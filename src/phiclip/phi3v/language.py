"""Phi-3-vision's language model as an embedding model: prompts, the merge of image tokens, the
language model (transformers' own ``Phi3Model``) and pooling.

The chain, for a batch of prompts such as ``"<|user|>\\n<|image_1|>\\nWhat is shown?<|end|>"``:

1. :class:`PromptTokenizer` turns each prompt into ids exactly as the released ``Phi3VProcessor``
   does: the text between ``<|image_k|>`` placeholders is tokenised chunk by chunk with the
   checkpoint's tokenizer (its own special-token settings, so a BOS-adding tokenizer puts a BOS at
   the start of every chunk, as the released processor does), and each placeholder becomes
   ``num_img_tokens`` copies of the id ``-k``. A prompt without images is tokenised whole (and
   truncated to ``max_length`` when one is set), as the processor does for text alone.
2. :func:`pad_prompts` pads the prompts of a batch to one length (left or right) with an
   attention mask.
3. :class:`Phi3VEmbeddingModel` computes the image tokens with
   :class:`~phiclip.phi3v.Phi3VImageEmbedding`, merges them into the text embeddings (positions
   ``-k`` of a row get that row's image ``k``), runs ``Phi3Model`` on ``inputs_embeds`` with the
   mask and mask-aware position ids (so a padded prompt gives the same states as the prompt alone),
   and pools the last hidden state (:func:`pool_hidden_states`: the last real token, or the mean
   over real tokens).

Loading reads ``model.layers.*``, ``model.norm.weight`` and the text embedding
(``model.embed_tokens.weight``, or ``model.vision_embed_tokens.wte.weight`` where a fine-tuned
checkpoint stored it under that name) from the (sharded) safetensors; ``lm_head`` is never read.
Never pickle, never remote code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from phiclip.checkpoints import Checkpoint, open_checkpoint
from phiclip.hub import CheckpointError, Location, resolve_file, resolve_location
from phiclip.models.ops import l2_normalize, mean_pool
from phiclip.phi3v.modeling import Phi3VImageEmbedding
from phiclip.phi3v.prompts import IMAGE_TAG, POOLINGS, image_tags
from phiclip.phi3v.weights import TEXT_EMBED_KEY, VISION_WTE_KEY

#: Where fine-tuned checkpoints (VLM2Vec, ...) store the text embedding shared with the image path.
WTE_KEY = VISION_WTE_KEY
LAYER_PREFIX = "model.layers."
NORM_KEY = "model.norm.weight"
#: Files of which a checkpoint's tokenizer needs at least one.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
PADDING_SIDES = ("left", "right")

#: config.json fields of a Phi-3-vision checkpoint that describe its language model.
_LM_CONFIG_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "original_max_position_embeddings",
    "rms_norm_eps", "rope_theta", "sliding_window", "bos_token_id", "eos_token_id", "pad_token_id",
    "attention_dropout", "resid_pdrop", "embd_pdrop",
)
_REQUIRED_LM_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


class PromptError(ValueError):
    """A prompt and its images do not fit together (placeholders, counts)."""


# ==============================================================================================
# Prompts
# ==============================================================================================
def check_image_tags(prompt: str, num_images: int) -> list[int]:
    """The placeholders of ``prompt`` if they fit ``num_images`` images: each of ``<|image_1|>`` ..
    ``<|image_n|>`` exactly once (the released processor requires numbers 1..n without gaps and as
    many images as numbers). Raises :class:`PromptError` naming the prompt otherwise."""
    tags = image_tags(prompt)
    short = prompt if len(prompt) <= 120 else prompt[:117] + "..."
    if not tags and num_images:
        raise PromptError(
            f"prompt {short!r} has no <|image_k|> placeholder but {num_images} image(s) were given; "
            "put <|image_1|> where the image goes"
        )
    if sorted(set(tags)) != list(range(1, len(set(tags)) + 1)):
        raise PromptError(
            f"prompt {short!r}: image placeholders must be numbered <|image_1|>, <|image_2|>, ... without gaps; "
            f"found {', '.join(f'<|image_{k}|>' for k in tags)}"
        )
    if len(set(tags)) != num_images:
        raise PromptError(
            f"prompt {short!r} has {len(set(tags))} image placeholder(s) but {num_images} image(s) were given; "
            "give one image per <|image_k|>"
        )
    if len(tags) != len(set(tags)):
        raise PromptError(f"prompt {short!r} repeats an image placeholder; each <|image_k|> may appear once")
    return tags


class PromptTokenizer:
    """Prompts -> ids the way the released ``Phi3VProcessor`` builds them.

    Args:
        tokenizer: the checkpoint's tokenizer (a transformers tokenizer; called as
            ``tokenizer(text).input_ids``).
        max_length: truncate prompts without images to this many tokens (the released processor
            applies ``max_length`` only there: it never cuts a prompt with images).
    """

    def __init__(self, tokenizer: Any, max_length: int | None = None) -> None:
        if max_length is not None and int(max_length) < 1:
            raise ValueError(f"max_length must be at least 1, got {max_length}")
        self.tokenizer = tokenizer
        self.max_length = None if max_length is None else int(max_length)

    def tokenize(self, text: str) -> list[int]:
        """One chunk of text -> ids, with the tokenizer's own special-token settings."""
        return list(self.tokenizer(text).input_ids)

    def split(self, prompt: str, num_images: int) -> tuple[list[list[int]], list[int]]:
        """``(token ids of each text chunk, image number after each chunk but the last)``: the
        tokenised pieces of a prompt with images, to be joined by :meth:`join`."""
        tags = check_image_tags(prompt, num_images)
        chunks = [self.tokenize(c) for c in IMAGE_TAG.split(prompt)[:: 2]]  # split keeps the captured numbers
        return chunks, tags

    @staticmethod
    def join(chunks: Sequence[Sequence[int]], tags: Sequence[int], num_image_tokens: Sequence[int]) -> list[int]:
        """Text chunks with ``num_image_tokens[k-1]`` copies of ``-k`` in place of each ``<|image_k|>``."""
        ids: list[int] = []
        for i, chunk in enumerate(chunks):
            ids.extend(chunk)
            if i < len(tags):
                k = tags[i]
                ids.extend([-k] * int(num_image_tokens[k - 1]))
        return ids

    def __call__(self, prompt: str, num_image_tokens: Sequence[int] = ()) -> list[int]:
        """One prompt and the token count of each of its images -> ids (``-k`` for image ``k``)."""
        if not isinstance(prompt, str):
            raise PromptError(f"a prompt must be a string, got {type(prompt).__name__}")
        if not num_image_tokens:
            check_image_tags(prompt, 0)
            if self.max_length is None:
                return self.tokenize(prompt)
            return list(self.tokenizer(prompt, truncation=True, max_length=self.max_length).input_ids)
        chunks, tags = self.split(prompt, len(num_image_tokens))
        return self.join(chunks, tags, num_image_tokens)


def pad_prompts(
    sequences: Sequence[Sequence[int] | torch.Tensor], *, pad_id: int = 0, side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad id sequences to one length: ``(input_ids (B, L), attention_mask (B, L))``, 1 on real tokens."""
    if side not in PADDING_SIDES:
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    if not sequences:
        raise ValueError("no prompts to pad")
    rows = [torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in sequences]
    if any(r.numel() == 0 for r in rows):
        raise PromptError("a prompt has no tokens (an empty prompt with a tokenizer that adds nothing)")
    length = max(r.numel() for r in rows)
    ids = torch.full((len(rows), length), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(0, r.numel()) if side == "right" else slice(length - r.numel(), length)
        ids[i, span] = r
        mask[i, span] = 1
    return ids, mask


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only (0 at each row's first real token), so that a
    left-padded prompt sees the positions it would see alone."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Per row, the index of its last real token (for left and right padding alike)."""
    mask = attention_mask.bool()
    if not bool(mask.any(dim=-1).all()):
        raise ValueError("a row of the attention mask has no real token")
    length = mask.shape[-1]
    return length - 1 - mask.flip(-1).long().argmax(dim=-1)


def pool_hidden_states(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str = "last") -> torch.Tensor:
    """``(B, L, H)`` states -> ``(B, H)`` float32: the state at the last real token (``last``) or
    the mean over real tokens (``mean``); padding never counts, on either side."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    mask = attention_mask.to(hidden.device)
    if pooling == "last":
        idx = last_token_index(mask)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx].float()
    if not bool(mask.bool().any(dim=-1).all()):
        raise ValueError("a row of the attention mask has no real token")
    # Only the real tokens are selected: states at padded positions never leak in (not even a NaN).
    return mean_pool([row[keep] for row, keep in zip(hidden.float(), mask.bool())])


def merge_image_tokens(
    input_ids: torch.Tensor, text_embeds: torch.Tensor, image_tokens: Sequence[Sequence[torch.Tensor]]
) -> torch.Tensor:
    """Put each row's image tokens where its ids mark them: positions with id ``-k`` of row ``b``
    get ``image_tokens[b][k-1]`` (``(T, H)``), in order. Out of place; every mark must be filled
    and every token placed, otherwise :class:`PromptError`."""
    if input_ids.ndim != 2 or text_embeds.shape[:2] != input_ids.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and embeddings {tuple(text_embeds.shape)} do not match")
    if len(image_tokens) != input_ids.shape[0]:
        raise ValueError(f"{len(image_tokens)} rows of image tokens for {input_ids.shape[0]} prompts")
    out = text_embeds.clone()
    for b, row in enumerate(image_tokens):
        ids = input_ids[b]
        marked = int((ids < 0).sum())
        placed = 0
        for k, toks in enumerate(row, start=1):
            pos = (ids == -k).nonzero(as_tuple=True)[0]
            if pos.numel() != toks.shape[0]:
                raise PromptError(
                    f"prompt {b}: image {k} has {toks.shape[0]} tokens but the prompt marks {pos.numel()} positions "
                    f"for it; build prompts with each image's token count"
                )
            out[b, pos] = toks.to(device=out.device, dtype=out.dtype)
            placed += pos.numel()
        if placed != marked:
            raise PromptError(f"prompt {b} marks {marked} image-token positions but its {len(row)} image(s) fill {placed}")
    return out


# ==============================================================================================
# The language model
# ==============================================================================================
@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers warns about fields of the released configs it reads differently (the longrope
    scaling's ``original_max_position_embeddings``); the values are used as given."""
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)


def phi3_config(config: dict[str, Any], *, attn_implementation: str = "sdpa") -> Any:
    """A transformers ``Phi3Config`` from a Phi-3-vision ``config.json`` dict (its language-model fields).

    The released Phi-3-vision's ``rope_scaling`` type ``su`` is the scaling transformers calls
    ``longrope`` (Phi-3.5-vision already says ``longrope``). Token ids outside the vocabulary
    (unused by the embedding path) are dropped.
    """
    from transformers import Phi3Config

    missing = [k for k in _REQUIRED_LM_KEYS if k not in config]
    if missing:
        raise CheckpointError(
            f"config.json has no {', '.join(missing)}: it does not describe a Phi-3 language model "
            "(expected a Phi-3-vision config.json such as microsoft/Phi-3-vision-128k-instruct's)"
        )
    kw = {k: config[k] for k in _LM_CONFIG_KEYS if k in config and config[k] is not None}
    vocab = int(kw["vocab_size"])
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = config.get(key)
        kw[key] = value if isinstance(value, int) and 0 <= value < vocab else None
    rope = config.get("rope_scaling")
    if rope:
        rope = dict(rope)
        kind = rope.get("type", rope.get("rope_type"))
        if kind in ("su", "longrope"):
            rope = {"type": "longrope", "short_factor": list(rope["short_factor"]), "long_factor": list(rope["long_factor"])}
        kw["rope_scaling"] = rope
    with _quiet_transformers():
        cfg = Phi3Config(**kw)
    cfg._attn_implementation = attn_implementation
    return cfg


def language_model_tensors(weight_map: dict[str, str], num_layers: int, source: str = "") -> dict[str, str]:
    """``Phi3Model`` state-dict name -> checkpoint tensor name, for exactly the tensors the language
    model needs: ``model.layers.<i>.*`` (i < ``num_layers``), ``model.norm.weight`` and the text
    embedding (``model.embed_tokens.weight``, else ``model.vision_embed_tokens.wte.weight``).
    Nothing else is ever named (``lm_head`` in particular). Raises :class:`CheckpointError` when
    the checkpoint lacks some."""
    names: dict[str, str] = {}
    for key in weight_map:
        if not key.startswith(LAYER_PREFIX) or key.endswith("rotary_emb.inv_freq"):
            continue
        layer = key[len(LAYER_PREFIX) :].split(".", 1)[0]
        if layer.isdigit() and int(layer) < num_layers:
            names[key[len("model.") :]] = key
    if NORM_KEY in weight_map:
        names["norm.weight"] = NORM_KEY
    if TEXT_EMBED_KEY in weight_map:
        names["embed_tokens.weight"] = TEXT_EMBED_KEY
    elif WTE_KEY in weight_map:
        names["embed_tokens.weight"] = WTE_KEY
    where = f"{source}: " if source else ""
    if "embed_tokens.weight" not in names:
        raise CheckpointError(
            f"{where}the checkpoint holds no text embedding ({TEXT_EMBED_KEY} or {WTE_KEY}); "
            "the language-model encoder needs the full Phi-3-vision checkpoint, not a vision-only export"
        )
    have_layers = {k.split(".")[1] for k in names if k.startswith("layers.")}
    lacking = [i for i in range(num_layers) if str(i) not in have_layers]
    if lacking or "norm.weight" not in names:
        what = ([f"model.layers.{lacking[0]}.*" + (f" (and {len(lacking) - 1} more layers)" if len(lacking) > 1 else "")]
                if lacking else []) + ([NORM_KEY] if "norm.weight" not in names else [])
        raise CheckpointError(
            f"{where}the checkpoint lacks {', '.join(what)} of its {num_layers}-layer language model "
            "(config.json num_hidden_layers); download the complete checkpoint"
        )
    return names


def _rebuild_meta_buffers(model: nn.Module, config: Any, device: torch.device | str) -> None:
    """Buffers computed at construction (the rotary embedding's frequencies) stay on the meta
    device after an ``assign`` load: build those modules again, for real, on ``device``."""
    for name, module in list(model.named_modules()):
        if not any(b.is_meta for b in module.buffers(recurse=False)):
            continue
        try:
            fresh = type(module)(config=config)
        except TypeError:
            raise CheckpointError(
                f"this transformers version builds {type(module).__name__} differently; "
                "upgrade transformers (phiclip's phi3v-lm encoder is tested with transformers 5)"
            ) from None
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, name.rsplit(".", 1)[-1], fresh.to(device))


def load_language_model(
    path_or_hub_id: str | Path | Location | Checkpoint,
    *,
    torch_dtype: torch.dtype | None = torch.float32,
    device: torch.device | str = "cpu",
    attn_implementation: str = "sdpa",
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
    requested: list[str] | None = None,
) -> Any:
    """The language model of a Phi-3-vision checkpoint as a transformers ``Phi3Model`` (eval mode,
    no gradients).

    Opens the checkpoint (:func:`phiclip.checkpoints.open_checkpoint`; an opened one is used as is)
    and reads only the tensors :func:`language_model_tensors` names (``lm_head`` never), straight
    into the model (built on the meta device, so the weights are in memory once); they count in the
    checkpoint's fingerprint. ``torch_dtype=None`` keeps the stored dtype. ``requested`` (if given)
    collects the checkpoint names read, for tests and logs.
    """
    from transformers import Phi3Model

    checkpoint = open_checkpoint(path_or_hub_id, revision, cache_dir=cache_dir, token=token)
    source = checkpoint.location
    config = phi3_config(checkpoint.config, attn_implementation=attn_implementation)
    names = language_model_tensors(checkpoint.weight_map, int(config.num_hidden_layers), str(source))
    with torch.device("meta"), _quiet_transformers():
        model = Phi3Model(config)
    expected = model.state_dict()
    missing, extra = sorted(set(expected) - set(names)), sorted(set(names) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"{source}: the language-model tensors do not match transformers' Phi3Model for config.json; "
            f"missing: {['model.' + k for k in missing[:6]]}; unexpected: {[names[k] for k in extra[:6]]}"
        )
    if requested is not None:
        requested.extend(names.values())
    tensors = checkpoint.read_tensors(names.values(), dtype=torch_dtype, device=device)
    state = {module_key: tensors[ckpt_key] for module_key, ckpt_key in names.items()}
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{source}: {names[key]} has shape {tuple(value.shape)} but config.json implies "
                f"{tuple(expected[key].shape)}; config.json and the weights disagree"
            )
    model.load_state_dict(state, strict=True, assign=True)
    _rebuild_meta_buffers(model, config, device)
    model.source = str(source)
    return model.to(device).eval().requires_grad_(False)


class Phi3VEmbeddingModel(nn.Module):
    """The whole Phi-3-vision (image path + language model) as an embedding model.

    Args:
        image_embedding: a :class:`~phiclip.phi3v.Phi3VImageEmbedding` (vision-only is enough:
            the text embedding used is the language model's ``embed_tokens``).
        language_model: a transformers ``Phi3Model``.
    """

    def __init__(self, image_embedding: nn.Module, language_model: nn.Module) -> None:
        super().__init__()
        if int(image_embedding.hidden_size) != int(language_model.config.hidden_size):
            raise ValueError(f"image tokens are {image_embedding.hidden_size}-wide but the language model is "
                             f"{language_model.config.hidden_size}-wide")
        self.image_embedding = image_embedding
        self.language_model = language_model
        self.hidden_size = int(language_model.config.hidden_size)
        #: ``"sha256:<hex>"`` of the weights read (image path and language model), and the commit they
        #: came from (None: a local folder), set by :meth:`from_pretrained`.
        self.weights_fingerprint: str | None = None
        self.revision: str | None = None

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | Path | Location | Checkpoint,
        *,
        torch_dtype: torch.dtype | None = torch.float32,
        device: torch.device | str = "cpu",
        attn_implementation: str = "sdpa",
        max_crops_per_batch: int | None = None,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        token: str | bool | None = None,
    ) -> Phi3VEmbeddingModel:
        """Load both halves of a checkpoint (local directory, hub id or an opened checkpoint;
        safetensors only). The checkpoint is opened once (:func:`phiclip.checkpoints.open_checkpoint`):
        both halves come from the same commit, and ``weights_fingerprint`` covers every tensor read."""
        checkpoint = open_checkpoint(path_or_hub_id, revision, cache_dir=cache_dir, token=token)
        image = Phi3VImageEmbedding.from_pretrained(checkpoint, torch_dtype=torch_dtype, device=device,
                                                    max_crops_per_batch=max_crops_per_batch)
        lm = load_language_model(checkpoint, torch_dtype=torch_dtype, device=device,
                                 attn_implementation=attn_implementation)
        model = cls(image, lm).eval()
        model.weights_fingerprint = checkpoint.fingerprint
        model.revision = checkpoint.revision
        return model

    @property
    def device(self) -> torch.device:
        return self.language_model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.embed_tokens.weight.dtype

    def inputs_embeds(
        self,
        input_ids: torch.Tensor,
        crops: Sequence[torch.Tensor] = (),
        image_sizes: torch.Tensor | Sequence[Sequence[int]] = (),
        images_per_row: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Text embeddings of ``input_ids (B, L)`` with the image tokens merged in.

        ``crops``/``image_sizes``: every image of the batch, row by row and within a row in the
        order ``<|image_1|>``, ``<|image_2|>``...; ``images_per_row[b]`` says how many belong to row
        ``b`` (default: one per row when there are as many images as rows, else none).
        """
        ids = input_ids.to(self.device)
        if int(ids.max()) >= self.language_model.embed_tokens.num_embeddings:
            raise PromptError(f"input_ids contain {int(ids.max())}, outside the vocabulary of "
                              f"{self.language_model.embed_tokens.num_embeddings}; is the tokenizer the checkpoint's?")
        embeds = self.language_model.embed_tokens(ids.clamp_min(0))
        n_images = len(crops)
        if images_per_row is None:
            images_per_row = [1] * ids.shape[0] if n_images == ids.shape[0] and n_images else [0] * ids.shape[0]
        if sum(images_per_row) != n_images or len(images_per_row) != ids.shape[0]:
            raise PromptError(f"images_per_row {list(images_per_row)} does not fit {ids.shape[0]} prompts and {n_images} images")
        if not n_images:
            if bool((ids < 0).any()):
                raise PromptError("the prompts mark image-token positions but no images were given")
            return embeds
        tokens = self.image_embedding.image_tokens(list(crops), image_sizes)
        per_row: list[list[torch.Tensor]] = []
        at = 0
        for count in images_per_row:
            per_row.append(tokens[at : at + count])
            at += count
        return merge_image_tokens(ids, embeds, per_row)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        crops: Sequence[torch.Tensor] = (),
        image_sizes: torch.Tensor | Sequence[Sequence[int]] = (),
        images_per_row: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """The last hidden state ``(B, L, H)`` (after the final norm) of the padded prompts."""
        embeds = self.inputs_embeds(input_ids, crops, image_sizes, images_per_row)
        mask = attention_mask.to(self.device)
        out = self.language_model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False
        )
        return out.last_hidden_state

    def embed(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        crops: Sequence[torch.Tensor] = (),
        image_sizes: torch.Tensor | Sequence[Sequence[int]] = (),
        images_per_row: Sequence[int] | None = None,
        *,
        pooling: str = "last",
        normalize: bool = True,
    ) -> torch.Tensor:
        """One float32 vector per prompt: :meth:`forward` pooled by :func:`pool_hidden_states`."""
        hidden = self(input_ids, attention_mask, crops, image_sizes, images_per_row)
        vecs = pool_hidden_states(hidden, attention_mask, pooling)
        return l2_normalize(vecs) if normalize else vecs


def load_tokenizer(
    path_or_hub_id: str | Path | Location | Checkpoint,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
) -> Any:
    """The checkpoint's tokenizer (``tokenizer.json`` / ``tokenizer_config.json``), without remote code.

    The checkpoint is opened the one way (:func:`phiclip.checkpoints.open_checkpoint`; an opened one
    is used as is). For a hub id, ``tokenizer_config.json`` is fetched first at the checkpoint's
    commit, and transformers reads from that commit, from the cache alone while the hub is
    unreachable: an unreachable hub id fails at once, with what to do, instead of after half a
    minute of retries.

    Raises:
        CheckpointError: a bad location, no tokenizer files, an unreachable hub id that is not
            cached, or tokenizer files transformers cannot read.
    """
    from transformers import AutoTokenizer

    if not isinstance(path_or_hub_id, Checkpoint):
        loc = path_or_hub_id if isinstance(path_or_hub_id, Location) else resolve_location(path_or_hub_id)
        if loc.hub_id is not None:  # an unreachable hub id, not cached: said at once, naming the tokenizer's file
            resolve_file(loc, "tokenizer_config.json", required=False, revision=revision, cache_dir=cache_dir, token=token)
        path_or_hub_id = loc
    checkpoint = open_checkpoint(path_or_hub_id, revision, cache_dir=cache_dir, token=token)
    loc = checkpoint.location
    if loc.path is not None and not any((loc.path / f).is_file() for f in TOKENIZER_FILES):
        raise CheckpointError(
            f"{loc.path} has no tokenizer ({', '.join(TOKENIZER_FILES[:-1])} or {TOKENIZER_FILES[-1]}); the phi3v-lm "
            "encoder needs the checkpoint's tokenizer: copy those files from the checkpoint it was made from"
        )
    if loc.hub_id is not None:  # the clear message of phiclip.hub when the hub is unreachable and nothing is cached
        checkpoint.file("tokenizer_config.json", required=False)
    try:
        with _quiet_transformers():  # it also reads config.json, whose model_type (phi3_v) it does not know
            return AutoTokenizer.from_pretrained(str(loc), **checkpoint.transformers_kwargs())
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"cannot load the tokenizer of {loc} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "the phi3v-lm encoder needs the checkpoint's tokenizer files (tokenizer.json, tokenizer_config.json)"
        ) from None


__all__ = [
    "IMAGE_TAG",
    "Phi3VEmbeddingModel",
    "PromptError",
    "PromptTokenizer",
    "TOKENIZER_FILES",
    "WTE_KEY",
    "check_image_tags",
    "image_tags",
    "language_model_tensors",
    "last_token_index",
    "load_language_model",
    "load_tokenizer",
    "merge_image_tokens",
    "pad_prompts",
    "phi3_config",
    "pool_hidden_states",
    "position_ids_from_mask",
]
