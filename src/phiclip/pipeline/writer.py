"""Atomic writes of an embedding output directory (layout and column names: :mod:`phiclip.schema`).

Every file is written to a hidden temporary name in its final folder (``.part-00003.parquet.<pid>.tmp``,
which no ``*.parquet`` glob matches), flushed, fsync'ed, then renamed over its final name with
``os.replace``, and the folder is fsync'ed: a reader never sees a half-written file.

A shard commits in this order: tokens, errors, embeddings. **A shard is done exactly when its
embeddings file exists** (an empty one when every input of the shard failed). A crash before the
last rename can leave the errors (or tokens) file of an unfinished shard; :meth:`ShardWriter.prepare`
deletes those before the shard is redone, so every input ends up exactly once in embeddings +
errors.

A write that fails (a full disk, a quota, an I/O error) raises :class:`OutputError` naming the
output folder and the file, and saying that a rerun resumes: nothing half-written is left behind.
"""

from __future__ import annotations

import errno
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from phiclip import schema

#: Output dtypes of the stored vectors.
VECTOR_DTYPES = ("float16", "float32")
_SHARD_RE = re.compile(r"^part-(\d+)\.parquet$")


class OutputError(ValueError):
    """The output directory cannot be used as asked (another run's output, corrupt manifest...)."""


def _write_failed(root: Path, path: Path, e: OSError) -> OutputError:
    """The message for a failed write: which folder and file, why, and that a rerun resumes."""
    full = e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
    why = "the disk (or your quota) is full" if full else (e.strerror or str(e))
    fix = "free some space" if full else "fix the cause"
    try:
        name = path.relative_to(root).as_posix()
    except ValueError:
        name = str(path)
    return OutputError(
        f"{root}: cannot write {name} ({why}); nothing half-written was kept: {fix} and rerun the same command, "
        "it resumes from the shards already written"
    )


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Write a file through ``write(fileobj)`` to a temporary name, fsync, and rename it into place."""
    final = Path(path)
    tmp = final.parent / f".{final.name}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(final.parent)
    return final


def write_manifest(root: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json`` atomically (indented, keys in insertion order; non-ASCII escaped, so
    any path, even one that is not UTF-8, can be written).

    Raises:
        OutputError: the write failed (e.g. the disk is full), naming the folder.
    """
    data = (json.dumps(manifest, indent=2, default=str) + "\n").encode("utf-8")
    path = Path(root) / schema.MANIFEST_FILE
    try:
        return atomic_write(path, lambda f: f.write(data))
    except OSError as e:
        raise _write_failed(Path(root), path, e) from e


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


#: Type checks of the manifest fields phiclip reads back: (test, what it must be).
_MANIFEST_TYPES: dict[str, tuple[Any, str]] = {
    "phiclip_version": (lambda v: isinstance(v, str), "a string"),
    "kind": (lambda v: v in ("image", "text"), '"image" or "text"'),
    "encoder": (lambda v: isinstance(v, dict), "an object"),
    "dim": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "dtype": (lambda v: v in VECTOR_DTYPES, " or ".join(f'"{d}"' for d in VECTOR_DTYPES)),
    "normalized": (lambda v: isinstance(v, bool), "true or false"),
    "input": (lambda v: isinstance(v, dict), "an object"),
    "counts": (lambda v: isinstance(v, dict) and all(_is_int(x) and x >= 0 for x in v.values()),
               "an object of counts (integers >= 0)"),
    "complete": (lambda v: isinstance(v, bool), "true or false"),
    "settings": (lambda v: isinstance(v, dict), "an object"),
    "timings": (lambda v: isinstance(v, dict), "an object"),
}


