"""Attacks on what phiclip prints and on the outputs it reads back (issue 9, items 6, 7, 9, 10 and 3):
hostile file names on the console, damaged or mismatched index files, a damaged manifest, NaN
vectors, and a query encoder whose weights differ from those that made the vectors."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from _embdir import ColourEncoder, write_embedding_dir
from PIL import Image
from typer.testing import CliRunner

from phiclip import encoders, schema
from phiclip import retrieval as S
from phiclip.cli import app
from phiclip.console import escape_control, safe_text
from phiclip.store import EmbeddingStoreError, read_manifest

# Names that rich would read as markup, or that carry terminal control sequences. "/" cannot be in
# a file name, so the link and the closing tag span a folder: the path text is what a user sees.
HOSTILE = ["[bold]x.png", "[link=http:/evil]y.png", "a[/]b.png", "\x1b[31mred.png", "x\u202egnp.png", "bell\x07\r.png"]
SHOWN = ["[bold]x.png", "[link=http:/evil]y.png", "a[/]b.png", "\\x1b[31mred.png", "x\\u202egnp.png", "bell\\x07\\r.png"]
RAW_CONTROLS = ("\x1b", "\x07", "\r", "\u202e")


@pytest.fixture
def runner():
    return CliRunner()


def _assert_clean(output: str) -> None:
    assert "MarkupError" not in output and "Traceback" not in output
    for ch in RAW_CONTROLS:
        assert ch not in output, f"raw {ch!r} reached the terminal"


def _rendered(renderable, markup: bool = False) -> str:
    """What a console shows for ``renderable`` (as plain text)."""
    from rich.console import Console

    con = Console(record=True, width=300, file=open(os.devnull, "w"))  # noqa: SIM115
    con.print(renderable, markup=markup, highlight=False)
    return con.export_text()


# --- the helper --------------------------------------------------------------------------------


def test_escape_control_shows_every_control_character():
    assert escape_control("\x1b[31mred\x1b[0m") == "\\x1b[31mred\\x1b[0m"
    assert escape_control("a\rb\x07c\x00d\x7fe\x85f\x9bg") == "a\\rb\\x07c\\x00d\\x7fe\\x85f\\x9bg"
    assert escape_control("\u202eabc\u2066\u200f\u2028") == "\\u202eabc\\u2066\\u200f\\u2028"
    assert escape_control("tab\tnl\n") == "tab\\tnl\\n"
    assert escape_control("two\nlines\t!", keep_newlines=True) == "two\nlines\t!"
    assert escape_control(os.fsdecode(b"caf\xe9.png")) == "caf\\xe9.png"  # a byte that is not UTF-8
    assert escape_control("plain — naïve 日本.png [x]") == "plain — naïve 日本.png [x]"
    assert escape_control(Path("/p/q")) == "/p/q"


@pytest.mark.parametrize("name", [*HOSTILE, "trailing\\", "\\[not a tag]", "[/bold]", "[red]", "x[", "]["])
def test_markup_is_shown_literally(name):
    from rich.table import Table
    from rich.text import Text

    expected = escape_control(name)
    assert _rendered(safe_text(name)).rstrip("\n") == expected
    line = Text.assemble(("error:", "red"), " ", safe_text(name), " after")
    assert _rendered(line, markup=True).rstrip("\n") == f"error: {expected} after"
    table = Table(title=safe_text(name))
    table.add_column(safe_text(name))
    table.add_row(safe_text(name))
    assert _rendered(table, markup=True).count(expected) == 3


# --- through the commands ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from phiclip.testing import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


@pytest.fixture
def no_loading_bars(monkeypatch):
    """What `phiclip`'s entry point does (cli._quiet_libraries): no transformers loading bar, whose
    carriage returns would otherwise be in the captured output."""
    from transformers.utils import logging as hf_logging

    monkeypatch.setattr(hf_logging, "_tqdm_active", False)


def test_hostile_file_names_through_embed_and_search(tiny_clip, tmp_path, runner, no_loading_bars):
    imgs = tmp_path / "imgs"
    for i, name in enumerate(HOSTILE):
        (imgs / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (40 * i, 90, 200 - 30 * i)).save(imgs / name, format="PNG")
    broken = imgs / "[bold]broken\x1b]0;title\x07.png"
    broken.write_bytes(b"not an image")
    out = tmp_path / "out[/]\x1b[2J"
    res = runner.invoke(app, ["embed", "-m", f"clip:{tiny_clip}", "-i", str(imgs), "-o", str(out),
                              "--num-workers", "0", "--no-progress", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    _assert_clean(res.output)
    assert "out[/]\\x1b[2J" in res.output  # the output folder, in the summary's title
    # the input that failed is listed by name, escaped
    assert "Not embedded (all 1;" in res.output and "[bold]broken\\x1b]0;title\\x07.png" in res.output
    assert "decode" in res.output

    res = runner.invoke(app, ["search", str(out), "--text", "a [bold] red \x1b[5m thing", "-k", "10",
                              "--device", "cpu"])
    assert res.exit_code == 0, res.output
    _assert_clean(res.output)
    for shown in SHOWN:
        assert shown in res.output, shown
    assert "a [bold] red \\x1b[5m thing" in res.output  # the query, in the title
    # JSON keeps the names exactly (escaped the JSON way, never raw)
    res = runner.invoke(app, ["search", str(out), "--text", "red", "-k", "10", "--json", "--device", "cpu"])
    _assert_clean(res.stdout)
    assert {Path(h["source"]).relative_to(imgs).as_posix() for h in json.loads(res.stdout)} == set(HOSTILE)


def test_hostile_sources_from_parquet_and_paths_in_errors(tmp_path, runner, colour_builder):
    sources = ["[link=http://evil]y.png", "a[/]b.png", "\x1b]8;;http://evil\x1b\\click\x1b]8;;\x1b\\"]
    out = write_embedding_dir(tmp_path / "e[/]", np.eye(3, dtype=np.float32), sources=sources,
                              ids=["[red]id", "i\x1bd", "[/]"])
    res = runner.invoke(app, ["search", str(out), "--text", "red green blue", "-k", "3"])
    assert res.exit_code == 0, res.output
    _assert_clean(res.output)
    for shown in ("[link=http://evil]y.png", "a[/]b.png", "\\x1b]8;;http://evil\\x1b\\click"):
        assert shown in res.output
    assert "e[/] (once;" in res.output  # "building the index of ..."
    res = runner.invoke(app, ["index", str(out)])
    assert res.exit_code == 0 and "e[/]" in res.output
    # an error message holding a hostile path
    res = runner.invoke(app, ["search", str(tmp_path / "no[/]where\x1b[1m"), "--text", "red"])
    assert res.exit_code == 1 and "error:" in res.output
    _assert_clean(res.output)
    assert "no[/]where\\x1b[1m: no such directory" in res.output


def test_hostile_names_in_eval_and_compare_tables(tmp_path, runner, colour_builder):
    from phiclip.comparison.report import print_report

    data = tmp_path / "[bold]data\x1b[7m"
    for label, rgb in {"r[/]ed": (250, 5, 5), "gr\x1ben": (5, 250, 5)}.items():
        (data / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (6, 6), tuple(min(255, c + 3 * i) for c in rgb)).save(data / label / f"{i}.png")
    res = runner.invoke(app, ["eval", "-m", "clip:/m[/]", "--task", "knn", "-d", str(data), "--k", "1"])
    assert res.exit_code == 0, res.output
    _assert_clean(res.output)
    assert "[bold]data\\x1b[7m" in res.output and "clip:/m[/]" in res.output

    model = {"key": "A", "name": "clip:[/]\x1b[31mevil", "cost": {"images_per_s": 3.0, "dim": 8},
             "quality": {"metrics": {"knn_accuracy": 0.5}}}
    report = {"models": [model, {**model, "key": "B", "name": "[link=http://x]b"}], "pairs": [],
              "data": {"classnames": ["[red]"], "has_labels": True, "images": 4}}
    text = _rendered_report(print_report, report)
    _assert_clean(text)
    assert "clip:[/]\\x1b[31mevil" in text and "[link=http://x]b" in text


def _rendered_report(print_report, report) -> str:
    from rich.console import Console

    con = Console(record=True, width=300, file=open(os.devnull, "w"))  # noqa: SIM115
    print_report(report, console=con)
    return con.export_text()


# --- damaged or mismatched index files (items 7 and 9) -------------------------------------------


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _clusters(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(8, d))
    return (centres[rng.integers(0, 8, n)] + 0.3 * rng.normal(size=(n, d))).astype(np.float32)


def _exact(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    cos = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ xn.T
    top = np.argsort(-cos, axis=1, kind="stable")[:, :k]
    return top, np.take_along_axis(cos, top, axis=1)


def _ids(hits) -> list[int]:
    return [int(h.id[2:]) for h in hits]


def test_flipped_bytes_in_the_index_are_caught_and_rebuilt(tmp_path, caplog):
    x = _clusters(300, 16)
    write_embedding_dir(tmp_path, x)
    S.build_index(tmp_path)
    ipath = tmp_path / schema.INDEX_DIR / "index.faiss"
    data = bytearray(ipath.read_bytes())
    for pos in range(len(data) // 2, len(data) // 2 + 4096, 512):  # a few bytes inside the stored vectors
        data[pos] = 0x7F
    ipath.write_bytes(bytes(data))

    q = x[[3, 150, 299]] + 0.05
    with caplog.at_level(logging.WARNING, logger="phiclip"):
        idx = S.open_index(tmp_path)
        hits = idx.query(q, k=10)
    top, cos = _exact(x, q, 10)
    for row_hits, row_top, row_cos in zip(hits, top, cos, strict=True):
        assert all(-1.0 <= h.score <= 1.0 + 1e-6 for h in row_hits)
        assert _ids(row_hits) == row_top.tolist()
        np.testing.assert_allclose([h.score for h in row_hits], row_cos, atol=1e-5)
    assert idx.info.built_now
    assert any("does not match the sha256" in r.getMessage() and "rebuilding" in r.getMessage() for r in caplog.records)
    meta = json.loads((tmp_path / schema.INDEX_DIR / "meta.json").read_text())
    assert meta["index_sha256"] == _sha256(ipath)
    ipath.write_bytes(bytes(data))
    with pytest.raises(S.SearchError, match=r"index\.faiss does not match the sha256.*phiclip index --force"):
        S.open_index(tmp_path, rebuild_stale=False)


def test_a_tampered_index_with_a_matching_checksum_never_returns_impossible_scores(tmp_path):
    x = _clusters(200, 8)
    write_embedding_dir(tmp_path, x)
    S.build_index(tmp_path)
    idir = tmp_path / schema.INDEX_DIR
    data = bytearray((idir / "index.faiss").read_bytes())
    data[-400:-300] = b"\x7f" * 100  # huge floats in the last vectors
    (idir / "index.faiss").write_bytes(bytes(data))
    meta = json.loads((idir / "meta.json").read_text())
    meta["index_sha256"] = _sha256(idir / "index.faiss")  # the checksum forged too
    (idir / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(S.SearchError, match=r"returned a cosine of .*phiclip index --force"):
        S.open_index(tmp_path).query(np.ones((1, 8), np.float32), k=200)


def test_meta_from_an_older_phiclip_is_rebuilt_with_a_warning(tmp_path, caplog, monkeypatch):
    write_embedding_dir(tmp_path, _clusters(50, 4))
    S.build_index(tmp_path)
    mpath = tmp_path / schema.INDEX_DIR / "meta.json"
    meta = json.loads(mpath.read_text())
    meta["format"] = 1
    del meta["index_sha256"]
    mpath.write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="phiclip"):
        assert S.open_index(tmp_path).info.built_now
    assert any("older phiclip" in r.getMessage() and "no checksum" in r.getMessage() for r in caplog.records)
    assert json.loads(mpath.read_text())["format"] == S.META_FORMAT


def _meta_edit(tmp_path: Path, **changes) -> None:
    mpath = tmp_path / schema.INDEX_DIR / "meta.json"
    meta = json.loads(mpath.read_text())
    meta.update(changes)
    mpath.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: (p / "meta.json").write_text("[1, 2]"), "meta.json is not a JSON object"),
        (lambda p: (p / "meta.json").write_text("{oops"), "meta.json is not readable JSON"),
        (lambda p: (p / "meta.json").write_bytes(b"\xff\xfe"), "meta.json is not readable JSON"),
        (lambda p: _meta_edit(p.parent, type="hnsw", params={"ef_search": 16}),
         "meta.json says the index is hnsw but .*index.faiss holds a flat index"),
        (lambda p: _meta_edit(p.parent, type="hnsw", params=[]), "'params' is \\[\\]"),
        (lambda p: _meta_edit(p.parent, n="many"), "'n' is 'many', not a positive integer"),
        (lambda p: _meta_edit(p.parent, dim=5), "meta.json says the vectors are 5-d but the manifest says 4-d"),
    ],
    ids=["list", "not-json", "not-utf8", "hnsw-for-flat", "params-list", "n-string", "dim"],
)
def test_damaged_meta_json_is_named_and_rebuilt(tmp_path, runner, damage, message):
    x = _clusters(40, 4)
    write_embedding_dir(tmp_path, x)
    S.build_index(tmp_path)
    damage(tmp_path / schema.INDEX_DIR)
    with pytest.raises(S.SearchError, match=message + ".*run `phiclip index --force"):
        S.open_index(tmp_path, rebuild_stale=False)
    res = runner.invoke(app, ["index", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "warning:" in res.output and "rebuilding the index" in res.output and "Traceback" not in res.output
    hits = S.open_index(tmp_path, rebuild_stale=False).query(x[:1], k=3)[0]
    assert _ids(hits) == _exact(x, x[:1], 3)[0][0].tolist()


def test_an_index_of_another_dimension(tmp_path, runner, colour_builder):
    """index.faiss (with a matching checksum) from an output of another width: `phiclip index` and
    `phiclip search` rebuild it with a warning instead of failing in FAISS."""
    small = write_embedding_dir(tmp_path / "small", np.eye(3, dtype=np.float32), ids=["red", "green", "blue"])
    wide = write_embedding_dir(tmp_path / "wide", _clusters(20, 8))
    S.build_index(small)
    S.build_index(wide)
    wide_sha = _sha256(wide / schema.INDEX_DIR / "index.faiss")
    for command in (["index", str(small)], ["search", str(small), "--text", "green", "-k", "1", "--json"]):
        shutil.copy(wide / schema.INDEX_DIR / "index.faiss", small / schema.INDEX_DIR / "index.faiss")
        _meta_edit(small, index_sha256=wide_sha, n=3)  # the checksum forged; meta still says 3-d
        res = runner.invoke(app, command)
        assert res.exit_code == 0, res.output
        assert "index.faiss holds 8-d vectors but" in res.output and "rebuilding the index" in res.output
    assert json.loads(res.stdout)[0]["id"] == "green"
    # a meta.json that says 8-d for 3-d embeddings
    shutil.copy(wide / schema.INDEX_DIR / "index.faiss", small / schema.INDEX_DIR / "index.faiss")
    _meta_edit(small, index_sha256=wide_sha, dim=8)
    res = runner.invoke(app, ["search", str(small), "--text", "blue", "-k", "1", "--json"])
    assert res.exit_code == 0 and "says the vectors are 8-d but the manifest says 3-d" in res.output
    assert json.loads(res.stdout)[0]["id"] == "blue"
    # a query of another width: a message, not a FAISS assertion
    with pytest.raises(S.SearchError, match="query vectors have 5 values but the index holds 3-d vectors"):
        S.open_index(small).query(np.ones((1, 5)))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"counts": "lots"}, "manifest 'counts' is 'lots', not a JSON object"),
        ({"counts": {"embedded": "3"}}, "manifest 'counts.embedded' is '3', not a count"),
        ({"complete": "yes"}, "manifest 'complete' is 'yes', not true or false"),
        ({"encoder": "clip:/m"}, "manifest 'encoder' is 'clip:/m', not a JSON object"),
        ({"dim": 0}, "manifest 'dim' is 0, not a positive integer"),
        ({"dim": True}, "manifest 'dim' is True, not a positive integer"),
        ({"dim": [3]}, "manifest 'dim' is \\[3\\], not a positive integer"),
    ],
)
def test_a_damaged_manifest_is_named(tmp_path, runner, change, message):
    write_embedding_dir(tmp_path, np.eye(3, dtype=np.float32))
    mpath = tmp_path / schema.MANIFEST_FILE
    mpath.write_text(json.dumps({**json.loads(mpath.read_text()), **change}))
    with pytest.raises(EmbeddingStoreError, match=f"manifest.json: {message}"):
        read_manifest(tmp_path)
    for command in (["index", str(tmp_path)], ["search", str(tmp_path), "--text", "red"]):
        res = runner.invoke(app, command)
        assert res.exit_code == 1 and "Traceback" not in res.output and "manifest.json:" in res.output


# --- NaN vectors (item 10) and other weights (item 3) ----------------------------------------------


def test_an_all_nan_shard_fails_loudly(tmp_path, runner, colour_builder):
    x = np.tile(np.eye(3, dtype=np.float32), (4, 1))
    x[3:6] = np.nan  # the whole second shard
    x[10, 1] = np.inf
    write_embedding_dir(tmp_path, x, shard_rows=3)
    with pytest.raises(S.SearchError, match=r"4 of 12 stored vectors are not finite.*part-00001.parquet \(3 of 3 rows\), "
                                            r"part-00003.parquet \(1 of 3 rows\).*delete those shards"):
        S.build_index(tmp_path)
    for command in (["search", str(tmp_path), "--text", "red"], ["index", str(tmp_path)]):
        res = runner.invoke(app, command)
        assert res.exit_code == 1 and "not finite" in res.output and "Traceback" not in res.output
    assert not (tmp_path / schema.INDEX_DIR / "index.faiss").exists()


def test_a_nan_query_is_refused(tmp_path):
    write_embedding_dir(tmp_path, np.eye(3, dtype=np.float32))
    with pytest.raises(S.SearchError, match="query embedding is not finite"):
        S.open_index(tmp_path).query(np.array([[np.nan, 1.0, 0.0]]))


class _WeightsEncoder(ColourEncoder):
    def __init__(self, spec: str = "clip:/models/tiny", fp: str | None = None) -> None:
        super().__init__(spec)
        self.fp = fp

    def describe(self):
        d = super().describe()
        if self.fp is not None:
            d["weights_fingerprint"] = self.fp
        return d


def _with_weights(tmp_path: Path, fp: str | None) -> Path:
    out = write_embedding_dir(tmp_path / "e", np.eye(3, dtype=np.float32), ids=["red", "green", "blue"])
    mpath = out / schema.MANIFEST_FILE
    manifest = json.loads(mpath.read_text())
    if fp is not None:
        manifest["encoder"]["weights_fingerprint"] = fp
    mpath.write_text(json.dumps(manifest))
    return out


@pytest.mark.parametrize(
    ("recorded", "current", "refused"),
    [("sha256:aaaa", "sha256:bbbb", True), ("sha256:aaaa", "sha256:aaaa", False), ("sha256:aaaa", None, False),
     (None, "sha256:bbbb", False)],
)
def test_search_refuses_other_weights_unless_allowed(tmp_path, caplog, recorded, current, refused):
    """Item 13: another checkpoint of the same width is refused, naming both fingerprints and the ways out;
    --allow-other-weights (allow_other_weights=True) queries anyway, with a warning."""
    out = _with_weights(tmp_path, recorded)
    if refused:
        with pytest.raises(S.SearchError, match=r"weights sha256:aaaa .* loads weights sha256:bbbb.*--model.*"
                                                r"--allow-other-weights"):
            S.search(out, text="red", k=1, encoder=_WeightsEncoder(fp=current))
    with caplog.at_level(logging.WARNING, logger="phiclip"):
        hits = S.search(out, text="red", k=1, encoder=_WeightsEncoder(fp=current), allow_other_weights=True)
    assert hits[0].id == "red"
    messages = [r.getMessage() for r in caplog.records if "weights" in r.getMessage()]
    if refused:
        assert len(messages) == 1 and "sha256:aaaa" in messages[0] and "sha256:bbbb" in messages[0]
    else:
        assert messages == []
        assert S.search(out, text="red", k=1, encoder=_WeightsEncoder(fp=current))[0].id == "red"


def test_search_command_refuses_other_weights_unless_allowed(tmp_path, runner, monkeypatch):
    out = _with_weights(tmp_path, "sha256:old[/]")
    monkeypatch.setitem(encoders.KINDS, "clip", encoders.KINDS["clip"].with_builder(lambda spec, *_: _WeightsEncoder(str(spec), fp="sha256:new")))
    res = runner.invoke(app, ["search", str(out), "--text", "blue", "-k", "1"])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    flat = " ".join(res.output.split())
    assert "sha256:old[/]" in flat and "sha256:new" in flat and "--allow-other-weights" in flat
    res = runner.invoke(app, ["search", str(out), "--text", "blue", "-k", "1", "--allow-other-weights"])
    assert res.exit_code == 0, res.output
    assert "warning:" in res.output and "sha256:old[/]" in res.output and "sha256:new" in res.output
    assert "blue" in res.output


def test_search_with_a_moved_checkpoint_of_the_same_weights(tmp_path, monkeypatch):
    """--model names the checkpoint where it is now: the same weights are accepted under another path."""
    out = _with_weights(tmp_path, "sha256:aaaa")
    monkeypatch.setitem(encoders.KINDS, "clip", encoders.KINDS["clip"].with_builder(
        lambda spec, *_: _WeightsEncoder(str(spec), fp="sha256:aaaa")))
    assert S.search(out, text="blue", k=1, model="clip:/elsewhere/tiny")[0].id == "blue"
    with pytest.raises(S.SearchError, match="made by 'clip:/models/tiny' but the query encoder is 'clip:/elsewhere/tiny'"):
        S.search(out, text="blue", k=1, encoder=_WeightsEncoder("clip:/elsewhere/tiny", fp="sha256:bbbb"),
                 allow_other_weights=True)


def test_embed_summary_lists_the_first_inputs_left_out(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from rich.console import Console

    from phiclip.cli.common import LEFT_OUT_SHOWN as _LEFT_OUT_SHOWN
    from phiclip.cli.embed import print_left_out as _print_left_out

    edir = tmp_path / schema.ERRORS_DIR
    edir.mkdir()
    for shard, rows in enumerate((range(0, 7), range(7, 12), range(12, 15))):
        table = pa.table({"id": [f"i{i}" for i in rows], "source": [f"[red]f{i}\x1b.png" for i in rows],
                          "stage": ["decode"] * len(rows), "reason": [f"bad [/] {i}" for i in rows]})
        pq.write_table(table, edir / schema.SHARD_PATTERN.format(shard))
    con = Console(record=True, width=200, file=open(os.devnull, "w"))  # noqa: SIM115
    _print_left_out(tmp_path, con)
    text = con.export_text()
    _assert_clean(text)
    assert f"Not embedded (the first {_LEFT_OUT_SHOWN} of 15;" in text
    assert "[red]f0\\x1b.png" in text and "bad [/] 9" in text and "f10" not in text


def test_serve_refuses_a_collection_made_with_other_weights_unless_allowed(tmp_path):
    from phiclip.serve.collections import load_collections

    out = _with_weights(tmp_path, "sha256:aaaa")

    def load(spec, **_):
        return _WeightsEncoder(str(spec), fp="sha256:bbbb")

    with pytest.raises(S.SearchError, match=r"weights sha256:aaaa .* loads weights sha256:bbbb.*--allow-other-weights"):
        load_collections([out], load=load)
    collections, encoders_ = load_collections([out], load=load, allow_other_weights=True)
    assert len(collections) == 1 and len(encoders_) == 1
