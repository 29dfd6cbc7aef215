"""The Phi-3-vision encoder: spec options, pooling, tokens, and agreement with the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from phiclip import load_encoder
from phiclip.phi3v import Phi3VImageEmbedding, Phi3VImageProcessor, num_image_tokens
from phiclip.pipeline.step import encode_images
from phiclip.testing import build_tiny_phi3v


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_tiny_phi3v(tmp_path_factory.mktemp("phi3v_enc"), num_crops=4)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in [(640, 480), (90, 300), (40, 40)]]


def _model_pooled(ckpt, images, pooling):
    """The straightforward path: the processor's padded batch through the model's ``pooled``."""
    model = Phi3VImageEmbedding.from_pretrained(ckpt)
    inputs = Phi3VImageProcessor.from_pretrained(ckpt)(images)
    return model.pooled(inputs.pixel_values, inputs.image_sizes, pooling=pooling, normalize=True).detach().numpy()


def test_mean_pooling_matches_model_and_is_normalised(ckpt, images):
    enc = load_encoder(f"phi3v:{ckpt}")
    vecs = encode_images(enc, images)
    assert vecs.shape == (3, 64) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vecs, _model_pooled(ckpt, images, "mean"), atol=1e-5)


def test_tokens_output_agrees_with_pooled_and_counts(ckpt, images):
    enc = load_encoder(f"phi3v:{ckpt}?normalize=false")
    batch = enc.collate([enc.preprocess(im) for im in images])
    plain = enc.encode_batch(batch)
    with_tokens = enc.encode_batch(batch, with_tokens=True)
    np.testing.assert_allclose(plain.embeddings, with_tokens.embeddings, atol=1e-5)
    assert [t.shape[0] for t in with_tokens.tokens] == [num_image_tokens(*im.size, num_crops=4) for im in images]
    # The mean excludes the separators: recompute it from the tokens and the layout.
    for im, toks, vec in zip(images, with_tokens.tokens, with_tokens.embeddings):
        h, w = enc.processor.preprocess_image(im)[1]
        mask = enc.model.separator_mask(h, w).numpy()
        assert mask.sum() == (h // 336) * 12 + 12 + 1
        np.testing.assert_allclose(toks[~mask].mean(axis=0), vec, atol=1e-5)


def test_global_pooling_runs_only_global_view(ckpt, images):
    enc = load_encoder(f"phi3v:{ckpt}?pooling=global")
    assert enc.dim == 32
    seen = []
    hook = enc.model.img_processor.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    try:
        vecs = encode_images(enc, images)
    finally:
        hook.remove()
    assert sum(seen) == len(images)
    np.testing.assert_allclose(vecs, _model_pooled(ckpt, images, "global"), atol=1e-5)


def test_item_cost_is_crop_count(ckpt, images):
    enc = load_encoder(f"phi3v:{ckpt}?num_crops=16")
    items = [enc.preprocess(im) for im in images]
    # 640x480 -> 3x4 crops; 90x300 -> 2x6 crops; 40x40 -> 4x4 crops; plus the global view each.
    assert [enc.item_cost(it) for it in items] == [13, 13, 17]


def test_describe_records_what_decides_the_vectors(ckpt):
    enc = load_encoder(f"phi3v:{ckpt}?num_crops=1&pooling=mean")
    d = enc.describe()
    assert d["spec"] == enc.name and d["kind"] == "phi3v" and d["dim"] == 64
    assert d["preprocessing"]["num_crops"] == 1 and d["options"]["pooling"] == "mean" and d["parameters"] > 0
    assert enc.tokens_per_image(640, 480) == 313


@pytest.mark.parametrize(
    "spec, message",
    [
        ("phi3v:{ckpt}?pooling=max", "pooling"),
        ("phi3v:{ckpt}?num_crops=zero", "integer"),
        ("phi3v:{ckpt}?num_crops=0", "num_crops"),
        ("phi3v:{ckpt}?colour=red", "unknown option"),
        ("phi3v:{ckpt}?normalize=maybe", "true or false"),
        ("phi3v:/nonexistent/dir/phi3v", "not a directory"),
    ],
)
def test_bad_specs_are_clear_errors(ckpt, spec, message):
    with pytest.raises(ValueError, match=message):
        load_encoder(spec.format(ckpt=ckpt))


def test_text_is_refused_clearly(ckpt):
    enc = load_encoder(f"phi3v:{ckpt}")
    with pytest.raises(NotImplementedError, match="images only"):
        enc.encode_texts(["a red circle"])


@pytest.mark.filterwarnings("ignore:.*measured at")
def test_bfloat16_option_close_to_float32(ckpt, images):
    f32 = encode_images(load_encoder(f"phi3v:{ckpt}", dtype="float32"), images)
    bf16 = load_encoder(f"phi3v:{ckpt}", dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16
    cos = (f32 * encode_images(bf16, images)).sum(axis=1)
    assert (cos > 0.98).all()
