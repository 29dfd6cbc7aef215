"""compare() on other kinds of data and settings, its errors, and the ``phiclip compare`` command."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from phiclip.cli import app
from phiclip.comparison import CompareError, compare
from phiclip.comparison.report import render_html
from phiclip.comparison.runner import choose_queries, short_names, spread_indices
from phiclip.inputs import LabelledData


def test_short_names() -> None:
    assert short_names(["clip:openai/clip-vit-base-patch32", "phi3v:/m/Phi-3-vision?num_crops=4"]) == [
        "clip-vit-base-patch32",
        "Phi-3-vision num_crops=4",
    ]
    assert short_names(["phi3v:/m/p?num_crops=4", "phi3v:/m/p?num_crops=16"]) == ["p num_crops=4", "p num_crops=16"]
    same = short_names(["clip:/a/m", "clip:/b/m"])
    assert len(set(same)) == 2


def test_spread_indices_and_queries() -> None:
    assert spread_indices(10, 20).tolist() == list(range(10))
    assert spread_indices(9, 3).tolist() == [0, 4, 8]
    labels = np.array([0, 0, 0, 1, 1, 2])
    assert choose_queries(labels, 6, 4) == [0, 3, 5, 1]  # one per class, then the second of each
    assert choose_queries(labels, 6, 10) == [0, 3, 5, 1, 4, 2]
    assert choose_queries(None, 9, 3) == [0, 4, 8]


def test_same_model_twice_gives_identical_spaces(tiny_clip_specs: list[str], sample_dir: Path) -> None:
    a, b = tiny_clip_specs
    report = compare([a, b, a], sample_dir, None, k=4, isolate=False)
    assert [m.key for m in report.models] == ["A", "B", "C"]
    assert [(p.a, p.b) for p in report.pairs] == [(0, 1), (0, 2), (1, 2)]
    same = report.pairs[1]  # A vs C: one model, run twice
    assert same.linear_cka == pytest.approx(1.0, abs=1e-6)
    assert same.knn_overlap_mean == 1.0 and same.knn_overlap_counts == [0, 0, 0, 0, 24]
    assert report.pairs[0].linear_cka < 0.999  # different seeds, different spaces
    # A folder per class has labels but no captions: retrieval is skipped, with the reason.
    for m in report.models:
        assert m.cost.memory_scope == "in-process"
        assert m.quality.skipped == {
            "retrieval": "the data has no captions",
            "zero_shot_top5": "only 4 classes: the true class is always among the top 5, so top-5 accuracy would be 1",
        }
        assert "zero_shot_top1" in m.quality.metrics and "knn_accuracy" in m.quality.metrics
        assert "zero_shot_top5" not in m.quality.metrics
    assert report.data.has_labels and not report.data.has_captions


def test_unlabelled_images(tiny_clip_specs: list[str], sample_dir: Path, tmp_path: Path) -> None:
    paths = sorted(str(p) for p in sample_dir.rglob("*.png"))[:10]
    data = LabelledData(images=paths, source="ten files")
    report = compare(tiny_clip_specs, data, tmp_path / "out", k=3, queries=3, isolate=False)
    for m in report.models:
        assert m.quality.metrics == {}
        assert set(m.quality.skipped) == {"knn", "linear_probe", "zero_shot", "clustering", "retrieval"}
        assert m.similarity.same is None and m.similarity.same_mean is None
    assert report.queries == [0, 4, 9]
    assert all(im.label is None for im in report.images)
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert "No quality metric could be computed" in page and 'id="projection-legend"' not in page
    assert page.count('class="pt"') == 20


def test_images_passed_in_memory(tiny_clip_specs: list[str], sample_dir: Path) -> None:
    from PIL import Image

    paths = sorted(sample_dir.rglob("*.png"))[:6]
    pil = [Image.open(p).convert("RGB") for p in paths[:3]]
    raw = [p.read_bytes() for p in paths[3:]]
    data = LabelledData(images=pil + raw, labels=np.array([0, 0, 0, 1, 1, 1]), classnames=["x", "y"], source="memory")
    report = compare(tiny_clip_specs, data, None, k=2, isolate=False)
    assert report.data.images == 6
    assert report.images[0].source == "memory#0"


def test_unreadable_image_is_listed_not_lost(tiny_clip_specs: list[str], sample_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "shapes"
    shutil.copytree(sample_dir, data)
    (data / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    report = compare(tiny_clip_specs, data, None, k=3, max_images=None, isolate=False)
    assert report.data.images == 24
    (skipped,) = report.data.skipped
    assert skipped["source"].endswith("broken.png") and "not a readable image" in skipped["reason"]
    assert "broken.png" in render_html(report)


def test_max_images_spreads_over_the_classes(tiny_clip_specs: list[str], sample_dir: Path) -> None:
    report = compare(tiny_clip_specs, sample_dir / "labels.csv", None, k=3, max_images=8, isolate=False)
    assert report.data.images == 8
    assert {im.label for im in report.images} == {"blue", "green", "red", "yellow"}


@pytest.mark.parametrize(
    ("models", "kwargs", "message"),
    [
        (["clip:/x"], {}, "at least two models"),
        (["clip:/x", "bogus:/y"], {}, "unknown kind 'bogus'"),
        (None, {"k": 24}, "k=24 neighbours needs more than 24 images"),
        (None, {"max_images": 1}, "max_images must be at least 2"),
    ],
)
def test_bad_arguments(tiny_clip_specs: list[str], sample_dir: Path, models, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        compare(models or tiny_clip_specs, sample_dir, None, isolate=False, **kwargs)


def test_missing_data_names_it(tiny_clip_specs: list[str], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nowhere"):
        compare(tiny_clip_specs, tmp_path / "nowhere", None, isolate=False)


def test_missing_model_in_a_subprocess_names_it(tiny_clip_specs: list[str], sample_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(CompareError, match=r"model A: .*no-such-model") as info:
        compare([f"clip:{missing}", tiny_clip_specs[0]], sample_dir, None, k=3)
    assert "Traceback" not in str(info.value)


def test_cli_compare(tiny_clip_specs: list[str], sample_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli-report"
    args = ["compare", "--model", tiny_clip_specs[0], "--model", tiny_clip_specs[1], "--data", str(sample_dir / "labels.csv"),
            "--output", str(out), "--k", "3", "--max-images", "12", "--in-process", "--template", "a {c} shape"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Linear CKA" in result.output and "report.html" in result.output
    assert (out / "report.html").is_file() and (out / "report.json").is_file()
    import json

    saved = json.loads((out / "report.json").read_text())
    assert saved["settings"]["templates"] == ["a {c} shape"] and saved["data"]["images"] == 12


def test_cli_compare_errors_are_one_line(tiny_clip_specs: list[str], sample_dir: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["compare", "--model", tiny_clip_specs[0], "--data", str(sample_dir), "--output", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "at least two models" in result.output and "Traceback" not in result.output


def test_clip_against_phi3v(tiny_clip_specs: list[str], sample_dir: Path, tmp_path: Path) -> None:
    """Different kinds and widths: crops and tokens per image size come from Phi-3-vision's HD
    transform; the image-only encoder's text metrics are skipped with the reason."""
    from phiclip.phi3v.processing import hd_size, num_crops_for_hd_size, num_image_tokens
    from phiclip.testing import build_tiny_phi3v

    phi = f"phi3v:{build_tiny_phi3v(tmp_path / 'phi3v')}?num_crops=4"
    report = compare([tiny_clip_specs[0], phi], sample_dir / "labels.csv", tmp_path / "out", k=3, max_images=8, isolate=False)
    clip, p3 = report.models
    assert (clip.cost.dim, p3.cost.dim) == (16, 64)
    assert p3.name.endswith("num_crops=4")
    for t in p3.cost.tokens_by_size:
        assert t.crops == num_crops_for_hd_size(*hd_size(t.width, t.height, 4))
        assert t.tokens == num_image_tokens(t.width, t.height, 4)
    assert p3.cost.crops == sum(t.crops * t.images for t in p3.cost.tokens_by_size) > p3.cost.images == 8
    assert p3.cost.crops_per_s == pytest.approx(p3.cost.images_per_s * p3.cost.crops / 8)
    assert set(p3.quality.skipped) == {"zero_shot", "retrieval"}
    assert "no text side" in p3.quality.skipped["zero_shot"]
    assert "zero_shot_top1" in clip.quality.metrics and "knn_accuracy" in p3.quality.metrics
    assert 0.0 <= report.pairs[0].linear_cka <= 1.0
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert 'id="tokens-table"' in page and f'data-value="{p3.cost.tokens_by_size[0].tokens!r}"' in page


