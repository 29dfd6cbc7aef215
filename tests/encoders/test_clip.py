"""CLIP and SigLIP encoders against transformers itself, on tiny random-weight checkpoints.

The reference for images is the checkpoint's own processor (PIL backend) + ``get_image_features``;
for texts its tokenizer + ``get_text_features``; both L2-normalised.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import pickle
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from phiclip.encoders import load_encoder
from phiclip.encoders.clip import CLIPEncoder, SigLIPEncoder
from phiclip.encoders.clip_preprocessing import (
    MAX_RESIZED_PIXELS,
    ImagePreprocessor,
    ProcessorPreprocessor,
    shortest_edge_size,
)
from phiclip.images import load_image
from phiclip.pipeline.step import encode_images
from phiclip.testing import build_tiny_clip, build_tiny_siglip

TEXTS = ["a red circle", "a photo of a blue square", "", "GREEN Triangle!", "circle " * 120]


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny")


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_siglip(tmp_path_factory.mktemp("siglip") / "tiny")


@pytest.fixture(scope="module")
def clip_encoder(clip_dir: Path) -> CLIPEncoder:
    enc = load_encoder(f"clip:{clip_dir}", device="cpu")
    assert isinstance(enc, CLIPEncoder)
    return enc


@pytest.fixture(scope="module")
def siglip_encoder(siglip_dir: Path) -> SigLIPEncoder:
    enc = load_encoder(f"siglip:{siglip_dir}", device="cpu")
    assert isinstance(enc, SigLIPEncoder)
    return enc


@pytest.fixture(scope="module")
def clip_reference(clip_dir: Path):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(clip_dir, use_safetensors=True).eval()
    return model, AutoImageProcessor.from_pretrained(clip_dir, backend="pil"), AutoTokenizer.from_pretrained(clip_dir)


@pytest.fixture(scope="module")
def siglip_reference(siglip_dir: Path):
    from transformers import AutoImageProcessor, AutoTokenizer, SiglipModel

    model = SiglipModel.from_pretrained(siglip_dir, use_safetensors=True).eval()
    return model, AutoImageProcessor.from_pretrained(siglip_dir, backend="pil"), AutoTokenizer.from_pretrained(siglip_dir)


def _random_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8), "RGB")
    if mode == "RGBA":
        img = img.convert("RGBA")
        img.putalpha(Image.fromarray(rng.integers(0, 256, size=(height, width), dtype=np.uint8), "L"))
    elif mode == "P+transparency":
        img = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        img.info["transparency"] = 3
    elif mode != "RGB":
        img = img.convert(mode)
    return img


def _unit(x: torch.Tensor) -> np.ndarray:
    x = x.float()
    return (x / x.norm(dim=-1, keepdim=True)).numpy()


def _ref_images(reference, images: list[Image.Image], normalize: bool = True) -> np.ndarray:
    model, processor, _ = reference
    with torch.no_grad():
        out = model.get_image_features(**processor(images=images, return_tensors="pt"))
    feats = out if isinstance(out, torch.Tensor) else out.pooler_output
    return _unit(feats) if normalize else feats.numpy()


def _ref_texts(reference, texts: list[str], padding: str | bool, max_length: int) -> np.ndarray:
    model, _, tokenizer = reference
    enc = tokenizer(texts, padding=padding, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        out = model.get_text_features(**enc)
    return _unit(out if isinstance(out, torch.Tensor) else out.pooler_output)


def _copy_with_processor(src: Path, dst: Path, **changes) -> Path:
    """A copy of a checkpoint whose image processor settings are changed."""
    shutil.copytree(src, dst)
    cfg_path = dst / "processor_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["image_processor"].update(changes)
    cfg_path.write_text(json.dumps(cfg))
    return dst


# --- preprocessing: identical to the transformers processor -----------------------------------------

# (width, height): landscape, portrait, square at the target, odd sizes, tiny, extreme aspect ratios.
SIZES = [(640, 480), (480, 640), (224, 224), (225, 223), (223, 225), (100, 50), (1, 1), (2, 1), (600, 4), (3, 500)]


def _processors():
    from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil

    return {
        "clip-224": CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}),
        "clip-256-crop-224": CLIPImageProcessorPil(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}),
        "clip-200-pad-224": CLIPImageProcessorPil(size={"shortest_edge": 200}, crop_size={"height": 224, "width": 224}),
        "clip-nonsquare-crop": CLIPImageProcessorPil(size={"shortest_edge": 201}, crop_size={"height": 211, "width": 150},
                                                     resample=2),
        "clip-no-crop": CLIPImageProcessorPil(size={"shortest_edge": 64}, do_center_crop=False),
        "clip-no-rescale": CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                 do_rescale=False, image_mean=[120.0, 110.0, 100.0],
                                                 image_std=[60.0, 61.0, 62.0]),
        "siglip-224": SiglipImageProcessorPil(size={"height": 224, "width": 224}, image_mean=[0.5] * 3, image_std=[0.5] * 3),
        "siglip-nonsquare-lanczos": SiglipImageProcessorPil(size={"height": 100, "width": 180}, resample=1),
    }


PROCESSOR_NAMES = list(_processors())


@pytest.mark.parametrize("name", PROCESSOR_NAMES)
def test_preprocess_identical_to_processor(name: str) -> None:
    processor = _processors()[name]
    prep = ImagePreprocessor.from_image_processor(processor)
    assert prep is not None
    for i, (w, h) in enumerate(SIZES):
        img = _random_image(w, h, seed=i)
        ref = processor(images=[img], return_tensors="pt")["pixel_values"][0]
        got = prep(img)
        assert got.dtype == torch.float32 and got.shape == ref.shape, (name, (w, h), got.shape, ref.shape)
        assert torch.equal(got, ref.float()), (name, (w, h), (got - ref).abs().max().item())
        if prep.output_size() is not None:
            assert tuple(got.shape[1:]) == prep.output_size()


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "P+transparency", "CMYK", "1"])
def test_preprocess_non_rgb_like_processor(mode: str) -> None:
    # Alpha is composited onto white, as transformers' convert_to_rgb does.
    processor = _processors()["clip-224"]
    prep = ImagePreprocessor.from_image_processor(processor)
    src_mode = "LA" if mode == "LA" else mode
    img = _random_image(300, 200, seed=5, mode="RGBA" if mode == "LA" else src_mode)
    if mode == "LA":
        img = img.convert("LA")
    ref = processor(images=[img], return_tensors="pt")["pixel_values"][0]
    assert torch.equal(prep(img), ref)


def test_shortest_edge_size_matches_transformers() -> None:
    from transformers.image_transforms import get_resize_output_image_size

    for w, h in SIZES + [(1000, 999), (333, 1000), (7, 3)]:
        arr = np.zeros((h, w, 3), dtype=np.uint8)
        for edge in (1, 32, 224, 336):
            expected = get_resize_output_image_size(arr, edge, default_to_square=False, input_data_format="channels_last")
            assert shortest_edge_size(h, w, edge) == tuple(expected)


def test_preprocess_extreme_aspect_ratio_with_crop_embeds_and_without_crop_is_refused() -> None:
    tall = Image.new("RGB", (1, MAX_RESIZED_PIXELS // (224 * 224) + 10))
    with_crop = ImagePreprocessor.from_image_processor(_processors()["clip-224"])
    assert tuple(with_crop(tall).shape) == (3, 224, 224)  # only the kept region is resized
    no_crop = ImagePreprocessor.from_image_processor(_processors()["clip-no-crop"])
    tall64 = Image.new("RGB", (1, MAX_RESIZED_PIXELS // (64 * 64) + 10))
    with pytest.raises(ValueError, match="aspect ratio is too extreme") as info:
        no_crop(tall64)
    assert f"1x{tall64.size[1]}" in str(info.value)


def test_unsupported_processor_settings_are_not_reimplemented() -> None:
    from transformers import CLIPImageProcessorPil

    with_longest = CLIPImageProcessorPil(size={"shortest_edge": 224, "longest_edge": 300})
    assert ImagePreprocessor.from_image_processor(with_longest) is None
    assert ImagePreprocessor.from_image_processor(object()) is None


def test_preprocessor_pickles_and_runs_in_worker_process(clip_encoder: CLIPEncoder) -> None:
    from torch.utils.data import DataLoader

    images = [_random_image(320, 240, seed=3), _random_image(100, 300, seed=4)]
    prep = pickle.loads(pickle.dumps(clip_encoder.preprocessor))
    assert torch.equal(prep(images[0]), clip_encoder.preprocess(images[0]))

    class _Images(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(images)

        def __getitem__(self, i: int) -> torch.Tensor:
            return prep(images[i])

    # As the bulk pipeline runs it: preprocess in a worker process, collate, encode in this one.
    loader = DataLoader(_Images(), batch_size=2, num_workers=1, collate_fn=clip_encoder.collate,
                        multiprocessing_context=multiprocessing.get_context("fork"))
    (batch,) = list(loader)
    np.testing.assert_array_equal(clip_encoder.encode_batch(batch).embeddings, encode_images(clip_encoder, images))


# --- CLIP image embeddings ---------------------------------------------------------------------------


def test_clip_images_equal_transformers(clip_encoder: CLIPEncoder, clip_reference) -> None:
    images = [_random_image(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]
    got = encode_images(clip_encoder, images, batch_size=4)
    ref = _ref_images(clip_reference, images)
    assert got.dtype == np.float32 and got.shape == (len(images), clip_encoder.dim)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_clip_accepts_pil_numpy_paths_and_bytes(clip_encoder: CLIPEncoder, clip_reference, tmp_path: Path) -> None:
    pil = _random_image(200, 150, seed=11)
    arr = np.asarray(_random_image(90, 160, seed=12))
    path = tmp_path / "x.png"
    _random_image(250, 250, seed=13).save(path)
    buf = io.BytesIO()
    _random_image(300, 120, seed=14).save(buf, format="PNG")
    inputs = [pil, arr, path, str(path), buf.getvalue()]
    got = encode_images(clip_encoder, inputs)
    ref = _ref_images(clip_reference, [load_image(x) for x in inputs])
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got[2], got[3], atol=0)


def test_clip_dims_and_batch_steps(clip_encoder: CLIPEncoder, clip_dir: Path) -> None:
    config = json.loads((clip_dir / "config.json").read_text())
    assert clip_encoder.dim == config["projection_dim"] == 16
    assert clip_encoder.modalities == frozenset({"image", "text"})
    images = [_random_image(64 + 7 * i, 48, seed=i) for i in range(5)]
    items = [clip_encoder.preprocess(im) for im in images]
    assert all(t.shape == (3, 224, 224) and t.dtype == torch.float32 for t in items)
    batch = clip_encoder.collate(items)
    assert batch.shape == (5, 3, 224, 224)
    out = clip_encoder.encode_batch(batch)
    assert out.embeddings.shape == (5, 16) and out.embeddings.dtype == np.float32 and out.tokens is None
    np.testing.assert_allclose(out.embeddings, encode_images(clip_encoder, images), atol=1e-6)
    assert encode_images(clip_encoder, []).shape == (0, 16)


def test_clip_max_batch_splits_model_calls(clip_dir: Path, clip_encoder: CLIPEncoder, monkeypatch) -> None:
    fast = load_encoder(f"clip:{clip_dir}?max_batch=2", device="cpu")
    fast_sizes: list[int] = []
    fast.image_features.register_forward_hook(lambda m, args, out: fast_sizes.append(args[0].shape[0]))
    images = [_random_image(80, 60, seed=i) for i in range(5)]
    fast.encode_batch(fast.collate([fast.preprocess(im) for im in images]))
    assert fast_sizes == [2, 2, 1]
    enc = load_encoder(f"clip:{clip_dir}?max_batch=2&fast=false", device="cpu")
    assert enc.max_batch == 2
    sizes: list[int] = []
    original = enc.model.get_image_features

    def spy(pixel_values, **kw):
        sizes.append(pixel_values.shape[0])
        return original(pixel_values=pixel_values, **kw)

    monkeypatch.setattr(enc.model, "get_image_features", spy)
    images = [_random_image(80, 60, seed=i) for i in range(5)]
    got = enc.encode_batch(enc.collate([enc.preprocess(im) for im in images])).embeddings
    assert sizes == [2, 2, 1]
    np.testing.assert_allclose(got, encode_images(clip_encoder, images), atol=1e-5)


def test_clip_images_do_not_run_the_text_tower(clip_encoder: CLIPEncoder, monkeypatch) -> None:
    def boom(*a, **k):
        raise AssertionError("text tower ran for images")

    monkeypatch.setattr(clip_encoder.model.text_model, "forward", boom)
    encode_images(clip_encoder, [_random_image(50, 50)])


def test_clip_normalize_false_gives_raw_features(clip_dir: Path, clip_reference) -> None:
    enc = load_encoder(f"clip:{clip_dir}?normalize=false", device="cpu")
    assert enc.normalize is False and enc.describe()["normalized"] is False and enc.describe()["options"]["normalize"] is False
    images = [_random_image(120, 90, seed=1), _random_image(90, 120, seed=2)]
    got = encode_images(enc, images)
    np.testing.assert_allclose(got, _ref_images(clip_reference, images, normalize=False), atol=1e-5, rtol=1e-5)
    assert not np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-3)
    texts = enc.encode_texts(["a red circle"])
    assert not np.isclose(np.linalg.norm(texts[0]), 1.0, atol=1e-3)


def test_clip_other_processor_settings_follow_the_checkpoint(clip_dir: Path, tmp_path: Path) -> None:
    # Shortest edge 256 then a 224 crop, bilinear: still equal to transformers with that processor.
    from transformers import AutoImageProcessor, CLIPModel

    ckpt = _copy_with_processor(clip_dir, tmp_path / "c", size={"shortest_edge": 256}, resample=2)
    enc = load_encoder(f"clip:{ckpt}", device="cpu")
    assert isinstance(enc.preprocessor, ImagePreprocessor)
    pre = enc.describe()["preprocessing"]
    assert pre["resize"] == {"shortest_edge": 256} and pre["resample"] == "bilinear"
    ref = (CLIPModel.from_pretrained(ckpt).eval(), AutoImageProcessor.from_pretrained(ckpt, backend="pil"), None)
    images = [_random_image(400, 300, seed=1), _random_image(100, 333, seed=2)]
    np.testing.assert_allclose(encode_images(enc, images), _ref_images(ref, images), atol=1e-5, rtol=0)


def test_clip_unreproduced_settings_use_the_transformers_processor(clip_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoImageProcessor, CLIPModel

    ckpt = _copy_with_processor(clip_dir, tmp_path / "c", size={"shortest_edge": 224, "longest_edge": 300})
    enc = load_encoder(f"clip:{ckpt}", device="cpu")
    assert isinstance(enc.preprocessor, ProcessorPreprocessor)
    desc = enc.describe()["preprocessing"]
    assert desc["implementation"] == "transformers image processor"
    assert desc["settings"]["size"] == {"shortest_edge": 224, "longest_edge": 300}
    json.dumps(desc)
    ref = (CLIPModel.from_pretrained(ckpt).eval(), AutoImageProcessor.from_pretrained(ckpt, backend="pil"), None)
    images = [_random_image(640, 200, seed=1), _random_image(150, 150, seed=2)]
    np.testing.assert_allclose(encode_images(enc, images), _ref_images(ref, images), atol=1e-5, rtol=0)
    pickle.loads(pickle.dumps(enc.preprocessor))


def test_clip_non_square_processor_output_is_refused(clip_dir: Path, tmp_path: Path) -> None:
    # A 224x160 crop cannot go through a 224x224 vision model: refused at load, naming both sizes.
    ckpt = _copy_with_processor(clip_dir, tmp_path / "c", crop_size={"height": 224, "width": 160})
    with pytest.raises(ValueError) as info:
        load_encoder(f"clip:{ckpt}", device="cpu")
    msg = str(info.value)
    assert "224x160" in msg and "224x224" in msg and "crop_size" in msg


# --- CLIP texts ------------------------------------------------------------------------------------


def test_clip_texts_equal_transformers(clip_encoder: CLIPEncoder, clip_reference) -> None:
    got = clip_encoder.encode_texts(TEXTS, batch_size=2)
    ref = _ref_texts(clip_reference, TEXTS, padding=True, max_length=77)
    assert got.shape == (len(TEXTS), clip_encoder.dim) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # Batching does not change a text's vector; truncation keeps the long text usable.
    np.testing.assert_allclose(clip_encoder.encode_texts(TEXTS[-1:]), got[-1:], atol=1e-5)
    assert clip_encoder.text_max_length == 77


def test_clip_text_errors(clip_encoder: CLIPEncoder) -> None:
    assert clip_encoder.encode_texts([]).shape == (0, clip_encoder.dim)
    with pytest.raises(ValueError, match="one string"):
        clip_encoder.encode_texts("a red circle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="item 1 is int"):
        clip_encoder.encode_texts(["ok", 3])  # type: ignore[list-item]


def test_clip_same_image_and_text_space(clip_encoder: CLIPEncoder) -> None:
    img = encode_images(clip_encoder, [_random_image(64, 64)])
    txt = clip_encoder.encode_texts(["a red circle"])
    assert img.shape[1] == txt.shape[1] == clip_encoder.dim


# --- describe and errors --------------------------------------------------------------------------


def test_clip_describe(clip_encoder: CLIPEncoder, clip_dir: Path) -> None:
    d = clip_encoder.describe()
    json.dumps(d)  # goes into manifest.json
    assert d["spec"] == f"clip:{clip_dir}" == clip_encoder.name
    assert d["kind"] == "clip" and d["details"]["model_class"] == "CLIPModel"
    assert d["dim"] == 16 and d["normalized"] is True and d["modalities"] == ["image", "text"]
    assert d["dtype"] == "float32" and d["device"] == "cpu"
    pre = d["preprocessing"]
    assert pre["resize"] == {"shortest_edge": 224}
    assert pre["crop"] == {"height": 224, "width": 224}
    assert pre["resample"] == "bicubic"
    assert pre["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    assert pre["std"] == pytest.approx([0.26862954, 0.26130258, 0.27577711])
    assert pre["rescale_factor"] == pytest.approx(1 / 255)
    total = sum(p.numel() for p in clip_encoder.model.parameters())
    vision = sum(p.numel() for p in clip_encoder.model.vision_model.parameters())
    assert d["details"]["total_parameters"] == total
    assert d["parameters"] == vision + clip_encoder.model.visual_projection.weight.numel()
    assert d["details"]["text"]["max_length"] == 77 and d["details"]["text"]["truncation"] is True
    assert d["options"] == {"normalize": True, "max_batch": 256, "fast": True, "runtime": "torch", "calibration": None,
                            "calibration_images": 128}


def test_encode_batch_errors(clip_encoder: CLIPEncoder) -> None:
    with pytest.raises(ValueError, match=r"\(n, 3, H, W\)"):
        clip_encoder.encode_batch(torch.zeros(3, 224, 224))
    with pytest.raises(ValueError, match="phi3v"):
        clip_encoder.encode_batch(torch.zeros(1, 3, 224, 224), with_tokens=True)
    with pytest.raises(ValueError, match="different shapes"):
        clip_encoder.collate([torch.zeros(3, 224, 224), torch.zeros(3, 224, 200)])
    assert clip_encoder.encode_batch(torch.zeros(0, 3, 224, 224)).embeddings.shape == (0, 16)


@pytest.mark.parametrize(
    "options,message",
    [("?colour=red", "unknown option"), ("?normalize=maybe", "must be true or false"),
     ("?max_batch=0", "integer >= 1"), ("?max_batch=many", "integer >= 1")],
)
def test_bad_options(clip_dir: Path, options: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        load_encoder(f"clip:{clip_dir}{options}", device="cpu")
    assert str(clip_dir) in str(info.value)


def test_wrong_kind_is_named(clip_dir: Path, siglip_dir: Path) -> None:
    with pytest.raises(ValueError, match=f"use 'siglip:{siglip_dir}'"):
        load_encoder(f"clip:{siglip_dir}", device="cpu")
    with pytest.raises(ValueError, match=f"use 'clip:{clip_dir}'"):
        load_encoder(f"siglip:{clip_dir}", device="cpu")


def test_missing_safetensors_is_explained(clip_dir: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "c"
    shutil.copytree(clip_dir, ckpt)
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="no safetensors weights") as info:
        load_encoder(f"clip:{ckpt}", device="cpu")
    assert f"clip:{ckpt}" in str(info.value)


def test_corrupt_weights_are_explained(clip_dir: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "c"
    shutil.copytree(clip_dir, ckpt)
    (ckpt / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="could not load the model weights") as info:
        load_encoder(f"clip:{ckpt}", device="cpu")
    assert "complete save_pretrained checkpoint" in str(info.value)


def test_missing_image_processor_is_explained(clip_dir: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "c"
    shutil.copytree(clip_dir, ckpt)
    (ckpt / "processor_config.json").unlink()
    with pytest.raises(ValueError, match="could not load the image processor") as info:
        load_encoder(f"clip:{ckpt}", device="cpu")
    assert f"clip:{ckpt}" in str(info.value)


# --- SigLIP ------------------------------------------------------------------------------------------


def test_siglip_images_equal_transformers(siglip_encoder: SigLIPEncoder, siglip_reference) -> None:
    images = [_random_image(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]
    got = encode_images(siglip_encoder, images, batch_size=3)
    assert got.shape == (len(images), 32) and siglip_encoder.dim == 32
    np.testing.assert_allclose(got, _ref_images(siglip_reference, images), atol=1e-5, rtol=0)


def test_siglip_texts_equal_transformers(siglip_encoder: SigLIPEncoder, siglip_reference) -> None:
    # SigLIP pools the last position, so texts are padded to the maximum length (64).
    got = siglip_encoder.encode_texts(TEXTS, batch_size=2)
    ref = _ref_texts(siglip_reference, TEXTS, padding="max_length", max_length=64)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(siglip_encoder.encode_texts(TEXTS[:1]), got[:1], atol=1e-5)


def test_siglip_describe(siglip_encoder: SigLIPEncoder) -> None:
    d = siglip_encoder.describe()
    json.dumps(d)
    assert d["kind"] == "siglip" and d["details"]["model_class"] == "SiglipModel" and d["dim"] == 32
    pre = d["preprocessing"]
    assert pre["resize"] == {"height": 224, "width": 224} and pre["crop"] is None
    assert pre["mean"] == [0.5, 0.5, 0.5] and pre["std"] == [0.5, 0.5, 0.5] and pre["resample"] == "bicubic"
    assert d["details"]["text"]["padding"] == "max_length" and d["details"]["text"]["max_length"] == 64
    assert d["parameters"] == sum(p.numel() for p in siglip_encoder.model.vision_model.parameters())


def test_siglip_without_tokenizer_embeds_images_only(tmp_path: Path, siglip_reference) -> None:
    ckpt = build_tiny_siglip(tmp_path / "s", with_tokenizer=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        enc = load_encoder(f"siglip:{ckpt}", device="cpu")
    assert any("embeds images only" in str(w.message) for w in caught)
    assert enc.modalities == frozenset({"image"})
    d = enc.describe()
    assert d["details"]["text"] is None and d["details"]["text_unavailable"] and d["modalities"] == ["image"]
    with pytest.raises(ValueError, match="cannot embed text") as info:
        enc.encode_texts(["a red circle"])
    assert "sentencepiece" in str(info.value)
    # Same seed, same weights: the images still match the full checkpoint's.
    img = [_random_image(120, 80)]
    np.testing.assert_allclose(encode_images(enc, img), _ref_images(siglip_reference, img), atol=1e-5)


def test_siglip_without_pooling_head_is_refused(siglip_dir: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "s"
    shutil.copytree(siglip_dir, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["vision_config"]["vision_use_head"] = False
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no pooling head"):
        load_encoder(f"siglip:{ckpt}", device="cpu")


# --- devices and precision -------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:.*measured at")
def test_bfloat16_runs_under_autocast_close_to_float32(clip_dir: Path, clip_encoder: CLIPEncoder) -> None:
    enc = load_encoder(f"clip:{clip_dir}", device="cpu", dtype="bfloat16")
    d = enc.describe()
    assert d["dtype"] == "bfloat16" and d["details"]["weights_dtype"] == "float32"
    images = [_random_image(100, 80, seed=i) for i in range(3)]
    low, full = encode_images(enc, images), encode_images(clip_encoder, images)
    assert low.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(low, axis=1), 1.0, atol=1e-5)
    assert (low * full).sum(axis=1).min() > 0.99  # cosine similarity
    assert not np.array_equal(low, full)  # the autocast really ran in bfloat16
    texts = enc.encode_texts(["a red circle"])
    assert (texts * clip_encoder.encode_texts(["a red circle"])).sum() > 0.99


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_cuda_requested_without_cuda(clip_dir: Path) -> None:
    with pytest.raises(ValueError, match="use device='cpu'"):
        load_encoder(f"clip:{clip_dir}", device="cuda")


def test_preprocess_needs_a_pil_image(clip_encoder: CLIPEncoder) -> None:
    with pytest.raises(TypeError, match="load_image"):
        clip_encoder.preprocess(np.zeros((10, 10, 3), dtype=np.uint8))  # type: ignore[arg-type]


def test_extreme_aspect_ratio_resizes_only_the_kept_region(tmp_path):
    """1 x 20000 would become 224 x 4.48 M pixels before the crop; phiclip resizes only the region
    the centre crop keeps (PIL ``box``), which gives the same pixels as the full resize."""
    import phiclip
    from phiclip.testing import build_tiny_clip

    ckpt = build_tiny_clip(tmp_path / "clip", image_size=224, patch_size=32)
    enc = phiclip.load_encoder(f"clip:{ckpt}")
    pre = enc.preprocessor
    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 256, (3, 3000, 3), dtype=np.uint8))
    h, w = pre.resized_size(3, 3000)
    full = img.resize((w, h), resample=pre.resample)
    ch, cw = pre.crop_size
    top, left = (h - ch) // 2, (w - cw) // 2
    expected = np.asarray(full.crop((left, top, left + cw, top + ch)))
    np.testing.assert_array_equal(np.asarray(pre._resize_crop_region(img, h, w)), expected)
    thin = Image.fromarray(rng.integers(0, 256, (1, 20000, 3), dtype=np.uint8))
    vec = encode_images(enc, [thin])
    assert vec.shape == (1, enc.dim) and np.isfinite(vec).all()


def test_transparent_files_match_the_processor_on_the_raw_image(tmp_path):
    """The CLIP processor composites transparency onto white; files decoded by phiclip keep their
    alpha for CLIP encoders so that the vectors equal the processor's on the original image."""
    import phiclip
    from phiclip.images import load_image
    from phiclip.testing import build_tiny_clip

    ckpt = build_tiny_clip(tmp_path / "clip", image_size=64, patch_size=16)
    enc = phiclip.load_encoder(f"clip:{ckpt}")
    rng = np.random.default_rng(5)
    rgba = rng.integers(0, 256, (40, 50, 4), dtype=np.uint8)
    rgba[:, :25, 3] = 0  # half transparent: RGB values there must not leak through
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(ckpt).eval()
    proc = CLIPProcessor.from_pretrained(ckpt)
    with torch.no_grad():
        ref = model.get_image_features(**proc(images=[Image.open(path)], return_tensors="pt"))
    ref = getattr(ref, "pooler_output", ref)
    ref = torch.nn.functional.normalize(ref, dim=-1).numpy()
    np.testing.assert_allclose(encode_images(enc, [path]), ref, atol=1e-5)
    assert load_image(path, keep_alpha=True).mode == "RGBA" and load_image(path).mode == "RGB"


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_fast_image_path_equals_get_image_features(tmp_path, act):
    """phiclip's CLIP image path (fused q/k/v, last layer for the CLS query only) against the
    straightforward ``get_image_features`` on the same weights, and the ``fast=false`` switch."""
    from phiclip.models.clip_vision import CLIPImageFeatures
    from phiclip.testing import build_tiny_clip

    ckpt = build_tiny_clip(tmp_path / "clip", image_size=64, patch_size=16, num_layers=3, vision_overrides={"hidden_act": act})
    fast = load_encoder(f"clip:{ckpt}", device="cpu", dtype="float32")
    plain = load_encoder(f"clip:{ckpt}?fast=false", device="cpu", dtype="float32")
    assert isinstance(fast.image_features, CLIPImageFeatures) and plain.image_features is None
    assert fast.describe()["details"]["image_path"].startswith("phiclip")
    assert plain.describe()["details"]["image_path"].startswith("transformers")
    # Shared weights, not copies.
    assert fast.image_features.visual_projection.weight.data_ptr() == fast.model.visual_projection.weight.data_ptr()
    rng = np.random.default_rng(7)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in [(80, 60), (50, 90), (64, 64)]]
    np.testing.assert_allclose(encode_images(fast, images), encode_images(plain, images), atol=1e-5)
    with torch.inference_mode():
        pixels = torch.randn(5, 3, 64, 64)
        ref = fast.model.get_image_features(pixel_values=pixels)
        ref = getattr(ref, "pooler_output", ref)
        np.testing.assert_allclose(fast.image_features(pixels).numpy(), ref.numpy(), atol=1e-5)
        # phiclip's unfused module on the model's own weights (what the fused copy is built from)
        own = CLIPImageFeatures.from_clip_model(fast.model)
        assert own.visual_projection.weight.data_ptr() == fast.model.visual_projection.weight.data_ptr()
        np.testing.assert_allclose(own(pixels).numpy(), ref.numpy(), atol=1e-5)
    # Before training: the image path reads the model's weights again, so a change to them shows.
    fast.share_model_weights_()
    assert isinstance(fast.image_features, CLIPImageFeatures)
    assert fast.image_features.visual_projection.weight.data_ptr() == fast.model.visual_projection.weight.data_ptr()
    before = encode_images(fast, images)
    with torch.no_grad():
        fast.model.visual_projection.weight.add_(torch.randn_like(fast.model.visual_projection.weight))
        pixels = torch.stack([fast.preprocess(im) for im in images])
        want = fast.model.get_image_features(pixel_values=pixels)
        want = torch.nn.functional.normalize(getattr(want, "pooler_output", want), dim=-1).numpy()
    after = encode_images(fast, images)
    assert not np.allclose(after, before, atol=1e-3)
    np.testing.assert_allclose(after, want, atol=1e-5)


