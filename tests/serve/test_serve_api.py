"""Every route of ``phiclip serve`` through Starlette's TestClient: answers, limits, error statuses, token."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient
from typer.testing import CliRunner

from phiclip.pipeline.step import encode_images
from phiclip.serve import app as serve_app
from phiclip.serve.app import STATIC_DIR

from .conftest import Built, colour_loader, make_app, serve_options, vectors_close


def _png(rgb: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (32, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, format="PNG")
    return buf.getvalue()


def _data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _error(resp: Any, status: int, *fragments: str) -> dict[str, Any]:
    assert resp.status_code == status, (resp.status_code, resp.text)
    assert resp.headers["content-type"].startswith("application/json"), resp.headers["content-type"]
    err = resp.json()["error"]
    assert err["code"] == status and err["message"]
    for f in fragments:
        assert f in err["message"], (f, err["message"])
    return err


@pytest.fixture(scope="module")
def clip(clip_collection: Built, colour_collection: Built) -> Any:
    """A client over the tiny-CLIP collection (default) and the colour one (loaded by another encoder)."""
    app, service = make_app([clip_collection.path], serve_options(max_pixels=1_000_000, thumbnail_cache_bytes=20_000))
    with TestClient(app) as client:
        client.service = service  # type: ignore[attr-defined]
        yield client


@pytest.fixture(scope="module")
def colour(colour_collection: Built) -> Any:
    app, service = make_app([colour_collection.path], serve_options(max_inputs=4, max_text_chars=50, max_k=20,
                                                                     max_upload_bytes=2000, max_body_bytes=20_000),
                            load=colour_loader())
    with TestClient(app) as client:
        client.service = service  # type: ignore[attr-defined]
        yield client


# --- collections, health, page ----------------------------------------------------------------


def test_healthz_and_collections(clip: Any, clip_collection: Built) -> None:
    assert clip.get("/healthz").json()["status"] == "ok"
    body = clip.get("/api/collections").json()
    (c,) = body["collections"]
    assert body["default"] == c["name"] == "shapes"
    assert c["count"] == 24 and c["dim"] == 16 and c["complete"] is True and c["kind"] == "image"
    assert c["encoder"]["spec"] == clip_collection.spec and c["encoder"]["modalities"] == ["image", "text"]
    assert c["labels"] == ["blue", "green", "red", "yellow"] and c["has_labels"]
    assert {"width", "height", "label", "caption"} <= set(c["fields"]) and c["index"]["type"] == "flat"


def test_page_and_assets_are_served_locally(clip: Any) -> None:
    page = clip.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    assert 'src="static/app.js"' in page.text and 'href="static/style.css"' in page.text
    for name in ("app.js", "style.css"):
        r = clip.get(f"/static/{name}")
        assert r.status_code == 200 and len(r.content) > 1000
    for f in STATIC_DIR.iterdir():  # no CDN, no remote fonts: nothing outside this server
        text = f.read_text(encoding="utf-8").replace('xmlns="http://www.w3.org/2000/svg"', "")  # a name, not a fetch
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, f.name
    assert "innerHTML" not in (STATIC_DIR / "app.js").read_text(encoding="utf-8")


def test_unknown_route_and_method_are_json(clip: Any) -> None:
    _error(clip.get("/api/nope"), 404, "no route")
    _error(clip.delete("/api/search"), 405)
    _error(clip.get("/static/../../etc/passwd"), 404)


# --- text search ------------------------------------------------------------------------------


def test_text_search_results(clip: Any) -> None:
    body = clip.get("/api/search", params={"text": "a red circle", "k": 5}).json()
    assert body["collection"] == "shapes" and body["query"] == {"text": "a red circle"} and body["k"] == 5
    results = body["results"]
    assert [r["rank"] for r in results] == [1, 2, 3, 4, 5]
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True) and all(-1.001 <= s <= 1.001 for s in scores)
    r = results[0]
    assert {"id", "source", "score", "width", "height", "label", "caption", "thumbnail"} <= set(r)
    assert Path(r["source"]).is_file() and r["label"] in r["caption"] and r["width"] > 0
    assert r["thumbnail"] == f"/api/items/shapes/{r['id']}/thumbnail"


def test_text_search_finds_the_right_colour_and_filters_by_label(colour: Any) -> None:
    body = colour.get("/api/search", params={"text": "something red", "k": 3}).json()
    assert [r["label"] for r in body["results"][:2]] == ["red", "red"]
    assert body["results"][0]["score"] == pytest.approx(1.0, abs=1e-3)
    for _ in range(2):  # the second time from the cached selection
        only_blue = colour.get("/api/search", params={"text": "something red", "k": 8, "label": "blue"}).json()
        assert [r["label"] for r in only_blue["results"]] == ["blue", "blue"] and only_blue["label"] == "blue"
    assert colour.get("/api/search", params={"text": "red", "label": "purple"}).json()["results"] == []


@pytest.mark.parametrize(
    "params, status, fragment",
    [
        ({}, 400, "give one query"),
        ({"text": "   "}, 400, "empty"),
        ({"text": "red", "k": "0"}, 400, "between 1 and 20"),
        ({"text": "red", "k": "21"}, 400, "between 1 and 20"),
        ({"text": "red", "k": "ten"}, 400, "must be an integer"),
        ({"text": "red", "collection": "nope"}, 404, "no collection named 'nope'"),
        ({"text": "r" * 51}, 413, "over the limit of 50"),
        ({"text": "red", "id": "red-0"}, 400, "give one query"),
        ({"id": "nope"}, 404, "no item with id 'nope'"),
    ],
)
def test_text_search_errors(colour: Any, params: dict[str, str], status: int, fragment: str) -> None:
    _error(colour.get("/api/search", params=params), status, fragment)


def test_label_filter_needs_labels(clip_collection: Built, tmp_path: Path) -> None:
    import shutil

    from phiclip.store import shard_files

    plain = tmp_path / "plain"
    shutil.copytree(clip_collection.path, plain, ignore=shutil.ignore_patterns("index"))
    import pyarrow.parquet as pq

    for shard in shard_files(plain):
        pq.write_table(pq.read_table(shard).drop_columns(["label"]), shard)
    app, _ = make_app([plain], serve_options())
    with TestClient(app) as client:
        c = client.get("/api/collections").json()["collections"][0]
        assert c["labels"] is None and not c["has_labels"]
        _error(client.get("/api/search", params={"text": "x", "label": "red"}), 400, "no labels")


def test_text_search_on_an_image_only_encoder(colour_collection: Built) -> None:
    app, _ = make_app([colour_collection.path], serve_options(), load=colour_loader(text=False))
    with TestClient(app) as client:
        _error(client.get("/api/search", params={"text": "red"}), 400, "embeds images only", "search with an image")
        _error(client.post("/v1/embeddings", json={"input": "red"}), 400, "embeds images only")
        assert client.post("/api/search", files={"image": ("r.png", _png(), "image/png")}).status_code == 200


def test_item_search_by_id_get(colour: Any) -> None:
    body = colour.get("/api/search", params={"id": "green-1", "k": 2}).json()
    assert body["results"][0]["id"] == "green-1" and body["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert body["results"][1]["label"] == "green" and body["query"] == {"id": "green-1", "collection": "colours"}


# --- image search -----------------------------------------------------------------------------


def test_upload_search_finds_the_same_image(clip: Any, clip_collection: Built) -> None:
    rec = clip_collection.records[7]
    data = Path(rec["path"]).read_bytes()
    body = clip.post("/api/search", files={"image": ("mine.png", data, "image/png")}, data={"k": "3"}).json()
    top = body["results"][0]
    assert top["source"] == rec["path"] and top["score"] == pytest.approx(1.0, abs=2e-3)
    assert body["query"] == {"image": "mine.png"} and len(body["results"]) == 3


def test_upload_search_as_json_data_uri(colour: Any) -> None:
    body = colour.post("/api/search", json={"image": _data_uri(_png((20, 40, 230))), "k": 1}).json()
    assert body["results"][0]["label"] == "blue"


def test_upload_errors(clip: Any, colour: Any) -> None:
    post = clip.post
    _error(post("/api/search", files={"image": ("notes.txt", b"not an image at all", "text/plain")}), 400,
           "notes.txt: not a readable image")
    big = _png(size=(1200, 1000))  # 1.2 M pixels, over this server's 1 M
    _error(post("/api/search", files={"image": ("big.png", big, "image/png")}), 400, "big.png", "over the pixel limit of 1000000")
    _error(post("/api/search", files={"image": ("empty.png", b"", "image/png")}), 400, "empty")
    _error(post("/api/search", files={"image": ("a.png", _png(), "image/png")}, data={"id": "x"}), 400, "exactly one")
    _error(post("/api/search", data={"k": "3"}), 400, "exactly one")
    _error(post("/api/search", files={"other": ("a.png", _png(), "image/png")}), 400, "'image'")
    _error(post("/api/search", content=b"raw", headers={"content-type": "image/png"}), 400, "multipart/form-data")
    _error(post("/api/search", content=b"{nope", headers={"content-type": "application/json"}), 400, "not valid JSON")
    _error(post("/api/search", json=["a"]), 400, "JSON object")
    _error(post("/api/search", json={"image": "data:image/png;base64,@@@"}), 400, "not valid base64")
    _error(post("/api/search", json={"image": "http://127.0.0.1:9/a.png"}), 400, "data:image", "as 'image_url'")
    # colour's limits: 2000-byte images, 20000-byte bodies
    noisy = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(noisy, format="PNG")
    assert len(noisy.getvalue()) > 2000
    _error(colour.post("/api/search", files={"image": ("n.png", noisy.getvalue(), "image/png")}), 413, "over the limit of 2000")
    _error(colour.post("/api/search", json={"image": _data_uri(noisy.getvalue())}), 413, "over the limit of 2000")
    _error(colour.post("/api/search", content=b"x" * 30_000, headers={"content-type": "application/json"}), 413,
           "over the limit of 20000")


def test_streamed_body_over_the_limit_is_413(colour: Any) -> None:
    def chunks() -> Any:  # no content-length: the limit is counted while reading
        for _ in range(30):
            yield b"x" * 1000

    _error(colour.post("/api/search", content=chunks(), headers={"content-type": "application/json"}), 413,
           "over the limit of 20000")


def test_more_like_this_by_url_and_id(clip: Any) -> None:
    first = clip.get("/api/search", params={"text": "a blue square", "k": 4}).json()["results"][2]
    for payload in ({"image_url": first["thumbnail"]}, {"image_url": "http://localhost:8000" + first["thumbnail"]},
                    {"id": first["id"]}):
        by_form = clip.post("/api/search", data={**payload, "k": "3"}).json()
        by_json = clip.post("/api/search", json={**payload, "k": 3}).json()
        assert by_form["results"] == by_json["results"]
        top = by_form["results"][0]
        assert top["id"] == first["id"] and top["score"] == pytest.approx(1.0, abs=1e-5)  # its stored vector
        assert by_form["query"] == {"id": first["id"], "collection": "shapes"}


def test_more_like_this_errors(clip: Any) -> None:
    # (image URLs that are fetched, and the address guard: test_serve_urls.py)
    _error(clip.post("/api/search", json={"image_url": "/etc/passwd"}), 400, "image_url must be an image's http(s) URL")
    _error(clip.post("/api/search", json={"image_url": "file:///etc/passwd"}), 400, "image_url must be")
    _error(clip.post("/api/search", json={"image_url": "/api/items/nope/abc/thumbnail"}), 404, "no collection named 'nope'")
    _error(clip.post("/api/search", json={"image_url": "/api/items/shapes/abc/thumbnail"}), 404, "no item with id 'abc'")
    _error(clip.post("/api/search", json={"id": "abc"}), 404, "no item with id 'abc'")
    _error(clip.post("/api/search", json={"id": 5}), 400, "must be strings")


def test_more_like_this_across_collections_embeds_the_items_image(clip_collection: Built, colour_collection: Built) -> None:
    def load(spec: str, **kw: Any) -> Any:
        from phiclip.encoders import load_encoder

        return colour_loader()(spec) if spec == colour_collection.spec else load_encoder(spec, **kw)

    app, _ = make_app([clip_collection.path, colour_collection.path], serve_options(), load=load)
    red = next(r for r in clip_collection.records if r["label"] == "red" and "square" in r["path"])
    with TestClient(app) as client:
        names = [c["name"] for c in client.get("/api/collections").json()["collections"]]
        assert names == ["shapes", "colours"]
        hit = client.post("/api/search", files={"image": ("r.png", Path(red["path"]).read_bytes(), "image/png")},
                          data={"k": "1"}).json()["results"][0]
        # an item of "shapes" (CLIP) as a query in "colours" (another encoder): its image is embedded again
        assert hit["source"] == red["path"]
        body = client.post("/api/search", json={"image_url": hit["thumbnail"], "collection": "colours", "k": 8}).json()
    # what the colour encoder makes of that image, searched by hand
    from phiclip.retrieval import normalize_rows

    enc = colour_loader()(colour_collection.spec)
    q = normalize_rows(encode_images(enc, [red["path"]]))[0]
    rows = normalize_rows(encode_images(enc, [r["path"] for r in colour_collection.records]))
    want = [colour_collection.records[i]["id"] for i in np.argsort(-(rows @ q), kind="stable")]
    assert body["collection"] == "colours" and body["query"]["collection"] == "shapes"
    assert [r["id"] for r in body["results"]] == want


# --- thumbnails -------------------------------------------------------------------------------


def test_thumbnails(clip: Any, clip_collection: Built) -> None:
    hits = clip.get("/api/search", params={"text": "x", "k": 24}).json()["results"]
    r = clip.get(hits[0]["thumbnail"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    img = Image.open(io.BytesIO(r.content))
    assert img.format == "JPEG" and max(img.size) == min(256, max(hits[0]["width"], hits[0]["height"]))
    small = Image.open(io.BytesIO(clip.get(hits[0]["thumbnail"], params={"size": 128}).content))
    assert max(small.size) <= 128
    _error(clip.get(hits[0]["thumbnail"], params={"size": 300}), 400, "size must be one of")
    for h in hits:  # fill the 20 000-byte cache: it evicts instead of growing
        assert clip.get(h["thumbnail"]).status_code == 200
    stats = clip.get("/api/stats").json()["thumbnails"]
    assert 0 < stats["bytes"] <= 20_000 and stats["entries"] < 24 and stats["max_bytes"] == 20_000


@pytest.mark.parametrize(
    "path",
    [
        "/api/items/shapes/..%2F..%2F..%2Fetc%2Fpasswd/thumbnail",
        "/api/items/shapes/%2Fetc%2Fpasswd/thumbnail",
        "/api/items/shapes/..%252F..%252Fetc%252Fpasswd/thumbnail",
        "/api/items/..%2F..%2Fetc/passwd/thumbnail",
        "/api/items/shapes/../../../../etc/passwd/thumbnail",
        "/api/items/%2E%2E/%2E%2E/thumbnail",
    ],
)
def test_thumbnail_path_traversal_is_404(clip: Any, path: str) -> None:
    r = clip.get(path)
    assert r.status_code == 404, r.text
    assert "root:" not in r.text and r.headers["content-type"].startswith("application/json")


def test_thumbnail_of_a_missing_file_or_unknown_item(clip_collection: Built, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "images-copy"
    shutil.copytree(clip_collection.path, tmp_path / "shapes", ignore=shutil.ignore_patterns("index"))
    shutil.copytree(Path(clip_collection.records[0]["path"]).parent.parent, copy)
    import pyarrow as pa
    import pyarrow.parquet as pq

    from phiclip.store import shard_files

    old_root = str(Path(clip_collection.records[0]["path"]).parent.parent)
    for shard in shard_files(tmp_path / "shapes"):  # point the sources at the copy, then delete one file
        t = pq.read_table(shard)
        sources = [s.replace(old_root, str(copy)) for s in t.column("source").to_pylist()]
        pq.write_table(t.set_column(t.schema.get_field_index("source"), "source", pa.array(sources, pa.string())), shard)
    app, _ = make_app([tmp_path / "shapes"], serve_options())
    with TestClient(app) as client:
        hits = client.get("/api/search", params={"text": "x", "k": 2}).json()["results"]
        Path(hits[0]["source"]).unlink()
        _error(client.get(hits[0]["thumbnail"]), 404, "no thumbnail", "not a readable file")
        assert client.get(hits[1]["thumbnail"]).status_code == 200
        _error(client.get("/api/items/shapes/nope/thumbnail"), 404, "no item with id 'nope'")
        _error(client.get("/api/items/other/nope/thumbnail"), 404, "no collection named 'other'")


def test_thumbnail_of_a_parquet_bytes_input(tmp_path: Path, colour_collection: Built) -> None:
    """Items embedded from a Parquet table of image bytes: the thumbnail is read from that table's row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import phiclip

    table = tmp_path / "images.parquet"
    pngs = [_png((250, 10, 10)), _png((10, 10, 250), size=(64, 32))]
    pq.write_table(pa.table({"image": pa.array(pngs, pa.binary())}), table, row_group_size=1)
    out = tmp_path / "from-table"
    phiclip.embed(colour_loader()("clip:/models/colour"), table, out, progress=False)
    app, _ = make_app([out], serve_options(), load=colour_loader())
    with TestClient(app) as client:
        hits = client.get("/api/search", params={"text": "blue", "k": 1}).json()["results"]
        assert hits[0]["source"] == f"{table}#row=1"
        img = Image.open(io.BytesIO(client.get(hits[0]["thumbnail"]).content)).convert("RGB")
        assert img.size == (64, 32) and img.getpixel((5, 5))[2] > 200


