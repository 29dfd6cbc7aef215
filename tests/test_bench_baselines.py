"""The benchmark baselines (bench/baselines.py) compute the same outputs as phiclip's fast paths.

Benchmarks time these against each other; this keeps the comparison honest on tiny models (no
timing here)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from phiclip.pipeline.step import encode_images

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def baselines():
    sys.path.insert(0, str(BENCH))
    try:
        import baselines as module

        yield module
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def photos():
    rng = np.random.default_rng(0)
    sizes = [(160, 120), (192, 108), (108, 192), (100, 100), (30, 400)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def test_released_preprocessing_equals_processor(baselines, photos):
    from phiclip.phi3v import Phi3VImageProcessor

    for n in (1, 4, 16):
        ref = baselines.released_preprocess(photos, n)
        ours = Phi3VImageProcessor(num_crops=n)(photos)
        assert torch.equal(ref["image_sizes"], ours.image_sizes) and ref["num_img_tokens"] == ours.num_img_tokens
        assert float((ref["pixel_values"] - ours.pixel_values).abs().max()) <= 1e-6


def test_released_image_embedding_equals_image_tokens(baselines, photos, tmp_path):
    from phiclip.phi3v import Phi3VImageEmbedding, Phi3VImageProcessor
    from phiclip.testing import build_tiny_phi3v

    ckpt = build_tiny_phi3v(tmp_path / "p", num_crops=4)
    model = Phi3VImageEmbedding.from_pretrained(ckpt).eval()
    released = baselines.ReleasedImageEmbedding.from_phiclip(model).eval()
    inputs = Phi3VImageProcessor.from_pretrained(ckpt)(photos)
    with torch.inference_mode():
        ref = released.image_tokens(inputs.pixel_values, inputs.image_sizes)
        ours = model.image_tokens(inputs.pixel_values, inputs.image_sizes)
    assert [t.shape for t in ref] == [t.shape for t in ours]
    assert max(float((a - b).abs().max()) for a, b in zip(ref, ours)) <= 1e-5


def test_clip_users_loop_equals_encoder(baselines, photos, tmp_path):
    from phiclip import load_encoder
    from phiclip.testing import build_tiny_clip

    ckpt = build_tiny_clip(tmp_path / "c", image_size=64, patch_size=16)
    ref = baselines.clip_users_loop(ckpt, photos, batch_size=2)
    np.testing.assert_allclose(encode_images(load_encoder(f"clip:{ckpt}"), photos), ref, atol=1e-5)


def test_whole_state_dict_reads_every_tensor(baselines, tmp_path):
    import json

    from phiclip.testing import build_tiny_phi3v

    ckpt = build_tiny_phi3v(tmp_path / "p")
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(baselines.load_whole_state_dict(ckpt)) == set(index)
