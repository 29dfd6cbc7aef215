"""Reading embedding output directories back (phiclip.store)."""

from __future__ import annotations

import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _embdir import write_embedding_dir

from phiclip import schema
from phiclip.store import (
    EmbeddingStoreError,
    fingerprint,
    open_embeddings,
    read_manifest,
    weights_fingerprint_of,
)


def test_reads_all_shards_in_order(tmp_path):
    vecs = np.random.default_rng(0).normal(size=(25, 8)).astype(np.float32)
    write_embedding_dir(tmp_path, vecs, shard_rows=10, spec="clip:/m")
    emb = open_embeddings(tmp_path)
    assert len(emb) == 25 and emb.dim == 8
    assert emb.embeddings.dtype == np.float32 and emb.embeddings.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(emb.embeddings, vecs)
    assert emb.ids[:3] == ["id00000", "id00001", "id00002"] and emb.ids[-1] == "id00024"
    assert emb.sources[12] == "/data/img00012.jpg"
    assert emb.encoder_spec == "clip:/m"
    assert [p.name for p in emb.shard_files] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert emb.texts is None


def test_float16_is_widened(tmp_path):
    vecs = np.random.default_rng(1).normal(size=(6, 4)).astype(np.float16)
    write_embedding_dir(tmp_path, vecs, dtype="float16")
    emb = open_embeddings(tmp_path)
    assert emb.embeddings.dtype == np.float32
    np.testing.assert_array_equal(emb.embeddings, vecs.astype(np.float32))


def test_text_output_keeps_texts(tmp_path):
    write_embedding_dir(tmp_path, np.eye(3, dtype=np.float32), kind="text")
    assert open_embeddings(tmp_path).texts == ["text 0", "text 1", "text 2"]


def test_temporary_files_are_ignored(tmp_path):
    write_embedding_dir(tmp_path, np.eye(4, dtype=np.float32))
    (tmp_path / schema.EMBEDDINGS_DIR / ".part-00001.parquet.123.tmp").write_bytes(b"partial")
    (tmp_path / schema.EMBEDDINGS_DIR / ".part-00002.parquet").write_bytes(b"partial")
    assert len(open_embeddings(tmp_path)) == 4


def test_missing_directory_and_manifest(tmp_path):
    with pytest.raises(EmbeddingStoreError, match="no such directory"):
        open_embeddings(tmp_path / "nope")
    with pytest.raises(EmbeddingStoreError, match="no manifest.json.*phiclip embed"):
        open_embeddings(tmp_path)
    (tmp_path / "f").write_text("x")
    with pytest.raises(EmbeddingStoreError, match="not a directory"):
        open_embeddings(tmp_path / "f")


def test_bad_manifest(tmp_path):
    (tmp_path / schema.MANIFEST_FILE).write_text("{not json")
    with pytest.raises(EmbeddingStoreError, match="unreadable manifest"):
        read_manifest(tmp_path)
    (tmp_path / schema.MANIFEST_FILE).write_text(json.dumps({"encoder": {}}))
    with pytest.raises(EmbeddingStoreError, match="no 'dim'"):
        read_manifest(tmp_path)


def test_incomplete_run_is_refused_unless_allowed(tmp_path):
    write_embedding_dir(tmp_path, np.eye(3, dtype=np.float32), complete=False)
    with pytest.raises(EmbeddingStoreError, match="not finished.*rerun the same.*pass --allow-incomplete"):
        open_embeddings(tmp_path)
    assert len(open_embeddings(tmp_path, allow_incomplete=True)) == 3


def test_row_count_must_match_manifest(tmp_path):
    write_embedding_dir(tmp_path, np.eye(3, dtype=np.float32), embedded_count=5)
    with pytest.raises(EmbeddingStoreError, match="counts 5 embedded inputs but the shards hold 3"):
        open_embeddings(tmp_path)


def test_no_embeddings(tmp_path):
    write_embedding_dir(tmp_path, np.zeros((0, 3), np.float32), embedded_count=0)
    with pytest.raises(EmbeddingStoreError, match="no embeddings"):
        open_embeddings(tmp_path)


