"""Atomic writes of an embedding output directory (layout and column names: :mod:`phiclip.schema`).

Every file is written through :func:`phiclip.atomic.atomic_write` (a hidden temporary name in its final
folder, ``.part-00003.parquet.<pid>.tmp``, which no ``*.parquet`` glob matches, renamed into place):
a reader never sees a half-written file. The manifest is :mod:`phiclip.manifest`'s.

A shard commits in this order: tokens, errors, embeddings. **A shard is done exactly when its
embeddings file exists** (an empty one when every input of the shard failed). A crash before the
last rename can leave the errors (or tokens) file of an unfinished shard; :meth:`ShardWriter.prepare`
deletes those before the shard is redone, so every input ends up exactly once in embeddings +
errors.

A write that fails (a full disk, a quota, an I/O error) raises :class:`OutputError` naming the
output folder and the file, and saying that a rerun resumes: nothing half-written is left behind.

**Partial work** (bounded loss on a crash): while a shard is in progress, :class:`ShardSink` writes what
it has every ``flush_seconds`` as a *fragment* of that shard, in ``OUT/.partial/part-00003/`` (a hidden
folder outside ``embeddings/`` and ``errors/``, so no reader and no glob of those folders ever sees
it). A fragment has the shard files' schemas and commits in the same order (tokens, errors, then
embeddings, which marks it done). A rerun skips the records already in fragments; when the shard
completes, its fragments and the rest are merged, in input order, into the shard files (identical to
a run without fragments: rows in input order, vectors cast to the stored dtype once), and the
fragment folder is deleted. A fragment folder of a shard that is done is deleted by :meth:`ShardWriter.prepare`.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from phiclip import schema
from phiclip.atomic import atomic_write
from phiclip.manifest import ManifestError
from phiclip.schema import VECTOR_DTYPES

_SHARD_RE = re.compile(r"^part-(\d+)\.parquet$")
#: Hidden folder of the fragments of shards in progress (``OUT/.partial/part-00003/00000.embeddings.parquet``).
PARTIAL_DIR = ".partial"
_FRAGMENT_RE = re.compile(r"^(\d+)\.(embeddings|errors|tokens)\.parquet$")


class OutputError(ManifestError):
    """The output directory cannot be used as asked (another run's output, corrupt manifest...)."""


def write_failed(root: Path, path: Path, e: OSError) -> OutputError:
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


def _vector_type(dtype: str) -> Any:
    import pyarrow as pa

    if dtype not in VECTOR_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(VECTOR_DTYPES)}")
    return pa.float16() if dtype == "float16" else pa.float32()


def annotation_fields() -> list[Any]:
    """The nullable annotation columns of image shards (:data:`phiclip.schema.ANNOTATION_COLUMNS`)."""
    import pyarrow as pa

    return [pa.field(schema.COL_LABEL, pa.string()), pa.field(schema.COL_CAPTIONS, pa.list_(pa.string())),
            pa.field(schema.COL_SPLIT, pa.string()), pa.field(schema.COL_METADATA, pa.string())]


def embeddings_schema(kind: str, dim: int, dtype: str, annotations: bool = False) -> Any:
    """Arrow schema of ``embeddings/*.parquet``: images (id, source, width, height, embedding, and with
    ``annotations`` label, captions, split, metadata) or texts (id, source, text, embedding); ``embedding``
    is ``fixed_size_list<dtype>[dim]``."""
    import pyarrow as pa

    vec = pa.list_(_vector_type(dtype), dim)
    if kind == "text":
        fields = [(schema.COL_ID, pa.string()), (schema.COL_SOURCE, pa.string()), (schema.COL_TEXT, pa.string())]
    else:
        fields = [(schema.COL_ID, pa.string()), (schema.COL_SOURCE, pa.string()),
                  (schema.COL_WIDTH, pa.int32()), (schema.COL_HEIGHT, pa.int32())]
    extra = annotation_fields() if annotations and kind != "text" else []
    return pa.schema([pa.field(n, t, nullable=False) for n, t in fields] + [pa.field(schema.COL_EMBEDDING, vec, nullable=False)]
                     + extra)


