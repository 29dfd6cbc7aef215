"""A student tower in Phi-3-vision's image path: preprocessing and token layout, distillation that
learns, an export that phiclip loads back with the same numbers, resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from phiclip.finetune.common import read_metrics
from phiclip.phi3v.processing import StudentImageProcessor, hd_size, num_image_tokens
from phiclip.phi3v.student import StudentVisionTower
from phiclip.testing import build_tiny_clip, make_sample_images, make_shape_image

FAST = dict(device="cpu", progress=False, num_threads=1, tensorboard=False)


@pytest.fixture(scope="module")
def adapter_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 shape images of four sizes, plus one corrupt file."""
    root = tmp_path_factory.mktemp("adapter_images") / "images"
    make_sample_images(root, per_class=2)
    (root / "labels.csv").unlink()
    (root / "red" / "broken.png").write_bytes(b"not an image at all")
    return root


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CLIP at 64 px, patch 16 (a 4 x 4 grid, resampled to 24 x 24)."""
    return build_tiny_clip(tmp_path_factory.mktemp("student") / "clip", image_size=64, patch_size=16, seed=1)


@pytest.fixture(scope="module")
def distilled(tiny_phi3v_dir: Path, student_dir: Path, adapter_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """40 steps through the CLI (num_crops=1: two crops per image), the JSON it prints."""
    from phiclip.cli import app

    root = tmp_path_factory.mktemp("adapter")
    out = root / "out"
    res = CliRunner().invoke(app, [
        "finetune", "phi3v-adapter", "--teacher", f"phi3v:{tiny_phi3v_dir}?num_crops=1", "--student", f"clip:{student_dir}",
        "-d", str(adapter_data), "-o", str(out), "--steps", "40", "--lr", "3e-3", "--batch-size", "4",
        "--student-layer", "-1", "--eval-fraction", "0.25", "--device", "cpu", "--no-progress", "--no-tensorboard",
        "--num-threads", "1", "--cache-dir", str(root / "cache"), "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


@pytest.mark.parametrize("size", [(160, 120), (120, 160), (500, 90), (90, 500), (50, 50), (1000, 999), (7, 300)])
@pytest.mark.parametrize("num_crops", [1, 4, 16])
def test_student_crops_keep_the_released_grid_and_token_count(size: tuple[int, int], num_crops: int) -> None:
    proc = StudentImageProcessor(crop_size=64, num_crops=num_crops)
    crops, (H, W) = proc.preprocess_image(make_shape_image("blue", "square", size=size))
    assert (H, W) == hd_size(*size, num_crops)  # image_sizes in the released 336-px units
    assert crops.shape == (1 + (H // 336) * (W // 336), 3, 64, 64)
    out = proc([make_shape_image("blue", "square", size=size)])
    assert out.num_img_tokens == [num_image_tokens(*size, num_crops)]


def test_student_patch_grid_is_resampled_to_24x24() -> None:
    for image_size, patch in ((64, 16), (96, 4)):  # 4 x 4 up, 24 x 24 as is; and a 24 grid kept
        tower = StudentVisionTower({"model_type": "clip_vision_model", "num_layers_run": 1, "hf_config": dict(
            hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, image_size=image_size,
            patch_size=patch)})
        assert len(tower.vision_model.encoder.layers) == 1
        assert tower(torch.randn(3, 3, image_size, image_size)).shape == (3, 576, 8)
    siglip = StudentVisionTower({"model_type": "siglip_vision_model", "num_layers_run": 2, "hf_config": dict(
        hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, image_size=128, patch_size=4)})
    assert siglip(torch.randn(2, 3, 128, 128)).shape == (2, 576, 8)  # 32 x 32 shrunk (no CLS in SigLIP)


def test_distillation_raises_held_out_r2_clearly(distilled: dict[str, Any]) -> None:
    before, after = distilled["before"], distilled["after"]
    assert after["r2"] >= before["r2"] + 0.3 and after["r2"] > 0.1, (before, after)
    assert after["token_cosine"] > before["token_cosine"] + 0.2
    # The mean token alone has a high cosine and explains nothing: R^2 is the number that says more.
    assert after["mean_token_cosine"] > 0.8 and after["mean_token_r2"] == 0.0
    assert distilled["skipped_images"]["count"] == 1 and distilled["eval_images"] == 6
    assert distilled["speed"]["teacher_crops_per_s"] > 0 and distilled["speed"]["student_crops_per_s"] > 0
    out = Path(distilled["output"])
    assert json.loads((out / "metrics.json").read_text())["after"] == after
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert len(losses) == 40 and np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])


def test_export_loads_as_phi3v_and_reproduces_the_held_out_numbers(distilled: dict[str, Any], adapter_data: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    from phiclip.encoders import load_encoder
    from phiclip.finetune.adapter import TeacherTokens
    from phiclip.phi3v import Phi3VImageEmbedding, Phi3VImageProcessor
    from phiclip.phi3v.modeling import StudentImageEmbedding
    from phiclip.pipeline.sources import list_inputs

    out = Path(distilled["output"])
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert all(k.startswith("model.vision_embed_tokens.") for k in f.keys())
    model = Phi3VImageEmbedding.from_pretrained(out)
    assert isinstance(model, StudentImageEmbedding)
    assert isinstance(Phi3VImageProcessor.from_pretrained(out), StudentImageProcessor)
    # The held-out R^2 from the exported files (through phiclip's encoder) is the one reported.
    enc = load_encoder(f"phi3v:{out}?num_crops=1", device="cpu")
    teacher = TeacherTokens(Path(distilled["teacher_tokens_file"]))
    sources = {r.id: r.source for r in list_inputs(adapter_data).records}
    held = distilled["eval_ids"]
    student_tokens = enc.encode_tokens([sources[i] for i in held])
    preds, targets = [], []
    for i, tok in zip(held, student_tokens):
        target, (h, w) = teacher.get(i)
        assert tok.shape == target.shape  # the released token count
        keep = ~model.separator_mask(h, w).numpy()
        preds.append(tok[keep])
        targets.append(target[keep].astype(np.float32))
    p, t = np.concatenate(preds), np.concatenate(targets)
    r2 = 1 - ((p - t) ** 2).sum() / ((t - t.mean(0)) ** 2).sum()
    assert r2 == pytest.approx(distilled["after"]["r2"], abs=1e-4)
    # And phiclip embed reads the export like any Phi-3-vision checkpoint.
    from phiclip.pipeline.runner import embed

    result = embed(f"phi3v:{out}?num_crops=1", adapter_data, tmp_path / "emb", progress=False, device="cpu")
    assert (result.embedded, result.failed) == (24, 1)


def test_a_later_run_reuses_the_teacher_tokens(distilled: dict[str, Any], tiny_phi3v_dir: Path, student_dir: Path,
                                               adapter_data: Path, tmp_path: Path) -> None:
    from phiclip.finetune.adapter import distill_phi3v_adapter

    again = distill_phi3v_adapter(f"phi3v:{tiny_phi3v_dir}?num_crops=1", f"clip:{student_dir}", adapter_data, tmp_path / "again",
                                  steps=1, lr=1e-4, student_layer=-1, cache_dir=Path(distilled["teacher_tokens_file"]).parent, eval_fraction=0.25,
                                  speed_images=1, **FAST)
    assert again.teacher_tokens_from_cache and again.teacher_tokens_file == distilled["teacher_tokens_file"]
    assert again.before == distilled["before"]  # same held-out images, same targets, same starting student


def test_resume_stream_mode_and_lora(tiny_phi3v_dir: Path, student_dir: Path, adapter_data: Path, tmp_path: Path) -> None:
    """Teacher tokens streamed, LoRA on the student (merged on export): an interrupted run resumed
    gives the uninterrupted run's loss curve."""
    from safetensors import safe_open

    from phiclip.finetune.adapter import distill_phi3v_adapter

    args: dict[str, Any] = dict(steps=6, batch_size=2, lr=3e-3, save_every=2, teacher_tokens="stream", lora_rank=2,
                                cache_dir=tmp_path / "cache",
                                eval_fraction=0.1, max_eval=2, speed_images=1, **FAST)
    teacher, student = f"phi3v:{tiny_phi3v_dir}?num_crops=1", f"clip:{student_dir}"
    distill_phi3v_adapter(teacher, student, adapter_data, tmp_path / "whole", **args)

    def stop(step: int, loss: float) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill_phi3v_adapter(teacher, student, adapter_data, tmp_path / "split", on_step=stop, **args)
    resumed = distill_phi3v_adapter(teacher, student, adapter_data, tmp_path / "split", resume=True, **args)
    assert resumed.resumed_from == 2 and resumed.teacher_tokens_file is None and not (tmp_path / "cache").exists()
    losses = [[r["loss"] for r in read_metrics(tmp_path / d) if "loss" in r] for d in ("whole", "split")]
    assert len(losses[1]) == 6
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    with safe_open(str(tmp_path / "split" / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "lora" in k]


def test_numbers_from_few_held_out_images_come_with_a_warning(distilled: dict[str, Any], tiny_phi3v_dir: Path,
                                                               student_dir: Path, tmp_path: Path) -> None:
    from phiclip.finetune.adapter import MIN_EVAL_IMAGES, distill_phi3v_adapter, few_eval_images_warning

    assert distilled["before"]["images"] == distilled["after"]["images"] == 6  # the size beside every number
    assert distilled["warnings"] == [few_eval_images_warning(6)]
    assert "6 held-out image(s), fewer than 8" in distilled["warnings"][0] and "meaningful" in distilled["warnings"][0]
    assert few_eval_images_warning(MIN_EVAL_IMAGES) is None
    two = tmp_path / "two"  # 12 images, 2 held out: R^2 from 2 images is reported, with the warning
    make_sample_images(two, per_class=1)
    (two / "labels.csv").unlink()
    with pytest.warns(UserWarning, match=r"measured on 2 held-out image\(s\), fewer than 8: too few to be meaningful"):
        r = distill_phi3v_adapter(f"phi3v:{tiny_phi3v_dir}?num_crops=1", f"clip:{student_dir}", two, tmp_path / "out",
                                  steps=1, student_layer=-1, eval_fraction=0.17, speed_images=1, teacher_tokens="stream",
                                  **FAST)
    assert r.eval_images == 2 and r.after is not None and r.after["images"] == 2 and len(r.warnings) == 1
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["warnings"] == r.warnings
