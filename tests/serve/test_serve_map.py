"""``GET /map``: the served collection's 2-D map, from a ``phiclip map`` output in ``OUT/map/`` when it
matches the collection, else a PCA computed by the server; the page is ``phiclip map``'s page with the
server's thumbnails and "more like this" links. (In a browser: ``test_serve_browser.py``.)"""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from starlette.testclient import TestClient

from phiclip.collection import read_vectors
from phiclip.collection.commands import map_collection
from phiclip.collection.layout import layout_2d
from phiclip.serve.maps import MAP_FILE, MAP_FOLDER, collection_map

from .conftest import Built, colour_loader, make_app, serve_options


def _copy(built: Built, tmp_path: Path) -> Path:
    out = tmp_path / "colours"
    shutil.copytree(built.path, out, ignore=shutil.ignore_patterns("index"))
    return out


def _map_data(page: str) -> dict[str, Any]:
    m = re.search(r'<script type="application/json" id="map-data">(.*?)</script>', page, re.S)
    assert m is not None
    return json.loads(m.group(1))


def _xy(data: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(data["xy"]), dtype="<f4").reshape(-1, 2)


def _unit(coords: np.ndarray) -> np.ndarray:
    """The straightforward version of the page's placement: one scale for both axes, centred in [0, 1]²."""
    c = np.asarray(coords, np.float64)
    lo, hi = c.min(axis=0), c.max(axis=0)
    span = (hi - lo).max()
    return (c - lo) / span + (1 - (hi - lo) / span) / 2


def _get_map(out: Path) -> tuple[Any, str]:
    app, _ = make_app([out], serve_options(), load=colour_loader())
    with TestClient(app) as client:
        resp = client.get("/map", params={"collection": out.name})
        again = client.get("/map")  # the default collection, the page kept from the first request
        assert again.status_code == 200 and again.content == resp.content
        return resp, resp.text


def test_map_computed_by_the_server(colour_collection: Built, tmp_path: Path) -> None:
    out = _copy(colour_collection, tmp_path)
    resp, page = _get_map(out)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    csp = resp.headers["content-security-policy"]
    assert "script-src 'sha256-" in csp and "unsafe-inline'" not in csp.split("script-src")[1].split(";")[0]
    assert "frame-ancestors 'self'" in csp and resp.headers["x-frame-options"] == "SAMEORIGIN"
    assert "computed by the server" in page and f"no {MAP_FOLDER}/{MAP_FILE}" in page and "PCA" in page
    data = _map_data(page)
    vs = read_vectors(out)
    assert data["ids"] == vs.ids
    expected = _unit(layout_2d(vs.vectors, method="pca", seed=0).coords)
    np.testing.assert_allclose(_xy(data), expected, atol=1e-6)
    # coloured by the collection's label column; hover thumbnails and clicks through the server
    assert sorted(data["names"]) == ["blue", "green", "red", "yellow"]
    assert data["thumb_url"] == f"api/items/{out.name}/{{id}}/thumbnail?size=128"
    assert data["link"] == f"./?collection={out.name}&like={{id}}"
    assert data["thumbs"] == {}


def test_map_read_from_a_phiclip_map_output(colour_collection: Built, tmp_path: Path) -> None:
    out = _copy(colour_collection, tmp_path)
    # a map whose rows are in another order than the collection's, with its own (fake) coordinates
    made = map_collection(out, out / MAP_FOLDER, method="pca")
    table = pq.read_table(out / MAP_FOLDER / MAP_FILE)
    rng = np.random.default_rng(3)
    order = rng.permutation(table.num_rows)
    coords = rng.uniform(-5, 5, (table.num_rows, 2)).astype(np.float32)
    table = pa.table({"id": table.column("id").take(order), "x": coords[:, 0], "y": coords[:, 1]},
                     metadata={b"phiclip.layout": b"UMAP (test layout)"})
    pq.write_table(table, out / MAP_FOLDER / MAP_FILE)
    assert made.layout.method == "pca"
    _, page = _get_map(out)
    assert "UMAP (test layout), from " in page and "computed by the server" not in page
    data = _map_data(page)
    by_id = dict(zip(table.column("id").to_pylist(), coords.tolist()))
    expected = _unit(np.array([by_id[i] for i in data["ids"]]))
    np.testing.assert_allclose(_xy(data), expected, atol=1e-6)
    assert data["ids"] == read_vectors(out).ids


def test_a_stale_map_file_is_not_shown(colour_collection: Built, tmp_path: Path) -> None:
    out = _copy(colour_collection, tmp_path)
    (out / MAP_FOLDER).mkdir()
    ids = read_vectors(out).ids[:-1] + ["gone"]
    pq.write_table(pa.table({"id": ids, "x": np.zeros(len(ids), np.float32), "y": np.ones(len(ids), np.float32)}),
                   out / MAP_FOLDER / MAP_FILE)
    _, page = _get_map(out)
    assert "is stale: 1 of the collection" in page and "computed by the server" in page


def test_a_large_collection_is_shown_as_a_stated_sample(colour_collection: Built, tmp_path: Path) -> None:
    from phiclip.serve.collections import open_collection

    coll = open_collection(_copy(colour_collection, tmp_path), "colours")
    whole = collection_map(coll)
    part = collection_map(coll, max_points=5)
    assert len(part.ids) == 5 and part.total == 8 and "a seeded sample of 5 of the 8 items" in part.description
    rows = [whole.ids.index(i) for i in part.ids]
    np.testing.assert_array_equal(part.coords, whole.coords[rows])
    assert part.categories == [whole.categories[r] for r in rows]


def test_map_of_an_unknown_collection_is_404(colour_collection: Built) -> None:
    app, _ = make_app([colour_collection.path], serve_options(), load=colour_loader())
    with TestClient(app) as client:
        resp = client.get("/map", params={"collection": "nope"})
        assert resp.status_code == 404 and "no collection named 'nope'" in resp.json()["error"]["message"]


def test_search_page_frames_the_map(colour_collection: Built) -> None:
    app, _ = make_app([colour_collection.path], serve_options(), load=colour_loader())
    with TestClient(app) as client:
        page = client.get("/").text
        assert 'id="map-toggle"' in page and 'id="map-frame"' in page
        assert client.get("/").headers["x-frame-options"] == "DENY"  # only the map may be framed


def test_map_csp_hash_matches_the_inline_script() -> None:
    import hashlib

    from phiclip.collection.pages import map_page, map_page_csp

    page = map_page(np.zeros((2, 2)) + [[0, 0], [1, 1]], ["a", "b"], method="test")
    script = re.findall(r"<script>(.*?)</script>", page, re.S)
    assert len(script) == 1
    digest = base64.b64encode(hashlib.sha256(script[0].encode()).digest()).decode()
    assert f"'sha256-{digest}'" in map_page_csp()
