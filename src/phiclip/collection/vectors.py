"""The input of every collection command: ids and vectors, from an embed output folder or a Parquet file.

:func:`read_vectors` accepts either

* the ``--output`` folder of ``phiclip embed`` (read through :func:`phiclip.store.open_embeddings`;
  ids, sources and the manifest come with the vectors), or
* a Parquet file with an ``id`` column and one vector column: a ``list<float>`` or
  ``fixed_size_list<float>`` column, named by the caller or found as the file's only list-typed column;
  an optional label column is read as text.

Every problem is a :class:`CollectionInputError` naming the file and what to do about it: no id column,
no (or more than one candidate) vector column, rows of different widths, missing vectors, NaN or
infinite values, duplicate ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from phiclip import schema
from phiclip.store import EmbeddingStoreError, check_complete, open_embeddings, read_manifest, shard_files

__all__ = [
    "CollectionInputError",
    "VectorSet",
    "l2_normalize",
    "normalize_in_place",
    "read_vectors",
    "read_vectors_into_memmap",
    "vector_set",
]


class CollectionInputError(ValueError):
    """The input of a collection command is missing, malformed or inconsistent."""


def normalize_in_place(vectors: np.ndarray) -> np.ndarray:
    """Divide each row of a writeable float matrix by its L2 norm, in place (all-zero rows stay zero);
    row by row the same arithmetic as :func:`l2_normalize`, so a matrix normalised in chunks of rows
    equals one normalised whole. Returns ``vectors``."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    np.divide(vectors, norms, out=vectors, where=norms > 0)
    return vectors


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """A copy of ``vectors`` (n, d) with each row divided by its L2 norm; all-zero rows stay zero.

    The dtype is kept for floating inputs (float32 stays float32), integers become float64.
    """
    x = np.array(vectors, dtype=np.result_type(vectors.dtype, np.float32), copy=True)
    if x.ndim != 2:
        raise ValueError(f"expected a (n, d) matrix, got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    return x


@dataclass
class VectorSet:
    """Ids and vectors of one collection, row i of ``vectors`` belonging to ``ids[i]``.

    ``vectors`` is (n, d) float32 as stored (not normalised unless the writer normalised them);
    :meth:`normalized` gives an L2-normalised copy. ``sources`` (image paths of an embed output) and
    ``labels`` (a label column of a Parquet input) are ``None`` when the input has none.
    """

    path: Path | None
    ids: list[str]
    vectors: np.ndarray
    sources: list[str] | None = None
    labels: list[str] | None = None
    manifest: dict[str, Any] | None = None
    _normalized: np.ndarray | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        """Width of the vectors."""
        return int(self.vectors.shape[1])

    def normalized(self) -> np.ndarray:
        """The vectors divided by their L2 norms (float32, computed once; all-zero rows stay zero)."""
        if self._normalized is None:
            self._normalized = l2_normalize(self.vectors)
        return self._normalized

    def index_of(self) -> dict[str, int]:
        """``{id: row}``."""
        return {i: n for n, i in enumerate(self.ids)}


def _where(path: Path | None) -> str:
    return str(path) if path is not None else "<vectors>"


def _check_vectors(vectors: np.ndarray, ids: list[str], path: Path | None) -> None:
    """Refuse NaN / infinite values and duplicate ids, naming the first offenders."""
    _check_finite(vectors, ids, path)
    _check_unique_ids(ids, path)


def _check_finite(vectors: np.ndarray, ids: list[str], path: Path | None) -> None:
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        names = ", ".join(repr(ids[r]) for r in rows[:5])
        raise CollectionInputError(
            f"{_where(path)}: {len(rows)} vectors contain NaN or infinite values (ids {names}"
            f"{', ...' if len(rows) > 5 else ''}); embed those inputs again or drop their rows"
        )


def _check_unique_ids(ids: list[str], path: Path | None) -> None:
    where = _where(path)
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dups: list[str] = []
        for i in ids:
            if i in seen and i not in dups:
                dups.append(i)
            seen.add(i)
        names = ", ".join(repr(d) for d in dups[:5])
        raise CollectionInputError(
            f"{where}: {len(dups)} ids occur more than once ({names}{', ...' if len(dups) > 5 else ''}); "
            "each row needs its own id: drop the repeated rows (an embed output folder that mixes two runs: "
            "embed again into an empty folder)"
        )


def vector_set(
    ids: list[str],
    vectors: np.ndarray,
    *,
    sources: list[str] | None = None,
    labels: list[str] | None = None,
) -> VectorSet:
    """A :class:`VectorSet` from arrays in memory, checked like a file (finite values, unique ids).

    ``vectors`` is converted to float32 (n, d).
    """
    mat = np.ascontiguousarray(vectors, dtype=np.float32)
    if mat.ndim != 2 or mat.shape[0] != len(ids):
        raise CollectionInputError(
            f"<vectors>: {len(ids)} ids but vectors of shape {mat.shape}; give (n, d) rows"
        )
    for name, col in (("sources", sources), ("labels", labels)):
        if col is not None and len(col) != len(ids):
            raise CollectionInputError(f"<vectors>: {len(ids)} ids but {len(col)} {name}")
    ids = [str(i) for i in ids]
    _check_vectors(mat, ids, None)
    return VectorSet(None, ids, mat, sources=sources, labels=labels)


def _is_list_type(typ: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ)


def _is_numeric(typ: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_floating(typ) or pa.types.is_integer(typ)


def _vector_column_name(table: Any, path: Path, vector_column: str | None) -> str:
    names = table.column_names
    if vector_column is not None:
        if vector_column not in names:
            raise CollectionInputError(
                f"{path}: no column {vector_column!r} (columns: {', '.join(names)}); name the vector column "
                "with vector_column= (--vector-column)"
            )
        typ = table.schema.field(vector_column).type
        if not _is_list_type(typ) or not _is_numeric(typ.value_type):
            raise CollectionInputError(
                f"{path}: column {vector_column!r} has type {typ}, not a list of numbers; name the column "
                "that holds the vectors"
            )
        return vector_column
    candidates = [n for n in names if _is_list_type(table.schema.field(n).type)]
    if not candidates:
        raise CollectionInputError(
            f"{path}: no vector column (a list<float> or fixed_size_list<float> column); columns are "
            f"{', '.join(names)}: write the vectors as a list column"
        )
    if len(candidates) > 1:
        raise CollectionInputError(
            f"{path}: {len(candidates)} list-typed columns ({', '.join(candidates)}); name the vector column "
            "with vector_column= (--vector-column)"
        )
    typ = table.schema.field(candidates[0]).type
    if not _is_numeric(typ.value_type):
        raise CollectionInputError(
            f"{path}: the only list column {candidates[0]!r} has type {typ}, not a list of numbers; "
            "write the vectors as list<float>"
        )
    return candidates[0]


def _matrix(column: Any, path: Path, name: str, ids: list[str]) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if arr.null_count:
        rows = np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))
        raise CollectionInputError(
            f"{path}: {len(rows)} rows have no vector in column {name!r} (ids "
            f"{', '.join(repr(ids[r]) for r in rows[:5])}); drop those rows or embed them again"
        )
    n = len(arr)
    if pa.types.is_fixed_size_list(arr.type):
        width = arr.type.list_size
    else:
        lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
        width = int(lengths[0]) if n else 0
        if n and (lengths != width).any():
            widths, counts = np.unique(lengths, return_counts=True)
            common = int(widths[np.argmax(counts)])
            odd = np.flatnonzero(lengths != common)
            raise CollectionInputError(
                f"{path}: ragged vectors in column {name!r}: widths "
                f"{', '.join(f'{w} ({c} rows)' for w, c in zip(widths.tolist(), counts.tolist()))}; e.g. ids "
                f"{', '.join(repr(ids[r]) for r in odd[:5])} differ from the usual {common}. Every row needs the "
                "same width: drop the odd rows or embed everything with one encoder"
            )
    if n and width == 0:
        raise CollectionInputError(f"{path}: the vectors in column {name!r} are empty (width 0)")
    values = arr.flatten()
    if values.null_count:
        raise CollectionInputError(
            f"{path}: {values.null_count} values inside the vectors of column {name!r} are null; "
            "drop or recompute those rows"
        )
    flat = values.to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(flat.reshape(n, width), dtype=np.float32)


