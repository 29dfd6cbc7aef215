"""phiclip.cpu.runtimes: which runtime runs the image side (and the errors for impossible asks), and CLIP /
SigLIP encoders through OpenVINO and ONNX Runtime within their precision's bound of float32, converted
once and read back from the cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _runtimes import installed as _installed
from _runtimes import write_images as _write_images
from PIL import Image

import phiclip.cpu.runtimes as R
from phiclip import load_encoder
from phiclip.cache import CACHE_ENV
from phiclip.cpu.precision import ERROR_BOUNDS
from phiclip.testing import (
    build_tiny_aimv2,
    build_tiny_clip,
    build_tiny_metaclip2,
    build_tiny_open_clip,
    build_tiny_siglip,
    build_tiny_siglip2,
)

#: These tests compile models with OpenVINO / ONNX Runtime (`-m compiled_runtime` selects them).
pytestmark = pytest.mark.compiled_runtime


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


# --- the choice ---------------------------------------------------------------------------------------
def test_torch_is_the_default_and_never_needs_a_package(monkeypatch) -> None:
    _installed(monkeypatch)
    for precision in ("float32", "bfloat16", "int8"):
        assert R.choose_runtime("torch", precision).runtime == "torch"


def test_auto_takes_openvino_for_float32_and_bfloat16_and_onnxruntime_for_int8_where_installed(monkeypatch) -> None:
    _installed(monkeypatch, "openvino", "onnxruntime", "onnx")
    assert R.choose_runtime("auto", "bfloat16").runtime == "openvino"
    assert R.choose_runtime("auto", "int8").runtime == "onnxruntime"
    assert R.choose_runtime("auto", "float32").runtime == "openvino"  # float32 arithmetic there too
    assert R.choose_runtime("auto", "float16").runtime == "torch"
    assert R.choose_runtime("auto", "bfloat16", "cuda").runtime == "torch"


def test_auto_without_the_packages_stays_torch_and_says_how_to_install(monkeypatch) -> None:
    _installed(monkeypatch)
    choice = R.choose_runtime("auto", "int8")
    assert choice.runtime == "torch" and "phiclip[cpu-runtimes]" in choice.reason


def test_impossible_asks_are_clear_errors(monkeypatch) -> None:
    _installed(monkeypatch, "openvino")
    with pytest.raises(ValueError, match="runtime openvino runs precision float32, bfloat16, int8, not float16"):
        R.choose_runtime("openvino", "float16")
    with pytest.raises(ValueError, match=r"onnxruntime needs onnxruntime, onnx.*pip install 'phiclip\[cpu-runtimes\]'"):
        R.choose_runtime("onnxruntime", "int8")
    with pytest.raises(ValueError, match="CPU only"):
        R.choose_runtime("openvino", "bfloat16", "cuda")
    with pytest.raises(ValueError, match="not one of"):
        R.choose_runtime("tensorrt", "float32")


def test_the_spec_option_is_checked_when_the_spec_is_read(tmp_path) -> None:
    ckpt = build_tiny_clip(tmp_path / "clip")
    with pytest.raises(ValueError, match="runtime"):
        load_encoder(f"clip:{ckpt}?runtime=tvm", device="cpu", dtype="float32")


# --- encoders through a compiled runtime ----------------------------------------------------------------
def _pixels(enc, n: int = 5) -> torch.Tensor:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40 + 3 * i, 48, 3), dtype=np.uint8)) for i in range(n)]
    return torch.stack([enc.preprocess(im) for im in images])


CASES = [("openvino", "bfloat16"), ("openvino", "float32"), ("onnxruntime", "int8"), ("onnxruntime", "float32")]


@pytest.mark.parametrize(("runtime", "precision"), CASES)
def test_clip_through_a_runtime_stays_within_the_bound_and_is_cached(tmp_path, cache, runtime, precision) -> None:
    if R.missing_packages(runtime):
        pytest.skip(f"{runtime} is not installed (phiclip[cpu-runtimes])")
    ckpt = build_tiny_clip(tmp_path / "clip")
    ref_enc = load_encoder(f"clip:{ckpt}", device="cpu", dtype="float32")
    pixels = _pixels(ref_enc)
    ref = ref_enc.encode_batch(pixels).embeddings
    enc = load_encoder(f"clip:{ckpt}?runtime={runtime}", device="cpu", dtype=precision)
    info = enc.describe()["precision"]["runtime"]
    assert info["runtime"] == runtime and info["precision"] == precision and info["converted_now"] is True
    out = enc.encode_batch(pixels).embeddings
    assert out.shape == ref.shape and out.dtype == np.float32
    ERROR_BOUNDS[precision].check(ref, out)
    if precision != "float32":
        assert not np.array_equal(out, ref)  # the runtime really ran at its precision
    # One image alone, and a batch cut by max_batch, stay within the bound too (int8 quantises each
    # call's activations over the call, so its rows depend a little on the batch).
    ERROR_BOUNDS[precision].check(ref[:1], enc.encode_batch(pixels[:1]).embeddings)
    again = load_encoder(f"clip:{ckpt}?runtime={runtime}&max_batch=2", device="cpu", dtype=precision)
    assert again.describe()["precision"]["runtime"]["converted_now"] is False  # read back from the cache
    ERROR_BOUNDS[precision].check(ref, again.encode_batch(pixels).embeddings)
    assert len(list((cache / "runtimes").iterdir())) == 1  # one finished conversion, no leftover work folders


def test_siglip_int8_through_onnxruntime(tmp_path, cache) -> None:
    if R.missing_packages("onnxruntime"):
        pytest.skip("onnxruntime is not installed (phiclip[cpu-runtimes])")
    ckpt = build_tiny_siglip(tmp_path / "siglip")
    ref_enc = load_encoder(f"siglip:{ckpt}", device="cpu", dtype="float32")
    pixels = _pixels(ref_enc)
    enc = load_encoder(f"siglip:{ckpt}?runtime=auto", device="cpu", dtype="int8")
    assert enc.describe()["precision"]["runtime"]["runtime"] == "onnxruntime"
    assert "dynamic int8 through onnxruntime" in enc.describe()["precision"]["reason"]
    ERROR_BOUNDS["int8"].check(ref_enc.encode_batch(pixels).embeddings, enc.encode_batch(pixels).embeddings)
    # The text side through a runtime too (auto: measured; dynamic int8, no calibration texts needed).
    texts = ["a cat", "a photo of two dogs on a beach"]
    ERROR_BOUNDS["int8"].check(ref_enc.encode_texts(texts), enc.encode_texts(texts))
    assert enc.describe()["precision"]["text"]["runtime"] in ("onnxruntime", "torch")


def test_other_weights_are_converted_again(tmp_path, cache) -> None:
    if R.missing_packages("onnxruntime"):
        pytest.skip("onnxruntime is not installed (phiclip[cpu-runtimes])")
    a = build_tiny_clip(tmp_path / "a", seed=1)
    b = build_tiny_clip(tmp_path / "b", seed=2)
    ea = load_encoder(f"clip:{a}?runtime=onnxruntime", device="cpu", dtype="float32")
    eb = load_encoder(f"clip:{b}?runtime=onnxruntime", device="cpu", dtype="float32")
    assert eb.describe()["precision"]["runtime"]["converted_now"] is True
    pixels = _pixels(ea)
    ref_b = load_encoder(f"clip:{b}", device="cpu", dtype="float32").encode_batch(pixels).embeddings
    ERROR_BOUNDS["float32"].check(ref_b, eb.encode_batch(pixels).embeddings)
    assert not np.allclose(ea.encode_batch(pixels).embeddings, ref_b, atol=1e-3)


def test_a_failed_conversion_names_the_runtime_and_the_way_back(tmp_path, cache, monkeypatch) -> None:
    if R.missing_packages("onnxruntime"):
        pytest.skip("onnxruntime is not installed (phiclip[cpu-runtimes])")

    def broken(*a, **k):
        raise RuntimeError("exporter exploded\nlong details")

    monkeypatch.setattr(R, "_export_onnx", broken)
    ckpt = build_tiny_clip(tmp_path / "clip")
    with pytest.raises(ValueError, match=r"runtime onnxruntime: converting .* failed \(RuntimeError: exporter exploded\); use runtime=torch"):
        load_encoder(f"clip:{ckpt}?runtime=onnxruntime", device="cpu", dtype="int8")
    assert [p.name for p in (cache / "runtimes").iterdir()] == []  # no half-written conversion left behind


def test_an_unwritable_cache_folder_still_converts(tmp_path, monkeypatch) -> None:
    if R.missing_packages("onnxruntime"):
        pytest.skip("onnxruntime is not installed (phiclip[cpu-runtimes])")
    blocker = tmp_path / "cache-is-a-file"
    blocker.write_text("")
    monkeypatch.setenv(CACHE_ENV, str(blocker))
    ckpt = build_tiny_clip(tmp_path / "clip")
    enc = load_encoder(f"clip:{ckpt}?runtime=onnxruntime", device="cpu", dtype="float32")
    assert enc.describe()["precision"]["runtime"]["converted_now"] is True
    pixels = _pixels(enc)
    ref = load_encoder(f"clip:{ckpt}", device="cpu", dtype="float32").encode_batch(pixels).embeddings
    ERROR_BOUNDS["float32"].check(ref, enc.encode_batch(pixels).embeddings)


# --- static int8 through OpenVINO, calibrated ----------------------------------------------------------
def test_openvino_int8_is_static_and_needs_calibration_images(monkeypatch) -> None:
    _installed(monkeypatch, "openvino", "onnxruntime", "onnx", "nncf")
    assert R.choose_runtime("openvino", "int8", calibrated=True).runtime == "openvino"
    with pytest.raises(ValueError, match=r"static quantisation.*calibration=FOLDER.*runtime=onnxruntime"):
        R.choose_runtime("openvino", "int8")
    # auto: OpenVINO's static int8 when calibration images are given, ONNX Runtime's dynamic one otherwise
    assert R.choose_runtime("auto", "int8", calibrated=True).runtime == "openvino"
    assert R.choose_runtime("auto", "int8").runtime == "onnxruntime"
    _installed(monkeypatch, "openvino", "onnxruntime", "onnx")  # no nncf
    assert R.choose_runtime("auto", "int8", calibrated=True).runtime == "onnxruntime"
    # auto falling back to torch says why each runtime was passed over
    _installed(monkeypatch, "openvino", "nncf")
    reason = R.choose_runtime("auto", "int8").reason
    assert "openvino runs int8 calibrated only (calibration=IMAGES)" in reason and "onnxruntime needs onnxruntime, onnx" in reason
    _installed(monkeypatch, "openvino")
    assert "openvino needs nncf" in R.choose_runtime("auto", "int8", calibrated=True).reason
    with pytest.raises(ValueError, match=r"runtime openvino needs nncf.*phiclip\[cpu-runtimes\]"):
        R.choose_runtime("openvino", "int8", calibrated=True)


def test_calibration_is_checked_where_it_is_used(tmp_path, cache, recwarn) -> None:
    ckpt = build_tiny_clip(tmp_path / "clip")
    with pytest.raises(ValueError, match="calibration_images"):  # its form: when the spec is read
        load_encoder(f"clip:{ckpt}?calibration_images=2", device="cpu", dtype="int8")
    missing = f"clip:{ckpt}?runtime=auto&calibration={tmp_path / 'nowhere'}"
    # A spec saved in a manifest is read again elsewhere (search, serve) at other precisions: fine, and quiet.
    load_encoder(missing, device="cpu", dtype="float32")
    assert not [w for w in recwarn if "calibration" in str(w.message)]
    if not R.missing_packages("openvino", "int8"):
        with pytest.raises(ValueError, match=r"calibration=.*nowhere: no such file or folder"):
            load_encoder(missing, device="cpu", dtype="int8")


def test_calibration_set_spreads_over_the_input_and_its_key_follows_the_files(tmp_path) -> None:
    from phiclip.cpu.calibration import calibration_set

    folder = _write_images(tmp_path / "cal", 30)
    cal = calibration_set(str(folder), 10)
    names = [r.source.rsplit("/", 1)[-1] for r in cal.records]
    assert len(names) == 10 and names[0] == "img_000.png" and names[-1] == "img_029.png"  # first to last, not the first 10
    assert calibration_set(str(folder), 10).key == cal.key
    assert calibration_set(str(folder), 12).key != cal.key
    victim = folder / names[3]
    Image.new("RGB", (50, 40), (1, 2, 3)).save(victim)  # the same name, other pixels
    assert calibration_set(str(folder), 10).key != cal.key
    with pytest.raises(ValueError, match=r"calibration=.*lists 3 image\(s\).*at least 8.*runtime=onnxruntime"):
        calibration_set(str(_write_images(tmp_path / "few", 3)), 10)
    assert calibration_set(str(folder), 10, salt="other preprocessing").key != calibration_set(str(folder), 10).key


def test_calibration_key_follows_the_bytes_of_a_table(tmp_path) -> None:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from phiclip.cpu.calibration import calibration_set

    def table(seed: int) -> None:
        rng = np.random.default_rng(seed)
        rows = []
        for _ in range(10):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, format="PNG")
            rows.append(buf.getvalue())
        pq.write_table(pa.table({"image": rows}), tmp_path / "t.parquet")

    table(0)
    key = calibration_set(str(tmp_path / "t.parquet"), 10).key
    table(1)  # the same rows, other images
    assert calibration_set(str(tmp_path / "t.parquet"), 10).key != key


def test_calibration_images_that_do_not_decode_are_left_out_and_too_few_is_an_error(tmp_path) -> None:
    from phiclip.cpu.calibration import calibration_set

    folder = _write_images(tmp_path / "cal", 9)
    (folder / "img_004.png").write_bytes(b"not a png")
    (folder / "img_005.png").write_bytes(b"")
    enc = load_encoder(f"clip:{build_tiny_clip(tmp_path / 'clip')}", device="cpu", dtype="float32")
    with pytest.raises(ValueError, match=r"calibration=.*only 7 of 9 images could be decoded.*img_004.png"):
        calibration_set(str(folder)).pixels(enc.preprocess)
    _write_images(tmp_path / "cal", 12, seed=1)  # rewrites the broken ones, adds three
    assert calibration_set(str(folder)).pixels(enc.preprocess).shape[0] == 12


def test_clip_int8_through_openvino_is_calibrated_within_the_bound_and_cached(tmp_path, cache) -> None:
    if R.missing_packages("openvino", "int8"):
        pytest.skip("openvino or nncf is not installed (phiclip[cpu-runtimes])")
    ckpt = build_tiny_clip(tmp_path / "clip")
    folder = _write_images(tmp_path / "cal", 16, seed=3)
    ref_enc = load_encoder(f"clip:{ckpt}", device="cpu", dtype="float32")
    pixels = _pixels(ref_enc)
    ref = ref_enc.encode_batch(pixels).embeddings
    spec = f"clip:{ckpt}?runtime=openvino&calibration={folder}"
    enc = load_encoder(spec, device="cpu", dtype="int8")
    info = enc.describe()["precision"]["runtime"]
    assert info["runtime"] == "openvino" and info["precision"] == "int8" and info["converted_now"] is True
    assert info["calibration"]["images"] == 16 and info["calibration"]["source"] == str(folder)
    assert "static int8 through openvino" in enc.describe()["precision"]["reason"]
    out = enc.encode_batch(pixels).embeddings
    ERROR_BOUNDS["int8"].check(ref, out)
    assert not np.array_equal(out, ref)
    # static scales: a row does not depend on the rest of its batch
    np.testing.assert_allclose(enc.encode_batch(pixels[:1]).embeddings, out[:1], atol=1e-5)
    again = load_encoder(spec, device="cpu", dtype="int8")
    assert again.describe()["precision"]["runtime"]["converted_now"] is False
    np.testing.assert_allclose(again.encode_batch(pixels).embeddings, out, atol=1e-6)
    # other calibration images: quantised again
    other = load_encoder(f"clip:{ckpt}?runtime=openvino&calibration={_write_images(tmp_path / 'cal2', 12, seed=4)}",
                         device="cpu", dtype="int8")
    assert other.describe()["precision"]["runtime"]["runtime"] == "openvino"
    assert other.describe()["precision"]["runtime"]["converted_now"] is True
    ERROR_BOUNDS["int8"].check(ref, other.encode_batch(pixels).embeddings)
    # The text side has no calibration texts: dynamic int8 through ONNX Runtime where installed.
    texts = ["a cat", "a photo of two dogs"]
    ERROR_BOUNDS["int8"].check(ref_enc.encode_texts(texts), enc.encode_texts(texts))
    expected = "torch" if R.missing_packages("onnxruntime") else "onnxruntime"
    assert enc.describe()["precision"]["text"]["runtime"] == expected


def test_calibration_where_nothing_uses_it_is_said(tmp_path, cache) -> None:
    ckpt = build_tiny_clip(tmp_path / "clip")
    folder = _write_images(tmp_path / "cal", 8)
    with pytest.warns(UserWarning, match=r"calibration= is used only by int8 through OpenVINO.*torch runs int8"):
        load_encoder(f"clip:{ckpt}?calibration={folder}", device="cpu", dtype="int8")


def test_siglip_int8_through_openvino_is_calibrated_within_the_bound(tmp_path, cache) -> None:
    if R.missing_packages("openvino", "int8"):
        pytest.skip("openvino or nncf is not installed (phiclip[cpu-runtimes])")
    ckpt, ref_enc, pixels, folder = _static_int8_within_the_bound(tmp_path, "siglip", build_tiny_siglip)
    # auto with calibration images measures the static int8 model among the others (and reads its
    # conversion back from the cache).
    auto = load_encoder(f"siglip:{ckpt}?runtime=auto&calibration={folder}", device="cpu", dtype="int8")
    measured = auto.describe()["precision"]["auto"]
    assert "openvino" in measured["seconds"] and "torch" in measured["seconds"]
    ERROR_BOUNDS["int8"].check(ref_enc.encode_batch(pixels).embeddings, auto.encode_batch(pixels).embeddings)


# --- runtime=auto, the default: measured on this CPU, both towers ---------------------------------------
TEXTS = ["a cat", "a photo of two dogs running on a beach at sunset", "x", "the Eiffel Tower"]


@pytest.fixture()
def default_auto(monkeypatch):
    """The suite runs with PHICLIP_RUNTIME=torch (tests/conftest.py); these tests test the real default."""
    monkeypatch.delenv("PHICLIP_RUNTIME", raising=False)


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "int8"])
def test_the_default_is_auto_measured_once_per_cpu_within_the_bound(tmp_path, cache, default_auto, precision) -> None:
    if R.missing_packages("openvino") and R.missing_packages("onnxruntime"):
        pytest.skip("no compiled runtime installed (phiclip[cpu-runtimes])")
    ckpt = build_tiny_clip(tmp_path / "clip")
    ref_enc = load_encoder(f"clip:{ckpt}?runtime=torch", device="cpu", dtype="float32")
    pixels = _pixels(ref_enc)
    enc = load_encoder(f"clip:{ckpt}", device="cpu", dtype=precision)
    record = enc.describe()["precision"]
    assert record["runtime"]["requested"] == "auto" and enc.options.runtime == "auto"
    measured = record["auto"]
    assert measured["from_cache"] is False and "torch" in measured["seconds"]
    installed, _ = R.auto_candidates(precision)
    assert set(measured["seconds"]) | set(measured["passed_over"]) == {*installed, "torch"}
    assert record["runtime"]["runtime"] == measured["chosen"]
    ERROR_BOUNDS[precision].check(ref_enc.encode_batch(pixels).embeddings, enc.encode_batch(pixels).embeddings)
    ERROR_BOUNDS[precision].check(ref_enc.encode_texts(TEXTS), enc.encode_texts(TEXTS))
    text = enc.describe()["precision"]["text"]
    assert text["auto"]["from_cache"] is False and "torch" in text["auto"]["seconds"]
    # A second load on this CPU reads both choices back: no measurement, no conversion.
    again = load_encoder(f"clip:{ckpt}", device="cpu", dtype=precision)
    assert again.describe()["precision"]["auto"]["from_cache"] is True
    assert again.describe()["precision"]["runtime"]["runtime"] == record["runtime"]["runtime"]
    assert again.describe()["precision"]["runtime"].get("converted_now", False) is False
    ERROR_BOUNDS[precision].check(ref_enc.encode_texts(TEXTS), again.encode_texts(TEXTS))
    assert again.describe()["precision"]["text"]["auto"]["from_cache"] is True


BUILDERS = {"clip": build_tiny_clip, "siglip": build_tiny_siglip, "open_clip": build_tiny_open_clip,
            "siglip2": lambda out: build_tiny_siglip2(out, naflex=False), "metaclip2": build_tiny_metaclip2, "aimv2": build_tiny_aimv2}
TEXT_CASES = [(kind, rt, p) for kind in ("clip", "siglip", "open_clip") for rt, p in CASES] + [
    (kind, rt, p) for kind in ("siglip2", "metaclip2", "aimv2") for rt, p in (("openvino", "bfloat16"), ("onnxruntime", "int8"))]


@pytest.mark.parametrize(("kind", "runtime", "precision"), TEXT_CASES)
def test_the_text_tower_through_a_runtime_stays_within_the_bound(tmp_path, cache, kind, runtime, precision) -> None:
    if R.missing_packages(runtime):
        pytest.skip(f"{runtime} is not installed (phiclip[cpu-runtimes])")
    build = BUILDERS[kind]
    ckpt = build(tmp_path / kind)
    ref = load_encoder(f"{kind}:{ckpt}?runtime=torch", device="cpu", dtype="float32").encode_texts(TEXTS)
    enc = load_encoder(f"{kind}:{ckpt}?runtime={runtime}", device="cpu", dtype=precision)
    out = enc.encode_texts(TEXTS)
    text = enc.describe()["precision"]["text"]
    assert text["runtime"] == runtime and text["part"] == "text" and text["precision"] == precision
    ERROR_BOUNDS[precision].check(ref, out)
    # One text alone and texts of other lengths than the example traced (the length axis is dynamic).
    ERROR_BOUNDS[precision].check(ref[1:2], enc.encode_texts(TEXTS[1:2]))
    if precision != "float32":
        assert not np.array_equal(out, ref)  # the runtime really ran at its precision


def test_a_text_run_records_what_ran_the_text_tower(tmp_path, cache, default_auto) -> None:
    if R.missing_packages("onnxruntime"):
        pytest.skip("onnxruntime is not installed (phiclip[cpu-runtimes])")
    import json

    from phiclip.pipeline.runner import embed_text

    ckpt = build_tiny_clip(tmp_path / "clip")
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS) + "\n")
    embed_text(f"clip:{ckpt}", tmp_path / "texts.txt", tmp_path / "out", device="cpu", precision="int8")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    text = manifest["encoder"]["precision"]["text"]
    assert text["runtime"] in ("onnxruntime", "torch") and "auto" in text


@pytest.mark.parametrize("change", ["cpu", "runtime version"])
def test_a_new_cpu_or_runtime_version_converts_again(tmp_path, cache, monkeypatch, change) -> None:
    if R.missing_packages("onnxruntime"):
        pytest.skip("onnxruntime is not installed (phiclip[cpu-runtimes])")

    ckpt = build_tiny_clip(tmp_path / "clip")
    load_encoder(f"clip:{ckpt}?runtime=onnxruntime", device="cpu", dtype="float32")
    same = load_encoder(f"clip:{ckpt}?runtime=onnxruntime", device="cpu", dtype="float32")
    assert same.describe()["precision"]["runtime"]["converted_now"] is False
    if change == "cpu":
        monkeypatch.setattr(R, "cpu_name", lambda: "Another CPU (family 25, model 17)")
    else:
        versions = R._versions
        monkeypatch.setattr(R, "_versions", lambda rt, p=None: versions(rt, p) + ",onnxruntime-next")
    other = load_encoder(f"clip:{ckpt}?runtime=onnxruntime", device="cpu", dtype="float32")
    assert other.describe()["precision"]["runtime"]["converted_now"] is True
    assert len(list((cache / "runtimes").iterdir())) == 2


def test_without_the_runtimes_auto_is_torch_for_both_towers_and_says_how_to_install(tmp_path, cache, monkeypatch,
                                                                                      default_auto) -> None:
    _installed(monkeypatch)
    ckpt = build_tiny_clip(tmp_path / "clip")
    ref_enc = load_encoder(f"clip:{ckpt}?runtime=torch", device="cpu", dtype="float32")
    enc = load_encoder(f"clip:{ckpt}", device="cpu", dtype="int8")
    record = enc.describe()["precision"]
    assert record["runtime"]["runtime"] == "torch" and "phiclip[cpu-runtimes]" in record["runtime"]["reason"]
    ERROR_BOUNDS["int8"].check(ref_enc.encode_texts(TEXTS), enc.encode_texts(TEXTS))
    text = enc.describe()["precision"]["text"]
    assert text["runtime"] == "torch" and "phiclip[cpu-runtimes]" in text["reason"]
    assert not (cache / "runtimes").exists() or not any((cache / "runtimes").iterdir())



@pytest.mark.parametrize("kind", ["dinov2", "metaclip2"])
def test_a_family_image_side_int8_through_openvino_is_calibrated_within_the_bound(tmp_path, cache, kind) -> None:
    if R.missing_packages("openvino", "int8"):
        pytest.skip("openvino or nncf is not installed (phiclip[cpu-runtimes])")
    from phiclip.testing import build_tiny_dinov2

    _static_int8_within_the_bound(tmp_path, kind, build_tiny_dinov2 if kind == "dinov2" else build_tiny_metaclip2)


def _static_int8_within_the_bound(tmp_path, kind: str, build):
    """``kind``'s image side at int8 through OpenVINO, calibrated on 10 images, within the int8 bound of
    float32; returns the checkpoint, the float32 encoder, the pixels and the calibration folder."""
    ckpt = build(tmp_path / kind)
    ref_enc = load_encoder(f"{kind}:{ckpt}?runtime=torch", device="cpu", dtype="float32")
    pixels = _pixels(ref_enc)
    folder = _write_images(tmp_path / "cal", 10)
    enc = load_encoder(f"{kind}:{ckpt}?runtime=openvino&calibration={folder}", device="cpu", dtype="int8")
    info = enc.describe()["precision"]["runtime"]
    assert info["runtime"] == "openvino" and info["calibration"]["images"] == 10
    assert "static int8 through openvino" in enc.describe()["precision"]["reason"]
    ERROR_BOUNDS["int8"].check(ref_enc.encode_batch(pixels).embeddings, enc.encode_batch(pixels).embeddings)
    return ckpt, ref_enc, pixels, folder
