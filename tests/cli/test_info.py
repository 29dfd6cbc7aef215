"""``phiclip info OUT``: the model and its checkpoint, precision, width, counts, failures by reason, complete."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _embdir import write_embedding_dir

from phiclip import schema
from phiclip.cli import app
from phiclip.output_summary import summarize_output


def _output(root: Path, spec: str, *, complete: bool = True) -> Path:
    out = write_embedding_dir(root, np.eye(4, dtype=np.float32), spec=spec, complete=complete)
    mpath = out / schema.MANIFEST_FILE
    manifest = json.loads(mpath.read_text())
    manifest["encoder"].update(dtype="bfloat16", weights_fingerprint="sha256:abc",
                               precision={"requested": "auto", "dtype": "bfloat16"})
    manifest["counts"] = {"inputs": 10, "embedded": 4, "failed": 5, "ignored": 1, "duplicates": 0}
    mpath.write_text(json.dumps(manifest))
    (out / schema.ERRORS_DIR).mkdir()
    rows = [("a.jpg", "decode", "not an image")] * 3 + [("b.jpg", "read", "no such file")] * 2
    pq.write_table(pa.table({"id": [f"e{i}" for i in range(5)], "source": [r[0] for r in rows],
                             "stage": [r[1] for r in rows], "reason": [r[2] for r in rows]}),
                   out / schema.ERRORS_DIR / schema.SHARD_PATTERN.format(0))
    pq.write_table(pa.table({"id": ["s0"], "source": ["notes.txt"], "stage": ["skip"], "reason": ["not an image file"]}),
                   out / schema.ERRORS_DIR / schema.SKIPPED_FILE)
    return out


def test_info_shows_model_checkpoint_counts_and_failures_grouped(tmp_path: Path, cli, monkeypatch) -> None:
    ckpt = tmp_path / "models" / "clip"
    ckpt.mkdir(parents=True)
    out = _output(tmp_path / "out", "clip:models/clip")
    monkeypatch.chdir(tmp_path)
    res = cli.invoke(app, ["info", str(out)])
    assert res.exit_code == 0, res.output
    text = res.output
    assert "clip:models/clip" in text and str(ckpt.resolve()) in text and "local folder, found" in text
    assert "bfloat16 (asked: auto)" in text and "4-d, stored as float32" in text
    assert "10 inputs: 4 embedded, 5 failed" in text and "complete" in text and "yes" in text
    lines = [ln for ln in text.splitlines() if "not an image" in ln or "no such file" in ln]
    assert "3" in lines[0] and "decode" in lines[0] and "2" in lines[1] and "read" in lines[1]

    data = json.loads(cli.invoke(app, ["info", str(out), "--json", "--top", "2"]).output)
    assert data["spec"] == "clip:models/clip" and data["checkpoint"] == str(ckpt.resolve())
    assert (data["dim"], data["inputs"], data["embedded"], data["failed"]) == (4, 10, 4, 5)
    assert data["complete"] is True and data["precision"] == "bfloat16"
    assert [(g["stage"], g["reason"], g["count"]) for g in data["failure_groups"]] == [
        ("decode", "not an image", 3), ("read", "no such file", 2)]
    assert data["failure_groups_total"] == 3


def test_info_says_a_moved_checkpoint_is_missing_and_a_run_unfinished(tmp_path: Path, cli) -> None:
    out = _output(tmp_path / "out", f"clip:{tmp_path / 'gone'}", complete=False)
    res = cli.invoke(app, ["info", str(out)])
    assert res.exit_code == 0, res.output
    assert "MISSING" in res.output and "--model" in res.output and "NO: rerun" in res.output
    s = summarize_output(out)
    assert s.checkpoint == str(tmp_path / "gone") and not s.complete


@pytest.mark.parametrize("what", ["missing", "not an output"])
def test_info_of_something_else_is_a_clear_error(tmp_path: Path, cli, what: str) -> None:
    target = tmp_path / "x"
    if what == "not an output":
        target.mkdir()
    res = cli.invoke(app, ["info", str(target)])
    assert res.exit_code == 1 and "error:" in res.output and str(target) in res.output
    assert "Traceback" not in res.output
