"""Labelled data from the one input layer (phiclip.inputs.load_data): folders, CSV/Parquet tables,
Hugging Face datasets."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from phiclip.images import load_image
from phiclip.inputs import DataError, LabelledData, align_label_spaces, load_data
from phiclip.testing import make_sample_images


def _png(rgb=(10, 20, 30), size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, format="PNG")
    return buf.getvalue()


def test_folder_per_class(tmp_path):
    records = make_sample_images(tmp_path, per_class=2)
    (tmp_path / "red" / ".hidden.png").write_bytes(_png())
    (tmp_path / "red" / "notes.txt").write_text("not an image")
    data = load_data(tmp_path)
    assert data.classnames == ["blue", "green", "red", "yellow"]
    assert len(data) == len(records) == 24 and data.splits is None and data.captions is None
    for path, label in zip(data.images, data.labels, strict=True):
        assert Path(path).parent.name == data.classnames[label]
    assert np.bincount(data.labels).tolist() == [6, 6, 6, 6]


def test_folder_with_split_folders(tmp_path):
    for split, n in (("train", 3), ("test", 1)):
        for cls in ("cat", "dog"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (4, 4)).save(d / f"{i}.jpg")
    (tmp_path / "test" / "bird").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "test" / "bird" / "0.jpg")
    data = load_data(tmp_path)
    assert data.classnames == ["bird", "cat", "dog"]
    assert sorted(set(data.splits)) == ["test", "train"] and data.splits.count("train") == 6
    test = load_data(tmp_path, split="test")
    assert test.splits is None and len(test) == 3 and test.classnames == ["bird", "cat", "dog"]
    sel = data.select_split("train")
    assert len(sel) == 6 and set(sel.labels.tolist()) == {1, 2}
    with pytest.raises(DataError, match="no split folder 'val'"):
        load_data(tmp_path, split="val")


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="no images found in class folders"):
        load_data(tmp_path)
    make_sample_images(tmp_path / "imgs", per_class=1)
    with pytest.raises(DataError, match="has no split folders"):
        load_data(tmp_path / "imgs", split="test")
    with pytest.raises(DataError, match="column options apply to tables"):
        load_data(tmp_path / "imgs", label_column="x")
    with pytest.raises(DataError, match="no such file or directory"):
        load_data(tmp_path / "absent")
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(DataError, match="not a folder, a .csv"):
        load_data(tmp_path / "x.json")


def test_csv_with_labels_and_captions(tmp_path):
    records = make_sample_images(tmp_path, per_class=1)
    data = load_data(tmp_path / "labels.csv")
    assert len(data) == len(records) and data.classnames == ["blue", "green", "red", "yellow"]
    first = records[0]
    assert data.images[0] == str(tmp_path / Path(first["path"]).relative_to(tmp_path))
    assert data.classnames[data.labels[0]] == first["label"] and data.captions[0] == [first["caption"]]
    load_image(data.images[0])  # the relative path was resolved against the table's folder


def test_csv_repeated_images_merge_captions(tmp_path):
    for name in ("a.png", "b.png"):
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    (tmp_path / "caps.csv").write_text(
        'file,text\na.png,"a cat, sleeping"\nb.png,a dog\na.png,a sleeping cat\n', encoding="utf-8"
    )
    data = load_data(tmp_path / "caps.csv")
    assert data.labels is None and data.captions == [["a cat, sleeping", "a sleeping cat"], ["a dog"]]
    texts, owners = data.texts_and_owners()
    assert texts == ["a cat, sleeping", "a sleeping cat", "a dog"] and owners.tolist() == [0, 0, 1]


def test_csv_errors(tmp_path):
    (tmp_path / "a.csv").write_text("image,label\nmissing1.png,x\nmissing2.png,y\n")
    with pytest.raises(DataError, match="2 image file.*missing1.png"):
        load_data(tmp_path / "a.csv")
    (tmp_path / "b.csv").write_text("picture,label\nx.png,a\n")
    with pytest.raises(DataError, match="no image column"):
        load_data(tmp_path / "b.csv")
    (tmp_path / "c.csv").write_text("image,colour\nx.png,a\n")
    with pytest.raises(DataError, match="no label column.*no caption column"):
        load_data(tmp_path / "c.csv")
    with pytest.raises(DataError, match="no column 'lbl'"):
        load_data(tmp_path / "c.csv", label_column="lbl")
    (tmp_path / "d.csv").write_text("image,label\nftp://x/y.png,a\n")  # http(s) URLs are fetched (tests/inputs)
    with pytest.raises(DataError, match="a scheme phiclip does not fetch"):
        load_data(tmp_path / "d.csv")
    Image.new("RGB", (4, 4)).save(tmp_path / "e.png")
    (tmp_path / "e.csv").write_text("image,label\ne.png,a\ne.png,\n")
    with pytest.raises(DataError, match="some rows have no label"):
        load_data(tmp_path / "e.csv")
    (tmp_path / "f.csv").write_text("image,label\ne.png,a\n")
    with pytest.raises(DataError, match="has no 'split' column"):
        load_data(tmp_path / "f.csv", split="test")


def test_csv_integer_labels_and_custom_columns(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "e.png")
    (tmp_path / "t.tsv").write_text("pic\tcls\ne.png\t3\ne.png\t0\n")
    data = load_data(tmp_path / "t.tsv", image_column="pic", label_column="cls")
    assert data.labels.tolist() == [3, 0] and data.classnames is None and len(data) == 2  # no captions: no merging


def test_parquet_with_bytes_structs_and_splits(tmp_path):
    images = [_png((i * 40, 0, 0)) for i in range(4)]
    table = pa.table({
        "image": [{"bytes": b, "path": None} for b in images],  # as Hugging Face writes Image columns
        "label": ["b", "a", "b", "a"],
        "split": ["train", "train", "test", "test"],
    })
    pq.write_table(table, tmp_path / "d.parquet")
    data = load_data(tmp_path / "d.parquet")
    assert data.classnames == ["a", "b"] and data.labels.tolist() == [1, 0, 1, 0]
    assert data.splits == ["train", "train", "test", "test"]
    assert load_image(data.images[1]).getpixel((0, 0)) == (40, 0, 0)
    test = load_data(tmp_path / "d.parquet", split="test")
    assert len(test) == 2 and test.classnames == ["a", "b"] and test.splits is None
    with pytest.raises(DataError, match="no rows in split 'val'; splits: test, train"):
        load_data(tmp_path / "d.parquet", split="val")
    pq.write_table(pa.table({"img": images[:2], "caption": [["x", "y"], []]}), tmp_path / "raw.parquet")
    raw = load_data(tmp_path / "raw.parquet")  # plain bytes, list captions
    assert raw.images == images[:2] and raw.captions == [["x", "y"], []] and raw.labels is None
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="cannot be read as a table"):
        load_data(tmp_path / "bad.parquet")


def _hf_dataset(n: int, offset: int = 0):
    import datasets

    feats = datasets.Features({
        "img": datasets.Image(),
        "fine": datasets.ClassLabel(names=["apple", "pear", "plum"]),
        "caption": datasets.Value("string"),
    })
    return datasets.Dataset.from_dict(
        {
            "img": [Image.new("RGB", (6, 6), (i * 20, 0, 0)) for i in range(offset, offset + n)],
            "fine": [i % 3 for i in range(n)],
            "caption": [f"fruit {i}" for i in range(offset, offset + n)],
        },
        features=feats,
    )


def test_hf_saved_dataset_dict(tmp_path):
    import datasets

    datasets.DatasetDict({"train": _hf_dataset(6), "test": _hf_dataset(3, offset=6)}).save_to_disk(tmp_path / "ds")
    spec = f"hf:{tmp_path / 'ds'}"
    data = load_data(spec)
    assert data.classnames == ["apple", "pear", "plum"] and len(data) == 9
    assert data.splits == ["train"] * 6 + ["test"] * 3
    assert isinstance(data.images[0], bytes) and load_image(data.images[7]).getpixel((0, 0)) == (140, 0, 0)
    test = load_data(spec, split="test")
    assert len(test) == 3 and test.labels.tolist() == [0, 1, 2] and test.captions[0] == ["fruit 6"]
    assert test.source.endswith("[test]")
    with pytest.raises(DataError, match="no split 'validation'; splits: train, test"):
        load_data(spec, split="validation")


def test_hf_single_saved_dataset_and_options(tmp_path):
    _hf_dataset(4).save_to_disk(tmp_path / "one")
    data = load_data(f"hf:{tmp_path / 'one'}")
    assert len(data) == 4 and data.splits is None and data.labels.tolist() == [0, 1, 2, 0]
    with pytest.raises(DataError, match="unknown option"):
        load_data(f"hf:{tmp_path / 'one'}?conf=x")
    with pytest.raises(DataError, match="names no dataset"):
        load_data("hf:")


def test_hf_local_image_folder_through_load_dataset(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (5, 5), (i, 0, 0)).save(tmp_path / "imgs" / cls / f"{i}.png")
    data = load_data(f"hf:{tmp_path / 'imgs'}", split="train")
    assert data.classnames == ["cat", "dog"] and sorted(data.labels.tolist()) == [0, 0, 1, 1]


def test_hf_unreachable_dataset_is_a_clear_error(tmp_path, monkeypatch):
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    with pytest.raises(DataError, match="cannot load the dataset.*hub is reachable"):
        load_data("hf:nobody/no-such-dataset-xyz")


def test_align_label_spaces_by_name():
    a = LabelledData(images=["1", "2"], labels=np.array([0, 1]), classnames=["cat", "dog"])
    b = LabelledData(images=["3"], labels=np.array([0]), classnames=["bird"])
    a2, b2 = align_label_spaces(a, b)
    assert a2.classnames == b2.classnames == ["bird", "cat", "dog"]
    assert a2.labels.tolist() == [1, 2] and b2.labels.tolist() == [0]
    with pytest.raises(DataError, match="integer labels"):
        align_label_spaces(a, LabelledData(images=["x"], labels=np.array([0])))


def test_texts_and_owners_needs_captions():
    with pytest.raises(DataError, match="has no captions"):
        LabelledData(images=["x"], labels=np.array([0]), source="d").texts_and_owners()


