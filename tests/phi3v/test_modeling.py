"""Phi3VImageEmbedding against a reference written from the spec (transformers' CLIPVisionModel on
every crop, Python loops for the layout), the merge into text, pooling and the released sample's
calling convention."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from phiclip.phi3v import Phi3ImageEmbedding, Phi3VImageEmbedding, Phi3VImageProcessor, num_image_tokens
from phiclip.testing import phi3v_config_dict

from .helpers import TINY_TOWER
from .reference import (
    CROP,
    SPEC_TABLE,
    ReferenceImagePath,
    noise_image,
    read_vision_tensors,
    ref_separator_mask,
)

TOL = 1e-5

# Mixed sizes: at N=4 a 2x2 grid, a 4x1 portrait column and a 1x2 landscape row.
SIZES = [(640, 480), (90, 400), (700, 300)]


def _images(sizes=SIZES) -> list:
    return [noise_image(w, h, seed=10 + i) for i, (w, h) in enumerate(sizes)]


@pytest.fixture(scope="module")
def inputs4():
    """Processor output for SIZES at num_crops=4 (padded to 5 crops)."""
    return Phi3VImageProcessor(num_crops=4)(_images())


@pytest.fixture(scope="module")
def model4(ckpt4: Path) -> Phi3VImageEmbedding:
    return Phi3VImageEmbedding.from_pretrained(ckpt4, load_text_embeddings=True)


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert [tuple(x.shape) for x in a] == [tuple(y.shape) for y in b]
    return max((x - y).abs().max().item() for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------
# Parity with the reference
# ---------------------------------------------------------------------------------------------
PARITY_CASES = [
    ("sub_glb", "mlp", None),  # the released configuration (layer_idx absent -> -2)
    ("glb_sub", "mlp", None),
    ("sub_glb", "linear", -1),
    ("glb_sub", "linear", 1),
]


@pytest.mark.parametrize("order,projection,layer_idx", PARITY_CASES, ids=[f"{o}-{p}-{li}" for o, p, li in PARITY_CASES])
def test_image_tokens_match_reference(
    build_ckpt: Callable[..., Path],
    reference_for: Callable[[Path], ReferenceImagePath],
    inputs4,
    order: str,
    projection: str,
    layer_idx: int | None,
) -> None:
    path = build_ckpt(num_crops=4, hd_transform_order=order, projection_cls=projection, layer_idx=layer_idx)
    model = Phi3VImageEmbedding.from_pretrained(path)
    assert model.hd_transform_order == order and model.projection_cls == projection
    with torch.no_grad():
        got = model.image_tokens(inputs4.pixel_values, inputs4.image_sizes)
    expected = reference_for(path).image_tokens(inputs4.pixel_values, inputs4.image_sizes)
    assert _max_diff(got, expected) <= TOL
    assert [t.shape[0] for t in got] == inputs4.num_img_tokens
    assert all(t.shape[1] == 64 for t in got)


def test_image_tokens_match_reference_num_crops_16(ckpt: Path, reference_for) -> None:
    images = [noise_image(640, 480, seed=1), noise_image(150, 420, seed=2)]
    inputs = Phi3VImageProcessor.from_pretrained(ckpt)(images)
    assert inputs.pixel_values.shape[1] == 17
    model = Phi3VImageEmbedding.from_pretrained(ckpt)
    with torch.no_grad():
        got = model.image_tokens(inputs.pixel_values, inputs.image_sizes)
    assert _max_diff(got, reference_for(ckpt).image_tokens(inputs.pixel_values, inputs.image_sizes)) <= TOL
    assert [t.shape[0] for t in got] == [num_image_tokens(640, 480, 16), num_image_tokens(150, 420, 16)] == [1921, 1657]


def test_crop_features_match_hf_hidden_state(ckpt4: Path, reference_for, inputs4) -> None:
    model = Phi3VImageEmbedding.from_pretrained(ckpt4)
    crops = inputs4.pixel_values[0, :3]
    with torch.no_grad():
        got = model.get_img_features(crops)
    expected = reference_for(ckpt4).hidden(crops)[:, 1:]  # hidden_states[-2], CLS dropped
    assert got.shape == (3, 576, 32)
    assert (got - expected).abs().max().item() <= TOL


def test_token_counts_equal_num_image_tokens(model4: Phi3VImageEmbedding) -> None:
    sizes = [(336, 336), (1, 1), (50, 800), (800, 50), (1920, 1080), (1000, 999)]
    inputs = Phi3VImageProcessor(num_crops=4)(_images(sizes))
    with torch.no_grad():
        tokens = model4.image_tokens(inputs.pixel_values, inputs.image_sizes)
    expected = [num_image_tokens(w, h, 4) for w, h in sizes]
    assert [t.shape[0] for t in tokens] == expected == inputs.num_img_tokens
    assert [model4.num_tokens(*s) for s in inputs.image_sizes.tolist()] == expected


@pytest.mark.parametrize("row", SPEC_TABLE, ids=lambda r: f"{r[0]}x{r[1]}-N{r[2]}")
def test_spec_table_model_token_count(model4: Phi3VImageEmbedding, row: tuple) -> None:
    _, _, _, sizes, tokens = row
    assert model4.num_tokens(*sizes) == tokens


def test_spec_table_extreme_ratios_run_through_the_model(ckpt: Path) -> None:
    model = Phi3VImageEmbedding.from_pretrained(ckpt)
    sizes = [(50, 8000), (8000, 50)]
    inputs = Phi3VImageProcessor(num_crops=16)(_images(sizes))
    assert inputs.image_sizes.tolist() == [[5376, 336], [336, 5376]]
    with torch.no_grad():
        tokens = model.image_tokens(inputs.pixel_values, inputs.image_sizes)
    assert [t.shape[0] for t in tokens] == [2653, 2473]


# ---------------------------------------------------------------------------------------------
# Padding, chunking, crops actually run
# ---------------------------------------------------------------------------------------------
def test_padded_and_unpadded_inputs_give_identical_tokens(model4: Phi3VImageEmbedding, inputs4) -> None:
    unpadded = Phi3VImageProcessor(num_crops=4)(_images(), padding=False)
    assert [t.shape[0] for t in unpadded.pixel_values] == inputs4.num_crops_per_image
    with torch.no_grad():
        a = model4.image_tokens(inputs4.pixel_values, inputs4.image_sizes)
        b = model4.image_tokens(unpadded.pixel_values, unpadded.image_sizes)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


class _CropCounter:
    """A forward hook on ``img_processor`` recording the crops of every tower call."""

    def __init__(self, module: nn.Module) -> None:
        self.calls: list[int] = []
        self.handle = module.register_forward_hook(lambda _m, args, _out: self.calls.append(args[0].shape[0]))

    def __enter__(self) -> _CropCounter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


def test_max_crops_per_batch_does_not_change_tokens(ckpt4: Path, inputs4) -> None:
    one = Phi3VImageEmbedding.from_pretrained(ckpt4, max_crops_per_batch=1)
    big = Phi3VImageEmbedding.from_pretrained(ckpt4, max_crops_per_batch=1000)
    with torch.no_grad(), _CropCounter(one.img_processor) as c1, _CropCounter(big.img_processor) as cbig:
        a = one.image_tokens(inputs4.pixel_values, inputs4.image_sizes)
        b = big.image_tokens(inputs4.pixel_values, inputs4.image_sizes)
    real = sum(inputs4.num_crops_per_image)
    assert c1.calls == [1] * real
    assert cbig.calls == [real]
    assert _max_diff(a, b) <= 1e-6


def test_tower_never_runs_padded_crops(model4: Phi3VImageEmbedding, inputs4) -> None:
    n, slots = inputs4.pixel_values.shape[:2]
    real = sum(inputs4.num_crops_per_image)  # 5 + 5 + 3
    assert real < n * slots
    poisoned = inputs4.pixel_values.clone()
    for i, c in enumerate(inputs4.num_crops_per_image):
        poisoned[i, c:] = float("nan")  # a padded crop that ran would poison the batch's tokens
    with torch.no_grad(), _CropCounter(model4.img_processor) as counter:
        tokens = model4.image_tokens(poisoned, inputs4.image_sizes)
        pooled = model4.pooled(poisoned, inputs4.image_sizes, pooling="mean")
    assert sum(counter.calls) == 2 * real
    assert all(torch.isfinite(t).all() for t in tokens) and torch.isfinite(pooled).all()


def test_cls_patch_with_hd_transform_is_a_value_error() -> None:
    config = phi3v_config_dict(hidden_size=64, vocab_size=128, vision_config=TINY_TOWER, type_feature="cls_patch")
    with pytest.raises(ValueError, match="cls_patch") as err:
        Phi3VImageEmbedding(config)
    assert "HD" in str(err.value)


# ---------------------------------------------------------------------------------------------
# Merging into text
# ---------------------------------------------------------------------------------------------
def _prompts(num_img_tokens: list[int], seed: int = 0) -> tuple[torch.Tensor, list[list[tuple[int, int, int]]]]:
    """Two prompts: images 0, 1 in the first (ids -1, -2), images 2, 3, 4 in the second (ids -1, -2,
    -3), text around them; padded with text ids to one length. Returns the ids and, per prompt,
    ``(image index, start, length)`` of every image run."""
    g = torch.Generator().manual_seed(seed)

    def text(k: int) -> torch.Tensor:
        return torch.randint(1, 128, (k,), generator=g)  # id 0 never used as text

    layout = [[0, 1], [2, 3, 4]]
    rows, runs = [], []
    for images in layout:
        parts, row_runs, pos = [], [], 0
        for k, img in enumerate(images, start=1):
            t = text(3 + k)
            parts.append(t)
            pos += len(t)
            parts.append(torch.full((num_img_tokens[img],), -k, dtype=torch.long))
            row_runs.append((img, pos, num_img_tokens[img]))
            pos += num_img_tokens[img]
        parts.append(text(4))
        rows.append(torch.cat(parts))
        runs.append(row_runs)
    length = max(len(r) for r in rows)
    ids = torch.stack([torch.cat([r, torch.full((length - len(r),), 7, dtype=torch.long)]) for r in rows])
    return ids, runs


@pytest.fixture(scope="module")
def inputs5():
    sizes = [(640, 480), (90, 400), (700, 300), (336, 336), (200, 100)]
    return Phi3VImageProcessor(num_crops=4)(_images(sizes))


def test_forward_merges_image_tokens_in_order(model4: Phi3VImageEmbedding, inputs5) -> None:
    ids, runs = _prompts(inputs5.num_img_tokens)
    before = ids.clone()
    with torch.no_grad():
        out = model4(ids, inputs5.pixel_values, inputs5.image_sizes)
        tokens = model4.image_tokens(inputs5.pixel_values, inputs5.image_sizes)
    assert torch.equal(ids, before)  # the caller's markers are kept
    assert out.shape == (*ids.shape, 64)
    expected = model4.wte.weight.detach()[ids.clamp_min(0)].clone()
    is_image = torch.zeros(ids.shape, dtype=torch.bool)
    for b, row_runs in enumerate(runs):
        for img, start, length in row_runs:
            expected[b, start : start + length] = tokens[img]
            is_image[b, start : start + length] = True
    assert torch.equal(is_image, ids < 0)
    assert (out - expected).abs().max().item() <= 1e-6
    # Text positions are exactly the embedding table's rows.
    assert torch.equal(out[~is_image], model4.wte.weight.detach()[ids[~is_image]])


def test_forward_loaded_embed_tokens_is_the_checkpoint_tensor(ckpt4: Path, model4: Phi3VImageEmbedding) -> None:
    from safetensors import safe_open

    with safe_open(str(ckpt4 / "model-00001-of-00002.safetensors"), framework="pt") as f:
        stored = f.get_tensor("model.embed_tokens.weight")
    assert torch.equal(model4.wte.weight.detach(), stored)


def test_forward_gradients_flow(ckpt4: Path, inputs5) -> None:
    model = Phi3VImageEmbedding.from_pretrained(ckpt4, load_text_embeddings=True)
    ids, _ = _prompts(inputs5.num_img_tokens, seed=3)
    out = model(ids, inputs5.pixel_values, inputs5.image_sizes)
    out.sum().backward()
    for name in ("img_projection.0.weight", "img_projection.2.bias", "glb_GN", "sub_GN", "img_processor.vision_model.embeddings.patch_embedding.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    wgrad = model.wte.weight.grad
    used = ids[ids >= 0].unique()
    assert (wgrad[used].abs().sum(dim=1) > 0).all()
    # Marker positions are not embedded: id 0 (what a clamp would look up) gets no gradient.
    assert 0 not in used.tolist() and torch.all(wgrad[0] == 0)


def test_forward_text_only(model4: Phi3VImageEmbedding) -> None:
    ids = torch.tensor([[1, 2, 3], [4, 5, 127]])
    with torch.no_grad():
        out = model4(ids)
    assert torch.equal(out, model4.wte.weight.detach()[ids])


def test_forward_marker_count_mismatch_names_both_counts(model4: Phi3VImageEmbedding, inputs5) -> None:
    ids, runs = _prompts(inputs5.num_img_tokens)
    total = sum(inputs5.num_img_tokens)
    _, start, _ = runs[1][0]
    ids[1, start] = 9  # one marker fewer
    with pytest.raises(ValueError) as err:
        model4(ids, inputs5.pixel_values, inputs5.image_sizes)
    numbers = re.findall(r"\d+", str(err.value))
    assert str(total - 1) in numbers and str(total) in numbers
    # Markers without any image.
    ids2, _ = _prompts(inputs5.num_img_tokens)
    with pytest.raises(ValueError, match=str(total)):
        model4(ids2)


def test_forward_without_wte_is_a_clear_error(ckpt4: Path, inputs4) -> None:
    model = Phi3VImageEmbedding.from_pretrained(ckpt4)  # load_text_embeddings=False
    assert model.wte is None
    with pytest.raises(ValueError, match="load_text_embeddings"):
        model(torch.tensor([[1, 2]]), inputs4.pixel_values, inputs4.image_sizes)


# ---------------------------------------------------------------------------------------------
# Pooling
# ---------------------------------------------------------------------------------------------
def test_pooled_mean_excludes_separators(model4: Phi3VImageEmbedding, inputs4) -> None:
    with torch.no_grad():
        tokens = model4.image_tokens(inputs4.pixel_values, inputs4.image_sizes)
        pooled = model4.pooled(inputs4.pixel_values, inputs4.image_sizes, pooling="mean")
    assert pooled.shape == (3, 64)
    for i, (H, W) in enumerate(inputs4.image_sizes.tolist()):
        mask = torch.tensor(ref_separator_mask(H, W, "sub_glb"))
        assert mask.shape[0] == tokens[i].shape[0]
        assert int(mask.sum()) == (H // CROP) * 12 + 1 + 12
        expected = tokens[i][~mask].mean(dim=0)
        assert (pooled[i] - expected).abs().max().item() <= TOL
        assert (pooled[i] - tokens[i].mean(dim=0)).abs().max().item() > 1e-4  # separators would change it


def test_pooled_mean_glb_sub_layout(build_ckpt, inputs4) -> None:
    model = Phi3VImageEmbedding.from_pretrained(build_ckpt(num_crops=4, hd_transform_order="glb_sub"))
    with torch.no_grad():
        tokens = model.image_tokens(inputs4.pixel_values, inputs4.image_sizes)
        pooled = model.pooled(inputs4.pixel_values, inputs4.image_sizes)
    for i, (H, W) in enumerate(inputs4.image_sizes.tolist()):
        mask = torch.tensor(ref_separator_mask(H, W, "glb_sub"))
        assert (pooled[i] - tokens[i][~mask].mean(dim=0)).abs().max().item() <= TOL


def test_pooled_global_is_mean_of_global_view_features(ckpt4: Path, model4, reference_for, inputs4) -> None:
    with torch.no_grad(), _CropCounter(model4.img_processor) as counter:
        pooled = model4.pooled(inputs4.pixel_values, inputs4.image_sizes, pooling="global")
    assert counter.calls == [3]  # one crop per image
    expected = reference_for(ckpt4).global_pooled(inputs4.pixel_values)
    assert pooled.shape == (3, 32)
    assert (pooled - expected).abs().max().item() <= TOL
    unpadded = Phi3VImageProcessor(num_crops=4)(_images(), padding=False)
    with torch.no_grad():
        again = model4.pooled(unpadded.pixel_values, unpadded.image_sizes, pooling="global")
    assert torch.allclose(again, pooled, atol=1e-6)


@pytest.mark.parametrize("pooling", ["mean", "global"])
def test_pooled_normalize_gives_unit_norm(model4, inputs4, pooling: str) -> None:
    with torch.no_grad():
        raw = model4.pooled(inputs4.pixel_values, inputs4.image_sizes, pooling=pooling)
        unit = model4.pooled(inputs4.pixel_values, inputs4.image_sizes, pooling=pooling, normalize=True)
    assert torch.allclose(unit.norm(dim=-1), torch.ones(3), atol=1e-6)
    assert torch.allclose(unit, raw / raw.norm(dim=-1, keepdim=True), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The released sample's calling convention, full state dicts, dropout
# ---------------------------------------------------------------------------------------------
def _config_object(kind: str, embd_pdrop: float = 0.0):
    d = phi3v_config_dict(hidden_size=64, vocab_size=128, vision_config=TINY_TOWER, embd_pdrop=embd_pdrop)
    fields = {k: d[k] for k in ("img_processor", "embd_layer", "hidden_size", "vocab_size", "embd_pdrop")}
    if kind == "pretrained":
        from transformers import PretrainedConfig

        return PretrainedConfig(**fields)
    return SimpleNamespace(**fields)


def _full_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Every image-path tensor (all tower layers and post_layernorm included) with module names,
    plus ``wte.weight``: what ``state_dict()`` of the released model's ``vision_embed_tokens`` holds."""
    from safetensors import safe_open

    sd = read_vision_tensors(path)
    with safe_open(str(path / "model-00001-of-00002.safetensors"), framework="pt") as f:
        sd["wte.weight"] = f.get_tensor("model.embed_tokens.weight")
    return sd


