"""The phi3v-lm encoder: one space for images and texts, presets and options, the bulk pipeline's
steps, token-bounded batches, and the places an encoder is used (search, compare)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from phiclip import load_encoder
from phiclip.encoders.options import Phi3VLMOptions
from phiclip.encoders.phi3v_lm import PRESETS, Phi3VLMEncoder, default_preset
from phiclip.hub import CheckpointError
from phiclip.phi3v.language import PromptError, PromptTokenizer, pad_prompts
from phiclip.pipeline.step import encode_images
from phiclip.testing import build_tiny_clip, build_tiny_phi3v_lm, make_sample_images


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_phi3v_lm(tmp_path_factory.mktemp("phi3v_lm_enc") / "ckpt", num_crops=4)


@pytest.fixture(scope="module")
def enc(ckpt: Path) -> Phi3VLMEncoder:
    return load_encoder(f"phi3v-lm:{ckpt}", dtype="float32")  # exact comparisons (auto may pick bf16 on a CPU)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in [(160, 120), (90, 300), (40, 40)]]


def test_images_and_texts_land_in_one_normalised_space(enc, images) -> None:
    img = encode_images(enc, images)
    txt = enc.encode_texts(["a red circle", "a blue square", "x"])
    assert img.shape == txt.shape == (3, 32) and img.dtype == txt.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(np.concatenate([img, txt]), axis=1), 1.0, atol=1e-5)
    assert np.isfinite(img @ txt.T).all() and not np.allclose(img[0], img[1])
    assert enc.modalities == frozenset({"image", "text"}) and enc.dim == 32


def test_vectors_equal_the_model_on_each_prompt_alone(enc, images) -> None:
    """Batched and padded (either side) through the encoder = each prompt built by hand, run alone."""
    prompts = PromptTokenizer(enc.tokenizer)
    want = []
    with torch.no_grad():
        for im in images:
            crops, (h, w) = enc.processor.preprocess_image(im)
            ids, mask = pad_prompts([prompts(PRESETS["e5v"].image_prompt, [enc.model.image_embedding.num_tokens(h, w)])])
            want.append(enc.model.embed(ids, mask, [crops], torch.tensor([[h, w]]))[0].numpy())
        text = PRESETS["e5v"].text_prompt.replace("{text}", "a red circle")
        ids, mask = pad_prompts([enc.tokenizer(text).input_ids])
        want_text = enc.model.embed(ids, mask)[0].numpy()
    np.testing.assert_allclose(encode_images(enc, images), np.stack(want), atol=1e-5)
    np.testing.assert_allclose(enc.encode_texts(["a red circle"])[0], want_text, atol=1e-5)
    left = Phi3VLMEncoder(enc.model, enc.processor, enc.tokenizer, name="left", padding_side="left")
    np.testing.assert_allclose(encode_images(left, images), np.stack(want), atol=1e-5)
    np.testing.assert_allclose(left.encode_texts(["a red circle", "much longer text than the other one"])[0], want_text, atol=1e-5)


def test_batches_are_bounded_by_tokens(enc, images) -> None:
    lengths: list[tuple[int, int]] = []
    hook = enc.model.language_model.register_forward_pre_hook(
        lambda m, args, kwargs: lengths.append(tuple(kwargs["inputs_embeds"].shape[:2])), with_kwargs=True)
    small = Phi3VLMEncoder(enc.model, enc.processor, enc.tokenizer, name="small", options=Phi3VLMOptions(max_tokens=900))
    try:
        items = [small.preprocess(im) for im in images] + [small.prompt_item("short text")] * 3
        costs = [small.item_cost(it) for it in items]
        assert [small.item_crops(it) for it in items[:3]] == [int(it["crops"][0].shape[0]) for it in items[:3]]
        assert costs[:3] == [small.tokens_per_image(*im.size) + sum(len(c) for c in small._image_chunks) for im in images]
        got = small.encode_batch(small.collate(items)).embeddings
    finally:
        hook.remove()
    assert all(rows * length <= 900 or rows == 1 for rows, length in lengths) and len(lengths) > 1
    assert sum(rows for rows, _ in lengths) == len(items)
    np.testing.assert_allclose(got, enc.encode_batch(enc.collate(items)).embeddings, atol=1e-5)
    with pytest.raises(ValueError, match="no token sequences"):
        enc.encode_batch(enc.collate(items[:1]), with_tokens=True)


def test_mixed_inputs_and_raw_prompts(enc, images) -> None:
    mixed = enc.encode_mixed(images[:2], ["what colour is it?", "how many?"])
    template = PRESETS["e5v"].mixed_prompt
    raw = enc.encode_prompts([template.replace("{text}", "what colour is it?"), "<|image_2|> then <|image_1|>"],
                             [[images[0]], [images[1], images[2]]])
    np.testing.assert_allclose(mixed[0], raw[0], atol=1e-5)
    assert not np.allclose(mixed[0], encode_images(enc, images[:1])[0])
    with pytest.raises(PromptError, match=r"1 image placeholder\(s\) but 2 image\(s\)"):
        enc.encode_prompts(["<|image_1|> one"], [[images[0], images[1]]])
    with pytest.raises(ValueError, match="one text per image"):
        enc.encode_mixed(images[:2], ["only one"])


def test_presets_and_prompt_options(ckpt: Path) -> None:
    assert default_preset("TIGER-Lab/VLM2Vec-Full") == "vlm2vec"
    assert default_preset("Tevatron/dse-phi3-docmatix-v2") == "dse"
    assert default_preset("microsoft/Phi-3.5-vision-instruct") == "e5v"
    vlm = load_encoder(f"phi3v-lm:{ckpt}?preset=vlm2vec")
    d = vlm.describe()
    opts = d["options"]
    assert (opts["preset"], opts["image_prompt"], opts["pooling"], d["preprocessing"]["num_crops"], opts["max_length"]) == (
        "vlm2vec", "<|image_1|> Represent the given image.", "last", 4, 256)
    assert opts["text_prompt"] == "Find me an everyday image that matches the given caption: {text}"
    assert d["kind"] == "phi3v-lm" and d["modalities"] == ["image", "text"] and d["normalized"] is True
    assert d["weights_fingerprint"].startswith("sha256:") and d["details"]["attn_implementation"] == "sdpa"
    dse = load_encoder(f"phi3v-lm:{ckpt}?preset=dse&pooling=mean")
    assert dse.describe()["options"]["text_prompt"] == "query: {text}</s>" and dse.pooling == "mean"
    with pytest.raises(ValueError, match="no prompt for image \\+ text inputs"):
        dse.encode_mixed([Image.new("RGB", (40, 40))], ["q"])
    # A newline as \n, a comma and an ampersand percent-encoded.
    custom = load_encoder(f"phi3v-lm:{ckpt}?image_prompt=<|image_1|>\\nDescribe%2C briefly %26 well.&text_prompt=q: {{text}}")
    assert custom.image_prompt == "<|image_1|>\nDescribe, briefly & well." and custom.text_prompt == "q: {text}"
    assert custom.encode_texts(["a"]).shape == (1, 32)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("?colour=red", "unknown option"),
        ("?preset=clip", "preset 'clip' is not one of"),
        ("?pooling=cls", "pooling='cls' must be one of"),
        ("?image_prompt=no image here", "must contain <|image_1|> exactly once"),
        ("?text_prompt=<|image_1|> {text}", "must not contain an image placeholder"),
        ("?text_prompt=no slot", "must contain {text}"),
        ("?max_tokens=0", "max_tokens"),
        ("?num_crops=1000", "num_crops"),
    ],
)
def test_bad_options_are_clear_errors(ckpt: Path, options: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("|", r"\|").replace("(", r"\(").replace("{", r"\{")):
        load_encoder(f"phi3v-lm:{ckpt}{options}")


def test_embed_search_and_compare_work_as_for_clip(ckpt: Path, tmp_path: Path) -> None:
    from phiclip.comparison import compare
    from phiclip.pipeline import embed
    from phiclip.retrieval import search

    data = tmp_path / "shapes"
    make_sample_images(data, per_class=1)  # 12 captioned images, labelled by colour
    spec = f"phi3v-lm:{ckpt}?num_crops=1"  # 313 image tokens per image: quick
    result = embed(spec, data, tmp_path / "emb", batch_size=1000, progress=False)  # batch_size: prompt tokens
    assert (result.embedded, result.failed) == (12, 0)
    hits = search(tmp_path / "emb", text="a red circle", k=3)
    assert len(hits) == 3 and all(-1.0 - 1e-4 <= h.score <= 1.0 + 1e-4 for h in hits)

    clip = build_tiny_clip(tmp_path / "clip", image_size=64, patch_size=16, hidden_size=32, num_layers=2, num_heads=2,
                           projection_dim=16)
    report = compare([f"clip:{clip}", spec], data / "labels.csv", None, k=3, isolate=False, templates=["a photo of a {c}."])
    for model in report.models:
        assert set(model.quality.skipped) == {"zero_shot_top5"}  # 4 classes: top-5 would always be 1
        for metric in ("zero_shot_top1", "text_to_image_recall@1", "image_to_text_recall@1", "knn_accuracy"):
            assert metric in model.quality.metrics
    lm = report.models[1]
    assert lm.cost.dim == 32 and 0.0 <= lm.quality.metrics["zero_shot_top1"] <= 1.0


def test_checkpoint_with_the_text_embedding_under_vision_wte_loads(tmp_path: Path, images) -> None:
    """Fine-tuned checkpoints (VLM2Vec) store the text embedding as model.vision_embed_tokens.wte.weight:
    the same weights under that name give the same vectors."""
    from phiclip.phi3v.language import WTE_KEY

    plain = build_tiny_phi3v_lm(tmp_path / "plain", num_crops=1, seed=5)
    moved = build_tiny_phi3v_lm(tmp_path / "moved", num_crops=1, seed=5, embed_key=WTE_KEY)
    a, b = load_encoder(f"phi3v-lm:{plain}", dtype="float32"), load_encoder(f"phi3v-lm:{moved}", dtype="float32")
    np.testing.assert_allclose(a.encode_texts(["a red circle"]), b.encode_texts(["a red circle"]), atol=1e-6)
    np.testing.assert_allclose(encode_images(a, images[:1]), encode_images(b, images[:1]), atol=1e-6)


def test_missing_checkpoint_or_tokenizer_is_a_clear_error(tmp_path: Path) -> None:
    from phiclip.testing import build_tiny_phi3v

    with pytest.raises(CheckpointError, match="is not a directory"):
        load_encoder(f"phi3v-lm:{tmp_path / 'nope'}/")
    vision_only = build_tiny_phi3v(tmp_path / "no_tokenizer", hidden_size=32)
    with pytest.raises(CheckpointError, match="has no tokenizer"):
        load_encoder(f"phi3v-lm:{vision_only}")


def test_int8_is_refused_with_the_precisions_that_work(ckpt: Path) -> None:
    from phiclip.encoders import parse_spec, resolve_placement

    with pytest.raises(ValueError, match="int8"):
        load_encoder(f"phi3v-lm:{ckpt}", dtype="int8")
    spec = parse_spec(f"phi3v-lm:{ckpt}")
    with pytest.raises(ValueError, match="use float32 or bfloat16"):
        Phi3VLMEncoder.build(spec, Phi3VLMOptions.from_spec(spec), resolve_placement("cpu", "int8"))


# --- options, checked when the spec is parsed ---------------------------------------------------
def test_options_are_a_dataclass_checked_before_anything_loads() -> None:
    from phiclip.encoders import KINDS, check_spec, parse_spec

    assert KINDS["phi3v-lm"].options is Phi3VLMOptions
    opts = Phi3VLMOptions.from_spec(parse_spec("phi3v-lm:/m?pooling=mean&num_crops=4&text_prompt=q: {text}"))
    assert (opts.preset, opts.pooling, opts.num_crops, opts.text_prompt, opts.image_prompt) == ("e5v", "mean", 4, "q: {text}", None)
    assert Phi3VLMOptions.from_spec(parse_spec("phi3v-lm:TIGER-Lab/VLM2Vec-Full")).preset == "vlm2vec"
    assert Phi3VLMOptions.from_spec(parse_spec("phi3v-lm:org/x?revision=v1.0")).revision == "v1.0"
    for options, message in [("colour=red", "unknown option(s) colour"), ("pooling=cls", "pooling='cls' must be one of"),
                             ("preset=clip", "preset 'clip' is not one of e5v, vlm2vec, dse"),
                             ("image_prompt=no image", "option image_prompt: the image prompt"),
                             ("mixed_prompt=<|image_1|> only", "must contain {text}"),
                             ("num_crops=65", "num_crops='65' must be an integer from 1 to"), ("max_length=x", "max_length")]:
        with pytest.raises(ValueError) as err:
            check_spec(f"phi3v-lm:/no/such/dir?{options}")  # /no/such/dir is never looked at
        assert message in str(err.value) and "phi3v-lm:/no/such/dir" in str(err.value), options


def test_the_encoder_records_its_options_and_placement(ckpt: Path) -> None:
    enc = load_encoder(f"phi3v-lm:{ckpt}?preset=vlm2vec&pooling=mean&max_tokens=1000", device="cpu", dtype="float32")
    assert enc.options == Phi3VLMOptions(preset="vlm2vec", pooling="mean", max_tokens=1000)
    assert (enc.pooling, enc.max_tokens, enc.processor.num_crops, enc.max_length) == ("mean", 1000, 4, 256)
    assert enc.device == torch.device("cpu") and enc.dtype == torch.float32
    assert enc.precision["requested"] == "float32" and enc.precision["dtype"] == "float32"


# --- a hub id that cannot be reached ------------------------------------------------------------
def _unreachable_message(msg: str) -> bool:
    return "unreachable" in msg and "127.0.0.1:9" in msg and "not in the local cache" in msg and "give a local directory" in msg


def test_unreachable_hub_id_fails_at_once(unreachable: Path) -> None:
    import time

    import transformers  # noqa: F401 - imported before the clock starts

    from phiclip.phi3v.language import load_tokenizer

    t = time.perf_counter()
    with pytest.raises(CheckpointError) as err:
        load_tokenizer("org/absent")
    assert time.perf_counter() - t < 5  # transformers alone retries for ~25 s first
    assert _unreachable_message(str(err.value)) and "tokenizer_config.json" in str(err.value)
    t = time.perf_counter()
    with pytest.raises(CheckpointError) as err:
        load_encoder("phi3v-lm:org/absent", device="cpu", dtype="float32")
    assert time.perf_counter() - t < 5
    assert _unreachable_message(str(err.value)) and "phi3v-lm:org/absent" in str(err.value)


def test_unreachable_hub_serves_the_cache(unreachable: Path, ckpt: Path, images) -> None:
    import shutil
    import time

    commit = "0123456789abcdef0123456789abcdef01234567"
    root = unreachable / "models--org--tinylm"
    shutil.copytree(ckpt, root / "snapshots" / commit)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    t = time.perf_counter()
    cached = load_encoder("phi3v-lm:org/tinylm", device="cpu", dtype="float32")
    assert time.perf_counter() - t < 15
    local = load_encoder(f"phi3v-lm:{ckpt}", device="cpu", dtype="float32")
    np.testing.assert_array_equal(cached.encode_texts(["a red circle"]), local.encode_texts(["a red circle"]))
    assert cached.weights_fingerprint == local.weights_fingerprint
