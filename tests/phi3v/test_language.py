"""Phi-3-vision's language model as an embedding model: prompt ids as the released processor builds
them, the merge of image tokens, padding on both sides, pooling, and loading (lm_head never read)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from phiclip.hub import CheckpointError
from phiclip.phi3v import Phi3VImageProcessor
from phiclip.phi3v.language import (
    WTE_KEY,
    Phi3VEmbeddingModel,
    PromptError,
    PromptTokenizer,
    load_language_model,
    load_tokenizer,
    pad_prompts,
    pool_hidden_states,
)
from phiclip.testing import build_tiny_phi3v_lm


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_phi3v_lm(tmp_path_factory.mktemp("phi3v_lm") / "ckpt", num_crops=4)


@pytest.fixture(scope="module")
def model(ckpt: Path) -> Phi3VEmbeddingModel:
    return Phi3VEmbeddingModel.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def tok(ckpt: Path):
    return load_tokenizer(ckpt)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in [(160, 120), (60, 200), (40, 40)]]


def _prepared(model: Phi3VEmbeddingModel, images: list[Image.Image]) -> tuple[list[torch.Tensor], list[tuple[int, int]], list[int]]:
    proc = Phi3VImageProcessor(num_crops=4)
    crops, sizes = zip(*(proc.preprocess_image(im) for im in images))
    return list(crops), list(sizes), [model.image_embedding.num_tokens(h, w) for h, w in sizes]


def _released_ids(tokenizer, prompt: str, counts: list[int]) -> list[int]:
    """The released processor's recipe, written out: every text chunk tokenised on its own, each
    <|image_k|> replaced by counts[k-1] copies of -k."""
    chunks = re.split(r"<\|image_\d+\|>", prompt)
    tags = [int(t) for t in re.findall(r"<\|image_(\d+)\|>", prompt)]
    ids: list[int] = []
    for i, chunk in enumerate(chunks):
        ids += tokenizer(chunk).input_ids
        if i < len(tags):
            ids += [-tags[i]] * counts[tags[i] - 1]
    return ids


# --- prompts -----------------------------------------------------------------------------------
def test_prompt_ids_as_the_released_processor_builds_them(tok) -> None:
    pt = PromptTokenizer(tok)
    ids = pt("<|user|>\n<|image_1|>\nhi<|end|>", [3])
    t = tok.convert_tokens_to_ids
    # A BOS-adding tokenizer puts a BOS at the start of every chunk (the released processor's behaviour).
    assert ids == [t("<s>"), t("<|user|>"), t("\n"), -1, -1, -1, t("<s>"), t("▁"), t("\n"), t("h"), t("i"), t("<|end|>")]
    for prompt, counts in [
        ("<|image_1|> Represent the given image.", [7]),
        ("A <|image_2|> and <|image_1|>, compared", [2, 5]),  # out of order: each keeps its own number
        ("<|image_1|><|image_2|>", [4, 1]),
    ]:
        assert pt(prompt, counts) == _released_ids(tok, prompt, counts)
    # Without images the prompt is tokenised whole, and max_length truncates only there.
    assert pt("query: a cat</s>") == tok("query: a cat</s>").input_ids
    short = PromptTokenizer(tok, max_length=4)
    assert short("query: a cat</s>") == tok("query: a cat</s>").input_ids[:4]
    assert len(short("<|image_1|> a long instruction text", [9])) > 9 + 4  # never cut with images


@pytest.mark.parametrize(
    ("prompt", "n_images", "message"),
    [
        ("<|image_1|> one", 2, "1 image placeholder(s) but 2 image(s)"),
        ("no placeholder", 1, "has no <|image_k|> placeholder"),
        ("<|image_2|> gap", 1, "without gaps"),
        ("<|image_1|> twice <|image_1|>", 1, "repeats an image placeholder"),
        ("<|image_1|> but no image", 0, "1 image placeholder(s) but 0 image(s)"),
    ],
)
def test_placeholder_and_image_count_mismatch_is_a_clear_error(tok, prompt: str, n_images: int, message: str) -> None:
    with pytest.raises(PromptError, match=re.escape(message)):
        PromptTokenizer(tok)(prompt, [5] * n_images)


# --- merge, padding, pooling ---------------------------------------------------------------------
def test_inputs_embeds_equal_a_straightforward_construction(model, tok, images) -> None:
    crops, sizes, counts = _prepared(model, images)
    pt = PromptTokenizer(tok)
    rows = [pt("<|image_2|> left, <|image_1|> right", counts[:2]), pt("text <|image_1|>", counts[2:]), pt("only text")]
    ids, mask = pad_prompts(rows, pad_id=tok.pad_token_id, side="right")
    with torch.no_grad():
        got = model.inputs_embeds(ids, crops, torch.tensor(sizes), images_per_row=[2, 1, 0])
        per_image = [model.image_embedding.image_tokens([c], torch.tensor([s]))[0] for c, s in zip(crops, sizes)]
    table = model.language_model.embed_tokens.weight
    owned = [[per_image[0], per_image[1]], [per_image[2]], []]
    for b in range(3):
        used = [0, 0]
        for p in range(ids.shape[1]):
            i = int(ids[b, p])
            if i >= 0:
                want = table[i]
            else:
                want = owned[b][-i - 1][used[-i - 1]]
                used[-i - 1] += 1
            torch.testing.assert_close(got[b, p], want, rtol=0, atol=0)
        assert used[: len(owned[b])] == [t.shape[0] for t in owned[b]]


def test_pooled_vector_is_the_last_real_token_for_both_padding_sides(model, tok, images) -> None:
    crops, sizes, counts = _prepared(model, images[:2])
    pt = PromptTokenizer(tok)
    rows = [pt("<|user|>\n<|image_1|>\nSummary above image in one word:<|end|>", counts[:1]),
            pt("a red circle"), pt("<|image_1|> x", counts[1:])]
    per_row = [1, 0, 1]
    with torch.no_grad():
        alone = []
        for r, ims in zip(rows, ([0], [], [1])):
            ids1, mask1 = pad_prompts([r])
            alone.append(model(ids1, mask1, [crops[i] for i in ims], torch.tensor([sizes[i] for i in ims]).reshape(-1, 2))[0])
        results = {}
        for side in ("left", "right"):
            ids, mask = pad_prompts(rows, pad_id=tok.pad_token_id, side=side)
            hidden = model(ids, mask, crops, torch.tensor(sizes), per_row)
            last = pool_hidden_states(hidden, mask, "last")
            mean = pool_hidden_states(hidden, mask, "mean")
            length = ids.shape[1]
            for b, r in enumerate(rows):
                at = len(r) - 1 if side == "right" else length - 1  # where row b's last real token sits
                torch.testing.assert_close(last[b], hidden[b, at], rtol=0, atol=0)
                torch.testing.assert_close(last[b], alone[b][-1], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(mean[b], alone[b].mean(dim=0), rtol=1e-5, atol=1e-5)
            results[side] = last
    torch.testing.assert_close(results["left"], results["right"], rtol=1e-5, atol=1e-5)


def test_pooling_ignores_padding_even_when_it_is_not_finite() -> None:
    hidden = torch.randn(2, 5, 3)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 0, 0, 0]])
    hidden[mask == 0] = float("nan")
    torch.testing.assert_close(pool_hidden_states(hidden, mask, "last"), torch.stack([hidden[0, 4], hidden[1, 1]]))
    torch.testing.assert_close(pool_hidden_states(hidden, mask, "mean"), torch.stack([hidden[0, 2:].mean(0), hidden[1, :2].mean(0)]))
    with pytest.raises(ValueError, match="pooling"):
        pool_hidden_states(hidden, mask, "cls")


# --- loading -----------------------------------------------------------------------------------
def test_loading_never_reads_lm_head(ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, images) -> None:
    import safetensors

    real = safetensors.safe_open
    read: list[str] = []

    class Spy:
        def __init__(self, *args, **kwargs) -> None:
            self.handle = real(*args, **kwargs)

        def __enter__(self):
            self.f = self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def keys(self):
            return self.f.keys()

        def get_tensor(self, name: str):
            read.append(name)
            return self.f.get_tensor(name)

    monkeypatch.setattr(safetensors, "safe_open", Spy)
    requested: list[str] = []
    lm = load_language_model(ckpt, requested=requested)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    assert "lm_head.weight" in index and "lm_head.weight" not in read and "lm_head.weight" not in requested
    assert sorted(requested) == sorted(k for k in index if k.startswith("model.layers.") or k in ("model.norm.weight", "model.embed_tokens.weight"))
    assert set(requested) <= set(read)
    monkeypatch.setattr(safetensors, "safe_open", real)

    # The shard that holds only lm_head can be gone: nothing changes.
    copy = Path(shutil.copytree(ckpt, tmp_path / "no_head"))
    (copy / index["lm_head.weight"]).unlink()
    full, headless = Phi3VEmbeddingModel.from_pretrained(ckpt), Phi3VEmbeddingModel.from_pretrained(copy)
    crops, sizes, counts = _prepared(full, images[:1])
    ids, mask = pad_prompts([PromptTokenizer(load_tokenizer(ckpt))("<|image_1|> x", counts)])
    with torch.no_grad():
        torch.testing.assert_close(full.embed(ids, mask, crops, torch.tensor(sizes)), headless.embed(ids, mask, crops, torch.tensor(sizes)))
    assert full.weights_fingerprint == headless.weights_fingerprint and full.weights_fingerprint.startswith("sha256:")
    assert isinstance(lm, torch.nn.Module) and not any(p.requires_grad for p in lm.parameters())


def test_released_su_rope_scaling_is_applied(ckpt: Path, model) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["rope_scaling"]["type"] == "su"
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    base = cfg["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    want = 1.0 / (torch.tensor(cfg["rope_scaling"]["short_factor"]) * base)  # prompts under 4096 tokens: short factors
    torch.testing.assert_close(model.language_model.rotary_emb.inv_freq.float(), want, rtol=1e-5, atol=0)
    assert model.language_model.config._attn_implementation == "sdpa"


def test_text_embedding_stored_as_vision_wte_loads(tmp_path: Path) -> None:
    ckpt = build_tiny_phi3v_lm(tmp_path / "wte", embed_key=WTE_KEY, seed=3)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    assert WTE_KEY in index and "model.embed_tokens.weight" not in index
    lm = load_language_model(ckpt)
    from safetensors import safe_open

    with safe_open(str(ckpt / index[WTE_KEY]), framework="pt") as f:
        torch.testing.assert_close(lm.embed_tokens.weight, f.get_tensor(WTE_KEY))


def test_incomplete_language_model_is_a_clear_error(ckpt: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(ckpt, tmp_path / "partial"))
    path = copy / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not k.startswith("model.layers.1.")}
    path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"lacks model\.layers\.1\.\* of its 2-layer language model"):
        load_language_model(copy)
    cfg = json.loads((copy / "config.json").read_text())
    del cfg["num_hidden_layers"]
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="no num_hidden_layers"):
        load_language_model(copy)


def test_unexpected_language_model_tensor_is_named(ckpt: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(ckpt, tmp_path / "extra"))
    path = copy / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    index["weight_map"]["model.layers.0.self_attn.lora_A.weight"] = index["weight_map"]["model.norm.weight"]
    path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"unexpected: \['model\.layers\.0\.self_attn\.lora_A\.weight'\]"):
        load_language_model(copy)
