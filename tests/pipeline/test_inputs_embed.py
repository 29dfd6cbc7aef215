"""URLs, WebDataset shards and annotations end to end through embed; --retry-failed; exit codes and
--max-failures; a shard run killed at random points and rerun (exactly once)."""

from __future__ import annotations

import base64
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from inputs._http import FaultServer, jpeg
from inputs._shards import truncate, write_shard
from typer.testing import CliRunner

from phiclip.cli import app
from phiclip.fetch import FetchOptions
from phiclip.inputs.records import record_id
from phiclip.manifest import read_manifest
from phiclip.pipeline import runner
from phiclip.pipeline.engine import TooManyFailures
from phiclip.schema import path_to_source

FAST = FetchOptions(connect_timeout=2, read_timeout=0.5, deadline=3, retries=1, backoff=0.05, max_backoff=0.1,
                    max_bytes=2_000_000, max_redirects=3, trust_env=False)
cli = CliRunner()


def _table(out: Path, folder: str) -> pd.DataFrame:
    files = sorted((out / folder).glob("part-*.parquet"))
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True) if files else pd.DataFrame()


@pytest.fixture()
def server():
    s = FaultServer()
    yield s
    s.close()


def test_url_list_with_every_fault(tmp_path: Path, server: FaultServer, mean_colour) -> None:
    paths = ["/img/a.jpg", "/img/b.jpg", "/missing.jpg", "/flaky/c.jpg", "/busy/d.jpg", "/hang.jpg", "/huge.jpg",
             "/loop.jpg", "/page.jpg", "/trunc.jpg"]
    lst = tmp_path / "urls.txt"
    lst.write_text("\n".join(server.url(p) for p in paths) + "\n")
    t0 = time.perf_counter()
    res = runner.embed(mean_colour, lst, tmp_path / "out", fetch=FAST, progress=False, batch_size=4)
    assert time.perf_counter() - t0 < 20
    emb, err = _table(tmp_path / "out", "embeddings"), _table(tmp_path / "out", "errors")
    assert sorted(emb.source) == sorted(server.url(p) for p in ["/img/a.jpg", "/img/b.jpg", "/flaky/c.jpg", "/busy/d.jpg"])
    assert set(emb.id) == {record_id(server.url(p)) for p in ["/img/a.jpg", "/img/b.jpg", "/flaky/c.jpg", "/busy/d.jpg"]}
    reasons = {s.replace(server.base, ""): (st, r) for s, st, r in zip(err.source, err.stage, err.reason)}
    assert reasons["/missing.jpg"] == ("fetch", "HTTP 404 Not Found")
    assert reasons["/hang.jpg"][1].startswith("timeout")
    assert reasons["/huge.jpg"] == ("fetch", "too large (over 2000000 bytes)")
    assert reasons["/loop.jpg"][1].startswith("too many redirects")
    assert reasons["/page.jpg"] == ("fetch", "not an image (Content-Type text/html)")
    assert reasons["/trunc.jpg"][0] == "decode"
    assert res.failed == 6 and res.embedded == 4
    assert ("fetch", "HTTP 404 Not Found", 1) in res.failure_reasons


