"""SigLIP 2 (NaFlex and fixed), MetaCLIP 2, AIMv2 (LiT and image-only), DINOv2 (with and without
registers) and DINOv3 against transformers itself, on tiny random-weight checkpoints (hidden 32,
2 layers) saved with save_pretrained, processor and tokenizer files.

References: the family's image processor (PIL backend) + ``get_image_features`` (or the pooled
output of image-only models), the tokenizer + ``get_text_features``; float32, within 1e-5.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from phiclip.encoders import load_encoder
from phiclip.encoders.registry import kind_for_location, resolve_spec
from phiclip.hub import CheckpointError
from phiclip.pipeline.step import encode_images
from phiclip.testing import (
    build_tiny_aimv2,
    build_tiny_dinov2,
    build_tiny_dinov3,
    build_tiny_metaclip2,
    build_tiny_siglip2,
)

ATOL = 1e-5
TEXTS = ["a red circle", "a photo of a blue square", "", "GREEN Triangle!", "circle " * 40]
#: (width, height): landscape, portrait, square, tiny, extreme.
SIZES = [(64, 48), (30, 90), (50, 50), (1, 1), (300, 7), (9, 200)]


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8), "RGB")


def _three_aspect_ratios() -> list[Image.Image]:
    return [_image(64, 48, 1), _image(30, 90, 2), _image(50, 50, 3)]


def _unit(x: torch.Tensor) -> np.ndarray:
    x = x.float()
    return (x / x.norm(dim=-1, keepdim=True)).numpy()


def _pooled(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {
        "siglip2": build_tiny_siglip2(root / "siglip2"),
        "siglip2-fixed": build_tiny_siglip2(root / "siglip2-fixed", naflex=False),
        "metaclip2": build_tiny_metaclip2(root / "metaclip2"),
        "aimv2": build_tiny_aimv2(root / "aimv2"),
        "aimv2-vision": build_tiny_aimv2(root / "aimv2-vision", lit=False),
        "aimv2-nohead": build_tiny_aimv2(root / "aimv2-nohead", lit=False, use_head=False),
        "dinov2": build_tiny_dinov2(root / "dinov2"),
        "dinov2-reg": build_tiny_dinov2(root / "dinov2-reg", registers=2),
        "dinov3": build_tiny_dinov3(root / "dinov3"),
    }


def _reference(path: Path, model_class: str, **kwargs):
    import transformers

    return getattr(transformers, model_class).from_pretrained(path, use_safetensors=True, **kwargs).eval()


def _processor(path: Path):
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(path, backend="pil")


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


# --- kinds: one table, and the kind found from config.json ---------------------------------------------


@pytest.mark.parametrize(("name", "kind"), [
    ("siglip2", "siglip2"), ("siglip2-fixed", "siglip"), ("metaclip2", "metaclip2"), ("aimv2", "aimv2"),
    ("aimv2-vision", "aimv2"), ("dinov2", "dinov2"), ("dinov2-reg", "dinov2"), ("dinov3", "dinov3")])
def test_the_kind_is_found_from_model_type(dirs: dict[str, Path], name: str, kind: str) -> None:
    assert kind_for_location(dirs[name]) == kind
    spec = resolve_spec(f"{dirs[name]}?normalize=false")
    assert (spec.kind, spec.location, spec.options) == (kind, str(dirs[name]), {"normalize": "false"})
    assert resolve_spec(f"{kind}:{dirs[name]}").kind == kind  # a spec with its kind is read as written


def test_kind_detection_errors(tmp_path: Path, dirs: dict[str, Path]) -> None:
    (tmp_path / "custom").mkdir()
    (tmp_path / "custom" / "config.json").write_text(json.dumps({"model_type": "my_vit"}))
    with pytest.raises(CheckpointError, match="model_type 'my_vit' is not one phiclip loads"):
        load_encoder(str(tmp_path / "custom"), device="cpu", dtype="float32")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json, so the kind cannot be found.*dinov2"):
        resolve_spec(str(tmp_path / "empty"))
    # The other kinds' model types are refused by name, with the kind that loads them.
    with pytest.raises(CheckpointError, match="use 'dinov2:"):
        load_encoder(f"dinov3:{dirs['dinov2']}", device="cpu", dtype="float32")


def test_a_kindless_spec_loads_and_names_its_kind(dirs: dict[str, Path]) -> None:
    enc = load_encoder(f"{dirs['dinov2']}?pool=mean", device="cpu", dtype="float32")
    assert enc.name == f"dinov2:{dirs['dinov2']}?pool=mean" and enc.kind == "dinov2"


# --- SigLIP 2 NaFlex -------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_num_patches", [None, 7, 64])
def test_naflex_preprocessing_equals_the_processor(dirs: dict[str, Path], max_num_patches: int | None) -> None:
    spec = f"siglip2:{dirs['siglip2']}" + (f"?max_num_patches={max_num_patches}" if max_num_patches else "")
    enc = load_encoder(spec, device="cpu", dtype="float32")
    processor = _processor(dirs["siglip2"])
    kwargs = {"max_num_patches": max_num_patches} if max_num_patches else {}
    images = [_image(w, h, i) for i, (w, h) in enumerate(SIZES)]
    ours = enc.collate([enc.preprocess(im) for im in images])
    ref = processor(images=images, return_tensors="pt", **kwargs)
    assert ours["pixel_values"].shape == ref["pixel_values"].shape
    assert torch.equal(ours["pixel_values"], ref["pixel_values"].float())
    assert torch.equal(ours["pixel_attention_mask"], ref["pixel_attention_mask"].to(torch.int32))
    assert torch.equal(ours["spatial_shapes"], ref["spatial_shapes"].to(torch.int64))


def test_naflex_images_of_three_aspect_ratios_in_one_batch(dirs: dict[str, Path]) -> None:
    enc = load_encoder(f"siglip2:{dirs['siglip2']}", device="cpu", dtype="float32")
    model, processor = _reference(dirs["siglip2"], "Siglip2Model"), _processor(dirs["siglip2"])
    images = _three_aspect_ratios()
    shapes = [enc.preprocess(im).spatial_shape for im in images]
    assert len(set(shapes)) == 3  # three patch grids padded into one batch
    with torch.no_grad():
        ref = _unit(_pooled(model.get_image_features(**processor(images=images, return_tensors="pt"))))
    batched = encode_images(enc, images)
    np.testing.assert_allclose(batched, ref, atol=ATOL, rtol=0)
    one_at_a_time = np.concatenate([encode_images(enc, [im]) for im in images])
    np.testing.assert_allclose(batched, one_at_a_time, atol=ATOL, rtol=0)
    d = enc.describe()
    assert d["dim"] == 32 and d["details"]["layout"] == "naflex" and d["details"]["max_num_patches"] == 24
    assert d["modalities"] == ["image", "text"] and d["weights_fingerprint"].startswith("sha256:")


def test_siglip2_texts_equal_transformers(dirs: dict[str, Path]) -> None:
    enc = load_encoder(f"siglip2:{dirs['siglip2']}", device="cpu", dtype="float32")
    model, tok = _reference(dirs["siglip2"], "Siglip2Model"), _tokenizer(dirs["siglip2"])
    batch = tok(TEXTS, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    with torch.no_grad():
        ref = _unit(_pooled(model.get_text_features(**batch)))
    np.testing.assert_allclose(enc.encode_texts(TEXTS), ref, atol=ATOL, rtol=0)


def test_siglip2_fixed_resolution_in_the_siglip_layout(dirs: dict[str, Path]) -> None:
    path = dirs["siglip2-fixed"]
    enc = load_encoder(f"siglip2:{path}", device="cpu", dtype="float32")
    model, processor, tok = _reference(path, "SiglipModel"), _processor(path), _tokenizer(path)
    images = _three_aspect_ratios()
    with torch.no_grad():
        ref = _unit(_pooled(model.get_image_features(**processor(images=images, return_tensors="pt"))))
        text_ref = _unit(_pooled(model.get_text_features(
            **tok(TEXTS, padding="max_length", max_length=16, truncation=True, return_tensors="pt"))))
    np.testing.assert_allclose(encode_images(enc, images), ref, atol=ATOL, rtol=0)
    np.testing.assert_allclose(enc.encode_texts(TEXTS), text_ref, atol=ATOL, rtol=0)
    assert enc.describe()["details"]["layout"] == "fixed" and enc.kind == "siglip2"
    with pytest.raises(ValueError, match="max_num_patches is for NaFlex checkpoints"):
        load_encoder(f"siglip2:{path}?max_num_patches=64", device="cpu", dtype="float32")


# --- MetaCLIP 2 and AIMv2 --------------------------------------------------------------------------------


def _check_clip_style(enc, model, processor, tok, padding: str | bool = True) -> None:
    images = _three_aspect_ratios() + [_image(7, 300, 4)]
    with torch.no_grad():
        ref = _unit(_pooled(model.get_image_features(**processor(images=images, return_tensors="pt"))))
        text_ref = _unit(_pooled(model.get_text_features(
            **tok(TEXTS, padding=padding, max_length=16, truncation=True, return_tensors="pt"))))
    np.testing.assert_allclose(encode_images(enc, images), ref, atol=ATOL, rtol=0)
    np.testing.assert_allclose(enc.encode_texts(TEXTS), text_ref, atol=ATOL, rtol=0)


def test_metaclip2_equals_transformers(dirs: dict[str, Path]) -> None:
    path = dirs["metaclip2"]
    enc = load_encoder(f"metaclip2:{path}", device="cpu", dtype="float32")
    _check_clip_style(enc, _reference(path, "MetaClip2Model"), _processor(path), _tokenizer(path))
    assert enc.dim == 16 and enc.describe()["preprocessing"]["implementation"].startswith("phiclip")


def test_aimv2_lit_equals_transformers_eager(dirs: dict[str, Path]) -> None:
    path = dirs["aimv2"]
    enc = load_encoder(f"aimv2:{path}", device="cpu", dtype="float32")
    # The eager text path is the reference (SDPA drops the causal mask of an unpadded batch in 5.25).
    _check_clip_style(enc, _reference(path, "Aimv2Model", attn_implementation="eager"), _processor(path),
                      _tokenizer(path))
    alone = np.concatenate([enc.encode_texts([t]) for t in TEXTS])
    np.testing.assert_allclose(alone, enc.encode_texts(TEXTS), atol=ATOL, rtol=0)  # batching changes nothing
    assert enc.describe()["details"]["text_attention"].startswith("eager")
    # What the eager path avoids: under SDPA an unpadded text alone attends both ways.
    sdpa, tok = _reference(path, "Aimv2Model", attn_implementation="sdpa"), _tokenizer(path)
    with torch.no_grad():
        lone = _unit(_pooled(sdpa.get_text_features(**tok(TEXTS[:1], padding=True, return_tensors="pt"))))
    assert np.abs(lone - alone[:1]).max() > 1e-2


@pytest.mark.parametrize("name", ["aimv2-vision", "aimv2-nohead"])
def test_aimv2_image_only(dirs: dict[str, Path], name: str) -> None:
    path = dirs[name]
    enc = load_encoder(f"aimv2:{path}", device="cpu", dtype="float32")
    model, processor = _reference(path, "Aimv2VisionModel"), _processor(path)
    images = _three_aspect_ratios()
    with torch.no_grad():
        out = model(**processor(images=images, return_tensors="pt"))
    ref = out.pooler_output if name == "aimv2-vision" else out.last_hidden_state.mean(dim=1)
    np.testing.assert_allclose(encode_images(enc, images), _unit(ref), atol=ATOL, rtol=0)
    assert enc.modalities == frozenset({"image"})
    with pytest.raises(NotImplementedError, match="aimv2 encoders embed images only"):
        enc.encode_texts(["a red circle"])


# --- DINOv2 and DINOv3 -----------------------------------------------------------------------------------


def test_dinov2_preprocessing_equals_the_processor(dirs: dict[str, Path]) -> None:
    enc = load_encoder(f"dinov2:{dirs['dinov2']}", device="cpu", dtype="float32")
    processor = _processor(dirs["dinov2"])
    for i, (w, h) in enumerate(SIZES):
        im = _image(w, h, i)
        assert torch.equal(enc.preprocess(im), processor(images=[im], return_tensors="pt")["pixel_values"][0])
    assert enc.describe()["preprocessing"]["crop"] == {"height": 32, "width": 32}


@pytest.mark.parametrize("name", ["dinov2", "dinov2-reg", "dinov3"])
@pytest.mark.parametrize("pool", ["cls", "mean", "cls+mean"])
def test_dino_pools_equal_transformers(dirs: dict[str, Path], name: str, pool: str) -> None:
    path = dirs[name]
    kind = "dinov3" if name == "dinov3" else "dinov2"
    enc = load_encoder(f"{kind}:{path}?pool={pool}", device="cpu", dtype="float32")
    model = _reference(path, {"dinov2": "Dinov2Model", "dinov2-reg": "Dinov2WithRegistersModel",
                              "dinov3": "DINOv3ViTModel"}[name])
    images = _three_aspect_ratios()
    pixels = torch.stack([enc.preprocess(im) for im in images])
    with torch.no_grad():
        out = model(pixel_values=pixels)
    registers = {"dinov2": 0, "dinov2-reg": 2, "dinov3": 4}[name]
    cls_token, patches = out.pooler_output, out.last_hidden_state[:, 1 + registers:]
    assert patches.shape[1] == 16  # 32 / 8 squared: the registers are left out
    ref = {"cls": cls_token, "mean": patches.mean(dim=1),
           "cls+mean": torch.cat([cls_token, patches.mean(dim=1)], dim=-1)}[pool]
    got = encode_images(enc, images)
    np.testing.assert_allclose(got, _unit(ref), atol=ATOL, rtol=0)
    assert got.shape[1] == enc.dim == (64 if pool == "cls+mean" else 32)
    assert enc.describe()["details"]["pool"] == pool and enc.describe()["details"]["num_register_tokens"] == registers
    with pytest.raises(NotImplementedError, match=f"{kind} encoders embed images only"):
        enc.encode_texts(["a red circle"])


def _dinov3_reference(image: Image.Image, size: int = 32) -> torch.Tensor:
    """DINOv3ViTImageProcessor's steps, written out: uint8 -> * 1/255 (float32) -> resize of the float
    image (torchvision's tensor resize: interpolate, bilinear, antialias) -> (x - mean) / std."""
    x = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1) * (1 / 255)
    if tuple(x.shape[1:]) != (size, size):
        x = torch.nn.functional.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False,
                                            antialias=True)[0]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(-1, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(-1, 1, 1)
    return (x - mean) / std


def test_dinov3_preprocessing_follows_its_processor(dirs: dict[str, Path]) -> None:
    enc = load_encoder(f"dinov3:{dirs['dinov3']}", device="cpu", dtype="float32")
    for i, (w, h) in enumerate([*SIZES, (32, 32)]):
        im = _image(w, h, i)
        assert torch.equal(enc.preprocess(im), _dinov3_reference(im))
    # Rescaled before the resize (float), not resized as bytes: differs from a PIL bilinear resize.
    im = _image(64, 48)
    pil = torch.from_numpy(np.array(im.resize((32, 32), resample=2))).permute(2, 0, 1) / 255
    assert not torch.equal(enc.preprocess(im)[0], ((pil[0] - 0.485) / 0.229).float())
    assert enc.describe()["preprocessing"]["resize"] == {"height": 32, "width": 32}


def test_dinov3_center_crop_setting(dirs: dict[str, Path], tmp_path: Path) -> None:
    path = shutil.copytree(dirs["dinov3"], tmp_path / "dinov3-crop")
    cfg = json.loads((path / "preprocessor_config.json").read_text())
    cfg.update(size={"shortest_edge": 36}, do_center_crop=True, crop_size={"height": 32, "width": 32})
    (path / "preprocessor_config.json").write_text(json.dumps(cfg))
    enc = load_encoder(f"dinov3:{path}", device="cpu", dtype="float32")
    for w, h in [(64, 48), (30, 90), (1, 1)]:
        assert tuple(enc.preprocess(_image(w, h)).shape) == (3, 32, 32)


# --- every family through the embed pipeline -------------------------------------------------------------


@pytest.mark.parametrize(("name", "spec"), [
    ("siglip2", "siglip2:{}"), ("siglip2-fixed", "siglip2:{}"), ("metaclip2", "metaclip2:{}"), ("aimv2", "aimv2:{}"),
    ("aimv2-vision", "{}"), ("dinov2-reg", "{}?pool=cls+mean"), ("dinov3", "dinov3:{}")])
def test_embed_pipeline(dirs: dict[str, Path], tmp_path: Path, name: str, spec: str) -> None:
    from phiclip.pipeline.runner import embed
    from phiclip.store import open_embeddings
    from phiclip.testing import make_sample_images

    records = make_sample_images(tmp_path / "imgs", per_class=1)
    for r in records[5:]:
        Path(r["path"]).unlink()
    records = records[:5]
    res = embed(spec.format(dirs[name]), str(tmp_path / "imgs"), tmp_path / "out", num_workers=0, progress=False,
                device="cpu", precision="float32", dtype="float32")
    assert (res.embedded, res.failed) == (5, 0)
    emb = open_embeddings(tmp_path / "out")
    enc = load_encoder(spec.format(dirs[name]), device="cpu", dtype="float32")
    assert emb.encoder_spec == enc.name and emb.manifest["encoder"]["kind"] == enc.kind
    by_source = dict(zip(emb.sources, emb.embeddings))
    got = np.stack([next(v for s, v in by_source.items() if s.endswith(Path(r["path"]).name)) for r in records])
    np.testing.assert_allclose(got, encode_images(enc, [r["path"] for r in records]), atol=ATOL, rtol=0)


def test_embed_text_with_an_image_only_family_says_so(dirs: dict[str, Path], tmp_path: Path) -> None:
    from phiclip.inputs import InputError
    from phiclip.pipeline.runner import embed_text

    (tmp_path / "texts.txt").write_text("a red circle\na blue square\n")
    with pytest.raises(InputError, match="embeds images only"):
        embed_text(str(dirs["dinov3"]), str(tmp_path / "texts.txt"), tmp_path / "out", num_workers=0, progress=False,
                   device="cpu", precision="float32")


@pytest.mark.parametrize(("name", "kind"), [("siglip2", "siglip2"), ("dinov3", "dinov3"), ("aimv2", "aimv2")])
def test_image_module_is_the_image_path(dirs: dict[str, Path], name: str, kind: str) -> None:
    """The hook a CPU accelerator takes: the image path as one module, swapped in through image_path."""
    enc = load_encoder(f"{kind}:{dirs[name]}?normalize=false", device="cpu", dtype="float32")
    images = _three_aspect_ratios()
    batch = enc.collate([enc.preprocess(im) for im in images])
    module = enc.image_module()
    assert isinstance(module, torch.nn.Module) and module.model is enc.model
    with torch.no_grad():
        direct = module(batch).numpy()
    np.testing.assert_allclose(enc.encode_batch(batch).embeddings, direct, atol=ATOL, rtol=0)
    calls = []
    enc.image_path = lambda b: calls.append(b) or module(b)
    enc.encode_batch(batch)
    assert len(calls) == 1


@pytest.mark.parametrize("name", ["siglip2", "metaclip2", "aimv2", "dinov2", "dinov3"])
def test_code_and_absurd_sizes_in_config_are_refused(dirs: dict[str, Path], tmp_path: Path, name: str) -> None:
    for change, message in [({"auto_map": {"AutoModel": "evil.Model"}}, "auto_map"),
                            ({"hidden_size": 10**12}, "hidden_size")]:
        path = shutil.copytree(dirs[name], tmp_path / f"{name}-{message}")
        cfg = json.loads((path / "config.json").read_text())
        cfg.update(change)
        (path / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(CheckpointError, match=message):
            load_encoder(f"{name}:{path}", device="cpu", dtype="float32")


# --- CPU precisions through phiclip.cpu.accelerate: each within its stated bound of float32 ------------


#: (checkpoint, spec options): every family and layout; AIMv2's image-only layout with and without its head.
PRECISION_CASES = ["siglip2", "siglip2-fixed", "metaclip2", "aimv2", "aimv2-vision", "aimv2-nohead", "dinov2",
                   "dinov2-reg", "dinov3"]


@pytest.mark.parametrize("precision", ["bfloat16", "int8"])
@pytest.mark.parametrize("name", PRECISION_CASES)
def test_each_precision_stays_within_its_bound(dirs: dict[str, Path], name: str, precision: str) -> None:
    from phiclip.cpu.precision import ERROR_BOUNDS

    kind = "siglip2" if name.startswith("siglip2") else kind_for_location(dirs[name])
    spec = f"{kind}:{dirs[name]}" + ("?pool=cls+mean" if kind.startswith("dino") else "")
    ref_enc = load_encoder(spec, device="cpu", dtype="float32")
    enc = load_encoder(spec, device="cpu", dtype=precision)
    images = _three_aspect_ratios() + [_image(40, 40, s) for s in range(4, 9)]
    ERROR_BOUNDS[precision].check(encode_images(ref_enc, images), encode_images(enc, images))
    record = enc.describe()["precision"]
    assert record["dtype"] == precision and "in place" in record["image_weights"]
    assert record["cpu_kernels"] == "torch"
    if precision == "int8":
        assert record["int8"]["quantized_products"] > 0
    # The float32 encoder is the model as loaded; the parameter count is the loaded one at every precision.
    assert "image_weights" not in ref_enc.describe()["precision"]
    assert enc.describe()["parameters"] == ref_enc.describe()["parameters"]
    if "text" in enc.modalities:  # the text side keeps float32 weights (16-bit: under autocast; int8: eager float32)
        ref_text, text = ref_enc.encode_texts(TEXTS), enc.encode_texts(TEXTS)
        if precision == "int8":
            np.testing.assert_allclose(text, ref_text, atol=ATOL)
        else:
            ERROR_BOUNDS[precision].check(ref_text, text)


# --- compiled runtimes (OpenVINO / ONNX Runtime) for the fixed-shape image paths ---------------------


@pytest.mark.compiled_runtime
@pytest.mark.parametrize(("name", "runtime", "precision"), [
    ("siglip2-fixed", "openvino", "float32"), ("metaclip2", "onnxruntime", "int8"), ("aimv2", "openvino", "float32"),
    ("aimv2-vision", "onnxruntime", "float32"), ("dinov2-reg", "onnxruntime", "int8"), ("dinov3", "openvino", "float32")])
def test_a_compiled_runtime_stays_within_its_bound(dirs: dict[str, Path], name: str, runtime: str, precision: str,
                                                   tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from phiclip.cpu.precision import ERROR_BOUNDS
    from phiclip.cpu.runtimes import missing_packages

    if missing_packages(runtime, precision):
        pytest.skip(f"{runtime} is not installed")
    monkeypatch.setenv("PHICLIP_CACHE", str(tmp_path / "cache"))
    kind = "siglip2" if name.startswith("siglip2") else kind_for_location(dirs[name])
    pool = "&pool=cls+mean" if kind.startswith("dino") else ""
    images = _three_aspect_ratios() + [_image(40, 40, s) for s in range(4, 7)]
    ref = encode_images(load_encoder(f"{kind}:{dirs[name]}?{pool[1:]}" if pool else f"{kind}:{dirs[name]}",
                                     device="cpu", dtype="float32"), images)
    enc = load_encoder(f"{kind}:{dirs[name]}?runtime={runtime}{pool}", device="cpu", dtype=precision)
    ERROR_BOUNDS[precision].check(ref, encode_images(enc, images))
    assert enc.describe()["precision"]["runtime"]["runtime"] == runtime and enc.image_path is not None
    if kind.startswith("dino"):  # the pooling option names its own conversion: cls alone is not read back as cls+mean
        cls_only = load_encoder(f"{kind}:{dirs[name]}?runtime={runtime}", device="cpu", dtype=precision)
        assert encode_images(cls_only, images).shape[1] * 2 == ref.shape[1]


def test_naflex_refuses_a_compiled_runtime(dirs: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="NaFlex checkpoint's number of patches varies"):
        load_encoder(f"siglip2:{dirs['siglip2']}?runtime=openvino", device="cpu", dtype="float32")
