"""Sources: every input kind -> records with stable ids, stable order, fixed shards."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from phiclip.pipeline.sources import (
    InputError,
    Record,
    list_folder,
    list_glob,
    list_hf,
    list_inputs,
    list_path_file,
    list_table,
    list_texts,
    plan_shards,
    record_id,
)
from phiclip.schema import path_to_source, source_to_path


def _png(path: Path, colour: tuple[int, int, int] = (255, 0, 0), size: tuple[int, int] = (8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _png_bytes(colour: tuple[int, int, int], size: tuple[int, int] = (8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("n", "size", "expected"),
    [
        (0, 3, []),
        (1, 3, [(0, 1)]),
        (3, 3, [(0, 3)]),
        (7, 3, [(0, 3), (3, 6), (6, 7)]),
        (5, 1, [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]),
        (4, 100, [(0, 4)]),
    ],
)
def test_plan_shards_table(n: int, size: int, expected: list[tuple[int, int]]) -> None:
    shards = plan_shards(n, size)
    assert [(r.start, r.stop) for r in shards] == expected
    assert sum(len(r) for r in shards) == n


def test_plan_shards_refuses_zero() -> None:
    with pytest.raises(ValueError, match="shard_size"):
        plan_shards(3, 0)


def test_record_id_is_a_stable_hash_of_the_source() -> None:
    a = record_id("/data/a.jpg")
    assert a == record_id("/data/a.jpg")
    assert a != record_id("/data/b.jpg")
    assert len(a) == 32 and int(a, 16) >= 0
    # A fixed value: ids must not change between versions (resume and joins depend on it).
    import hashlib

    assert record_id("x") == hashlib.blake2b(b"x", digest_size=16).hexdigest() == "442a44457137672b3218c1007dc8f76a"


def test_record_id_of_a_path_is_the_hash_of_its_bytes() -> None:
    raw = b"/data/caf\xe9.jpg"  # Latin-1: not UTF-8
    assert record_id(raw) == record_id(os.fsdecode(raw))  # bytes, or the surrogateescape text Python lists
    assert record_id("/data/café.jpg") == record_id("/data/café.jpg".encode())  # UTF-8 ids are unchanged


def test_source_text_of_any_path_gives_its_bytes_back() -> None:
    import random

    rng = random.Random(0)
    names = [b"/plain/a.png", "/utf8/été.png".encode(), b"/lat1/caf\xe9.png", b"/a\\b\\xe9", b"/\\\\",
             b"/\xff\xfe\xfd", b"/x\\x41"]
    names += [b"/" + bytes(rng.choice([c for c in range(1, 256) if c != 0x2F]) for _ in range(12)) for _ in range(300)]
    for raw in names:
        text = path_to_source(raw)
        text.encode("utf-8")  # storable as a Parquet string
        assert source_to_path(text) == raw, raw
        assert path_to_source(os.fsdecode(raw)) == text
    assert path_to_source("/utf8/été.png") == "/utf8/été.png" and path_to_source(b"/a\xe9") == "/a\\xe9"
    assert len({path_to_source(n) for n in names}) == len(set(names))  # distinct names, distinct texts
    with pytest.raises(ValueError, match="backslash"):
        source_to_path("/x/a\\qb")


def test_folder_listing_is_recursive_sorted_and_skips_non_images(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    _png(root / "b.png")
    _png(root / "a" / "z.PNG")
    _png(root / "a" / "y.jpg")
    (root / "notes.txt").write_text("x")
    _png(root / ".hidden.png")
    _png(root / ".cache" / "c.png")
    listing = list_folder(root)
    sources = [r.source for r in listing.records]
    assert sources == sorted(sources)
    assert sources == [str(root / "a" / "y.jpg"), str(root / "a" / "z.PNG"), str(root / "b.png")]
    assert all(r.id == record_id(r.source) and r.locator == r.source for r in listing.records)
    assert listing.ignored == 3  # notes.txt, .hidden.png, the .cache folder
    assert listing.description == {"kind": "folder", "location": str(root)}
    # Same listing from a relative path and a second call: same ids, same order, same fingerprint.
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        again = list_inputs("imgs")
    finally:
        os.chdir(cwd)
    assert [r.id for r in again.records] == [r.id for r in listing.records]
    assert again.fingerprint() == listing.fingerprint()


def test_folder_listing_survives_symlink_loops(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    _png(root / "sub" / "a.png")
    os.symlink(root, root / "sub" / "loop")
    listing = list_folder(root)
    assert [Path(r.source).name for r in listing.records] == ["a.png"]


def test_unlistable_subfolder_becomes_an_error_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "imgs"
    _png(root / "ok.png")
    locked = root / "locked"
    _png(locked / "hidden_from_us.png")
    real_scandir = os.scandir

    def scandir(path: object = ".") -> object:
        if os.fspath(path) == str(locked):  # root can read anything, so simulate the refusal
            raise PermissionError(13, "Permission denied", str(locked))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    listing = list_folder(root)
    errs = [r for r in listing.records if r.error]
    assert [r.source for r in errs] == [str(locked)]
    assert "cannot list this folder" in errs[0].error and "Permission denied" in errs[0].error
    assert [Path(r.source).name for r in listing.records if not r.error] == ["ok.png"]


def test_glob_recursive_and_extension_filter(tmp_path: Path) -> None:
    _png(tmp_path / "g" / "a.png")
    _png(tmp_path / "g" / "deep" / "b.png")
    (tmp_path / "g" / "c.txt").write_text("x")
    listing = list_inputs(str(tmp_path / "g" / "**" / "*"))
    assert [Path(r.source).name for r in listing.records] == ["a.png", "b.png"]
    assert listing.ignored == 1
    only_top = list_glob(str(tmp_path / "g" / "*.png"))
    assert [Path(r.source).name for r in only_top.records] == ["a.png"]


def test_path_list_keeps_order_resolves_relative_and_counts_duplicates(tmp_path: Path) -> None:
    _png(tmp_path / "imgs" / "b.png")
    _png(tmp_path / "imgs" / "a.png")
    lst = tmp_path / "list.txt"
    lst.write_text(f"# my images\nimgs/b.png\n\n{tmp_path / 'imgs' / 'a.png'}\nimgs/b.png\nimgs/missing.png\n")
    listing = list_inputs(lst)
    assert listing.description["kind"] == "list"
    assert [r.source for r in listing.records] == [
        str(tmp_path / "imgs" / "b.png"), str(tmp_path / "imgs" / "a.png"), str(tmp_path / "imgs" / "missing.png")]
    assert listing.duplicates == 1
    assert listing.ignored == 2  # the comment and the blank line


def test_path_list_refuses_binary_file(tmp_path: Path) -> None:
    p = tmp_path / "x.bin"
    p.write_bytes(b"\xff\xfe\x00\x81" * 10)
    with pytest.raises(InputError, match="not a text file of paths.*NUL bytes"):
        list_path_file(p)


def test_single_image_file(tmp_path: Path) -> None:
    p = _png(tmp_path / "one.png")
    listing = list_inputs(p)
    assert [r.source for r in listing.records] == [str(p)]


def test_missing_input_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file or folder.*glob"):
        list_inputs(tmp_path / "nope")


def test_csv_path_column_relative_to_the_table(tmp_path: Path) -> None:
    _png(tmp_path / "imgs" / "a.png")
    csv = tmp_path / "t.csv"
    csv.write_text("label,path\ncat,imgs/a.png\ndog,imgs/b.png\n")
    listing = list_inputs(csv)
    assert listing.description["column"] == "path"
    assert [r.source for r in listing.records] == [str(tmp_path / "imgs" / "a.png"), str(tmp_path / "imgs" / "b.png")]


def test_table_column_cannot_be_guessed(tmp_path: Path) -> None:
    csv = tmp_path / "t.csv"
    csv.write_text("a,b\nx,y\n")
    with pytest.raises(InputError, match="--column"):
        list_inputs(csv)
    with pytest.raises(InputError, match="no column 'zzz'"):
        list_inputs(csv, column="zzz")


def test_parquet_bytes_and_struct_columns_across_row_groups(tmp_path: Path) -> None:
    colours = [(i * 20, 0, 0) for i in range(7)]
    blobs = [_png_bytes(c) for c in colours]
    table = pa.table({
        "blob": pa.array(blobs, pa.binary()),
        "image": pa.array([{"bytes": b, "path": None} for b in blobs],
                          pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        "n": list(range(7)),
    })
    path = tmp_path / "t.parquet"
    pq.write_table(table, path, row_group_size=3)
    listing = list_table(path, column="blob")
    assert listing.description["column_kind"] == "bytes"
    assert [r.source for r in listing.records] == [f"{path}#row={i}" for i in range(7)]
    got = listing.reader.read(listing.records[2:6])  # rows 2..5 span three row groups
    assert got == blobs[2:6]
    auto = list_table(path)  # "image" is the preferred name; a struct of {bytes, path}
    assert auto.description["column"] == "image" and auto.description["column_kind"] == "struct"
    assert auto.reader.read([auto.records[6], auto.records[0]]) == [blobs[6], blobs[0]]


def test_hf_dataset_from_disk_reads_undecoded_bytes(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets", reason="datasets is not installed (phiclip[datasets], in the dev extra)")
    paths = [str(_png(tmp_path / "src" / f"{i}.png", (0, i * 30, 0))) for i in range(4)]
    ds = datasets.Dataset.from_dict({"picture": paths, "label": [0, 1, 0, 1]}).cast_column("picture", datasets.Image())
    ds.save_to_disk(str(tmp_path / "saved"))
    listing = list_inputs(f"hf:{tmp_path / 'saved'}")
    assert listing.description["column"] == "picture" and listing.description["split"] == "train"
    assert [r.source for r in listing.records] == [f"hf:{tmp_path / 'saved'}/train#row={i}" for i in range(4)]
    payload = listing.reader.read(listing.records[1:2])[0]
    assert payload == Path(paths[1]).read_bytes()
    with pytest.raises(InputError, match="no column 'nope'"):
        list_hf(str(tmp_path / "saved"), column="nope")


def test_hf_dataset_split_error(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets", reason="datasets is not installed (phiclip[datasets], in the dev extra)")
    dd = datasets.DatasetDict({"test": datasets.Dataset.from_dict({"image": [str(_png(tmp_path / "a.png"))]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(InputError, match="no split 'train'.*--split"):
        list_inputs(f"hf:{tmp_path / 'dd'}")
    assert len(list_inputs(f"hf:{tmp_path / 'dd'}", split="test").records) == 1


def test_texts_from_txt_and_parquet(tmp_path: Path) -> None:
    txt = tmp_path / "t.txt"
    txt.write_text("a red circle\n\n  a blue square \na red circle\n")
    listing = list_texts(txt)
    assert [r.locator for r in listing.records] == ["a red circle", "a blue square"]
    assert [r.source for r in listing.records] == [f"{txt}:1", f"{txt}:3"]
    assert listing.records[0].id == record_id("a red circle")
    assert listing.duplicates == 1 and listing.ignored == 1
    pqp = tmp_path / "t.parquet"
    pq.write_table(pa.table({"n": [1, 2], "caption": ["x", "y"]}), pqp)
    assert [r.locator for r in list_texts(pqp).records] == ["x", "y"]


def test_record_is_hashable_and_frozen() -> None:
    r = Record("i", "s", "s")
    with pytest.raises(AttributeError):
        r.id = "j"  # type: ignore[misc]


def test_hf_dataset_from_a_local_folder_of_data_files(tmp_path: Path) -> None:
    """``hf:DIR`` where DIR holds Parquet data files, as a hub dataset repository does (loaded offline)."""
    datasets = pytest.importorskip("datasets", reason="datasets is not installed (phiclip[datasets], in the dev extra)")
    paths = [str(_png(tmp_path / "src" / f"{i}.png", (i * 40, 0, 0))) for i in range(3)]
    ds = datasets.Dataset.from_dict({"image": paths, "label": [1, 2, 3]}).cast_column("image", datasets.Image())
    (tmp_path / "repo" / "data").mkdir(parents=True)
    ds.to_parquet(str(tmp_path / "repo" / "data" / "train-00000-of-00001.parquet"))
    listing = list_inputs(f"hf:{tmp_path / 'repo'}")
    assert listing.description["column"] == "image" and len(listing.records) == 3
    from phiclip.images import load_image

    payload = listing.reader.read(listing.records[2:3])[0]  # the bytes, or the file it points to
    assert payload in (Path(paths[2]).read_bytes(), paths[2])
    assert load_image(payload).getpixel((0, 0)) == (80, 0, 0)
