"""Read an embedding output directory (the layout in :mod:`phiclip.schema`) back into arrays.

Search, evaluation and compare all start here: :func:`open_embeddings` checks the manifest, reads
every ``embeddings/*.parquet`` shard in name order and returns ids, sources and one float32 matrix.
Problems (no manifest, an unfinished run, a shard of the wrong width, a row count that disagrees with
the manifest) raise :class:`EmbeddingStoreError` naming the directory and what to do about it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from phiclip import manifest as manifests
from phiclip import schema
from phiclip.manifest import ManifestError, encoder_spec_of, weights_fingerprint_of


class EmbeddingStoreError(ManifestError):
    """An embedding output directory is missing, unfinished or inconsistent."""


@dataclass
class EmbeddingSet:
    """The contents of one embedding output directory.

    ``embeddings`` is (n, dim) float32, row i belonging to ``ids[i]`` / ``sources[i]``; rows follow
    the shard files in name order, then the row order inside each shard. ``texts`` holds the
    ``text`` column of ``embed-text`` outputs (``None`` for images).
    """

    path: Path
    manifest: dict[str, Any]
    ids: list[str]
    sources: list[str]
    embeddings: np.ndarray
    texts: list[str] | None = None
    shard_files: list[Path] = field(default_factory=list)

    @property
    def dim(self) -> int:
        """Width of the vectors."""
        return int(self.embeddings.shape[1])

    @property
    def encoder_spec(self) -> str | None:
        """The spec string of the encoder that wrote the vectors (``manifest["encoder"]["spec"]``)."""
        return encoder_spec_of(self.manifest)

    def __len__(self) -> int:
        return len(self.ids)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Read and check ``manifest.json`` of an embedding output directory (:func:`phiclip.manifest.read_manifest`).

    Raises:
        EmbeddingStoreError: when it is absent, not JSON, lacks ``dim``/``encoder``, or a field has the
            wrong type (``dim`` not a positive integer, ``counts`` or ``encoder`` not an object, a count
            that is not a non-negative integer, ``complete`` not a boolean...).
    """
    manifest = manifests.read_manifest(path, error=EmbeddingStoreError)
    assert manifest is not None
    return manifest


def shard_files(path: str | Path) -> list[Path]:
    """The embedding shards of an output directory, in name order.

    Hidden and underscore-prefixed files (temporary names of a writer in progress) are skipped.
    """
    edir = Path(path) / schema.EMBEDDINGS_DIR
    if not edir.is_dir():
        return []
    return sorted(p for p in edir.glob("*.parquet") if p.is_file() and not p.name.startswith((".", "_")))


def error_files(path: str | Path) -> list[Path]:
    """The files of ``errors/`` (failed inputs, and ``skipped.parquet``: files not taken as inputs), in name
    order; hidden and underscore-prefixed files (a writer's temporary names) are skipped."""
    edir = Path(path) / schema.ERRORS_DIR
    if not edir.is_dir():
        return []
    return sorted(p for p in edir.glob("*.parquet") if p.is_file() and not p.name.startswith((".", "_")))


#: The columns of ``errors/`` rows that :func:`iter_errors` yields, in this order.
ERROR_COLUMNS = (schema.COL_SOURCE, schema.COL_STAGE, schema.COL_REASON)


def count_errors(path: str | Path) -> int:
    """How many rows ``errors/`` holds (failed and skipped inputs); unreadable files count 0."""
    import pyarrow.parquet as pq

    total = 0
    for f in error_files(path):
        try:
            total += pq.ParquetFile(f).metadata.num_rows
        except Exception:  # noqa: BLE001 - a damaged errors file must not hide the others
            continue
    return total


def iter_errors(path: str | Path) -> Iterator[tuple[str | None, str | None, str | None]]:
    """``(source, stage, reason)`` of every row of ``errors/``, file by file; a missing column reads as
    ``None`` and an unreadable file is passed over (the errors are a report, never needed to read the vectors)."""
    import pyarrow.parquet as pq

    for f in error_files(path):
        try:
            names = set(pq.read_schema(f).names)
            table = pq.read_table(f, columns=[c for c in ERROR_COLUMNS if c in names])
        except Exception:  # noqa: BLE001 - pyarrow raises several kinds for damaged files
            continue
        cols = [table.column(c).to_pylist() if c in names else [None] * table.num_rows for c in ERROR_COLUMNS]
        yield from zip(*cols, strict=True)