# --- /v1/embeddings ---------------------------------------------------------------------------


def test_embeddings_match_the_encoder(clip: Any, clip_collection: Built) -> None:
    encoder = clip.service.encoders[clip_collection.spec]
    png = Path(clip_collection.records[3]["path"]).read_bytes()
    texts = ["a red circle", "a photo of a dog"]
    body = clip.post("/v1/embeddings", json={"input": [texts[0], _data_uri(png), texts[1]], "model": "shapes"}).json()
    assert body["object"] == "list" and body["model"] == "shapes" and "usage" in body
    assert [d["index"] for d in body["data"]] == [0, 1, 2] and all(d["object"] == "embedding" for d in body["data"])
    want_text = encoder.encode_texts(texts)
    want_image = encode_images(encoder, [png])
    assert vectors_close(body["data"][0]["embedding"], want_text[0])
    assert vectors_close(body["data"][2]["embedding"], want_text[1])
    assert vectors_close(body["data"][1]["embedding"], want_image[0])
    b64 = clip.post("/v1/embeddings", json={"input": texts[0], "encoding_format": "base64",
                                            "model": clip_collection.spec}).json()
    decoded = np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), dtype="<f4")
    assert decoded.shape == (16,) and vectors_close(decoded, want_text[0])


@pytest.mark.parametrize(
    "body, status, fragment",
    [
        ({"input": []}, 400, "non-empty list"),
        ({"input": 5}, 400, "non-empty list"),
        ({"input": [[1, 2, 3]]}, 400, "token arrays are not supported"),
        ({"input": ["a", ""]}, 400, "input[1] is empty"),
        ({"input": ["a"] * 5}, 413, "over the limit of 4"),
        ({"input": "r" * 51}, 413, "input[0] has 51 characters"),
        ({"input": "a", "encoding_format": "int8"}, 400, "encoding_format"),
        ({"input": "a", "model": "text-embedding-3-small"}, 404, "not served here"),
        ({"input": "a", "dimensions": 8}, 400, "3-d vectors"),
        ({"input": ["a", "data:image/png;base64,!!"]}, 400, "input[1]: the data URI is not valid base64"),
        ({"input": ["data:image/png;base64," + base64.b64encode(b"garbage").decode()]}, 400, "input[0]: not a readable image"),
    ],
)
def test_embeddings_errors(colour: Any, body: dict[str, Any], status: int, fragment: str) -> None:
    _error(colour.post("/v1/embeddings", json=body), status, fragment)


