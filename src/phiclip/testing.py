"""Builders of tiny checkpoints in the released layouts, and of labelled sample images.

No pretrained weights can be downloaded in tests, CI or offline demos, so these build small
random-weight models that are saved exactly as the real ones are (file names, key names, configs,
processors), so that every loading path is exercised for real. Used by tests, ``phiclip demo`` and
``bench/``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from phiclip.open_clip.tokenizer import bytes_to_unicode

# Colours and shapes of the generated labelled images ("a red circle", ...).
SAMPLE_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 40),
}
SAMPLE_SHAPES = ("circle", "square", "triangle")


def write_tiny_clip_tokenizer_files(out_dir: str | Path) -> tuple[Path, Path]:
    """Write a tiny byte-level BPE vocabulary (vocab.json, merges.txt) for ``CLIPTokenizer``.

    Every byte is a token (so any text tokenises); a few merges make common words whole tokens.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chars = sorted(set(bytes_to_unicode().values()))
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = ["r e", "re d</w>", "c i", "ci r", "cir c", "circ l", "circl e</w>", "s q", "b l", "bl u", "blu e</w>"]
    for m in merges:
        vocab[m.replace(" ", "")] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (out / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return out / "vocab.json", out / "merges.txt"


def build_tiny_clip(
    out_dir: str | Path,
    *,
    image_size: int = 224,
    patch_size: int = 32,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    projection_dim: int = 16,
    text_max_length: int = 77,
    seed: int = 0,
    vision_overrides: dict[str, Any] | None = None,
    text_overrides: dict[str, Any] | None = None,
) -> Path:
    """Save a random-weight ``CLIPModel`` with its ``CLIPProcessor`` as ``from_pretrained`` expects.

    The layout is the hub's: ``config.json``, ``model.safetensors``, ``preprocessor_config.json``
    and the tokenizer files. Pass ``hidden_size=768, num_layers=12, num_heads=12,
    patch_size=32, projection_dim=512`` (and an MLP of 3072) for a real-size ViT-B/32 image tower, and
    ``text_overrides=dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8)`` for its
    real-size text tower (both towers take ``hidden_size`` and ``num_layers`` otherwise).
    """
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vision = dict(
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        image_size=image_size,
        patch_size=patch_size,
    )
    vision.update(vision_overrides or {})
    tok_dir = out / "_tok"
    vocab_file, merges_file = write_tiny_clip_tokenizer_files(tok_dir)
    tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=text_max_length)
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        max_position_embeddings=text_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text.update(text_overrides or {})
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    for f in tok_dir.iterdir():
        f.unlink()
    tok_dir.rmdir()
    return out


