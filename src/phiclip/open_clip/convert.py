"""open_clip state dicts <-> transformers ``CLIPModel`` state dicts (the same tensors, renamed;
attention's packed ``in_proj`` split into q/k/v; projections transposed).

=========================================================  ===========================================================
open_clip                                                  transformers ``CLIPModel``
=========================================================  ===========================================================
``visual.conv1.weight``                                    ``vision_model.embeddings.patch_embedding.weight``
``visual.class_embedding``                                 ``vision_model.embeddings.class_embedding``
``visual.positional_embedding``                            ``vision_model.embeddings.position_embedding.weight``
``visual.ln_pre.*``                                        ``vision_model.pre_layrnorm.*``
``visual.transformer.resblocks.N.ln_1`` / ``ln_2``         ``vision_model.encoder.layers.N.layer_norm1`` / ``2``
``...attn.in_proj_weight`` / ``in_proj_bias`` (3W rows)    ``...self_attn.{q,k,v}_proj.weight`` / ``.bias``
``...attn.out_proj.*``                                     ``...self_attn.out_proj.*``
``...mlp.c_fc.*`` / ``mlp.c_proj.*``                       ``...mlp.fc1.*`` / ``mlp.fc2.*``
``visual.ln_post.*``                                       ``vision_model.post_layernorm.*``
``visual.proj`` (W x E)                                    ``visual_projection.weight`` (E x W, transposed)
``token_embedding.weight``, ``positional_embedding``       ``text_model.embeddings.{token,position}_embedding.weight``
``transformer.resblocks.N.*``                              ``text_model.encoder.layers.N.*`` (as above)
``ln_final.*``                                             ``text_model.final_layer_norm.*``
``text_projection`` (W x E)                                ``text_projection.weight`` (E x W, transposed)
``logit_scale``                                            ``logit_scale``
=========================================================  ===========================================================

A ``CustomTextCLIP`` keeps the text tower under ``text.`` (``text.token_embedding.weight``...).
``logit_bias`` (open_clip's SigLIP-style bias) has no place in ``CLIPModel``: it is returned apart.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from phiclip.hub import CheckpointError

if TYPE_CHECKING:
    import torch

_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
          "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_FIXED = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_TOWERS = (("visual.transformer.resblocks.", "vision_model.encoder.layers."),
           ("transformer.resblocks.", "text_model.encoder.layers."))
_BLOCK_KEY = re.compile(r"^(\d+)\.(.+)\.(weight|bias)$")
_IN_PROJ = re.compile(r"^(visual\.transformer\.resblocks\.|transformer\.resblocks\.)(\d+)\.attn\.in_proj_(weight|bias)$")
#: Buffers open_clip may keep in a state dict that are not weights.
_BUFFERS = ("attn_mask",)


def _text_prefixed(state: Mapping[str, Any]) -> bool:
    return any(k.startswith("text.") for k in state)


def _block_to_hf(key: str, tensor: torch.Tensor, out: dict[str, torch.Tensor]) -> bool:
    """Put one transformer-block tensor into ``out`` under its transformers name; False: not one."""
    m = _IN_PROJ.match(key)
    if m is not None:
        dst = dict(_TOWERS)[m.group(1)]
        if tensor.shape[0] % 3:
            raise CheckpointError(f"{key}: shape {tuple(tensor.shape)} is not three stacked projections")
        for part, chunk in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
            out[f"{dst}{m.group(2)}.self_attn.{part}.{m.group(3)}"] = chunk.contiguous()
        return True
    for src, dst in _TOWERS:
        if key.startswith(src):
            b = _BLOCK_KEY.match(key[len(src):])
            if b is None or b.group(2) not in _BLOCK:
                return False
            out[f"{dst}{b.group(1)}.{_BLOCK[b.group(2)]}.{b.group(3)}"] = tensor
            return True
    return False


def to_hf_state_dict(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """open_clip ``CLIP`` state dict -> (``CLIPModel`` state dict, ``logit_bias`` or None).

    Raises:
        CheckpointError: a tensor phiclip does not know (naming it), or a missing q/k/v part.
    """
    custom = _text_prefixed(state)
    out: dict[str, torch.Tensor] = {}
    logit_bias = None
    unknown = []
    for name, tensor in state.items():
        key = name[len("text."):] if custom and name.startswith("text.") else name
        if key in _BUFFERS:
            continue
        if key == "logit_bias":
            logit_bias = tensor
        elif key in _FIXED:
            out[_FIXED[key]] = tensor
        elif key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = tensor.t().contiguous()
        elif not _block_to_hf(key, tensor, out):
            unknown.append(name)
    if unknown:
        shown = ", ".join(sorted(unknown)[:6])
        raise CheckpointError(f"the open_clip weights hold tensors phiclip does not know ({len(unknown)}: {shown}); "
                              "they belong to an architecture phiclip does not load")
    return out, logit_bias


def from_hf_state_dict(state: Mapping[str, torch.Tensor], logit_bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``CLIPModel`` state dict -> open_clip ``CLIP`` state dict (q/k/v packed again).

    Raises:
        CheckpointError: a tensor with no open_clip counterpart (naming it).
    """
    import torch

    fixed = {v: k for k, v in _FIXED.items()}
    transposed = {v: k for k, v in _TRANSPOSED.items()}
    block = {v: k for k, v in _BLOCK.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for name, tensor in state.items():
        if name.endswith("position_ids"):
            continue
        if name in fixed:
            out[fixed[name]] = tensor
            continue
        if name in transposed:
            out[transposed[name]] = tensor.t().contiguous()
            continue
        for src, dst in _TOWERS:
            if name.startswith(dst):
                m = _BLOCK_KEY.match(name[len(dst):])
                if m is None:
                    unknown.append(name)
                    break
                layer, part, kind = m.groups()
                if part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                    qkv.setdefault((src, layer, kind), {})[part[-6:]] = tensor
                elif part in block:
                    out[f"{src}{layer}.{block[part]}.{kind}"] = tensor
                else:
                    unknown.append(name)
                break
        else:
            unknown.append(name)
    for (src, layer, kind), parts in qkv.items():
        if set(parts) != {"q_proj", "k_proj", "v_proj"}:
            raise CheckpointError(f"layer {src}{layer}: q/k/v {kind} incomplete ({sorted(parts)})")
        out[f"{src}{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]], 0)
    if unknown:
        raise CheckpointError(f"the CLIPModel holds tensors with no open_clip counterpart: {sorted(unknown)[:6]}")
    if logit_bias is not None:
        out["logit_bias"] = logit_bias
    return out


def build_clip_model(hf_config_dict: dict[str, Any], state: Mapping[str, torch.Tensor]) -> Any:
    """A float32 transformers ``CLIPModel`` of ``hf_config_dict`` holding ``state`` (strict: every
    tensor present, none left over)."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(**hf_config_dict)
    with torch.device("meta"):
        model = CLIPModel(config)
    expected = {k for k in model.state_dict() if not k.endswith("position_ids")}
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        raise CheckpointError(f"the open_clip weights do not fit the config: missing {missing[:6]}, "
                              f"unexpected {extra[:6]}")
    shapes = model.state_dict()
    for name in expected:
        if tuple(shapes[name].shape) != tuple(state[name].shape):
            raise CheckpointError(f"{name}: the weights have shape {tuple(state[name].shape)}, the config makes "
                                  f"{tuple(shapes[name].shape)}")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()},
                          strict=False, assign=True)
    # Non-persistent buffers (position ids) were built on the meta device: make them again.
    for module in model.modules():
        for buf_name, buf in list(module.named_buffers(recurse=False)):
            if buf.device.type == "meta":
                n = buf.shape[-1]
                module.register_buffer(buf_name, torch.arange(n).expand(buf.shape).clone(), persistent=False)
    return model.eval()


__all__ = ["build_clip_model", "from_hf_state_dict", "to_hf_state_dict"]
