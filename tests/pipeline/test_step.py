"""The one embedding loop in memory: ``embed_payloads`` returns bad inputs as values, and
``Encoder.encode_images`` runs through it, naming every input that failed."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from phiclip.images import ImageDecodeError
from phiclip.pipeline.step import InputsFailed, embed_payloads, encode_images

from ._helpers import MeanColourEncoder


def _png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (6, 5), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_embed_payloads_returns_errors_as_values(tmp_path: Path) -> None:
    Image.new("RGB", (7, 7), (0, 200, 0)).save(tmp_path / "green.png")
    payloads = [Image.new("RGB", (3, 3), (250, 0, 0)), tmp_path / "green.png", _png((0, 0, 250)), b"junk",
                str(tmp_path / "missing.png"), np.zeros((4, 4, 3), np.uint8)]
    enc = MeanColourEncoder()
    res = embed_payloads(enc, payloads, batch_size=2, max_pixels=None, threads=2)
    assert res.positions == [0, 1, 2, 5] and res.sizes == [(3, 3), (7, 7), (6, 5), (4, 4)]
    assert [(p, stage) for p, stage, _ in res.errors] == [(3, "decode"), (4, "read")]
    assert enc.seen_batches == [2, 1, 1]  # chunks of one batch (2 inputs); a failed input leaves its batch short
    want = enc._vectors(np.array([[250, 0, 0], [0, 200, 0], [0, 0, 250], [0, 0, 0]], np.float32) / 255)
    np.testing.assert_allclose(res.embeddings, want, atol=1e-6)
    assert {"read_decode_preprocess", "encode"} <= set(res.timings)


def test_encode_images_names_every_failed_input_and_keeps_its_order(tmp_path: Path, tiny_clip) -> None:
    good = [Image.new("RGB", (20 + i, 16), (30 * i, 90, 10)) for i in range(5)]
    vectors = encode_images(tiny_clip, good, batch_size=2)
    one_by_one = np.concatenate([encode_images(tiny_clip, [im]) for im in good])
    np.testing.assert_allclose(vectors, one_by_one, atol=1e-5)
    assert encode_images(tiny_clip, []).shape == (0, tiny_clip.dim)
    with pytest.raises(InputsFailed) as info:
        encode_images(tiny_clip, [good[0], b"", tmp_path / "nope.png", good[1]])
    assert isinstance(info.value, ImageDecodeError)
    assert [(i, stage) for i, _, stage, _ in info.value.failures] == [(1, "decode"), (2, "read")]
    assert "nope.png" in str(info.value) and "1 other input" in str(info.value)