def test_cli_compare_leaves_out_a_bomb_and_an_empty_file_and_says_so(
    tiny_clip_specs: list[str], sample_dir: Path, tmp_path: Path
) -> None:
    import json

    from _bad_images import add_bomb_and_empty

    data = tmp_path / "shapes"
    shutil.copytree(sample_dir, data)
    bomb, empty = add_bomb_and_empty(data / "blue")
    out = tmp_path / "report"
    args = ["compare", "--model", tiny_clip_specs[0], "--model", tiny_clip_specs[1], "--data", str(data),
            "--output", str(out), "--k", "3", "--in-process", "--passes", "2"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "2 image(s) left out" in result.stdout and "bomb.png" in result.stdout and "empty.png" in result.stdout
    saved = json.loads((out / "report.json").read_text())
    left = {s["source"]: s for s in saved["data"]["skipped"]}
    assert set(left) == {str(bomb), str(empty)} and saved["data"]["images"] == 24
    assert "pixel limit" in left[str(bomb)]["reason"] and "0 bytes" in left[str(empty)]["reason"]
    assert all(m["cost"]["passes"] == 2 and len(m["cost"]["encode_s_passes"]) == 2 for m in saved["models"])
    assert "bomb.png" in (out / "report.html").read_text(encoding="utf-8")


def test_an_image_one_model_refuses_is_left_out_of_every_space() -> None:
    from phiclip.comparison.measure import Measured
    from phiclip.comparison.runner import common_images

    def measured(kept: list[int], failed: list[tuple[int, str, str]]) -> Measured:
        return Measured(np.zeros((len(kept), 2), np.float32), kept, [(10 + i, 5) for i in kept], failed, None, None,
                        None, {})  # type: ignore[arg-type]

    ds = LabelledData(images=[f"/i/{i}.png" for i in range(4)])
    a = measured([0, 1, 3], [(2, "decode", "not a readable image")])
    b = measured([0, 3], [(1, "preprocess", "HD canvas over the pixel limit"), (2, "decode", "not a readable image")])
    rows, sizes, left = common_images(ds, [a, b], ["A", "B"])
    assert rows == [0, 3] and sizes == [(10, 5), (13, 5)]
    assert left == [
        {"source": "/i/1.png", "stage": "preprocess", "reason": "model B: HD canvas over the pixel limit"},
        {"source": "/i/2.png", "stage": "decode", "reason": "not a readable image"},
    ]


def test_class_names_become_words_in_the_prompts(tmp_path: Path) -> None:
    from phiclip.comparison.runner import CompareOptions, plan_jobs

    ds = LabelledData(images=["/a.png", "/b.png"], labels=np.array([0, 1]), classnames=["dark-blue_circle", "red_square"])
    (job, _) = plan_jobs(["clip:/x", "clip:/y"], ds, CompareOptions(), tmp_path)
    assert job.classnames == ["dark blue circle", "red square"]


def test_crops_come_from_item_crops_not_the_batching_cost() -> None:
    """An encoder that batches by prompt tokens (phi3v-lm) reports its tower crops, not its tokens."""
    from phiclip.comparison.measure import crops_of_sizes

    class TokenBatched:
        def preprocess(self, image):
            return image.size

        def item_cost(self, item):
            return 700  # prompt tokens

        def item_crops(self, item):
            return 1 + (item[0] > 100)

    assert crops_of_sizes(TokenBatched(), [(64, 64), (200, 50), (64, 64)]) == [1, 2, 1]


def test_an_image_only_family_side_by_side_with_clip(tiny_clip_specs: list[str], sample_dir: Path,
                                                      tmp_path: Path) -> None:
    """compare takes every kind of the kind table: a DINOv2 (image only; no zero-shot, said) beside a CLIP, the
    DINOv2 given without its kind (found from config.json)."""
    from phiclip.testing import build_tiny_dinov2

    dino = build_tiny_dinov2(tmp_path / "dinov2")
    report = compare([tiny_clip_specs[0], str(dino)], sample_dir, tmp_path / "out", k=3, isolate=False)
    assert len(report.models) == 2 and len(report.pairs) == 1
    assert (tmp_path / "out" / "report.html").is_file()
    text = (tmp_path / "out" / "report.json").read_text()
    assert "dinov2" in text
