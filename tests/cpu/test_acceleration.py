"""phiclip.cpu.accelerate: the one call encoders make for their image side's CPU speed (what it builds
and what it records), and the package's boundaries (no encoder or pipeline import, no torch on import)."""

from __future__ import annotations

import ast
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from transformers import CLIPModel

import phiclip.cpu
import phiclip.cpu.precision as P
from phiclip.cache import CACHE_ENV
from phiclip.cpu import accelerate
from phiclip.cpu import fused as cpu_fused
from phiclip.cpu.int8 import Int8Linear
from phiclip.models.clip_vision import CLIPImageFeatures
from phiclip.testing import build_tiny_clip, build_tiny_phi3v

RECORD = {"requested": "test", "dtype": "test", "reason": "placement's reason"}


@pytest.fixture(scope="module")
def clip_model(tmp_path_factory: pytest.TempPathFactory) -> CLIPModel:
    path = build_tiny_clip(tmp_path_factory.mktemp("clip") / "clip", image_size=64, patch_size=16)
    return CLIPModel.from_pretrained(path, use_safetensors=True).eval()


def _features(model: CLIPModel):
    return lambda: CLIPImageFeatures.from_clip_model(model)


def test_float32_runs_the_models_own_weights_and_records_the_runtime(clip_model) -> None:
    path = accelerate(clip_model, precision="float32", record=RECORD, image_features=_features(clip_model), runtime="torch")
    assert path.compiled is None and isinstance(path.image_features, CLIPImageFeatures)
    assert path.image_path is path.image_features
    assert path.image_features.visual_projection.weight.data_ptr() == clip_model.visual_projection.weight.data_ptr()
    assert path.record == {**RECORD, "runtime": {"requested": "torch", "runtime": "torch", "reason": "runtime torch (the default)"}}
    assert RECORD == {"requested": "test", "dtype": "test", "reason": "placement's reason"}  # the caller's record is copied


@pytest.mark.parametrize("fusion", [True, False])
def test_bfloat16_is_a_packed_copy_and_says_which_kernels(clip_model, monkeypatch, fusion) -> None:
    if fusion and not cpu_fused.fusion_available():
        pytest.skip("this torch build has no oneDNN fused bfloat16 linears")
    if not fusion:
        monkeypatch.setattr(cpu_fused, "fusion_available", lambda: False)
    before = clip_model.vision_model.embeddings.patch_embedding.weight.clone()
    path = accelerate(clip_model, precision="bfloat16", record=RECORD, image_features=_features(clip_model), runtime="torch")
    assert path.record["cpu_kernels"] == ("onednn-fused" if fusion else "torch")
    assert isinstance(path.image_features, cpu_fused.FusedCLIPImageFeatures) is fusion
    pixels = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        want = CLIPImageFeatures.from_clip_model(clip_model)(pixels)
        got = path.image_features(pixels)
    assert got.dtype == torch.bfloat16
    P.ERROR_BOUNDS["bfloat16"].check(want.numpy(), got.float().numpy())
    weight = clip_model.vision_model.embeddings.patch_embedding.weight
    assert weight.dtype == torch.float32 and torch.equal(weight, before)  # the model keeps its float32 weights


def test_bfloat16_without_phiclips_image_module_is_left_to_autocast(clip_model) -> None:
    path = accelerate(clip_model, precision="bfloat16", record=RECORD, image_features=None, runtime="torch")
    assert path.image_features is None and path.image_path is None and "cpu_kernels" not in path.record


def test_int8_quantises_a_copy_from_the_factorys_float32_module(clip_model, monkeypatch) -> None:
    from phiclip.cpu import int8

    plan = {"kernel": int8.available_kernels()[0], "float_dtype": "float32", "rates": {}, "reason": "test plan"}
    monkeypatch.setattr(int8, "int8_plan", lambda refresh=False: plan)
    path = accelerate(clip_model, precision="int8", record=RECORD, image_features=_features(clip_model), runtime="torch")
    assert sum(isinstance(m, Int8Linear) for m in path.image_features.modules()) == path.record["int8"]["quantized_products"]
    assert path.record["int8"]["reason"] == "test plan" and path.record["reason"] == RECORD["reason"]
    assert not any(isinstance(m, Int8Linear) for m in clip_model.modules())


def test_calibration_that_nothing_uses_is_said(clip_model, monkeypatch) -> None:
    from phiclip.cpu import int8

    plan = {"kernel": int8.available_kernels()[0], "float_dtype": "float32", "rates": {}, "reason": "test plan"}
    monkeypatch.setattr(int8, "int8_plan", lambda refresh=False: plan)
    with pytest.warns(UserWarning, match=r"^clip:x: calibration= is used only by int8 through OpenVINO.*torch runs int8"):
        accelerate(clip_model, precision="int8", record=RECORD, image_features=_features(clip_model), runtime="torch",
                   calibration="/nowhere", name="clip:x")


def test_a_phi3v_tower_is_changed_in_place_and_records_no_runtime(tmp_path, monkeypatch) -> None:
    from phiclip.phi3v import Phi3VImageEmbedding

    model = Phi3VImageEmbedding.from_pretrained(build_tiny_phi3v(tmp_path / "phi3v"), torch_dtype=torch.bfloat16)
    monkeypatch.setattr(cpu_fused, "fusion_available", lambda: False)
    path = accelerate(model, precision="bfloat16", record=RECORD, device_type="cpu")
    assert path.image_features is None and path.compiled is None
    assert path.record == {**RECORD, "cpu_kernels": "torch"}  # no runtime= option, no runtime recorded
    assert accelerate(model, precision="bfloat16", record=RECORD, device_type="cuda").record == RECORD


def test_an_impossible_runtime_ask_is_the_runtimes_error(clip_model) -> None:
    with pytest.raises(ValueError, match="runtime openvino runs precision float32, bfloat16, int8, not float16"):
        accelerate(clip_model, precision="float16", record=RECORD, runtime="openvino")


# --- the package's boundaries -------------------------------------------------------------------------
def test_the_cpu_package_imports_no_encoder_or_pipeline_module() -> None:
    package = Path(phiclip.cpu.__file__).parent
    found = []
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{path.name}: {n}" for n in names if n.startswith(("phiclip.encoders", "phiclip.pipeline"))]
    assert not found


def test_importing_the_cpu_package_does_not_import_torch() -> None:
    code = "import sys, phiclip.cpu, phiclip.cpu.precision; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_threads_writing_the_cache_file_keep_each_others_entries(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))

    def write(i: int) -> None:
        for j in range(15):
            P.write_cache_entry(f"{i}-{j}", {"n": j})

    threads = [threading.Thread(target=write, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(P.read_cache()) == 6 * 15
