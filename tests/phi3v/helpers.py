"""Helpers shared by the Phi-3-vision tests: the tiny tower's config and checkpoint file tools."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from phiclip.testing import TINY_PHI3V_VISION

# A tower that keeps the released geometry (336 px, patch 14: a 24x24 grid) at a tiny width: the one
# phiclip.testing builds by default.
TINY_TOWER = dict(TINY_PHI3V_VISION)


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
