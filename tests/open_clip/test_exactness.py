"""phiclip's open_clip kind against open_clip itself (see conftest.py for how the reference runs):
embeddings of every supported architecture (shrunk), tokens, preprocessing, export round trips."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from phiclip.testing import OPEN_CLIP_ARCHS, build_tiny_open_clip, shrink_open_clip_config

ARCHS = sorted(OPEN_CLIP_ARCHS)
TOL = 1e-5
TEXTS = [
    "a photo of a cat",
    "",
    "   ",
    "A PHOTO OF A DOG, running!!",
    "Tom &amp; Jerry &lt;3 &amp;amp; &#39;quoted&#39; &nbsp;x",
    "don’t “curly” quotes — and ﬁne ligatures",
    "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ",
    "émoji 🐱🐶👍🏽 and ZWJ 👨‍👩‍👧 family",
    "日本語のテキスト 中文 한국어 العربية עברית",
    "café naïve Ångström e\u0301",
    "tabs\tand\nnewlines\r\n  and    spaces",
    "mojibake: cafÃ© naÃ¯ve",
    "it's we're they've I'm you'll he'd",
    "numbers 1234567890 3.14159 1e-9",
    "<b>html</b> &amp; tags",
    " ".join(["over-long"] * 120),
    "x" * 400,
]
SIZES = [(37, 51), (301, 199), (224, 225), (17, 333), (333, 17), (64, 64), (99, 1001), (225, 224)]
PREPROCESS = {
    "shortest_bicubic": {"size": 224},
    "shortest_bilinear": {"size": 224, "interpolation": "bilinear"},
    "longest_fill": {"size": 224, "resize_mode": "longest", "fill_color": 128},
    "squash": {"size": 96, "resize_mode": "squash", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
    "shortest_336": {"size": 336},
}


def _images(folder: Path) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate(SIZES):
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 // max(w, 1), yy * 255 // max(h, 1), (xx + yy) % 256], -1).astype(np.float64)
        pixels = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
        path = folder / f"img{i}_{w}x{h}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(str(path))
    rgba = np.concatenate([rng.integers(0, 256, (45, 67, 3)), rng.integers(0, 256, (45, 67, 1))], -1).astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(folder / "alpha_67x45.png")
    paths.append(str(folder / "alpha_67x45.png"))
    return paths


def _finetuned(work: Path) -> dict[str, Path]:
    """``phiclip finetune clip`` outputs (3 steps) of two tiny open_clip checkpoints: a CLIP and a
    CustomTextCLIP (text tower saved under ``text.``, as open_clip lays it out)."""
    from safetensors.torch import load_file, save_file

    from phiclip.finetune.clip import finetune_clip
    from phiclip.testing import make_caption_images

    csv = make_caption_images(work / "captions", size=(48, 40))
    out = {}
    for name, custom in (("finetuned", False), ("finetuned_custom_text", True)):
        cfg = shrink_open_clip_config("ViT-B-16")
        if custom:
            cfg["custom_text"] = True
        src = build_tiny_open_clip(work / f"{name}_src", model_cfg=cfg, seed=7,
                                   preprocess_cfg={"resize_mode": "squash", "interpolation": "bilinear"})
        if custom:
            weights = src / "open_clip_model.safetensors"
            state = load_file(str(weights))
            save_file({k if k.startswith(("visual.", "logit_")) else f"text.{k}": v for k, v in state.items()}, str(weights))
        finetune_clip(f"open_clip:{src}", csv, work / name, steps=3, batch_size=12, lr=1e-3, eval_fraction=0.0,
                      device="cpu", progress=False, num_threads=1, tensorboard=False)
        out[name] = work / name
    return out


@pytest.fixture(scope="module")
def reference(open_clip_reference, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One run of open_clip over every architecture, preprocessing config, and a folder phiclip
    exported to the open_clip format (from a transformers CLIP)."""
    from phiclip.open_clip.export import export_to_hf, export_to_open_clip

    work = tmp_path_factory.mktemp("oc_ref")
    images = _images(work)
    ours = build_tiny_open_clip(work / "ours", arch="ViT-L-14-quickgelu", seed=3)
    export_to_hf(f"open_clip:{ours}", work / "ours_hf")
    export_to_open_clip(f"clip:{work / 'ours_hf'}", work / "ours_back")
    finetuned = _finetuned(work)
    job = {"out": str(work / "out"), "images": images, "texts": TEXTS,
           "archs": {a: shrink_open_clip_config(a) for a in ARCHS},
           "load": {"phiclip_export": str(work / "ours_back"), **{k: str(v) for k, v in finetuned.items()}},
           "preprocess": PREPROCESS}
    out = open_clip_reference(job, work)
    return {"out": out, "images": images, "work": work}


