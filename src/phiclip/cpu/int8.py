"""``precision="int8"`` on the CPU: int8 weights per output channel, activations quantised per call.

Every matrix product of the image tower's layers (the fused q/k/v product, the attention output,
both MLP products) becomes an :class:`Int8Linear`:

* weights: symmetric int8 per output channel (``scale = max|w_row| / 127``), quantised once at load;
* activations: asymmetric uint8 per call and per tensor (``scale = (max - min) / 255`` over the
  call's input, the range widened to hold 0, ``zero_point = round(-min / scale)``): "dynamic"
  quantisation, no calibration data needed;
* the product accumulates in int32 and is rescaled (``x_scale * w_scale[c]``) with the bias added,
  in float.

Everything else (patch embedding, norms, attention's softmax products, the final projection, and
the last CLIP layer's attention, which reads its weights directly) runs in the fastest float
precision this CPU measured (:func:`phiclip.cpu.precision.decide_cpu_precision`: bfloat16 where it
measured faster, else float32).

Two kernels compute the same quantisation, and the faster one on this CPU's tower shapes is taken
(measured once, cached beside the precision measurement, see :func:`int8_plan`):

* ``onednn``: ``torch.ops.onednn.qlinear_pointwise`` on plain uint8/int8 tensors (AMX-INT8 or
  AVX512-VNNI through oneDNN; float32 or bfloat16 in and out); the activation is quantised by
  phiclip in two passes (one ``aminmax``, one fused scale-and-shift).
* ``quantized``: ``torch.ops.quantized.linear_dynamic`` (fbgemm/x86 or qnnpack on Arm), which
  quantises the float32 activation itself, with torch's own parameters for the same scheme (no
  range margin: a few values land one level apart); float32 in and out.

Error against float32: :data:`phiclip.cpu.precision.ERROR_BOUNDS` ``["int8"]`` (tested on tiny models);
real-size numbers in BENCHMARKS.md.
"""

from __future__ import annotations

import contextlib
import copy
import math
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from phiclip.cpu import precision as P
from phiclip.cpu.threads import OthersBusy
from phiclip.models.clip_vision import CLIPAttention

KERNELS = ("onednn", "quantized")
INT8_CACHE_KEY = "int8"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch warns that quantized tensor types are deprecated; the ``quantized`` kernel needs them."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*quantiz.*deprecated.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        yield


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, in)`` float weight -> (int8 weight, float32 scale per output channel), symmetric:
    ``w ~= q * scale[:, None]`` with ``|q| <= 127``."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def activation_qparams(x: torch.Tensor) -> tuple[float, int]:
    """(scale, zero_point) of the asymmetric uint8 quantisation of ``x`` (per tensor): the range
    ``[min(x, 0), max(x, 0)]`` onto 0..255. Raises ``ValueError`` on NaN or infinity."""
    lo_t, hi_t = torch.aminmax(x)
    lo, hi = min(float(lo_t), 0.0), max(float(hi_t), 0.0)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("int8: the layer input holds NaN or infinity, which cannot be quantised; "
                         "check the input images, or use precision float32")
    # The 1e-4 margin keeps x / scale + zero_point + 0.5 below 256 after float rounding.
    scale = max((hi - lo) / 255.0, 1e-12) * (1 + 1e-4)
    return scale, int(round(-lo / scale))