def make_shape_image(
    colour: str, shape: str, size: tuple[int, int] = (160, 120), seed: int = 0
) -> Image.Image:
    """A coloured shape on a light, slightly noisy background (deterministic for a seed)."""
    rng = np.random.default_rng(seed)
    w, h = size
    bg = rng.integers(215, 250, size=3)
    arr = np.clip(bg[None, None, :] + rng.normal(0, 6, size=(h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    draw = ImageDraw.Draw(img)
    r = int(min(w, h) * rng.uniform(0.25, 0.38))
    cx = int(w / 2 + rng.uniform(-0.15, 0.15) * w)
    cy = int(h / 2 + rng.uniform(-0.15, 0.15) * h)
    fill = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in SAMPLE_COLOURS[colour])
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        pts = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        draw.polygon(pts, fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; one of {SAMPLE_SHAPES}")
    return img


def make_sample_images(
    out_dir: str | Path,
    per_class: int = 3,
    *,
    by_shape: bool = False,
    sizes: tuple[tuple[int, int], ...] = ((160, 120), (120, 160), (192, 108), (128, 128)),
) -> list[dict[str, Any]]:
    """Write labelled sample images (a folder per class) and a ``labels.csv`` beside them.

    Classes are colours (``by_shape=False``) or shapes. Sizes cycle through landscape, portrait,
    16:9 and square so the Phi-3-vision crop arithmetic sees every case. Returns one record per
    image: ``{"path", "label", "caption", "width", "height"}``.
    """
    out = Path(out_dir)
    records: list[dict[str, Any]] = []
    i = 0
    for colour in SAMPLE_COLOURS:
        for shape in SAMPLE_SHAPES:
            for k in range(per_class):
                label = shape if by_shape else colour
                size = sizes[i % len(sizes)]
                img = make_shape_image(colour, shape, size=size, seed=i)
                path = out / label / f"{colour}_{shape}_{k}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                img.save(path)
                records.append(
                    {"path": str(path), "label": label, "caption": f"a {colour} {shape}", "width": size[0], "height": size[1]}
                )
                i += 1
    with open(out / "labels.csv", "w", encoding="utf-8") as f:
        f.write("image,label,caption\n")
        for r in records:
            f.write(f"{Path(r['path']).relative_to(out)},{r['label']},{r['caption']}\n")
    return records


# ==============================================================================================
# Phi-3-vision checkpoints in the released layout
# ==============================================================================================
#: A tiny CLIP tower that keeps the 336 px / patch 14 geometry (24x24 grid) of the real one.
TINY_PHI3V_VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "image_size": 336,
    "patch_size": 14,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}


def phi3v_config_dict(
    *,
    hidden_size: int = 3072,
    vocab_size: int = 32064,
    num_lm_layers: int = 32,
    vision_config: dict[str, Any] | None = None,
    hd_transform_order: str = "sub_glb",
    projection_cls: str = "mlp",
    layer_idx: int | None = None,
    type_feature: str | None = None,
    embd_pdrop: float = 0.0,
) -> dict[str, Any]:
    """A ``config.json`` as the released checkpoints have it (the LM fields included), with
    phiclip's optional ``img_processor.vision_config`` for a non-ViT-L tower."""
    img_processor: dict[str, Any] = {
        "name": "clip_vision_model",
        "model_name": "openai/clip-vit-large-patch14-336",
        "image_dim_out": (vision_config or {}).get("hidden_size", 1024),
        "num_img_tokens": 144,
    }
    if vision_config is not None:
        img_processor["vision_config"] = dict(vision_config)
    if layer_idx is not None:
        img_processor["layer_idx"] = layer_idx
    if type_feature is not None:
        img_processor["type_feature"] = type_feature
    return {
        "architectures": ["Phi3VForCausalLM"],
        "model_type": "phi3_v",
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 8 // 3 if hidden_size != 3072 else 8192,
        "num_hidden_layers": num_lm_layers,
        "num_attention_heads": 32 if hidden_size == 3072 else 4,
        "vocab_size": vocab_size,
        "embd_pdrop": embd_pdrop,
        "torch_dtype": "bfloat16",
        "img_processor": img_processor,
        "embd_layer": {
            "embedding_cls": "image",
            "hd_transform_order": hd_transform_order,
            "projection_cls": projection_cls,
            "use_hd_transform": True,
            "with_learnable_separator": True,
        },
    }


def _phi3v_lm_tensors(hidden: int, vocab: int, layers: range, gen: Any, dtype: Any) -> dict[str, Any]:
    import torch

    inter = hidden * 8 // 3 if hidden != 3072 else 8192
    out = {}
    for i in layers:
        p = f"model.layers.{i}."
        out[p + "self_attn.qkv_proj.weight"] = torch.randn(3 * hidden, hidden, generator=gen).to(dtype)
        out[p + "self_attn.o_proj.weight"] = torch.randn(hidden, hidden, generator=gen).to(dtype)
        out[p + "mlp.gate_up_proj.weight"] = torch.randn(2 * inter, hidden, generator=gen).to(dtype)
        out[p + "mlp.down_proj.weight"] = torch.randn(hidden, inter, generator=gen).to(dtype)
        out[p + "input_layernorm.weight"] = torch.ones(hidden).to(dtype)
        out[p + "post_attention_layernorm.weight"] = torch.ones(hidden).to(dtype)
    return out


def build_tiny_phi3v(
    out_dir: str | Path,
    *,
    vision_config: dict[str, Any] | None = None,
    hidden_size: int = 64,
    vocab_size: int = 128,
    num_lm_layers: int = 2,
    num_crops: int = 16,
    hd_transform_order: str = "sub_glb",
    projection_cls: str = "mlp",
    layer_idx: int | None = None,
    type_feature: str | None = None,
    vision_shards: int = 1,
    dtype: str = "float32",
    seed: int = 0,
) -> Path:
    """Save a random-weight Phi-3-vision checkpoint in the released layout.

    Files: ``config.json``, ``preprocessor_config.json``, ``model.safetensors.index.json`` and
    ``model-0000k-of-0000n.safetensors`` shards. The vision tensors (``model.vision_embed_tokens.*``
    with HF ``CLIPVisionModel`` names under ``img_processor.vision_model.``) share the first shard
    with ``model.embed_tokens.weight`` and LM layer 0, as in the released checkpoint; with
    ``vision_shards=2`` they are split over two shards. The last shard holds only language-model
    tensors (later layers, ``model.norm``, ``lm_head``): a vision-only loader must never open it.
    Separators and projections are random (not zero) so that tests see them.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vcfg = dict(TINY_PHI3V_VISION if vision_config is None else vision_config)
    tdtype = getattr(torch, dtype)
    config = phi3v_config_dict(
        hidden_size=hidden_size, vocab_size=vocab_size, num_lm_layers=num_lm_layers, vision_config=vcfg,
        hd_transform_order=hd_transform_order, projection_cls=projection_cls, layer_idx=layer_idx, type_feature=type_feature,
    )
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (out / "preprocessor_config.json").write_text(
        json.dumps({
            "image_processor_type": "Phi3VImageProcessor", "num_crops": num_crops,
            "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
            "processor_class": "Phi3VProcessor",
        }, indent=2),
        encoding="utf-8",
    )
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    hf_cfg = {k: v for k, v in vcfg.items() if k in CLIPVisionConfig().to_dict()}
    tower = CLIPVisionModel(CLIPVisionConfig(**hf_cfg))
    prefix = "model.vision_embed_tokens."
    vision: dict[str, Any] = {}
    for k, v in tower.state_dict().items():
        k = k[len("vision_model."):] if k.startswith("vision_model.") else k  # transformers 4 vs 5
        if k.endswith("position_ids"):
            continue
        # Random, non-trivial values for every tensor (HF init leaves layer norms at 1/0).
        vision[prefix + "img_processor.vision_model." + k] = (v + 0.02 * torch.randn(v.shape, generator=gen)).to(tdtype)
    d4 = 4 * vcfg["hidden_size"]
    vision[prefix + "glb_GN"] = torch.randn(1, 1, d4, generator=gen).to(tdtype)
    vision[prefix + "sub_GN"] = torch.randn(1, 1, 1, d4, generator=gen).to(tdtype)
    if projection_cls == "mlp":
        vision[prefix + "img_projection.0.weight"] = (torch.randn(hidden_size, d4, generator=gen) / d4**0.5).to(tdtype)
        vision[prefix + "img_projection.0.bias"] = (0.1 * torch.randn(hidden_size, generator=gen)).to(tdtype)
        vision[prefix + "img_projection.2.weight"] = (torch.randn(hidden_size, hidden_size, generator=gen) / hidden_size**0.5).to(tdtype)
        vision[prefix + "img_projection.2.bias"] = (0.1 * torch.randn(hidden_size, generator=gen)).to(tdtype)
    else:
        vision[prefix + "img_projection.weight"] = (torch.randn(hidden_size, d4, generator=gen) / d4**0.5).to(tdtype)
        vision[prefix + "img_projection.bias"] = (0.1 * torch.randn(hidden_size, generator=gen)).to(tdtype)

    first = {"model.embed_tokens.weight": torch.randn(vocab_size, hidden_size, generator=gen).to(tdtype)}
    first.update(_phi3v_lm_tensors(hidden_size, vocab_size, range(0, 1), gen, tdtype))
    last = _phi3v_lm_tensors(hidden_size, vocab_size, range(1, num_lm_layers), gen, tdtype)
    last["model.norm.weight"] = torch.ones(hidden_size).to(tdtype)
    last["lm_head.weight"] = torch.randn(vocab_size, hidden_size, generator=gen).to(tdtype)
    vision_keys = sorted(vision)
    shards: list[dict[str, Any]] = []
    if vision_shards <= 1:
        shards.append({**first, **vision})
    else:
        half = len(vision_keys) // 2
        shards.append({**first, **{k: vision[k] for k in vision_keys[:half]}})
        shards.append({k: vision[k] for k in vision_keys[half:]})
    shards.append(last)
    n = len(shards)
    weight_map: dict[str, str] = {}
    total = 0
    for i, tensors in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / name), metadata={"format": "pt"})
        for k, v in tensors.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2), encoding="utf-8"
    )
    return out


#: Words of the tiny SigLIP vocabulary (whole-word pieces; anything else falls back to characters).
_SIGLIP_WORDS = ("a", "photo", "of", "the", "red", "green", "blue", "yellow", "circle", "square", "triangle")


def build_tiny_siglip_tokenizer(*, model_max_length: int = 64) -> Any:
    """A tiny SentencePiece-style (Unigram, ``▁`` word marker, lower-casing, ``</s>`` appended)
    tokenizer with SigLIP's special tokens (``<pad>`` 0, ``</s>`` 1 = eos = pad, ``<unk>`` 2).

    Released SigLIP checkpoints ship ``spiece.model`` for ``SiglipTokenizer``, which needs the
    ``sentencepiece`` package; this one is built with ``tokenizers`` alone and saved as
    ``tokenizer.json``, so it loads with ``AutoTokenizer`` offline without sentencepiece.
    """
    import string

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -3.0) for w in _SIGLIP_WORDS]
    pieces += [(c, -6.0) for c in string.ascii_lowercase + string.digits + string.punctuation]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="</s>",
        pad_token="</s>",
        unk_token="<unk>",
        model_max_length=model_max_length,
        model_input_names=["input_ids", "attention_mask"],
    )


def build_tiny_siglip(
    out_dir: str | Path,
    *,
    image_size: int = 224,
    patch_size: int = 32,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    text_max_length: int = 64,
    seed: int = 0,
    with_tokenizer: bool = True,
) -> Path:
    """Save a random-weight ``SiglipModel`` with its image processor (and a tokenizer) as
    ``from_pretrained`` expects: ``config.json``, ``model.safetensors``, ``preprocessor_config.json``
    (resize to ``image_size`` square, bicubic, mean/std 0.5, no crop, like the released ones) and,
    with ``with_tokenizer``, the tokenizer of :func:`build_tiny_siglip_tokenizer`.
    """
    import torch
    from transformers import SiglipConfig, SiglipImageProcessorPil, SiglipModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_siglip_tokenizer(model_max_length=text_max_length)
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        max_position_embeddings=text_max_length,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    vision = dict(
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        image_size=image_size,
        patch_size=patch_size,
    )
    config = SiglipConfig(text_config=text, vision_config=vision)
    torch.manual_seed(seed)
    model = SiglipModel(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    SiglipImageProcessorPil(
        size={"height": image_size, "width": image_size},
        resample=3,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    ).save_pretrained(out)
    if with_tokenizer:
        tokenizer.save_pretrained(out)
    return out


# ==============================================================================================
# Captioned images a tiny CLIP can learn (fine-tuning tests and demos)
# ==============================================================================================
#: Where the shape of a captioned image sits ("a red circle on the left").
CAPTION_SIDES = ("left", "right")


def make_side_image(colour: str, shape: str, side: str, size: tuple[int, int] = (96, 64), seed: int = 0) -> Image.Image:
    """A coloured shape in the left or right half of a light, noisy background (deterministic per seed)."""
    if side not in CAPTION_SIDES:
        raise ValueError(f"unknown side {side!r}; one of {CAPTION_SIDES}")
    w, h = size
    half = make_shape_image(colour, shape, size=(w // 2, h), seed=seed)
    rng = np.random.default_rng(seed + 10_000)
    bg = rng.integers(215, 250, size=3)
    arr = np.clip(bg[None, None, :] + rng.normal(0, 6, size=(h, w, 3)), 0, 255).astype(np.uint8)
    canvas = Image.fromarray(arr, "RGB")
    canvas.paste(half, (0 if side == "left" else w - w // 2, 0))
    return canvas


def make_caption_images(
    out_dir: str | Path,
    *,
    train_per_combo: int = 3,
    eval_per_combo: int = 1,
    size: tuple[int, int] = (96, 64),
    seed: int = 0,
) -> Path:
    """Write captioned images (``a red circle on the left``: every colour x shape x side) and a
    ``captions.csv`` (``image, caption, split``) beside them; returns the CSV's path.

    Each combination gets ``train_per_combo`` renderings in split ``train`` and ``eval_per_combo``
    in split ``val`` (other seeds: other sizes, positions and noise), so every held-out caption
    names exactly one held-out image when ``eval_per_combo`` is 1.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    i = seed * 100_000
    for colour in SAMPLE_COLOURS:
        for shape in SAMPLE_SHAPES:
            for side in CAPTION_SIDES:
                for k in range(train_per_combo + eval_per_combo):
                    split = "train" if k < train_per_combo else "val"
                    name = f"images/{colour}_{shape}_{side}_{k}.png"
                    make_side_image(colour, shape, side, size=size, seed=i).save(out / name)
                    rows.append(f"{name},a {colour} {shape} on the {side},{split}")
                    i += 1
    csv = out / "captions.csv"
    csv.write_text("image,caption,split\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return csv


# ==============================================================================================
# Phi-3-vision with its language model, and a tokenizer, for the phi3v-lm encoder
# ==============================================================================================
#: Phi-3's chat tokens, kept (as special tokens) by the tiny tokenizer.
PHI3_CHAT_TOKENS = ("<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>")


def build_tiny_phi3_tokenizer() -> Any:
    """A tiny Llama-style tokenizer with Phi-3's special tokens: ``<unk>`` 0, ``<s>`` 1 (added at
    the start of every call, as the released Phi-3-vision tokenizer's ``add_bos_token``), ``</s>``
    2, one token per printable ASCII character, ``▁`` as the word marker (prepended to the text of
    each call, as SentencePiece does) and the chat tokens of :data:`PHI3_CHAT_TOKENS`. Built with
    ``tokenizers`` alone; ``save_pretrained`` writes a ``tokenizer.json`` that loads offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in ["▁", "\n"] + [chr(c) for c in range(33, 127)]:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>", *PHI3_CHAT_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|endoftext|>", unk_token="<unk>", pad_token="<|endoftext|>",
        model_max_length=131072,
    )


def build_tiny_phi3v_lm(
    out_dir: str | Path,
    *,
    num_crops: int = 4,
    hidden_size: int = 32,
    num_lm_layers: int = 2,
    num_heads: int = 4,
    vocab_size: int = 128,
    embed_key: str = "model.embed_tokens.weight",
    seed: int = 0,
) -> Path:
    """Save a random-weight Phi-3-vision checkpoint WITH its language model, in the released layout,
    and a tokenizer (:func:`build_tiny_phi3_tokenizer`).

    ``config.json`` carries the Phi-3 language-model fields as the released one does (``su`` rope
    scaling, 131072 positions of which 4096 original, ...). Shards: the first holds the text
    embedding, LM layer 0 and the image path; the second the other LM layers and ``model.norm``;
    the third only ``lm_head.weight`` (an encoder never needs it: tests can delete the file).
    ``embed_key="model.vision_embed_tokens.wte.weight"`` stores the text embedding under the name
    fine-tuned checkpoints use instead. Weights are scaled by 1/sqrt(fan_in).
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    out = build_tiny_phi3v(out_dir, hidden_size=hidden_size, vocab_size=vocab_size, num_lm_layers=num_lm_layers,
                           num_crops=num_crops, seed=seed)
    index = json.loads((out / "model.safetensors.index.json").read_text(encoding="utf-8"))
    vision: dict[str, Any] = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(out / shard), framework="pt") as f:
            vision.update({k: f.get_tensor(k) for k in f.keys() if k.startswith("model.vision_embed_tokens.")})
        (out / shard).unlink()
    tokenizer = build_tiny_phi3_tokenizer()
    if len(tokenizer) > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tiny tokenizer ({len(tokenizer)} tokens)")
    tokenizer.save_pretrained(out)

    gen = torch.Generator().manual_seed(seed + 1)
    head_dim = hidden_size // num_heads
    inter = hidden_size * 8 // 3

    def w(rows: int, cols: int) -> Any:
        return torch.randn(rows, cols, generator=gen) / cols**0.5

    def layer(i: int) -> dict[str, Any]:
        p = f"model.layers.{i}."
        return {
            p + "self_attn.qkv_proj.weight": w(3 * hidden_size, hidden_size),
            p + "self_attn.o_proj.weight": w(hidden_size, hidden_size),
            p + "mlp.gate_up_proj.weight": w(2 * inter, hidden_size),
            p + "mlp.down_proj.weight": w(hidden_size, inter),
            p + "input_layernorm.weight": 1 + 0.1 * torch.randn(hidden_size, generator=gen),
            p + "post_attention_layernorm.weight": 1 + 0.1 * torch.randn(hidden_size, generator=gen),
        }

    first = {embed_key: torch.randn(vocab_size, hidden_size, generator=gen), **layer(0), **vision}
    second: dict[str, Any] = {"model.norm.weight": 1 + 0.1 * torch.randn(hidden_size, generator=gen)}
    for i in range(1, num_lm_layers):
        second.update(layer(i))
    head = {"lm_head.weight": torch.randn(vocab_size, hidden_size, generator=gen)}
    weight_map: dict[str, str] = {}
    total = 0
    for i, tensors in enumerate((first, second, head), start=1):
        name = f"model-{i:05d}-of-00003.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / name), metadata={"format": "pt"})
        for k, v in tensors.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2), encoding="utf-8"
    )
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    half = head_dim // 2
    config.update({
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_heads,
        "intermediate_size": inter,
        "hidden_act": "silu",
        "max_position_embeddings": 131072,
        "original_max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "su", "short_factor": [1.0 + 0.1 * j for j in range(half)],
                         "long_factor": [2.0 + 0.5 * j for j in range(half)]},
        "sliding_window": 131072,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": False,
        "attention_dropout": 0.0,
        "resid_pdrop": 0.0,
        "use_cache": True,
    })
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return out


