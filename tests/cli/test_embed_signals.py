"""SIGTERM during ``phiclip embed`` stops the run as Ctrl-C does: the shards already written are kept, the
exit code is 143 (128 + SIGTERM), the message says to rerun; a rerun finishes with every input exactly once."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from pipeline.test_cli_embed import _kill_group, _many_images, _read, _shards, _start, _wait_for_shards

from phiclip import schema
from phiclip.pipeline.sources import record_id
from phiclip.store import read_manifest


@pytest.mark.slow
def test_sigterm_keeps_the_finished_shards_and_a_rerun_finishes(tmp_path: Path, tiny_clip_ckpt: Path) -> None:
    paths = _many_images(tmp_path / "in", 240)
    out = tmp_path / "out"
    args = ["embed", "-m", f"clip:{tiny_clip_ckpt}", "-i", str(tmp_path / "in"), "-o", str(out), "--shard-size", "4",
            "-b", "2", "-j", "0", "--device", "cpu", "--no-progress"]
    total_shards = -(-len(paths) // 4)

    p1 = _start(args)
    try:
        assert _wait_for_shards(p1, out, 1), p1.communicate()[0]
        p1.send_signal(signal.SIGTERM)  # what `kill PID` (and a job scheduler) sends, to the main process only
        log1 = p1.communicate(timeout=120)[0].decode()
    finally:
        _kill_group(p1)
    kept = _shards(out)
    assert 1 <= kept < total_shards, "the run finished before it could be stopped; make it longer"
    assert p1.returncode == 128 + signal.SIGTERM, log1
    assert "interrupted" in log1 and "rerun the same command to resume" in log1 and "Traceback" not in log1
    assert read_manifest(out)["complete"] is False

    p2 = _start(args)
    log2 = p2.communicate(timeout=300)[0].decode()
    assert p2.returncode == 0, log2
    assert "done by an earlier run (kept)" in log2
    emb, err = _read(out, schema.EMBEDDINGS_DIR), _read(out, schema.ERRORS_DIR)
    ids = list(emb.id) + list(err.id)
    assert len(ids) == len(set(ids)) and set(ids) == {record_id(p) for p in paths}
    assert read_manifest(out)["complete"] is True and _shards(out) == total_shards
