"""The files of a comparison exist, their numbers follow from the embeddings, and the HTML shows
exactly the numbers of report.json."""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console

from phiclip.comparison.report import format_number, render_html, terminal_tables
from phiclip.comparison.results import load_report
from phiclip.comparison.structure import knn_overlap, linear_cka
from phiclip.pipeline.step import encode_images

from .conftest import CompareRun


def _lookup(report: dict[str, Any], key: str) -> Any:
    cur: Any = report
    for part in key.split("."):
        cur = cur[int(part)] if isinstance(cur, list) else cur[part]
    return cur


class _Numbers(HTMLParser):
    """Collects <span class="num"> (key, value, shown text) and drawn bars (key, value, attributes)."""

    def __init__(self) -> None:
        super().__init__()
        self.spans: list[tuple[str, str, str]] = []
        self.bars: list[dict[str, str]] = []
        self._open: list[Any] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        classes = a.get("class", "").split()
        if tag == "span" and "num" in classes:
            self._open.append([a["data-key"], a["data-value"], ""])
        elif tag == "rect" and "bar" in classes:
            self.bars.append(a)
        elif tag == "span" and self._open:
            self._open.append(None)

    def handle_data(self, data: str) -> None:
        if self._open and self._open[-1] is not None:
            self._open[-1][2] += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "span" and self._open:
            item = self._open.pop()
            if item is not None:
                self.spans.append(tuple(item))


def _parse_shown(text: str) -> float | None:
    """'39.9 images/s' -> 39.9, '1.23 M' -> 1230000, '12,345' -> 12345, '–' -> None."""
    text = text.strip()
    if text == "–":
        return None
    m = re.match(r"^(-?[\d,]*\.?\d+)(?:\s*([MB])\b)?", text)
    assert m, f"not a number: {text!r}"
    value = float(m.group(1).replace(",", ""))
    return value * {"M": 1e6, "B": 1e9}.get(m.group(2) or "", 1.0)


@pytest.fixture(scope="module")
def report_dict(compare_run: CompareRun) -> dict[str, Any]:
    return load_report(compare_run.output)


@pytest.fixture(scope="module")
def page(compare_run: CompareRun) -> str:
    return (compare_run.output / "report.html").read_text(encoding="utf-8")


