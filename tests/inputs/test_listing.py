"""One listing for every command: embed's records carry the labels and captions eval reads; one set
of image extensions; labelled data is built from the same records."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from phiclip.inputs import InputError, InputOptions, list_inputs, load_data
from phiclip.testing import make_sample_images


def test_table_records_carry_labels_captions_and_metadata(tmp_path: Path) -> None:
    rows = make_sample_images(tmp_path, per_class=1)
    listing = list_inputs(tmp_path / "labels.csv")
    assert listing.description["label_column"] == "label" and listing.description["caption_column"] == "caption"
    first = listing.records[0]
    assert (first.label, first.captions) == (rows[0]["label"], (rows[0]["caption"],))
    table = tmp_path / "meta.parquet"
    pq.write_table(pa.table({"path": [r["path"] for r in rows[:2]], "photographer": ["ann", "bo"]}), table)
    got = list_inputs(table, options=InputOptions(metadata_columns=("photographer",)))
    assert [r.metadata for r in got.records] == [{"photographer": "ann"}, {"photographer": "bo"}]
    assert got.records[0].label is None and got.records[0].captions == ()
    with pytest.raises(InputError, match="no column 'camera' for the metadata"):
        list_inputs(table, options=InputOptions(metadata_columns=("camera",)))


def test_labelled_data_is_the_listing_of_embed(tmp_path: Path) -> None:
    make_sample_images(tmp_path, per_class=1)
    Image.new("RGB", (5, 5)).save(tmp_path / "red" / "scan.pcx")  # PIL reads it; not an image extension here
    listing = list_inputs(tmp_path)
    data = load_data(tmp_path)
    assert data.images == [r.locator for r in listing.records]  # same files, same order
    assert data.sources == [r.source for r in listing.records]
    assert str(tmp_path / "red" / "scan.pcx") in dict(listing.skipped)
    assert not any(str(p).endswith(".pcx") for p in data.images)


def test_an_image_in_no_class_folder_is_left_out_by_name(tmp_path: Path) -> None:
    make_sample_images(tmp_path, per_class=1)
    Image.new("RGB", (5, 5)).save(tmp_path / "stray.png")
    data = load_data(tmp_path)
    assert len(data) == 12 and data.classnames == ["blue", "green", "red", "yellow"]
    (left,) = data.left_out
    assert left["source"] == str(tmp_path / "stray.png") and "not in a class folder" in left["reason"]


def test_a_glob_is_unlabelled_data(tmp_path: Path) -> None:
    make_sample_images(tmp_path, per_class=1)
    data = load_data(str(tmp_path / "red" / "*.png"))
    assert len(data) == 3 and data.labels is None and data.captions is None


def test_other_data_files_are_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / "data.json").write_text('{"images": []}')
    with pytest.raises(InputError, match=r"data.json: not a folder, a .csv/.tsv/.parquet table.*a .json file"):
        list_inputs(tmp_path / "data.json")
