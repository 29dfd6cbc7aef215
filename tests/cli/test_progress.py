"""Progress of ``eval`` (a bar over the images, then each step of the task) and ``compare`` (each model's
stages, also from the measuring subprocess, as they start)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from _embdir import ColourEncoder
from PIL import Image

from phiclip.comparison.runner import compare
from phiclip.evaluate import embed_data, evaluate
from phiclip.inputs import load_data
from phiclip.testing import make_sample_images


def _colour_folder(root: Path) -> Path:
    for label, rgb in {"red": (250, 5, 5), "green": (5, 250, 5)}.items():
        (root / label).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (6, 6), tuple(min(255, c + 3 * i) for c in rgb)).save(root / label / f"{i}.png")
    return root


def test_eval_progress_shows_a_bar_then_the_steps(tmp_path: Path, capsys) -> None:
    data = _colour_folder(tmp_path / "data")
    quiet = evaluate(ColourEncoder(), "knn", data, k=1, batch_size=2)
    assert capsys.readouterr().err == ""
    loud = evaluate(ColourEncoder(), "knn", data, k=1, batch_size=2, progress=True)
    err = capsys.readouterr().err
    assert "eval knn: embedding 6 training images" in err and "eval knn: embedding 4 test images" in err
    assert "eval knn: kNN vote" in err and "6/6" in err and "4/4" in err  # the bars over the images
    assert loud["metrics"] == quiet["metrics"]


def test_embed_data_in_chunks_is_the_same_as_at_once(tmp_path: Path) -> None:
    _colour_folder(tmp_path / "data")
    (tmp_path / "data" / "red" / "bad.png").write_bytes(b"not an image")
    ds = load_data(tmp_path / "data")
    once = embed_data(ColourEncoder(), ds, batch_size=1)
    chunked = embed_data(ColourEncoder(), ds, batch_size=1, progress=True)  # chunks of 4 images
    assert chunked.kept.tolist() == once.kept.tolist() and chunked.left_out == once.left_out
    np.testing.assert_array_equal(chunked.vectors, once.vectors)


def test_compare_reports_each_stage_of_each_model(tmp_path: Path, tiny_clip_ckpt: Path) -> None:
    make_sample_images(tmp_path / "imgs", per_class=1)
    lines: list[str] = []
    spec = f"clip:{tiny_clip_ckpt}"
    compare([spec, spec], tmp_path / "imgs", None, k=2, passes=2, device="cpu", progress=lines.append)
    for key in ("A", "B"):  # A measured in a subprocess, like B: its stages arrive while it runs
        mine = [ln for ln in lines if ln.startswith(f"model {key}")]
        text = "\n".join(mine)
        assert "loading the encoder" in text and "warm-up" in text, text
        assert "timed pass 1/2" in text and "timed pass 2/2" in text, text
        assert any("images/s" in ln for ln in mine)