def test_wrong_width_shard(tmp_path):
    write_embedding_dir(tmp_path, np.eye(3, dtype=np.float32))
    manifest = json.loads((tmp_path / schema.MANIFEST_FILE).read_text())
    manifest["dim"] = 4
    (tmp_path / schema.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(EmbeddingStoreError, match="3 values but the manifest says dim=4"):
        open_embeddings(tmp_path)


def test_variable_list_column_is_accepted_and_ragged_refused(tmp_path):
    write_embedding_dir(tmp_path, np.eye(2, dtype=np.float32))
    shard = tmp_path / schema.EMBEDDINGS_DIR / "part-00000.parquet"
    table = pa.table({
        "id": ["a", "b"], "source": ["x", "y"], "embedding": pa.array([[1.0, 0.0], [0.0, 1.0]], pa.list_(pa.float32()))
    })
    pq.write_table(table, shard)
    np.testing.assert_array_equal(open_embeddings(tmp_path).embeddings, np.eye(2))
    table = pa.table({"id": ["a", "b"], "source": ["x", "y"], "embedding": pa.array([[1.0, 0.0], [0.0]])})
    pq.write_table(table, shard)
    with pytest.raises(EmbeddingStoreError, match="manifest says dim=2"):
        open_embeddings(tmp_path)


def test_corrupt_shard(tmp_path):
    write_embedding_dir(tmp_path, np.eye(3, dtype=np.float32))
    (tmp_path / schema.EMBEDDINGS_DIR / "part-00000.parquet").write_bytes(b"garbage")
    with pytest.raises(EmbeddingStoreError, match="unreadable Parquet shard"):
        open_embeddings(tmp_path)


def test_ids_sources_and_fingerprint(tmp_path):
    write_embedding_dir(tmp_path, np.eye(3, dtype=np.float32), shard_rows=2)
    got = open_embeddings(tmp_path)
    assert got.ids == ["id00000", "id00001", "id00002"] and len(got.shard_files) == 2
    assert got.sources == ["/data/img00000.jpg", "/data/img00001.jpg", "/data/img00002.jpg"]
    before = fingerprint(tmp_path)
    assert fingerprint(tmp_path) == before
    time.sleep(0.01)
    write_embedding_dir(tmp_path, 2 * np.eye(3, dtype=np.float32), shard_rows=2)
    assert fingerprint(tmp_path) != before


def test_embeddings_are_writable_numpy_memory(tmp_path):
    write_embedding_dir(tmp_path, np.eye(3, dtype=np.float32))
    emb = open_embeddings(tmp_path)
    emb.embeddings[0, 0] = 5.0  # a single float32 shard must not be a read-only Arrow view
    assert emb.embeddings[0, 0] == 5.0


def test_manifest_fields_of_the_wrong_type_are_named(tmp_path):
    write_embedding_dir(tmp_path, np.eye(3, dtype=np.float32))
    mpath = tmp_path / schema.MANIFEST_FILE
    good = json.loads(mpath.read_text())
    for change, message in (({"counts": ["x"]}, "'counts' is \\['x'\\], not a JSON object"),
                            ({"counts": {"embedded": 2.5}}, "'counts.embedded' is 2.5, not a count"),
                            ({"dim": "3.5"}, "'dim' is '3.5', not a positive integer"),
                            ({"complete": 1}, "'complete' is 1, not true or false")):
        mpath.write_text(json.dumps({**good, **change}))
        with pytest.raises(EmbeddingStoreError, match=f"manifest.json: manifest {message}"):
            open_embeddings(tmp_path)
    mpath.write_text(json.dumps({**good, "dim": "3", "counts": {"embedded": 3, "by_stage": {"decode": 1}}}))
    assert read_manifest(tmp_path)["dim"] == 3 and len(open_embeddings(tmp_path)) == 3


def test_weights_fingerprint_of():
    assert weights_fingerprint_of({"encoder": {"weights_fingerprint": "sha256:ab"}}) == "sha256:ab"
    assert weights_fingerprint_of({"encoder": {"spec": "clip:/m"}}) is None
    assert weights_fingerprint_of({"encoder": None}) is None


# --- damaged shards are refused at index building, naming the shard (item 13) ------------------------
def _rewrite_ids(shard, ids) -> None:
    table = pq.read_table(shard)
    pq.write_table(table.set_column(table.schema.get_field_index(schema.COL_ID), schema.COL_ID, ids), shard)


def test_a_shard_with_integer_ids_is_refused_naming_it(tmp_path):
    import phiclip.retrieval as S

    write_embedding_dir(tmp_path, np.eye(4, dtype=np.float32), shard_rows=2)
    shard = tmp_path / schema.EMBEDDINGS_DIR / "part-00001.parquet"
    _rewrite_ids(shard, pa.array([7, 8], pa.int64()))
    for call in (lambda: open_embeddings(tmp_path), lambda: S.build_index(tmp_path)):
        with pytest.raises(EmbeddingStoreError, match=f"{shard}: column 'id' holds int64, not strings"):
            call()


def test_a_shard_with_repeated_ids_is_refused_naming_it(tmp_path):
    import phiclip.retrieval as S

    write_embedding_dir(tmp_path, np.eye(4, dtype=np.float32), ids=["a", "b", "c", "d"], shard_rows=2)
    first, second = sorted((tmp_path / schema.EMBEDDINGS_DIR).glob("*.parquet"))
    _rewrite_ids(second, pa.array(["c", "c"]))
    with pytest.raises(EmbeddingStoreError, match=f"{second}: id 'c' appears twice in {second}"):
        S.build_index(tmp_path)
    _rewrite_ids(second, pa.array(["b", "d"]))  # a row copied from another shard
    with pytest.raises(EmbeddingStoreError, match=f"{second}: id 'b' appears in {first} and in {second}"):
        S.build_index(tmp_path)
    assert not (tmp_path / schema.INDEX_DIR / "index.faiss").exists()
