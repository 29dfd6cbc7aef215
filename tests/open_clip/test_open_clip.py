"""The open_clip kind without the reference: refusals, weights-only .bin, export guards, detection."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from phiclip.hub import CheckpointError
from phiclip.open_clip.config import UnsupportedOpenCLIP, parse_config
from phiclip.testing import build_tiny_open_clip, shrink_open_clip_config


def _cfg(**changes) -> dict:
    cfg = shrink_open_clip_config("ViT-B-32")
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            cfg[section][field] = value
        else:
            cfg[section] = value
    return {"model_cfg": cfg}


@pytest.mark.parametrize(("changes", "named"), [
    ({"vision_cfg__timm_model_name": "eva02_large_patch14_clip_224"}, "timm image tower"),
    ({"text_cfg__hf_model_name": "xlm-roberta-base"}, "transformers text tower"),
    ({"multimodal_cfg": {"width": 512}}, "CoCa"),
    ({"vision_cfg__layers": [3, 4, 6, 3]}, "ResNet"),
    ({"vision_cfg__ls_init_value": 1e-5}, "ls_init_value"),
    ({"vision_cfg__attentional_pool": True}, "attentional_pool"),
    ({"text_cfg__pool_type": "last"}, "pool_type"),
    ({"text_cfg__hf_tokenizer_name": "timm/ViT-B-16-SigLIP"}, "tokenizer"),
    ({"vision_cfg__something_new": 3}, "unknown to phiclip"),
])
def test_unsupported_architectures_are_refused_by_name(changes: dict, named: str) -> None:
    with pytest.raises(UnsupportedOpenCLIP, match=named) as e:
        parse_config(_cfg(**changes), "open_clip_config.json")
    assert "ViT-B-32, ViT-B-16, ViT-L-14" in str(e.value)  # says what is supported


def test_damaged_sizes_are_refused() -> None:
    with pytest.raises(CheckpointError, match="width"):
        parse_config(_cfg(vision_cfg__width=-3))
    with pytest.raises(CheckpointError, match="model_cfg"):
        parse_config({"preprocess_cfg": {}})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_open_clip(tmp_path_factory.mktemp("oc") / "m")


def _load(path: Path | str):
    from phiclip.encoders import load_encoder

    return load_encoder(f"open_clip:{path}", device="cpu", dtype="float32")


def test_bin_weights_load_weights_only_with_the_same_fingerprint(tiny: Path, tmp_path: Path) -> None:
    from PIL import Image

    binary = build_tiny_open_clip(tmp_path / "bin", weights="bin")
    a, b = _load(tiny), _load(binary)
    assert a.weights_fingerprint == b.weights_fingerprint
    image = Image.new("RGB", (40, 30), (10, 200, 30))
    assert np.allclose(a.encode_batch(a.collate([a.preprocess(image)])).embeddings,
                       b.encode_batch(b.collate([b.preprocess(image)])).embeddings, atol=0)
    assert b.describe()["details"]["open_clip"]["weights_file"] == "open_clip_pytorch_model.bin"


def test_fingerprint_is_the_files_hashed_the_straightforward_way(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The safetensors weights are hashed from the tensors load_file gave, in the background while the
    model is built: the fingerprint is the one of the file hashed tensor by tensor on one thread."""
    import phiclip.models.checkpoint as C
    from phiclip.open_clip.loading import load_open_clip

    path = build_tiny_open_clip(tmp_path / "m", seed=4)
    monkeypatch.setenv("PHICLIP_CACHE", str(tmp_path / "cache-a"))
    loaded = load_open_clip(f"open_clip:{path}")
    assert loaded.checkpoint._hasher._pending  # hashed from the tensors read, in the background
    fingerprint = loaded.checkpoint.fingerprint
    monkeypatch.setenv("PHICLIP_CACHE", str(tmp_path / "cache-b"))  # no digests cached
    monkeypatch.setattr(C, "hash_workers", lambda: 1)
    assert fingerprint == C.fingerprint_files([path / "open_clip_model.safetensors"])
    assert _load(path).weights_fingerprint == fingerprint


class _Boom:
    def __reduce__(self):
        return (print, ("pickle code ran",))


def test_bin_with_pickled_code_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import shutil

    folder = build_tiny_open_clip(tmp_path / "m", weights="bin")
    (folder / "open_clip_pytorch_model.bin").write_bytes(pickle.dumps({"x": _Boom()}))
    with pytest.raises(CheckpointError, match="weights_only"):
        _load(folder)
    assert "pickle code ran" not in capsys.readouterr().out
    shutil.rmtree(folder)


def test_plain_folder_is_recognised_and_clip_kind_points_to_open_clip(tiny: Path) -> None:
    from phiclip.checkpoints import open_checkpoint

    assert open_checkpoint(tiny).model_type == "open_clip"
    with pytest.raises(CheckpointError, match=f"open_clip:{tiny}"):
        open_checkpoint(tiny, kind="clip")


def test_weights_that_do_not_fit_the_config_are_named(tiny: Path, tmp_path: Path) -> None:
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny, bad)
    data = json.loads((bad / "open_clip_config.json").read_text())
    data["model_cfg"]["embed_dim"] = 24
    (bad / "open_clip_config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="shape"):
        _load(bad)


def test_export_refuses_a_non_empty_folder(tiny: Path, tmp_path: Path) -> None:
    from phiclip.open_clip.export import export_to_hf, export_to_open_clip

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        export_to_hf(f"open_clip:{tiny}", tmp_path / "full")
    with pytest.raises(FileExistsError):
        export_to_open_clip(f"clip:{tiny}", tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_export_round_trip_keeps_the_weights(tiny: Path, tmp_path: Path) -> None:
    from phiclip.open_clip.export import export_to_hf, export_to_open_clip

    hf = export_to_hf(f"open_clip:{tiny}", tmp_path / "hf")
    back = export_to_open_clip(f"clip:{hf.out_dir}", tmp_path / "back")
    a, b = _load(tiny), _load(back.out_dir)
    assert a.weights_fingerprint == b.weights_fingerprint
    assert a.preprocessor.describe() == b.preprocessor.describe()
    assert np.array_equal(a.encode_texts(["a cat", "Tom &amp; Jerry"]), b.encode_texts(["a cat", "Tom &amp; Jerry"]))


def test_fallback_fix_text_matches_ftfy_on_fixed_mappings() -> None:
    ftfy = pytest.importorskip("ftfy", reason="ftfy is not installed (phiclip[open-clip], in the dev extra)")
    from phiclip.open_clip.tokenizer import fix_text_fallback

    for text in ["don’t “x”", "ﬁne ﬂow", "ＦＵＬＬ　ｗｉｄｔｈ", "a\r\nb\rc", "e\u0301", "&amp; &lt;", "<b>&amp;</b>",
                 "\x1b[31mred\x1b[0m", "zero\u200bwidth", "tab\there", "🐱 emoji", "\ufeffbom"]:
        assert fix_text_fallback(text) == ftfy.fix_text(text), text