def annotation_row(record: Any, classnames: Sequence[str] | None = None) -> tuple[Any, Any, Any, Any]:
    """``(label, captions, split, metadata)`` of a record as the annotation columns hold them."""
    import json

    label = getattr(record, "label", None)
    if label is not None and classnames is not None and isinstance(label, int) and 0 <= label < len(classnames):
        label = classnames[label]
    meta = getattr(record, "metadata", None)
    captions = list(getattr(record, "captions", ()) or ())
    return (None if label is None else str(label), captions or None, getattr(record, "split", None),
            None if meta is None else json.dumps(meta, ensure_ascii=False, default=str, sort_keys=True))


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


@dataclass(kw_only=True)
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
    #: ``(label, captions, split, metadata)`` per embedded row (:func:`annotation_row`), when the output has them.
    annotations: list[tuple[Any, Any, Any, Any]] = field(default_factory=list)


def merge_results(parts: Sequence[ShardResult], order: dict[str, int], kind: str, dim: int) -> ShardResult:
    """Rows and errors of several results of one shard, sorted by ``order[id]`` (the input order).
    Vectors already cast to the stored dtype (fragments) come back as float32 exactly."""
    rows = [(order[i], k, j) for k, part in enumerate(parts) for j, i in enumerate(part.ids)]
    rows.sort()
    blocks = [np.asarray(p.embeddings if p.embeddings is not None else np.zeros((0, dim)), np.float32) for p in parts]
    out = ShardResult()
    out.ids = [parts[k].ids[j] for _, k, j in rows]
    out.sources = [parts[k].sources[j] for _, k, j in rows]
    if kind == "text":
        out.texts = [parts[k].texts[j] for _, k, j in rows]
    else:
        out.widths = [parts[k].widths[j] for _, k, j in rows]
        out.heights = [parts[k].heights[j] for _, k, j in rows]
    out.embeddings = np.stack([blocks[k][j] for _, k, j in rows]) if rows else np.zeros((0, dim), np.float32)
    if rows and all(len(p.annotations) == len(p.ids) for p in parts):
        out.annotations = [parts[k].annotations[j] for _, k, j in rows]
    if any(p.tokens is not None for p in parts):
        out.tokens = [parts[k].tokens[j] for _, k, j in rows]  # type: ignore[index]
    out.errors = sorted((e for p in parts for e in p.errors), key=lambda e: order[e[0]])
    return out