#: The kinds :func:`build_tiny_model` builds, with what each is for (``phiclip tiny-model --help`` lists them).
TINY_MODEL_KINDS: dict[str, str] = {
    "clip": "CLIP (transformers' CLIPModel layout, tokenizer and processor): spec clip:DIR",
    "siglip": "SigLIP (SiglipModel layout, tokenizer.json, processor): spec siglip:DIR",
    "phi3v": "Phi-3-vision image path only (released shards and key names): spec phi3v:DIR",
    "phi3v-lm": "Phi-3-vision with its language model and tokenizer: spec phi3v-lm:DIR",
}


def build_tiny_model(kind: str, out_dir: str | Path, *, seed: int = 0) -> Path:
    """Build a tiny random-weight checkpoint of ``kind`` (a key of :data:`TINY_MODEL_KINDS`) in ``out_dir``.

    For trying every command offline, without any download: the vectors carry no meaning, the loading,
    preprocessing and output are the real ones. ``out_dir`` must be absent or empty.

    Returns:
        ``out_dir``; use it as ``KIND:out_dir`` wherever a model spec is asked for.
    """
    out = Path(out_dir)
    if kind not in TINY_MODEL_KINDS:
        raise ValueError(f"unknown tiny model kind {kind!r}: choose one of {', '.join(TINY_MODEL_KINDS)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: exists and is not an empty folder; give a new folder for the tiny {kind} checkpoint")
    if kind == "clip":
        return build_tiny_clip(out, seed=seed)
    if kind == "siglip":
        return build_tiny_siglip(out, seed=seed)
    if kind == "phi3v":
        return build_tiny_phi3v(out, seed=seed)
    return build_tiny_phi3v_lm(out, seed=seed)


