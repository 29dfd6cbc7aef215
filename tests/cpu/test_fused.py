"""The fused bfloat16 CPU tower (phiclip.cpu.fused): within the bfloat16 bound of float32
for every activation, every path (all tokens, CLS only, image features), odd batch sizes; the
source untouched; None where fusion does not apply; the CLIP and Phi-3-vision encoders use it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from phiclip import load_encoder
from phiclip.cpu import fused as cpu_fused
from phiclip.cpu.fused import (
    FusedCLIPImageFeatures,
    FusedCLIPVisionTransformer,
    fused_cpu_copy,
    fusion_available,
)
from phiclip.cpu.precision import ERROR_BOUNDS
from phiclip.models.clip_config import CLIPVisionConfig
from phiclip.models.clip_vision import CLIPImageFeatures, CLIPVisionTransformer
from phiclip.pipeline.step import encode_images
from phiclip.testing import build_tiny_clip, build_tiny_phi3v

BOUND = ERROR_BOUNDS["bfloat16"]
ACTIVATIONS = ["quick_gelu", "gelu", "gelu_new"]

pytestmark = pytest.mark.skipif(not fusion_available(), reason="this torch build has no oneDNN fused bfloat16 linears")


def _tower(act: str, layers: int = 3, seed: int = 0) -> CLIPVisionTransformer:
    """A random float32 tower: norms near 1, everything else small and non-zero."""
    cfg = CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=4,
                           image_size=64, patch_size=16, hidden_act=act)
    tower = CLIPVisionTransformer(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in tower.named_parameters():
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(base + 0.08 * torch.randn(p.shape, generator=gen))
    return tower


def _features(act: str) -> CLIPImageFeatures:
    tower = _tower(act)
    post = nn.LayerNorm(64)
    proj = nn.Linear(64, 16, bias=False)
    with torch.no_grad():
        proj.weight.copy_(torch.randn(16, 64, generator=torch.Generator().manual_seed(1)) / 8)
    return CLIPImageFeatures(tower, post, proj).eval()


def _pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def _rows(t: torch.Tensor) -> np.ndarray:
    return t.float().reshape(-1, t.shape[-1]).numpy()


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_all_tokens_and_cls_within_the_bfloat16_bound(act) -> None:
    tower = _tower(act)
    fused = fused_cpu_copy(tower, torch.bfloat16)
    assert isinstance(fused, FusedCLIPVisionTransformer)
    x = _pixels(3)
    with torch.inference_mode():
        ref_all, out_all = tower(x), fused(x)
        ref_cls, out_cls = tower.forward_cls(x), fused.forward_cls(x)
    assert out_all.dtype == torch.bfloat16 and out_all.shape == ref_all.shape == (3, 17, 64)
    assert out_cls.shape == ref_cls.shape == (3, 64)
    BOUND.check(_rows(ref_all), _rows(out_all))  # every token's vector
    BOUND.check(_rows(ref_cls), _rows(out_cls))


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_image_features_within_the_bound_also_under_autocast(act) -> None:
    features = _features(act)
    fused = fused_cpu_copy(features, torch.bfloat16)
    assert isinstance(fused, FusedCLIPImageFeatures)
    x = _pixels(5, seed=3)
    with torch.inference_mode():
        ref = features(x)
        out = fused(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # how the CLIP encoder calls it
            out_autocast = fused(x)
    assert out.shape == (5, 16)
    BOUND.check(_rows(ref), _rows(out))
    torch.testing.assert_close(out_autocast, out, rtol=0, atol=0)


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_mlp_activation_is_the_checkpoints_own(act) -> None:
    """Where exact and tanh GELU (and quick-GELU) differ by ~10% (pre-activations near -3), the
    fused MLP's hidden activation matches the source's (1.702 x quick_gelu for the swish post-op)."""
    from phiclip.models.clip_vision import CLIPMLP

    mlp = CLIPMLP(8, 8, act)
    with torch.no_grad():
        mlp.fc1.weight.copy_(torch.eye(8))
        mlp.fc1.bias.zero_()
    fused = cpu_fused.FusedCLIPMLP(mlp)
    x = torch.linspace(-3.5, -2.5, 8 * 4).reshape(4, 8).to(torch.bfloat16)
    want = mlp.activation_fn(x.float()) * (cpu_fused.QUICK_GELU_SCALE if act == "quick_gelu" else 1.0)
    torch.testing.assert_close(fused.fc1(x).float(), want, rtol=0.02, atol=0)


@pytest.mark.parametrize("n", [1, 3, 0])
def test_odd_batch_sizes(n) -> None:
    features = _features("quick_gelu")
    fused = fused_cpu_copy(features, torch.bfloat16)
    x = _pixels(n, seed=n)
    with torch.inference_mode():
        out_all, out_feat = fused.tower(x), fused(x)
        ref_all, ref_feat = features.tower(x), features(x)
    assert out_all.shape == (n, 17, 64) and out_feat.shape == (n, 16)
    if n:
        BOUND.check(_rows(ref_all), _rows(out_all))
        BOUND.check(_rows(ref_feat), _rows(out_feat))


def test_source_module_is_left_untouched() -> None:
    features = _features("quick_gelu")
    before = {k: v.clone() for k, v in features.state_dict().items()}
    x = _pixels(2)
    with torch.inference_mode():
        ref = features(x)
    fused_cpu_copy(features, torch.bfloat16)
    after = features.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert after[k].dtype == torch.float32, k
        torch.testing.assert_close(after[k], v, rtol=0, atol=0)
    with torch.inference_mode():
        torch.testing.assert_close(features(x), ref, rtol=0, atol=0)


def test_none_where_fusion_does_not_apply(monkeypatch) -> None:
    tower = _tower("quick_gelu", layers=2)
    assert fused_cpu_copy(tower, torch.float16) is None
    assert fused_cpu_copy(tower, torch.float32) is None
    assert fused_cpu_copy(nn.Linear(4, 4), torch.bfloat16) is None  # not a CLIP tower
    odd = _tower("quick_gelu", layers=2)
    odd.encoder.layers[1].mlp.fc1 = nn.Sequential(odd.encoder.layers[1].mlp.fc1)  # a layout it does not know
    assert fused_cpu_copy(odd, torch.bfloat16) is None
    odd = _tower("quick_gelu", layers=2)
    odd.encoder.layers[0].mlp.activation_fn = nn.ReLU()
    assert fused_cpu_copy(odd, torch.bfloat16) is None
    assert fused_cpu_copy(tower, torch.bfloat16) is not None
    monkeypatch.setattr(cpu_fused, "fusion_available", lambda: False)  # a torch without the ops
    assert fused_cpu_copy(tower, torch.bfloat16) is None


# --- the encoders -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in [(96, 80), (64, 64), (50, 120)]]


@pytest.fixture(scope="module")
def clip_ckpt(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("clip_fused"), image_size=64, patch_size=16, hidden_size=64,
                           num_layers=2, num_heads=4, projection_dim=16)


@pytest.mark.filterwarnings("ignore:.*measured at")
def test_clip_encoder_bfloat16_runs_fused_within_bound(clip_ckpt, images, monkeypatch) -> None:
    ref = encode_images(load_encoder(f"clip:{clip_ckpt}", device="cpu", dtype="float32"), images)
    enc = load_encoder(f"clip:{clip_ckpt}", device="cpu", dtype="bfloat16")
    assert enc.describe()["precision"]["cpu_kernels"] == "onednn-fused"
    assert isinstance(enc.image_features, FusedCLIPImageFeatures)
    BOUND.check(ref, encode_images(enc, images))
    # Without the ops: the plain bfloat16 copy, said so, same bound.
    monkeypatch.setattr(cpu_fused, "fusion_available", lambda: False)
    plain = load_encoder(f"clip:{clip_ckpt}", device="cpu", dtype="bfloat16")
    assert plain.describe()["precision"]["cpu_kernels"] == "torch"
    assert not isinstance(plain.image_features, FusedCLIPImageFeatures)
    BOUND.check(ref, encode_images(plain, images))


@pytest.fixture(scope="module")
def phi3v_ckpt(tmp_path_factory):
    vision = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 3, "num_attention_heads": 4,
              "image_size": 336, "patch_size": 14, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
    return build_tiny_phi3v(tmp_path_factory.mktemp("phi3v_fused"), vision_config=vision, num_crops=1, layer_idx=-2)


@pytest.mark.filterwarnings("ignore:.*measured at")
def test_phi3v_encoder_bfloat16_runs_fused_within_bound(phi3v_ckpt, images) -> None:
    ref_enc = load_encoder(f"phi3v:{phi3v_ckpt}", device="cpu", dtype="float32")
    enc = load_encoder(f"phi3v:{phi3v_ckpt}", device="cpu", dtype="bfloat16")
    assert enc.describe()["precision"]["cpu_kernels"] == "onednn-fused"
    assert isinstance(enc.model.img_processor.vision_model, FusedCLIPVisionTransformer)
    assert enc.describe()["parameters"] == ref_enc.describe()["parameters"]
    BOUND.check(encode_images(ref_enc, images), encode_images(enc, images))
    ref_tokens = np.concatenate(ref_enc.encode_tokens(images[:2]))
    BOUND.check(ref_tokens, np.concatenate(enc.encode_tokens(images[:2])))
    # The tower's hidden states themselves (every crop, every patch).
    crops = torch.stack([enc.processor.preprocess_image(im)[0][0] for im in images])
    with torch.inference_mode():
        BOUND.check(_rows(ref_enc.model.crop_features(crops)), _rows(enc.model.crop_features(crops)))
    assert load_encoder(f"phi3v:{phi3v_ckpt}", device="cpu", dtype="float16").describe()["precision"].get("cpu_kernels") is None