def test_fast_option_must_be_boolean(tmp_path):
    from phiclip.testing import build_tiny_clip

    ckpt = build_tiny_clip(tmp_path / "clip", image_size=64, patch_size=16)
    with pytest.raises(ValueError, match="true or false"):
        load_encoder(f"clip:{ckpt}?fast=maybe")


# --- encode_images prepares a batch on threads ----------------------------------------------------
def test_encode_images_on_threads_equals_one_thread(clip_encoder: CLIPEncoder, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    images = [_random_image(40 + 7 * i, 30 + 5 * i, seed=i) for i in range(7)]
    seen: set[str] = set()
    real = clip_encoder.preprocess

    def spy(image: Image.Image) -> torch.Tensor:
        seen.add(threading.current_thread().name)
        return real(image)

    monkeypatch.setattr(clip_encoder, "preprocess", spy)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)  # the pool size follows torch's threads
    threaded = encode_images(clip_encoder, images, batch_size=4)
    assert seen and all(name.startswith("phiclip-prep") for name in seen)
    seen.clear()
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    serial = encode_images(clip_encoder, images, batch_size=4)
    assert seen == {threading.current_thread().name}
    np.testing.assert_array_equal(threaded, serial)


def test_share_model_weights_refuses_an_image_path_that_cannot_follow_training(tmp_path):
    from phiclip.testing import build_tiny_clip

    ckpt = build_tiny_clip(tmp_path / "clip", image_size=64, patch_size=16)
    enc = load_encoder(f"clip:{ckpt}", device="cpu", dtype="int8")
    with pytest.raises(ValueError, match="compiled or quantised.*float32 with runtime=torch"):
        enc.share_model_weights_()