def _read_parquet(
    path: Path, vector_column: str | None, id_column: str, label_column: str | None
) -> VectorSet:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds for damaged files
        raise CollectionInputError(
            f"{path}: not a readable Parquet file ({type(e).__name__}: {e}); give an embed output folder or a "
            "Parquet file with an id column and a vector column"
        ) from None
    names = table.column_names
    if id_column not in names:
        raise CollectionInputError(
            f"{path}: no {id_column!r} column (columns: {', '.join(names)}); add a column {id_column!r} with "
            "one unique text id per row, or name the id column with id_column= (--id-column)"
        )
    id_arr = table.column(id_column)
    if id_arr.null_count:
        raise CollectionInputError(
            f"{path}: {id_arr.null_count} rows have no {id_column!r}; every row needs an id"
        )
    ids = [str(x) for x in id_arr.to_pylist()]
    vname = _vector_column_name(table, path, vector_column)
    vectors = _matrix(table.column(vname), path, vname, ids)
    labels = None
    if label_column is not None:
        if label_column not in names:
            raise CollectionInputError(
                f"{path}: no label column {label_column!r} (columns: {', '.join(names)}); name an existing column"
            )
        labels = ["" if v is None else str(v) for v in table.column(label_column).to_pylist()]
    sources = None
    if schema.COL_SOURCE in names and schema.COL_SOURCE != vname:
        sources = ["" if v is None else str(v) for v in table.column(schema.COL_SOURCE).to_pylist()]
    if not ids:
        raise CollectionInputError(f"{path}: no rows")
    _check_vectors(vectors, ids, path)
    return VectorSet(path, ids, vectors, sources=sources, labels=labels)


