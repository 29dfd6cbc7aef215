"""The demo (the README's first quick-start command) end to end, offline, with tiny checkpoints."""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from phiclip.demo import choose_model, run_demo


def test_demo_runs_end_to_end_and_says_which_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("PHICLIP_CLIP_MODEL", raising=False)
    monkeypatch.delenv("PHICLIP_PHI3V_MODEL", raising=False)
    lines: list[str] = []
    result = run_demo(tmp_path / "demo", device="cpu", say=lines.append)
    text = "\n".join(lines)
    assert "TINY RANDOM-WEIGHT" in text and "NOTE: tiny random-weight checkpoints were used" in text
    assert result["models"]["clip"]["real"] is False and result["models"]["phi3v"]["real"] is False
    n_images = len(list((tmp_path / "demo" / "images").rglob("*.png")))
    for key in ("clip", "phi3v"):
        out = tmp_path / "demo" / "embeddings" / key
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["counts"]["embedded"] == n_images and manifest["complete"]
        assert sum(pq.read_metadata(p).num_rows for p in (out / "embeddings").glob("*.parquet")) == n_images
    assert len(result["search"]["text"]) == 5 and len(result["search"]["image"]) == 5
    # The image query finds itself first.
    assert result["search"]["image"][0]["source"].endswith("red_circle_0.png")
    report = json.loads((tmp_path / "demo" / "report" / "report.json").read_text())
    assert (tmp_path / "demo" / "report" / "report.html").stat().st_size > 10_000
    assert len(report["models"]) == 2


def test_given_models_are_used_as_they_are(tmp_path):
    built = []
    choice = choose_model("CLIP", "/models/my-clip", "openai/clip-vit-base-patch32", lambda: built.append(1), tiny=False)
    assert choice.spec == "clip:/models/my-clip" and choice.real and not built
    choice = choose_model("Phi-3-vision", None, "microsoft/x", lambda: tmp_path, tiny=True)
    assert choice.spec == f"phi3v:{tmp_path}" and not choice.real and "--tiny" in choice.why