def test_files_exist(compare_run: CompareRun) -> None:
    out = compare_run.output
    for name in ("report.json", "report.html", "embeddings/A.npy", "embeddings/B.npy"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.tmp"))


def test_report_json_matches_the_returned_report(compare_run: CompareRun, report_dict: dict[str, Any]) -> None:
    assert report_dict == json.loads(compare_run.report.to_json())
    assert [m["spec"] for m in report_dict["models"]] == compare_run.specs
    assert [m["key"] for m in report_dict["models"]] == ["A", "B"]


def test_data_summary(report_dict: dict[str, Any]) -> None:
    data = report_dict["data"]
    assert data["images"] == 24 == len(report_dict["images"])
    assert data["classnames"] == ["blue", "green", "red", "yellow"]
    assert data["has_labels"] and data["has_captions"] and data["skipped"] == []
    first = report_dict["images"][0]
    assert first["caption"].startswith("a ") and first["label"] in data["classnames"]
    assert {(im["width"], im["height"]) for im in report_dict["images"]} == {(160, 120), (120, 160), (192, 108), (128, 128)}


def test_cost_numbers(report_dict: dict[str, Any]) -> None:
    for m in report_dict["models"]:
        c = m["cost"]
        assert c["dim"] == 16 and c["images"] == 24 and c["crops"] == 24  # CLIP: one crop per image
        assert c["load_s"] > 0 and c["encode_s"] > 0 and c["preprocess_s"] > 0
        # three timed passes: the speed is the median pass, with the slowest and fastest beside it
        assert c["passes"] == 3 and c["encode_s"] == pytest.approx(float(np.median(c["encode_s_passes"])))
        assert c["images_per_s_min"] == pytest.approx(24 / max(c["encode_s_passes"]))
        assert c["images_per_s_max"] == pytest.approx(24 / min(c["encode_s_passes"]))
        assert c["images_per_s"] == pytest.approx(24 / c["encode_s"])
        assert c["crops_per_s"] == pytest.approx(c["images_per_s"])
        assert c["end_to_end_images_per_s"] < c["images_per_s"]
        assert c["memory_scope"] == "subprocess"
        assert c["peak_rss_mb"] >= c["baseline_rss_mb"] > 50  # python + torch are resident
        assert c["gpu_peak_mb"] is None  # CPU
        assert c["parameters"] > 10_000 and c["device"] == "cpu" and c["dtype"] == "float32"
        assert c["text_encode_s"] > 0
        sizes = {(t["width"], t["height"]): t for t in c["tokens_by_size"]}
        assert len(sizes) == 4 and sum(t["images"] for t in sizes.values()) == 24
        assert all(t["crops"] == 1 and t["tokens"] is None for t in sizes.values())


def test_embeddings_are_the_encoders_vectors(compare_run: CompareRun, report_dict: dict[str, Any]) -> None:
    from phiclip import load_encoder

    sources = [im["source"] for im in report_dict["images"]]
    for m in report_dict["models"]:
        saved = np.load(compare_run.output / "embeddings" / f"{m['key']}.npy")
        direct = encode_images(load_encoder(m["spec"], device="cpu"), sources, batch_size=8)
        assert saved.shape == (24, 16)
        np.testing.assert_allclose(saved, direct, rtol=1e-4, atol=1e-5)


def test_structure_numbers_follow_from_the_embeddings(compare_run: CompareRun, report_dict: dict[str, Any]) -> None:
    a = np.load(compare_run.output / "embeddings" / "A.npy")
    b = np.load(compare_run.output / "embeddings" / "B.npy")
    (pair,) = report_dict["pairs"]
    assert (pair["a"], pair["b"], pair["k"]) == (0, 1, 5)
    assert pair["linear_cka"] == pytest.approx(linear_cka(a, b), abs=1e-9)
    ov = knn_overlap(a, b, 5)
    assert pair["knn_overlap_mean"] == pytest.approx(ov.mean)
    assert pair["knn_overlap_per_image"] == pytest.approx(ov.per_image.tolist())
    assert pair["knn_overlap_chance"] == pytest.approx(5 / 23)
    assert sum(pair["knn_overlap_counts"]) == 24 and len(pair["knn_overlap_counts"]) == 6
    for m in report_dict["models"]:
        s = m["similarity"]
        assert sum(s["all"]) == 24 * 23 // 2 == sum(s["same"]) + sum(s["different"])
        assert sum(s["same"]) == 4 * 6 * 5 // 2  # 4 classes of 6 images
        assert len(s["edges"]) == len(s["all"]) + 1
        p = m["projection"]
        assert len(p["points"]) == 24 and p["indices"] == list(range(24))
        assert len(m["neighbours"]) == len(report_dict["queries"])
        assert all(len(row) == 5 and q not in row for q, row in zip(report_dict["queries"], m["neighbours"]))
    # One query per class, first of each class.
    labels = [report_dict["images"][q]["label"] for q in report_dict["queries"]]
    assert sorted(labels[:4]) == ["blue", "green", "red", "yellow"]


def test_quality_numbers(compare_run: CompareRun, report_dict: dict[str, Any]) -> None:
    from phiclip import evaluate

    labels = np.array([report_dict["data"]["classnames"].index(im["label"]) for im in report_dict["images"]])
    fraction = report_dict["settings"]["test_fraction"]
    assert fraction == evaluate.DEFAULT_TEST_FRACTION and report_dict["settings"]["k"] == 5
    train, test = evaluate.stratified_split(labels, fraction, 0)
    for m in report_dict["models"]:
        q = m["quality"]["metrics"]
        expected = {"knn_accuracy", "linear_probe_accuracy", "zero_shot_top1", "clustering_v_measure"}
        expected |= {f"{d}_recall@{k}" for d in ("text_to_image", "image_to_text") for k in (1, 5, 10)}
        # 4 classes: the true one is always in the top 5, so top-5 accuracy is left out, with the reason.
        assert set(q) == expected and set(m["quality"]["skipped"]) == {"zero_shot_top5"}
        assert "only 4 classes" in m["quality"]["skipped"]["zero_shot_top5"]
        assert all(0.0 <= v <= 1.0 for v in q.values())
        x = np.load(compare_run.output / "embeddings" / f"{m['key']}.npy")
        knn = evaluate.knn_classify(x[train], labels[train], x[test], labels[test], k=5)
        assert q["knn_accuracy"] == pytest.approx(knn["acc1"])
        # every number says its protocol, split and n
        protocols = m["quality"]["protocols"]
        assert set(protocols) == set(q)
        knn_p = protocols["knn_accuracy"]
        assert knn_p["name"] == "knn" and "k=5" in knn_p["description"] and knn_p["settings"]["k"] == 5
        assert knn_p["split"] == "stratified 70%/30%, seed 0" and knn_p["n"] == {"train": len(train), "test": len(test)}
        assert protocols["clustering_v_measure"]["n"] == {"test": 24}
        assert protocols["text_to_image_recall@1"]["n"] == {"images": 24, "texts": 24}
        assert "split: stratified 70%/30%" in (compare_run.output / "report.html").read_text()


def test_alignment_of_every_pair_is_phiclip_aligns(compare_run: CompareRun, report_dict: dict[str, Any]) -> None:
    from phiclip.collection import alignment, vector_set

    (pair,) = report_dict["pairs"]
    a = np.load(compare_run.output / "embeddings" / "A.npy")
    b = np.load(compare_run.output / "embeddings" / "B.npy")
    ids = [str(i) for i in range(len(a))]
    ref = alignment(vector_set(ids, a), vector_set(ids, b), k=pair["k"]).scores
    assert set(pair["alignment"]) == set(ref)
    for name, value in ref.items():
        assert pair["alignment"][name] == pytest.approx(value, abs=1e-9), name
    assert pair["alignment"]["mutual_knn"] == pytest.approx(pair["knn_overlap_mean"])
    page = (compare_run.output / "report.html").read_text()
    assert 'id="alignment-0-1"' in page and "CKNNA" in page


def test_the_report_links_a_map_per_model(compare_run: CompareRun, report_dict: dict[str, Any]) -> None:
    page = (compare_run.output / "report.html").read_text()
    for m in report_dict["models"]:
        info = report_dict["maps"][m["key"]]
        assert info["method"] in ("pca", "umap") and info["description"]
        assert f'href="{info["file"]}"' in page
        map_html = (compare_run.output / info["file"]).read_text()
        assert 'data-points="24"' in map_html and "coloured by label" in map_html


def test_every_number_in_the_page_is_in_report_json(page: str, report_dict: dict[str, Any]) -> None:
    parser = _Numbers()
    parser.feed(page)
    assert len(parser.spans) > 60
    for key, value, shown in parser.spans:
        truth = _lookup(report_dict, key)
        if value == "null":
            assert truth is None and shown == "–", key
            continue
        assert float(value) == truth, key  # the exact number
        parsed = _parse_shown(shown)
        assert parsed is not None and math.isclose(parsed, truth, rel_tol=0.005, abs_tol=0.0005), (key, shown, truth)
    for bar in parser.bars:
        assert float(bar["data-value"]) == _lookup(report_dict, bar["data-key"]), bar["data-key"]


def test_the_page_shows_the_headline_numbers(page: str, report_dict: dict[str, Any]) -> None:
    parser = _Numbers()
    parser.feed(page)
    keys = {k for k, _, _ in parser.spans}
    for i, m in enumerate(report_dict["models"]):
        for field in ("images_per_s", "crops_per_s", "load_s", "peak_rss_mb", "parameters", "dim", "encode_s"):
            assert f"models.{i}.cost.{field}" in keys
        for name in m["quality"]["metrics"]:
            assert f"models.{i}.quality.metrics.{name}" in keys
        for j in range(len(m["cost"]["tokens_by_size"])):
            assert f"models.{i}.cost.tokens_by_size.{j}.crops" in keys
    for field in ("linear_cka", "knn_overlap_mean", "knn_overlap_chance"):
        assert f"pairs.0.{field}" in keys


def test_bar_lengths_follow_the_numbers(page: str, report_dict: dict[str, Any]) -> None:
    parser = _Numbers()
    parser.feed(page)
    bars = {b["data-key"]: b for b in parser.bars}
    a, b = (bars[f"models.{i}.cost.images_per_s"] for i in (0, 1))
    va, vb = (report_dict["models"][i]["cost"]["images_per_s"] for i in (0, 1))
    assert float(a["width"]) / float(b["width"]) == pytest.approx(va / vb, rel=0.02)
    qa = bars["models.0.quality.metrics.knn_accuracy"]
    assert float(qa["height"]) == pytest.approx(180 * report_dict["models"][0]["quality"]["metrics"]["knn_accuracy"], abs=0.1)


def test_page_is_self_contained(page: str) -> None:
    assert "<script" not in page.lower() and "<link" not in page.lower() and "@import" not in page
    assert "url(" not in page
    assert re.findall(r"https?://", page.replace('xmlns="http://www.w3.org/2000/svg"', "")) == []
    srcs = re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/") for s in srcs)
    for chart_id in ("chart-cost-images_per_s", "chart-quality", "chart-similarity-A", "chart-similarity-B",
                     "chart-overlap-0-1", "chart-projection-A", "chart-projection-B", "neighbour-grid", "summary"):
        assert f'id="{chart_id}"' in page, chart_id
    assert page.count('class="pt"') == 2 * 24


def test_summary_and_terminal_tables(report_dict: dict[str, Any], page: str) -> None:
    console = Console(record=True, width=160)
    for t in terminal_tables(report_dict):
        console.print(t)
    text = console.export_text()
    pair = report_dict["pairs"][0]
    assert format_number(pair["linear_cka"], kind="fraction") in text
    assert format_number(report_dict["models"][1]["quality"]["metrics"]["knn_accuracy"], kind="fraction") in text
    assert format_number(report_dict["models"][0]["cost"]["images_per_s"]) in text
    # The summary in the page names the models and the CKA.
    summary = re.search(r'<p class="summary" id="summary">(.*?)</p>', page).group(1)
    assert "24 images" in summary and format_number(pair["linear_cka"], kind="fraction") in summary


def test_render_again_from_report_json(compare_run: CompareRun, report_dict: dict[str, Any], tmp_path: Path) -> None:
    again = render_html(report_dict)  # no thumbnails: the grid still renders, with labels
    assert 'id="neighbour-grid"' in again and 'alt="(no thumbnail)"' in again
    page = (compare_run.output / "report.html").read_text(encoding="utf-8")
    # Apart from the thumbnails, the page is a function of report.json.
    strip = re.compile(r'<img [^>]*>')
    assert strip.sub("", again) == strip.sub("", page)


def _with_speeds(report: dict[str, Any], speeds: list[tuple[float, float, float, float]]) -> dict[str, Any]:
    """A copy of the report whose models ran at (median encode_s, images/s, slowest, fastest)."""
    r = copy.deepcopy(report)
    for m, (encode_s, rate, lo, hi) in zip(r["models"], speeds):
        m["cost"].update(encode_s=encode_s, images_per_s=rate, images_per_s_min=lo, images_per_s_max=hi, passes=3)
    return r


def test_speeds_are_compared_only_beyond_the_noise(report_dict: dict[str, Any]) -> None:
    from phiclip.comparison.report import summary_sentence
    from phiclip.comparison.results import Cost
    from phiclip.comparison.runner import timing_warnings

    short = summary_sentence(_with_speeds(report_dict, [(0.02, 1200.0, 900.0, 1300.0), (0.03, 800.0, 700.0, 850.0)]))
    assert "cannot be compared" in short and "faster" not in short
    same = summary_sentence(_with_speeds(report_dict, [(2.0, 12.0, 10.0, 14.0), (2.2, 11.0, 9.0, 12.5)]))
    assert "about the same speed" in same and "faster" not in same
    apart = summary_sentence(_with_speeds(report_dict, [(1.5, 16.0, 15.5, 16.4), (3.0, 8.0, 7.8, 8.2)]))
    assert "A is 2.0× faster than B." in apart and "(15.5–16.4 over 3 passes)" in apart
    cost = Cost(**{**report_dict["models"][0]["cost"], "tokens_by_size": []})
    assert timing_warnings(["A"], [replace(cost, encode_s=0.01)])[0].startswith("The timed section is too short")
    assert timing_warnings(["A"], [replace(cost, encode_s=1.5)]) == []


def test_the_tiny_models_run_warns_that_speeds_mean_little(report_dict: dict[str, Any], page: str) -> None:
    assert report_dict["warnings"] and "too short" in report_dict["warnings"][0]
    assert 'id="warnings"' in page and "cannot be compared" in page


def test_long_labels_in_the_neighbour_grid_end_in_an_ellipsis(report_dict: dict[str, Any]) -> None:
    r = copy.deepcopy(report_dict)
    long = "a_remarkably_long_class_name_without_any_spaces_at_all"
    for im in r["images"]:
        im["label"] = long if im["label"] == "red" else im["label"]
    page = render_html(r)
    assert f'<span class="lbl" title="{long}">{long}</span>' in page
    assert re.search(r"\.thumb \.lbl \{[^}]*text-overflow: ellipsis", page)
    assert re.search(r"\.thumb \.lbl \{[^}]*white-space: nowrap", page)
