"""Attacks on the bulk pipeline's inputs and output folder (issue 9, items 3, 5, 7, 8 and 10): other
weights on resume, file names that are not UTF-8, huge non-images, lock and cleanup races, a full
disk, skipped files, a huge CSV cell and a damaged manifest. Every test builds real files and checks
the message and that every input is accounted for exactly once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from PIL import Image
from pipeline._helpers import MeanColourEncoder

from phiclip import schema
from phiclip.inputs import load_data as load_table
from phiclip.manifest import read_manifest
from phiclip.pipeline import InputError, OutputError, embed
from phiclip.pipeline import runner as runner_mod
from phiclip.pipeline.sources import list_inputs, record_id
from phiclip.pipeline.writer import ShardWriter
from phiclip.schema import path_to_source, source_to_path
from phiclip.testing import build_tiny_clip

TESTS = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def _images(root: Path, n: int) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = root / f"img_{i:02d}.png"
        Image.new("RGB", (20 + i, 16), ((i * 53) % 256, (i * 97) % 256, (i * 29) % 256)).save(p)
        out.append(p)
    return out


def _rows(out: Path, folder: str) -> pd.DataFrame:
    files = sorted((out / folder).glob("part-*.parquet"))
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True) if files else pd.DataFrame(
        columns=[schema.COL_ID, schema.COL_SOURCE, schema.COL_STAGE, schema.COL_REASON])


def _assert_exactly_once(out: Path, ids: set[str]) -> None:
    got = list(_rows(out, schema.EMBEDDINGS_DIR)[schema.COL_ID]) + list(_rows(out, schema.ERRORS_DIR)[schema.COL_ID])
    assert len(got) == len(set(got)), "an input is in the output twice"
    assert set(got) == ids, "inputs lost or invented"


def _stop_after(monkeypatch: pytest.MonkeyPatch, shards: int) -> None:
    """Make the writer die (like a killed run) when it is about to commit shard number ``shards + 1``."""
    real = ShardWriter.write_shard
    calls = {"n": 0}

    def write_shard(self: ShardWriter, shard: int, result: Any) -> None:
        calls["n"] += 1
        if calls["n"] > shards:
            raise KeyboardInterrupt("killed")
        real(self, shard, result)

    monkeypatch.setattr(ShardWriter, "write_shard", write_shard)


# --- item 3: a resume with other weights ----------------------------------------------------------------
def test_resume_after_the_weights_changed_is_refused_naming_both_fingerprints(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = build_tiny_clip(tmp_path / "clip", image_size=32, patch_size=16, seed=0)
    paths = _images(tmp_path / "in", 8)
    spec, out = f"clip:{ckpt}", tmp_path / "out"
    kw = dict(shard_size=2, batch_size=2, num_workers=0, device="cpu", precision="float32", progress=False)
    with monkeypatch.context() as m:
        _stop_after(m, 2)
        with pytest.raises(KeyboardInterrupt):
            embed(spec, tmp_path / "in", out, **kw)
    old_fp = read_manifest(out)["encoder"].get("weights_fingerprint")
    assert len(list((out / schema.EMBEDDINGS_DIR).glob("part-*.parquet"))) == 2
    # The same path now holds other weights (a replaced download, a moved hub revision).
    build_tiny_clip(ckpt, image_size=32, patch_size=16, seed=1)
    with pytest.raises(OutputError, match=r"weights changed: old sha256:\S+ new sha256:\S+") as e:
        embed(spec, tmp_path / "in", out, **kw)
    assert old_fp and old_fp.startswith("sha256:") and f"old {old_fp} new" in str(e.value)
    assert len(list((out / schema.EMBEDDINGS_DIR).glob("part-*.parquet"))) == 2  # nothing was added
    # With the old weights back, the run finishes, every input exactly once.
    build_tiny_clip(ckpt, image_size=32, patch_size=16, seed=0)
    assert embed(spec, tmp_path / "in", out, **kw).status == "completed"
    _assert_exactly_once(out, {record_id(str(p)) for p in paths})


class _Fingerprinted(MeanColourEncoder):
    """The test encoder, reporting a weights fingerprint like the real encoders do."""

    def __init__(self, fingerprint: str) -> None:
        super().__init__()
        self.fingerprint = fingerprint

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "weights_fingerprint": self.fingerprint}


def test_weights_check_of_the_runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = _images(tmp_path / "in", 6)
    out = tmp_path / "out"
    kw = dict(shard_size=2, num_workers=0, progress=False)
    with monkeypatch.context() as m:
        _stop_after(m, 1)
        with pytest.raises(KeyboardInterrupt):
            embed(_Fingerprinted("sha256:aaaa"), tmp_path / "in", out, **kw)
    assert read_manifest(out)["encoder"]["weights_fingerprint"] == "sha256:aaaa"
    with pytest.raises(OutputError, match="weights changed: old sha256:aaaa new sha256:bbbb"):
        embed(_Fingerprinted("sha256:bbbb"), tmp_path / "in", out, **kw)
    # A manifest from before fingerprints (no key) cannot vouch for its shards: refused too.
    m = read_manifest(out)
    del m["encoder"]["weights_fingerprint"]
    (out / schema.MANIFEST_FILE).write_text(json.dumps(m))
    with pytest.raises(OutputError, match="records no weights fingerprint.*new sha256:aaaa"):
        embed(_Fingerprinted("sha256:aaaa"), tmp_path / "in", out, **kw)
    m["encoder"]["weights_fingerprint"] = "sha256:aaaa"
    (out / schema.MANIFEST_FILE).write_text(json.dumps(m))
    assert embed(_Fingerprinted("sha256:aaaa"), tmp_path / "in", out, **kw).status == "completed"
    _assert_exactly_once(out, {record_id(str(p)) for p in paths})


# --- item 5: file names that are not UTF-8 --------------------------------------------------------------
def _png_at(path: bytes, colour: tuple[int, int, int], size: tuple[int, int] = (9, 7)) -> bytes:
    with open(path, "wb") as f:
        Image.new("RGB", size, colour).save(f, format="PNG")
    return path


def _hostile_names(root: Path) -> tuple[list[bytes], list[bytes]]:
    """Files whose names are not UTF-8 (Latin-1, lone bytes, a folder) or hold a backslash.
    Returns (good image paths, bad file paths) as bytes."""
    base = os.fsencode(root)
    os.makedirs(base + b"/dossier_\xe9t\xe9", exist_ok=True)
    good = [
        _png_at(base + b"/caf\xe9.png", (200, 30, 30)),
        _png_at(base + b"/\xff\xfe raw.png", (30, 200, 30)),
        _png_at(base + b"/dossier_\xe9t\xe9/in folder.png", (30, 30, 200)),
        _png_at(base + b"/back\\x41slash.png", (90, 90, 90)),  # a literal backslash, not an escape
        _png_at(base + "/utf8 café.png".encode(), (10, 10, 10)),
    ]
    bad = base + b"/broken \xe9.jpg"
    with open(bad, "wb") as f:
        f.write(b"not a jpeg")
    dangling = base + b"/link \xe9.png"
    os.symlink(base + b"/gone \xe9.png", dangling)
    return good, [bad, dangling]


@pytest.mark.parametrize("how", ["folder", "glob", "list"])
def test_file_names_that_are_not_utf8_are_embedded_and_named_losslessly(tmp_path: Path, how: str) -> None:
    root = tmp_path / "in"
    root.mkdir()
    good, bad = _hostile_names(root)
    if how == "folder":
        src: Any = root
    elif how == "glob":
        src = str(root) + "/**/*"
    else:
        src = root / "list.txt"
        with open(src, "wb") as f:  # the list holds the names' raw bytes, relative to its folder
            f.write(b"\n".join(p[len(os.fsencode(root)) + 1:] for p in good + bad) + b"\n")
    out = tmp_path / "out"
    res = embed(MeanColourEncoder(), src, out, shard_size=3, num_workers=0, progress=False)
    assert (res.status, res.embedded, res.failed) == ("completed", len(good), len(bad))
    emb, err = _rows(out, schema.EMBEDDINGS_DIR), _rows(out, schema.ERRORS_DIR)
    # Ids come from the bytes of the path; sources give those bytes back.
    assert sorted(emb[schema.COL_ID]) == sorted(record_id(p) for p in good)
    assert sorted(source_to_path(s) for s in emb[schema.COL_SOURCE]) == sorted(good)
    assert sorted(source_to_path(s) for s in err[schema.COL_SOURCE]) == sorted(bad)
    assert os.path.join(str(root), "caf\\xe9.png") in set(emb[schema.COL_SOURCE])
    assert os.path.join(str(root), "back\\\\x41slash.png") in set(emb[schema.COL_SOURCE])
    assert os.path.join(str(root), "utf8 café.png") in set(emb[schema.COL_SOURCE])  # UTF-8 names unchanged
    reasons = dict(zip(err[schema.COL_SOURCE], err[schema.COL_REASON]))
    assert "gone \\xe9.png" in reasons[path_to_source(bad[1])]  # the link's target, escaped too
    # A rerun finds the output complete: the ids and the listing are stable.
    again = embed(MeanColourEncoder(), src, out, shard_size=3, num_workers=0, progress=False)
    assert again.status == "already_complete"


# --- item 8: a huge file that is not an image -----------------------------------------------------------
_PEAK_SCRIPT = textwrap.dedent("""
    import resource, sys
    sys.path.insert(0, sys.argv[3])
    from pipeline._helpers import MeanColourEncoder
    from phiclip.pipeline import embed
    embed(MeanColourEncoder(), sys.argv[1] + "/warm", sys.argv[2] + "/warm", num_workers=0, progress=False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res = embed(MeanColourEncoder(), sys.argv[1] + "/big", sys.argv[2] + "/big", num_workers=0, progress=False)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(res.embedded, res.failed, (after - before) // 1024)
""")


def test_a_huge_non_image_does_not_raise_peak_memory_by_its_size(tmp_path: Path) -> None:
    _images(tmp_path / "warm", 2)
    _images(tmp_path / "big", 2)
    size = 1_500_000_000
    with open(tmp_path / "big" / "x.jpg", "wb") as f:  # sparse: no disk space used
        f.truncate(size)
    # A PNG whose header is followed by a 1.4 GB "chunk" before any pixel: PIL alone would read it whole.
    Image.new("RGB", (4, 4)).save(tmp_path / "big" / "y.png")
    head = (tmp_path / "big" / "y.png").read_bytes()[: 8 + 25]  # signature + IHDR
    with open(tmp_path / "big" / "y.png", "wb") as f:
        f.write(head + (1_400_000_000).to_bytes(4, "big") + b"zzZz")
        f.truncate(len(head) + 8 + 1_400_000_000 + 4)
    proc = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(tmp_path), str(tmp_path / "out"), str(TESTS)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    embedded, failed, peak_mb = (int(x) for x in proc.stdout.split()[-3:])
    assert (embedded, failed) == (2, 2)
    assert peak_mb < 300, f"peak memory rose by {peak_mb} MB for files of {size // 2**20} MB"
    err = _rows(tmp_path / "out" / "big", schema.ERRORS_DIR).set_index(schema.COL_SOURCE)[schema.COL_REASON]
    assert "not a readable image" in err[str(tmp_path / "big" / "x.jpg")]
    assert "header runs past the first 64 MiB" in err[str(tmp_path / "big" / "y.png")]


# --- item 10: the lock file, cleanup races, a full disk, skipped files -----------------------------------
def test_a_refused_folder_keeps_no_lock_file(tmp_path: Path) -> None:
    _images(tmp_path / "in", 3)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(OutputError, match="not a phiclip output"):
        embed(MeanColourEncoder(), tmp_path / "in", foreign, progress=False)
    assert sorted(p.name for p in foreign.iterdir()) == ["thesis.tex"]
    # A phiclip output refused for other settings, and a finished run, keep none either.
    out = tmp_path / "out"
    embed(MeanColourEncoder(), tmp_path / "in", out, shard_size=2, num_workers=0, progress=False)
    assert not (out / runner_mod.LOCK_FILE).exists()
    with pytest.raises(OutputError, match="shard_size"):
        embed(MeanColourEncoder(), tmp_path / "in", out, shard_size=3, num_workers=0, progress=False)
    assert not (out / runner_mod.LOCK_FILE).exists()


_FIRST_RUN = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[4])
    from pipeline._helpers import MeanColourEncoder
    import phiclip.pipeline.runner as r
    from phiclip.pipeline.local import LocalEngine
    real = LocalEngine.load
    def slow_load(self, model, max_pixels):  # holds the lock, before the manifest exists
        print("locked", flush=True)
        go = Path(sys.argv[3])
        deadline = time.time() + 60
        while not go.exists() and time.time() < deadline:
            time.sleep(0.01)
        return real(self, model, max_pixels)
    LocalEngine.load = slow_load
    print(r.embed(MeanColourEncoder(), sys.argv[1], sys.argv[2], num_workers=0, progress=False).status, flush=True)
""")


def test_a_refused_second_run_never_removes_the_first_runs_new_folder(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    paths = _images(tmp_path / "in", 3)
    out, go = tmp_path / "new" / "out", tmp_path / "go"
    first: dict[str, subprocess.Popen] = {}
    real_lock = runner_mod._output_lock

    def late_lock(root: Path):  # this run made the folder; the other takes the lock before it
        proc = subprocess.Popen([sys.executable, "-c", _FIRST_RUN, str(tmp_path / "in"), str(out), str(go), str(TESTS)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first["proc"] = proc
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked", proc.stderr.read()
        return real_lock(root)

    monkeypatch.setattr(runner_mod, "_output_lock", late_lock)
    try:
        with pytest.raises(OutputError, match="another phiclip run is writing"):
            embed(MeanColourEncoder(), tmp_path / "in", out, num_workers=0, progress=False)
        assert out.is_dir() and (out / runner_mod.LOCK_FILE).exists(), "the refused run removed the other's lock"
        go.touch()
        stdout, stderr = first["proc"].communicate(timeout=120)
    finally:
        if "proc" in first and first["proc"].poll() is None:
            first["proc"].kill()
            first["proc"].wait()
    assert first["proc"].returncode == 0 and stdout.strip().endswith("completed"), stderr
    assert read_manifest(out)["complete"] is True
    _assert_exactly_once(out, {record_id(str(p)) for p in paths})


def test_a_full_disk_names_the_output_and_says_a_rerun_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow.parquet as pq

    paths = _images(tmp_path / "in", 6)
    out = tmp_path / "out"
    real, calls = pq.write_table, {"n": 0}

    def write_table(*args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(pq, "write_table", write_table)
        with pytest.raises(OutputError) as e:
            embed(MeanColourEncoder(), tmp_path / "in", out, shard_size=2, num_workers=0, progress=False)
    msg = str(e.value)
    assert str(out) in msg and "the disk (or your quota) is full" in msg and "rerun the same command" in msg
    assert "resumes" in msg and "part-0000" in msg
    assert not list(out.rglob("*.tmp"))
    res = embed(MeanColourEncoder(), tmp_path / "in", out, shard_size=2, num_workers=0, progress=False)
    assert res.status == "completed" and res.skipped > 0
    _assert_exactly_once(out, {record_id(str(p)) for p in paths})


@pytest.mark.parametrize("how", ["folder", "glob"])
def test_files_skipped_for_their_extension_are_listed_and_counted(tmp_path: Path, how: str) -> None:
    root = tmp_path / "in"
    paths = _images(root, 2)
    others = {"drawing.svg": b"<svg/>", "phone.heic": b"\x00\x00\x00\x18ftypheic", "notes.txt": b"hello"}
    for name, data in others.items():
        (root / name).write_bytes(data)
    out = tmp_path / "out"
    res = embed(MeanColourEncoder(), root if how == "folder" else str(root / "*"), out, num_workers=0, progress=False)
    assert (res.embedded, res.failed, res.ignored) == (2, 0, 3)
    assert read_manifest(out)["counts"]["ignored"] == 3
    skipped = pd.read_parquet(out / schema.ERRORS_DIR / schema.SKIPPED_FILE)
    assert sorted(skipped[schema.COL_SOURCE]) == sorted(str(root / n) for n in others)
    assert set(skipped[schema.COL_STAGE]) == {schema.STAGE_SKIP}
    reasons = dict(zip(skipped[schema.COL_SOURCE], skipped[schema.COL_REASON]))
    assert "'.svg' is not one of" in reasons[str(root / "drawing.svg")] and "convert it" in reasons[str(root / "drawing.svg")]
    # The skipped files are in the errors table (stage "skip"), never counted as failed inputs.
    _assert_exactly_once(out, {record_id(str(p)) for p in paths})


def test_a_csv_cell_longer_than_pyarrows_block_reads(tmp_path: Path) -> None:
    # pyarrow parses CSV in 1 MiB blocks and refused longer cells ("straddling object"); 8 MB
    # shows it as a 50 MB caption would, in a fraction of the time.
    paths = _images(tmp_path / "imgs", 2)
    big = "x" * 8_000_000
    table = tmp_path / "t.csv"
    table.write_text(f"path,caption\n{paths[0]},{big}\n{paths[1]},short\n")
    listing = list_inputs(table)
    assert [r.locator for r in listing.records] == [str(p) for p in paths]
    data = load_table(table)  # the evaluation reader takes the same table
    assert data.captions is not None and len(data.captions[0][0]) == len(big)


# --- item 7: a damaged manifest ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value"),
    [("counts", "12 embedded"), ("counts", {"embedded": "12"}), ("dim", "4"), ("encoder", ["clip"]),
     ("complete", "yes"), ("settings", 3), ("dtype", "float64")],
)
def test_a_manifest_field_of_the_wrong_type_is_named(tmp_path: Path, field: str, value: Any) -> None:
    _images(tmp_path / "in", 2)
    out = tmp_path / "out"
    embed(MeanColourEncoder(), tmp_path / "in", out, num_workers=0, progress=False)
    m = json.loads((out / schema.MANIFEST_FILE).read_text())
    m[field] = value
    (out / schema.MANIFEST_FILE).write_text(json.dumps(m))
    with pytest.raises(OutputError) as e:
        embed(MeanColourEncoder(), tmp_path / "in", out, num_workers=0, progress=False)
    msg = str(e.value)
    assert str(out / schema.MANIFEST_FILE) in msg and f"field {field!r}" in msg and "must be" in msg


def test_a_manifest_without_dim_is_named(tmp_path: Path) -> None:
    _images(tmp_path / "in", 2)
    out = tmp_path / "out"
    embed(MeanColourEncoder(), tmp_path / "in", out, num_workers=0, progress=False)
    m = json.loads((out / schema.MANIFEST_FILE).read_text())
    del m["dim"]
    (out / schema.MANIFEST_FILE).write_text(json.dumps(m))
    with pytest.raises(OutputError, match="field 'dim' is missing"):
        embed(MeanColourEncoder(), tmp_path / "in", out, num_workers=0, progress=False)


def test_a_list_file_with_nul_bytes_is_refused_by_name(tmp_path: Path) -> None:
    lst = tmp_path / "paths.txt"
    lst.write_text("a.png\nb.png\n", encoding="utf-16")
    with pytest.raises(InputError, match="paths.txt: not a text file of paths.*UTF-16"):
        list_inputs(lst)
