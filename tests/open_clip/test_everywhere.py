"""An ``open_clip:`` model works wherever a CLIP does, through each Python API, on a tiny open_clip
checkpoint: embed + search (text and image queries), eval zero-shot, compare, serve; and the same
with the spec written without its kind (found from ``open_clip_config.json``)."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from phiclip.testing import build_tiny_clip, build_tiny_open_clip, make_sample_images


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@dataclass
class Run:
    model: Path
    spec: str
    images: Path
    records: list[dict[str, Any]]
    out: Path


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """A tiny open_clip (ViT-B-32 shrunk: 64 px, 2 x 2 patches; bilinear, squash preprocessing so that
    open_clip's transform, not CLIP's, shows), 24 labelled and captioned images, and their embedding
    output written by ``phiclip.embed`` from the spec without its kind."""
    import phiclip

    root = tmp_path_factory.mktemp("oc_everywhere")
    model = build_tiny_open_clip(root / "oc", seed=5, preprocess_cfg={"interpolation": "bilinear",
                                                                       "resize_mode": "squash"})
    records = make_sample_images(root / "images", per_class=2)
    out = root / "out"
    phiclip.embed(str(model), root / "images", out, progress=False, batch_size=8, device="cpu", dtype="float32")
    return Run(model, f"open_clip:{model}", root / "images", records, out)


@pytest.fixture(scope="module")
def encoder(run: Run) -> Any:
    from phiclip.encoders import load_encoder

    return load_encoder(run.spec, device="cpu", dtype="float32")


def test_the_kindless_spec_is_recorded_as_open_clip(run: Run, encoder: Any) -> None:
    import json

    manifest = json.loads((run.out / "manifest.json").read_text())
    assert manifest["encoder"]["spec"] == run.spec and manifest["encoder"]["kind"] == "open_clip"
    assert manifest["encoder"]["weights_fingerprint"] == encoder.weights_fingerprint
    assert manifest["encoder"]["preprocessing"]["resize_mode"] == "squash"


def test_search_text_and_image_queries(run: Run, encoder: Any) -> None:
    from phiclip import retrieval as S
    from phiclip.store import open_embeddings

    info = S.build_index(run.out)
    assert info.n == len(run.records) and info.encoder_spec == run.spec
    hits = S.search(run.out, text="a red circle", k=5, device="cpu")
    emb = open_embeddings(run.out)
    q = encoder.encode_texts(["a red circle"])[0]
    cos = S.normalize_rows(emb.embeddings) @ (q / np.linalg.norm(q))
    assert [h.id for h in hits] == [emb.ids[i] for i in np.argsort(-cos, kind="stable")[:5]]
    np.testing.assert_allclose([h.score for h in hits], np.sort(cos)[::-1][:5], atol=2e-3)  # float16 storage
    for rec in (run.records[3], run.records[17]):  # an indexed image finds itself first
        top = S.search(run.out, image=rec["path"], k=1, encoder=encoder)[0]
        assert top.source == rec["path"] and top.score == pytest.approx(1.0, abs=2e-3)


def test_eval_zero_shot_is_the_hand_computed_classifier(run: Run, encoder: Any) -> None:
    from phiclip.evaluate import evaluate, zero_shot_classifier, zero_shot_metrics
    from phiclip.pipeline.step import encode_images

    templates = ("a photo of a {c}.", "a {c} shape")
    result = evaluate(run.spec, "zeroshot", run.images, device="cpu", dtype="float32", templates=templates)
    assert result["encoder"]["kind"] == "open_clip" and result["details"]["num_classes"] == 4
    assert result["left_out"]["count"] == 0
    classes = sorted({r["label"] for r in run.records})
    rows = sorted(run.records, key=lambda r: r["path"])
    images = encode_images(encoder, [r["path"] for r in rows])
    by_hand = zero_shot_metrics(images, zero_shot_classifier(encoder, classes, templates),
                                [classes.index(r["label"]) for r in rows])
    assert result["metrics"] == pytest.approx(by_hand, abs=1e-9)
    kindless = evaluate(str(run.model), "zeroshot", run.images, device="cpu", dtype="float32", templates=templates)
    assert kindless["metrics"] == result["metrics"] and kindless["model"] == run.spec


def test_compare_with_a_clip(run: Run, tmp_path: Path) -> None:
    from phiclip.comparison import compare

    clip = f"clip:{build_tiny_clip(tmp_path / 'clip', image_size=64, patch_size=16, hidden_size=32, num_layers=2, num_heads=2, projection_dim=16)}"
    report = compare([run.spec, clip], run.images / "labels.csv", tmp_path / "report", k=3, batch_size=8,
                     passes=1, isolate=False, device="cpu", dtype="float32")
    oc, cl = report.models
    assert oc.spec == run.spec and oc.cost.dim == 16 and oc.cost.images == 24
    for m in (oc, cl):  # both have a text side: zero-shot and retrieval are measured, not skipped
        assert "zero_shot_top1" in m.quality.metrics and not set(m.quality.skipped) & {"zero_shot", "retrieval"}
    assert (tmp_path / "report" / "report.html").is_file()


def test_serve_search_and_embeddings(run: Run, encoder: Any) -> None:
    from starlette.testclient import TestClient

    from phiclip.serve import ServeOptions, build_service, create_app

    service = build_service([run.out], ServeOptions(allowed_hosts=("testserver",), device="cpu"))
    with TestClient(create_app(service)) as client:
        body = client.get("/api/search", params={"text": "a blue square", "k": 3}).json()
        assert [r["rank"] for r in body["results"]] == [1, 2, 3]
        rec = run.records[9]
        data = Path(rec["path"]).read_bytes()
        top = client.post("/api/search", files={"image": ("q.png", data, "image/png")}, data={"k": "1"}).json()
        assert top["results"][0]["source"] == rec["path"] and top["results"][0]["score"] == pytest.approx(1.0, abs=2e-3)
        uri = "data:image/png;base64," + base64.b64encode(data).decode()
        emb = client.post("/v1/embeddings", json={"input": ["a blue square", uri], "model": run.out.name}).json()
    text_vec, image_vec = (np.asarray(d["embedding"], np.float32) for d in emb["data"])
    want_text = encoder.encode_texts(["a blue square"])[0]
    np.testing.assert_allclose(text_vec, want_text / np.linalg.norm(want_text), atol=1e-5)
    from phiclip.pipeline.step import encode_images

    want_image = encode_images(encoder, [rec["path"]])[0]
    np.testing.assert_allclose(image_vec, want_image / np.linalg.norm(want_image), atol=1e-5)
