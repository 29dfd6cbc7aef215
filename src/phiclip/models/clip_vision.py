"""The CLIP vision tower, once: used by Phi-3-vision's image path (:mod:`phiclip.phi3v.modeling`,
truncated at the layer it reads) and by the CLIP fast path (:class:`CLIPImageFeatures`, sharing a
transformers ``CLIPModel``'s tensors).

Reads bottom-up like a transformers modeling file; attribute names are the checkpoint's
(``pre_layrnorm`` included), so loading is a plain state-dict load. Shapes use ``C`` for crops (or
images), ``L`` for tokens and ``D`` for the tower width.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from phiclip.models.clip_config import SUPPORTED_ACTIVATIONS, CLIPVisionConfig


def activation(name: str) -> nn.Module:
    """transformers' activation ``name`` as a module."""
    if name == "quick_gelu":
        return QuickGELU()
    if name in ("gelu", "gelu_python"):
        return nn.GELU()
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return nn.GELU(approximate="tanh")
    raise ValueError(f"hidden_act {name!r} is not supported (quick_gelu, gelu, gelu_new)")


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``; in place when no gradient is needed (saves a pass over the MLP's
    widest activation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            return x * torch.sigmoid(1.702 * x)
        gate = x * 1.702
        return x.mul_(gate.sigmoid_())


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.patch_size = config.patch_size
        self.num_patches = config.grid**2
        self.class_embedding = nn.Parameter(torch.empty(d))
        self.patch_embedding = nn.Conv2d(config.num_channels, d, kernel_size=config.patch_size, stride=config.patch_size, bias=False)
        self.position_embedding = nn.Embedding(self.num_patches + 1, d)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        c = pixel_values.shape[0]
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(dtype))  # (C, D, g, g)
        patches = patches.flatten(2).transpose(1, 2)  # (C, g*g, D)
        cls = self.class_embedding.to(dtype).expand(c, 1, -1)  # (C, 1, D)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight[None]  # (C, 1 + g*g, D)


class CLIPAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_attention_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, n, d = x.shape
        # One matrix product for q, k and v (the weights stay separate, under their checkpoint names).
        weight = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])  # (3D, D)
        bias = torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])  # (3D,)
        # (C, L, 3D) -> (C, L, 3, heads, head_dim) -> (3, C, heads, L, head_dim)
        qkv = F.linear(x, weight, bias).view(c, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (C, heads, L, head_dim), scale 1/sqrt(head_dim)
        return self.out_proj(out.transpose(1, 2).reshape(c, n, d))

    def forward_first_query(self, x: torch.Tensor) -> torch.Tensor:
        """Attention output for the first position only (every key and value still read): ``(C, L, D) -> (C, 1, D)``."""
        c, n, d = x.shape
        q = F.linear(x[:, :1], self.q_proj.weight, self.q_proj.bias)  # (C, 1, D)
        kv_weight = torch.cat([self.k_proj.weight, self.v_proj.weight])  # (2D, D)
        kv_bias = torch.cat([self.k_proj.bias, self.v_proj.bias])
        # (C, L, 2D) -> (C, L, 2, heads, head_dim) -> (2, C, heads, L, head_dim)
        kv = F.linear(x, kv_weight, kv_bias).view(c, n, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q = q.view(c, 1, self.num_heads, self.head_dim).transpose(1, 2)  # (C, heads, 1, head_dim)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1]).transpose(1, 2).reshape(c, 1, d)
        return self.out_proj(out)


class CLIPMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.activation_fn = activation(hidden_act)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        d, eps = config.hidden_size, config.layer_norm_eps
        self.layer_norm1 = nn.LayerNorm(d, eps=eps)
        self.self_attn = CLIPAttention(d, config.num_attention_heads)
        self.layer_norm2 = nn.LayerNorm(d, eps=eps)
        self.mlp = CLIPMLP(d, config.intermediate_size, config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))

    def forward_first_token(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's output at the first position (CLS) only: ``(C, L, D) -> (C, 1, D)``."""
        cls = x[:, :1] + self.self_attn.forward_first_query(self.layer_norm1(x))  # (C, 1, D)
        return cls + self.mlp(self.layer_norm2(cls))


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPVisionConfig, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(config) for _ in range(num_layers)])


class CLIPVisionTransformer(nn.Module):
    """``embeddings -> pre_layrnorm -> encoder.layers[:num_layers]`` (all layers when ``num_layers``
    is None). ``post_layernorm`` is not built: callers that need it hold it (:class:`CLIPImageFeatures`)."""

    def __init__(self, config: CLIPVisionConfig, num_layers: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoder(config, config.num_hidden_layers if num_layers is None else num_layers)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(C, 3, S, S)`` -> hidden state after the last built layer ``(C, 1 + g*g, D)``."""
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        for layer in self.encoder.layers:
            x = layer(x)
        return x

    def forward_cls(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(C, 3, S, S)`` -> the CLS state after the last built layer ``(C, D)``, running that layer
        for the CLS query only (it is the only position read)."""
        x = self.pre_layrnorm(self.embeddings(pixel_values))  # (C, 1 + g*g, D)
        *body, last = self.encoder.layers
        for layer in body:
            x = layer(x)
        return last.forward_first_token(x)[:, 0]


class CLIPImageFeatures(nn.Module):
    """A faster ``CLIPModel.get_image_features``: ``pixel_values (n, 3, S, S) -> (n, projection_dim)``,
    ``visual_projection(post_layernorm(CLS after the last layer))`` with these layers (one fused q/k/v
    product, the quick-GELU gate in place, the last layer for the CLS query only). Shares the
    transformers model's tensors (no copy). Equal to ``get_image_features`` within float rounding."""

    def __init__(self, tower: CLIPVisionTransformer, post_layernorm: nn.LayerNorm, visual_projection: nn.Linear) -> None:
        super().__init__()
        self.tower = tower
        self.post_layernorm = post_layernorm
        self.visual_projection = visual_projection

    @classmethod
    def from_clip_model(cls, model: Any) -> CLIPImageFeatures | None:
        """Build from a transformers ``CLIPModel`` sharing its tensors; ``None`` when its vision
        config is one this module does not reproduce (then use ``get_image_features``)."""
        vision = getattr(model, "vision_model", None)
        hf_config = getattr(getattr(model, "config", None), "vision_config", None)
        if vision is None or hf_config is None or getattr(hf_config, "hidden_act", None) not in SUPPORTED_ACTIVATIONS:
            return None
        with torch.device("meta"):
            tower = CLIPVisionTransformer(CLIPVisionConfig.from_hf(hf_config))
        ours = tower.state_dict()
        theirs = {k: v for k, v in vision.state_dict().items() if k in ours}
        if set(theirs) != set(ours):
            return None  # a layout this module does not know
        tower.load_state_dict(theirs, strict=True, assign=True)  # the same tensors, not copies
        return cls(tower, vision.post_layernorm, model.visual_projection).eval()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        cls = self.tower.forward_cls(pixel_values)  # (n, D)
        return self.visual_projection(self.post_layernorm(cls))  # (n, projection_dim)


__all__ = [
    "CLIPAttention",
    "CLIPEncoder",
    "CLIPEncoderLayer",
    "CLIPImageFeatures",
    "CLIPMLP",
    "CLIPVisionConfig",
    "CLIPVisionEmbeddings",
    "CLIPVisionTransformer",
    "QuickGELU",
    "activation",
]
