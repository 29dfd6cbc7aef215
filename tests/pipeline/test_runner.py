"""The bulk runner: every bad input lands in errors, nothing is lost, resume is exactly-once,
reruns are refused or skipped as they should be, and the output is readable by common tools."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from phiclip import schema
from phiclip.manifest import read_manifest
from phiclip.pipeline import EmbedOptions, InputError, OutputError, embed, embed_text
from phiclip.pipeline.runner import make_options
from phiclip.pipeline.sources import record_id
from phiclip.pipeline.step import Chunk, CostPacker, Preparer, encode_images

from ._helpers import BOMB_LIMIT, Expected, MeanColourEncoder


def _read(out: Path, folder: str) -> pd.DataFrame:
    """The rows of every shard of ``folder`` (not ``errors/skipped.parquet``)."""
    files = sorted((out / folder).glob("part-*.parquet"))
    if not files:
        return pd.DataFrame(columns=[schema.COL_ID, schema.COL_SOURCE, schema.COL_STAGE, schema.COL_REASON])
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def check_outcomes(out: Path, expected: dict[str, Expected]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every expected input exactly once in embeddings + errors, with the expected outcome."""
    emb, err = _read(out, schema.EMBEDDINGS_DIR), _read(out, schema.ERRORS_DIR)
    ids = list(emb[schema.COL_ID]) + list(err[schema.COL_ID])
    assert len(ids) == len(set(ids)), "an input appears twice"
    assert sorted(ids) == sorted(record_id(p) for p in expected), "inputs lost or invented"
    by_source_e = emb.set_index(schema.COL_SOURCE)
    by_source_f = err.set_index(schema.COL_SOURCE)
    for path, want in expected.items():
        if want.outcome == "embedded":
            assert path in by_source_e.index, f"{path} should embed; errors say {by_source_f.loc[path].to_dict() if path in by_source_f.index else None}"
            row = by_source_e.loc[path]
            assert (row[schema.COL_WIDTH], row[schema.COL_HEIGHT]) == want.size, path
        else:
            assert path in by_source_f.index, f"{path} should fail"
            row = by_source_f.loc[path]
            assert row[schema.COL_STAGE] == want.stage, (path, row.to_dict())
            if want.reason_has:
                assert want.reason_has.lower() in row[schema.COL_REASON].lower(), (path, row.to_dict())
    return emb, err


# --- bad inputs never stop the run -------------------------------------------------------------------
@pytest.mark.parametrize("num_workers", [0, 2])
def test_mixed_folder_every_input_accounted_for(tmp_path: Path, mixed_folder, num_workers: int) -> None:
    root, expected = mixed_folder
    enc = MeanColourEncoder()
    res = embed(enc, root, tmp_path / "out", max_pixels=BOMB_LIMIT, shard_size=4, batch_size=3,
                num_workers=num_workers, progress=False)
    emb, err = check_outcomes(tmp_path / "out", expected)
    n_ok = sum(e.outcome == "embedded" for e in expected.values())
    assert (res.status, res.inputs, res.embedded, res.failed, res.skipped) == ("completed", len(expected), n_ok,
                                                                               len(expected) - n_ok, 0)
    assert res.ignored == 2  # notes.txt and .hidden.jpg, named in errors/skipped.parquet with stage "skip"
    skipped = pd.read_parquet(tmp_path / "out" / schema.ERRORS_DIR / schema.SKIPPED_FILE)
    assert sorted(skipped[schema.COL_SOURCE]) == [str(root / ".hidden.jpg"), str(root / "notes.txt")]
    assert set(skipped[schema.COL_STAGE]) == {"skip"} and "hidden" in skipped[schema.COL_REASON].iloc[0]
    assert "'.txt' is not one of" in skipped[schema.COL_REASON].iloc[1]
    assert list(skipped[schema.COL_ID]) == [record_id(p) for p in skipped[schema.COL_SOURCE]]
    assert res.processed == len(expected)
    m = read_manifest(tmp_path / "out")
    assert m["complete"] is True and m["counts"]["embedded"] == n_ok and m["counts"]["failed"] == len(expected) - n_ok
    assert m["dim"] == 4 and m["dtype"] == "float16" and m["encoder"]["spec"] == enc.name
    assert m["input"]["num_inputs"] == len(expected) and m["settings"]["max_pixels"] == BOMB_LIMIT
    assert set(schema.MANIFEST_KEYS) <= set(m)
    # Values: the vector of the animated GIF is the mean colour of its first (red) frame.
    gif = emb[emb[schema.COL_SOURCE].str.endswith("animated.gif")].iloc[0]
    want = enc._vectors(np.array([[1.0, 0.0, 0.0]], np.float32))[0]
    np.testing.assert_allclose(np.asarray(gif[schema.COL_EMBEDDING], np.float32), want, atol=2e-3)
    # Every timing stage was measured.
    assert {"list", "setup", "read_decode_preprocess", "wait", "encode", "write", "loop"} <= set(res.timings)


