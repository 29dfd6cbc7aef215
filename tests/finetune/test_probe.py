"""Probes on frozen embeddings, and classification with them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from phiclip.encoders.base import EncodedBatch, Encoder
from phiclip.finetune.common import TrainingError
from phiclip.finetune.probe import ProbeOptions, classify, fit_probe, load_probe, train_probe

FAST = dict(device="cpu", progress=False)


class MeanColourEncoder(Encoder):
    """Test-only: an image's vector is the mean RGB of its saturated pixels (the shape) plus a
    constant, so the colour classes separate."""

    name = "meancolour:test"
    dim = 4
    modalities = frozenset({"image"})

    def preprocess(self, image: Image.Image) -> np.ndarray:
        px = np.asarray(image.convert("RGB"), dtype=np.float32).reshape(-1, 3)
        shape = px[px.max(1) - px.min(1) > 60]
        return (shape if len(shape) else px).mean(0) / 255.0

    def collate(self, items: Sequence[Any]) -> np.ndarray:
        return np.stack(items)

    def encode_batch(self, batch: np.ndarray, *, with_tokens: bool = False) -> EncodedBatch:
        v = np.concatenate([batch, np.ones((len(batch), 1), np.float32)], axis=1)
        return EncodedBatch(embeddings=v / np.linalg.norm(v, axis=1, keepdims=True))

    def describe(self) -> dict[str, Any]:
        return {"spec": self.name, "dim": self.dim, "weights_fingerprint": "sha256:none"}


def test_probe_is_accurate_on_separable_embeddings_and_classify_agrees(colour_folder: Path, tmp_path: Path) -> None:
    enc = MeanColourEncoder()
    r = train_probe(enc, colour_folder, tmp_path / "probe", cache_dir=tmp_path / "cache", lr=1e-2, epochs=100,
                    **FAST)
    assert r.num_classes == 4 and r.val_acc == 1.0 and r.train_acc == 1.0 and r.val_images >= 8
    assert r.skipped_images["count"] == 1 and "broken.png" in r.skipped_images["examples"][0]
    out = tmp_path / "preds.parquet"
    c = classify(tmp_path / "probe", colour_folder, out, model=enc, top_k=3, progress=False)
    assert (c.rows, c.classified, c.failed) == (49, 48, 1)
    table = pq.read_table(out).to_pylist()
    assert set(table[0]) == {"id", "source", "label", "score", "top_k", "error"}
    good = [row for row in table if row["error"] is None]
    assert all(row["label"] == Path(row["source"]).parent.name for row in good)  # every image right
    assert all(len(row["top_k"]) == 3 and row["top_k"][0]["label"] == row["label"] for row in good)
    assert all(row["top_k"][0]["score"] >= row["top_k"][1]["score"] >= row["top_k"][2]["score"] for row in good)
    bad = [row for row in table if row["error"] is not None]
    assert len(bad) == 1 and bad[0]["label"] is None and "broken.png" in bad[0]["source"]
    # The scores are the probe's own probabilities for the stored vectors.
    probe = load_probe(tmp_path / "probe")
    x = enc.encode_batch(np.stack([enc.preprocess(Image.open(good[0]["source"]))])).embeddings
    assert probe.predict_proba(x).max() == pytest.approx(good[0]["score"], abs=1e-5)


def test_probe_files_and_cache_and_refusals(tiny_clip_dir: Path, colour_folder: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    spec = f"clip:{tiny_clip_dir}"
    first = train_probe(spec, colour_folder, tmp_path / "p1", cache_dir=tmp_path / "cache", hidden=8, **FAST)
    assert not first.embeddings_from_cache and first.val_acc is not None
    meta = json.loads((tmp_path / "p1" / "probe.json").read_text())
    assert meta["encoder"] == spec and meta["weights_fingerprint"] and meta["classnames"] == ["blue", "green", "red", "yellow"]
    assert meta["hidden"] == 8 and meta["dim"] == 16
    assert set(load_file(str(tmp_path / "p1" / "probe.safetensors"))) == {
        "feature_mean", "feature_std", "layers.0.weight", "layers.0.bias", "layers.3.weight", "layers.3.bias"}
    second = train_probe(spec, colour_folder, tmp_path / "p2", cache_dir=tmp_path / "cache", hidden=8, **FAST)
    assert second.embeddings_from_cache and second.val_acc == first.val_acc  # same vectors, same probe
    # Another encoder asked for: refused. Other weights under the same path: refused.
    with pytest.raises(TrainingError, match="trained on clip:"):
        classify(tmp_path / "p1", colour_folder, tmp_path / "x.parquet", model="siglip:/somewhere", progress=False)
    changed = tmp_path / "p1_changed"
    changed.mkdir()
    (changed / "probe.safetensors").write_bytes((tmp_path / "p1" / "probe.safetensors").read_bytes())
    (changed / "probe.json").write_text(json.dumps({**meta, "weights_fingerprint": "sha256:" + "0" * 64}))
    with pytest.raises(TrainingError, match="weights of clip:.* changed"):
        classify(changed, colour_folder, tmp_path / "x.parquet", progress=False, device="cpu")


def test_class_weights_help_the_minority_class() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (380, 2)), rng.normal(1.2, 1, (20, 2))]).astype(np.float32)
    y = np.array([0] * 380 + [1] * 20)
    recall = {}
    for mode in ("none", "balanced"):
        net, _ = fit_probe(x, y, None, None, 2, ProbeOptions(class_weights=mode, epochs=150, lr=1e-2))
        from phiclip.finetune.probe import predict_proba

        recall[mode] = float(np.mean(predict_proba(net, x[y == 1]).argmax(1) == 1))
    assert recall["balanced"] >= recall["none"] + 0.3, recall


def test_hidden_layer_learns_what_a_linear_probe_cannot_and_early_stopping_stops() -> None:
    from phiclip.finetune.probe import predict_proba

    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (400, 2)).astype(np.float32)
    y = ((x[:, 0] > 0) ^ (x[:, 1] > 0)).astype(np.int64)  # XOR: not linearly separable
    linear, _ = fit_probe(x[:300], y[:300], x[300:], y[300:], 2, ProbeOptions(epochs=200, lr=1e-2, batch_size=64))
    mlp, info = fit_probe(x[:300], y[:300], x[300:], y[300:], 2, ProbeOptions(hidden=32, epochs=200, lr=1e-2, batch_size=64))
    acc = {name: float(np.mean(predict_proba(net, x[300:]).argmax(1) == y[300:])) for name, net in (("linear", linear), ("mlp", mlp))}
    assert acc["linear"] < 0.7 and acc["mlp"] > 0.9, acc
    noise = rng.normal(size=(60, 8)).astype(np.float32)
    labels = rng.integers(0, 2, 60)  # nothing to learn: the validation loss stops improving early
    _, stopped = fit_probe(noise[:40], labels[:40], noise[40:], labels[40:], 2, ProbeOptions(epochs=500, patience=5, lr=1e-2))
    assert stopped["epochs_run"] < 500 and stopped["best_epoch"] <= stopped["epochs_run"] - 5


def test_cli_probe_then_classify(tiny_clip_dir: Path, colour_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from phiclip.cli import app

    monkeypatch.setenv("PHICLIP_CACHE", str(tmp_path / "cache"))
    runner = CliRunner()
    res = runner.invoke(app, ["finetune", "probe", "-m", f"clip:{tiny_clip_dir}", "-d", str(colour_folder), "-o",
                              str(tmp_path / "probe"), "--device", "cpu", "--no-progress", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["num_classes"] == 4 and (tmp_path / "cache" / "embeddings").is_dir()
    res = runner.invoke(app, ["classify", "-p", str(tmp_path / "probe"), "-i", str(colour_folder), "-o",
                              str(tmp_path / "preds.parquet"), "--device", "cpu", "--no-progress", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["failed"] == 1 and pq.read_table(tmp_path / "preds.parquet").num_rows == 49
    res = runner.invoke(app, ["classify", "-p", str(tmp_path / "probe"), "-i", str(colour_folder), "-o",
                              str(tmp_path / "p2.parquet"), "-m", "clip:/elsewhere", "--no-progress"])
    assert res.exit_code == 1 and "trained on clip:" in res.output


def test_probe_reads_a_hugging_face_dataset(colour_folder: Path, tmp_path: Path) -> None:
    """``hf:DIR`` (a save_to_disk folder with an Image and a ClassLabel column) goes through the same reader."""
    import datasets

    paths = sorted(p for p in colour_folder.rglob("*.png") if p.name != "broken.png")
    names = ["blue", "green", "red", "yellow"]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    ds = datasets.Dataset.from_dict({"image": [str(p) for p in paths], "label": [names.index(p.parent.name) for p in paths]},
                                    features=features)
    ds.save_to_disk(str(tmp_path / "hf"))
    r = train_probe(MeanColourEncoder(), f"hf:{tmp_path / 'hf'}", tmp_path / "probe", cache_dir=tmp_path / "cache",
                    lr=1e-2, epochs=100, **FAST)
    assert r.num_classes == 4 and r.val_acc == 1.0 and r.train_images + r.val_images == 48
    assert json.loads((tmp_path / "probe" / "probe.json").read_text())["classnames"] == names


class NaNOnRed(MeanColourEncoder):
    """Test-only: red shapes give NaN vectors (a model failing on some inputs)."""

    def encode_batch(self, batch: np.ndarray, *, with_tokens: bool = False) -> EncodedBatch:
        out = super().encode_batch(batch).embeddings.copy()
        out[(batch[:, 0] > 0.6) & (batch[:, 1] < 0.4)] = np.nan
        return EncodedBatch(embeddings=out)


def test_probe_embeds_through_the_pipeline_step_and_reports_failures_as_embed_does(colour_folder: Path,
                                                                                  tmp_path: Path) -> None:
    """Non-finite vectors are failures of stage encode (as in ``phiclip embed``), not training rows."""
    from phiclip.pipeline.step import embed_payloads

    r = train_probe(NaNOnRed(), colour_folder, tmp_path / "probe", cache_dir=tmp_path / "cache", lr=1e-2, epochs=50,
                    **FAST)
    assert r.skipped_images["count"] == 13  # 12 red images + the broken file
    assert r.train_images + r.val_images == 36 and r.train_acc == 1.0
    broken = colour_folder / "red" / "broken.png"
    step = embed_payloads(NaNOnRed(), [str(broken), str(colour_folder / "red" / sorted(
        p.name for p in (colour_folder / "red").glob("*.png") if p.name != "broken.png")[0])], batch_size=2, max_pixels=None)
    reasons = {reason for _, _, reason in step.errors}
    examples = r.skipped_images["examples"]
    assert len(reasons) == 2 and all(any(e.endswith(": " + reason) for e in examples) for reason in reasons)
    assert all(e.startswith(str(colour_folder / "red")) for e in examples)  # "source: reason", like embed


def test_probe_shows_progress_while_embedding_and_training(colour_folder: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    train_probe(MeanColourEncoder(), colour_folder, tmp_path / "probe", cache_dir=tmp_path / "cache", epochs=7,
                device="cpu", progress=True)
    err = capsys.readouterr().err
    assert "embed" in err and "49/49" in err  # every image, the unreadable one included
    assert "train probe" in err and "epoch" in err and "val_loss" in err


def test_the_embedding_cache_lives_under_the_one_cache_root(colour_folder: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """``PHICLIP_CACHE_DIR`` (the deprecated name) and ``XDG_CACHE_HOME`` are honoured like everywhere else."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PHICLIP_CACHE", raising=False)
    monkeypatch.delenv("PHICLIP_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    train_probe(MeanColourEncoder(), colour_folder, tmp_path / "p1", epochs=2, **FAST)
    assert len(list((tmp_path / "xdg" / "phiclip" / "embeddings").glob("*.safetensors"))) == 1
    monkeypatch.setenv("PHICLIP_CACHE_DIR", str(tmp_path / "legacy"))
    r = train_probe(MeanColourEncoder(), colour_folder, tmp_path / "p2", epochs=2, **FAST)
    assert not r.embeddings_from_cache and len(list((tmp_path / "legacy" / "embeddings").glob("*.safetensors"))) == 1
    assert not (tmp_path / "home").exists()