def test_urls_are_fetched_ahead_with_default_options(tmp_path: Path, server: FaultServer, mean_colour,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A URL list listed without fetch options (the Python API's default) is still read ahead: while the
    first batch is held (encoded), the next chunks are fetched."""
    from phiclip.inputs import list_inputs
    from phiclip.pipeline.step import Preparer

    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    lst = tmp_path / "urls.txt"
    lst.write_text("\n".join(server.url(f"/img/{i}.jpg") for i in range(8)) + "\n")
    listing = list_inputs(lst)
    assert listing.reader.prefetch > 0
    prep = Preparer(listing.records, listing.reader, mean_colour, max_pixels=None, budget=2)
    pieces = prep.in_process(prep.chunks([(0, range(8))]), threads=1)
    try:
        first = next(pieces)
        assert len(first.positions) == 2
        deadline = time.monotonic() + 10
        while sum(server.hits.values()) < 8 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sum(server.hits.values()) == 8  # the other three chunks fetched while the first is held
    finally:
        pieces.close()


def test_table_annotations_reach_the_output(tmp_path: Path, server: FaultServer, mean_colour) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pa.table({"url": [server.url("/img/a.jpg"), server.url("/img/b.jpg")], "caption": ["a cat", "a dog"],
                  "label": ["cat", "dog"], "split": ["train", "test"], "score": [0.5, 0.7]})
    pq.write_table(t, tmp_path / "t.parquet")
    runner.embed(mean_colour, tmp_path / "t.parquet", tmp_path / "out", fetch=FAST, progress=False)
    emb = _table(tmp_path / "out", "embeddings")
    assert list(emb.label) == ["cat", "dog"] and list(emb.split) == ["train", "test"]
    assert [list(c) for c in emb.captions] == [["a cat"], ["a dog"]]
    from phiclip.serve.collections import _labels_of, _read_fields

    assert _labels_of(_read_fields(tmp_path / "out")) == ["cat", "dog"]  # serve's label filter sees them


def test_shards_embed_with_annotations_and_failures(tmp_path: Path, mean_colour) -> None:
    write_shard(tmp_path / "s" / "000.tar", ["a", "b", "c"], damaged={"b"})
    write_shard(tmp_path / "s" / "001.tar", [f"k{i}" for i in range(20)])
    truncate(tmp_path / "s" / "001.tar", 0.5)
    res = runner.embed(mean_colour, str(tmp_path / "s" / "{000..001}.tar"), tmp_path / "out", progress=False)
    emb, err = _table(tmp_path / "out", "embeddings"), _table(tmp_path / "out", "errors")
    shard0 = path_to_source(tmp_path / "s" / "000.tar")
    row = emb[emb.source == f"{shard0}#a"].iloc[0]
    assert (row.label, list(row.captions), row.metadata) == ("0", ["a photo of a"], '{"key": "a", "n": 0}')
    assert err[err.source == f"{shard0}#b"].stage.iloc[0] == "decode"  # a damaged member fails its record only
    assert any(s.endswith("#<truncated>") for s in err.source)
    assert res.embedded + res.failed == res.inputs


def test_shard_urls_embed_from_one_download(tmp_path: Path, server: FaultServer, mean_colour) -> None:
    for i in range(2):
        write_shard(tmp_path / f"{i:03d}.tar", [f"u{i}a", f"u{i}b", f"u{i}c"], damaged={"u1b"})
        server.files[f"/shard/{i:03d}.tar"] = tmp_path / f"{i:03d}.tar"
    res = runner.embed(mean_colour, server.url("/shard/{000..001}.tar"), tmp_path / "out", fetch=FAST, progress=False,
                       shard_size=2, batch_size=2)
    assert (res.embedded, res.failed) == (5, 1)
    emb = _table(tmp_path / "out", "embeddings")
    assert sorted(emb.source) == sorted(server.url(f"/shard/{i:03d}.tar#u{i}{k}") for i in range(2) for k in "abc"
                                        if (i, k) != (1, "b"))
    sizes = [(tmp_path / f"{i:03d}.tar").stat().st_size for i in range(2)]
    assert [server.served[f"/shard/{i:03d}.tar"] for i in range(2)] == sizes  # listed and read from one download


def test_retry_failed_replaces_only_the_failures(tmp_path: Path, server: FaultServer, mean_colour) -> None:
    lst = tmp_path / "urls.txt"
    lst.write_text("\n".join(server.url(p) for p in ["/img/a.jpg", "/flaky/b.jpg", "/missing.jpg"]) + "\n")
    once = FetchOptions(retries=0, trust_env=False, read_timeout=1)
    out = tmp_path / "out"
    first = runner.embed(mean_colour, lst, out, fetch=once, progress=False, shard_size=2)
    assert (first.embedded, first.failed) == (1, 2)
    before = _table(out, "embeddings")
    again = runner.embed(mean_colour, lst, out, fetch=once, progress=False, shard_size=2, retry_failed=True)
    assert (again.status, again.processed, again.embedded, again.failed) == ("retried", 2, 2, 1)
    emb, err = _table(out, "embeddings"), _table(out, "errors")
    assert list(emb.source) == [server.url("/img/a.jpg"), server.url("/flaky/b.jpg")]  # input order kept
    assert emb.embedding.iloc[0].tolist() == before.embedding.iloc[0].tolist()  # untouched row
    assert list(err.source) == [server.url("/missing.jpg")] and server.hits["/img/a.jpg"] == 1
    with pytest.raises(ValueError, match="different"):
        runner.embed(mean_colour, lst, out, fetch=once, progress=False, shard_size=3, retry_failed=True)


def test_retry_journal_rolls_forward(tmp_path: Path, server: FaultServer, mean_colour, monkeypatch) -> None:
    """A retry killed after its journal was ready: the next run finishes it, every input once."""
    from phiclip.pipeline import retry

    lst = tmp_path / "urls.txt"
    lst.write_text("\n".join(server.url(p) for p in ["/img/a.jpg", "/flaky/b.jpg"]) + "\n")
    once = FetchOptions(retries=0, trust_env=False)
    out = tmp_path / "out"
    runner.embed(mean_colour, lst, out, fetch=once, progress=False)

    def crash(root, d):
        raise KeyboardInterrupt

    monkeypatch.setattr(retry, "_apply", crash)
    with pytest.raises(KeyboardInterrupt):
        runner.embed(mean_colour, lst, out, fetch=once, progress=False, retry_failed=True)
    monkeypatch.undo()
    assert list(_table(out, "errors").source) == [server.url("/flaky/b.jpg")]  # not applied yet
    res = runner.embed(mean_colour, lst, out, fetch=once, progress=False)  # any run rolls forward first
    assert (res.embedded, res.failed) == (2, 0)
    assert not (out / ".retry").exists() and _table(out, "errors").empty


def test_exit_codes(tmp_path: Path, server: FaultServer, tiny_clip_dir: Path) -> None:
    lst = tmp_path / "bad.txt"
    lst.write_text("\n".join(server.url(f"/missing.jpg?{i}") for i in range(5)) + "\n")
    res = cli.invoke(app, ["embed", "-m", f"clip:{tiny_clip_dir}", "-i", str(lst), "-o", str(tmp_path / "o1"),
                           "--device", "cpu", "--no-progress", "--fetch-retries", "0"])
    assert res.exit_code == 3, res.output
    assert "no input could be embedded" in res.output and "HTTP 404 Not Found" in res.output
    mixed = tmp_path / "mixed.txt"
    mixed.write_text("\n".join([server.url("/img/a.jpg")] + [server.url(f"/missing.jpg?{i}") for i in range(8)]) + "\n")
    res = cli.invoke(app, ["embed", "-m", f"clip:{tiny_clip_dir}", "-i", str(mixed), "-o", str(tmp_path / "o2"),
                           "--device", "cpu", "--no-progress", "--fetch-retries", "0", "--max-failures", "2",
                           "-b", "2"])
    assert res.exit_code == 4, res.output
    assert "stopped early" in res.output
    res = cli.invoke(app, ["embed", "-m", f"clip:{tiny_clip_dir}", "-i", str(mixed), "-o", str(tmp_path / "o3"),
                           "--device", "cpu", "--no-progress", "--fetch-retries", "0"])
    assert res.exit_code == 0, res.output
    assert "Failures by reason" in res.output


def _data_list(path: Path, bad: set[int], n: int) -> Path:
    """A list of ``n`` distinct data: URIs, those at ``bad`` an HTML page (fails: not an image)."""
    lines = [f"data:text/html,<p>{i}</p>" if i in bad else
             "data:image/jpeg;base64," + base64.b64encode(jpeg(f"g{i}")).decode() for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_max_failures_percent_stops_once_the_share_is_passed(tmp_path: Path, mean_colour) -> None:
    lst = _data_list(tmp_path / "third.txt", {i for i in range(300) if i % 3 == 0}, 300)  # a third fail
    with pytest.raises(TooManyFailures, match=r"more than --max-failures 20% allows") as e:
        runner.embed(mean_colour, lst, tmp_path / "o1", progress=False, batch_size=4, max_failures="20%")
    done = int(str(e.value).split(" of the ")[1].split()[0])
    assert 100 <= done < 120, str(e.value)  # judged from the 100th input on, not at the end
    assert e.value.reasons[0] == (("read", "not an image (data: URI of type text/html)"), e.value.reasons[0][1])
    res = runner.embed(mean_colour, lst, tmp_path / "o2", progress=False, batch_size=4, max_failures="40%")
    assert (res.embedded, res.failed) == (200, 100)  # a third is within 40 %


def test_max_failures_percent_waits_for_100_inputs_or_the_whole_run(tmp_path: Path, mean_colour) -> None:
    early = _data_list(tmp_path / "early.txt", {0, 1, 2, 3}, 300)  # 4 of the first 4 fail, then none
    res = runner.embed(mean_colour, early, tmp_path / "o1", progress=False, batch_size=4, max_failures="5%")
    assert (res.embedded, res.failed) == (296, 4)  # 4 of 100 is within 5 %: the first batch alone is not judged
    small = _data_list(tmp_path / "small.txt", set(range(0, 20, 2)), 20)  # fewer than 100: judged when all are done
    with pytest.raises(TooManyFailures, match="10 of the 20 inputs"):
        runner.embed(mean_colour, small, tmp_path / "o2", progress=False, batch_size=4, max_failures="20%")
    for bad in ("150%", "-1%", "x%", "2.5"):
        with pytest.raises(ValueError, match="is not a count"):
            runner.embed(mean_colour, small, tmp_path / "o3", progress=False, max_failures=bad)


def test_max_failures_percent_on_the_command_line(tmp_path: Path, tiny_clip_dir: Path) -> None:
    lst = _data_list(tmp_path / "half.txt", set(range(0, 120, 2)), 120)
    args = ["embed", "-m", f"clip:{tiny_clip_dir}", "-i", str(lst), "--device", "cpu", "--no-progress", "-b", "8"]
    res = cli.invoke(app, [*args, "-o", str(tmp_path / "o1"), "--max-failures", "25%"])
    assert res.exit_code == 4, res.output
    assert "stopped early" in res.output and "25%" in res.output
    res = cli.invoke(app, [*args, "-o", str(tmp_path / "o2"), "--max-failures", "60%"])
    assert res.exit_code == 0, res.output


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _progress(out: Path) -> bool:
    """Whether a run has written work (a fragment or a shard)."""
    return any((out / ".partial").glob("*/*.embeddings.parquet")) or any((out / "embeddings").glob("part-*.parquet"))


def _complete(out: Path) -> bool:
    """Whether the run in ``out`` has finished (its manifest says complete)."""
    manifest = read_manifest(out, missing_ok=True) if out.is_dir() else None
    return bool(manifest and manifest.get("complete"))


def test_shards_killed_at_random_points_then_rerun_exactly_once(tmp_path: Path, tiny_clip_dir: Path) -> None:
    keys = []
    for s in range(4):
        keys += write_shard(tmp_path / "s" / f"{s:03d}.tar", [f"s{s}k{i}" for i in range(60)], annotations=False)
    src = str(tmp_path / "s" / "{000..003}.tar")
    out = tmp_path / "out"
    args = ["embed", "-m", f"clip:{tiny_clip_dir}", "-i", src, "-o", str(out), "--device", "cpu", "--no-progress",
            "--shard-size", "40", "-b", "8", "--flush-seconds", "0.05"]
    env = dict(os.environ)
    rng = random.Random(7)
    landed = 0  # kills that left the output unfinished (on a fast machine a late one finds the run done)
    for attempt in range(3):
        if _complete(out):
            break
        proc = subprocess.Popen([sys.executable, "-m", "phiclip.cli", *args], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True, env=env)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and not _progress(out):
            time.sleep(0.01)
        # the first kill as soon as the run has written something, the others at a random point after that
        time.sleep(0.0 if attempt == 0 else rng.uniform(0.0, 0.3))
        _kill_group(proc)
        landed += not _complete(out)
    assert landed >= 1, "no kill landed mid-run"
    done = subprocess.run([sys.executable, "-m", "phiclip.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    emb, err = _table(out, "embeddings"), _table(out, "errors")
    ids = list(emb.id) + (list(err.id) if not err.empty else [])
    assert len(ids) == len(set(ids)) == 240
    shards = [path_to_source(tmp_path / "s" / f"{s:03d}.tar") for s in range(4)]
    assert set(ids) == {record_id(f"{shards[int(k[1])]}#{k}") for k in keys}
