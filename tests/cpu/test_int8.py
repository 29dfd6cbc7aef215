"""phiclip.cpu.int8: the int8 arithmetic against its definition, each kernel, the cached kernel
choice, and int8 encoders (CLIP, SigLIP, Phi-3-vision) within their stated bound of float32."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import phiclip.cpu.int8 as Q
import phiclip.cpu.precision as P
from phiclip import load_encoder
from phiclip.cache import CACHE_ENV
from phiclip.pipeline.step import encode_images
from phiclip.testing import make_sample_images

KERNELS = Q.available_kernels()


def test_some_int8_kernel_runs_here() -> None:
    assert KERNELS, "no int8 kernel in this torch build"


# --- the quantisation, against its definition -------------------------------------------------------------
def test_weights_per_output_channel() -> None:
    w = torch.randn(6, 10) * torch.tensor([1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0])[:, None]
    q, scale = Q.quantize_weight(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    assert torch.equal(q.abs().amax(dim=1), torch.full((6,), 127, dtype=torch.int8))  # every row uses its full range
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7 * w.abs()).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_quantisation(dtype) -> None:
    x = (torch.randn(50, 40, generator=torch.Generator().manual_seed(3)) * 3 + 1).to(dtype)
    x[0, 0] = 0.0
    scale, zp = Q.activation_qparams(x)
    xq = Q.quantize_activation(x, scale, zp)
    assert xq.dtype == torch.uint8 and 0 <= zp <= 255
    assert int(xq[0, 0]) == zp  # zero is exact
    err = (xq.float() - zp) * scale - x.float()
    assert float(err.abs().max()) <= scale / 2 * (1 + 1e-3)  # rounding to the nearest level, in float32
    # The whole range is used (the top may land one level short: the scale keeps a 1e-4 margin).
    assert int(xq.min()) == 0 and int(xq.max()) >= 254


def test_positive_only_and_constant_inputs() -> None:
    scale, zp = Q.activation_qparams(torch.rand(8, 8) + 1)  # all positive: range widened to hold 0
    assert zp == 0
    scale, zp = Q.activation_qparams(torch.zeros(4, 4))
    assert scale > 0 and int(Q.quantize_activation(torch.zeros(4, 4), scale, zp).max()) == zp


def test_nan_input_is_a_clear_error() -> None:
    x = torch.randn(4, 16)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinity.*float32"):
        Q.Int8Linear(torch.randn(8, 16), None, KERNELS[0])(x)


@pytest.mark.parametrize("kernel", KERNELS)
def test_int8_linear_equals_its_definition(kernel) -> None:
    """y = (xq - zp) * x_scale @ (wq * w_scale)^T + b, computed here in float64."""
    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn(24, 40, generator=gen), torch.randn(24, generator=gen)
    x = torch.randn(3, 7, 40, generator=gen) * 2 + 0.5
    lin = Q.Int8Linear(w, b, kernel)
    if kernel == "onednn":  # phiclip quantises the activation
        scale, zp = Q.activation_qparams(x)
        xd = (Q.quantize_activation(x, scale, zp).double() - zp) * scale
    else:  # torch.ops.quantized does, with torch's own qparams for the same scheme (no 1e-4 margin)
        scale, zp = torch._choose_qparams_per_tensor(x, False)
        with Q._quiet():
            xd = torch.quantize_per_tensor(x, scale, zp, torch.quint8).dequantize().double()
    ref = xd @ lin.dequantized_weight().double().T + b.double()
    out = lin(x)
    assert out.shape == (3, 7, 24) and out.dtype == torch.float32
    tol = 1e-4 * float(ref.abs().max())
    assert float((out.double() - ref).abs().max()) <= tol
    assert lin(torch.zeros(0, 40)).shape == (0, 24)
    with pytest.raises(ValueError, match="width 40"):
        lin(torch.randn(2, 39))


@pytest.mark.parametrize("kernel", KERNELS)
def test_bfloat16_in_bfloat16_out(kernel) -> None:
    lin = Q.Int8Linear(torch.randn(16, 32), torch.randn(16), kernel)
    x = torch.randn(5, 32)
    out = lin(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), lin(x), atol=0.05 * float(lin(x).abs().max()))


def test_fused_qkv_attention_matches_float() -> None:
    from phiclip.models.clip_vision import CLIPAttention

    torch.manual_seed(0)
    attn = CLIPAttention(32, 4).eval()
    x = torch.randn(2, 9, 32)
    q = Q.Int8CLIPAttention(attn, KERNELS[0])
    with torch.inference_mode():
        ref, out = attn(x), q(x)
    cos = torch.nn.functional.cosine_similarity(ref.flatten(0, 1), out.flatten(0, 1), dim=-1)
    assert float(cos.min()) > 0.995
    # q, k and v share one activation quantisation and keep their own per-channel weight scales
    _, s = Q.quantize_weight(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
    assert torch.equal(q.qkv_proj.weight_scale, s)


# --- which kernel: measured once, cached ----------------------------------------------------------------
@pytest.fixture()
def fresh_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    Q.clear_memo()
    P.clear_memo()
    yield tmp_path
    Q.clear_memo()
    P.clear_memo()


def test_kernel_choice_is_the_fastest_measured_and_cached(fresh_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake(kernels, *a, **k):
        calls.append(tuple(kernels))
        return {k: (500.0 if k == KERNELS[-1] else 100.0) for k in kernels}

    monkeypatch.setattr(Q, "measure_kernel_rates", fake)
    plan = Q.int8_plan()
    assert plan["kernel"] == KERNELS[-1] and len(calls) == 1 and "500 GFLOP/s" in plan["reason"]
    stored = json.loads((fresh_cache / P.CACHE_FILE).read_text())
    assert stored[f"{Q.INT8_CACHE_KEY} | {P.cpu_key()}"]["kernel"] == KERNELS[-1]
    Q.clear_memo()
    assert Q.int8_plan()["kernel"] == KERNELS[-1] and len(calls) == 1  # from the file


@pytest.mark.skipif("onednn" not in KERNELS, reason="oneDNN's int8 kernel is not in this torch build")
@pytest.mark.parametrize("auto, float_dtype", [("bfloat16", "bfloat16"), ("float32", "float32")])
def test_float_parts_follow_the_measured_precision(fresh_cache, monkeypatch, auto, float_dtype) -> None:
    monkeypatch.setattr(Q, "measure_kernel_rates", lambda kernels, *a, **k: {k: 9.0 if k == "onednn" else 1.0 for k in kernels})
    monkeypatch.setenv(P.AUTO_ENV, auto)
    assert Q.int8_plan()["float_dtype"] == float_dtype


def test_measure_kernel_rates_runs() -> None:
    rates = Q.measure_kernel_rates(KERNELS, shapes=((32, 64, 48),), rounds=1)
    assert set(rates) == set(KERNELS) and all(v > 0 for v in rates.values())


# --- int8 encoders within their bound of float32 --------------------------------------------------------
@pytest.mark.parametrize("spec", ["clip:{clip}", "clip:{clip}?fast=false", "siglip:{siglip}", "phi3v:{phi3v}?num_crops=1"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_int8_encoders_within_the_bound(spec, kernel, precision_checkpoints, precision_images, monkeypatch) -> None:
    plan = {"kernel": kernel, "float_dtype": "float32", "rates": {}, "reason": "test"}
    monkeypatch.setattr(Q, "int8_plan", lambda refresh=False: plan)
    spec = spec.format(**precision_checkpoints)
    ref = encode_images(load_encoder(spec, device="cpu", dtype="float32"), precision_images)
    enc = load_encoder(spec, device="cpu", dtype="int8")
    out = encode_images(enc, precision_images)
    stats = P.ERROR_BOUNDS["int8"].check(ref, out)
    assert stats["max_abs"] > 0  # the products really ran in int8
    d = enc.describe()
    assert d["dtype"] == "int8" and d["precision"]["dtype"] == "int8"
    assert d["precision"]["int8"]["kernel"] == kernel and d["precision"]["int8"]["quantized_products"] >= 4
    n_int8 = sum(isinstance(m, Q.Int8Linear) for m in _modules(enc))
    assert n_int8 == d["precision"]["int8"]["quantized_products"]


def _modules(enc):
    roots = [getattr(enc, "image_features", None), enc.model]
    return [m for r in roots if r is not None for m in r.modules()]


@pytest.mark.skipif("onednn" not in KERNELS, reason="oneDNN's int8 kernel is not in this torch build")
def test_int8_with_bfloat16_around_it_within_the_bound(precision_checkpoints, precision_images, monkeypatch) -> None:
    plan = {"kernel": "onednn", "float_dtype": "bfloat16", "rates": {}, "reason": "test"}
    monkeypatch.setattr(Q, "int8_plan", lambda refresh=False: plan)
    for spec in (f"clip:{precision_checkpoints['clip']}", f"siglip:{precision_checkpoints['siglip']}", f"phi3v:{precision_checkpoints['phi3v']}?num_crops=1"):
        ref = encode_images(load_encoder(spec, device="cpu", dtype="float32"), precision_images)
        P.ERROR_BOUNDS["int8"].check(ref, encode_images(load_encoder(spec, device="cpu", dtype="int8"), precision_images))


def test_int8_clip_keeps_text_and_the_shared_weights_float32(precision_checkpoints, precision_images, monkeypatch) -> None:
    plan = {"kernel": KERNELS[0], "float_dtype": "bfloat16" if KERNELS[0] == "onednn" else "float32", "rates": {}, "reason": "test"}
    monkeypatch.setattr(Q, "int8_plan", lambda refresh=False: plan)
    spec = f"clip:{precision_checkpoints['clip']}"
    f32 = load_encoder(spec, device="cpu", dtype="float32")
    enc = load_encoder(spec, device="cpu", dtype="int8")
    texts = ["a red circle", "a blue square"]
    assert np.allclose(enc.encode_texts(texts), f32.encode_texts(texts), atol=1e-6)
    # the int8 image path is a copy: the CLIPModel it was built from still holds its float32 tower
    before = {k: v.clone() for k, v in f32.model.vision_model.state_dict().items()}
    int8, _ = Q.quantize_image_side(f32.model, f32.image_features)
    assert any(isinstance(m, Q.Int8Linear) for m in int8.modules())
    after = f32.model.vision_model.state_dict()
    assert all(after[k].dtype == torch.float32 and torch.equal(after[k], v) for k, v in before.items())


def test_int8_refused_where_it_does_not_apply(precision_checkpoints) -> None:
    with pytest.raises(ValueError, match="CPU only"):
        load_encoder(f"clip:{precision_checkpoints['clip']}", device="cuda", dtype="int8")
    with pytest.raises(ValueError, match="int8 is available for clip, siglip, phi3v"):
        load_encoder(f"phi3v-lm:{precision_checkpoints['phi3v']}", device="cpu", dtype="int8")


def test_cli_embed_precision_int8(precision_checkpoints, tmp_path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from phiclip.cli import app
    from phiclip.schema import MANIFEST_FILE

    plan = {"kernel": KERNELS[0], "float_dtype": "float32", "rates": {}, "reason": "test"}
    monkeypatch.setattr(Q, "int8_plan", lambda refresh=False: plan)
    make_sample_images(tmp_path / "in", per_class=1)
    res = CliRunner().invoke(app, ["embed", "-m", f"clip:{precision_checkpoints['clip']}", "-i", str(tmp_path / "in"),
                                   "-o", str(tmp_path / "out"), "--device", "cpu", "--precision", "int8", "--no-progress"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "out" / MANIFEST_FILE).read_text())
    assert manifest["settings"]["precision"] == "int8"
    assert manifest["encoder"]["precision"]["int8"]["kernel"] == KERNELS[0]


def test_a_kernel_choice_measured_under_load_is_measured_again(fresh_cache: Path, monkeypatch: pytest.MonkeyPatch,
                                                               fixed_busy) -> None:
    calls = []

    def fake(kernels, *a, **k):
        calls.append(1)
        fast = KERNELS[-1] if len(calls) == 1 else KERNELS[0]  # the ranking a busy spell gave, then the quiet one
        return {k: (500.0 if k == fast else 100.0) for k in kernels}

    monkeypatch.setattr(Q, "measure_kernel_rates", fake)
    monkeypatch.setattr(Q, "OthersBusy", fixed_busy(1.2))
    assert Q.int8_plan()["kernel"] == KERNELS[-1]
    Q.clear_memo()
    monkeypatch.setattr(P, "BUSY_REMEASURE_AFTER_S", 0)
    monkeypatch.setattr(Q, "OthersBusy", fixed_busy(0.0))
    assert Q.int8_plan()["kernel"] == KERNELS[0] and len(calls) == 2
    Q.clear_memo()
    assert Q.int8_plan()["kernel"] == KERNELS[0] and len(calls) == 2  # kept