@pytest.mark.parametrize("kind", ["pretrained", "namespace"])
def test_released_sample_signature_and_full_state_dict(ckpt4: Path, model4, inputs5, kind: str) -> None:
    config = _config_object(kind)
    sd = _full_state_dict(ckpt4)
    assert any(".layers.2." in k for k in sd) and any("post_layernorm" in k for k in sd)
    model = Phi3ImageEmbedding(config, wte=nn.Embedding(config.vocab_size, config.hidden_size), **config.embd_layer)
    result = model.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    model.eval()
    ids, _ = _prompts(inputs5.num_img_tokens, seed=5)
    with torch.no_grad():
        out = model(ids, inputs5.pixel_values, inputs5.image_sizes)
        expected = model4(ids, inputs5.pixel_values, inputs5.image_sizes)
    assert (out - expected).abs().max().item() <= 1e-6


def test_embedding_dropout_only_in_train_mode(ckpt4: Path, model4, inputs4) -> None:
    config = _config_object("namespace", embd_pdrop=0.5)
    model = Phi3ImageEmbedding(config, wte=nn.Embedding(128, 64), **config.embd_layer)
    model.load_state_dict(_full_state_dict(ckpt4))
    ids, _ = _prompts(inputs4.num_img_tokens + [0, 0], seed=1)  # only the first prompt's images
    ids = ids[:1]
    with torch.no_grad():
        no_drop = model4(ids, inputs4.pixel_values[:2], inputs4.image_sizes[:2])
        model.eval()
        evaluated = model(ids, inputs4.pixel_values[:2], inputs4.image_sizes[:2])
        model.train()
        torch.manual_seed(0)
        trained = model(ids, inputs4.pixel_values[:2], inputs4.image_sizes[:2])
    assert (evaluated - no_drop).abs().max().item() <= 1e-6
    assert not torch.allclose(trained, evaluated)
    dropped = trained == 0
    assert 0.3 < dropped.float().mean().item() < 0.7
    assert torch.allclose(trained[~dropped], 2 * evaluated[~dropped], atol=1e-5)