def _load(path: str, kind: str = "open_clip"):
    from phiclip.encoders import load_encoder

    return load_encoder(f"{kind}:{path}?normalize=false", device="cpu", dtype="float32")


def _embed(encoder, images: list[str]) -> np.ndarray:
    return encoder.encode_batch(encoder.collate([encoder.preprocess(Image.open(p)) for p in images])).embeddings


@pytest.mark.parametrize("arch", ARCHS)
def test_embeddings_equal_open_clip(reference: dict, arch: str) -> None:
    ref = np.load(reference["out"] / f"{arch}.npz")
    encoder = _load(str(reference["out"] / arch))
    pixels = np.stack([encoder.preprocess(Image.open(p)).numpy() for p in reference["images"]])
    assert np.array_equal(pixels, ref["pixels"])  # open_clip's transform, pixel for pixel
    assert np.array_equal(encoder.tokenizer.tokenize(TEXTS).numpy(), ref["tokens"])
    assert np.abs(_embed(encoder, reference["images"]) - ref["image"]).max() <= TOL
    assert np.abs(encoder.encode_texts(TEXTS) - ref["text"]).max() <= TOL


def test_tokens_identical_on_tricky_strings(reference: dict) -> None:
    from phiclip.open_clip.tokenizer import OpenCLIPTokenizer

    ref = np.load(reference["out"] / "ViT-B-32.npz")["tokens"]
    ours = OpenCLIPTokenizer().tokenize(TEXTS).numpy()
    for i, text in enumerate(TEXTS):
        assert ours[i].tolist() == ref[i].tolist(), text
    assert ref[TEXTS.index(" ".join(["over-long"] * 120))][-1] == 49407  # truncated, end token kept