def quantize_activation(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """``round(x / scale) + zero_point`` as uint8 (rounding half up), computed in float32 whatever
    ``x``'s dtype (a bfloat16 intermediate would lose up to a level). One pass plus the cast."""
    shift = torch.full((1,), zero_point + 0.5, dtype=torch.float32)  # 1-D: promotes x to float32
    return torch.add(shift, x, alpha=1.0 / scale).to(torch.uint8)


class Int8Linear(nn.Module):
    """``F.linear`` with int8 weights (per output channel) and per-call uint8 activations; see the
    module docstring. The output has the input's dtype (float32 or bfloat16).

    Args:
        weight: ``(out, in)`` float weight; bias: ``(out,)`` or None.
        kernel: ``onednn`` or ``quantized`` (:data:`KERNELS`).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kernel: str = "onednn") -> None:
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"int8 kernel {kernel!r} is not one of {KERNELS}")
        self.in_features, self.out_features = int(weight.shape[1]), int(weight.shape[0])
        self.kernel = kernel
        q, scale = quantize_weight(weight)
        self.register_buffer("weight_int8", q)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self._zero_points = torch.zeros(self.out_features, dtype=torch.int64)
        if kernel == "onednn":
            self._packed = torch.ops.onednn.qlinear_prepack(q, None)
        else:
            with _quiet():
                qw = torch.quantize_per_channel(q.float() * scale[:, None], scale.double(), self._zero_points, 0, torch.qint8)
                self._packed = torch.ops.quantized.linear_prepack(qw, self.bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, kernel: str = "onednn") -> Int8Linear:
        """Quantise an ``nn.Linear``'s weight (the linear itself is left as it is)."""
        return cls(linear.weight, linear.bias, kernel)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight the int8 one stands for: ``q * scale``."""
        return self.weight_int8.float() * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Int8Linear takes inputs of width {self.in_features}, got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] == 0:
            return x.new_zeros(*lead, self.out_features)
        if self.kernel == "quantized":
            with _quiet():
                y = torch.ops.quantized.linear_dynamic(x2.float().contiguous(), self._packed, False)
            return y.to(x.dtype).reshape(*lead, self.out_features)
        scale, zp = activation_qparams(x2)
        xq = quantize_activation(x2, scale, zp)
        out_dtype = x.dtype if x.dtype in (torch.float32, torch.bfloat16) else torch.float32
        y = torch.ops.onednn.qlinear_pointwise(xq, scale, zp, self._packed, self.weight_scale, self._zero_points,
                                               self.bias, 1.0, 0, out_dtype, "none", [], "")
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


class Int8CLIPAttention(nn.Module):
    """phiclip's CLIP self-attention with one :class:`Int8Linear` for q, k and v together (per
    output channel, so the fused weight quantises exactly as the three would) and one for the
    output; the softmax products run in the input's float dtype."""

    def __init__(self, attn: nn.Module, kernel: str) -> None:
        super().__init__()
        self.num_heads, self.head_dim = attn.num_heads, attn.head_dim
        weight = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        bias = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
        self.qkv_proj = Int8Linear(weight, bias, kernel)
        self.out_proj = Int8Linear.from_linear(attn.out_proj, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, n, d = x.shape
        qkv = self.qkv_proj(x).view(c, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.out_proj(out.transpose(1, 2).reshape(c, n, d))


# --------------------------------------------------------------------------------------------------
# Which kernel, and which float precision around it
# --------------------------------------------------------------------------------------------------
def available_kernels() -> list[str]:
    """The int8 kernels this torch build can run (each tried on a tiny product)."""
    out = []
    w = torch.randn(8, 16)
    for kernel in KERNELS:
        try:
            Int8Linear(w, None, kernel)(torch.randn(2, 16))
        except (RuntimeError, AttributeError, NotImplementedError, TypeError):
            continue
        out.append(kernel)
    return out


def measure_kernel_rates(kernels: list[str], shapes: tuple[tuple[int, int, int], ...] = P.MEASURE_SHAPES,
                         rounds: int = 3, dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """GFLOP/s of each kernel over ``shapes`` (activation quantisation included), interleaved, best round per shape."""
    gen = torch.Generator().manual_seed(0)
    mods = {k: [] for k in kernels}
    inputs = []
    for m, k, n in shapes:
        w = torch.randn(n, k, generator=gen) * k ** -0.5
        inputs.append(torch.randn(m, k, generator=gen).to(dtype))
        for kern in kernels:
            mods[kern].append(Int8Linear(w, torch.zeros(n), kern))
    flops = sum(2.0 * m * k * n for m, k, n in shapes)
    best = {k: [float("inf")] * len(shapes) for k in kernels}
    with torch.inference_mode():
        for r in range(rounds + 1):
            for kern in kernels:
                for i, x in enumerate(inputs):
                    t0 = time.perf_counter()
                    mods[kern][i](x)
                    if r:
                        best[kern][i] = min(best[kern][i], time.perf_counter() - t0)
    return {k: flops / sum(best[k]) / 1e9 for k in kernels}


_lock = threading.Lock()
_plan_memo: dict[str, dict[str, Any]] = {}


def int8_plan(refresh: bool = False) -> dict[str, Any]:
    """How ``int8`` runs on this CPU: ``{"kernel": ..., "float_dtype": ..., "rates": {...},
    "reason": ...}``. The kernel is the fastest measured on the tower's shapes (cached per CPU
    model and torch version); ``float_dtype`` is what the non-quantised parts run in (bfloat16 when
    the ``onednn`` kernel runs and this CPU's bfloat16 measured faster than float32, else float32).
    Raises ``ValueError`` when this torch build has no int8 kernel."""
    key = f"{INT8_CACHE_KEY} | {P.cpu_key()}"
    with _lock:
        if not refresh and key in _plan_memo:
            return _plan_memo[key]
        entry = None if refresh else P.read_cache().get(key)
        previous = entry if isinstance(entry, dict) and entry.get("kernel") in KERNELS else None
        if previous is None or P.measured_under_load(previous):
            kernels = available_kernels()
            if not kernels:
                raise ValueError("precision int8: this torch build has no int8 matrix kernel (neither oneDNN's "
                                 "qlinear nor torch.ops.quantized); use float32 or bfloat16")
            with OthersBusy() as busy:
                rates = measure_kernel_rates(kernels)
            entry = {"kernel": max(rates, key=rates.__getitem__), "rates": {k: round(v, 1) for k, v in rates.items()},
                     "others_busy_cores": None if busy.cores is None else round(busy.cores, 2),
                     "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
            entry = P.keep_quieter(previous, entry)
            P.write_cache_entry(key, entry)
    float_dtype = "float32"
    if entry["kernel"] == "onednn":
        with contextlib.suppress(ValueError):
            float_dtype = "bfloat16" if P.decide_cpu_precision("auto").dtype == "bfloat16" else "float32"
    rates = {f"int8 {k}": v for k, v in entry["rates"].items()}
    reason = (f"int8 kernel {entry['kernel']} (fastest measured here: "
              + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in rates.items())
              + f"); the unquantised parts run in {float_dtype}")
    plan = {"kernel": entry["kernel"], "float_dtype": float_dtype, "rates": rates, "reason": reason}
    with _lock:
        _plan_memo[key] = plan
    return plan


def clear_memo() -> None:
    """Forget in-process int8 plans (the cache file stays); for tests."""
    with _lock:
        _plan_memo.clear()


# --------------------------------------------------------------------------------------------------
# Applying it to models
# --------------------------------------------------------------------------------------------------
def _convert_floats(module: nn.Module, dtype: torch.dtype) -> None:
    """Every floating parameter and buffer of ``module`` to ``dtype``, as new tensors (parameters
    shared with another model, e.g. CLIPImageFeatures' with the CLIPModel, are left untouched)."""
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and p.is_floating_point() and p.dtype != dtype:
                mod._parameters[name] = nn.Parameter(p.detach().to(dtype), requires_grad=False)
        if isinstance(mod, Int8Linear):
            continue  # its buffers are the quantised weight and float32 scales
        for name, b in list(mod._buffers.items()):
            if b is not None and b.is_floating_point() and b.dtype != dtype:
                mod._buffers[name] = b.to(dtype)


def _structure_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s module tree that shares its tensors (no weight is copied)."""
    memo: dict[int, Any] = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    return copy.deepcopy(module, memo)


def _is_inside(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def float_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``module`` with its floating weights in ``dtype`` (the original, and any model it
    shares tensors with, keep theirs). CLIP's image path in bfloat16 on the CPU runs on such a copy:
    under autocast every float32 weight would be converted again on every call."""
    out = _structure_copy(module)
    _convert_floats(out, dtype)
    return out.eval()


def quantize_linears_(root: nn.Module, kernel: str, skip: Callable[[str, nn.Module], bool] | None = None) -> int:
    """Replace, in place, every phiclip CLIP attention (fused q/k/v) and every ``nn.Linear`` under
    ``root`` by their int8 versions, except those ``skip(name, module)`` keeps and those inside an
    ``nn.MultiheadAttention`` (which reads its weights directly). Returns the number of products
    quantised."""
    count = 0
    mha = [n for n, m in root.named_modules() if isinstance(m, nn.MultiheadAttention)]
    for name, mod in list(root.named_modules()):
        if not name or _is_inside(name, mha) or (skip is not None and skip(name, mod)):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        if isinstance(mod, CLIPAttention):
            setattr(parent, child, Int8CLIPAttention(mod, kernel))
            count += 2
        elif type(mod) is nn.Linear and not isinstance(parent, (CLIPAttention, Int8CLIPAttention)):
            setattr(parent, child, Int8Linear.from_linear(mod, kernel))
            count += 1
    return count


def quantize_clip_image_features(features: nn.Module, plan: dict[str, Any] | None = None) -> nn.Module:
    """An int8 copy of phiclip's ``CLIPImageFeatures`` (the model it shares weights with is left
    as it is). The last layer's attention (CLS query only, reads its weights directly) and the
    final projection stay in the float precision."""
    plan = plan or int8_plan()
    out = _structure_copy(features)
    last = f"tower.encoder.layers.{len(out.tower.encoder.layers) - 1}.self_attn"
    keep = ["visual_projection", last]
    quantize_linears_(out, plan["kernel"], skip=lambda n, m: _is_inside(n, keep))
    _convert_floats(out, getattr(torch, plan["float_dtype"]))
    return out.eval()


def quantize_hf_vision_(model: nn.Module, plan: dict[str, Any] | None = None) -> int:
    """int8 for the image side of a transformers ``CLIPModel`` / ``SiglipModel``, in place: the
    vision encoder's products (and SigLIP's pooling-head MLP); ``visual_projection`` and the head's
    attention stay float. The vision side's other weights move to the plan's float precision."""
    plan = plan or int8_plan()
    vision = model.vision_model
    n = quantize_linears_(vision, plan["kernel"])
    _convert_floats(vision, getattr(torch, plan["float_dtype"]))
    if getattr(model, "visual_projection", None) is not None:
        _convert_floats(model.visual_projection, getattr(torch, plan["float_dtype"]))
    return n


def quantize_phi3v_(model: nn.Module, plan: dict[str, Any] | None = None) -> int:
    """int8 for a phiclip ``Phi3VImageEmbedding``'s CLIP tower, in place (best loaded in float32:
    the weights are quantised from what is loaded); the separators and the 2x2-merge projection
    stay float, and every float weight moves to the plan's float precision."""
    plan = plan or int8_plan()
    n = quantize_linears_(model.img_processor, plan["kernel"])
    _convert_floats(model, getattr(torch, plan["float_dtype"]))
    return n


def quantize_image_side(model: nn.Module, image_features: nn.Module | None = None,
                        plan: dict[str, Any] | None = None) -> tuple[nn.Module | None, dict[str, Any]]:
    """int8 for an encoder's image side. With ``image_features`` (phiclip's float32
    ``CLIPImageFeatures`` on the model's own weights: CLIP's fast path) an int8 copy of it is made
    and the model is left as it is; without, the model's own tower is quantised in place: a
    Phi-3-vision image embedding's ``img_processor`` (:func:`quantize_phi3v_`), else a transformers
    model's ``vision_model`` (:func:`quantize_hf_vision_`). A text side stays float32.

    Returns:
        The image module to run (the int8 copy, or None: the model's own forward) and
        :func:`int8_description`.
    """
    plan = plan or int8_plan()
    if image_features is not None:
        image_features = quantize_clip_image_features(image_features, plan)
        n = sum(isinstance(m, Int8Linear) for m in image_features.modules())
    elif getattr(model, "img_processor", None) is not None:
        n = quantize_phi3v_(model, plan)
    else:
        n = quantize_hf_vision_(model, plan)
    return image_features, int8_description(plan, n)


def int8_description(plan: dict[str, Any], quantized_products: int) -> dict[str, Any]:
    """What encoders record under ``describe()["precision"]["int8"]``."""
    return {"kernel": plan["kernel"], "float_dtype": plan["float_dtype"], "quantized_products": int(quantized_products),
            "weights": "int8, symmetric, per output channel", "activations": "uint8, asymmetric, per call and tensor",
            "bound": P.ERROR_BOUNDS["int8"].__dict__, "reason": plan["reason"]}


__all__ = ["Int8CLIPAttention", "Int8Linear", "KERNELS", "activation_qparams", "available_kernels", "float_copy", "int8_description",
           "int8_plan", "measure_kernel_rates", "quantize_activation", "quantize_clip_image_features", "quantize_hf_vision_",
           "quantize_image_side", "quantize_linears_", "quantize_phi3v_", "quantize_weight"]
