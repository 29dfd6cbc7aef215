"""Writer: atomic files, shard schemas, the commit order and the cleanup before a redo."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from phiclip import schema
from phiclip.atomic import atomic_write
from phiclip.pipeline.output import OutputDir
from phiclip.pipeline.writer import OutputError, ShardResult, ShardWriter


def read_manifest(root: Path) -> dict | None:
    """The manifest as a run reads it (None when there is none; OutputError when damaged)."""
    return OutputDir(root, kind="image", dtype="float32").read()


def write_manifest(root: Path, manifest: dict) -> None:
    OutputDir(root, kind="image", dtype="float32").write_manifest(manifest)


def _result(n: int, dim: int = 3, errors: int = 0, tokens: bool = False) -> ShardResult:
    rng = np.random.default_rng(n)
    return ShardResult(
        ids=[f"id{i}" for i in range(n)],
        sources=[f"/x/{i}.png" for i in range(n)],
        widths=list(range(1, n + 1)),
        heights=[7] * n,
        embeddings=rng.normal(size=(n, dim)).astype(np.float32),
        tokens=[rng.normal(size=(i + 1, 2)).astype(np.float32) for i in range(n)] if tokens else None,
        errors=[(f"bad{i}", f"/x/bad{i}.png", "decode", "truncated") for i in range(errors)],
    )


def test_atomic_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    atomic_write(tmp_path / "a.bin", lambda f: f.write(b"hello"))
    assert (tmp_path / "a.bin").read_bytes() == b"hello"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def test_atomic_write_failure_keeps_the_old_file(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"old")

    def boom(f: object) -> None:
        f.write(b"half")  # type: ignore[attr-defined]
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "a.bin", boom)
    assert (tmp_path / "a.bin").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def test_manifest_round_trip_and_corruption(tmp_path: Path) -> None:
    assert read_manifest(tmp_path) is None
    write_manifest(tmp_path, {"dim": 3, "encoder": {"spec": "clip:x"}})
    assert read_manifest(tmp_path) == {"dim": 3, "encoder": {"spec": "clip:x"}}
    assert json.loads((tmp_path / schema.MANIFEST_FILE).read_text())["dim"] == 3
    (tmp_path / schema.MANIFEST_FILE).write_text("{not json")
    with pytest.raises(OutputError, match="unreadable manifest"):
        read_manifest(tmp_path)


@pytest.mark.parametrize(("dtype", "arrow"), [("float16", pa.float16()), ("float32", pa.float32())])
def test_image_shard_schema_and_values(tmp_path: Path, dtype: str, arrow: pa.DataType) -> None:
    w = ShardWriter(tmp_path, kind="image", dim=3, dtype=dtype)
    w.prepare([0])
    res = _result(4, errors=2)
    w.write_shard(0, res)
    table = pq.read_table(w.path(schema.EMBEDDINGS_DIR, 0))
    assert table.schema.names == [schema.COL_ID, schema.COL_SOURCE, schema.COL_WIDTH, schema.COL_HEIGHT, schema.COL_EMBEDDING]
    assert table.schema.field(schema.COL_EMBEDDING).type == pa.list_(arrow, 3)
    assert table.schema.field(schema.COL_WIDTH).type == pa.int32()
    vecs = np.asarray(table.column(schema.COL_EMBEDDING).combine_chunks().flatten()).reshape(4, 3)
    np.testing.assert_allclose(vecs, res.embeddings, rtol=1e-3 if dtype == "float16" else 0, atol=1e-3 if dtype == "float16" else 0)
    assert table.column(schema.COL_ID).to_pylist() == res.ids
    errs = pq.read_table(w.path(schema.ERRORS_DIR, 0))
    assert errs.schema.names == [schema.COL_ID, schema.COL_SOURCE, schema.COL_STAGE, schema.COL_REASON]
    assert errs.column(schema.COL_ID).to_pylist() == ["bad0", "bad1"]
    assert w.done_shards() == {0}
    assert w.counts([0]) == {"embedded": 4, "failed": 2}


def test_text_shard_has_text_column(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path, kind="text", dim=3, dtype="float32")
    w.prepare([0])
    res = _result(2)
    res.texts = ["a red circle", "a blue square"]
    w.write_shard(0, res)
    table = pq.read_table(w.path(schema.EMBEDDINGS_DIR, 0))
    assert table.schema.names == [schema.COL_ID, schema.COL_SOURCE, schema.COL_TEXT, schema.COL_EMBEDDING]
    assert table.column(schema.COL_TEXT).to_pylist() == res.texts


def test_all_failed_shard_still_marks_done_and_writes_no_empty_errors(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path, kind="image", dim=3, dtype="float16")
    w.prepare([0, 1])
    w.write_shard(0, _result(0, errors=3))
    w.write_shard(1, _result(2))
    assert w.done_shards() == {0, 1}
    assert pq.read_metadata(w.path(schema.EMBEDDINGS_DIR, 0)).num_rows == 0
    assert not w.path(schema.ERRORS_DIR, 1).exists()
    assert w.counts([0, 1]) == {"embedded": 2, "failed": 3}


def test_tokens_shard(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path, kind="image", dim=3, dtype="float32")
    w.prepare([0])
    res = _result(3, tokens=True)
    w.write_shard(0, res)
    t = pq.read_table(w.path(schema.TOKENS_DIR, 0))
    assert t.column(schema.COL_NUM_TOKENS).to_pylist() == [1, 2, 3]
    assert t.schema.field(schema.COL_TOKENS).type == pa.list_(pa.list_(pa.float32(), 2))
    got = t.column(schema.COL_TOKENS).to_pylist()
    for g, want in zip(got, res.tokens or []):
        np.testing.assert_array_equal(np.array(g, dtype=np.float32), want)


def test_shape_mismatch_is_refused(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path, kind="image", dim=4, dtype="float16")
    w.prepare([0])
    with pytest.raises(ValueError, match=r"expected \(2, 4\)"):
        w.write_shard(0, _result(2, dim=3))
    assert w.done_shards() == set()


def test_prepare_removes_leftovers_of_an_unfinished_shard_only(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path, kind="image", dim=3, dtype="float16")
    w.prepare([0, 1, 2])
    w.write_shard(0, _result(2, errors=1))
    # A crash between the renames of shard 1: its errors file exists, its embeddings file does not.
    res1 = _result(2, errors=1)
    res1.errors = [("stale", "/x/stale.png", "decode", "old")]
    w.write_shard(1, res1)
    w.path(schema.EMBEDDINGS_DIR, 1).unlink()
    # ...and a crash in the middle of a write: a temporary file.
    tmp = w.dirs[schema.EMBEDDINGS_DIR] / ".part-00002.parquet.999.tmp"
    tmp.write_bytes(b"half a file")
    assert w.done_shards() == {0}
    w.prepare([1, 2])
    assert not w.path(schema.ERRORS_DIR, 1).exists()
    assert w.path(schema.ERRORS_DIR, 0).exists()  # a committed shard is untouched
    assert not tmp.exists()
    # Readers that glob *.parquet never see temporary names.
    assert all(p.suffix == ".parquet" for p in w.dirs[schema.EMBEDDINGS_DIR].glob("*.parquet"))


def test_text_that_is_not_utf8_never_fails_a_shard(tmp_path: Path) -> None:
    # A reason quoting a surrogateescape'd name (e.g. a link target) is written escaped, not refused.
    w = ShardWriter(tmp_path, kind="image", dim=3, dtype="float32")
    w.prepare([0])
    res = _result(1)
    res.errors = [("bad", "/x/caf\\xe9.png", "read", "a broken symbolic link (its target /x/caf\udce9 is gone)")]
    w.write_shard(0, res)
    reason = pq.read_table(w.path(schema.ERRORS_DIR, 0)).column(schema.COL_REASON)[0].as_py()
    assert reason == "a broken symbolic link (its target /x/caf\\udce9 is gone)"


def test_a_failed_write_names_the_folder_and_the_rerun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq, "write_table", full)
    w = ShardWriter(tmp_path, kind="image", dim=3, dtype="float32")
    w.prepare([0])
    with pytest.raises(OutputError, match=r"cannot write embeddings/part-00000.parquet \(the disk .* is full\).*rerun"):
        w.write_shard(0, _result(2))
    assert not list(tmp_path.rglob("*.tmp"))
    monkeypatch.setattr("phiclip.manifest.atomic_write_json", lambda *a, **k: full())
    with pytest.raises(OutputError, match=f"{tmp_path}: cannot write manifest.json"):
        write_manifest(tmp_path, {"dim": 3})


@pytest.mark.parametrize(("key", "value"), [("counts", "7"), ("counts", {"embedded": -1}), ("dim", True),
                                            ("kind", "video"), ("normalized", 1), ("timings", [])])
def test_manifest_fields_of_the_wrong_type_are_named(tmp_path: Path, key: str, value: object) -> None:
    (tmp_path / schema.MANIFEST_FILE).write_text(json.dumps({"dim": 3, key: value}))
    with pytest.raises(OutputError, match=f"manifest.json: manifest '{key}(\\.\\w+)?' is .*, not "):
        read_manifest(tmp_path)
