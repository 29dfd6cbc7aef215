"""Helpers shared by the Phi-3-vision tests: the tiny tower's config and checkpoint file tools."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

# A tower that keeps the released geometry (336 px, patch 14: a 24x24 grid) at a tiny width.
TINY_TOWER = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "image_size": 336,
    "patch_size": 14,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}


def copy_ckpt(src: Path, dst: Path) -> Path:
    """A private, modifiable copy of a shared checkpoint."""
    shutil.copytree(src, dst)
    return dst


def last_shard(ckpt: Path) -> str:
    """The name of the shard that holds only language-model tensors (the last one)."""
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    last = shards[-1]
    held = [k for k, v in index["weight_map"].items() if v == last]
    assert held and not any(k.startswith("model.vision_embed_tokens.") or k == "model.embed_tokens.weight" for k in held)
    return last