class ShardWriter:
    """Writes the shards of one output directory (see the module docstring for the commit order)."""

    def __init__(self, root: str | os.PathLike, *, kind: str, dim: int, dtype: str, annotations: bool = False) -> None:
        self.root = Path(root)
        self.kind = kind
        self.annotations = annotations and kind != "text"
        self.dim = int(dim)
        self.dtype = dtype
        _vector_type(dtype)  # validates
        self.dirs = {name: self.root / name for name in (schema.EMBEDDINGS_DIR, schema.ERRORS_DIR, schema.TOKENS_DIR)}

    def path(self, folder: str, shard: int) -> Path:
        """``ROOT/<folder>/part-<shard>.parquet``."""
        return self.dirs[folder] / schema.SHARD_PATTERN.format(shard)

    def partial_dir(self, shard: int) -> Path:
        """``ROOT/.partial/part-<shard>/``: the fragments of a shard in progress."""
        return self.root / PARTIAL_DIR / schema.SHARD_PATTERN.format(shard).removesuffix(".parquet")

    def done_shards(self) -> set[int]:
        """Shards whose embeddings file exists (committed)."""
        edir = self.dirs[schema.EMBEDDINGS_DIR]
        if not edir.is_dir():
            return set()
        return {int(m.group(1)) for p in edir.iterdir() if (m := _SHARD_RE.match(p.name))}

    def prepare(self, pending: Sequence[int], abandoned: Sequence[int] = ()) -> None:
        """Create the folders, delete leftover temporary files, any errors/tokens file of a shard that is
        about to be redone or was ``abandoned`` (left by a crash between its renames), unfinished
        fragments, and the fragments of every shard that is not pending (merged already, or abandoned)."""
        for d in self.dirs.values():
            if d.name == schema.TOKENS_DIR and not d.exists():
                continue
            d.mkdir(parents=True, exist_ok=True)
            for p in d.iterdir():
                if p.name.startswith(".part-") and p.name.endswith(".tmp"):
                    p.unlink(missing_ok=True)
        for p in self.root.glob(f".{schema.MANIFEST_FILE}.*.tmp"):
            p.unlink(missing_ok=True)
        for shard in [*pending, *abandoned]:
            for folder in (schema.ERRORS_DIR, schema.TOKENS_DIR):
                self.path(folder, shard).unlink(missing_ok=True)
        partial = self.root / PARTIAL_DIR
        if partial.is_dir():
            keep = {self.partial_dir(s).name for s in pending}
            for d in partial.iterdir():
                if d.name not in keep:
                    shutil.rmtree(d, ignore_errors=True)
                    continue
                done = {m.group(1) for p in d.iterdir() if (m := _FRAGMENT_RE.match(p.name)) and m.group(2) == "embeddings"}
                for p in d.iterdir():
                    m = _FRAGMENT_RE.match(p.name)
                    if m is None or m.group(1) not in done:
                        p.unlink(missing_ok=True)  # a temporary file, or a fragment that never got its embeddings

    # --- writing --------------------------------------------------------------------------------
    def _tables(self, result: ShardResult, where: str) -> tuple[Any, Any, Any]:
        """(tokens table or None, errors table or None, embeddings table) of a result."""
        import pyarrow as pa

        n = len(result.ids)
        emb = result.embeddings if result.embeddings is not None else np.zeros((0, self.dim), np.float32)
        if emb.shape != (n, self.dim):
            raise ValueError(f"{where}: {n} rows but embeddings of shape {emb.shape} (expected ({n}, {self.dim}))")
        ttable = etable = None
        if result.tokens is not None and n:
            # A shard with no embedded row writes no tokens file (its token width is unknown).
            if len(result.tokens) != n:
                raise ValueError(f"{where}: {n} rows but {len(result.tokens)} token arrays")
            lengths = np.array([t.shape[0] for t in result.tokens], dtype=np.int32)
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
            flat = np.concatenate(result.tokens, axis=0)  # (sum T_i, token_dim)
            tokens = pa.ListArray.from_arrays(pa.array(offsets), _fixed_list(flat, self.dtype))
            ttable = pa.Table.from_arrays(
                [_text_array(result.ids), pa.array(lengths, pa.int32()), tokens],
                schema=tokens_schema(flat.shape[1], self.dtype),
            )
        if result.errors:
            cols = list(zip(*result.errors))
            etable = pa.Table.from_arrays([_text_array(list(c)) for c in cols], schema=errors_schema())
        if self.kind == "text":
            middle = [_text_array(result.texts)]
        else:
            middle = [pa.array(result.widths, pa.int32()), pa.array(result.heights, pa.int32())]
        extra = []
        if self.annotations:
            rows = result.annotations if len(result.annotations) == n else [(None, None, None, None)] * n
            labels, captions, splits, metas = (list(c) for c in zip(*rows)) if rows else ([], [], [], [])
            extra = [_text_array(labels), pa.array(captions, pa.list_(pa.string())), _text_array(splits),
                     _text_array(metas)]
        table = pa.Table.from_arrays(
            [_text_array(result.ids), _text_array(result.sources), *middle, _fixed_list(emb, self.dtype), *extra],
            schema=embeddings_schema(self.kind, self.dim, self.dtype, self.annotations),
        )
        return ttable, etable, table

    def write_shard(self, shard: int, result: ShardResult) -> None:
        """Commit one shard: tokens and errors first, the embeddings file (the "done" mark) last; then
        delete the shard's fragments."""
        ttable, etable, table = self._tables(result, f"shard {shard}")
        if ttable is not None:
            self.dirs[schema.TOKENS_DIR].mkdir(parents=True, exist_ok=True)
            self._put(ttable, self.path(schema.TOKENS_DIR, shard))
        if etable is not None:
            self._put(etable, self.path(schema.ERRORS_DIR, shard))
        self._put(table, self.path(schema.EMBEDDINGS_DIR, shard))
        shutil.rmtree(self.partial_dir(shard), ignore_errors=True)

    def write_fragment(self, shard: int, result: ShardResult) -> None:
        """Commit a fragment of a shard in progress (same order and schemas as a shard)."""
        d = self.partial_dir(shard)
        d.mkdir(parents=True, exist_ok=True)
        seq = 1 + max((int(m.group(1)) for p in d.iterdir() if (m := _FRAGMENT_RE.match(p.name))), default=-1)
        ttable, etable, table = self._tables(result, f"a fragment of shard {shard}")
        for name, t in (("tokens", ttable), ("errors", etable), ("embeddings", table)):
            if t is not None:
                self._put(t, d / f"{seq:05d}.{name}.parquet")

    def read_fragments(self, shard: int) -> ShardResult | None:
        """Every finished fragment of a shard as one (unsorted) result, or None when there is none."""
        import pyarrow.parquet as pq

        d = self.partial_dir(shard)
        if not d.is_dir():
            return None
        seqs = sorted(m.group(1) for p in d.iterdir() if (m := _FRAGMENT_RE.match(p.name)) and m.group(2) == "embeddings")
        if not seqs:
            return None
        out = ShardResult(embeddings=np.zeros((0, self.dim), np.float32))
        blocks = []
        for seq in seqs:
            table = pq.read_table(d / f"{seq}.embeddings.parquet")
            out.ids += table.column(schema.COL_ID).to_pylist()
            out.sources += table.column(schema.COL_SOURCE).to_pylist()
            if self.kind == "text":
                out.texts += table.column(schema.COL_TEXT).to_pylist()
            else:
                out.widths += table.column(schema.COL_WIDTH).to_pylist()
                out.heights += table.column(schema.COL_HEIGHT).to_pylist()
            if self.annotations and schema.COL_LABEL in table.column_names:
                out.annotations += list(zip(*(table.column(c).to_pylist() for c in schema.ANNOTATION_COLUMNS)))
            blocks.append(_matrix(table.column(schema.COL_EMBEDDING), self.dim))
            if (d / f"{seq}.tokens.parquet").exists():
                out.tokens = (out.tokens or []) + _token_arrays(pq.read_table(d / f"{seq}.tokens.parquet"))
            if (d / f"{seq}.errors.parquet").exists():
                out.errors += [tuple(r.values()) for r in pq.read_table(d / f"{seq}.errors.parquet").to_pylist()]
        out.embeddings = np.concatenate(blocks, axis=0)
        return out

    def _put(self, table: Any, path: Path) -> None:
        """Write one Parquet file atomically; a failed write becomes an :class:`OutputError`."""
        import pyarrow.parquet as pq

        try:
            atomic_write(path, lambda f: pq.write_table(table, f, use_dictionary=False))
        except OSError as e:
            raise write_failed(self.root, path, e) from e

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

    def rewrite_without(self, shard: int, ids: set[str]) -> int:
        """Remove the rows of ``ids`` from a committed shard (tokens, errors, then embeddings, each file
        replaced atomically, so a crash leaves every input at most once and a rerun finishes the job).
        Returns how many rows of embeddings and errors were removed."""
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        removed = 0
        for folder in (schema.TOKENS_DIR, schema.ERRORS_DIR, schema.EMBEDDINGS_DIR):
            path = self.path(folder, shard)
            if not path.exists():
                continue
            table = pq.read_table(path)
            kept = table.filter(pc.invert(pc.is_in(table.column(schema.COL_ID), value_set=pa.array(sorted(ids), pa.string()))))
            if kept.num_rows == table.num_rows:
                continue
            if folder != schema.TOKENS_DIR:
                removed += table.num_rows - kept.num_rows
            if kept.num_rows == 0 and folder != schema.EMBEDDINGS_DIR:
                path.unlink()  # as a shard with no errors (or no embedded row) has no such file
            else:
                self._put(kept, path)
        return removed

    # --- reading back ---------------------------------------------------------------------------
    def committed_ids(self, shards: Iterable[int]) -> dict[str, tuple[int, str]]:
        """``{id: (shard, source)}`` of every input in the given committed shards (embeddings and errors)."""
        import pyarrow.parquet as pq

        out: dict[str, tuple[int, str]] = {}
        for s in shards:
            for folder in (schema.EMBEDDINGS_DIR, schema.ERRORS_DIR):
                path = self.path(folder, s)
                if path.exists():
                    t = pq.read_table(path, columns=[schema.COL_ID, schema.COL_SOURCE])
                    for i, src in zip(t.column(0).to_pylist(), t.column(1).to_pylist()):
                        out[i] = (s, src)
        return out

    def failure_reasons(self, shards: Sequence[int], top: int = 10) -> list[tuple[str, str, int]]:
        """``(stage, reason, count)`` of the failed inputs of the given committed shards, most frequent first."""
        import pyarrow.parquet as pq

        groups: dict[tuple[str, str], int] = {}
        for s in shards:
            path = self.path(schema.ERRORS_DIR, s)
            if path.exists():
                t = pq.read_table(path, columns=[schema.COL_STAGE, schema.COL_REASON])
                for key in zip(t.column(0).to_pylist(), t.column(1).to_pylist()):
                    groups[key] = groups.get(key, 0) + 1
        ranked = sorted(groups.items(), key=lambda kv: (-kv[1], kv[0]))
        return [(stage, reason, n) for (stage, reason), n in ranked[:top]]

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


