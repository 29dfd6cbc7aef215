"""``phiclip export SPEC --to hf|open_clip OUT`` through the command line: what it writes loads in
transformers and phiclip with the same weights; a used folder, the wrong kind and encoder options are refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from phiclip.cli import app
from phiclip.testing import build_tiny_open_clip


@pytest.fixture(scope="module")
def tiny_oc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_open_clip(tmp_path_factory.mktemp("cli_oc") / "oc", seed=2)


def _load(spec: str):
    from phiclip.encoders import load_encoder

    return load_encoder(spec, device="cpu", dtype="float32")


def test_export_to_hf_and_back_to_open_clip(cli, tiny_oc: Path, tmp_path: Path) -> None:
    import torch
    from transformers import CLIPModel, CLIPProcessor

    hf = tmp_path / "hf"
    res = cli.invoke(app, ["export", f"open_clip:{tiny_oc}", str(hf), "--to", "hf"])
    assert res.exit_code == 0, res.output
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json"):
        assert name in res.output and (hf / name).is_file()
    assert "note: transformers' CLIP processor composites alpha" in res.output  # the notes are printed
    assert f"clip:{hf}" in res.output  # how to load it
    source = _load(f"open_clip:{tiny_oc}")
    model = CLIPModel.from_pretrained(str(hf)).eval()
    CLIPProcessor.from_pretrained(str(hf))
    pixels = source.preprocess(Image.new("RGB", (70, 50), (200, 40, 90)))[None]
    with torch.no_grad():
        ours = source.encode_batch(pixels).embeddings
        theirs = torch.nn.functional.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    assert np.abs(ours - theirs.numpy()).max() <= 1e-5

    back = tmp_path / "back"
    res = cli.invoke(app, ["export", str(hf), str(back), "--to", "open_clip", "--json"])  # the kind from config.json
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert result["to"] == "open_clip" and result["files"] == ["open_clip_config.json", "open_clip_model.safetensors"]
    again = _load(f"open_clip:{back}")
    assert again.weights_fingerprint == source.weights_fingerprint
    assert np.array_equal(again.encode_texts(["a cat", "Tom &amp; Jerry"]), source.encode_texts(["a cat", "Tom &amp; Jerry"]))


def test_export_refuses_a_used_folder_before_loading_anything(cli, tiny_oc: Path, tmp_path: Path) -> None:
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    res = cli.invoke(app, ["export", f"open_clip:{tiny_oc}", str(used), "--to", "hf"])
    assert res.exit_code == 1 and "not an empty folder" in res.output and "Traceback" not in res.output
    assert [p.name for p in used.iterdir()] == ["keep.txt"] and (used / "keep.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty folder is fine
    assert cli.invoke(app, ["export", str(tiny_oc), str(empty), "--to", "hf"]).exit_code == 0


def test_export_refuses_the_wrong_kind_and_options(cli, tiny_oc: Path, tmp_path: Path) -> None:
    res = cli.invoke(app, ["export", f"open_clip:{tiny_oc}", str(tmp_path / "a"), "--to", "open_clip"])
    assert res.exit_code == 1 and "exports clip: checkpoints" in res.output and "use --to hf" in res.output
    res = cli.invoke(app, ["export", f"open_clip:{tiny_oc}?normalize=false", str(tmp_path / "b"), "--to", "hf"])
    assert res.exit_code == 1 and "not encoder options (normalize)" in res.output
    res = cli.invoke(app, ["export", f"open_clip:{tiny_oc}", str(tmp_path / "c"), "--to", "onnx"])
    assert res.exit_code == 2 and "onnx" in res.output
    assert not any((tmp_path / n).exists() for n in ("a", "b", "c"))
