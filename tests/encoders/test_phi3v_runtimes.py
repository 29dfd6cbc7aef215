"""The Phi-3-vision tower on the compiled CPU runtimes (OpenVINO, ONNX Runtime): every runtime and
precision within its bound of torch's float32 on pooled vectors and image tokens at several crop
counts and aspect ratios, converted once and read back, ``runtime=auto`` (the default) measured once,
static int8 calibrated on crops, and torch when no runtime is installed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _runtimes import installed, write_images
from PIL import Image

import phiclip.cpu.autotune as A
import phiclip.cpu.runtimes as R
from phiclip import load_encoder
from phiclip.cache import CACHE_ENV
from phiclip.cpu.int8 import int8_plan
from phiclip.cpu.precision import ERROR_BOUNDS
from phiclip.cpu.runtimes import CompiledModule
from phiclip.testing import build_tiny_phi3v

#: Compiles models with OpenVINO / ONNX Runtime: `make test` runs these in a process of their own (tests/conftest.py).
compiled = pytest.mark.compiled_runtime

#: (width, height): landscape, tall, tiny, wide; at num_crops 16 they cut into 13, 13, 17 and 13 crops.
SIZES = [(640, 480), (90, 300), (40, 40), (500, 120)]
CROP_COUNTS = (1, 4, 16)


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture()
def default_auto(monkeypatch):
    """The suite runs with PHICLIP_RUNTIME=torch (tests/conftest.py); these tests test the real default."""
    monkeypatch.delenv("PHICLIP_RUNTIME", raising=False)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_tiny_phi3v(tmp_path_factory.mktemp("phi3v_rt"), num_crops=4)


@pytest.fixture(scope="module")
def images():
    """Smooth random pictures with some noise (photo-like: static int8 is calibrated on such images)."""
    rng = np.random.default_rng(0)
    out = []
    for w, h in SIZES:
        field = np.asarray(Image.fromarray(rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC))
        out.append(Image.fromarray(np.clip(field + rng.integers(-10, 11, field.shape), 0, 255).astype(np.uint8)))
    return out


def _outputs(enc, images) -> tuple[np.ndarray, np.ndarray]:
    """Pooled vectors ``(n, H)`` (the pooled path, separators left out) and every image's tokens ``(sum T_i, H)``."""
    batch = enc.collate([enc.preprocess(im) for im in images])
    pooled = enc.encode_batch(batch).embeddings
    tokens = np.concatenate(enc.encode_batch(batch, with_tokens=True).tokens)
    return pooled, tokens


@pytest.fixture(scope="module")
def reference(ckpt, images):
    """Torch float32 at each crop count: pooled vectors, tokens and the parameter count."""
    out = {}
    for n in CROP_COUNTS:
        enc = load_encoder(f"phi3v:{ckpt}?runtime=torch&num_crops={n}", device="cpu", dtype="float32")
        out[n] = (*_outputs(enc, images), enc.describe()["parameters"])
    return out


def _check(precision: str, ref: tuple, pooled: np.ndarray, tokens: np.ndarray) -> None:
    ERROR_BOUNDS[precision].check(ref[0], pooled)
    ERROR_BOUNDS[precision].check(ref[1], tokens)  # every token, not only their mean


CASES = [("openvino", "float32"), ("openvino", "bfloat16"), ("onnxruntime", "int8"), ("onnxruntime", "float32")]


@compiled
@pytest.mark.parametrize(("runtime", "precision"), CASES)
def test_the_tower_through_a_runtime_stays_within_the_bound_at_every_crop_count(ckpt, images, reference, cache, runtime,
                                                                                 precision) -> None:
    if R.missing_packages(runtime):
        pytest.skip(f"{runtime} is not installed (phiclip[cpu-runtimes])")
    for i, n in enumerate(CROP_COUNTS):
        # max_crops=3 at 16 crops: the tower calls cut the images' crops elsewhere than the 4 of the others.
        extra = "&max_crops=3" if n == 16 else ""
        enc = load_encoder(f"phi3v:{ckpt}?runtime={runtime}&num_crops={n}{extra}", device="cpu", dtype=precision)
        record = enc.describe()["precision"]
        info = record["runtime"]
        assert info["runtime"] == runtime and info["part"] == "tower" and info["precision"] == precision
        # The HD merge and projection run on torch in the precision's float dtype (int8: the plan's).
        rest = precision if precision != "int8" else int8_plan()["float_dtype"]
        assert info["then_torch"].endswith(f"on torch in {rest}")
        assert next(enc.model.img_projection.parameters()).dtype == getattr(torch, rest)
        # One conversion serves every crop count and chunking (the tower's crops have one shape).
        assert info["converted_now"] is (i == 0)
        assert isinstance(enc.model.img_processor, CompiledModule)
        assert enc.describe()["parameters"] == reference[n][2]  # the compiled tower's parameters are counted
        pooled, tokens = _outputs(enc, images)
        _check(precision, reference[n], pooled, tokens)
        if precision != "float32":
            assert not np.array_equal(tokens, reference[n][1])  # the runtime really ran at its precision
    assert len(list((cache / "runtimes").iterdir())) == 1  # one finished conversion, no leftover work folders