def _matrix(column: Any, dim: int) -> np.ndarray:
    """A fixed_size_list column -> (rows, dim) float32."""
    arr = column.combine_chunks()
    return arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(arr), dim)


def _token_arrays(table: Any) -> list[np.ndarray]:
    """The ``tokens`` column of a tokens table -> one (T_i, token_dim) float32 array per row."""
    col = table.column(schema.COL_TOKENS).combine_chunks()
    width = col.type.value_type.list_size
    flat = col.values.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, width)
    offsets = col.offsets.to_numpy()
    return [flat[offsets[i] : offsets[i + 1]] for i in range(len(col))]


class ShardSink:
    """Collects the step results of the pending shards (from any engine), commits a shard when every one
    of its records is back, and writes what it holds as fragments every ``flush_seconds`` (``None``:
    never). Results for records already accounted for (a task that Ray retried) are dropped.

    ``units``: ``(shard, positions)`` of every pending shard; ``records[position]`` are their records.
    """

    def __init__(self, writer: ShardWriter, records: Sequence[Any], units: Sequence[tuple[int, Sequence[int]]], *,
                 with_tokens: bool, flush_seconds: float | None, timings: dict[str, float],
                 clock: Callable[[], float] = time.monotonic, classnames: Sequence[str] | None = None) -> None:
        self.writer = writer
        self.classnames = classnames
        self.reasons: dict[tuple[str, str], int] = {}  # (stage, reason) -> failures seen by this run
        self.records = records
        self.with_tokens = with_tokens
        self.flush_seconds = flush_seconds
        self.timings = timings
        self.clock = clock
        self.units = {shard: list(positions) for shard, positions in units}
        self.todo: dict[int, set[int]] = {}
        self.flushed = 0  # records of the pending shards already in fragments (done by an earlier run)
        for shard, positions in self.units.items():
            frag = writer.read_fragments(shard)
            have = set(frag.ids) | {e[0] for e in frag.errors} if frag is not None else set()
            self.todo[shard] = {p for p in positions if records[p].id not in have}
            self.flushed += len(positions) - len(self.todo[shard])
        self.held: dict[int, list[Any]] = {}  # shard -> results not yet written
        self.last_flush = clock()
        self.failed = 0

    def remaining(self) -> list[tuple[int, list[int]]]:
        """``(shard, positions still to embed)`` of each pending shard, in order; shards whose records are
        all in fragments already are committed here."""
        for shard in [s for s, todo in self.todo.items() if not todo]:
            self._commit(shard)
        return [(s, sorted(todo)) for s, todo in self.todo.items()]

    def add(self, shard: int, result: Any) -> int:
        """Take a step result of ``shard``; returns how many records it newly accounts for."""
        todo = self.todo.get(shard)
        if todo is None:
            return 0  # the shard is committed already (a duplicate from a retried task)
        fresh = [p for p in result.accounted() if p in todo]
        if len(fresh) != result.count:
            result = result.only(lambda p: p in todo)
        if not fresh:
            return 0
        todo.difference_update(fresh)
        self.failed += len(result.errors)
        for _, stage, reason in result.errors:
            self.reasons[(stage, reason)] = self.reasons.get((stage, reason), 0) + 1
        self.held.setdefault(shard, []).append(result)
        t0 = time.perf_counter()
        if not todo:
            self._commit(shard)
        elif self.flush_seconds is not None and self.clock() - self.last_flush >= self.flush_seconds:
            self.flush()
        else:
            return len(fresh)
        self.timings["write"] = self.timings.get("write", 0.0) + time.perf_counter() - t0
        return len(fresh)

    def flush(self) -> None:
        """Write what is held of every shard in progress as a fragment."""
        for shard, held in list(self.held.items()):
            if held:
                self.writer.write_fragment(shard, self._rows(held))
        self.held.clear()
        self.last_flush = self.clock()

    def _rows(self, held: list[Any]) -> ShardResult:
        res = ShardResult(ids=[], embeddings=None)
        blocks = []
        for r in held:
            for p, size in zip(r.positions, r.sizes):
                rec = self.records[p]
                res.ids.append(rec.id)
                res.sources.append(rec.source)
                if self.writer.kind == "text":
                    res.texts.append(str(rec.locator))
                else:
                    res.widths.append(size[0])
                    res.heights.append(size[1])
                    if self.writer.annotations:
                        res.annotations.append(annotation_row(rec, self.classnames))
            blocks.append(r.embeddings)
            if self.with_tokens:
                res.tokens = (res.tokens or []) + list(r.tokens or [])
            res.errors += [(self.records[p].id, self.records[p].source, stage, reason) for p, stage, reason in r.errors]
        res.embeddings = np.concatenate(blocks, axis=0) if blocks else None
        return res

    def _commit(self, shard: int) -> None:
        positions = self.units[shard]
        parts = [self.writer.read_fragments(shard), self._rows(self.held.pop(shard, []))]
        parts = [p for p in parts if p is not None and (p.ids or p.errors)]
        order = {self.records[p].id: i for i, p in enumerate(positions)}
        if len(parts) > 1:
            result = merge_results(parts, order, self.writer.kind, self.writer.dim)
        else:
            result = _sorted(parts[0], order, self.writer.kind, self.writer.dim) if parts else ShardResult()
        if self.with_tokens and result.tokens is None:
            result.tokens = []
        self.writer.write_shard(shard, result)
        del self.todo[shard]

    def close(self) -> None:
        """Check that every pending shard was committed."""
        if self.todo:
            raise RuntimeError(f"internal error: shards {sorted(self.todo)} did not receive all their records")


def _sorted(part: ShardResult, order: dict[str, int], kind: str, dim: int) -> ShardResult:
    """One result's rows and errors in input order (as a shard is written)."""
    idx = np.argsort(np.asarray([order[i] for i in part.ids], dtype=np.int64), kind="stable")
    emb = part.embeddings if part.embeddings is not None else np.zeros((0, dim), np.float32)
    out = ShardResult(ids=[part.ids[i] for i in idx], sources=[part.sources[i] for i in idx], embeddings=emb[idx])
    if kind == "text":
        out.texts = [part.texts[i] for i in idx]
    else:
        out.widths = [part.widths[i] for i in idx]
        out.heights = [part.heights[i] for i in idx]
    if part.tokens is not None:
        out.tokens = [part.tokens[i] for i in idx]
    if len(part.annotations) == len(part.ids):
        out.annotations = [part.annotations[i] for i in idx]
    out.errors = sorted(part.errors, key=lambda e: order[e[0]])
    return out