@pytest.mark.filterwarnings("ignore:.*measured at")
@pytest.mark.parametrize("fused", [True, False])
def test_a_packed_bfloat16_image_path_goes_back_to_the_models_weights(tmp_path, monkeypatch, fused):
    """A bfloat16 encoder's image path is a packed copy (fused oneDNN or 16-bit): before training,
    share_model_weights_ puts the model's own weights back; int8 quantises from those weights."""
    from phiclip.cpu import accelerate
    from phiclip.cpu import fused as cpu_fused
    from phiclip.cpu.int8 import Int8Linear
    from phiclip.models.clip_vision import CLIPImageFeatures
    from phiclip.testing import build_tiny_clip

    if not fused:  # a torch without oneDNN's fused ops: the plain bfloat16 copy (a CLIPImageFeatures too)
        monkeypatch.setattr(cpu_fused, "fusion_available", lambda *dtype: False)
    ckpt = build_tiny_clip(tmp_path / "clip", image_size=64, patch_size=16)
    enc = load_encoder(f"clip:{ckpt}", device="cpu", dtype="bfloat16")
    assert not isinstance(enc.image_features, CLIPImageFeatures) or enc.image_features.visual_projection.weight.dtype == torch.bfloat16
    # int8 for it: from the model's float32 weights (the image module built again on them), not the packed copy
    int8 = accelerate(enc.model, precision="int8", record={}, image_features=enc._fast_image_features)
    assert any(isinstance(m, Int8Linear) for m in int8.image_features.modules())
    direct = load_encoder(f"clip:{ckpt}", device="cpu", dtype="int8")  # quantised from the float32 weights
    ours, want = int8.image_features.state_dict(), direct.image_features.state_dict()
    assert set(ours) == set(want)
    for k, v in want.items():
        assert ours[k].dtype == v.dtype and torch.equal(ours[k], v), k  # the same int8 weights and scales
    enc = load_encoder(f"clip:{ckpt}", device="cpu", dtype="bfloat16")
    enc.share_model_weights_()
    assert isinstance(enc.image_features, CLIPImageFeatures)
    assert enc.image_features.visual_projection.weight.data_ptr() == enc.model.visual_projection.weight.data_ptr()
    assert enc.describe()["precision"]["cpu_kernels"] == "torch"