def _batches(
    p: Path, vector_column: str | None, id_column: str, allow_incomplete: bool, chunk_rows: int
) -> tuple[int, str, bool, Any, int | None]:
    """``(rows, vector column, has sources, batches, expected width)`` of an embed output folder or a
    Parquet file, its vectors read ``chunk_rows`` rows at a time (:func:`read_vectors_into_memmap`)."""
    import pyarrow.parquet as pq

    if p.is_dir():
        try:
            manifest = read_manifest(p)
            check_complete(p, manifest, allow_incomplete)
        except EmbeddingStoreError as e:
            raise CollectionInputError(str(e)) from None
        shards = shard_files(p)
        if not shards:
            raise CollectionInputError(f"{p}: no embedding shards under {schema.EMBEDDINGS_DIR}/; embed into it first")
        files = [pq.ParquetFile(s) for s in shards]
        rows = sum(f.metadata.num_rows for f in files)
        expected = (manifest.get("counts") or {}).get("embedded")  # as open_embeddings checks it
        if manifest.get("complete") is not False and isinstance(expected, int) and expected != rows:
            raise CollectionInputError(
                f"{p}: the manifest counts {expected} embedded inputs but the shards hold {rows} rows; "
                "a shard is missing or extra, rerun `phiclip embed` into an empty directory"
            )
        columns = [schema.COL_ID, schema.COL_SOURCE, schema.COL_EMBEDDING]
        batches = (b for f in files for b in _row_group_batches(f, columns, chunk_rows))
        return rows, schema.COL_EMBEDDING, True, batches, int(manifest["dim"])
    if not p.exists():
        raise CollectionInputError(
            f"{p}: no such file or folder; give the --output folder of `phiclip embed` or a Parquet file"
        )
    try:
        f = pq.ParquetFile(p)
        names = f.schema_arrow.names
    except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds for damaged files
        raise CollectionInputError(
            f"{p}: not a readable Parquet file ({type(e).__name__}: {e}); give an embed output folder or a "
            "Parquet file with an id column and a vector column"
        ) from None
    if id_column not in names:
        raise CollectionInputError(
            f"{p}: no {id_column!r} column (columns: {', '.join(names)}); add a column {id_column!r} with "
            "one unique text id per row, or name the id column with id_column= (--id-column)"
        )
    vname = _vector_column_name(f.schema_arrow.empty_table(), p, vector_column)
    sources = schema.COL_SOURCE in names and schema.COL_SOURCE != vname
    columns = [id_column, vname] + ([schema.COL_SOURCE] if sources else [])
    return f.metadata.num_rows, vname, sources, _row_group_batches(f, columns, chunk_rows), None


