"""The `phiclip index`, `phiclip search` and `phiclip eval` commands."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _embdir import ColourEncoder, write_embedding_dir
from PIL import Image
from typer.testing import CliRunner

from phiclip import encoders, schema
from phiclip.cli import app


@pytest.fixture
def runner():
    return CliRunner()


def _colour_out(tmp_path):
    paths, vecs = [], []
    for name, rgb in {"red": (250, 5, 5), "green": (5, 250, 5), "blue": (5, 5, 250)}.items():
        p = tmp_path / f"{name}.png"
        Image.new("RGB", (6, 6), rgb).save(p)
        paths.append(str(p))
        vecs.append(np.asarray(rgb, np.float32) / 255)
    return write_embedding_dir(tmp_path / "out", np.stack(vecs), sources=paths, ids=["red", "green", "blue"]), paths


def test_index_prints_type_and_recall(runner, tmp_path):
    out, _ = _colour_out(tmp_path)
    res = runner.invoke(app, ["index", str(out)])
    assert res.exit_code == 0, res.output
    assert "flat (exact)" in res.output and "1.0000 on 3 sample queries" in res.output
    again = runner.invoke(app, ["index", str(out), "--json"])
    meta = json.loads(again.stdout)
    assert meta["type"] == "flat" and meta["built_now"] is False and meta["recall_at_10"] == 1.0
    forced = json.loads(runner.invoke(app, ["index", str(out), "--type", "hnsw", "--json"]).stdout)
    assert forced["type"] == "hnsw" and forced["built_now"] is True


def test_index_errors_are_one_line(runner, tmp_path):
    res = runner.invoke(app, ["index", str(tmp_path)])
    assert res.exit_code == 1 and "error:" in res.output and "no manifest.json" in res.output
    assert "Traceback" not in res.output
    res = runner.invoke(app, ["index", str(tmp_path), "--type", "lsh"])
    assert res.exit_code == 2  # rejected by the parser


def test_search_table_and_json(runner, tmp_path, colour_builder):
    out, paths = _colour_out(tmp_path)
    res = runner.invoke(app, ["search", str(out), "--text", "a red car", "-k", "2"])
    assert res.exit_code == 0, res.output
    assert "building the index" in res.output and "nearest to text 'a red car'" in res.output
    assert "red.png" in res.output
    res = runner.invoke(app, ["search", str(out), "--image", paths[2], "--json"])
    hits = json.loads(res.stdout)
    assert [h["id"] for h in hits][0] == "blue" and len(hits) == 3
    assert set(hits[0]) == {"rank", "id", "source", "score"} and hits[0]["source"] == paths[2]


def test_search_errors(runner, tmp_path, colour_builder, monkeypatch):
    out, paths = _colour_out(tmp_path)
    res = runner.invoke(app, ["search", str(out)])
    assert res.exit_code == 1 and "give exactly one query" in res.output
    res = runner.invoke(app, ["search", str(out), "--text", "x", "--image", paths[0]])
    assert res.exit_code == 1 and "give exactly one query" in res.output
    res = runner.invoke(app, ["search", str(out), "--image", str(tmp_path / "nope.jpg")])
    assert res.exit_code == 1 and "nope.jpg: no such file" in res.output
    monkeypatch.setitem(encoders.KINDS, "clip", encoders.KINDS["clip"].with_builder(lambda spec, *_: ColourEncoder(str(spec), text=False)))
    res = runner.invoke(app, ["search", str(out), "--text", "red"])
    assert res.exit_code == 1 and "embeds images only" in res.output and "Traceback" not in res.output


def _solid_folder(root):
    for name, rgb in {"red": (250, 0, 0), "green": (0, 250, 0), "blue": (0, 0, 250)}.items():
        (root / name).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (6, 6), tuple(c if c else 20 * i for c in rgb)).save(root / name / f"{i}.png")
    return root


def test_eval_table_and_output_file(runner, tmp_path, colour_builder):
    data = _solid_folder(tmp_path / "d")
    target = tmp_path / "res" / "zs.json"
    res = runner.invoke(app, ["eval", "--model", "clip:/m", "--task", "zeroshot", "--data", str(data),
                              "--template", "a {c} photo", "--output", str(target)])
    assert res.exit_code == 0, res.output
    assert "acc1" in res.stdout and "1.0000" in res.stdout and "Written:" in res.stdout and "zs.json" in res.stdout
    saved = json.loads(target.read_text())
    assert saved["metrics"] == {"acc1": 1.0, "acc5": 1.0, "mean_per_class_recall": 1.0}
    assert saved["details"]["num_templates"] == 1 and saved["model"] == "clip:/m"
    res = runner.invoke(app, ["eval", "-m", "clip:/m", "--task", "linear-probe", "-d", str(data), "--json"])
    assert json.loads(res.stdout)["metrics"]["acc1"] == 1.0


def test_eval_errors(runner, tmp_path, colour_builder):
    data = _solid_folder(tmp_path / "d")
    res = runner.invoke(app, ["eval", "-m", "clip:/m", "--task", "ocr", "-d", str(data)])
    assert res.exit_code == 2
    res = runner.invoke(app, ["eval", "-m", "clip:/m", "--task", "retrieval", "-d", str(data)])
    assert res.exit_code == 1 and "has no captions" in res.output
    tfile = tmp_path / "t.txt"
    tfile.write_text("a {c}\n")
    res = runner.invoke(app, ["eval", "-m", "clip:/m", "--task", "zeroshot", "-d", str(data), "--template", "x {c}",
                              "--templates", str(tfile)])
    assert res.exit_code == 1 and "not both" in res.output


def test_embed_index_search_eval_with_tiny_clip(runner, tmp_path):
    """End to end through the real CLI, encoder and pipeline (random weights: the numbers are not checked)."""
    from phiclip.testing import build_tiny_clip, make_sample_images

    model = build_tiny_clip(tmp_path / "clip")
    records = make_sample_images(tmp_path / "imgs", per_class=1)
    out = tmp_path / "out"
    res = runner.invoke(app, ["embed", "-m", f"clip:{model}", "-i", str(tmp_path / "imgs"), "-o", str(out),
                              "--num-workers", "0", "--no-progress", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["index", str(out)])
    assert res.exit_code == 0 and "flat (exact)" in res.output
    assert (out / schema.INDEX_DIR / "index.faiss").is_file()
    res = runner.invoke(app, ["search", str(out), "--text", "a red circle", "-k", "3", "--json", "--device", "cpu"])
    hits = json.loads(res.stdout)
    assert len(hits) == 3 and all(h["source"] in {r["path"] for r in records} for h in hits)
    for task, data in (("zeroshot", tmp_path / "imgs"), ("retrieval", tmp_path / "imgs" / "labels.csv"),
                       ("knn", tmp_path / "imgs")):
        res = runner.invoke(app, ["eval", "-m", f"clip:{model}", "--task", task, "-d", str(data), "--json",
                                  "--device", "cpu"])
        assert res.exit_code == 0, res.output
        metrics = json.loads(res.stdout)["metrics"]
        assert metrics and all(0.0 <= v <= 1.0 for v in metrics.values())


def test_allow_incomplete_for_index_and_search(runner, tmp_path, colour_builder):
    out = write_embedding_dir(tmp_path / "out", np.eye(3, dtype=np.float32), ids=["red", "green", "blue"],
                              complete=False)
    for command in (["index", str(out)], ["search", str(out), "--text", "red"]):
        res = runner.invoke(app, command)
        assert res.exit_code == 1 and "not finished" in res.output and "--allow-incomplete" in res.output
    res = runner.invoke(app, ["index", str(out), "--allow-incomplete", "--json"])
    assert res.exit_code == 0, res.output
    built = json.loads(res.stdout)
    assert built["n"] == 3
    res = runner.invoke(app, ["search", str(out), "--text", "green", "-k", "1", "--allow-incomplete", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)[0]["id"] == "green"
    # the index of an unfinished run is not used without the flag either
    res = runner.invoke(app, ["search", str(out), "--text", "green"])
    assert res.exit_code == 1 and "not finished" in res.output
    # once the run is finished (the manifest rewritten), the index is rebuilt from the shards
    manifest = json.loads((out / schema.MANIFEST_FILE).read_text())
    (out / schema.MANIFEST_FILE).write_text(json.dumps({**manifest, "complete": True}))
    res = runner.invoke(app, ["search", str(out), "--text", "blue", "-k", "1", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)[0]["id"] == "blue"
    assert json.loads((out / schema.INDEX_DIR / "meta.json").read_text())["fingerprint"] != built["fingerprint"]
