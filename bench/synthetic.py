"""A full-size synthetic Phi-3-vision checkpoint: the real shapes and key names, random values.

About 4.15 B parameters in bfloat16 (~8.3 GB) in two shards with an index, like the released
``microsoft/Phi-3-vision-128k-instruct``: the first shard holds ``model.embed_tokens``, the image
path (``model.vision_embed_tokens.*``) and the first language-model layers; the second the rest.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

HIDDEN, INTER, LAYERS, VOCAB = 3072, 8192, 32, 32064
VIT = {"hidden": 1024, "inter": 4096, "layers": 24, "patch": 14, "image": 336}


def lm_shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes[p + "self_attn.qkv_proj.weight"] = (3 * HIDDEN, HIDDEN)
        shapes[p + "self_attn.o_proj.weight"] = (HIDDEN, HIDDEN)
        shapes[p + "mlp.gate_up_proj.weight"] = (2 * INTER, HIDDEN)
        shapes[p + "mlp.down_proj.weight"] = (HIDDEN, INTER)
        shapes[p + "input_layernorm.weight"] = (HIDDEN,)
        shapes[p + "post_attention_layernorm.weight"] = (HIDDEN,)
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    return shapes


def vision_shapes() -> dict[str, tuple[int, ...]]:
    d, f = VIT["hidden"], VIT["inter"]
    g = VIT["image"] // VIT["patch"]
    p = "model.vision_embed_tokens.img_processor.vision_model."
    shapes: dict[str, tuple[int, ...]] = {
        p + "embeddings.class_embedding": (d,),
        p + "embeddings.patch_embedding.weight": (d, 3, VIT["patch"], VIT["patch"]),
        p + "embeddings.position_embedding.weight": (g * g + 1, d),
        p + "pre_layrnorm.weight": (d,), p + "pre_layrnorm.bias": (d,),
        p + "post_layernorm.weight": (d,), p + "post_layernorm.bias": (d,),
    }
    for i in range(VIT["layers"]):
        q = p + f"encoder.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[q + f"self_attn.{n}.weight"] = (d, d)
            shapes[q + f"self_attn.{n}.bias"] = (d,)
        for n in ("layer_norm1", "layer_norm2"):
            shapes[q + f"{n}.weight"] = (d,)
            shapes[q + f"{n}.bias"] = (d,)
        shapes[q + "mlp.fc1.weight"], shapes[q + "mlp.fc1.bias"] = (f, d), (f,)
        shapes[q + "mlp.fc2.weight"], shapes[q + "mlp.fc2.bias"] = (d, f), (d,)
    v = "model.vision_embed_tokens."
    shapes[v + "glb_GN"] = (1, 1, 4 * d)
    shapes[v + "sub_GN"] = (1, 1, 1, 4 * d)
    shapes[v + "img_projection.0.weight"], shapes[v + "img_projection.0.bias"] = (HIDDEN, 4 * d), (HIDDEN,)
    shapes[v + "img_projection.2.weight"], shapes[v + "img_projection.2.bias"] = (HIDDEN, HIDDEN), (HIDDEN,)
    return shapes


def build_full_size_phi3v(out_dir: str | Path, first_shard_layers: int = 18, seed: int = 0) -> Path:
    """Write the checkpoint (config.json, preprocessor_config.json, index, 2 shards). Returns the dir."""
    from safetensors.torch import save_file

    from phiclip.testing import phi3v_config_dict

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(phi3v_config_dict(), indent=2))
    (out / "preprocessor_config.json").write_text(json.dumps({"num_crops": 16}))
    gen = torch.Generator().manual_seed(seed)
    lm, vis = lm_shapes(), vision_shapes()
    first_keys = ["model.embed_tokens.weight", *vis] + [k for k in lm if k.startswith("model.layers.")
                                                          and int(k.split(".")[2]) < first_shard_layers]
    second_keys = [k for k in lm if k not in first_keys]
    shapes = {**lm, **vis}
    weight_map, total = {}, 0
    for i, keys in enumerate((first_keys, second_keys), start=1):
        name = f"model-{i:05d}-of-00002.safetensors"
        tensors = {k: (torch.randn(shapes[k], generator=gen, dtype=torch.float32) * 0.02).to(torch.bfloat16) for k in keys}
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        for k in keys:
            weight_map[k] = name
            total += tensors[k].numel() * 2
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return out


def parameter_counts() -> tuple[int, int]:
    """(all parameters, image-path parameters) of the synthetic checkpoint."""
    import math

    lm, vis = lm_shapes(), vision_shapes()
    n_vis = sum(math.prod(s) for s in vis.values())
    return sum(math.prod(s) for s in lm.values()) + n_vis, n_vis
