"""``phiclip embed`` / ``embed-text`` from the command line, and kill -9 + rerun = exactly once."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from phiclip import schema
from phiclip.cli import app
from phiclip.manifest import read_manifest
from phiclip.pipeline import embed
from phiclip.pipeline.sources import record_id

from ._helpers import BOMB_LIMIT

runner = CliRunner()


def _read(out: Path, folder: str) -> pd.DataFrame:
    files = sorted((out / folder).glob("*.parquet"))
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True) if files else pd.DataFrame(columns=["id"])


def test_cli_embed_summary_rerun_and_refusal(tmp_path: Path, mixed_folder, tiny_clip_dir: Path) -> None:
    root, expected = mixed_folder
    out = tmp_path / "out"
    args = ["embed", "-m", f"clip:{tiny_clip_dir}", "-i", str(root), "-o", str(out), "--max-pixels", str(BOMB_LIMIT),
            "--shard-size", "5", "-b", "4", "-j", "1", "--no-progress", "--device", "cpu"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    n_ok = sum(e.outcome == "embedded" for e in expected.values())
    assert "embedded" in res.output and str(n_ok) in res.output and "see errors/" in res.output
    assert read_manifest(out)["counts"]["embedded"] == n_ok
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "Nothing to do" in again.output and "already complete" in again.output
    refused = runner.invoke(app, [*args[:-1], "cpu", "--dtype", "float32"])
    assert refused.exit_code == 1
    assert "different model, settings or inputs" in refused.output and "'float16' before, 'float32' now" in refused.output


def test_cli_json_output(tmp_path: Path, tiny_clip_dir: Path) -> None:
    (tmp_path / "in").mkdir()
    for i in range(3):
        Image.new("RGB", (9, 7), (i * 80, 10, 10)).save(tmp_path / "in" / f"{i}.png")
    res = runner.invoke(app, ["embed", "-m", f"clip:{tiny_clip_dir}", "-i", str(tmp_path / "in"), "-o",
                              str(tmp_path / "out"), "-j", "0", "--no-progress", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output[res.output.index("{"):])
    assert (data["status"], data["embedded"], data["failed"], data["inputs"]) == ("completed", 3, 0, 3)


def test_cli_no_images_exits_non_zero(tmp_path: Path, tiny_clip_dir: Path) -> None:
    (tmp_path / "empty").mkdir()
    res = runner.invoke(app, ["embed", "-m", f"clip:{tiny_clip_dir}", "-i", str(tmp_path / "empty"), "-o",
                              str(tmp_path / "out")])
    assert res.exit_code == 1
    assert "no images found" in res.output and str(tmp_path / "empty") in res.output
    assert "Traceback" not in res.output


def test_cli_bad_choice_is_rejected_by_the_parser(tmp_path: Path) -> None:
    res = runner.invoke(app, ["embed", "-m", "clip:x", "-i", str(tmp_path), "-o", str(tmp_path / "o"), "--dtype", "int8"])
    assert res.exit_code == 2 and "int8" in res.output


def test_cli_embed_text(tmp_path: Path, tiny_clip_dir: Path) -> None:
    (tmp_path / "t.txt").write_text("a red circle\na blue square\n")
    res = runner.invoke(app, ["embed-text", "-m", f"clip:{tiny_clip_dir}", "-i", str(tmp_path / "t.txt"), "-o",
                              str(tmp_path / "out"), "--no-progress", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    emb = _read(tmp_path / "out", schema.EMBEDDINGS_DIR)
    assert list(emb.text) == ["a red circle", "a blue square"]


# --- kill -9 at any moment, rerun: every input exactly once -------------------------------------------------
def _many_images(root: Path, n: int) -> list[str]:
    root.mkdir(parents=True)
    paths = []
    for i in range(n):
        p = root / f"{i // 50:02d}" / f"img_{i:04d}.png"
        p.parent.mkdir(exist_ok=True)
        Image.new("RGB", (8 + i % 7, 8 + i % 5), ((i * 37) % 256, (i * 91) % 256, (i * 13) % 256)).save(p)
        paths.append(str(p))
    for name, data in (("bad_empty.jpg", b""), ("bad_text.png", b"hello"), ("bad_trunc.png", Path(paths[0]).read_bytes()[:30])):
        (root / name).write_bytes(data)
        paths.append(str(root / name))
    return paths


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "phiclip.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})


def _shards(out: Path) -> int:
    d = out / schema.EMBEDDINGS_DIR
    return len(list(d.glob("*.parquet"))) if d.is_dir() else 0


def _wait_for_shards(proc: subprocess.Popen, out: Path, at_least: int, timeout: float = 120.0) -> bool:
    """Poll until ``at_least`` shard files exist; False if the process ended first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if _shards(out) >= at_least:
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    raise AssertionError(f"no shard appeared within {timeout}s")


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_is_exactly_once(tmp_path: Path, tiny_clip_dir: Path, tiny_clip) -> None:
    paths = _many_images(tmp_path / "in", 240)
    out = tmp_path / "out"
    args = ["embed", "-m", f"clip:{tiny_clip_dir}", "-i", str(tmp_path / "in"), "-o", str(out), "--shard-size", "4",
            "-b", "2", "-j", "1", "--device", "cpu", "--no-progress"]
    total_shards = -(-len(paths) // 4)

    # 1) SIGKILL the whole process group right after the first shard file appears.
    p1 = _start(args)
    assert _wait_for_shards(p1, out, 1), p1.communicate()[0]
    _kill_group(p1)
    first = _shards(out)
    assert 1 <= first < total_shards, "the run finished before it could be killed; make it longer"
    assert read_manifest(out)["complete"] is False

    # 2) Rerun and SIGKILL only the main process at a random moment after it wrote more shards
    #    (its orphaned worker must not get in the way of the next run).
    delay = random.uniform(0.0, 0.4)
    p2 = _start(args)
    try:
        if _wait_for_shards(p2, out, first + 1):
            time.sleep(delay)
            p2.send_signal(signal.SIGKILL)
        p2.wait()
        second = _shards(out)
        assert second > first, f"the second run wrote nothing (killed after {delay:.3f}s)"

        # 3) Rerun to the end.
        p3 = _start(args)
        log3 = p3.communicate(timeout=300)[0].decode()
        assert p3.returncode == 0, log3
        assert "done by an earlier run (kept)" in log3
    finally:
        _kill_group(p2)  # the orphaned worker of run 2, if still alive

    emb, err = _read(out, schema.EMBEDDINGS_DIR), _read(out, schema.ERRORS_DIR)
    ids = list(emb.id) + list(err.id)
    assert len(ids) == len(set(ids)), f"duplicates after kill at {delay:.3f}s"
    assert set(ids) == {record_id(p) for p in paths}, f"inputs lost after kill at {delay:.3f}s"
    assert sorted(err.source) == sorted(p for p in paths if "bad_" in p)
    m = read_manifest(out)
    assert m["complete"] is True and m["counts"]["embedded"] + m["counts"]["failed"] == len(paths)
    assert _shards(out) == total_shards
    assert not [f for f in out.rglob(".*.tmp")]

    # The resumed vectors are the vectors of an uninterrupted run.
    ref = embed(tiny_clip, tmp_path / "in", tmp_path / "ref", shard_size=4, batch_size=2, num_workers=0, progress=False)
    ref_emb = _read(tmp_path / "ref", schema.EMBEDDINGS_DIR)
    assert ref.embedded == len(emb) and list(ref_emb.id) == list(emb.id)
    np.testing.assert_allclose(np.stack(emb.embedding).astype(np.float32), np.stack(ref_emb.embedding).astype(np.float32),
                               atol=2e-3)

    # 4) A rerun of the finished run does nothing and says so (in-process: no need for a fresh interpreter).
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "Nothing to do" in again.output
