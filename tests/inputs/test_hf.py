"""One grammar for Hugging Face datasets, for every command: ``hf:NAME[?config=CFG&split=SPLIT]``,
a command's ``--split`` overriding ``split=``."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from phiclip.inputs import InputError, list_inputs, load_data, parse_hf


def test_the_grammar() -> None:
    src = parse_hf("hf:user/data?config=small&split=test[:10]&revision=v1")
    assert (src.name, src.config, src.split, src.revision) == ("user/data", "small", "test[:10]", "v1")
    assert parse_hf("hf:user/data?split=test", "validation").split == "validation"  # --split overrides
    assert parse_hf("hf:user/data").split is None and parse_hf("hf:user/data", "train").split == "train"
    assert src.text == "hf:user/data?config=small&revision=v1"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("hf:user/data?config=a,split=test", r"join the options with '&'.*hf:user/data\?config=a&split=test"),
        ("hf:user/data?subset=a", "unknown option.*known: config, split, revision"),
        ("hf:user/data?split", "not key=value"),
        ("hf:", "names no dataset"),
    ],
)
def test_grammar_errors_say_the_form(text: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        parse_hf(text)


@pytest.fixture(scope="module")
def saved_dict(tmp_path_factory: pytest.TempPathFactory) -> Path:
    datasets = pytest.importorskip("datasets", reason="datasets is not installed (phiclip[datasets], in the dev extra)")
    root = tmp_path_factory.mktemp("hf")
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])})

    def split(n: int, shade: int) -> object:
        images = [Image.new("RGB", (6, 4), (shade + i, 0, 0)) for i in range(n)]
        return datasets.Dataset.from_dict({"image": images, "label": [i % 2 for i in range(n)]}, features=feats)

    datasets.DatasetDict({"train": split(4, 0), "test": split(2, 100)}).save_to_disk(str(root / "dd"))
    return root / "dd"


def test_embed_and_eval_read_the_split_the_same_way(saved_dict: Path) -> None:
    spec = f"hf:{saved_dict}"
    assert len(list_inputs(spec).records) == 4  # embed: train by default
    by_query = list_inputs(f"{spec}?split=test")
    assert [r.source for r in by_query.records] == [f"{spec}/test#row={i}" for i in range(2)]
    assert len(list_inputs(f"{spec}?split=test", split="train").records) == 4  # --split overrides
    # eval/compare: the same grammar; without a split every split, with it that split.
    every = load_data(spec)
    assert len(every) == 6 and sorted(set(every.splits)) == ["test", "train"]
    for data in (load_data(f"{spec}?split=test"), load_data(spec, split="test")):
        assert len(data) == 2 and data.source.endswith("[test]") and data.classnames == ["cat", "dog"]
    with pytest.raises(InputError, match="join the options with '&'"):
        load_data(f"{spec}?split=test,config=x")


def test_hf_records_carry_the_class_label_and_its_names(saved_dict: Path) -> None:
    listing = list_inputs(f"hf:{saved_dict}")
    assert [r.label for r in listing.records] == [0, 1, 0, 1] and listing.classnames == ["cat", "dog"]
    assert {r.split for r in listing.records} == {"train"}
