"""Bounded loss on a crash: partial work of a shard is flushed as fragments every ``flush_seconds``; a
rerun skips what they hold, the merged shard is identical to an uninterrupted one, and no reader ever
sees a fragment."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from phiclip import schema
from phiclip.manifest import read_manifest
from phiclip.pipeline import embed
from phiclip.pipeline.sources import record_id
from phiclip.pipeline.writer import PARTIAL_DIR

from ._helpers import MeanColourEncoder

TESTS = Path(__file__).resolve().parents[1]


def _images(root: Path, n: int) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (4 + i % 5, 7), ((i * 37) % 256, (i * 91) % 256, (i * 13) % 256)).save(root / f"{i:04d}.png")
    (root / "zz_broken.png").write_bytes(b"not a png")
    return [str(root / f"{i:04d}.png") for i in range(n)] + [str(root / "zz_broken.png")]


def _shard_bytes(out: Path) -> dict[str, str]:
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for d in (schema.EMBEDDINGS_DIR, schema.ERRORS_DIR, schema.TOKENS_DIR) if (out / d).is_dir()
            for p in sorted((out / d).glob("*.parquet"))}


def _fragment_ids(out: Path) -> list[str]:
    files = sorted((out / PARTIAL_DIR).rglob("*.embeddings.parquet")) + sorted((out / PARTIAL_DIR).rglob("*.errors.parquet"))
    return [i for f in files for i in pd.read_parquet(f, columns=["id"]).id]


def test_fragments_survive_a_failure_are_invisible_and_merge_identically(tmp_path: Path) -> None:
    paths = _images(tmp_path / "in", 20)
    settings = dict(shard_size=8, batch_size=2, num_workers=0, progress=False, tokens=True)
    embed(MeanColourEncoder(), tmp_path / "in", tmp_path / "ref", flush_seconds=None, **settings)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="simulated device failure"):
        # Flush after every batch; the model fails on its 7th call, in the middle of shard 1.
        embed(MeanColourEncoder(fail_on=7), tmp_path / "in", out, flush_seconds=1e-9, **settings)
    held = _fragment_ids(out)
    assert len(held) == 4 and len(set(held)) == 4  # shard 0 committed (4 batches), 2 batches of shard 1 flushed
    assert sorted(p.name for p in (out / schema.EMBEDDINGS_DIR).iterdir()) == ["part-00000.parquet"]
    # No reader sees a fragment: pyarrow's dataset, duckdb's recursive glob, the project's store.
    import pyarrow.dataset as pads

    assert pads.dataset(str(out / schema.EMBEDDINGS_DIR), format="parquet").count_rows() == 8
    duckdb = pytest.importorskip("duckdb", reason="duckdb is not installed (it is in the dev extra)")
    assert duckdb.sql(f"select count(*) from read_parquet('{out}/embeddings/**/*.parquet')").fetchall()[0][0] == 8
    from phiclip.store import open_embeddings

    assert len(open_embeddings(out, allow_incomplete=True)) == 8

    enc = MeanColourEncoder()
    res = embed(enc, tmp_path / "in", out, flush_seconds=1e-9, **settings)
    assert (res.skipped, res.processed) == (8 + 4, len(paths) - 12)
    assert sum(enc.seen_batches) == len(paths) - 12 - 1  # the broken file is not encoded
    assert _shard_bytes(out) == _shard_bytes(tmp_path / "ref")  # bit-identical shards, tokens included
    assert not (out / PARTIAL_DIR).exists() or not any((out / PARTIAL_DIR).iterdir())
    assert read_manifest(out)["complete"] is True


def test_unfinished_fragments_and_those_of_done_shards_are_cleaned(tmp_path: Path) -> None:
    _images(tmp_path / "in", 10)
    out = tmp_path / "out"
    settings = dict(shard_size=4, batch_size=2, num_workers=0, progress=False)
    with pytest.raises(RuntimeError):
        embed(MeanColourEncoder(fail_on=4), tmp_path / "in", out, flush_seconds=1e-9, **settings)
    partial = out / PARTIAL_DIR / "part-00001"
    assert partial.is_dir()
    (partial / "00007.errors.parquet").write_bytes(b"a fragment killed before its embeddings file")
    stale = out / PARTIAL_DIR / "part-00000"
    stale.mkdir()
    (stale / "00000.embeddings.parquet").write_bytes(b"of a shard that is done")
    res = embed(MeanColourEncoder(), tmp_path / "in", out, **settings)
    assert res.status == "completed" and not stale.exists()
    emb = pd.concat([pd.read_parquet(f) for f in sorted((out / schema.EMBEDDINGS_DIR).glob("*.parquet"))])
    assert len(emb) == 10 and len(set(emb.id)) == 10


_SLOW_RUN = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[3])
    from pipeline._helpers import MeanColourEncoder
    from phiclip.pipeline import embed

    class Slow(MeanColourEncoder):
        done = 0
        def encode_batch(self, batch, *, with_tokens=False):
            time.sleep(0.05)
            out = super().encode_batch(batch, with_tokens=with_tokens)
            Slow.done += len(batch)
            print(Slow.done, flush=True)
            return out

    embed(Slow(), sys.argv[1], sys.argv[2], shard_size=10_000, batch_size=2, num_workers=0, progress=False,
          flush_seconds=float(sys.argv[4]))
""")


