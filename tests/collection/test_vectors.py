"""read_vectors: embed output folders and Parquet files, and a clear error for each kind of bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _embdir import write_embedding_dir

from phiclip.collection.vectors import CollectionInputError, l2_normalize, read_vectors, vector_set


def _vectors(n: int = 6, d: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def _parquet(path: Path, columns: dict) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def test_embed_output_folder(tmp_path):
    vec = _vectors(7)
    root = write_embedding_dir(tmp_path / "out", vec, shard_rows=3, normalized=False)
    vs = read_vectors(root)
    assert vs.ids == [f"id{i:05d}" for i in range(7)]
    assert vs.sources == [f"/data/img{i:05d}.jpg" for i in range(7)]
    assert vs.manifest["dim"] == 4 and vs.labels is None and vs.path == root
    assert vs.vectors.dtype == np.float32 and np.array_equal(vs.vectors, vec)
    unit = vs.normalized()
    assert unit.dtype == np.float32
    assert np.allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-6)
    assert np.array_equal(vs.vectors, vec)  # the copy is separate
    assert len(vs) == 7 and vs.dim == 4


def test_embed_output_folder_problems(tmp_path):
    vec = _vectors(3)
    vec[1, 2] = np.nan
    root = write_embedding_dir(tmp_path / "nan", vec)
    with pytest.raises(CollectionInputError, match=r"nan.*1 vectors contain NaN.*'id00001'"):
        read_vectors(root)
    dup = write_embedding_dir(tmp_path / "dup", _vectors(3), ids=["a", "b", "a"])
    with pytest.raises(CollectionInputError, match=r"dup.*id 'a' appears twice"):
        read_vectors(dup)
    unfinished = write_embedding_dir(tmp_path / "unfinished", _vectors(3), complete=False)
    with pytest.raises(CollectionInputError, match="not finished"):
        read_vectors(unfinished)
    assert len(read_vectors(unfinished, allow_incomplete=True)) == 3
    with pytest.raises(CollectionInputError, match="no label column"):
        read_vectors(write_embedding_dir(tmp_path / "ok", _vectors(3)), label_column="label")
    with pytest.raises(CollectionInputError, match="not an embedding output"):
        read_vectors(tmp_path)


@pytest.mark.parametrize("kind", ["fixed", "list", "large_list", "float64"])
def test_parquet_vector_column_types(tmp_path, kind):
    vec = _vectors(5, 3)
    if kind == "fixed":
        col = pa.FixedSizeListArray.from_arrays(pa.array(vec.reshape(-1), pa.float32()), 3)
    elif kind == "list":
        col = pa.array(vec.tolist(), pa.list_(pa.float32()))
    elif kind == "large_list":
        col = pa.array(vec.tolist(), pa.large_list(pa.float16()))
    else:
        col = pa.array(vec.astype(np.float64).tolist(), pa.list_(pa.float64()))
    path = _parquet(
        tmp_path / "v.parquet", {"id": [f"r{i}" for i in range(5)], "name": list("abcde"), "vec": col}
    )
    vs = read_vectors(path)
    assert vs.ids == ["r0", "r1", "r2", "r3", "r4"]
    atol = 1e-3 if kind == "large_list" else 0
    assert vs.vectors.dtype == np.float32 and np.allclose(vs.vectors, vec, atol=atol, rtol=atol)
    assert vs.sources is None and vs.manifest is None


def test_parquet_named_columns_and_labels(tmp_path):
    vec = _vectors(4, 2)
    path = _parquet(
        tmp_path / "v.parquet",
        {
            "key": ["w", "x", "y", "z"],
            "a": pa.array(vec.tolist(), pa.list_(pa.float32())),
            "b": pa.array((2 * vec).tolist(), pa.list_(pa.float32())),
            "label": ["cat", "dog", None, "cat"],
            "source": ["/p/w.jpg", "/p/x.jpg", "/p/y.jpg", "/p/z.jpg"],
        },
    )
    vs = read_vectors(path, vector_column="b", id_column="key", label_column="label")
    assert vs.ids == ["w", "x", "y", "z"]
    assert np.allclose(vs.vectors, 2 * vec)
    assert vs.labels == ["cat", "dog", "", "cat"]
    assert vs.sources == ["/p/w.jpg", "/p/x.jpg", "/p/y.jpg", "/p/z.jpg"]
    with pytest.raises(
        CollectionInputError, match=r"v\.parquet: 2 list-typed columns \(a, b\); name the vector column"
    ):
        read_vectors(path, id_column="key")
    with pytest.raises(CollectionInputError, match="no column 'c'"):
        read_vectors(path, vector_column="c", id_column="key")
    with pytest.raises(CollectionInputError, match="'label' has type string, not a list of numbers"):
        read_vectors(path, vector_column="label", id_column="key")
    with pytest.raises(CollectionInputError, match="no label column 'tag'"):
        read_vectors(path, vector_column="a", id_column="key", label_column="tag")


def test_parquet_problems_name_the_file_and_the_fix(tmp_path):
    good = pa.array(_vectors(3, 2).tolist(), pa.list_(pa.float32()))
    no_id = _parquet(tmp_path / "noid.parquet", {"name": ["a", "b", "c"], "vec": good})
    with pytest.raises(
        CollectionInputError, match=r"noid\.parquet: no 'id' column \(columns: name, vec\); add a column"
    ):
        read_vectors(no_id)
    no_vec = _parquet(tmp_path / "novec.parquet", {"id": ["a", "b", "c"], "x": [1.0, 2.0, 3.0]})
    with pytest.raises(
        CollectionInputError, match=r"novec\.parquet: no vector column.*write the vectors as a list"
    ):
        read_vectors(no_vec)
    ragged = _parquet(
        tmp_path / "ragged.parquet",
        {"id": ["a", "b", "c", "d"], "vec": pa.array([[1.0, 2.0], [1.0, 2.0, 3.0], [0.0, 1.0], [5.0, 5.0]])},
    )
    with pytest.raises(
        CollectionInputError, match=r"ragged\.parquet: ragged vectors.*2 \(3 rows\), 3 \(1 rows\).*'b'"
    ):
        read_vectors(ragged)
    nan = _parquet(
        tmp_path / "nan.parquet",
        {"id": ["a", "b", "c"], "vec": pa.array([[1.0, 0.0], [np.nan, 0.0], [np.inf, 1.0]])},
    )
    with pytest.raises(
        CollectionInputError, match=r"nan\.parquet: 2 vectors contain NaN or infinite values \(ids 'b', 'c'\)"
    ):
        read_vectors(nan)
    dup = _parquet(tmp_path / "dup.parquet", {"id": ["a", "b", "a", "b", "c"], "vec": pa.array([[1.0]] * 5)})
    with pytest.raises(CollectionInputError, match=r"dup\.parquet: 2 ids occur more than once \('a', 'b'\)"):
        read_vectors(dup)
    null_vec = _parquet(
        tmp_path / "null.parquet", {"id": ["a", "b"], "vec": pa.array([[1.0], None], pa.list_(pa.float32()))}
    )
    with pytest.raises(CollectionInputError, match=r"null\.parquet: 1 rows have no vector.*'b'"):
        read_vectors(null_vec)
    null_id = _parquet(tmp_path / "nullid.parquet", {"id": ["a", None], "vec": pa.array([[1.0], [2.0]])})
    with pytest.raises(CollectionInputError, match="1 rows have no 'id'"):
        read_vectors(null_id)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(CollectionInputError, match=r"junk\.parquet: not a readable Parquet file"):
        read_vectors(tmp_path / "junk.parquet")
    with pytest.raises(CollectionInputError, match="no such file or folder"):
        read_vectors(tmp_path / "missing.parquet")


def test_vector_set_in_memory_and_normalisation():
    vs = vector_set(["a", "b"], np.array([[3.0, 4.0], [0.0, 0.0]]))
    assert vs.vectors.dtype == np.float32
    assert np.allclose(vs.normalized(), [[0.6, 0.8], [0.0, 0.0]])  # a zero row stays zero
    with pytest.raises(CollectionInputError, match="2 ids occur|1 ids occur"):
        vector_set(["a", "a"], np.ones((2, 2)))
    with pytest.raises(CollectionInputError, match="shape"):
        vector_set(["a"], np.ones((2, 2)))
    assert l2_normalize(np.array([[1, 1]])).dtype == np.float64


# --- read_vectors_into_memmap: the same ids and (normalised) vectors, chunk by chunk into a memory map -------


@pytest.mark.parametrize("chunk_rows", [1, 4, 1000])
def test_memmap_reader_equals_the_in_memory_reader(tmp_path, chunk_rows):
    from phiclip.collection.vectors import normalize_in_place, read_vectors_into_memmap

    vec = _vectors(11, 5) * 3
    vec[4] = 0.0  # an all-zero row stays zero
    sources = [f"/data/{i}.jpg" for i in range(11)]
    folder = write_embedding_dir(tmp_path / "out", vec, shard_rows=3, normalized=False, sources=sources)
    table = _parquet(tmp_path / "v.parquet", {"id": [f"r{i}" for i in range(11)], "source": sources,
                                              "emb": pa.array(list(vec.astype(np.float16)), pa.list_(pa.float16()))})
    for path in (folder, table):
        whole = read_vectors(path)
        mapped = read_vectors_into_memmap(path, tmp_path / "maps", chunk_rows=chunk_rows)
        assert isinstance(mapped.vectors, np.memmap) and mapped.vectors.dtype == np.float32
        assert mapped.ids == whole.ids and mapped.sources == whole.sources
        assert np.array_equal(mapped.vectors, normalize_in_place(np.array(whole.vectors)))
        assert np.array_equal(mapped.vectors, whole.normalized())  # l2_normalize's values exactly
        in_ram = read_vectors_into_memmap(path, None, chunk_rows=chunk_rows)  # one array in memory, same values
        assert not isinstance(in_ram.vectors, np.memmap) and np.array_equal(in_ram.vectors, mapped.vectors)
    assert list((tmp_path / "maps").iterdir()) == []  # unlinked once mapped
    raw = read_vectors_into_memmap(table, tmp_path / "maps", normalize=False)
    assert np.array_equal(raw.vectors, read_vectors(table).vectors)


def test_memmap_reader_refuses_what_read_vectors_refuses(tmp_path):
    from phiclip.collection.vectors import read_vectors_into_memmap

    bad = _vectors(6)
    bad[5, 1] = np.inf
    with pytest.raises(CollectionInputError, match=r"1 vectors contain NaN.*'id00005'"):
        read_vectors_into_memmap(write_embedding_dir(tmp_path / "inf", bad), tmp_path / "m", chunk_rows=2)
    dup = write_embedding_dir(tmp_path / "dup", _vectors(3), ids=["a", "b", "a"])
    with pytest.raises(CollectionInputError, match=r"dup.*'a'"):
        read_vectors_into_memmap(dup, tmp_path / "m")
    short = write_embedding_dir(tmp_path / "short", _vectors(3), embedded_count=4)
    with pytest.raises(CollectionInputError, match="counts 4 embedded inputs but the shards hold 3 rows"):
        read_vectors_into_memmap(short, None)
    with pytest.raises(CollectionInputError, match="not finished"):
        read_vectors_into_memmap(write_embedding_dir(tmp_path / "unfinished", _vectors(3), complete=False), tmp_path / "m")
    ragged = _parquet(tmp_path / "ragged.parquet", {"id": ["a", "b", "c"], "v": [[1.0, 2.0], [1.0, 2.0], [1.0]]})
    with pytest.raises(CollectionInputError, match="width 1 after 2 rows of width 2"):
        read_vectors_into_memmap(ragged, tmp_path / "m", chunk_rows=2)
    with pytest.raises(CollectionInputError, match="no 'id' column"):
        read_vectors_into_memmap(_parquet(tmp_path / "noid.parquet", {"v": [[1.0]]}), tmp_path / "m")
    with pytest.raises(CollectionInputError, match="no such file"):
        read_vectors_into_memmap(tmp_path / "absent.parquet", tmp_path / "m")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CollectionInputError, match="cannot hold the memory-mapped vectors"):
        read_vectors_into_memmap(_parquet(tmp_path / "ok.parquet", {"id": ["a"], "v": [[1.0]]}), tmp_path / "file" / "sub")
