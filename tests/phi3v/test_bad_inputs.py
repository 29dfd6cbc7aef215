"""Bad inputs to the processor, the size arithmetic and the model: each a clear error (its type,
and a message that names the problem)."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from phiclip.images import ImageDecodeError
from phiclip.phi3v import Phi3VImageEmbedding, Phi3VImageProcessor, hd_size, num_image_tokens
from phiclip.testing import phi3v_config_dict

from .helpers import TINY_TOWER
from .reference import noise_image


@pytest.fixture(scope="module")
def model(ckpt4: Path) -> Phi3VImageEmbedding:
    return Phi3VImageEmbedding.from_pretrained(ckpt4, load_text_embeddings=True)


@pytest.fixture(scope="module")
def inputs():
    """Two images at num_crops=4: a 2x2 grid (5 crops) and a 1x2 row (3 crops)."""
    return Phi3VImageProcessor(num_crops=4)([noise_image(640, 480, seed=1), noise_image(700, 300, seed=2)])


# ---------------------------------------------------------------------------------------------
# num_crops and sizes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0, -1, 2.5, "4"])
def test_processor_num_crops_must_be_a_positive_integer(bad) -> None:
    with pytest.raises(ValueError, match="num_crops") as err:
        Phi3VImageProcessor(num_crops=bad)
    assert repr(bad) in str(err.value)


@pytest.mark.parametrize("func", [hd_size, num_image_tokens])
def test_size_arithmetic_num_crops_zero(func) -> None:
    with pytest.raises(ValueError, match="num_crops.*0"):
        func(640, 480, num_crops=0)


@pytest.mark.parametrize("size", [(0, 10), (10, 0), (-5, 10)])
def test_size_arithmetic_needs_positive_size(size) -> None:
    with pytest.raises(ValueError, match="positive"):
        hd_size(*size, num_crops=16)


def test_processor_std_zero_and_wrong_length() -> None:
    with pytest.raises(ValueError, match="image_std"):
        Phi3VImageProcessor(image_std=(0.2, 0.0, 0.3))
    with pytest.raises(ValueError, match="image_mean"):
        Phi3VImageProcessor(image_mean=(0.5, 0.5))


def test_processor_empty_list_and_return_tensors() -> None:
    with pytest.raises(ValueError, match="no images"):
        Phi3VImageProcessor()([])
    with pytest.raises(ValueError, match="return_tensors"):
        Phi3VImageProcessor()(noise_image(10, 10), return_tensors="np")


# ---------------------------------------------------------------------------------------------
# Files and other inputs that are not images
# ---------------------------------------------------------------------------------------------
def _jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    noise_image(120, 90, seed=3).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.jpg"
    data = _jpeg_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image\n" * 20)
    folder = tmp_path / "folder.jpg"
    folder.mkdir()
    return {
        "zero_bytes": (empty, "empty"),
        "truncated_jpeg": (truncated, "truncated"),
        "text_as_jpg": (text, "not a readable image"),
        "directory": (folder, "directory"),
        "missing": (tmp_path / "absent.png", "no such file"),
    }


@pytest.mark.parametrize("case", ["zero_bytes", "truncated_jpeg", "text_as_jpg", "directory", "missing"])
def test_bad_files_are_named(tmp_path: Path, case: str) -> None:
    path, reason = _bad_files(tmp_path)[case]
    proc = Phi3VImageProcessor(num_crops=4)
    for given in (str(path), path):
        with pytest.raises(ImageDecodeError) as err:
            proc([noise_image(30, 30), given])
        assert isinstance(err.value, ValueError)
        assert str(path) in str(err.value)
        assert reason in str(err.value)


@pytest.mark.parametrize(
    "given,reason",
    [
        (b"", "empty"),
        (b"GIF89a but then nothing useful", "not a readable image"),
        (np.zeros((20, 30, 3), dtype=np.float32), "uint8"),
        (np.zeros((20, 30, 5), dtype=np.uint8), "HxWx3"),
        (12345, "unsupported input type"),
    ],
    ids=["empty_bytes", "junk_bytes", "float_array", "five_channels", "int"],
)
def test_bad_in_memory_inputs(given, reason: str) -> None:
    with pytest.raises(ImageDecodeError, match=re.escape(reason)):
        Phi3VImageProcessor(num_crops=4)(given)


def test_truncated_jpeg_bytes() -> None:
    data = _jpeg_bytes()
    with pytest.raises(ImageDecodeError, match="truncated") as err:
        Phi3VImageProcessor(num_crops=4)(data[: len(data) // 2])
    assert f"<{len(data) // 2} bytes>" in str(err.value)


# ---------------------------------------------------------------------------------------------
# Wrong tensors for the model
# ---------------------------------------------------------------------------------------------
def test_four_dimensional_pixel_values(model, inputs) -> None:
    # One image's crops without the batch dimension: the error must be about pixel_values (not
    # ask for 5 image_sizes rows, as if the 5 crops were 5 images).
    with pytest.raises(ValueError, match=r"pixel_values must have shape") as err:
        model.image_tokens(inputs.pixel_values[0], inputs.image_sizes[:1])
    assert "(5, 3, 336, 336)" in str(err.value)
    # With as many image_sizes rows as crops, the same.
    with pytest.raises(ValueError, match=r"pixel_values must have shape"):
        model.image_tokens(inputs.pixel_values[0], torch.tensor([[336, 336]] * 5))


def test_wrong_crop_size(model, inputs) -> None:
    small = torch.zeros(2, 5, 3, 224, 224)
    with pytest.raises(ValueError, match="336") as err:
        model.image_tokens(small, inputs.image_sizes)
    assert "(2, 5, 3, 224, 224)" in str(err.value)


@pytest.mark.parametrize("sizes", [[[672, 672]], [[672, 672], [336, 672], [336, 336]], [[672, 672, 1], [336, 672, 1]], [672, 672]])
def test_image_sizes_shape_mismatch(model, inputs, sizes) -> None:
    with pytest.raises(ValueError, match=r"image_sizes must have shape \(2, 2\)") as err:
        model.image_tokens(inputs.pixel_values, torch.tensor(sizes))
    assert str(tuple(torch.tensor(sizes).shape)) in str(err.value)


@pytest.mark.parametrize("bad", [[672, 600], [0, 672], [-336, 336]])
def test_image_sizes_not_multiple_of_336(model, inputs, bad) -> None:
    with pytest.raises(ValueError, match="multiple of 336") as err:
        model.image_tokens(inputs.pixel_values, torch.tensor([[672, 672], bad]))
    assert f"image_sizes[1] = [{bad[0]}, {bad[1]}]" in str(err.value)


def test_too_few_crops(model, inputs) -> None:
    # image_sizes for a 4x4 grid (17 crops) with only 5 crop slots.
    with pytest.raises(ValueError, match="needs 17 crops") as err:
        model.image_tokens(inputs.pixel_values, torch.tensor([[1344, 1344], [336, 672]]))
    assert "has 5" in str(err.value)


def test_unpadded_list_with_wrong_crop_count(model, inputs) -> None:
    unpadded = Phi3VImageProcessor(num_crops=4)([noise_image(640, 480, seed=1), noise_image(700, 300, seed=2)], padding=False)
    crops = [unpadded.pixel_values[0], unpadded.pixel_values[1][:2]]
    with pytest.raises(ValueError, match=r"pixel_values\[1\] must have shape \(3, 3, 336, 336\)"):
        model.image_tokens(crops, unpadded.image_sizes)
    # One tensor for two sizes: either message names both counts.
    with pytest.raises(ValueError, match=r"1 pixel_values tensors for 2 image_sizes|image_sizes must have shape \(1, 2\).*got \(2, 2\)"):
        model.image_tokens(unpadded.pixel_values[:1], unpadded.image_sizes)


def test_mismatched_marker_counts(model, inputs) -> None:
    n = sum(inputs.num_img_tokens)
    ids = torch.cat([torch.tensor([1, 2]), torch.full((n + 3,), -1), torch.tensor([3])])[None]
    with pytest.raises(ValueError) as err:
        model(ids, inputs.pixel_values, inputs.image_sizes)
    numbers = re.findall(r"\d+", str(err.value))
    assert str(n + 3) in numbers and str(n) in numbers


def test_forward_bad_ids(model, inputs) -> None:
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="outside the vocabulary of 128"):
        model(torch.tensor([[1, 500]]))
    with pytest.raises(ValueError, match="image_sizes"):
        model(torch.tensor([[1, 2]]), inputs.pixel_values)


def test_pooling_name(model, inputs) -> None:
    with pytest.raises(ValueError, match="'max'"):
        model.pooled(inputs.pixel_values, inputs.image_sizes, pooling="max")


@pytest.mark.parametrize(
    "change,match",
    [
        ({"hd_transform_order": "sideways"}, "hd_transform_order"),
        ({"projection_cls": "conv"}, "projection_cls"),
        ({"layer_idx": 7}, "layer_idx 7"),
        ({"layer_idx": -5}, "layer_idx -5"),
        ({"type_feature": "cls"}, "type_feature"),
        ({"with_learnable_separator": False}, "with_learnable_separator"),
    ],
)
def test_bad_config_values(change: dict, match: str) -> None:
    config = phi3v_config_dict(hidden_size=64, vocab_size=128, vision_config=TINY_TOWER)
    for key in ("layer_idx", "type_feature"):
        if key in change:
            config["img_processor"][key] = change[key]
    for key in ("hd_transform_order", "projection_cls", "with_learnable_separator"):
        if key in change:
            config["embd_layer"][key] = change[key]
    with pytest.raises(ValueError, match=match):
        Phi3VImageEmbedding(config)


@pytest.mark.parametrize("bad", [0, -1])
def test_max_crops_per_batch_must_be_positive(bad: int) -> None:
    config = phi3v_config_dict(hidden_size=64, vocab_size=128, vision_config=TINY_TOWER)
    with pytest.raises(ValueError, match="max_crops_per_batch") as err:
        Phi3VImageEmbedding(config, max_crops_per_batch=bad)
    assert str(bad) in str(err.value)


@pytest.mark.parametrize("bad", ["float33", "bf16"])
def test_unknown_dtype_name(ckpt4: Path, bad: str) -> None:
    with pytest.raises(ValueError, match=bad):
        Phi3VImageEmbedding.from_pretrained(ckpt4, torch_dtype=bad)
