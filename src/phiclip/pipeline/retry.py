"""``--retry-failed``: embed again only the failed inputs of a finished output, replacing each failure row
with a vector or a fresh failure; nothing else is touched.

The run must be the output's own (same model, weights, settings and inputs; refused otherwise, naming the
difference). The failed ids are read from ``errors/part-*.parquet`` and found again in the listing; they
run through the same engine and step as any run. Each shard with retried inputs is then rewritten through
a small journal, so that a retry killed at any moment leaves every input exactly once:

1. the shard's new embeddings and errors files are written under ``OUT/.retry/part-NNNNN/``, then a
   ``ready`` marker (atomically);
2. the errors file, then the embeddings file, are renamed over the shard's (or the errors file removed
   when no failure is left), and the folder is deleted.

A crash before the marker leaves the shard as it was (the folder is deleted by the next run); a crash
after it is rolled forward by the next run on the output (:func:`roll_forward`, called by every run).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from phiclip import schema
from phiclip.atomic import atomic_write
from phiclip.pipeline.writer import ShardResult, ShardSink, ShardWriter, errors_schema

#: Hidden folder of the journal of a retry.
RETRY_DIR = ".retry"
_READY = "ready"


def _stage(root: Path, shard: int) -> Path:
    return root / RETRY_DIR / schema.SHARD_PATTERN.format(shard).removesuffix(".parquet")


def _apply(root: Path, d: Path) -> None:
    """Move a ready journal entry into place (idempotent: safe to repeat after a crash)."""
    marker = json.loads((d / _READY).read_text(encoding="utf-8"))
    name = d.name + ".parquet"
    errors, embeddings = d / "errors.parquet", d / "embeddings.parquet"
    final_err = root / schema.ERRORS_DIR / name
    if errors.exists():
        os.replace(errors, final_err)
    elif not marker["errors"]:
        final_err.unlink(missing_ok=True)
    if embeddings.exists():
        os.replace(embeddings, root / schema.EMBEDDINGS_DIR / name)
    shutil.rmtree(d, ignore_errors=True)


def roll_forward(root: str | os.PathLike[str]) -> int:
    """Finish the shard rewrites a killed retry left ready, delete the unfinished ones; returns how many
    were finished."""
    base = Path(root) / RETRY_DIR
    if not base.is_dir():
        return 0
    done = 0
    for d in sorted(base.iterdir()):
        if (d / _READY).exists():
            _apply(Path(root), d)
            done += 1
        else:
            shutil.rmtree(d, ignore_errors=True)
    shutil.rmtree(base, ignore_errors=True)
    return done


def failed_ids(writer: ShardWriter, shards: list[int]) -> dict[int, list[str]]:
    """``{shard: [failed ids]}`` of the committed shards."""
    import pyarrow.parquet as pq

    out: dict[int, list[str]] = {}
    for s in shards:
        path = writer.path(schema.ERRORS_DIR, s)
        if path.exists():
            ids = pq.read_table(path, columns=[schema.COL_ID]).column(0).to_pylist()
            if ids:
                out[s] = [str(i) for i in ids]
    return out


class RetrySink(ShardSink):
    """A :class:`ShardSink` whose shards are committed shards: each is rewritten with its retried inputs'
    new rows (through the journal of the module docstring) instead of being written anew."""

    def __init__(self, *args: Any, order: dict[str, int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.order = order

    def _commit(self, shard: int) -> None:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        w = self.writer
        positions = self.units[shard]
        retried = {self.records[p].id for p in positions}
        new = self._rows(self.held.pop(shard, []))
        if new.embeddings is None:
            new.embeddings = None
        fresh = ShardResult(ids=new.ids, sources=new.sources, widths=new.widths, heights=new.heights,
                            embeddings=new.embeddings, errors=new.errors, annotations=new.annotations)
        _, etable_new, table_new = w._tables(fresh, f"shard {shard}")
        old = pq.read_table(w.path(schema.EMBEDDINGS_DIR, shard))
        table = pa.concat_tables([old, table_new.cast(old.schema)]) if table_new.num_rows else old
        big = len(self.order) + 1
        keys = [self.order.get(i, big) for i in table.column(schema.COL_ID).to_pylist()]
        table = table.take(pa.array(sorted(range(len(keys)), key=keys.__getitem__), pa.int64()))
        err_path = w.path(schema.ERRORS_DIR, shard)
        errors = pq.read_table(err_path) if err_path.exists() else errors_schema().empty_table()
        errors = errors.filter(pc.invert(pc.is_in(errors.column(schema.COL_ID),
                                                  value_set=pa.array(sorted(retried), pa.string()))))
        if etable_new is not None:
            errors = pa.concat_tables([errors.cast(errors_schema()), etable_new])
        d = _stage(w.root, shard)
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        w._put(table, d / "embeddings.parquet")
        if errors.num_rows:
            w._put(errors, d / "errors.parquet")
        atomic_write(d / _READY, lambda f: f.write(json.dumps({"errors": errors.num_rows > 0}).encode()))
        _apply(w.root, d)
        del self.todo[shard]


__all__ = ["RETRY_DIR", "RetrySink", "failed_ids", "roll_forward"]