def _row_group_batches(f: Any, columns: list[str], chunk_rows: int) -> Any:
    """The record batches of a Parquet file, one row group at a time, Arrow's pool told to give freed
    memory back after each batch: without that its allocator keeps what it freed (measured: about the size
    of the file read), so reading in chunks would hold as much memory as reading whole."""
    import pyarrow as pa

    pool = pa.default_memory_pool()
    for g in range(f.metadata.num_row_groups):
        for batch in f.iter_batches(batch_size=chunk_rows, row_groups=[g], columns=columns, use_threads=False):
            yield batch
            del batch
            pool.release_unused()


def _mapped_file(out: Path, n: int, d: int) -> np.memmap:
    """A writeable float32 (n, d) memory map of a new file in ``out``, unlinked once mapped."""
    import os
    import tempfile

    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="phiclip-vectors-", suffix=".f32", dir=out)
        os.close(fd)
        mm = np.memmap(name, dtype=np.float32, mode="w+", shape=(n, d))
        os.unlink(name)  # mapped: the space is freed when the map is
    except OSError as e:
        raise CollectionInputError(
            f"{out}: cannot hold the memory-mapped vectors ({n:,} x {d} float32 = {n * d * 4 / 1e9:.2f} GB): "
            f"{e.strerror or e}; give a folder on a disk with room (--memmap-dir)"
        ) from None
    return mm