def test_a_request_larger_than_the_queue_is_413_not_503(colour_collection: Built) -> None:
    app, _ = make_app([colour_collection.path], serve_options(max_queue=2), load=colour_loader())
    with TestClient(app) as client:
        _error(client.post("/v1/embeddings", json={"input": ["a", "b", "c"]}), 413, "more than the encoder queue holds (2)")
        assert client.post("/v1/embeddings", json={"input": ["a", "b"]}).status_code == 200


def test_embeddings_invalid_json_and_models(colour: Any) -> None:
    _error(colour.post("/v1/embeddings", content=b"{", headers={"content-type": "application/json"}), 400, "not valid JSON")
    models = colour.get("/v1/models").json()
    assert models["data"][0]["id"] == "colours" and models["data"][0]["encoder"] == "clip:/models/colour"


# --- token and host -----------------------------------------------------------------------------


def test_token_is_checked_on_every_route(colour_collection: Built) -> None:
    app, _ = make_app([colour_collection.path], serve_options(token="s3cret-token"), load=colour_loader())
    with TestClient(app) as client:
        routes = [("get", "/"), ("get", "/api/collections"), ("get", "/api/search?text=red"), ("get", "/api/stats"),
                  ("post", "/v1/embeddings"), ("post", "/api/search"), ("get", "/v1/models"),
                  ("get", "/static/app.js"), ("get", "/api/items/colours/red-0/thumbnail")]
        for method, path in routes:
            _error(getattr(client, method)(path), 401, "token")
            _error(getattr(client, method)(path, headers={"Authorization": "Bearer wrong"}), 401)
        assert client.get("/healthz").status_code == 200  # open for load balancers
        ok = client.get("/api/search?text=red", headers={"Authorization": "Bearer s3cret-token"})
        assert ok.status_code == 200 and ok.json()["results"][0]["label"] == "red"
        # the page: /?token=... sets an HttpOnly cookie and redirects to the bare page
        r = client.get("/?token=s3cret-token", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/"
        assert "HttpOnly" in r.headers["set-cookie"] and "SameSite=strict" in r.headers["set-cookie"]
        assert client.get("/api/collections").status_code == 200  # the cookie now in the client's jar
        client.cookies.clear()
        client.cookies.set("phiclip_token", "wrong")
        _error(client.get("/api/collections"), 401)
        _error(client.get("/?token=wrong"), 401)


def test_host_header_is_checked_without_a_token(colour: Any) -> None:
    _error(colour.get("/api/collections", headers={"host": "evil.example"}), 400, "not accepted")
    for host in ("localhost:8000", "127.0.0.1", "[::1]:8000", "testserver"):
        assert colour.get("/api/collections", headers={"host": host}).status_code == 200, host


def test_options_refuse_a_public_address_without_token() -> None:
    from phiclip.serve import ServeOptions

    with pytest.raises(ValueError, match="without authentication"):
        ServeOptions(host="0.0.0.0").validate()
    ServeOptions(host="0.0.0.0", token="t").validate()
    ServeOptions(host="::1").validate()
    with pytest.raises(ValueError, match="root_path"):
        ServeOptions(root_path="phiclip/").validate()


# --- the command ----------------------------------------------------------------------------


def test_cli_serve(monkeypatch: pytest.MonkeyPatch, colour_collection: Built, tmp_path: Path) -> None:
    from phiclip.cli import app

    seen: dict[str, Any] = {}
    monkeypatch.setattr(serve_app, "run_server", lambda paths, options, say: seen.update(paths=paths, options=options))
    runner = CliRunner()
    res = runner.invoke(app, ["serve", str(colour_collection.path), "--port", "9123", "--max-queue", "7",
                              "--allowed-host", "search.example", "--max-upload-mb", "2"])
    assert res.exit_code == 0, res.output
    opts = seen["options"]
    assert seen["paths"] == [colour_collection.path] and opts.port == 9123 and opts.host == "127.0.0.1"
    assert opts.max_queue == 7 and opts.allowed_hosts == ("search.example",) and opts.max_upload_bytes == 2 * 2**20
    monkeypatch.undo()
    res = runner.invoke(app, ["serve", str(tmp_path / "nope")])
    assert res.exit_code == 1 and "no such directory" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["serve", str(colour_collection.path), "--host", "0.0.0.0"])
    assert res.exit_code == 1 and "--token" in res.output


def test_json_errors_never_leak_tracebacks(colour: Any) -> None:
    r = colour.post("/v1/embeddings", json={"input": "a", "model": ["x"]})
    err = _error(r, 400, "model must be a string")
    assert "Traceback" not in json.dumps(err)
