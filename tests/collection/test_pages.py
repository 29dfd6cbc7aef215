"""collection.pages: the duplicates, clusters and map pages hold what they should, escape hostile text,
reference nothing outside themselves, and embed every point of the map."""

from __future__ import annotations

import base64
import html
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from phiclip.collection import find_duplicates, kmeans, label_scores, layout_2d
from phiclip.collection.dedup import DuplicateReport
from phiclip.collection.pages import (
    MAP_PALETTE,
    OTHER_COLOUR,
    clusters_page,
    duplicates_page,
    map_page,
    placeholder_uri,
    thumbnail_uri,
    write_page,
)
from phiclip.images import load_image

HOSTILE = '</script><script>alert("x")</script>&<b>'


@dataclass
class Items:
    ids: list[str]
    sources: list[str]
    vectors: np.ndarray
    labels: list[str]


@pytest.fixture(scope="module")
def items(tmp_path_factory: pytest.TempPathFactory) -> Items:
    """60 items with images on disk: a group of 4 near duplicates (one the hostile id), a pair, one
    item whose file is missing; labels in three classes (one of them hostile text)."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    n = 60
    ids = [f"img-{i:03d}" for i in range(n)]
    ids[3] = HOSTILE
    x = rng.standard_normal((n, 24)).astype(np.float32)
    for j in (1, 2, 3):
        x[j] = x[0] + 0.02 * rng.standard_normal(24)
    x[11] = x[10] + 0.02 * rng.standard_normal(24)
    sources = []
    for i in range(n):
        path = folder / f"{i}.png"
        if i != 10:  # item 10's file does not exist: placeholder
            colour = tuple(int(v) for v in rng.integers(0, 255, 3))
            Image.new("RGB", (80 + i, 50), colour).save(path)
        sources.append(str(path))
    labels = [("cat", "dog", "<i>fish</i>")[i % 3] for i in range(n)]
    return Items(ids, sources, x, labels)


def _no_external_references(page: str) -> None:
    assert "http://" not in page and "https://" not in page and "//cdn" not in page
    for src in re.findall(r'\bsrc="([^"]*)"', page):
        assert src.startswith("data:image/"), src[:60]
    assert "Content-Security-Policy" in page and "default-src 'none'" in page


def _img_sources(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]*)"', page)


def test_thumbnail_uri(items: Items, tmp_path: Path) -> None:
    uri = thumbnail_uri(items.sources[5], 32)
    assert uri is not None and uri.startswith("data:image/jpeg;base64,")
    img = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert img.format == "JPEG" and max(img.size) == 32  # 85 x 50 shrunk to 32 on the long side
    assert thumbnail_uri(items.sources[10]) is None  # missing file
    assert thumbnail_uri("https://example.org/a.jpg") is None
    assert thumbnail_uri("") is None and thumbnail_uri(None) is None
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    assert thumbnail_uri(str(bad)) is None
    grey = Image.open(io.BytesIO(base64.b64decode(placeholder_uri(20).split(",", 1)[1])))
    assert grey.size == (20, 20) and np.ptp(np.asarray(grey)) < 8


def test_jpeg_thumbnail_decodes_small_and_keeps_the_orientation(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    pixels = rng.integers(100, 140, (1200, 1600, 3), dtype=np.uint8)
    pixels[:, :800] = (240, 20, 20)  # left half red
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = 6  # shown rotated 90° clockwise: the red half on top, portrait
    path = tmp_path / "photo.jpg"
    img.save(path, quality=92, exif=exif)
    uri = thumbnail_uri(str(path), 64)
    assert uri is not None
    thumb = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"))
    assert thumb.shape == (64, 48, 3)
    reference = load_image(str(path))  # the full decode, EXIF applied
    reference.thumbnail((64, 64))
    ref = np.asarray(reference).astype(np.int64)
    assert ref.shape == thumb.shape and np.abs(ref - thumb).mean() < 6
    assert thumb[5, 24, 0] > 200 and thumb[60, 24, 0] < 160


def test_duplicates_page(items: Items) -> None:
    report = find_duplicates(items.ids, items.vectors, threshold=0.95)
    assert report.n_groups == 2
    page = duplicates_page(report, dict(zip(items.ids, items.sources)))
    _no_external_references(page)
    counts = {
        label: value for value, label in re.findall(r'<div class="count"><b>([^<]*)</b>([^<]*)</div>', page)
    }
    assert counts == {
        "items": "60",
        "groups": "2",
        "exact groups": "0",
        "near groups": "2",
        "items in groups": "6",
        "to keep": "56",
        "duplicates beyond the representatives": "4",
    }
    assert 'id="nothing-deleted"' in page and "Nothing was deleted" in page
    # the largest group (4 items) comes first, then the pair
    sections = re.findall(
        r'<section class="group" data-group="(\d+)" data-kind="near">(.*?)</section>', page, re.S
    )
    assert len(sections) == 2
    assert sections[0][1].count("<figure") == 4 and sections[1][1].count("<figure") == 2
    for i in (0, 1, 2):
        assert f">{items.ids[i]}</span>" in sections[0][1]
    # the hostile id is escaped everywhere, never raw
    assert HOSTILE not in page and "<script>alert" not in page and "&<b>" not in page
    assert html.escape(HOSTILE, quote=True) in sections[0][1]
    # similarities to the representative are printed; the missing file shows the placeholder
    assert "representative" in sections[0][1] and re.search(r"similarity 0\.9\d{3}", sections[0][1])
    assert placeholder_uri(96) in sections[1][1]
    assert all(s.startswith("data:image/jpeg;base64,") for s in _img_sources(page))
    assert len(_img_sources(page)) == 6


def test_duplicates_page_limits_and_empty(items: Items) -> None:
    report = find_duplicates(items.ids, items.vectors, threshold=0.95)
    page = duplicates_page(report, max_groups=1, max_members=2)  # no sources: placeholders only
    assert page.count('<section class="group"') == 1 and "1 smaller groups are not shown" in page
    assert "and 2 more" in page and set(_img_sources(page)) == {placeholder_uri(96)}
    empty = duplicates_page(DuplicateReport([], ["a", "b", "c"], [("c", "OSError: <gone>")]))
    assert 'id="no-groups"' in empty and "&lt;gone&gt;" in empty and "<gone>" not in empty
    assert re.search(r"<b>3</b>items", empty) and re.search(r"<b>1</b>unreadable", empty)
    _no_external_references(empty)


def test_clusters_page(items: Items) -> None:
    result = kmeans(items.vectors, 4, seed=3)
    page = clusters_page(result, items.ids, sources=items.sources, labels=items.labels, per_cluster=3)
    _no_external_references(page)
    assert re.search(rf"<b>{len(items.ids)}</b>items", page) and re.search(r"<b>4</b>clusters", page)
    # one bar per cluster, heights proportional to the sizes, the largest first
    bars = re.findall(
        r'<rect class="bar" data-cluster="(\d+)" x="[\d.]+" y="[\d.]+" width="[\d.]+" '
        r'height="([\d.]+)"><title>cluster \d+: (\d+) items',
        page,
    )
    assert len(bars) == 4
    sizes = [int(s) for _, _, s in bars]
    assert sizes == sorted(sizes, reverse=True) == sorted(result.sizes.tolist(), reverse=True)
    heights = np.array([float(h) for _, h, _ in bars])
    np.testing.assert_allclose(heights / heights[0], np.array(sizes) / sizes[0], atol=0.01)
    # label scores equal label_scores
    s = label_scores(items.labels, result.assignment)
    table = re.search(r'<table class="scores" id="label-scores">(.*?)</table>', page, re.S)
    assert table is not None
    cells = re.findall(r"<td>([\d.]+)</td>", table.group(1))
    assert cells == [
        f"{s.homogeneity:.4f}",
        f"{s.completeness:.4f}",
        f"{s.v_measure:.4f}",
        f"{s.nmi:.4f}",
        "3",
    ]
    # each cluster: its representative first, then up to 2 more nearest the centroid
    for c in range(4):
        sec = re.search(rf'<section class="cluster" data-cluster="{c}">(.*?)</section>', page, re.S)
        assert sec is not None
        rep = int(result.representatives[c])
        first = re.search(r'<span class="id">(.*?)</span>', sec.group(1))
        assert first is not None and first.group(1) == html.escape(items.ids[rep], quote=True)
        assert sec.group(1).count("<figure") == min(3, int(result.sizes[c]))
    assert "<i>fish</i>" not in page and "&lt;i&gt;fish&lt;/i&gt;" in page
    assert HOSTILE not in page


def test_clusters_page_without_labels_and_errors(items: Items) -> None:
    result = kmeans(items.vectors, 3, seed=1)
    page = clusters_page(result, items.ids, max_clusters=2)
    assert 'id="label-scores"' not in page and page.count('<section class="cluster"') == 2
    assert "1 smaller clusters are not shown" in page
    with pytest.raises(ValueError, match="ids"):
        clusters_page(result, items.ids[:-1])
    with pytest.raises(ValueError, match="labels"):
        clusters_page(result, items.ids, labels=items.labels[:5])


def _payload(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="map-data">(.*?)</script>', page, re.S)
    assert m is not None
    assert "<" not in m.group(1) and ">" not in m.group(1)
    return json.loads(m.group(1))


def _decode(b64: str, dtype: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(b64), dtype=dtype)


def test_map_page_embeds_every_point(items: Items) -> None:
    lay = layout_2d(items.vectors, method="pca")
    page = map_page(lay, items.ids, sources=items.sources, labels=items.labels, colour_by="labels")
    _no_external_references(page)
    assert f"Layout: {html.escape(lay.description)}" in page
    data = _payload(page)
    assert data["ids"] == items.ids  # the hostile id round-trips exactly through the escaped JSON
    xy = _decode(data["xy"], "<f4").reshape(-1, 2)
    assert xy.shape == (60, 2) and xy.min() >= 0 and xy.max() <= 1
    # the same affine map on both axes: pairwise distances keep their ratios
    d_page = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
    d_true = np.linalg.norm(lay.coords[:, None] - lay.coords[None], axis=-1)
    np.testing.assert_allclose(d_page / d_page.max(), d_true / d_true.max(), atol=1e-5)
    # colours: three labels, the legend names them escaped, each point's category is its label
    assert sorted(data["names"]) == sorted(set(items.labels))
    cat = _decode(data["cat"], "<u4")
    assert [data["names"][c] for c in cat] == items.labels
    slot = _decode(data["slot"], "u1")
    assert len(set(slot.tolist())) == 3 and len(data["colours"]) == 3
    assert "&lt;i&gt;fish&lt;/i&gt; <span" in page
    # thumbnails: data URIs for every readable source (60 < cap), none for the missing file
    assert set(data["thumbs"]) == {str(i) for i in range(60) if i != 10}
    assert all(u.startswith("data:image/jpeg;base64,") for u in data["thumbs"].values())
    # the hostile id cannot close the script: exactly two script elements
    assert page.count("<script") == 2 and "<script>alert" not in page and "</script><script>" not in page


def test_map_page_caps_thumbnails_and_colours(items: Items) -> None:
    rng = np.random.default_rng(1)
    n = 500
    ids = [f"p{i}" for i in range(n)]
    clusters = np.arange(n) % 30  # 30 clusters: 19 colours and "other"
    coords = rng.standard_normal((n, 2))
    sources = [items.sources[i % 60] for i in range(n)]
    page = map_page(
        coords,
        ids,
        method="PCA (test)",
        sources=sources,
        clusters=clusters,
        colour_by="clusters",
        max_thumbnails=25,
        seed=4,
    )
    data = _payload(page)
    assert len(data["thumbs"]) <= 25 and len(data["thumbs"]) >= 20  # a few sampled sources are missing
    assert data["ids"] == ids and len(_decode(data["xy"], "<f4")) == 2 * n
    assert len(data["colours"]) == len(MAP_PALETTE) and data["colours"][0] == OTHER_COLOUR
    assert "other (11 clusters)" in page and "Layout: PCA (test)." in page
    slot = _decode(data["slot"], "u1")
    cat = _decode(data["cat"], "<u4")
    names = data["names"]
    for i in range(n):  # categories 19 and beyond share "other" (drawn first, slot 0)
        assert names[cat[i]] == f"cluster {clusters[i]}"
        assert (slot[i] == 0) == (cat[i] >= len(MAP_PALETTE) - 1)
    again = map_page(coords, ids, method="PCA (test)", sources=sources, max_thumbnails=25, seed=4)
    assert _payload(again)["thumbs"].keys() == data["thumbs"].keys()  # seeded sample
    plain = _payload(again)
    assert plain["names"] is None and plain["colours"] == ["#3b6ea8"] and "cat" not in plain


def test_map_page_errors(items: Items) -> None:
    xy = np.zeros((3, 2))
    with pytest.raises(ValueError, match="method="):
        map_page(xy, ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"\(n, 2\)"):
        map_page(xy, ["a", "b"], method="PCA")
    with pytest.raises(ValueError, match="needs labels"):
        map_page(xy, ["a", "b", "c"], method="PCA", colour_by="labels")
    with pytest.raises(ValueError, match="needs clusters"):
        map_page(xy, ["a", "b", "c"], method="PCA", colour_by="clusters")
    with pytest.raises(ValueError, match="NaN"):
        map_page(np.array([[0, 1], [np.nan, 0], [1, 1]]), ["a", "b", "c"], method="PCA")
    one = _payload(map_page(np.ones((1, 2)), ["only"], method="PCA"))  # a single point sits mid-square
    np.testing.assert_allclose(_decode(one["xy"], "<f4"), [0.5, 0.5])


def test_write_page(tmp_path: Path) -> None:
    page = map_page(np.eye(2), ["é", "b"], method="PCA")
    out = write_page(page, tmp_path / "deep" / "map.html")
    assert out == tmp_path / "deep" / "map.html" and out.read_text(encoding="utf-8") == page
    assert not list(out.parent.glob(".*.tmp"))