def test_mixed_folder_with_the_real_tiny_clip(tmp_path: Path, mixed_folder, tiny_clip) -> None:
    root, expected = mixed_folder
    res = embed(tiny_clip, root, tmp_path / "out", max_pixels=BOMB_LIMIT, shard_size=5, batch_size=4,
                num_workers=1, dtype="float32", progress=False)
    emb, _ = check_outcomes(tmp_path / "out", expected)
    assert res.embedded == len(emb) and res.failed + res.embedded == len(expected)
    # The stored vector of an image is what the encoder gives for it alone.
    rotated = str(root / "rotated_exif.jpg")
    row = emb.set_index(schema.COL_SOURCE).loc[rotated]
    direct = encode_images(tiny_clip, [rotated])[0]
    np.testing.assert_allclose(np.asarray(row[schema.COL_EMBEDDING], np.float32), direct, rtol=1e-4, atol=1e-5)
    m = read_manifest(tmp_path / "out")
    assert m["encoder"]["preprocessing"] and m["normalized"] is True and m["dim"] == tiny_clip.dim


def test_no_images_is_a_clear_error(tmp_path: Path, mean_colour: MeanColourEncoder) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(InputError, match="no images found.*1 entries skipped"):
        embed(mean_colour, tmp_path / "empty", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# --- resume ----------------------------------------------------------------------------------------
def _small_folder(root: Path, n: int) -> list[str]:
    paths = []
    for i in range(n):
        p = root / f"img_{i:03d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (6 + i % 5, 5), ((i * 37) % 256, (i * 91) % 256, (i * 13) % 256)).save(p)
        paths.append(str(p))
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    paths.append(str(root / "broken.jpg"))
    return paths


def test_resume_redoes_only_missing_shards_and_cleans_crash_leftovers(tmp_path: Path) -> None:
    paths = _small_folder(tmp_path / "in", 20)
    settings = dict(shard_size=3, batch_size=2, num_workers=0, progress=False)
    ref = embed(MeanColourEncoder(), tmp_path / "in", tmp_path / "ref", **settings)
    out = tmp_path / "out"
    shutil.copytree(tmp_path / "ref", out)
    m = read_manifest(out)
    m["complete"] = False
    (out / schema.MANIFEST_FILE).write_text(__import__("json").dumps(m))
    # Simulate crashes: shard 2 lost its embeddings file after its errors were committed (the
    # broken.jpg sits in shard 0, so give shard 2 a stale errors file), shard 5 never finished,
    # and a temporary file is lying around.
    (out / schema.EMBEDDINGS_DIR / "part-00002.parquet").unlink()
    shutil.copy(out / schema.ERRORS_DIR / "part-00000.parquet", out / schema.ERRORS_DIR / "part-00002.parquet")
    (out / schema.EMBEDDINGS_DIR / "part-00005.parquet").unlink()
    (out / schema.EMBEDDINGS_DIR / ".part-00005.parquet.4242.tmp").write_bytes(b"half")
    enc = MeanColourEncoder()
    res = embed(enc, tmp_path / "in", out, **settings)
    assert res.status == "completed"
    assert res.processed == len(range(6, 9)) + len(range(15, 18))
    assert res.skipped == len(paths) - res.processed
    emb, err = _read(out, schema.EMBEDDINGS_DIR), _read(out, schema.ERRORS_DIR)
    assert sorted(list(emb.id) + list(err.id)) == sorted(record_id(p) for p in paths)
    assert list(err.source) == [str(tmp_path / "in" / "broken.jpg")]
    ref_emb = _read(tmp_path / "ref", schema.EMBEDDINGS_DIR)
    pd.testing.assert_frame_equal(emb.drop(columns=[schema.COL_EMBEDDING]), ref_emb.drop(columns=[schema.COL_EMBEDDING]))
    np.testing.assert_array_equal(np.stack(emb[schema.COL_EMBEDDING]), np.stack(ref_emb[schema.COL_EMBEDDING]))
    assert not list((out / schema.EMBEDDINGS_DIR).glob(".*.tmp"))
    assert read_manifest(out)["complete"] is True and ref.embedded == res.embedded


def test_rerun_of_a_finished_run_does_nothing(tmp_path: Path, mean_colour: MeanColourEncoder) -> None:
    _small_folder(tmp_path / "in", 5)
    first = embed(mean_colour, tmp_path / "in", tmp_path / "out", shard_size=2, num_workers=0, progress=False)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*") if p.is_file()}
    calls = mean_colour.calls
    again = embed(mean_colour, tmp_path / "in", tmp_path / "out", shard_size=2, num_workers=0, progress=False)
    assert again.status == "already_complete" and first.status == "completed"
    assert (again.embedded, again.failed, again.skipped, again.processed) == (first.embedded, first.failed, first.inputs, 0)
    assert mean_colour.calls == calls
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*") if p.is_file()} == before


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"shard_size": 3}, "shard_size: 2 before, 3 now"),
        ({"dtype": "float32"}, "dtype: 'float16' before, 'float32' now"),
        ({"max_pixels": 1000}, "max_pixels"),
        ({"model": MeanColourEncoder(name="clip:other")}, "clip:other"),
    ],
)
def test_rerun_with_other_settings_is_refused(tmp_path: Path, change: dict, message: str) -> None:
    _small_folder(tmp_path / "in", 4)
    embed(MeanColourEncoder(), tmp_path / "in", tmp_path / "out", shard_size=2, num_workers=0, progress=False)
    settings = dict(shard_size=2, num_workers=0, progress=False)
    model = change.pop("model", MeanColourEncoder())
    settings.update(change)
    with pytest.raises(OutputError, match="different .*" + message.replace("(", r"\(")) as e:
        embed(model, tmp_path / "in", tmp_path / "out", **settings)
    assert "choose another --output" in str(e.value)


