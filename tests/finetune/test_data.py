"""Training data: the held-out split says what it really holds."""

from __future__ import annotations

import numpy as np
import pytest

from phiclip.finetune.data import train_eval_split
from phiclip.inputs import DataError, LabelledData


def _data(n: int, classes: int | None = None, splits: list[str] | None = None) -> LabelledData:
    labels = None if classes is None else np.arange(n) % classes
    names = None if classes is None else [f"c{i}" for i in range(classes)]
    return LabelledData(images=[f"img{i}.png" for i in range(n)], labels=labels, classnames=names, splits=splits,
                        source="data")


def test_a_stratified_hold_out_states_the_real_counts_and_why_they_exceed_the_fraction() -> None:
    train, held, how = train_eval_split(_data(17, classes=6), eval_fraction=0.1)
    assert held is not None and (len(train), len(held)) == (11, 6)  # one of each class: 35%, not 10%
    assert how == ("held out 6 of 17 images (35%; stratified by label; 10% asked, rounded per class, at least one "
                   "of each class of two or more images; seed 0)")


def test_a_hold_out_that_matches_the_fraction_says_so_plainly() -> None:
    _, held, how = train_eval_split(_data(100, classes=2), eval_fraction=0.1, seed=3)
    assert held is not None and len(held) == 10
    assert how == "held out 10 of 100 images (10%; stratified by label; seed 3)"
    _, held, how = train_eval_split(_data(17), eval_fraction=0.1)  # no labels: rounded to whole images
    assert held is not None and len(held) == 2
    assert how == "held out 2 of 17 images (12%; 10% asked, rounded to whole images, at least one; seed 0)"


def test_a_capped_evaluation_set_says_how_many_are_evaluated() -> None:
    _, held, how = train_eval_split(_data(100), eval_fraction=0.1, max_eval=4)
    assert held is not None and len(held) == 4
    assert how == "held out 10 of 100 images (10%; seed 0), evaluated on 4 of them (--max-eval)"
    splits = ["train"] * 30 + ["val"] * 12
    train, held, how = train_eval_split(_data(42, splits=splits), max_eval=5)
    assert held is not None and (len(train), len(held)) == (30, 5)
    assert how == "given splits (train / val: 30 / 12 images), evaluated on 5 of them (--max-eval)"


def test_no_hold_out() -> None:
    train, held, how = train_eval_split(_data(5), eval_fraction=0.0)
    assert held is None and len(train) == 5 and how == "no evaluation split"


def test_too_few_images_to_hold_out_is_a_clear_error() -> None:
    with pytest.raises(DataError, match="--eval-fraction 0"):
        train_eval_split(_data(1), eval_fraction=0.5)