@pytest.mark.parametrize("flush", [0.5])
def test_kill_9_loses_at_most_about_one_flush_interval(tmp_path: Path, flush: float) -> None:
    """One shard of 10 000 that never completes: a kill -9 loses what came after the last flush only."""
    paths = _images(tmp_path / "in", 400)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_RUN, str(tmp_path / "in"), str(out), str(TESTS), str(flush)],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout is not None
    encoded, t0 = 0, time.monotonic()
    while encoded < 120 and time.monotonic() - t0 < 120:  # ~3 s of work at 40 images/s
        line = proc.stdout.readline()
        if not line:
            break
        encoded = int(line)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    persisted = len(_fragment_ids(out))
    lost = encoded - persisted
    # At most 40 images/s (a 50 ms sleep per batch of 2): one flush interval plus a batch is ~22 images.
    assert 0 <= lost <= 40 * (flush + 0.25), (encoded, persisted)
    assert persisted >= encoded - 40 * (flush + 0.25) > 0

    enc = MeanColourEncoder()
    res = embed(enc, tmp_path / "in", out, shard_size=10_000, batch_size=2, num_workers=0, progress=False)
    assert res.skipped == persisted and res.processed == len(paths) - persisted
    emb = pd.read_parquet(out / schema.EMBEDDINGS_DIR / "part-00000.parquet")
    err = pd.read_parquet(out / schema.ERRORS_DIR / "part-00000.parquet")
    ids = list(emb.id) + list(err.id)
    assert len(ids) == len(set(ids)) and set(ids) == {record_id(p) for p in paths}
    assert list(emb.source) == paths[:-1]  # input order, whatever was flushed when


class _CtrlC(MeanColourEncoder):
    def encode_batch(self, batch, *, with_tokens=False):  # noqa: ANN001, ANN201
        if self.calls == 2:
            raise KeyboardInterrupt
        return super().encode_batch(batch, with_tokens=with_tokens)


@pytest.mark.parametrize("stop", ["model failure", "ctrl-c"])
def test_stopping_early_flushes_what_is_held_with_the_default_interval(tmp_path: Path, stop: str) -> None:
    paths = _images(tmp_path / "in", 9)
    out = tmp_path / "out"
    enc = MeanColourEncoder(fail_on=3) if stop == "model failure" else _CtrlC()
    with pytest.raises(RuntimeError if stop == "model failure" else KeyboardInterrupt):
        embed(enc, tmp_path / "in", out, shard_size=100, batch_size=2, num_workers=0, progress=False)
    assert sorted(_fragment_ids(out)) == sorted(record_id(p) for p in paths[:4])  # the two batches done
    res = embed(MeanColourEncoder(), tmp_path / "in", out, shard_size=100, batch_size=2, num_workers=0, progress=False)
    assert (res.skipped, res.processed) == (4, len(paths) - 4)