def test_rerun_after_inputs_changed_is_refused(tmp_path: Path, mean_colour: MeanColourEncoder) -> None:
    _small_folder(tmp_path / "in", 4)
    embed(mean_colour, tmp_path / "in", tmp_path / "out", shard_size=2, num_workers=0, progress=False)
    Image.new("RGB", (4, 4)).save(tmp_path / "in" / "new.png")
    with pytest.raises(OutputError, match="num_inputs: 5 before, 6 now"):
        embed(mean_colour, tmp_path / "in", tmp_path / "out", shard_size=2, num_workers=0, progress=False)


def test_model_describe_change_is_refused_on_resume(tmp_path: Path) -> None:
    _small_folder(tmp_path / "in", 4)
    out = tmp_path / "out"
    embed(MeanColourEncoder(), tmp_path / "in", out, shard_size=2, num_workers=0, progress=False)
    m = read_manifest(out)
    m["complete"] = False
    m["encoder"]["preprocessing"] = {"mean_colour": False}
    (out / schema.MANIFEST_FILE).write_text(__import__("json").dumps(m))
    (out / schema.EMBEDDINGS_DIR / "part-00001.parquet").unlink()
    with pytest.raises(OutputError, match="different model.*preprocessing.mean_colour: False before, True now"):
        embed(MeanColourEncoder(), tmp_path / "in", out, shard_size=2, num_workers=0, progress=False)


def test_foreign_folder_is_refused(tmp_path: Path, mean_colour: MeanColourEncoder) -> None:
    _small_folder(tmp_path / "in", 2)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.tex").write_text("precious")
    with pytest.raises(OutputError, match="not a phiclip output"):
        embed(mean_colour, tmp_path / "in", tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "thesis.tex").read_text() == "precious"


def test_an_output_path_that_is_a_file_is_a_message(tmp_path: Path, mean_colour: MeanColourEncoder) -> None:
    _small_folder(tmp_path / "in", 2)
    (tmp_path / "out").write_text("precious")
    with pytest.raises(OutputError, match=r"out: exists and is not a folder; give a folder for --output"):
        embed(mean_colour, tmp_path / "in", tmp_path / "out", progress=False)
    assert (tmp_path / "out").read_text() == "precious"


def test_concurrent_run_on_the_same_output_is_refused(tmp_path: Path, mean_colour: MeanColourEncoder) -> None:
    _small_folder(tmp_path / "in", 2)
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys, time\n"
         f"fd = os.open({str(out / '.phiclip.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.lockf(fd, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(60)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputError, match="another phiclip run is writing"):
            embed(mean_colour, tmp_path / "in", out, progress=False)
    finally:
        holder.kill()
        holder.wait()
    assert embed(mean_colour, tmp_path / "in", out, progress=False, num_workers=0).status == "completed"


# --- batching, model failures, non-finite outputs -------------------------------------------------------
@pytest.mark.parametrize(
    ("costs", "budget", "groups"),
    [
        ([1, 1, 1, 1, 1], 2, [[1, 1], [1, 1], [1]]),
        ([3, 1, 1, 5, 2], 4, [[3, 1], [1], [5], [2]]),
        ([9], 4, [[9]]),
        ([], 4, []),
        ([2, 2, 2], 6, [[2, 2, 2]]),
    ],
)
def test_cost_packer(costs: list[int], budget: int, groups: list[list[int]]) -> None:
    packer = CostPacker(budget)
    got = [g for i, c in enumerate(costs) if (g := packer.add((i, None, None, c), c)) is not None]
    got += [last] if (last := packer.flush()) else []
    assert [[it[3] for it in g] for g in got] == groups
    assert [it[0] for g in got for it in g] == list(range(len(costs)))  # order kept


def test_batches_respect_the_cost_budget(tmp_path: Path) -> None:
    root = tmp_path / "in"
    root.mkdir()
    for i in range(12):  # every third image is wide
        Image.new("RGB", (60 if i % 3 == 0 else 20, 10), (i, i, i)).save(root / f"{i:02d}.png")
    enc = MeanColourEncoder(wide_cost=3)  # images wider than 40 px cost 3
    embed(enc, root, tmp_path / "out", batch_size=4, shard_size=100, num_workers=0, progress=False)
    # Sorted names 00..11 cost 3,1,1,3 | 1,1,3,1 | 1,3,1,1 in chunks of 4 records; within a budget of 4:
    # [3,1] [1,3] | [1,1] [3,1] | [1,3] [1,1].
    assert enc.seen_batches == [2, 2, 2, 2, 2, 2]
    flat = MeanColourEncoder(wide_cost=1)
    embed(flat, root, tmp_path / "out1", batch_size=4, shard_size=100, num_workers=0, progress=False)
    assert flat.seen_batches == [4, 4, 4]


