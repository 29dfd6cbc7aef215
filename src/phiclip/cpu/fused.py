"""The CLIP vision tower in bfloat16 on the CPU with oneDNN's fused linears (inference only).

phiclip's bfloat16 CPU path otherwise runs every element-wise step as its own pass over bfloat16
tensors: the bias of each product, quick-GELU's multiply and sigmoid, both residual adds. Here
every matrix product is a oneDNN inner product on a weight prepacked once
(``torch.ops.mkldnn._reorder_linear_weight``) with those steps fused as post-ops
(``torch.ops.mkldnn._linear_pointwise``):

* bias: always in the product;
* the MLP activation: ``swish`` for quick-GELU (below), ``gelu`` (exact, or ``tanh`` for
  ``gelu_new`` / ``gelu_pytorch_tanh``);
* the residual adds: the attention output product and the second MLP product add the residual
  stream themselves (``_linear_pointwise.binary(..., "add")``).

quick-GELU is ``h * sigmoid(1.702 h)``. With ``fc1``'s weight and bias scaled by 1.702 (in float32,
then rounded) the ``swish`` post-op gives ``1.702 h * sigmoid(1.702 h) = 1.702 quick_gelu(h)``, and
``fc2``'s weight scaled by ``1 / 1.702`` undoes the factor.

The patch embedding (a convolution whose stride is its kernel) is a product over unfolded patches;
q, k and v are one product on a weight concatenated once. Layer norms and attention
(``scaled_dot_product_attention``) stay torch ops, in bfloat16.

:func:`fused_cpu_copy` builds these modules FROM phiclip's float modules
(:class:`~phiclip.models.clip_vision.CLIPVisionTransformer`,
:class:`~phiclip.models.clip_vision.CLIPImageFeatures`), copying the weights (the source module is
left as it is), or answers ``None`` where fusion is unavailable: callers then fall back to
:func:`phiclip.cpu.int8.float_copy`. The prepacked weights are opaque oneDNN tensors held as plain
attributes (not parameters, buffers or state-dict entries): these modules cannot be moved, saved or
trained. Shapes use ``C`` for crops (or images), ``L`` for tokens, ``D`` for the tower width and
``I`` for the MLP width.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from phiclip.models.clip_vision import CLIPImageFeatures, CLIPVisionTransformer, QuickGELU

#: The dtype these kernels run in (oneDNN's fused bfloat16 inner products; AMX or AVX512-BF16).
FUSED_DTYPE = torch.bfloat16

#: quick-GELU's gate factor: ``x * sigmoid(1.702 x)``.
QUICK_GELU_SCALE = 1.702

#: What encoders record under ``precision["cpu_kernels"]``.
KERNELS_FUSED = "onednn-fused"
KERNELS_TORCH = "torch"

# post-op name -> (attr, algorithm) of ``_linear_pointwise``
_POST_OPS = {"none": ("none", ""), "swish": ("swish", ""), "gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh")}


def _ops() -> tuple[Any, Any]:
    return torch.ops.mkldnn._linear_pointwise, torch.ops.mkldnn._reorder_linear_weight


@functools.cache
def fusion_available() -> bool:
    """Whether this torch build runs oneDNN's fused bfloat16 linears here: one tiny call of every
    kind this module makes (plain, ``swish``, both ``gelu`` and the residual add), checked once
    per process against float32."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        lp, rw = _ops()
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(8, 16, generator=gen)
        b = torch.randn(8, generator=gen)
        x = torch.randn(3, 16, generator=gen)
        r = torch.randn(3, 8, generator=gen)
        packed = rw(w.to(FUSED_DTYPE))
        xb, bb = x.to(FUSED_DTYPE), b.to(FUSED_DTYPE)
        ref = F.linear(xb.float(), w.to(FUSED_DTYPE).float(), bb.float())
        outs = {
            "none": (lp(xb, packed, bb, "none", [], ""), ref),
            "swish": (lp(xb, packed, bb, "swish", [], ""), F.silu(ref)),
            "gelu": (lp(xb, packed, bb, "gelu", [], "none"), F.gelu(ref)),
            "gelu_tanh": (lp(xb, packed, bb, "gelu", [], "tanh"), F.gelu(ref, approximate="tanh")),
            "add": (lp.binary(xb, r.to(FUSED_DTYPE), packed, bb, "add"), ref + r.to(FUSED_DTYPE).float()),
        }
        return all(out.dtype == FUSED_DTYPE and out.shape == want.shape
                   and torch.allclose(out.float(), want, atol=0.1, rtol=0.05) for out, want in outs.values())
    except (AttributeError, RuntimeError, NotImplementedError, TypeError):
        return False


