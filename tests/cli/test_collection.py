"""``phiclip dedup``, ``cluster``, ``map`` and ``align`` through typer's CliRunner on tiny data: an embed
output folder whose sources are real image files (one exact byte copy, two planted near copies), and
Parquet files made elsewhere."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from phiclip import schema
from phiclip.cli import app
from phiclip.cli import collection as cli_collection
from phiclip.collection import align as align_mod
from phiclip.collection import dedup as dedup_mod
from phiclip.collection import label_scores, read_vectors
from phiclip.collection.vectors import l2_normalize
from phiclip.testing import make_sample_images
from tests._embdir import write_embedding_dir

metrics = pytest.importorskip("sklearn.metrics", reason="scikit-learn is not installed (dev extra)")


@pytest.fixture
def collection(tmp_path: Path) -> dict:
    """24 labelled images (4 colour folders x 6) plus an exact byte copy of one; vectors: 4 tight colour
    clusters, image 1 a near copy of image 0 (cosine > 0.99), the byte copy with its own slightly moved vector."""
    images = tmp_path / "images"
    records = make_sample_images(images, per_class=2)
    copy = images / "red" / "copy_of_first.png"
    shutil.copyfile(records[0]["path"], copy)
    paths = [r["path"] for r in records] + [str(copy)]
    labels = [r["label"] for r in records] + [records[0]["label"]]
    rng = np.random.default_rng(0)
    centres = {c: rng.normal(size=16) for c in sorted(set(labels))}
    vectors = np.stack([centres[lab] + 0.4 * rng.normal(size=16) for lab in labels]).astype(np.float32)
    vectors[1] = vectors[0] + 0.01 * rng.normal(size=16)  # a near copy (different bytes)
    vectors[-1] = vectors[0] + 0.3 * rng.normal(size=16)  # the byte copy: found by its bytes
    emb = write_embedding_dir(tmp_path / "emb", l2_normalize(vectors), sources=[schema.path_to_source(p) for p in paths],
                              ids=[f"im{i:02d}" for i in range(len(paths))])
    return {"emb": emb, "paths": paths, "labels": labels, "vectors": vectors, "ids": [f"im{i:02d}" for i in range(len(paths))]}


def _parquet(path: Path, ids: list[str], vectors: np.ndarray, **extra: list) -> Path:
    cols = {"id": pa.array(ids), "vec": pa.array([list(map(float, v)) for v in vectors], pa.list_(pa.float32()))}
    cols.update({k: pa.array(v) for k, v in extra.items()})
    pq.write_table(pa.table(cols), path)
    return path


def test_cli_defaults_are_the_apis() -> None:
    assert cli_collection.DEFAULT_THRESHOLD == dedup_mod.DEFAULT_THRESHOLD
    assert cli_collection.DEFAULT_ALIGN_K == align_mod.DEFAULT_K


def test_dedup_finds_exact_and_near_copies_and_deletes_nothing(cli, collection, tmp_path) -> None:
    out = tmp_path / "dups"
    res = cli.invoke(app, ["dedup", str(collection["emb"]), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "nothing deleted" in res.output
    groups = pq.read_table(out / "duplicates.parquet").to_pylist()
    by_kind: dict[str, set[frozenset]] = {}
    for gid in {g["group_id"] for g in groups}:
        rows = [g for g in groups if g["group_id"] == gid]
        by_kind.setdefault(rows[0]["kind"], set()).add(frozenset(r["id"] for r in rows))
    ids = collection["ids"]
    assert frozenset({ids[0], ids[-1]}) in by_kind["exact"]
    assert frozenset({ids[0], ids[1]}) in by_kind["near"]
    keep = set(pq.read_table(out / "keep.parquet").column("id").to_pylist())
    # the exact copy goes (its original represents the exact group); one of the near pair stays
    assert ids[-1] not in keep and len({ids[0], ids[1]} & keep) == 1 and len(keep) == len(ids) - 2
    page = (out / "duplicates.html").read_text()
    assert "Nothing was deleted" in page and "data:image/jpeg;base64," in page
    assert all(Path(p).exists() for p in collection["paths"])  # never deletes
    summary = json.loads((out / "summary.json").read_text())
    assert summary["exact_groups"] == 1 and summary["near_groups"] == 1 and summary["deleted"] == 0
    as_json = cli.invoke(app, ["dedup", str(collection["emb"]), "-o", str(out), "--json", "--no-exact"])
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.stdout)
    assert data["exact_checked"] is False and data["exact_groups"] == 0 and data["near_groups"] >= 1


def test_dedup_of_a_parquet_file_with_progress(cli, collection, tmp_path) -> None:
    src = _parquet(tmp_path / "v.parquet", collection["ids"], collection["vectors"])
    res = cli.invoke(app, ["dedup", str(src), "-o", str(tmp_path / "o"), "--threshold", "0.99"])
    assert res.exit_code == 0, res.output
    assert "reading" in res.stderr and "exact duplicates not checked" in res.stderr
    assert "not checked (no image paths)" in res.stdout


def test_cluster_with_folder_labels_scores_like_sklearn(cli, collection, tmp_path) -> None:
    out = tmp_path / "cl"
    res = cli.invoke(app, ["cluster", str(collection["emb"]), "-o", str(out), "--k", "4", "--labels", "folder",
                           "--json"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    table = pq.read_table(out / "clusters.parquet").to_pylist()
    assert [r["id"] for r in table] == collection["ids"] and {r["cluster"] for r in table} <= set(range(4))
    assign = [r["cluster"] for r in table]
    labels = collection["labels"]
    assert s["labels"]["v_measure"] == pytest.approx(metrics.v_measure_score(labels, assign), abs=1e-12)
    assert s["labels"]["nmi"] == pytest.approx(metrics.normalized_mutual_info_score(labels, assign), abs=1e-12)
    assert s["labels"]["n"] == len(labels) and s["labels"]["classes"] == 4
    assert s["labels"]["v_measure"] > 0.9  # tight colour clusters
    assert sum(s["sizes"]) == len(labels) and "k-means" in s["protocol"]
    page = (out / "clusters.html").read_text()
    assert 'id="label-scores"' in page and f"{s['labels']['v_measure']:.4f}" in page
    text = cli.invoke(app, ["cluster", str(collection["emb"]), "-o", str(out), "--k", "4", "--labels", "folder"])
    assert text.exit_code == 0 and "V-measure" in text.stdout and f"{s['labels']['nmi']:.4f}" in text.stdout


def test_cluster_with_a_label_column(cli, collection, tmp_path) -> None:
    src = _parquet(tmp_path / "v.parquet", collection["ids"], collection["vectors"], kind=collection["labels"])
    res = cli.invoke(app, ["cluster", str(src), "-o", str(tmp_path / "o"), "--k", "3", "--labels", "kind", "--json"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    assign = pq.read_table(tmp_path / "o" / "clusters.parquet").column("cluster").to_pylist()
    assert s["labels"]["nmi"] == pytest.approx(label_scores(collection["labels"], assign).nmi)


def test_map_states_its_method_and_colours(cli, collection, tmp_path) -> None:
    out = tmp_path / "m"
    res = cli.invoke(app, ["map", str(collection["emb"]), "-o", str(out), "--colour-by", "label", "--method", "pca"])
    assert res.exit_code == 0, res.output
    assert "PCA" in res.stdout
    table = pq.read_table(out / "map.parquet")
    assert table.column_names == ["id", "x", "y", "label"] and table.num_rows == len(collection["ids"])
    assert b"PCA" in table.schema.metadata[b"phiclip.layout"]
    page = (out / "map.html").read_text()
    assert 'id="layout-method">Layout: PCA' in page and "coloured by label" in page
    res = cli.invoke(app, ["map", str(collection["emb"]), "-o", str(out), "--colour-by", "cluster", "--k", "3",
                           "--json"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    assert s["method"] in ("pca", "umap") and s["description"]
    assert set(pq.read_table(out / "map.parquet").column("cluster").to_pylist()) <= {0, 1, 2}


def test_align_json_and_table(cli, collection, tmp_path) -> None:
    ids, x = collection["ids"], collection["vectors"]
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    a = _parquet(tmp_path / "a.parquet", ids, x)
    b = _parquet(tmp_path / "b.parquet", ids[::-1][:-2] + ["extra"], np.vstack([(x @ q)[::-1][:-2], x[:1]]))
    res = cli.invoke(app, ["align", str(a), str(b), "--k", "5", "-o", str(tmp_path / "al"), "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["join"] == {"common": len(ids) - 2, "only_a": 2, "only_b": 1} and d["k"] == 5
    # a rotation of the same vectors: every score is 1
    for name in ("mutual_knn", "cknna", "cknna_biased", "cka", "cka_unbiased"):
        assert d["scores"][name] == pytest.approx(1.0, abs=1e-5), name
    assert json.loads((tmp_path / "al" / "alignment.json").read_text())["scores"] == d["scores"]
    table = cli.invoke(app, ["align", str(a), str(collection["emb"])])
    assert table.exit_code == 0, table.output
    assert "mutual_knn" in table.stdout and "CKNNA" in table.stdout and "k=10" in table.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["dedup", "{missing}", "-o", "{out}"], "no such file or folder"),
        (["cluster", "{emb}", "-o", "{out}", "--k", "99"], "lower --k"),
        (["cluster", "{emb}", "-o", "{out}", "--k", "2", "--labels", "kind"], "use --labels folder"),
        (["map", "{bad}", "-o", "{out}"], "no vector column"),
        (["align", "{emb}", "{other}"], "only 0 ids are common"),
        (["dedup", "{emb}", "-o", "{bad}"], "not a folder"),
    ],
)
def test_errors_name_the_input_and_the_fix(cli, collection, tmp_path, args, message) -> None:
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"id": ["a"], "x": [1.0]}), bad)
    other = _parquet(tmp_path / "other.parquet", [f"z{i}" for i in range(20)], np.eye(20, 16, dtype=np.float32))
    names = {"missing": tmp_path / "nope", "out": tmp_path / "o", "emb": collection["emb"], "bad": bad, "other": other}
    res = cli.invoke(app, [a.format(**names) for a in args])
    assert res.exit_code == 1, res.output
    assert "error:" in res.stderr and message in res.stderr.replace("\n", " ")
    assert "Traceback" not in res.output


def test_read_back_inputs_are_unchanged(collection) -> None:
    vs = read_vectors(collection["emb"])
    assert vs.ids == collection["ids"]