def test_model_failure_stops_keeps_committed_shards_and_resumes(tmp_path: Path) -> None:
    paths = _small_folder(tmp_path / "in", 10)
    settings = dict(shard_size=2, batch_size=2, num_workers=0, progress=False)
    with pytest.raises(RuntimeError, match="the model failed on a batch .*simulated device failure.*resumes"):
        embed(MeanColourEncoder(fail_on=4), tmp_path / "in", tmp_path / "out", **settings)
    done = sorted(p.name for p in (tmp_path / "out" / schema.EMBEDDINGS_DIR).glob("*.parquet"))
    assert 1 <= len(done) < 6
    assert read_manifest(tmp_path / "out")["complete"] is False
    res = embed(MeanColourEncoder(), tmp_path / "in", tmp_path / "out", **settings)
    assert res.skipped > 0 and res.embedded + res.failed == len(paths)


def test_non_finite_vectors_become_errors(tmp_path: Path) -> None:
    root = tmp_path / "in"
    root.mkdir()
    Image.new("RGB", (5, 5), (250, 0, 0)).save(root / "red.png")
    Image.new("RGB", (5, 5), (0, 0, 250)).save(root / "blue.png")
    res = embed(MeanColourEncoder(nan_on_red=True), root, tmp_path / "out", num_workers=0, progress=False)
    err = _read(tmp_path / "out", schema.ERRORS_DIR)
    assert (res.embedded, res.failed) == (1, 1)
    assert list(err.source) == [str(root / "red.png")] and list(err.stage) == ["encode"]
    assert "non-finite" in err.reason[0]


# --- other inputs, dtypes, tokens, texts ----------------------------------------------------------------
def test_parquet_bytes_input_and_float32(tmp_path: Path, mean_colour: MeanColourEncoder) -> None:
    blobs = []
    for i in range(5):
        buf = io.BytesIO()
        Image.new("RGB", (3 + i, 4), (0, 50 * i, 0)).save(buf, format="PNG")
        blobs.append(buf.getvalue())
    blobs.append(b"not an image")
    blobs.append(None)
    path = tmp_path / "imgs.parquet"
    pq.write_table(pa.table({"jpg": pa.array(blobs, pa.binary())}), path, row_group_size=2)
    res = embed(mean_colour, path, tmp_path / "out", dtype="float32", shard_size=3, num_workers=2, progress=False)
    assert (res.embedded, res.failed) == (5, 2)
    emb = _read(tmp_path / "out", schema.EMBEDDINGS_DIR)
    assert list(emb.source) == [f"{path}#row={i}" for i in range(5)]
    assert list(emb.width) == [3, 4, 5, 6, 7]
    assert pq.read_schema(tmp_path / "out" / schema.EMBEDDINGS_DIR / "part-00000.parquet").field("embedding").type == pa.list_(pa.float32(), 4)
    err = _read(tmp_path / "out", schema.ERRORS_DIR)
    assert dict(zip(err.source, err.stage)) == {f"{path}#row=5": "decode", f"{path}#row=6": "read"}


def test_hf_dataset_input(tmp_path: Path, mean_colour: MeanColourEncoder) -> None:
    datasets = pytest.importorskip("datasets", reason="datasets is not installed (phiclip[datasets], in the dev extra)")
    paths = _small_folder(tmp_path / "src", 6)[:6]
    ds = datasets.Dataset.from_dict({"image": paths}).cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "ds"))
    res = embed(mean_colour, f"hf:{tmp_path / 'ds'}", tmp_path / "out", shard_size=4, num_workers=2, progress=False)
    assert (res.embedded, res.failed) == (6, 0)
    emb = _read(tmp_path / "out", schema.EMBEDDINGS_DIR)
    assert list(emb.width) == [6, 7, 8, 9, 10, 6]


def test_tokens_are_written_beside_the_vectors(tmp_path: Path, mean_colour: MeanColourEncoder) -> None:
    _small_folder(tmp_path / "in", 5)
    res = embed(mean_colour, tmp_path / "in", tmp_path / "out", tokens=True, shard_size=2, dtype="float32",
                num_workers=0, progress=False)
    emb = _read(tmp_path / "out", schema.EMBEDDINGS_DIR)
    tok = _read(tmp_path / "out", schema.TOKENS_DIR)
    assert list(tok.id) == list(emb.id) and res.embedded == 5
    assert set(tok.num_tokens) == {3}
    first = np.stack(tok.tokens[0]).astype(np.float32)
    v = np.asarray(emb.embedding[0], np.float32)
    np.testing.assert_allclose(first, np.stack([v, -v, 2 * v]), atol=1e-6)
    assert read_manifest(tmp_path / "out")["settings"]["tokens"] is True