def check_manifest(manifest: dict[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    """Check the type of every known field present in a manifest; returns it.

    Raises:
        OutputError: naming the file, the field, what it holds and what it must hold.
    """
    for key, (ok, what) in _MANIFEST_TYPES.items():
        if key in manifest and not ok(manifest[key]):
            shown = repr(manifest[key])
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise OutputError(
                f"{path}: field {key!r} is {shown} ({type(manifest[key]).__name__}), but must be {what}; the manifest "
                "was edited or damaged: restore it, or embed again into a new --output folder"
            )
    return manifest


def read_manifest(root: str | os.PathLike) -> dict[str, Any] | None:
    """``manifest.json`` as a dict, or ``None`` when there is none.

    Raises:
        OutputError: when it exists but is not a JSON object, or a field has the wrong type
            (:func:`check_manifest`).
    """
    path = Path(root) / schema.MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: JSON errors and text that is not UTF-8
        raise OutputError(f"{path}: unreadable manifest ({e}); delete the output folder and run again") from None
    if not isinstance(data, dict):
        raise OutputError(f"{path}: the manifest is not a JSON object; delete the output folder and run again")
    return check_manifest(data, path)


def _vector_type(dtype: str) -> Any:
    import pyarrow as pa

    if dtype not in VECTOR_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(VECTOR_DTYPES)}")
    return pa.float16() if dtype == "float16" else pa.float32()


def embeddings_schema(kind: str, dim: int, dtype: str) -> Any:
    """Arrow schema of ``embeddings/*.parquet``: images (id, source, width, height, embedding) or
    texts (id, source, text, embedding); ``embedding`` is ``fixed_size_list<dtype>[dim]``."""
    import pyarrow as pa

    vec = pa.list_(_vector_type(dtype), dim)
    if kind == "text":
        fields = [(schema.COL_ID, pa.string()), (schema.COL_SOURCE, pa.string()), (schema.COL_TEXT, pa.string())]
    else:
        fields = [(schema.COL_ID, pa.string()), (schema.COL_SOURCE, pa.string()),
                  (schema.COL_WIDTH, pa.int32()), (schema.COL_HEIGHT, pa.int32())]
    return pa.schema([pa.field(n, t, nullable=False) for n, t in fields] + [pa.field(schema.COL_EMBEDDING, vec, nullable=False)])


def errors_schema() -> Any:
    """Arrow schema of ``errors/*.parquet``: id, source, stage, reason (strings)."""
    import pyarrow as pa

    return pa.schema([pa.field(c, pa.string(), nullable=False)
                      for c in (schema.COL_ID, schema.COL_SOURCE, schema.COL_STAGE, schema.COL_REASON)])


def tokens_schema(token_dim: int, dtype: str) -> Any:
    """Arrow schema of ``tokens/*.parquet``: id, num_tokens, tokens (``list<fixed_size_list<dtype>[token_dim]>``)."""
    import pyarrow as pa

    return pa.schema([
        pa.field(schema.COL_ID, pa.string(), nullable=False),
        pa.field(schema.COL_NUM_TOKENS, pa.int32(), nullable=False),
        pa.field(schema.COL_TOKENS, pa.list_(pa.list_(_vector_type(dtype), token_dim)), nullable=False),
    ])


def _text_array(values: Sequence[str]) -> Any:
    """A string Arrow array. Parquet strings must be UTF-8: a value that is not (a lone surrogate
    from a file name decoded by ``surrogateescape``) is written with ``\\udcXX`` escapes instead of
    failing the shard (sources are already lossless text, see :func:`phiclip.schema.path_to_source`)."""
    import pyarrow as pa

    try:
        return pa.array(values, pa.string())
    except UnicodeEncodeError:
        return pa.array([v.encode("utf-8", "backslashreplace").decode("utf-8") for v in values], pa.string())


def _fixed_list(matrix: np.ndarray, dtype: str) -> Any:
    """(n, d) array -> fixed_size_list<dtype>[d] Arrow array."""
    import pyarrow as pa

    n, d = matrix.shape
    flat = np.ascontiguousarray(matrix, dtype=np.dtype(dtype)).reshape(n * d)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, type=_vector_type(dtype)), d)


@dataclass
class ShardResult:
    """What one shard produced, rows in input order.

    Images fill ``widths``/``heights``; texts fill ``texts``. ``embeddings`` is (n, dim);
    ``tokens`` (optional) one (T_i, token_dim) array per embedded row. ``errors`` holds
    ``(id, source, stage, reason)`` tuples.
    """

    ids: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    embeddings: np.ndarray | None = None
    tokens: list[np.ndarray] | None = None
    errors: list[tuple[str, str, str, str]] = field(default_factory=list)