def fingerprint(path: str | Path) -> str:
    """A short hash of the manifest and of each shard's name, size and modification time.

    It changes whenever ``phiclip embed`` rewrites or adds a shard, so an index built from older
    vectors can be recognised as stale without reading the vectors.
    """
    root = Path(path)
    h = hashlib.sha256()
    files = [root / schema.MANIFEST_FILE, *shard_files(root)]
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(root).as_posix()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def check_complete(root: str | Path, manifest: dict[str, Any], allow_incomplete: bool = False) -> None:
    """Refuse an unfinished run (manifest ``complete: false``) unless ``allow_incomplete``.

    Raises:
        EmbeddingStoreError: naming the directory, how to finish the run and how to use it anyway.
    """
    if manifest.get("complete") is False and not allow_incomplete:
        raise EmbeddingStoreError(
            f"{root}: the embedding run is not finished (manifest 'complete' is false); rerun the same "
            "`phiclip embed` command to finish it (it resumes), or pass --allow-incomplete "
            "(allow_incomplete=True in Python) to use what exists"
        )


def _check_fixed_list(table: Any, shard: Path, dim: int) -> None:
    import pyarrow as pa

    if schema.COL_EMBEDDING not in table.column_names:
        raise EmbeddingStoreError(f"{shard}: no {schema.COL_EMBEDDING!r} column; it was not written by `phiclip embed`")
    typ = table.schema.field(schema.COL_EMBEDDING).type
    if not (pa.types.is_fixed_size_list(typ) or pa.types.is_list(typ) or pa.types.is_large_list(typ)):
        raise EmbeddingStoreError(f"{shard}: column {schema.COL_EMBEDDING!r} has type {typ}, not a list of floats")
    if pa.types.is_fixed_size_list(typ) and typ.list_size != dim:
        raise EmbeddingStoreError(
            f"{shard}: vectors have {typ.list_size} values but the manifest says dim={dim}; "
            "the directory mixes two runs, embed again into an empty directory"
        )


def check_id_column(table_schema: Any, shard: Path) -> None:
    """Refuse a shard without an ``id`` column of strings (ids are hex digests; integers mean the shard
    was written by something else, or damaged).

    Raises:
        EmbeddingStoreError: naming the shard and the fix.
    """
    import pyarrow as pa

    if schema.COL_ID not in table_schema.names:
        raise EmbeddingStoreError(f"{shard}: no {schema.COL_ID!r} column; it was not written by `phiclip embed`")
    typ = table_schema.field(schema.COL_ID).type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
        raise EmbeddingStoreError(
            f"{shard}: column {schema.COL_ID!r} holds {typ}, not strings; the shard is damaged or was not written by "
            "`phiclip embed`: delete it and rerun the same `phiclip embed` command (it rewrites missing shards)"
        )


def _check_unique(ids: list[Any], shard: Path, seen: dict[str, Path]) -> None:
    """Refuse an id that is null or already seen (in this shard or an earlier one), naming the shards;
    ``seen`` maps every id read so far to its shard."""
    for i in ids:
        if i is None:
            raise EmbeddingStoreError(f"{shard}: a row has no {schema.COL_ID!r}; delete the shard and rerun "
                                      "the same `phiclip embed` command (it rewrites missing shards)")
        first = seen.get(i)
        if first is not None:
            where = f"twice in {shard}" if first == shard else f"in {first} and in {shard}"
            raise EmbeddingStoreError(
                f"{shard}: id {i!r} appears {where}; the output is damaged (a shard copied or written twice): "
                "delete the damaged shard and rerun the same `phiclip embed` command (it rewrites missing shards)"
            )
        seen[i] = shard