def test_tokens_with_phi3v(tmp_path: Path) -> None:
    from phiclip.encoders import load_encoder
    from phiclip.testing import build_tiny_phi3v

    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
             "image_size": 336, "patch_size": 14}
    ckpt = build_tiny_phi3v(tmp_path / "phi3v", vision_config=tower, hidden_size=32, num_crops=1)
    enc = load_encoder(f"phi3v:{ckpt}", device="cpu", dtype="float32")
    root = tmp_path / "in"
    root.mkdir()
    for i, size in enumerate([(40, 30), (30, 50)]):
        Image.new("RGB", size, (40 * i, 80, 120)).save(root / f"{i}.png")
    res = embed(enc, root, tmp_path / "out", tokens=True, batch_size=4, num_workers=0, dtype="float32", progress=False)
    assert res.embedded == 2
    tok = _read(tmp_path / "out", schema.TOKENS_DIR)
    emb = _read(tmp_path / "out", schema.EMBEDDINGS_DIR)
    direct = enc.encode_tokens([str(root / "0.png")])[0]
    row = tok.set_index("id").loc[record_id(str(root / "0.png"))]
    assert row.num_tokens == direct.shape[0]
    np.testing.assert_allclose(np.stack(row.tokens), direct, rtol=1e-4, atol=1e-5)
    assert len(emb.embedding[0]) == enc.dim


def test_embed_text(tmp_path: Path, mean_colour: MeanColourEncoder) -> None:
    txt = tmp_path / "t.txt"
    txt.write_text("a red\na blue\n\na red\na green\n")
    res = embed_text(mean_colour, txt, tmp_path / "out", batch_size=2, shard_size=2, progress=False)
    assert (res.embedded, res.failed, res.duplicates, res.ignored) == (3, 0, 1, 1)
    emb = _read(tmp_path / "out", schema.EMBEDDINGS_DIR)
    assert list(emb.text) == ["a red", "a blue", "a green"]
    np.testing.assert_allclose(np.stack(emb.embedding).astype(np.float32),
                               mean_colour.encode_texts(["a red", "a blue", "a green"]), atol=2e-3)
    assert read_manifest(tmp_path / "out")["kind"] == "text"
    assert embed_text(mean_colour, txt, tmp_path / "out", batch_size=2, shard_size=2, progress=False).status == "already_complete"


def test_embed_text_with_tiny_clip(tmp_path: Path, tiny_clip) -> None:
    txt = tmp_path / "t.txt"
    txt.write_text("a red circle\na blue square\n")
    embed_text(tiny_clip, txt, tmp_path / "out", dtype="float32", progress=False)
    emb = _read(tmp_path / "out", schema.EMBEDDINGS_DIR)
    np.testing.assert_allclose(np.stack(emb.embedding), tiny_clip.encode_texts(["a red circle", "a blue square"]),
                               rtol=1e-4, atol=1e-5)


def test_embed_text_refuses_image_only_models(tmp_path: Path) -> None:
    enc = MeanColourEncoder()
    enc.modalities = frozenset({"image"})
    (tmp_path / "t.txt").write_text("hello\n")
    with pytest.raises(InputError, match="embeds images only"):
        embed_text(enc, tmp_path / "t.txt", tmp_path / "out", progress=False)


# --- options and the public entry point -----------------------------------------------------------------
def test_options_defaults_and_validation() -> None:
    o = make_options()
    assert o == EmbedOptions()
    # Worker processes beside a GPU; on the CPU the model uses every core, so inputs are prepared in-process.
    assert o.workers("cuda") == o.workers("cuda:1") == min(4, os.cpu_count() or 1)
    assert o.workers("cpu") == 0
    assert make_options(num_workers=0).workers("cuda") == 0
    assert make_options(num_workers=3).workers("cpu") == 3
    with pytest.raises(TypeError, match="unknown setting.*'batchsize'"):
        make_options(batchsize=3)
    for bad in ({"batch_size": 0}, {"dtype": "int8"}, {"shard_size": 0}, {"max_pixels": 0}, {"num_workers": -1}):
        with pytest.raises(ValueError):
            make_options(**bad)


def test_public_embed_is_the_runner() -> None:
    import phiclip

    assert phiclip.embed is embed


# --- readers ---------------------------------------------------------------------------------------------
def test_output_is_readable_by_pyarrow_pandas_and_datasets(tmp_path: Path, mixed_folder) -> None:
    root, expected = mixed_folder
    out = tmp_path / "out"
    res = embed(MeanColourEncoder(), root, out, max_pixels=BOMB_LIMIT, shard_size=4, num_workers=0, progress=False)
    import pyarrow.dataset as pads

    table = pads.dataset(str(out / schema.EMBEDDINGS_DIR), format="parquet").to_table()
    assert table.num_rows == res.embedded
    assert pa.types.is_fixed_size_list(table.schema.field(schema.COL_EMBEDDING).type)
    df = pd.read_parquet(out / schema.ERRORS_DIR)  # failed inputs, and the skipped files (stage "skip")
    assert set(df.columns) == {"id", "source", "stage", "reason"}
    assert (df.stage != "skip").sum() == res.failed and (df.stage == "skip").sum() == res.ignored
    datasets = pytest.importorskip("datasets", reason="datasets is not installed (phiclip[datasets], in the dev extra)")
    ds = datasets.load_dataset("parquet", data_files=str(out / schema.EMBEDDINGS_DIR / "*.parquet"), split="train",
                               cache_dir=str(tmp_path / "hf_cache"))
    assert len(ds) == res.embedded and len(ds[0]["embedding"]) == 4
    errs = datasets.load_dataset("parquet", data_files=str(out / schema.ERRORS_DIR / "*.parquet"), split="train",
                                 cache_dir=str(tmp_path / "hf_cache"))
    assert len(errs) == res.failed + res.ignored
    # The project's own reader agrees.
    from phiclip.store import open_embeddings

    es = open_embeddings(out)
    assert len(es) == res.embedded and es.embeddings.shape == (res.embedded, 4)


