"""phiclip.encoders.text_side: the text tower's runner is decided once, recorded, and pickles without the
model (a CPU-side copy of an encoder is shipped to preprocessing workers)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from phiclip import load_encoder
from phiclip.pipeline.ray_engine import cpu_side
from phiclip.testing import build_tiny_clip


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return load_encoder(f"clip:{build_tiny_clip(tmp_path_factory.mktemp('clip'))}", device="cpu", dtype="float32")


def test_the_text_side_is_decided_on_first_use_and_recorded(tmp_path) -> None:
    encoder = load_encoder(f"clip:{build_tiny_clip(tmp_path / 'clip')}", device="cpu", dtype="float32")
    assert "text" not in encoder.describe()["precision"]  # an image-only run never decides it
    out = encoder.encode_texts(["a cat", "a photo of a dog"])
    assert out.shape == (2, encoder.dim)
    text = encoder.describe()["precision"]["text"]
    assert text["runtime"] == "torch"  # the suite's default runtime (tests/conftest.py)


def test_a_cpu_side_copy_pickles_small_and_without_the_model(encoder) -> None:
    encoder.encode_texts(["warm"])
    data = pickle.dumps(cpu_side(encoder))
    assert len(data) < 1_000_000  # the weights are not shipped
    copy = pickle.loads(data)
    assert copy.text_side.model is None
    np.testing.assert_array_equal(copy.text_side.tokenize(["a cat"])["input_ids"], encoder.text_side.tokenize(["a cat"])["input_ids"])
    with pytest.raises(RuntimeError, match="pickled without its model"):
        copy.text_side.prepare()
