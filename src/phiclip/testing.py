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

# Colours and shapes of the generated labelled images ("a red circle", ...).
SAMPLE_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 40),
}
SAMPLE_SHAPES = ("circle", "square", "triangle")


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of byte-level BPE (as GPT-2 and CLIP use)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_tiny_clip_tokenizer_files(out_dir: str | Path) -> tuple[Path, Path]:
    """Write a tiny byte-level BPE vocabulary (vocab.json, merges.txt) for ``CLIPTokenizer``.

    Every byte is a token (so any text tokenises); a few merges make common words whole tokens.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chars = sorted(set(_bytes_to_unicode().values()))
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
) -> Path:
    """Save a random-weight ``CLIPModel`` with its ``CLIPProcessor`` as ``from_pretrained`` expects.

    The layout is the hub's: ``config.json``, ``model.safetensors``, ``preprocessor_config.json``
    and the tokenizer files. Pass ``hidden_size=768, num_layers=12, num_heads=12,
    patch_size=32, projection_dim=512`` (and an MLP of 3072) for a real-size ViT-B/32 architecture.
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