# ==============================================================================================
# One prepacked product
# ==============================================================================================
class FusedLinear(nn.Module):
    """``post(x @ W^T + b)`` or ``x @ W^T + b + residual`` on a prepacked bfloat16 weight:
    ``(N, in) -> (N, out)``.

    Args:
        weight: ``(out, in)`` float weight (copied; scaled by ``weight_scale`` in float32 first).
        bias: ``(out,)`` or None (scaled by ``bias_scale``).
        post: ``none``, ``swish``, ``gelu`` or ``gelu_tanh``.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, post: str = "none", *,
                 weight_scale: float = 1.0, bias_scale: float = 1.0) -> None:
        super().__init__()
        if post not in _POST_OPS:
            raise ValueError(f"post-op {post!r} is not one of {tuple(_POST_OPS)}")
        self.out_features, self.in_features = (int(s) for s in weight.shape)
        self.post = post
        self._attr, self._algorithm = _POST_OPS[post]
        w = weight.detach().float() * weight_scale if weight_scale != 1.0 else weight.detach()
        _, rw = _ops()
        self.packed = rw(w.to(FUSED_DTYPE).contiguous())  # opaque oneDNN layout, (out, in)
        self.bias = None if bias is None else (bias.detach().float() * bias_scale).to(FUSED_DTYPE).contiguous()

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        lp, _ = _ops()
        if residual is not None:
            if self.post != "none":
                raise ValueError("a residual add is fused only into a product without activation")
            return lp.binary(x, residual, self.packed, self.bias, "add")  # (N, out)
        return lp(x, self.packed, self.bias, self._attr, [], self._algorithm)  # (N, out)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, post={self.post}"


def _layer_norm_copy(norm: nn.LayerNorm) -> nn.LayerNorm:
    out = nn.LayerNorm(norm.normalized_shape, eps=norm.eps, device="cpu", dtype=FUSED_DTYPE)
    with torch.no_grad():
        out.weight.copy_(norm.weight)
        out.bias.copy_(norm.bias)
    return out.requires_grad_(False)


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().to(device="cpu", dtype=FUSED_DTYPE, copy=True), requires_grad=False)


# ==============================================================================================
# The tower, bottom-up
# ==============================================================================================
class FusedCLIPVisionEmbeddings(nn.Module):
    """Patch embedding as one product over unfolded patches, plus CLS and positions."""

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        conv = source.patch_embedding
        self.patch_size = int(conv.kernel_size[0])
        self.num_channels = int(conv.in_channels)
        d = int(conv.out_channels)
        self.patch = FusedLinear(conv.weight.reshape(d, -1), None)  # (D, 3*P*P)
        pos = source.position_embedding.weight.detach().float()  # (1 + g*g, D)
        # CLS plus its position, once (added in float32, then rounded)
        self.cls_position = _param(source.class_embedding.detach().float() + pos[0])  # (D,)
        self.patch_position = _param(pos[1:])  # (g*g, D)
        self.grid = int(round((pos.shape[0] - 1) ** 0.5))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        c, p, g = pixel_values.shape[0], self.patch_size, self.grid
        d = self.cls_position.shape[0]
        # (C, 3, g*P, g*P) -> (C, 3, g, P, g, P) -> (C, g, g, 3, P, P): one pass, cast included
        view = pixel_values.reshape(c, self.num_channels, g, p, g, p).permute(0, 2, 4, 1, 3, 5)
        patches = torch.empty(view.shape, dtype=FUSED_DTYPE).copy_(view).view(c * g * g, self.num_channels * p * p)  # (C*g*g, 3*P*P)
        emb = self.patch(patches).view(c, g * g, d)  # (C, g*g, D)
        out = torch.empty(c, 1 + g * g, d, dtype=FUSED_DTYPE)  # (C, 1 + g*g, D)
        out[:, 0] = self.cls_position
        torch.add(emb, self.patch_position, out=out[:, 1:])
        return out


class FusedCLIPAttention(nn.Module):
    """Self-attention whose output product adds the residual stream. ``first_query`` also packs q
    and k/v apart, for :meth:`forward_first_query` (the last layer of the CLS-only path)."""

    def __init__(self, source: nn.Module, first_query: bool) -> None:
        super().__init__()
        self.num_heads, self.head_dim = int(source.num_heads), int(source.head_dim)
        q, k, v = source.q_proj, source.k_proj, source.v_proj
        self.qkv = FusedLinear(torch.cat([q.weight, k.weight, v.weight]), torch.cat([q.bias, k.bias, v.bias]))  # (3D, D)
        self.out_proj = FusedLinear(source.out_proj.weight, source.out_proj.bias)  # (D, D)
        self.q = FusedLinear(q.weight, q.bias) if first_query else None  # (D, D)
        self.kv = FusedLinear(torch.cat([k.weight, v.weight]), torch.cat([k.bias, v.bias])) if first_query else None  # (2D, D)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``residual + attention(h)``: ``(C, L, D), (C, L, D) -> (C, L, D)``."""
        c, n, d = h.shape
        # (C*L, 3D) -> (C, L, 3, heads, head_dim) -> (3, C, heads, L, head_dim)
        qkv = self.qkv(h.reshape(c * n, d)).view(c, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (C, heads, L, head_dim)
        out = out.transpose(1, 2).reshape(c * n, d)  # (C*L, D)
        return self.out_proj(out, residual=residual.reshape(c * n, d)).view(c, n, d)

    def forward_first_query(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``residual + attention(h)`` at the first position only (every key and value read):
        ``(C, L, D), (C, D) -> (C, D)``."""
        if self.q is None or self.kv is None:
            raise RuntimeError("this layer was built without its first-query products (first_query=False)")
        c, n, d = h.shape
        q = self.q(h[:, 0]).view(c, 1, self.num_heads, self.head_dim).transpose(1, 2)  # (C, heads, 1, head_dim)
        # (C*L, 2D) -> (C, L, 2, heads, head_dim) -> (2, C, heads, L, head_dim)
        kv = self.kv(h.reshape(c * n, d)).view(c, n, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1]).reshape(c, d)  # (C, heads, 1, head_dim) -> (C, D)
        return self.out_proj(out, residual=residual)


def _mlp_post_op(activation_fn: nn.Module) -> str | None:
    """The post-op reproducing the source MLP's activation module, or None."""
    if type(activation_fn) is QuickGELU:
        return "swish"
    if type(activation_fn) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(activation_fn.approximate)
    return None


class FusedCLIPMLP(nn.Module):
    """``residual + fc2(act(fc1(h)))`` in two products: the activation fused into ``fc1``, the
    residual add into ``fc2``."""

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        post = _mlp_post_op(source.activation_fn)
        if post is None:
            raise ValueError(f"activation {source.activation_fn!r} has no fused post-op")
        s = QUICK_GELU_SCALE if post == "swish" else 1.0
        # swish(1.702 h) = 1.702 quick_gelu(h); fc2 divides the factor out again.
        self.fc1 = FusedLinear(source.fc1.weight, source.fc1.bias, post, weight_scale=s, bias_scale=s)  # (I, D)
        self.fc2 = FusedLinear(source.fc2.weight, source.fc2.bias, weight_scale=1.0 / s)  # (D, I)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``(N, D), (N, D) -> (N, D)``."""
        return self.fc2(self.fc1(h), residual=residual)


class FusedCLIPEncoderLayer(nn.Module):
    def __init__(self, source: nn.Module, first_query: bool) -> None:
        super().__init__()
        self.layer_norm1 = _layer_norm_copy(source.layer_norm1)
        self.self_attn = FusedCLIPAttention(source.self_attn, first_query)
        self.layer_norm2 = _layer_norm_copy(source.layer_norm2)
        self.mlp = FusedCLIPMLP(source.mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(C, L, D) -> (C, L, D)``."""
        c, n, d = x.shape
        x = self.self_attn(self.layer_norm1(x), residual=x)  # (C, L, D)
        x2 = x.view(c * n, d)
        return self.mlp(self.layer_norm2(x2), residual=x2).view(c, n, d)

    def forward_first_token(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's output at the first position (CLS) only: ``(C, L, D) -> (C, D)``."""
        cls = self.self_attn.forward_first_query(self.layer_norm1(x), residual=x[:, 0])  # (C, D)
        return self.mlp(self.layer_norm2(cls), residual=cls)


class FusedCLIPEncoder(nn.Module):
    def __init__(self, layers: list[FusedCLIPEncoderLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)


class FusedCLIPVisionTransformer(nn.Module):
    """:class:`~phiclip.models.clip_vision.CLIPVisionTransformer` with fused bfloat16 products:
    ``forward`` (every token after the last built layer) and ``forward_cls`` (the CLS state, the last
    layer run for the CLS query only). Build with :func:`fused_cpu_copy`."""

    def __init__(self, source: CLIPVisionTransformer) -> None:
        super().__init__()
        self.config = source.config
        self.embeddings = FusedCLIPVisionEmbeddings(source.embeddings)
        self.pre_layrnorm = _layer_norm_copy(source.pre_layrnorm)
        n = len(source.encoder.layers)
        self.encoder = FusedCLIPEncoder([FusedCLIPEncoderLayer(layer, first_query=i == n - 1)
                                         for i, layer in enumerate(source.encoder.layers)])
        #: Parameters of the source held only in packed (or folded) form, not in ``parameters()``.
        self.packed_parameters = _packed_parameter_count(source)
        self.eval()

    @torch.autocast("cpu", enabled=False)  # bfloat16 throughout; an outer autocast must not cast to float32
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(C, 3, S, S)`` -> hidden state after the last built layer ``(C, 1 + g*g, D)``, bfloat16."""
        x = self.pre_layrnorm(self.embeddings(pixel_values))  # (C, 1 + g*g, D)
        for layer in self.encoder.layers:
            x = layer(x)
        return x

    @torch.autocast("cpu", enabled=False)
    def forward_cls(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(C, 3, S, S)`` -> the CLS state after the last built layer ``(C, D)``, bfloat16."""
        x = self.pre_layrnorm(self.embeddings(pixel_values))  # (C, 1 + g*g, D)
        if not len(self.encoder.layers):
            return x[:, 0]
        *body, last = self.encoder.layers
        for layer in body:
            x = layer(x)
        return last.forward_first_token(x)


class FusedCLIPImageFeatures(nn.Module):
    """:class:`~phiclip.models.clip_vision.CLIPImageFeatures` with fused bfloat16 products:
    ``pixel_values (n, 3, S, S) -> (n, projection_dim)``, bfloat16."""

    def __init__(self, source: CLIPImageFeatures) -> None:
        super().__init__()
        self.tower = FusedCLIPVisionTransformer(source.tower)
        self.post_layernorm = _layer_norm_copy(source.post_layernorm)
        proj = source.visual_projection
        self.visual_projection = FusedLinear(proj.weight, proj.bias)  # (projection_dim, D)
        self.packed_parameters = self.tower.packed_parameters + sum(p.numel() for p in proj.parameters())
        self.eval()

    @torch.autocast("cpu", enabled=False)
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        cls = self.tower.forward_cls(pixel_values)  # (n, D)
        return self.visual_projection(self.post_layernorm(cls))  # (n, projection_dim)


def _layer_linears(layer: nn.Module) -> tuple[nn.Module, ...]:
    """A source layer's products, in the order they run: q, k, v, attention output, fc1, fc2."""
    a, m = layer.self_attn, layer.mlp
    return (a.q_proj, a.k_proj, a.v_proj, a.out_proj, m.fc1, m.fc2)


def _packed_parameter_count(tower: CLIPVisionTransformer) -> int:
    linears = [tower.embeddings.patch_embedding] + [lin for layer in tower.encoder.layers for lin in _layer_linears(layer)]
    folded = tower.embeddings.class_embedding.numel()  # added into ``cls_position``
    return folded + sum(p.numel() for m in linears for p in m.parameters())


# ==============================================================================================
# Building from a float module
# ==============================================================================================
def _known_tower(tower: Any) -> bool:
    """Whether ``tower`` has exactly the layout these modules reproduce (CPU tensors, plain
    ``nn.Linear`` / ``nn.LayerNorm``, a bias-free patch convolution with stride = kernel, and an
    activation with a post-op)."""
    if not isinstance(tower, CLIPVisionTransformer):
        return False
    emb = tower.embeddings
    conv = getattr(emb, "patch_embedding", None)
    if type(conv) is not nn.Conv2d or conv.bias is not None or conv.groups != 1:
        return False
    if conv.kernel_size[0] != conv.kernel_size[1] or tuple(conv.stride) != tuple(conv.kernel_size) or any(conv.padding) \
            or tuple(conv.dilation) != (1, 1) or conv.padding_mode != "zeros":
        return False
    grid = int(round((emb.position_embedding.weight.shape[0] - 1) ** 0.5))
    if grid * grid + 1 != emb.position_embedding.weight.shape[0]:
        return False
    norms = [tower.pre_layrnorm]
    for layer in tower.encoder.layers:
        if any(type(lin) is not nn.Linear or lin.bias is None for lin in _layer_linears(layer)):
            return False
        if _mlp_post_op(layer.mlp.activation_fn) is None:
            return False
        norms += [layer.layer_norm1, layer.layer_norm2]
    if any(type(n) is not nn.LayerNorm or n.weight is None or n.bias is None for n in norms):
        return False
    tensors = list(tower.parameters()) + list(tower.buffers())
    return all(t.device.type == "cpu" and t.dtype.is_floating_point for t in tensors)


def fused_cpu_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module | None:
    """A fused, inference-only bfloat16 CPU copy of phiclip's ``CLIPVisionTransformer`` or
    ``CLIPImageFeatures`` (the source module keeps its weights), or ``None`` where fusion is
    unavailable: ``dtype`` other than bfloat16, a torch build without these oneDNN ops (or whose
    tiny check call fails), a layout this module does not know (another module class, other
    linears or activations, weights not on the CPU). Callers fall back to
    :func:`phiclip.cpu.int8.float_copy` on ``None``."""
    if dtype != FUSED_DTYPE:
        return None
    if isinstance(module, CLIPImageFeatures):
        proj = module.visual_projection
        if type(proj) is not nn.Linear or type(module.post_layernorm) is not nn.LayerNorm or not _known_tower(module.tower) \
                or proj.weight.device.type != "cpu":
            return None
        if not fusion_available():
            return None
        with torch.no_grad():
            return FusedCLIPImageFeatures(module)
    if not _known_tower(module) or not fusion_available():
        return None
    with torch.no_grad():
        return FusedCLIPVisionTransformer(module)  # type: ignore[arg-type]


def fuse_phi3v_tower_(model: nn.Module) -> bool:
    """Replace, in place, a Phi-3-vision image embedding's CLIP tower
    (``model.img_processor.vision_model``) by its fused bfloat16 copy when :func:`fused_cpu_copy`
    can build one; the float tower is dropped. Returns whether it was replaced (False: nothing
    changed, e.g. a student tower, weights not in bfloat16 on the CPU, or no fusion here)."""
    holder = getattr(model, "img_processor", None)
    tower = getattr(holder, "vision_model", None)
    if not isinstance(tower, CLIPVisionTransformer):
        return False
    if tower.embeddings.patch_embedding.weight.dtype != FUSED_DTYPE:
        return False  # the placement's dtype is not bfloat16
    fused = fused_cpu_copy(tower, FUSED_DTYPE)
    if fused is None:
        return False
    holder.vision_model = fused
    return True


__all__ = [
    "FUSED_DTYPE",
    "KERNELS_FUSED",
    "KERNELS_TORCH",
    "QUICK_GELU_SCALE",
    "FusedCLIPImageFeatures",
    "FusedCLIPVisionTransformer",
    "FusedLinear",
    "fuse_phi3v_tower_",
    "fused_cpu_copy",
    "fusion_available",
]
