"""Read an embedding output directory (the layout in :mod:`phiclip.schema`) back into arrays.

Search, evaluation and compare all start here: :func:`open_embeddings` checks the manifest, reads
every ``embeddings/*.parquet`` shard in name order and returns ids, sources and one float32 matrix.
Problems (no manifest, an unfinished run, a shard of the wrong width, a row count that disagrees with
the manifest) raise :class:`EmbeddingStoreError` naming the directory and what to do about it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from phiclip import schema


class EmbeddingStoreError(ValueError):
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


def _readable_dir(path: str | Path) -> Path:
    root = Path(path).expanduser()
    if not root.exists():
        raise EmbeddingStoreError(f"{root}: no such directory; give the --output directory of `phiclip embed`")
    if not root.is_dir():
        raise EmbeddingStoreError(f"{root}: not a directory; give the --output directory of `phiclip embed`")
    return root


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Read and check ``manifest.json`` of an embedding output directory.

    Raises:
        EmbeddingStoreError: when it is absent, not JSON, lacks ``dim``/``encoder``, or a field that
            readers use has the wrong type (``dim`` not a positive integer, ``counts`` or ``encoder``
            not an object, ``counts.embedded`` not a count, ``complete`` not a boolean).
    """
    root = _readable_dir(path)
    mpath = root / schema.MANIFEST_FILE
    if not mpath.is_file():
        raise EmbeddingStoreError(
            f"{root}: not an embedding output directory (no {schema.MANIFEST_FILE}); "
            "create one with `phiclip embed ... --output DIR`"
        )
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise EmbeddingStoreError(f"{mpath}: unreadable manifest ({e}); rerun `phiclip embed` to rewrite it") from None
    if not isinstance(manifest, dict):
        raise EmbeddingStoreError(f"{mpath}: the manifest is not a JSON object; rerun `phiclip embed` to rewrite it")
    for key in ("dim", "encoder"):
        if key not in manifest:
            raise EmbeddingStoreError(f"{mpath}: the manifest has no {key!r}; rerun `phiclip embed` to rewrite it")
    dim = manifest["dim"]
    try:
        if isinstance(dim, bool) or not isinstance(dim, (int, float, str)) or int(dim) != float(dim) or int(dim) < 1:
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise EmbeddingStoreError(
            f"{mpath}: manifest 'dim' is {_short(dim)}, not a positive integer; rerun `phiclip embed` to rewrite it"
        ) from None
    manifest["dim"] = int(dim)
    _check_manifest_types(manifest, mpath)
    return manifest


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to about ``limit`` characters (for messages about damaged files)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_manifest_types(manifest: dict[str, Any], mpath: Path) -> None:
    """Refuse a manifest whose fields that readers use have the wrong JSON type."""
    fix = "the manifest is damaged; restore it, or embed again into an empty directory"
    counts = manifest.get("counts")
    if counts is not None:
        if not isinstance(counts, dict):
            raise EmbeddingStoreError(f"{mpath}: manifest 'counts' is {_short(counts)}, not a JSON object; {fix}")
        embedded = counts.get("embedded")
        if embedded is not None and (isinstance(embedded, bool) or not isinstance(embedded, int) or embedded < 0):
            raise EmbeddingStoreError(
                f"{mpath}: manifest 'counts.embedded' is {_short(embedded)}, not a count (a non-negative integer); {fix}"
            )
    complete = manifest.get("complete")
    if complete is not None and not isinstance(complete, bool):
        raise EmbeddingStoreError(f"{mpath}: manifest 'complete' is {_short(complete)}, not true or false; {fix}")
    encoder = manifest.get("encoder")
    if encoder is not None and not isinstance(encoder, dict):
        raise EmbeddingStoreError(f"{mpath}: manifest 'encoder' is {_short(encoder)}, not a JSON object; {fix}")


def encoder_spec_of(manifest: dict[str, Any]) -> str | None:
    """The encoder spec recorded in a manifest, or ``None`` when it records none."""
    enc = manifest.get("encoder")
    if isinstance(enc, dict):
        spec = enc.get("spec")
        return str(spec) if spec else None
    return None


def weights_fingerprint_of(manifest: dict[str, Any]) -> str | None:
    """The fingerprint of the encoder's weights recorded in a manifest
    (``manifest["encoder"]["weights_fingerprint"]``), or ``None`` when it records none."""
    enc = manifest.get("encoder")
    if isinstance(enc, dict):
        fp = enc.get("weights_fingerprint")
        return str(fp) if fp else None
    return None


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

    root = _readable_dir(path)
    manifest = read_manifest(root)
    check_complete(root, manifest, allow_incomplete)
    dim = manifest["dim"]
    shards = shard_files(root)
    ids: list[str] = []
    sources: list[str] = []
    texts: list[str] = []
    has_text = False
    blocks: list[np.ndarray] = []
    for shard in shards:
        try:
            table = pq.read_table(shard)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds for corrupt files
            raise EmbeddingStoreError(
                f"{shard}: unreadable Parquet shard ({type(e).__name__}: {e}); delete it and rerun `phiclip embed` "
                "(it rewrites missing shards)"
            ) from None
        if schema.COL_ID not in table.column_names:
            raise EmbeddingStoreError(f"{shard}: no {schema.COL_ID!r} column; it was not written by `phiclip embed`")
        _check_fixed_list(table, shard, dim)
        shard_ids = [str(x) for x in table.column(schema.COL_ID).to_pylist()]
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