@pytest.mark.parametrize("tool", ["duckdb", "polars"])
def test_output_is_readable_by_duckdb_and_polars(tmp_path: Path, tool: str) -> None:
    mod = pytest.importorskip(tool, reason=f"{tool} is not installed (it is in the dev extra)")
    _small_folder(tmp_path / "in", 5)
    out = tmp_path / "out"
    embed(MeanColourEncoder(), tmp_path / "in", out, shard_size=2, num_workers=0, progress=False)
    pattern = str(out / schema.EMBEDDINGS_DIR / "*.parquet")
    if tool == "duckdb":
        rows = mod.sql(f"select id, len(embedding) from read_parquet('{pattern}')").fetchall()
        assert len(rows) == 5 and {r[1] for r in rows} == {4}
    else:
        df = mod.read_parquet(pattern)
        assert df.height == 5 and df["embedding"].dtype.size == 4


def test_progress_bar_reports_rate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _small_folder(tmp_path / "in", 3)
    t0 = time.perf_counter()
    res = embed(MeanColourEncoder(), tmp_path / "in", tmp_path / "out", num_workers=0, progress=True)
    err = capsys.readouterr().err
    assert "img/s" in err and "4/4" in err
    assert res.seconds <= time.perf_counter() - t0 + 1e-6 and res.items_per_second > 0


def test_all_shards_written_but_manifest_unfinished(tmp_path: Path, mean_colour: MeanColourEncoder) -> None:
    """A kill after the last shard but before the final manifest: the rerun only finishes the manifest."""
    _small_folder(tmp_path / "in", 5)
    out = tmp_path / "out"
    first = embed(mean_colour, tmp_path / "in", out, shard_size=2, num_workers=0, progress=False)
    m = read_manifest(out)
    m["complete"], m["counts"] = False, {"inputs": 6, "embedded": 0, "failed": 0}
    (out / schema.MANIFEST_FILE).write_text(__import__("json").dumps(m))
    calls = mean_colour.calls
    res = embed(mean_colour, tmp_path / "in", out, shard_size=2, num_workers=0, progress=False)
    assert (res.status, res.processed, res.skipped) == ("completed", 0, 6)
    assert mean_colour.calls == calls
    m2 = read_manifest(out)
    assert m2["complete"] is True and m2["counts"]["embedded"] == first.embedded


class _FailingReader:
    def read(self, records):  # noqa: ANN001, ANN201
        raise OSError("network share went away")


def test_worker_turns_read_and_collate_failures_into_errors(tmp_path: Path) -> None:
    from phiclip.pipeline.sources import PayloadReader, Record

    paths = _small_folder(tmp_path / "in", 4)[:4]
    records = [Record(record_id(p), p, p) for p in paths]
    enc = MeanColourEncoder()
    work = Preparer(records, _FailingReader(), enc, max_pixels=None, budget=8)
    pieces = list(work.pieces(Chunk(0, [0, 1, 2, 3])))
    assert sum(p.count for p in pieces) == 4 and not any(p.positions for p in pieces)
    assert [e[1] for p in pieces for e in p.errors] == ["read"] * 4
    assert "network share went away" in pieces[0].errors[0][2]

    def bad_collate(items):  # noqa: ANN001, ANN202
        raise ValueError("shapes differ")

    enc.collate = bad_collate
    work = Preparer(records, PayloadReader(), enc, max_pixels=None, budget=3)
    pieces = list(work.pieces(Chunk(0, [0, 1, 2, 3])))
    assert sum(p.count for p in pieces) == 4
    errs = [e for p in pieces for e in p.errors]
    assert sorted(e[0] for e in errs) == [0, 1, 2, 3] and {e[1] for e in errs} == {"preprocess"}
    assert "could not batch (ValueError: shapes differ)" in errs[0][2]


def test_worker_pieces_bound_the_memory_in_flight(tmp_path: Path) -> None:
    """A chunk is yielded batch by batch; every record is in exactly one piece."""
    from phiclip.pipeline.sources import PayloadReader, Record

    paths = _small_folder(tmp_path / "in", 7)  # 7 images and a broken one
    records = [Record(record_id(p), p, p) for p in paths]
    enc = MeanColourEncoder()
    work = Preparer(records, PayloadReader(), enc, max_pixels=None, budget=3)
    pieces = list(work.pieces(Chunk(0, list(range(len(records))))))
    assert [len(p.positions) for p in pieces] == [3, 3, 1]
    seen = sorted([i for p in pieces for i in p.positions] + [e[0] for p in pieces for e in p.errors])
    assert seen == list(range(len(records))) and sum(p.count for p in pieces) == len(records)