@compiled
def test_global_pooling_runs_only_the_global_view_through_the_compiled_tower(ckpt, images, cache) -> None:
    if R.missing_packages("onnxruntime"):
        pytest.skip("onnxruntime is not installed (phiclip[cpu-runtimes])")
    ref = load_encoder(f"phi3v:{ckpt}?pooling=global&runtime=torch", device="cpu", dtype="float32")
    enc = load_encoder(f"phi3v:{ckpt}?pooling=global&runtime=onnxruntime", device="cpu", dtype="float32")
    seen: list[int] = []
    hook = enc.model.img_processor.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    try:
        out = enc.encode_batch(enc.collate([enc.preprocess(im) for im in images])).embeddings
    finally:
        hook.remove()
    assert sum(seen) == len(images)
    ERROR_BOUNDS["float32"].check(ref.encode_batch(ref.collate([ref.preprocess(im) for im in images])).embeddings, out)


@compiled
def test_int8_through_openvino_is_calibrated_on_crops_within_the_bound(ckpt, images, reference, cache, tmp_path) -> None:
    if R.missing_packages("openvino", "int8"):
        pytest.skip("openvino or nncf is not installed (phiclip[cpu-runtimes])")
    from phiclip.cpu.calibration import calibration_set

    folder = write_images(tmp_path / "cal", 8, seed=3, sizes=[(640, 480), (90, 300), (300, 300), (50, 40)])
    spec = f"phi3v:{ckpt}?runtime=openvino&calibration={folder}"
    enc = load_encoder(spec, device="cpu", dtype="int8")
    # Calibrated on every crop of the calibration images, not on one per image (at most
    # runtimes.CALIBRATION_SAMPLES of them, spread evenly).
    cal = calibration_set(str(folder), 8)
    crops = cal.pixels(lambda im: enc.preprocess(im)["crops"])
    counts = [enc.preprocess(Image.open(p).convert("RGB"))["crops"].shape[0] for p in sorted(folder.iterdir())]
    assert crops.shape == (sum(counts), 3, 336, 336) and sum(counts) > 8
    few = cal.pixels(lambda im: enc.preprocess(im)["crops"], most=5)
    assert few.shape[0] == 5 and torch.equal(few[0], crops[0]) and torch.equal(few[-1], crops[-1])
    info = enc.describe()["precision"]["runtime"]
    assert info["runtime"] == "openvino" and info["part"] == "tower" and info["converted_now"] is True
    assert info["calibration"]["images"] == 8 and info["calibration"]["source"] == str(folder)
    assert "static int8 through openvino" in enc.describe()["precision"]["reason"]
    pooled, tokens = _outputs(enc, images)
    _check("int8", reference[4], pooled, tokens)
    assert not np.array_equal(tokens, reference[4][1])
    # Static scales: an image's vector does not depend on the other crops of its tower call.
    alone = enc.encode_batch(enc.collate([enc.preprocess(images[1])])).embeddings
    np.testing.assert_allclose(alone[0], pooled[1], atol=1e-5)
    # auto with the same calibration images measures the static int8 tower among the others (read back).
    auto = load_encoder(spec.replace("runtime=openvino", "runtime=auto"), device="cpu", dtype="int8")
    measured = auto.describe()["precision"]["auto"]
    assert "openvino" in measured["seconds"] and "torch" in measured["seconds"]
    _check("int8", reference[4], *_outputs(auto, images))


