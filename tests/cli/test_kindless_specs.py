"""Model specs without ``KIND:`` on the command line: the kind comes from the checkpoint's ``config.json`` or
``open_clip_config.json`` (``registry.resolve_spec``), for every command that takes ``-m``; a folder without
either is a usage error naming the fix; ``embed-text`` with an image-only model names every kind with text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from phiclip.cli import app
from phiclip.testing import build_tiny_open_clip, make_sample_images


@pytest.fixture(scope="module")
def tiny_oc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_open_clip(tmp_path_factory.mktemp("kindless_oc") / "oc", seed=4)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("kindless_imgs") / "imgs"
    make_sample_images(root, per_class=1)
    return root


@pytest.mark.parametrize("which", ["open_clip", "clip"])
def test_embed_finds_the_kind_from_the_folder(cli, which: str, tiny_oc: Path, tiny_clip_ckpt: Path, images: Path,
                                              tmp_path: Path) -> None:
    model = tiny_oc if which == "open_clip" else tiny_clip_ckpt
    out = tmp_path / "out"
    res = cli.invoke(app, ["embed", "-m", str(model), "-i", str(images), "-o", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "manifest.json").read_text())["encoder"]["spec"] == f"{which}:{model}"
    res = cli.invoke(app, ["search", str(out), "--text", "a red circle", "-k", "2", "-m", str(model), "--json"])
    assert res.exit_code == 0, res.output


def test_eval_and_compare_take_kindless_specs(cli, tiny_oc: Path, tiny_clip_ckpt: Path, images: Path,
                                              tmp_path: Path) -> None:
    res = cli.invoke(app, ["eval", "-m", str(tiny_oc), "--task", "zeroshot", "-d", str(images), "--device", "cpu",
                           "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["model"] == f"open_clip:{tiny_oc}"
    res = cli.invoke(app, ["compare", "-m", str(tiny_oc), "-m", f"{tiny_clip_ckpt}?max_batch=8", "-d", str(images),
                           "-o", str(tmp_path / "cmp"), "--device", "cpu", "--passes", "1", "--in-process", "--json"])
    assert res.exit_code == 0, res.output
    specs = [m["spec"] for m in json.loads(res.stdout)["models"]]
    assert specs == [f"open_clip:{tiny_oc}", f"clip:{tiny_clip_ckpt}?max_batch=8"]


def test_a_folder_without_a_config_is_a_usage_error(cli, images: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    res = cli.invoke(app, ["embed", "-m", str(tmp_path / "empty"), "-i", str(images), "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and "no config.json, so the kind cannot be found" in res.output
    assert not (tmp_path / "o").exists()
    res = cli.invoke(app, ["eval", "-m", f"clp:{tmp_path / 'empty'}", "--task", "zeroshot", "-d", str(images)])
    assert res.exit_code == 1 and "unknown kind 'clp'" in res.output  # a mistyped kind is named as one


def test_embed_text_with_an_image_only_model_names_the_kinds_with_text(cli, tmp_path: Path) -> None:
    from phiclip.encoders.registry import KINDS, needs_text_message, text_kinds
    from phiclip.testing import build_tiny_dinov2

    assert "open_clip" in text_kinds() and "clip" in text_kinds() and "aimv2 (LiT checkpoints)" in text_kinds()
    assert not {"phi3v", "dinov2", "dinov3"} & set(text_kinds())
    assert len(text_kinds()) == sum(k.text for k in KINDS.values())
    dino = build_tiny_dinov2(tmp_path / "dino")
    (tmp_path / "t.txt").write_text("a cat\n")
    res = cli.invoke(app, ["embed-text", "-m", str(dino), "-i", str(tmp_path / "t.txt"), "-o", str(tmp_path / "o")])
    assert res.exit_code == 1, res.output
    assert needs_text_message(f"dinov2:{dino}").split("; ")[1] in " ".join(res.output.split())