# --------------------------------------------------------------------------------------------------
# open_clip checkpoints (phiclip.open_clip)
# --------------------------------------------------------------------------------------------------
#: open_clip's own model configs (open_clip/model_configs/*.json, open_clip_torch 3.3.0) of the
#: architectures phiclip loads; the ``-quickgelu`` variants add ``"quick_gelu": true``.
OPEN_CLIP_ARCHS: dict[str, dict[str, Any]] = {
    "ViT-B-32": {"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}},
    "ViT-B-16": {"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 16},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}},
    "ViT-L-14": {"embed_dim": 768, "vision_cfg": {"image_size": 224, "layers": 24, "width": 1024, "patch_size": 14},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 768, "heads": 12, "layers": 12}},
    "ViT-L-14-336": {"embed_dim": 768,
                     "vision_cfg": {"image_size": 336, "layers": 24, "width": 1024, "patch_size": 14},
                     "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 768, "heads": 12, "layers": 12}},
    "ViT-H-14": {"embed_dim": 1024,
                 "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24}},
    "ViT-g-14": {"embed_dim": 1024, "vision_cfg": {"image_size": 224, "layers": 40, "width": 1408, "head_width": 88,
                                                   "mlp_ratio": 4.3637, "patch_size": 14},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24}},
    "ViT-bigG-14": {"embed_dim": 1280, "vision_cfg": {"image_size": 224, "layers": 48, "width": 1664, "head_width": 104,
                                                      "mlp_ratio": 4.9231, "patch_size": 14},
                    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1280, "heads": 20, "layers": 32}},
}
for _name in ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-H-14", "ViT-bigG-14"):  # open_clip has no g-14 one
    OPEN_CLIP_ARCHS[_name + "-quickgelu"] = {**OPEN_CLIP_ARCHS[_name], "quick_gelu": True}


def shrink_open_clip_config(arch: str, *, width: int = 32, layers: int = 2, embed_dim: int = 16) -> dict[str, Any]:
    """``arch``'s open_clip model config (:data:`OPEN_CLIP_ARCHS`) shrunk for fast tests: towers
    ``width`` wide (2 heads) and ``layers`` deep, the image 2-4 patches a side (336px archs 4),
    everything else (patch size, MLP ratio, activation, context length, vocabulary) as released."""
    import copy

    cfg = copy.deepcopy(OPEN_CLIP_ARCHS[arch])
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    grid = 4 if v["image_size"] == 336 else (2 if v["patch_size"] == 32 else 3)
    v.update(width=width, layers=layers, head_width=width // 2, image_size=v["patch_size"] * grid)
    t.update(width=width, layers=layers, heads=2)
    cfg["embed_dim"] = embed_dim
    return cfg


def build_tiny_open_clip(
    out_dir: str | Path,
    *,
    arch: str = "ViT-B-32",
    width: int = 32,
    layers: int = 2,
    embed_dim: int = 16,
    model_cfg: dict[str, Any] | None = None,
    preprocess_cfg: dict[str, Any] | None = None,
    seed: int = 0,
    weights: str = "safetensors",
) -> Path:
    """Save a random-weight open_clip checkpoint as open_clip's ``push_to_hf_hub`` lays it out:
    ``open_clip_config.json`` (``model_cfg``: ``arch`` shrunk by :func:`shrink_open_clip_config`, or
    ``model_cfg`` as given; ``preprocess_cfg``) and ``open_clip_model.safetensors`` (``weights=
    "safetensors"``) or ``open_clip_pytorch_model.bin`` (``"bin"``, a plain ``torch.save``). Every
    weight is random (LayerNorm weights around 1), so a wrong mapping shows. Built without open_clip:
    a transformers ``CLIPModel`` of the same config, its state dict mapped to open_clip's names."""
    import torch
    from safetensors.torch import save_file

    from phiclip.open_clip.config import parse_config  # lazy: testing is imported without torch
    from phiclip.open_clip.convert import build_clip_model, from_hf_state_dict  # lazy: as above

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model_cfg if model_cfg is not None else shrink_open_clip_config(arch, width=width, layers=layers,
                                                                          embed_dim=embed_dim)
    size = cfg["vision_cfg"]["image_size"]
    data = {"model_cfg": cfg, "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                                                 "std": [0.26862954, 0.26130258, 0.27577711], **(preprocess_cfg or {})}}
    parsed = parse_config(data, "tiny")
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(**parsed.hf_config_dict()))
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("position_ids"):
            continue
        noise = torch.randn(tensor.shape, generator=gen) * 0.05
        is_norm = ("layer_norm" in name or "layrnorm" in name or "layernorm" in name) and name.endswith("weight")
        state[name] = noise + 1.0 if is_norm else noise
    state["logit_scale"] = torch.tensor(4.6052)
    build_clip_model(parsed.hf_config_dict(), state)  # checks names and shapes
    oc_state = {k: v.contiguous() for k, v in from_hf_state_dict(state).items()}
    if weights == "safetensors":
        save_file(oc_state, str(out / "open_clip_model.safetensors"))
    elif weights == "bin":
        torch.save(oc_state, str(out / "open_clip_pytorch_model.bin"))
    else:
        raise ValueError(f"weights={weights!r}: safetensors or bin")
    (out / "open_clip_config.json").write_text(json.dumps(data, indent=2), encoding="utf-8")
    assert size == parsed.preprocess.size
    return out


# --------------------------------------------------------------------------------------------------
# SigLIP 2, MetaCLIP 2, AIMv2, DINOv2 and DINOv3 checkpoints (phiclip.encoders.siglip2 / metaclip2 /
# aimv2 / dino): tiny random configs saved with save_pretrained, processor and tokenizer files
# --------------------------------------------------------------------------------------------------
def _tiny_tower(hidden_size: int, num_layers: int, num_heads: int, **extra: Any) -> dict[str, Any]:
    return dict(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                num_attention_heads=num_heads, **extra)


def _perturb_and_save(model: Any, out: Path, seed: int) -> None:
    """Add noise to every weight (transformers' init leaves norms at 1/0 and register tokens at 0,
    where a wrong mapping or a skipped step would not show), then ``save_pretrained``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    model.eval().save_pretrained(out, safe_serialization=True)


def build_tiny_siglip2(
    out_dir: str | Path,
    *,
    naflex: bool = True,
    patch_size: int = 8,
    max_num_patches: int = 24,
    image_size: int = 32,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    text_max_length: int = 16,
    seed: int = 0,
) -> Path:
    """Save a random-weight SigLIP 2 checkpoint as the released ones are laid out: NaFlex
    (``Siglip2Model``, ``model_type`` siglip2, ``Siglip2ImageProcessor`` with ``patch_size`` and
    ``max_num_patches``) or, with ``naflex=False``, fixed resolution (``SiglipModel``, ``model_type``
    siglip, ``image_size`` square), with the tiny SentencePiece-style tokenizer of
    :func:`build_tiny_siglip_tokenizer` (the released ones ship Gemma's)."""
    import torch
    from transformers import (
        Siglip2Config,
        Siglip2ImageProcessorPil,
        Siglip2Model,
        SiglipConfig,
        SiglipImageProcessorPil,
        SiglipModel,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_siglip_tokenizer(model_max_length=text_max_length)
    text = _tiny_tower(hidden_size, num_layers, num_heads, vocab_size=len(tokenizer),
                       max_position_embeddings=text_max_length, pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    if naflex:
        vision = _tiny_tower(hidden_size, num_layers, num_heads, patch_size=patch_size, num_patches=16)
        model: Any = Siglip2Model(Siglip2Config(text_config=text, vision_config=vision))
        processor: Any = Siglip2ImageProcessorPil(patch_size=patch_size, max_num_patches=max_num_patches)
    else:
        vision = _tiny_tower(hidden_size, num_layers, num_heads, patch_size=patch_size, image_size=image_size)
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
        processor = SiglipImageProcessorPil(size={"height": image_size, "width": image_size}, resample=2,
                                            image_mean=[0.5] * 3, image_std=[0.5] * 3)
    _perturb_and_save(model, out, seed)
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_tiny_xlmr_tokenizer(*, model_max_length: int = 16) -> Any:
    """A tiny XLM-RoBERTa-style tokenizer (MetaCLIP 2's): ``<s>`` 0, ``<pad>`` 1, ``</s>`` 2,
    ``<unk>`` 3, Unigram pieces with the ``▁`` word marker, ``<s> text </s>``; built with
    ``tokenizers`` alone (loads offline)."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pieces: list[tuple[str, float]] = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -3.0) for w in _SIGLIP_WORDS]
    pieces += [(c, -6.0) for c in string.ascii_letters + string.digits + string.punctuation]
    tok = Tokenizer(models.Unigram(pieces, unk_id=3, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=model_max_length,
                                   model_input_names=["input_ids", "attention_mask"])


def build_tiny_metaclip2(
    out_dir: str | Path,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    projection_dim: int = 16,
    text_max_length: int = 16,
    seed: int = 0,
) -> Path:
    """Save a random-weight ``MetaClip2Model`` with a CLIP image processor (shortest edge, centre crop)
    and the tiny XLM-R-style tokenizer of :func:`build_tiny_xlmr_tokenizer`."""
    import torch
    from transformers import CLIPImageProcessorPil, MetaClip2Config, MetaClip2Model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_xlmr_tokenizer(model_max_length=text_max_length)
    text = _tiny_tower(hidden_size, num_layers, num_heads, vocab_size=len(tokenizer),
                       max_position_embeddings=text_max_length, bos_token_id=0, pad_token_id=1, eos_token_id=2)
    vision = _tiny_tower(hidden_size, num_layers, num_heads, image_size=image_size, patch_size=patch_size)
    torch.manual_seed(seed)
    model = MetaClip2Model(MetaClip2Config(text_config=text, vision_config=vision, projection_dim=projection_dim))
    _perturb_and_save(model, out, seed)
    CLIPImageProcessorPil(size={"shortest_edge": image_size},
                          crop_size={"height": image_size, "width": image_size}).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_tiny_aimv2(
    out_dir: str | Path,
    *,
    lit: bool = True,
    use_head: bool = True,
    image_size: int = 28,
    patch_size: int = 14,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    projection_dim: int = 16,
    text_max_length: int = 16,
    seed: int = 0,
) -> Path:
    """Save a random-weight AIMv2 checkpoint: LiT (``Aimv2Model``, image and text, with the tiny CLIP
    BPE tokenizer of :func:`write_tiny_clip_tokenizer_files`) or, with ``lit=False``, image-only
    (``Aimv2VisionModel``, ``model_type`` aimv2_vision_model; ``use_head=False``: no pooling head),
    with a CLIP image processor (shortest edge, centre crop)."""
    import torch
    from transformers import (
        Aimv2Config,
        Aimv2Model,
        Aimv2VisionConfig,
        Aimv2VisionModel,
        CLIPImageProcessorPil,
        CLIPTokenizer,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vision = _tiny_tower(hidden_size, num_layers, num_heads, image_size=image_size, patch_size=patch_size,
                         use_head=use_head)
    torch.manual_seed(seed)
    tokenizer = None
    if lit:
        tok_dir = out / "_tok"
        vocab_file, merges_file = write_tiny_clip_tokenizer_files(tok_dir)
        tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=text_max_length)
        for f in tok_dir.iterdir():
            f.unlink()
        tok_dir.rmdir()
        text = _tiny_tower(hidden_size, num_layers, num_heads, vocab_size=len(tokenizer),
                           max_position_embeddings=text_max_length, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
        model: Any = Aimv2Model(Aimv2Config(text_config=text, vision_config=vision, projection_dim=projection_dim))
    else:
        model = Aimv2VisionModel(Aimv2VisionConfig(**vision))
    _perturb_and_save(model, out, seed)
    CLIPImageProcessorPil(size={"shortest_edge": image_size},
                          crop_size={"height": image_size, "width": image_size}).save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def build_tiny_dinov2(
    out_dir: str | Path,
    *,
    registers: int = 0,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    seed: int = 0,
) -> Path:
    """Save a random-weight ``Dinov2Model`` (``registers=0``) or ``Dinov2WithRegistersModel`` with
    the released checkpoints' ``BitImageProcessor`` geometry scaled down (shorter side to
    ``image_size * 8 / 7``, bicubic, centre crop ``image_size``, ImageNet mean/std)."""
    import torch
    from transformers import (
        BitImageProcessorPil,
        Dinov2Config,
        Dinov2Model,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tower = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                 image_size=image_size, patch_size=patch_size)
    torch.manual_seed(seed)
    if registers:
        model: Any = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**tower, num_register_tokens=registers))
    else:
        model = Dinov2Model(Dinov2Config(**tower))
    _perturb_and_save(model, out, seed)
    BitImageProcessorPil(size={"shortest_edge": image_size * 8 // 7}, crop_size={"height": image_size, "width": image_size},
                         resample=3, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(out)
    return out


def build_tiny_dinov3(
    out_dir: str | Path,
    *,
    registers: int = 4,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    seed: int = 0,
) -> Path:
    """Save a random-weight ``DINOv3ViTModel`` and the released checkpoints' image processor settings
    (``DINOv3ViTImageProcessorFast``: resize to ``image_size`` square, bilinear, ImageNet mean/std),
    written as data: transformers has that processor for torchvision only."""
    import torch
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = DINOv3ViTModel(DINOv3ViTConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                                           num_hidden_layers=num_layers, num_attention_heads=num_heads,
                                           image_size=image_size, patch_size=patch_size, num_register_tokens=registers))
    _perturb_and_save(model, out, seed)
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "DINOv3ViTImageProcessorFast", "do_resize": True,
        "size": {"height": image_size, "width": image_size}, "resample": 2, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225]}, indent=2), encoding="utf-8")
    return out
