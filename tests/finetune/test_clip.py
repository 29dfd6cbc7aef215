"""Contrastive CLIP/SigLIP fine-tuning: it learns, it saves what phiclip and transformers load, it
resumes on the same loss curve, it skips unreadable images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from phiclip.finetune.clip import ClipFinetuneResult, contrastive_loss, finetune_clip
from phiclip.finetune.common import TrainingError, read_metrics
from phiclip.pipeline.step import encode_images

FAST = dict(device="cpu", progress=False, num_threads=1, tensorboard=False)


@pytest.fixture(scope="module")
def trained(tiny_clip_dir: Path, caption_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> ClipFinetuneResult:
    """120 steps on the captioned images (24 held-out images, one caption each)."""
    out = tmp_path_factory.mktemp("clip_run") / "out"
    return finetune_clip(f"clip:{tiny_clip_dir}", caption_csv, out, steps=120, batch_size=24, lr=3e-3, warmup=0.1,
                         weight_decay=0.0, **FAST)


def test_retrieval_recall_rises_well_above_start_and_chance(trained: ClipFinetuneResult) -> None:
    chance = 1 / 24
    before, after = trained.before, trained.after
    assert before is not None and after is not None and trained.eval_images == 24
    assert after["recall@1"] >= before["recall@1"] + 0.15, (before, after)
    assert after["recall@1"] >= 4 * chance, after
    assert after["recall@5"] > before["recall@5"]
    losses = [r["loss"] for r in read_metrics(trained.output) if "loss" in r]
    assert len(losses) == 120 and np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10])


def test_unreadable_training_images_are_skipped_and_counted(trained: ClipFinetuneResult) -> None:
    assert trained.skipped_images["count"] == 2
    assert all("broken_" in e for e in trained.skipped_images["examples"])
    assert trained.train_images == 74  # 72 images + the 2 broken ones, which were listed and skipped


def test_outputs_metrics_files(trained: ClipFinetuneResult) -> None:
    metrics = json.loads((trained.output / "metrics.json").read_text())
    assert metrics["before"] == trained.before and metrics["after"] == trained.after and metrics["steps"] == 120
    assert metrics["seconds_per_step"] > 0 and metrics["final_loss"] == pytest.approx(trained.final_loss)
    lines = read_metrics(trained.output)
    assert [r["step"] for r in lines if "eval" in r] == [0, 120]
    assert {"loss", "lr", "epoch", "seconds"} <= set(lines[1])
    assert not (trained.output / "checkpoints").exists()  # removed once the run completed
    assert sorted(p.name for p in trained.output.glob("*.safetensors")) == ["model.safetensors"]
    assert not list(trained.output.glob("*.bin"))


def test_saved_model_reloads_with_phiclip_and_transformers_and_gives_the_same_numbers(
    trained: ClipFinetuneResult, caption_csv: Path
) -> None:
    from transformers import CLIPModel

    from phiclip.encoders import load_encoder
    from phiclip.evaluate import evaluate
    from phiclip.testing import make_side_image

    # The held-out recall measured in memory during training is what phiclip eval gets from the files.
    result = evaluate(f"clip:{trained.output}", "retrieval", caption_csv, split="val", device="cpu", dtype="float32")
    assert trained.after is not None
    for k in (1, 5, 10):
        for side in ("image", "text"):
            key = f"{side}_retrieval_recall@{k}"
            assert result["metrics"][key] == pytest.approx(trained.after[key], abs=1e-6)
    enc = load_encoder(f"clip:{trained.output}", device="cpu", dtype="float32")
    hf = CLIPModel.from_pretrained(trained.output).eval()
    image = make_side_image("red", "circle", "left", size=(64, 48))
    with torch.no_grad():
        out = hf.get_image_features(pixel_values=enc.preprocess(image)[None])
        ref = torch.nn.functional.normalize(getattr(out, "pooler_output", out), dim=-1).numpy()
    np.testing.assert_allclose(encode_images(enc, [image]), ref, atol=1e-5)


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out) if "loss" in r]


def test_resume_continues_the_same_loss_curve(tiny_clip_dir: Path, caption_csv: Path, tmp_path: Path) -> None:
    """LoRA with dropout, so the restored random generators matter too."""
    args: dict[str, Any] = dict(steps=10, batch_size=12, lr=2e-3, save_every=4, lora_rank=4, lora_dropout=0.2,
                                eval_fraction=0.0, **FAST)
    whole = finetune_clip(f"clip:{tiny_clip_dir}", caption_csv, tmp_path / "whole", **args)

    def stop_at_7(step: int, loss: float) -> None:
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune_clip(f"clip:{tiny_clip_dir}", caption_csv, tmp_path / "split", on_step=stop_at_7, **args)
    assert (tmp_path / "split" / "checkpoints" / "step-0000004").is_dir()
    with pytest.raises(TrainingError, match="--resume"):
        finetune_clip(f"clip:{tiny_clip_dir}", caption_csv, tmp_path / "split", **args)
    with pytest.raises(TrainingError, match=r"options.lr: 0.002 -> 0.001\)"):
        finetune_clip(f"clip:{tiny_clip_dir}", caption_csv, tmp_path / "split", resume=True, **{**args, "lr": 1e-3})
    resumed = finetune_clip(f"clip:{tiny_clip_dir}", caption_csv, tmp_path / "split", resume=True, **args)
    assert resumed.resumed_from == 4
    lines = read_metrics(tmp_path / "split")  # the lines after the checkpoint (steps 5-7) were dropped
    assert [r["step"] for r in lines if "loss" in r] == list(range(1, 11))
    assert [r["step"] for r in lines if "eval" in r] == [0, 10]
    np.testing.assert_allclose(_losses(tmp_path / "split"), _losses(tmp_path / "whole"), rtol=1e-6)
    assert resumed.final_loss == pytest.approx(whole.final_loss, rel=1e-6)


def test_lora_is_merged_on_save(tiny_clip_dir: Path, caption_csv: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    finetune_clip(f"clip:{tiny_clip_dir}", caption_csv, tmp_path / "lora", steps=3, batch_size=12, lr=1e-2,
                  lora_rank=4, lora_targets=("q_proj",), eval_fraction=0.0, **FAST)
    new, old = load_file(str(tmp_path / "lora" / "model.safetensors")), load_file(str(tiny_clip_dir / "model.safetensors"))
    assert set(new) == set(old)  # no adapter tensors: merged into the weights
    q = "vision_model.encoder.layers.0.self_attn.q_proj.weight"
    k = "vision_model.encoder.layers.0.self_attn.k_proj.weight"
    assert not torch.equal(new[q], old[q]) and torch.equal(new[k], old[k])


def test_contrastive_losses_match_transformers(tiny_clip_dir: Path, tiny_siglip_dir: Path) -> None:
    from transformers import AutoTokenizer, CLIPModel, SiglipModel

    from phiclip.finetune.clip import features

    texts = ["a red circle", "a blue square", "a green triangle"]
    pixels = torch.randn(3, 3, 32, 32)
    for cls, path, bias in ((CLIPModel, tiny_clip_dir, False), (SiglipModel, tiny_siglip_dir, True)):
        model = cls.from_pretrained(path).eval()
        tok = AutoTokenizer.from_pretrained(path)(texts, padding="max_length" if bias else "longest", return_tensors="pt")
        with torch.no_grad():
            ref = model(input_ids=tok["input_ids"], pixel_values=pixels, return_loss=True,
                        **({} if bias else {"attention_mask": tok["attention_mask"]})).loss
            img, txt = features(model, pixels, {"input_ids": tok["input_ids"], **({} if bias else {"attention_mask": tok["attention_mask"]})})
            ours = contrastive_loss(img, txt, model.logit_scale, model.logit_bias if bias else None, torch.eye(3, dtype=torch.bool))
        assert float(ours) == pytest.approx(float(ref), rel=1e-5)


def test_identical_captions_are_positives_of_each_other() -> None:
    """Texts 0 and 1 are the same caption (same vector). SigLIP's pairwise loss would push text 1 away
    from image 0 while pulling text 0 to it (the same logit); with identical captions as positives it
    does not. For CLIP's softmax the two targets give the same loss (duplicate texts share scores)."""
    img = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]]), dim=-1)
    txt = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    same = torch.tensor([[True, True, False], [True, True, False], [False, False, True]])
    scale = torch.tensor(np.log(10.0))
    plain = contrastive_loss(img, txt, scale, None, torch.eye(3, dtype=torch.bool))
    multi = contrastive_loss(img, txt, scale, None, same)
    assert float(multi) == pytest.approx(float(plain), rel=1e-6)
    sig_plain = contrastive_loss(img, txt, scale, torch.tensor(-1.0), torch.eye(3, dtype=torch.bool))
    sig_multi = contrastive_loss(img, txt, scale, torch.tensor(-1.0), same)
    assert float(sig_multi) < float(sig_plain) - 0.2