class ShardWriter:
    """Writes the shards of one output directory (see the module docstring for the commit order)."""

    def __init__(self, root: str | os.PathLike, *, kind: str, dim: int, dtype: str) -> None:
        self.root = Path(root)
        self.kind = kind
        self.dim = int(dim)
        self.dtype = dtype
        _vector_type(dtype)  # validates
        self.dirs = {name: self.root / name for name in (schema.EMBEDDINGS_DIR, schema.ERRORS_DIR, schema.TOKENS_DIR)}

    def path(self, folder: str, shard: int) -> Path:
        """``ROOT/<folder>/part-<shard>.parquet``."""
        return self.dirs[folder] / schema.SHARD_PATTERN.format(shard)

    def done_shards(self) -> set[int]:
        """Shards whose embeddings file exists (committed)."""
        edir = self.dirs[schema.EMBEDDINGS_DIR]
        if not edir.is_dir():
            return set()
        return {int(m.group(1)) for p in edir.iterdir() if (m := _SHARD_RE.match(p.name))}

    def prepare(self, pending: Sequence[int]) -> None:
        """Create the folders, delete leftover temporary files and any errors/tokens file of a shard
        that is about to be redone (left by a crash between its renames)."""
        for d in self.dirs.values():
            if d.name == schema.TOKENS_DIR and not d.exists():
                continue
            d.mkdir(parents=True, exist_ok=True)
            for p in d.iterdir():
                if p.name.startswith(".part-") and p.name.endswith(".tmp"):
                    p.unlink(missing_ok=True)
        for p in self.root.glob(f".{schema.MANIFEST_FILE}.*.tmp"):
            p.unlink(missing_ok=True)
        for shard in pending:
            for folder in (schema.ERRORS_DIR, schema.TOKENS_DIR):
                self.path(folder, shard).unlink(missing_ok=True)

    def write_shard(self, shard: int, result: ShardResult) -> None:
        """Commit one shard: tokens and errors first, the embeddings file (the "done" mark) last."""
        import pyarrow as pa

        n = len(result.ids)
        emb = result.embeddings if result.embeddings is not None else np.zeros((0, self.dim), np.float32)
        if emb.shape != (n, self.dim):
            raise ValueError(f"shard {shard}: {n} rows but embeddings of shape {emb.shape} (expected ({n}, {self.dim}))")

        if result.tokens is not None and n:
            # A shard with no embedded row writes no tokens file (its token width is unknown).
            if len(result.tokens) != n:
                raise ValueError(f"shard {shard}: {n} rows but {len(result.tokens)} token arrays")
            lengths = np.array([t.shape[0] for t in result.tokens], dtype=np.int32)
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
            flat = np.concatenate(result.tokens, axis=0)  # (sum T_i, token_dim)
            tokens = pa.ListArray.from_arrays(pa.array(offsets), _fixed_list(flat, self.dtype))
            ttable = pa.Table.from_arrays(
                [_text_array(result.ids), pa.array(lengths, pa.int32()), tokens],
                schema=tokens_schema(flat.shape[1], self.dtype),
            )
            self.dirs[schema.TOKENS_DIR].mkdir(parents=True, exist_ok=True)
            self._put(ttable, self.path(schema.TOKENS_DIR, shard))
        if result.errors:
            cols = list(zip(*result.errors))
            etable = pa.Table.from_arrays([_text_array(list(c)) for c in cols], schema=errors_schema())
            self._put(etable, self.path(schema.ERRORS_DIR, shard))
        if self.kind == "text":
            middle = [_text_array(result.texts)]
        else:
            middle = [pa.array(result.widths, pa.int32()), pa.array(result.heights, pa.int32())]
        table = pa.Table.from_arrays(
            [_text_array(result.ids), _text_array(result.sources), *middle, _fixed_list(emb, self.dtype)],
            schema=embeddings_schema(self.kind, self.dim, self.dtype),
        )
        self._put(table, self.path(schema.EMBEDDINGS_DIR, shard))

    def _put(self, table: Any, path: Path) -> None:
        """Write one Parquet file atomically; a failed write becomes an :class:`OutputError`."""
        import pyarrow.parquet as pq

        try:
            atomic_write(path, lambda f: pq.write_table(table, f, use_dictionary=False))
        except OSError as e:
            raise _write_failed(self.root, path, e) from e

    def write_skipped(self, rows: Sequence[tuple[str, str, str, str]]) -> None:
        """Write ``errors/skipped.parquet`` (``(id, source, stage, reason)`` rows of the files that were
        not taken as inputs), or remove it when there are none."""
        import pyarrow as pa

        path = self.dirs[schema.ERRORS_DIR] / schema.SKIPPED_FILE
        if not rows:
            path.unlink(missing_ok=True)
            return
        self.dirs[schema.ERRORS_DIR].mkdir(parents=True, exist_ok=True)
        cols = list(zip(*rows))
        self._put(pa.Table.from_arrays([_text_array(list(c)) for c in cols], schema=errors_schema()), path)

    def counts(self, shards: Sequence[int]) -> dict[str, int]:
        """Rows committed in the given shards: ``{"embedded": ..., "failed": ...}`` (from Parquet footers)."""
        import pyarrow.parquet as pq

        embedded = failed = 0
        for s in shards:
            e = self.path(schema.EMBEDDINGS_DIR, s)
            if not e.exists():
                continue
            embedded += pq.read_metadata(e).num_rows
            err = self.path(schema.ERRORS_DIR, s)
            if err.exists():
                failed += pq.read_metadata(err).num_rows
        return {"embedded": embedded, "failed": failed}
