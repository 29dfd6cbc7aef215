"""``embed --update`` on a growing folder: only new inputs, into new shards; disappeared inputs reported,
kept or pruned; a rerun of the same update resumes; every input exactly once."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from phiclip import schema
from phiclip.cli import app
from phiclip.manifest import read_manifest
from phiclip.pipeline import OutputError, embed
from phiclip.pipeline.sources import record_id
from phiclip.store import open_embeddings

from ._helpers import MeanColourEncoder

SETTINGS = dict(shard_size=3, batch_size=2, num_workers=0, progress=False)


def _images(root: Path, names: list[str]) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (5 + i % 4, 6), ((i * 53) % 256, (i * 17) % 256, 90)).save(root / name)
    return [str(root / n) for n in names]


def _digests(out: Path) -> dict[str, str]:
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((out / schema.EMBEDDINGS_DIR).glob("*.parquet")) + sorted((out / schema.ERRORS_DIR).glob("part-*.parquet"))}


def _rows(out: Path) -> pd.DataFrame:
    files = sorted((out / schema.EMBEDDINGS_DIR).glob("*.parquet")) + sorted((out / schema.ERRORS_DIR).glob("part-*.parquet"))
    return pd.concat([pd.read_parquet(f, columns=["id", "source"]) for f in files], ignore_index=True)


def _exactly(out: Path, paths: list[str]) -> None:
    ids = list(_rows(out).id)
    assert len(ids) == len(set(ids)), "an input appears twice"
    assert sorted(ids) == sorted(record_id(p) for p in paths)


def test_update_embeds_only_new_inputs_into_new_shards(tmp_path: Path) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    first = _images(src, [f"a{i}.png" for i in range(7)])
    (src / "broken.jpg").write_bytes(b"nope")
    embed(MeanColourEncoder(), src, out, **SETTINGS)
    before = _digests(out)
    added = _images(src, ["b0.png", "b1.png", "0first.png", "c.png"])  # sorted listing interleaves old and new
    gone = src / "a3.png"
    gone.unlink()

    with pytest.raises(OutputError, match=r"num_inputs: 8 before, 11 now.*--update"):
        embed(MeanColourEncoder(), src, out, **SETTINGS)
    enc = MeanColourEncoder()
    res = embed(enc, src, out, update=True, **SETTINGS)
    assert (res.status, res.processed, res.inputs, res.skipped) == ("completed", 4, 11, 7)
    assert (res.disappeared, res.disappeared_sources, res.pruned) == (1, [str(gone)], 0)
    assert sum(enc.seen_batches) == 4
    after = _digests(out)
    assert {k: after[k] for k in before} == before, "an existing shard was rewritten"
    assert sorted(set(after) - set(before)) == ["embeddings/part-00003.parquet", "embeddings/part-00004.parquet"]
    _exactly(out, first + [str(src / "broken.jpg")] + added)  # the disappeared input is kept
    m = read_manifest(out)
    assert [(g["first_shard"], g["num_shards"], g["num_inputs"]) for g in m["generations"]] == [(0, 3, 8), (3, 2, 4)]
    assert m["complete"] is True and m["counts"]["not_listed"] == 1 and m["input"]["num_inputs"] == 11
    assert len(open_embeddings(out)) == 11  # 11 listed + 1 kept - broken.jpg

    # The same command again: nothing to do; a plain rerun with the same inputs is not refused either.
    again = embed(MeanColourEncoder(), src, out, update=True, **SETTINGS)
    assert (again.status, again.processed, again.disappeared) == ("already_complete", 0, 1)
    assert embed(MeanColourEncoder(), src, out, **SETTINGS).status == "already_complete"
    assert _digests(out) == after


def test_update_with_prune_removes_the_rows_of_disappeared_inputs(tmp_path: Path) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    paths = _images(src, [f"a{i}.png" for i in range(6)])
    embed(MeanColourEncoder(), src, out, **SETTINGS)
    untouched = _digests(out)["embeddings/part-00001.parquet"]
    Path(paths[1]).unlink()
    with pytest.raises(ValueError, match="--update --prune"):
        embed(MeanColourEncoder(), src, out, prune=True, **SETTINGS)
    res = embed(MeanColourEncoder(), src, out, update=True, prune=True, **SETTINGS)
    assert (res.processed, res.pruned, res.disappeared) == (0, 1, 0)
    _exactly(out, [p for p in paths if p != paths[1]])
    assert _digests(out)["embeddings/part-00001.parquet"] == untouched  # only the affected shard is rewritten
    m = read_manifest(out)
    assert m["complete"] is True and m["counts"]["embedded"] == 5 and "not_listed" not in m["counts"]
    assert len(open_embeddings(out)) == 5


def test_a_rerun_of_an_interrupted_update_resumes_it(tmp_path: Path) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    first = _images(src, [f"a{i}.png" for i in range(4)])
    embed(MeanColourEncoder(), src, out, **SETTINGS)
    added = _images(src, [f"b{i}.png" for i in range(8)])
    with pytest.raises(RuntimeError, match="simulated device failure"):
        embed(MeanColourEncoder(fail_on=3), src, out, update=True, flush_seconds=None, **SETTINGS)
    m = read_manifest(out)
    assert m["complete"] is False and len(m["generations"]) == 2
    done_before = set(_digests(out))
    enc = MeanColourEncoder()
    res = embed(enc, src, out, update=True, **SETTINGS)
    assert res.status == "completed" and res.processed == 8 - 3 * (len(done_before) - 2)
    _exactly(out, first + added)
    assert len(read_manifest(out)["generations"]) == 2  # resumed, not a third generation


def test_an_update_over_an_unfinished_run_whose_input_changed(tmp_path: Path) -> None:
    """Shards the first run left unfinished are abandoned; their inputs, still listed, are planned again."""
    src, out = tmp_path / "in", tmp_path / "out"
    first = _images(src, [f"a{i}.png" for i in range(9)])
    with pytest.raises(RuntimeError):
        embed(MeanColourEncoder(fail_on=3), src, out, flush_seconds=None, **SETTINGS)
    (out / schema.ERRORS_DIR / "part-00002.parquet").write_bytes(b"left by a crash between renames")
    added = _images(src, ["z.png"])
    res = embed(MeanColourEncoder(), src, out, update=True, **SETTINGS)
    _exactly(out, first + added)
    m = read_manifest(out)
    assert m["generations"][0].get("abandoned") and m["complete"] is True
    assert not (out / schema.ERRORS_DIR / "part-00002.parquet").exists()
    assert res.embedded == 10 and len(open_embeddings(out)) == 10


def test_cli_update_reports_disappeared_inputs(tmp_path: Path, tiny_clip_dir: Path) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    paths = _images(src, ["a.png", "b.png"])
    args = ["embed", "-m", f"clip:{tiny_clip_dir}", "-i", str(src), "-o", str(out), "--no-progress", "--device", "cpu"]
    assert CliRunner().invoke(app, args).exit_code == 0
    Path(paths[0]).unlink()
    _images(src, ["c.png"])
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 1 and "--update" in refused.output
    res = CliRunner().invoke(app, [*args, "--update"])
    assert res.exit_code == 0, res.output
    assert "1 inputs in the output are no longer in the input" in res.output and "a.png" in res.output
    res = CliRunner().invoke(app, [*args, "--update", "--prune"])
    assert res.exit_code == 0 and "Removed the rows of 1 inputs" in res.output