@compiled
@pytest.mark.parametrize("precision", ["bfloat16", "int8"])
def test_the_default_is_auto_measured_once_on_a_tower_call_and_read_back(ckpt, images, reference, cache, default_auto,
                                                                          monkeypatch, precision) -> None:
    if R.missing_packages("openvino") and R.missing_packages("onnxruntime"):
        pytest.skip("no compiled runtime installed (phiclip[cpu-runtimes])")
    enc = load_encoder(f"phi3v:{ckpt}", device="cpu", dtype=precision)
    record = enc.describe()["precision"]
    assert enc.options.runtime == "auto" and record["runtime"]["requested"] == "auto"
    measured = record["auto"]
    assert measured["from_cache"] is False and "torch" in measured["seconds"]
    candidates, _ = R.auto_candidates(precision)
    assert set(measured["seconds"]) | set(measured["passed_over"]) == {*candidates, "torch"}
    assert measured["measured_on"] == [[4, 3, 336, 336]]  # one tower call's crops (max_crops on the CPU)
    assert record["runtime"]["runtime"] == measured["chosen"]
    pooled, tokens = _outputs(enc, images)
    _check(precision, reference[4], pooled, tokens)
    # A second load reads the choice back: no measurement, no conversion, and the same vectors (the
    # rest of the model is in the same dtype whether torch's way was built or not).
    again = load_encoder(f"phi3v:{ckpt}", device="cpu", dtype=precision)
    assert again.describe()["precision"]["auto"]["from_cache"] is True
    assert again.describe()["precision"]["runtime"]["runtime"] == record["runtime"]["runtime"]
    assert again.describe()["precision"]["runtime"].get("converted_now", False) is False
    ERROR_BOUNDS["float32"].check(tokens, _outputs(again, images)[1])
    if precision != "bfloat16":
        return
    # auto keeping torch runs torch's own bfloat16 way (fused where this torch can) from the float32 weights
    # loaded for a runtime, made 16-bit first: as a model loaded in bfloat16 runs it.
    monkeypatch.setattr(A, "COMPILED_MARGIN", 1e9)
    (cache / A.CHOICES_FILE).unlink()
    kept = load_encoder(f"phi3v:{ckpt}", device="cpu", dtype=precision)
    assert kept.describe()["precision"]["runtime"]["runtime"] == "torch"
    assert not isinstance(kept.model.img_processor, CompiledModule)
    plain = load_encoder(f"phi3v:{ckpt}?runtime=torch", device="cpu", dtype=precision)
    assert kept.describe()["precision"].get("cpu_kernels") == plain.describe()["precision"].get("cpu_kernels")
    assert next(kept.model.img_projection.parameters()).dtype == next(plain.model.img_projection.parameters()).dtype
    ERROR_BOUNDS["float32"].check(_outputs(plain, images)[1], _outputs(kept, images)[1])


@pytest.mark.parametrize("precision", ["bfloat16", "int8"])
def test_without_the_runtimes_auto_runs_torch_and_says_how_to_install(ckpt, images, default_auto, monkeypatch,
                                                                       precision) -> None:
    installed(monkeypatch)
    enc = load_encoder(f"phi3v:{ckpt}", device="cpu", dtype=precision)
    info = enc.describe()["precision"]["runtime"]
    assert info["requested"] == "auto" and info["runtime"] == "torch" and "phiclip[cpu-runtimes]" in info["reason"]
    assert not isinstance(enc.model.img_processor, CompiledModule)
    plain = load_encoder(f"phi3v:{ckpt}?runtime=torch", device="cpu", dtype=precision)
    np.testing.assert_array_equal(_outputs(enc, images)[1], _outputs(plain, images)[1])
    runtime = "openvino" if precision == "bfloat16" else "onnxruntime"
    with pytest.raises(ValueError, match=rf"runtime {runtime} needs {runtime}.*phiclip\[cpu-runtimes\]"):
        load_encoder(f"phi3v:{ckpt}?runtime={runtime}", device="cpu", dtype=precision)


def test_only_a_cpu_runtime_loads_the_tower_in_float32_for_a_runtime(ckpt) -> None:
    from phiclip.cpu.acceleration import may_compile

    assert may_compile("openvino", "bfloat16") and not may_compile("openvino", "bfloat16", "cuda")
    assert not may_compile("torch", "int8") and not may_compile("auto", "float16")
    with pytest.raises(ValueError, match="runtime='tvm' must be one of"):
        load_encoder(f"phi3v:{ckpt}?runtime=tvm", device="cpu", dtype="float32")


def test_auto_times_a_tower_on_crops_of_several_images() -> None:
    from phiclip.cpu.acceleration import _example_pixels

    seen: list[tuple[int, int]] = []

    def crops(image: Image.Image) -> torch.Tensor:  # three crops per image, the first one says which image
        seen.append(image.size)
        out = torch.zeros(3, 3, 14, 14)
        out[0] = len(seen)
        return out

    rows = _example_pixels(crops, 14, False, rows=7)
    assert rows.shape == (7, 3, 14, 14) and len(seen) == 3 and len(set(seen)) == 3  # three images of other sizes
    assert [int(r[0, 0, 0]) for r in rows[::3]] == [1, 2, 3]
    one = _example_pixels(lambda im: torch.ones(3, 14, 14), 14, False, rows=5)  # one image, one row
    assert one.shape == (5, 3, 14, 14) and bool((one == 1).all())
    assert _example_pixels(lambda im: torch.ones(3, 10, 10), 14, False, rows=2).shape == (2, 3, 14, 14)  # other sizes: noise