def test_tokens_with_a_model_without_tokens_is_a_clear_error(tmp_path: Path, tiny_clip) -> None:
    _small_folder(tmp_path / "in", 2)
    with pytest.raises(ValueError, match="image tokens are a phi3v option"):
        embed(tiny_clip, tmp_path / "in", tmp_path / "out", tokens=True, num_workers=0, progress=False)
    assert read_manifest(tmp_path / "out")["complete"] is False


def test_finished_output_missing_a_shard_is_repaired(tmp_path: Path, mean_colour: MeanColourEncoder) -> None:
    paths = _small_folder(tmp_path / "in", 6)
    out = tmp_path / "out"
    embed(mean_colour, tmp_path / "in", out, shard_size=2, num_workers=0, progress=False)
    (out / schema.EMBEDDINGS_DIR / "part-00001.parquet").unlink()
    res = embed(mean_colour, tmp_path / "in", out, shard_size=2, num_workers=0, progress=False)
    assert (res.status, res.processed) == ("completed", 2)
    emb, err = _read(out, schema.EMBEDDINGS_DIR), _read(out, schema.ERRORS_DIR)
    assert sorted(list(emb.id) + list(err.id)) == sorted(record_id(p) for p in paths)
    assert read_manifest(out)["complete"] is True


def test_a_model_that_cannot_load_leaves_no_output_folder(tmp_path: Path) -> None:
    _small_folder(tmp_path / "in", 2)
    with pytest.raises(ValueError, match="no such directory"):
        embed(f"clip:{tmp_path / 'no_model'}", tmp_path / "in", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# --- who prepares the inputs: threads, one thread, worker processes ---------------------------------------
class _ThreadSpy(MeanColourEncoder):
    """Records the names of the threads that preprocess (in-process runs)."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: set[str] = set()

    def preprocess(self, image: Any) -> dict[str, Any]:
        import threading

        self.threads.add(threading.current_thread().name)
        return super().preprocess(image)


def _rows(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    emb = _read(out, schema.EMBEDDINGS_DIR).sort_values(schema.COL_ID, ignore_index=True)
    err = _read(out, schema.ERRORS_DIR).sort_values(schema.COL_ID, ignore_index=True)
    return emb, err


def test_thread_pool_one_thread_and_worker_processes_write_the_same(tmp_path: Path, mixed_folder,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    from phiclip.pipeline import local as runner  # where the preparing threads are started

    root, expected = mixed_folder
    settings = dict(max_pixels=BOMB_LIMIT, shard_size=4, batch_size=3, dtype="float32", progress=False)
    limit_before = Image.MAX_IMAGE_PIXELS
    monkeypatch.setattr(runner, "default_prep_threads", lambda: 3)
    pooled = _ThreadSpy()
    embed(pooled, root, tmp_path / "pool", num_workers=0, **settings)
    assert pooled.threads and all(t.startswith("phiclip-prep") for t in pooled.threads)
    monkeypatch.setattr(runner, "default_prep_threads", lambda: 1)
    serial = _ThreadSpy()
    embed(serial, root, tmp_path / "serial", num_workers=0, **settings)
    import threading

    assert serial.threads == {threading.current_thread().name}
    embed(MeanColourEncoder(), root, tmp_path / "workers", num_workers=2, **settings)
    assert Image.MAX_IMAGE_PIXELS == limit_before  # the run's pixel limit does not outlive it
    check_outcomes(tmp_path / "pool", expected)
    ref_emb, ref_err = _rows(tmp_path / "serial")
    for other in ("pool", "workers"):
        emb, err = _rows(tmp_path / other)
        pd.testing.assert_frame_equal(emb, ref_emb)
        pd.testing.assert_frame_equal(err, ref_err)


def test_cpu_encoder_defaults_to_in_process_threads(tmp_path: Path, mixed_folder, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no --num-workers, an encoder on the CPU gets no worker processes (the model uses every core)."""
    from phiclip.pipeline import local as runner  # where the preparing threads are started

    root, _ = mixed_folder
    monkeypatch.setattr(runner, "default_prep_threads", lambda: 2)
    spy = _ThreadSpy()  # describe() says device cpu
    embed(spy, root, tmp_path / "out", max_pixels=BOMB_LIMIT, progress=False)
    assert spy.threads and all(t.startswith("phiclip-prep") for t in spy.threads)


@pytest.mark.parametrize("mode", ["pool", "one_thread", "workers"])
def test_max_pixels_beyond_pils_own_limit_and_pils_limit_left_alone(tmp_path: Path, mode: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """``max_pixels`` decides, not PIL's process-wide limit, which is never left changed: not after a
    run, not after a run whose model failed, and no preparing thread outlives a run."""
    import threading

    from PIL import Image

    from phiclip.pipeline import local as runner  # where the preparing threads are started

    (tmp_path / "in").mkdir()
    Image.new("RGB", (100, 100), (200, 10, 10)).save(tmp_path / "in" / "big.png")
    Image.new("RGB", (20, 20), (10, 200, 10)).save(tmp_path / "in" / "small.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL alone would refuse the 100x100 image
    monkeypatch.setattr(runner, "default_prep_threads", lambda: 1 if mode == "one_thread" else 3)
    workers = 2 if mode == "workers" else 0
    common = dict(num_workers=workers, progress=False, shard_size=1)
    res = embed(MeanColourEncoder(), tmp_path / "in", tmp_path / "none", max_pixels=None, **common)
    assert (res.embedded, res.failed) == (2, 0)
    res = embed(MeanColourEncoder(), tmp_path / "in", tmp_path / "limited", max_pixels=5000, **common)
    assert (res.embedded, res.failed) == (1, 1)
    assert "over the pixel limit of 5000" in _read(tmp_path / "limited", schema.ERRORS_DIR)[schema.COL_REASON].iloc[0]
    assert Image.MAX_IMAGE_PIXELS == 1000
    with pytest.raises(RuntimeError, match="simulated device failure"):
        embed(MeanColourEncoder(fail_on=1), tmp_path / "in", tmp_path / "failed", max_pixels=None, **common)
    assert Image.MAX_IMAGE_PIXELS == 1000
    assert not [t for t in threading.enumerate() if t.name.startswith("phiclip-prep")]


def test_max_pixels_bounds_the_phi3v_canvas_in_a_run(tmp_path: Path) -> None:
    """--max-pixels reaches the encoder's preprocessing: an image that decodes within the limit but whose
    HD canvas at num_crops=16 would not fails alone at the preprocess stage, naming the limit."""
    from phiclip.testing import build_tiny_phi3v

    ckpt = build_tiny_phi3v(tmp_path / "phi3v")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(imgs / "small.png")  # 3072 px; canvas 1344x1008 at 16 crops
    out = tmp_path / "out"
    res = embed(f"phi3v:{ckpt}?num_crops=16", imgs, out, max_pixels=1_000_000, progress=False, device="cpu")
    assert (res.embedded, res.failed) == (0, 1)
    errors = pd.read_parquet(out / "errors")
    errors = errors[errors["stage"] != "skip"]
    assert list(errors["stage"]) == ["preprocess"]
    assert "1000000" in errors["reason"].iloc[0]
    res = embed(f"phi3v:{ckpt}?num_crops=16", imgs, tmp_path / "out2", max_pixels=None, progress=False, device="cpu")
    assert (res.embedded, res.failed) == (1, 0)


def test_engine_ray_without_ray_says_how_to_install_it_before_writing(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    _small_folder(tmp_path / "in", 2)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray Data were not installed
    with pytest.raises(RuntimeError, match=r"pip install 'phiclip\[ray\]'"):
        embed(MeanColourEncoder(), tmp_path / "in", tmp_path / "out", engine="ray", progress=False)
    assert not (tmp_path / "out").exists()
    for bad in ({"engine": "spark"}, {"flush_seconds": 0}, {"prune": True}, {"num_actors": 0}):
        with pytest.raises(ValueError):
            make_options(**bad)


def test_the_recorded_reason_for_a_precision_is_not_part_of_the_identity() -> None:
    """A CPU measurement redone after a torch upgrade rewrites describe()["precision"] (the reason);
    the dtype that decides the vectors is compared, the reason is not."""
    from phiclip.manifest import stable_description

    old = {"spec": "clip:x", "dtype": "bfloat16", "device": "cpu",
           "precision": {"asked": "auto", "reason": "bfloat16 measured 1.9x float32"}}
    new = {**old, "device": "cuda", "precision": {"asked": "auto", "reason": "bfloat16 measured 2.3x float32"}}
    assert stable_description(old) == stable_description(new)
    assert stable_description(old) != stable_description({**new, "dtype": "float32"})


# --- checkpoint paths are stored absolute, so the output works from any directory ---------------------
def test_a_relative_checkpoint_path_is_stored_absolute_and_searched_from_anywhere(
        tmp_path: Path, tiny_clip_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from phiclip.retrieval import search

    _small_folder(tmp_path / "in", 3)
    shutil.copytree(tiny_clip_dir, tmp_path / "ckpt")
    monkeypatch.chdir(tmp_path)
    embed("clip:ckpt", "in", "out", progress=False, device="cpu", precision="float32")
    m = read_manifest(tmp_path / "out")
    assert m["encoder"]["spec"] == f"clip:{tmp_path / 'ckpt'}" and m["encoder"]["spec_as_typed"] == "clip:ckpt"
    assert m["settings"]["model"] == f"clip:{tmp_path / 'ckpt'}"
    # a rerun typed another way (absolute) is the same run
    assert embed(f"clip:{tmp_path / 'ckpt'}", "in", "out", progress=False, device="cpu",
                 precision="float32").status == "already_complete"
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert search(tmp_path / "out", text="red", k=1, device="cpu", dtype="float32")
    # an output of an older phiclip (a relative path, no spec_as_typed) still loads, and still resumes
    mpath = tmp_path / "out" / schema.MANIFEST_FILE
    old = json.loads(mpath.read_text())
    del old["encoder"]["spec_as_typed"]
    old["encoder"]["spec"] = old["settings"]["model"] = "clip:ckpt"
    mpath.write_text(json.dumps(old))
    assert search(tmp_path / "out", text="red", k=1, device="cpu", dtype="float32")  # under the output's parent
    monkeypatch.chdir(tmp_path)
    assert embed("clip:ckpt", "in", "out", progress=False, device="cpu", precision="float32").status == "already_complete"