def test_siglip_with_frozen_vision_tower(tiny_siglip_dir: Path, caption_csv: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import SiglipModel

    from phiclip.encoders import load_encoder

    r = finetune_clip(f"siglip:{tiny_siglip_dir}", caption_csv, tmp_path / "sig", steps=3, batch_size=12, lr=1e-2,
                      freeze="vision", max_eval=8, **FAST)
    assert r.before is not None and r.after is not None
    new, old = load_file(str(tmp_path / "sig" / "model.safetensors")), load_file(str(tiny_siglip_dir / "model.safetensors"))
    vision = [k for k in old if k.startswith("vision_model.")]
    text = [k for k in old if k.startswith("text_model.") and k.endswith("weight")]
    assert vision and all(torch.equal(new[k], old[k]) for k in vision)
    assert any(not torch.equal(new[k], old[k]) for k in text)
    SiglipModel.from_pretrained(tmp_path / "sig")
    assert load_encoder(f"siglip:{tmp_path / 'sig'}", device="cpu").encode_texts(["a red circle"]).shape == (1, 32)


def test_cli_on_a_folder_per_class_with_templates(tiny_clip_dir: Path, colour_folder: Path, tmp_path: Path) -> None:
    from phiclip.cli import app

    out = tmp_path / "cli"
    args = ["finetune", "clip", "-m", f"clip:{tiny_clip_dir}", "-d", str(colour_folder), "-o", str(out), "--steps", "2",
            "--batch-size", "8", "--template", "a {c} thing", "--template", "something {c}", "--device", "cpu",
            "--no-progress", "--no-tensorboard", "--json"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["steps"] == 2 and data["skipped_images"]["count"] in (0, 1) and data["after"]["recall@10"] >= 0
    assert (out / "config.json").is_file()
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 1 and "--resume" in again.output


def test_every_evaluation_says_on_how_many_images_and_the_split_gives_real_counts(trained: ClipFinetuneResult) -> None:
    assert trained.before is not None and trained.after is not None
    assert trained.before["images"] == trained.after["images"] == 24
    assert all(r["eval"]["images"] == 24 for r in read_metrics(trained.output) if "eval" in r)
    assert trained.split == "given splits (train / val: 74 / 24 images)"


def test_cli_states_how_many_images_were_held_out(tiny_clip_dir: Path, colour_folder: Path, tmp_path: Path) -> None:
    """4 classes of 12-13 images, --eval-fraction 0.1: one per class, 4 of 49 (8%), not "10%"."""
    from phiclip.cli import app

    res = CliRunner().invoke(app, ["finetune", "clip", "-m", f"clip:{tiny_clip_dir}", "-d", str(colour_folder), "-o",
                                   str(tmp_path / "out"), "--steps", "1", "--batch-size", "8", "--device", "cpu",
                                   "--no-progress", "--no-tensorboard", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["split"] == ("held out 4 of 49 images (8%; stratified by label; 10% asked, rounded per class, at least "
                             "one of each class of two or more images; seed 0)")
    assert data["eval_images"] == 4 and data["before"]["images"] == data["after"]["images"] <= 4


# --- open_clip checkpoints: trained on transformers' CLIPModel, saved as open_clip again -----------------------
def _tiny_open_clip(folder: Path, **model_cfg: Any) -> Path:
    from phiclip.testing import build_tiny_open_clip

    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}, **model_cfg}
    return build_tiny_open_clip(folder, model_cfg=cfg, preprocess_cfg={"interpolation": "bilinear", "resize_mode": "squash",
                                                                       "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]})


def test_open_clip_is_saved_as_open_clip_with_its_preprocessing_and_tokenizer(caption_csv: Path, tmp_path: Path) -> None:
    """The output is an open_clip folder (the source's open_clip_config.json unchanged, new weights); phiclip loads
    it (spec with or without the kind) with the source's preprocessing and tokenizer, and ``phiclip eval`` on the
    files gives the recall measured in memory at the end of training."""
    from phiclip.encoders import load_encoder
    from phiclip.evaluate import evaluate

    source = _tiny_open_clip(tmp_path / "src", quick_gelu=True)
    r = finetune_clip(str(source), caption_csv, tmp_path / "out", steps=40, batch_size=24, lr=1e-3, warmup=0.1,
                      weight_decay=0.0, **FAST)  # the kind found from open_clip_config.json
    assert r.model == f"open_clip:{source}" and r.before is not None and r.after is not None
    losses = [m["loss"] for m in read_metrics(r.output) if "loss" in m]
    assert len(losses) == 40 and np.mean(losses[-10:]) < 0.9 * np.mean(losses[:10]), losses  # it learns
    assert r.after["recall@5"] >= r.before["recall@5"] + 0.15, (r.before, r.after)
    assert sorted(p.name for p in r.output.iterdir()) == ["metrics.json", "metrics.jsonl", "open_clip_config.json",
                                                          "open_clip_model.safetensors"]
    config = json.loads((r.output / "open_clip_config.json").read_text())
    assert config == json.loads((source / "open_clip_config.json").read_text())
    before, after = load_encoder(f"open_clip:{source}", device="cpu"), load_encoder(str(r.output), device="cpu")
    assert after.kind == "open_clip" and after.weights_fingerprint != before.weights_fingerprint
    assert after.preprocessor.describe() == before.preprocessor.describe()
    assert after.describe()["details"]["open_clip"]["tokenizer"] == before.describe()["details"]["open_clip"]["tokenizer"]
    result = evaluate(str(r.output), "retrieval", caption_csv, split="val", device="cpu", dtype="float32")
    for k in (1, 5, 10):
        for side in ("image", "text"):
            key = f"{side}_retrieval_recall@{k}"
            assert result["metrics"][key] == pytest.approx(r.after[key], abs=1e-6)


def test_open_clip_with_lora_and_a_custom_text_tower_layout(caption_csv: Path, tmp_path: Path) -> None:
    """LoRA is merged; a CustomTextCLIP config (text tower under ``text.``) keeps its layout."""
    from safetensors.torch import load_file, save_file

    from phiclip.encoders import load_encoder

    source = _tiny_open_clip(tmp_path / "src", custom_text=True)
    state = load_file(str(source / "open_clip_model.safetensors"))  # as open_clip's CustomTextCLIP saves it
    save_file({k if k.startswith(("visual.", "logit_")) else f"text.{k}": v for k, v in state.items()},
              str(source / "open_clip_model.safetensors"))
    finetune_clip(f"open_clip:{source}", caption_csv, tmp_path / "out", steps=3, batch_size=12, lr=1e-2, lora_rank=4,
                  lora_targets=("q_proj",), eval_fraction=0.0, **FAST)
    old, new = load_file(str(source / "open_clip_model.safetensors")), load_file(str(tmp_path / "out" / "open_clip_model.safetensors"))
    assert set(new) == set(old) and any(k.startswith("text.transformer.") for k in new)  # merged, same layout
    w = "visual.transformer.resblocks.0.attn.in_proj_weight"  # q, k, v stacked: only q trained
    assert not torch.equal(new[w][:32], old[w][:32]) and torch.equal(new[w][32:], old[w][32:])
    assert torch.equal(new["text.token_embedding.weight"], old["text.token_embedding.weight"])  # LoRA only
    assert load_encoder(f"open_clip:{tmp_path / 'out'}", device="cpu").kind == "open_clip"


def test_open_clip_with_a_logit_bias_is_refused(caption_csv: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    source = _tiny_open_clip(tmp_path / "src")
    state = load_file(str(source / "open_clip_model.safetensors"))
    save_file({**state, "logit_bias": torch.tensor(-10.0)}, str(source / "open_clip_model.safetensors"))
    with pytest.raises(TrainingError, match="logit_bias.*softmax loss only"):
        finetune_clip(f"open_clip:{source}", caption_csv, tmp_path / "out", steps=1, batch_size=12, **FAST)


@pytest.mark.compiled_runtime
def test_fine_tuning_runs_torch_whatever_the_default_runtime(tiny_clip_dir: Path, caption_csv: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiled runtime cannot follow training: a spec that names no runtime trains on torch even where
    the default runtime is a compiled one."""
    from phiclip.cpu.runtimes import missing_packages

    if missing_packages("onnxruntime"):
        pytest.skip("onnxruntime is not installed (phiclip[cpu-runtimes])")
    monkeypatch.setenv("PHICLIP_RUNTIME", "onnxruntime")
    monkeypatch.setenv("PHICLIP_CACHE", str(tmp_path / "cache"))
    result = finetune_clip(f"clip:{tiny_clip_dir}", caption_csv, tmp_path / "out", steps=2, batch_size=8, **FAST)
    assert result.after is not None