def _embedding_matrix(column: Any, shard: Path, dim: int) -> np.ndarray:
    """A (fixed size) list<float> column -> (rows, dim) float32, refusing nulls and ragged rows."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if arr.null_count:
        raise EmbeddingStoreError(f"{shard}: {arr.null_count} rows have no embedding; embed again into an empty directory")
    if not pa.types.is_fixed_size_list(arr.type):
        lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
        if len(lengths) and (lengths.min() != dim or lengths.max() != dim):
            raise EmbeddingStoreError(
                f"{shard}: vectors of {sorted(set(lengths.tolist()))[:5]} values but the manifest says dim={dim}"
            )
    values = arr.flatten().to_numpy(zero_copy_only=False)
    # (rows * dim,) -> (rows, dim)
    return values.reshape(len(arr), dim).astype(np.float32, copy=False)


def open_embeddings(path: str | Path, *, allow_incomplete: bool = False) -> EmbeddingSet:
    """Load every vector of an embedding output directory.

    Args:
        path: the ``--output`` directory of ``phiclip embed`` / ``embed-text``.
        allow_incomplete: read an unfinished run (``complete: false``) instead of refusing it.

    Returns:
        An :class:`EmbeddingSet` whose ``embeddings`` is (n, dim) float32 (float16 shards are widened).

    Raises:
        EmbeddingStoreError: no manifest, no shards, an unfinished run, wrong widths, or a row count
            that differs from ``manifest["counts"]["embedded"]`` in a finished run.
    """
    import pyarrow.parquet as pq

    manifest = read_manifest(path)
    root = Path(path).expanduser()
    check_complete(root, manifest, allow_incomplete)
    dim = manifest["dim"]
    shards = shard_files(root)
    ids: list[str] = []
    sources: list[str] = []
    texts: list[str] = []
    has_text = False
    blocks: list[np.ndarray] = []
    seen: dict[str, Path] = {}
    for shard in shards:
        try:
            table = pq.read_table(shard)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds for corrupt files
            raise EmbeddingStoreError(
                f"{shard}: unreadable Parquet shard ({type(e).__name__}: {e}); delete it and rerun `phiclip embed` "
                "(it rewrites missing shards)"
            ) from None
        check_id_column(table.schema, shard)
        _check_fixed_list(table, shard, dim)
        shard_ids = table.column(schema.COL_ID).to_pylist()
        _check_unique(shard_ids, shard, seen)
        ids.extend(shard_ids)
        if schema.COL_SOURCE in table.column_names:
            sources.extend("" if s is None else str(s) for s in table.column(schema.COL_SOURCE).to_pylist())
        else:
            sources.extend([""] * len(shard_ids))
        if schema.COL_TEXT in table.column_names:
            has_text = True
            texts.extend("" if t is None else str(t) for t in table.column(schema.COL_TEXT).to_pylist())
        else:
            texts.extend([""] * len(shard_ids))
        blocks.append(_embedding_matrix(table.column(schema.COL_EMBEDDING), shard, dim))
    if not shards or not ids:
        raise EmbeddingStoreError(
            f"{root}: no embeddings in {schema.EMBEDDINGS_DIR}/ (every input failed or nothing was embedded yet); "
            f"see {schema.ERRORS_DIR}/ and rerun `phiclip embed`"
        )
    expected = (manifest.get("counts") or {}).get("embedded")  # read_manifest checked its type
    if manifest.get("complete") is not False and isinstance(expected, int) and expected != len(ids):
        raise EmbeddingStoreError(
            f"{root}: the manifest counts {expected} embedded inputs but the shards hold {len(ids)} rows; "
            "a shard is missing or extra, rerun `phiclip embed` into an empty directory"
        )
    # One writable (n, dim) array owned by numpy (a single float32 shard would otherwise be a
    # read-only view of Arrow memory).
    matrix = np.concatenate(blocks, axis=0) if len(blocks) > 1 else np.array(blocks[0], dtype=np.float32)
    return EmbeddingSet(
        path=root,
        manifest=manifest,
        ids=ids,
        sources=sources,
        embeddings=np.ascontiguousarray(matrix, dtype=np.float32),
        texts=texts if has_text else None,
        shard_files=shards,
    )


__all__ = [
    "EmbeddingSet",
    "EmbeddingStoreError",
    "ERROR_COLUMNS",
    "check_complete",
    "count_errors",
    "encoder_spec_of",
    "error_files",
    "fingerprint",
    "iter_errors",
    "open_embeddings",
    "read_manifest",
    "shard_files",
    "weights_fingerprint_of",
]