def test_tokens_without_ftfy_differ_only_on_mojibake(reference: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from phiclip.open_clip import tokenizer as tok

    monkeypatch.setattr(tok, "_fix_text_function", lambda: (tok.fix_text_fallback, "fallback"))
    ref = np.load(reference["out"] / "ViT-B-32.npz")["tokens"]
    ours = tok.OpenCLIPTokenizer().tokenize(TEXTS).numpy()
    differ = [TEXTS[i] for i in range(len(TEXTS)) if ours[i].tolist() != ref[i].tolist()]
    assert differ == ["mojibake: cafÃ© naÃ¯ve"]


@pytest.mark.parametrize("name", sorted(PREPROCESS))
def test_preprocessing_pixel_equal(reference: dict, name: str) -> None:
    from phiclip.open_clip.config import parse_preprocess
    from phiclip.open_clip.preprocessing import OpenCLIPPreprocessor

    pp = PREPROCESS[name]
    pre = OpenCLIPPreprocessor(parse_preprocess(pp, pp["size"]))
    ref = np.load(reference["out"] / f"preprocess_{name}.npz")
    for i, path in enumerate(reference["images"]):
        assert np.array_equal(pre(Image.open(path)).numpy(), ref[f"image{i}"]), path


@pytest.mark.parametrize("arch", ["ViT-B-32", "ViT-g-14", "ViT-bigG-14", "ViT-H-14-quickgelu"])
def test_export_round_trip(reference: dict, arch: str, tmp_path: Path) -> None:
    """open_clip -> hf -> transformers, and -> phiclip's clip: kind, within 1e-5 of open_clip."""
    import torch
    from transformers import CLIPModel, CLIPProcessor

    from phiclip.open_clip.export import export_to_hf

    ref = np.load(reference["out"] / f"{arch}.npz")
    result = export_to_hf(f"open_clip:{reference['out'] / arch}", tmp_path / "hf")
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json"} <= set(result.files)
    model = CLIPModel.from_pretrained(str(tmp_path / "hf")).eval()
    CLIPProcessor.from_pretrained(str(tmp_path / "hf"))
    with torch.no_grad():
        image = model.get_image_features(pixel_values=torch.from_numpy(ref["pixels"])).pooler_output
        text = model.get_text_features(input_ids=torch.from_numpy(ref["tokens"])).pooler_output
    assert np.abs(image.numpy() - ref["image"]).max() <= TOL
    assert np.abs(text.numpy() - ref["text"]).max() <= TOL
    clip = _load(str(tmp_path / "hf"), "clip")
    feats = clip.encode_batch(torch.from_numpy(ref["pixels"])).embeddings
    assert np.abs(feats - ref["image"]).max() <= TOL
    plain = [0, 3]  # clean lower-case text: transformers' tokenizer gives open_clip's ids
    assert np.abs(clip.encode_texts([TEXTS[i] for i in plain]) - ref["text"][plain]).max() <= TOL


def test_exported_open_clip_folder_loads_in_open_clip(reference: dict) -> None:
    """phiclip open_clip -> hf -> open_clip format, loaded by open_clip.create_model_from_pretrained:
    the same embeddings as phiclip's original."""
    ref = np.load(reference["out"] / "phiclip_export.npz")
    encoder = _load(str(reference["work"] / "ours"))
    pixels = np.stack([encoder.preprocess(Image.open(p)).numpy() for p in reference["images"]])
    assert np.array_equal(pixels, ref["pixels"])
    assert np.abs(_embed(encoder, reference["images"]) - ref["image"]).max() <= TOL
    assert np.abs(encoder.encode_texts(TEXTS) - ref["text"]).max() <= TOL


@pytest.mark.parametrize("name", ["finetuned", "finetuned_custom_text"])
def test_finetuned_open_clip_loads_in_open_clip(reference: dict, name: str) -> None:
    """``phiclip finetune clip`` on an open_clip: model writes an open_clip folder that
    open_clip.create_model_from_pretrained loads (a CustomTextCLIP too), with phiclip's preprocessing,
    tokens and embeddings."""
    ref = np.load(reference["out"] / f"{name}.npz")
    encoder = _load(str(reference["work"] / name))
    pixels = np.stack([encoder.preprocess(Image.open(p)).numpy() for p in reference["images"]])
    assert np.array_equal(pixels, ref["pixels"])
    assert np.array_equal(encoder.tokenizer.tokenize(TEXTS).numpy(), ref["tokens"])
    assert np.abs(_embed(encoder, reference["images"]) - ref["image"]).max() <= TOL
    assert np.abs(encoder.encode_texts(TEXTS) - ref["text"]).max() <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["ViT-B-32", pytest.param("ViT-L-14", marks=pytest.mark.skipif(
    os.environ.get("PHICLIP_SLOW") != "1", reason="real-size ViT-L/14 (428M parameters, 2-3 min): PHICLIP_SLOW=1"))])
def test_real_size_equals_open_clip(open_clip_reference, tmp_path: Path, arch: str) -> None:
    """Real-size ViT-B/32 (151M parameters; about 30-40 s on 2 cores, so part of ``make test``) and, with
    PHICLIP_SLOW=1, ViT-L/14: open_clip's own config and initialisation (norms and biases perturbed off 1 and
    0), preprocessing, tokens and float32 embeddings against open_clip."""
    from phiclip.testing import OPEN_CLIP_ARCHS

    images = _images(tmp_path)
    job = {"out": str(tmp_path / "out"), "images": images, "texts": TEXTS, "archs": {arch: OPEN_CLIP_ARCHS[arch]},
           "own_init": [arch]}
    out = open_clip_reference(job, tmp_path)
    ref = np.load(out / f"{arch}.npz")
    encoder = _load(str(out / arch))
    assert encoder.describe()["details"]["total_parameters"] > 150_000_000  # both towers, real size
    pixels = np.stack([encoder.preprocess(Image.open(p)).numpy() for p in images])
    assert np.array_equal(pixels, ref["pixels"])
    assert np.array_equal(encoder.tokenizer.tokenize(TEXTS).numpy(), ref["tokens"])
    image, text = _embed(encoder, images), encoder.encode_texts(TEXTS)
    assert np.abs(ref["image"]).max() > 0.05 and np.abs(ref["text"]).max() > 0.05  # not vanishing outputs
    errors = {"image": float(np.abs(image - ref["image"]).max()), "text": float(np.abs(text - ref["text"]).max())}
    print(f"{arch}: max abs difference from open_clip {errors}, output scale "
          f"{float(np.abs(ref['image']).max()):.3g} / {float(np.abs(ref['text']).max()):.3g}")
    assert max(errors.values()) <= TOL, errors