def read_vectors_into_memmap(
    path: str | Path,
    folder: str | Path | None,
    *,
    vector_column: str | None = None,
    id_column: str = schema.COL_ID,
    allow_incomplete: bool = False,
    normalize: bool = True,
    chunk_rows: int = 65_536,
) -> VectorSet:
    """Read ids and vectors like :func:`read_vectors`, the vectors into a float32 memory map instead of memory
    (or, with ``folder=None``, into one array in memory, read the same way).

    The vectors are read ``chunk_rows`` rows at a time (Parquet record batches), checked (widths, nulls,
    NaN / infinity), L2-normalised when ``normalize`` (:func:`normalize_in_place`, so the values equal
    :func:`l2_normalize`'s) and written into a file in ``folder``, which is unlinked as soon as it is
    mapped: it takes disk space while the returned ``VectorSet.vectors`` (a writeable ``np.memmap``) lives
    and never outlives the process. The resident memory is then the pages the kernel keeps cached (file
    pages, given back under memory pressure), not a copy of every vector: a collection larger than RAM can
    be read. With ``folder=None`` the vectors go into one array in memory: the matrix and one chunk at a
    time, where :func:`read_vectors` holds the whole Arrow table besides. Ids and sources are Python lists,
    as :func:`read_vectors` gives them.

    Raises:
        CollectionInputError: as :func:`read_vectors`, and for a ``folder`` that cannot hold the file.
    """
    p = Path(path).expanduser()
    n, vname, has_sources, batches, width = _batches(p, vector_column, id_column, allow_incomplete, chunk_rows)
    id_name = schema.COL_ID if p.is_dir() else id_column
    if n == 0:
        raise CollectionInputError(f"{p}: no rows")
    ids: list[str] = []
    sources: list[str] | None = [] if has_sources else None
    mm: np.ndarray | None = None
    start = 0
    for batch in batches:
        id_arr = batch.column(id_name)
        if id_arr.null_count:
            raise CollectionInputError(f"{p}: {id_arr.null_count} rows have no {id_column!r}; every row needs an id")
        chunk_ids = [str(x) for x in id_arr.to_pylist()]
        block = _matrix(batch.column(vname), p, vname, chunk_ids)
        if mm is None:
            d = block.shape[1]
            if width is not None and d != width:
                raise CollectionInputError(f"{p}: the shards hold {d}-d vectors but the manifest says {width}")
            if folder is None:
                mm = np.empty((n, d), dtype=np.float32)
            else:
                mm = _mapped_file(Path(folder).expanduser(), n, d)
        elif block.shape[1] != mm.shape[1]:
            raise CollectionInputError(
                f"{p}: vectors of width {block.shape[1]} after {start:,} rows of width {mm.shape[1]}; every row "
                "needs the same width"
            )
        _check_finite(block, chunk_ids, p)
        rows = mm[start:start + len(block)]
        rows[...] = block
        if normalize:
            normalize_in_place(rows)
        start += len(block)
        ids.extend(chunk_ids)
        if sources is not None:
            sources.extend("" if v is None else str(v) for v in batch.column(schema.COL_SOURCE).to_pylist())
    if mm is None or start != n:
        raise CollectionInputError(f"{p}: the metadata says {n:,} rows but {start:,} were read")
    if isinstance(mm, np.memmap):
        mm.flush()
    _check_unique_ids(ids, p)
    return VectorSet(p, ids, mm, sources=sources, manifest=read_manifest(p) if p.is_dir() else None)


def read_vectors(
    path: str | Path,
    *,
    vector_column: str | None = None,
    id_column: str = schema.COL_ID,
    label_column: str | None = None,
    allow_incomplete: bool = False,
) -> VectorSet:
    """Read ids and vectors from an embed output folder or a Parquet file.

    Args:
        path: the ``--output`` folder of ``phiclip embed``, or a ``.parquet`` file.
        vector_column: the Parquet column holding the vectors; by default the file's only list-typed
            column. Ignored for an embed output folder (its column is ``embedding``).
        id_column: the Parquet column holding the ids (``id``).
        label_column: a Parquet column read as text labels (``VectorSet.labels``); an embed output folder
            has none, so naming one there is an error.
        allow_incomplete: read an unfinished embed run instead of refusing it.

    Returns:
        A :class:`VectorSet` with float32 vectors.

    Raises:
        CollectionInputError: the path is missing, or any of the problems listed in the module docstring.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        if label_column is not None:
            raise CollectionInputError(
                f"{p}: an embed output folder has no label column ({label_column!r}); export ids, vectors and "
                "labels to one Parquet file and give that"
            )
        try:
            es = open_embeddings(p, allow_incomplete=allow_incomplete)
        except EmbeddingStoreError as e:
            raise CollectionInputError(str(e)) from None
        vectors = np.ascontiguousarray(es.embeddings, dtype=np.float32)
        _check_vectors(vectors, es.ids, p)
        return VectorSet(p, list(es.ids), vectors, sources=list(es.sources), manifest=es.manifest)
    if not p.exists():
        raise CollectionInputError(
            f"{p}: no such file or folder; give the --output folder of `phiclip embed` or a Parquet file"
        )
    return _read_parquet(p, vector_column, id_column, label_column)
