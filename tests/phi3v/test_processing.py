"""The HD transform: size arithmetic against the spec's table and a sweep, pixels against a
reference preprocessor written from the spec, input kinds, file modes and EXIF orientation."""

from __future__ import annotations

import io
import json
import math
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from phiclip.phi3v import Phi3VImageProcessor, hd_size, num_image_tokens, num_tokens_for_hd_size

from .reference import (
    CLIP_MEAN,
    CLIP_STD,
    CROP,
    SPEC_ANY_SIZE_N1,
    SPEC_N1_SIZES,
    SPEC_N1_TOKENS,
    SPEC_TABLE,
    noise_image,
    ref_hd_size,
    ref_num_tokens,
    ref_preprocess,
    ref_preprocess_batch,
    ref_scale,
)

TOL = 1e-5


def _row_id(row: tuple) -> str:
    w, h, n, _, _ = row
    return f"{w}x{h}-N{n}"


# ---------------------------------------------------------------------------------------------
# The spec's token table
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("row", SPEC_TABLE, ids=_row_id)
def test_spec_table_sizes_and_tokens(row: tuple) -> None:
    width, height, n, sizes, tokens = row
    assert hd_size(width, height, num_crops=n) == sizes
    assert num_image_tokens(width, height, num_crops=n) == tokens
    assert num_tokens_for_hd_size(*sizes) == tokens


@pytest.mark.parametrize("size", SPEC_ANY_SIZE_N1, ids=lambda s: f"{s[0]}x{s[1]}")
def test_spec_table_any_size_with_one_crop(size: tuple[int, int]) -> None:
    assert hd_size(*size, num_crops=1) == SPEC_N1_SIZES
    assert num_image_tokens(*size, num_crops=1) == SPEC_N1_TOKENS


@pytest.mark.parametrize("row", SPEC_TABLE, ids=_row_id)
def test_spec_table_on_real_pixels(row: tuple) -> None:
    width, height, n, sizes, tokens = row
    out = Phi3VImageProcessor(num_crops=n)(noise_image(width, height, seed=width + height))
    assert out.image_sizes.tolist() == [list(sizes)]
    assert out.num_img_tokens == [tokens]
    assert tuple(out.pixel_values.shape) == (1, n + 1, 3, CROP, CROP)
    assert out.pixel_values.dtype == torch.float32
    h, w = sizes[0] // CROP, sizes[1] // CROP
    assert out.num_crops_per_image == [1 + h * w]
    # Real crops carry pixels, the padding crops are exactly zero.
    assert torch.all(out.pixel_values[0, 1 + h * w :] == 0)
    assert all(out.pixel_values[0, k].abs().sum() > 0 for k in range(1 + h * w))


@pytest.mark.parametrize("size", [(336, 336), (8000, 50), (50, 8000), (3, 2)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_spec_table_any_size_with_one_crop_on_real_pixels(size: tuple[int, int]) -> None:
    out = Phi3VImageProcessor(num_crops=1)(noise_image(*size, seed=1))
    assert out.image_sizes.tolist() == [list(SPEC_N1_SIZES)]
    assert out.num_img_tokens == [SPEC_N1_TOKENS]
    assert tuple(out.pixel_values.shape) == (1, 2, 3, CROP, CROP)


# ---------------------------------------------------------------------------------------------
# A property-style sweep over many sizes
# ---------------------------------------------------------------------------------------------
def _sweep_sizes() -> list[tuple[int, int]]:
    edges = [1, 2, 3, 5, 13, 50, 100, 223, 335, 336, 337, 500, 671, 672, 673, 1000, 1007, 1344, 1920, 4000, 8000, 20000]
    sizes = [(w, h) for w in edges for h in edges]
    rng = random.Random(1234)
    sizes += [(rng.randint(1, 6000), rng.randint(1, 6000)) for _ in range(400)]
    sizes += [(rng.randint(1, 40), rng.randint(1000, 30000)) for _ in range(50)]
    return sizes


@pytest.mark.parametrize("num_crops", [1, 4, 16])
def test_size_sweep(num_crops: int) -> None:
    for width, height in _sweep_sizes():
        H, W = hd_size(width, height, num_crops=num_crops)
        ctx = f"{width}x{height} N={num_crops} -> {H}x{W}"
        assert H > 0 and W > 0 and H % CROP == 0 and W % CROP == 0, ctx
        h, w = H // CROP, W // CROP
        assert h * w <= num_crops, ctx
        assert num_image_tokens(width, height, num_crops=num_crops) == (h * w + 1) * 144 + 1 + (h + 1) * 12, ctx
        assert (H, W) == ref_hd_size(width, height, num_crops), ctx
        # The long side is scale * 336 with the largest admissible scale.
        ratio = max(width, height) / min(width, height)
        scale = W // CROP if width >= height else H // CROP
        assert scale * math.ceil(scale / ratio) <= num_crops, ctx
        assert (scale + 1) * math.ceil((scale + 1) / ratio) > num_crops, ctx
        # Portraits are the transposed landscapes.
        assert hd_size(height, width, num_crops=num_crops) == (W, H), ctx
        # The orientation is kept: the canvas is at least as long along the image's long side.
        if width > height:
            assert W >= H, ctx
        elif height > width:
            assert H >= W, ctx


def test_reference_scale_agrees_with_spec_examples() -> None:
    # Guards the test's own reference: 640x480 at N=16 -> scale 4 (4 * ceil(4 / 1.333) = 8 <= 16,
    # 5 * ceil(5 / 1.333) = 20 > 16).
    assert ref_scale(640 / 480, 16) == 4
    assert ref_num_tokens(1008, 1344) == 1921


# ---------------------------------------------------------------------------------------------
# Pixels against the reference preprocessor
# ---------------------------------------------------------------------------------------------
PIXEL_CASES = [
    ((336, 336), 16),  # square, upscaled
    ((640, 480), 16),  # landscape
    ((480, 640), 16),  # portrait (transposed, then back)
    ((1000, 999), 4),  # almost square
    ((7, 5), 16),  # tiny landscape
    ((5, 7), 4),  # tiny portrait
    ((1, 1), 16),  # one pixel
    ((23, 900), 16),  # extreme portrait
    ((1200, 17), 16),  # extreme landscape
    ((20000, 3), 16),  # so thin that the resized height would be 0 (kept 1 px tall)
    ((777, 333), 1),  # one crop
]


@pytest.mark.parametrize("size,num_crops", PIXEL_CASES, ids=[f"{s[0]}x{s[1]}-N{n}" for s, n in PIXEL_CASES])
def test_pixels_match_reference(size: tuple[int, int], num_crops: int) -> None:
    image = noise_image(*size, seed=size[0] * 7 + size[1])
    expected, expected_size = ref_preprocess(image, num_crops)
    out = Phi3VImageProcessor(num_crops=num_crops)([image])
    assert out.image_sizes.tolist() == [list(expected_size)]
    assert tuple(out.pixel_values.shape) == (1, num_crops + 1, 3, CROP, CROP)
    assert (out.pixel_values[0] - expected).abs().max().item() <= TOL
    # Unpadded: only the real crops, the same values.
    unpadded = Phi3VImageProcessor(num_crops=num_crops)([image], padding=False)
    h, w = expected_size[0] // CROP, expected_size[1] // CROP
    assert isinstance(unpadded.pixel_values, list) and len(unpadded.pixel_values) == 1
    assert tuple(unpadded.pixel_values[0].shape) == (1 + h * w, 3, CROP, CROP)
    assert torch.equal(unpadded.pixel_values[0], out.pixel_values[0, : 1 + h * w])
    assert unpadded.image_sizes.tolist() == out.image_sizes.tolist()
    assert unpadded.num_img_tokens == out.num_img_tokens


def test_padding_band_is_normalised_white() -> None:
    # 700x300 at N=4: scale 2, resized to 672x288, centred in a 336-high canvas (24 rows above).
    image = Image.new("RGB", (700, 300), (0, 0, 0))
    out = Phi3VImageProcessor(num_crops=4)(image)
    assert out.image_sizes.tolist() == [[336, 672]]
    white = (1.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    black = -torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD)
    top, new_h = 24, 288
    first_crop = out.pixel_values[0, 1]  # top-left tile
    assert torch.allclose(first_crop[:, :top, :], white[:, None, None].expand(3, top, CROP))
    assert torch.allclose(first_crop[:, top + new_h :, :], white[:, None, None].expand(3, CROP - top - new_h, CROP))
    assert torch.allclose(first_crop[:, top + 2 : top + 10, :], black[:, None, None].expand(3, 8, CROP))


def test_mixed_sizes_in_one_batch_match_reference() -> None:
    images = [noise_image(640, 480, seed=1), noise_image(90, 400, seed=2), noise_image(336, 336, seed=3)]
    expected, sizes = ref_preprocess_batch(images, 16)
    out = Phi3VImageProcessor(num_crops=16)(images)
    assert out.image_sizes.tolist() == sizes.tolist()
    assert (out.pixel_values - expected).abs().max().item() <= TOL
    assert out.num_img_tokens == [num_image_tokens(im.width, im.height, 16) for im in images]


def test_custom_mean_std_are_used() -> None:
    mean, std = (0.5, 0.25, 0.1), (0.2, 0.3, 0.4)
    image = noise_image(300, 200, seed=5)
    expected, _ = ref_preprocess(image, 4, mean=mean, std=std)
    out = Phi3VImageProcessor(num_crops=4, image_mean=mean, image_std=std)(image)
    assert (out.pixel_values[0] - expected).abs().max().item() <= TOL


# ---------------------------------------------------------------------------------------------
# Input kinds, file modes, EXIF orientation
# ---------------------------------------------------------------------------------------------
def test_input_kinds_give_identical_pixels(tmp_path: Path) -> None:
    image = noise_image(250, 170, seed=11)
    path = tmp_path / "img.png"
    image.save(path)
    data = path.read_bytes()
    proc = Phi3VImageProcessor(num_crops=4)
    outs = [proc(x) for x in (image, np.asarray(image), str(path), path, data)]
    for o in outs[1:]:
        assert torch.equal(o.pixel_values, outs[0].pixel_values)
        assert torch.equal(o.image_sizes, outs[0].image_sizes)
        assert o.num_img_tokens == outs[0].num_img_tokens
    # A list mixing kinds keeps the order.
    mixed = proc([data, noise_image(80, 300, seed=3), str(path)])
    assert torch.equal(mixed.pixel_values[0], outs[0].pixel_values[0])
    assert torch.equal(mixed.pixel_values[2], outs[0].pixel_values[0])
    assert mixed.image_sizes[1].tolist() == list(hd_size(80, 300, 4))


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    stored = noise_image(120, 60, seed=4)  # landscape as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    stored.save(path, format="JPEG", exif=exif.tobytes(), quality=95)
    out = Phi3VImageProcessor(num_crops=16)(str(path))
    # Displayed upright it is a 60x120 portrait.
    assert out.image_sizes.tolist() == [list(hd_size(60, 120, 16))]
    assert out.image_sizes.tolist() != [list(hd_size(120, 60, 16))]
    decoded = Image.open(path)
    decoded.load()
    upright = decoded.transpose(Image.Transpose.ROTATE_270)  # 90 degrees clockwise
    expected, _ = ref_preprocess(upright, 16)
    assert (out.pixel_values[0] - expected).abs().max().item() <= TOL
    # The same bytes give the same result.
    assert torch.equal(Phi3VImageProcessor(num_crops=16)(path.read_bytes()).pixel_values, out.pixel_values)


def _save(image: Image.Image, path: Path, **kw) -> Path:
    image.save(path, **kw)
    return path


def _mode_files(tmp_path: Path) -> dict[str, Path]:
    rgb = noise_image(90, 60, seed=9)
    p_img = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    p_img.info["transparency"] = 0
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgb.size))
    return {
        "L": _save(rgb.convert("L"), tmp_path / "l.png"),
        "LA": _save(rgb.convert("LA"), tmp_path / "la.png"),
        "P": _save(p_img, tmp_path / "p.png", transparency=0),
        "RGBA": _save(rgba, tmp_path / "rgba.png"),
        "CMYK": _save(rgb.convert("CMYK"), tmp_path / "cmyk.jpg", quality=95),
    }


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK"])
def test_file_modes_preprocess_like_convert_rgb(tmp_path: Path, mode: str) -> None:
    path = _mode_files(tmp_path)[mode]
    with Image.open(path) as check:
        assert check.mode == mode
        if mode == "P":
            assert "transparency" in check.info
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected, expected_size = ref_preprocess(check.convert("RGB"), 4)
    out = Phi3VImageProcessor(num_crops=4)(str(path))
    assert out.image_sizes.tolist() == [list(expected_size)]
    assert (out.pixel_values[0] - expected).abs().max().item() <= TOL


def test_16_bit_grey_is_scaled_not_clipped(tmp_path: Path) -> None:
    ramp = (np.arange(80 * 50, dtype=np.uint32).reshape(50, 80) * 16).astype(np.uint16)  # 0 .. 63984
    path = tmp_path / "grey16.png"
    Image.fromarray(ramp).save(path)  # uint16 -> mode I;16
    with Image.open(path) as check:
        assert check.mode in ("I;16", "I")  # PIL opens 16-bit PNG as one of these
    out = Phi3VImageProcessor(num_crops=4)(str(path))
    H, W = out.image_sizes[0].tolist()
    white = (1.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    crop = out.pixel_values[0, 1]
    # PIL's plain convert("RGB") clips every value above 255 to white: almost all of it would be.
    assert (crop - white[:, None, None]).abs().amax(dim=0).gt(0.1).float().mean() > 0.5
    # It matches the 8-bit image with the 16-bit values scaled down.
    eight = Image.fromarray((ramp >> 8).astype(np.uint8))  # mode L
    expected, _ = ref_preprocess(eight, 4)
    assert (out.pixel_values[0] - expected).abs().max().item() <= 2.5 / 255 / min(CLIP_STD)


# ---------------------------------------------------------------------------------------------
# preprocessor_config.json
# ---------------------------------------------------------------------------------------------
def test_from_pretrained_reads_preprocessor_config(tmp_path: Path) -> None:
    mean, std = [0.5, 0.5, 0.5], [0.25, 0.5, 0.125]
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"image_processor_type": "Phi3VImageProcessor", "num_crops": 4, "image_mean": mean, "image_std": std})
    )
    proc = Phi3VImageProcessor.from_pretrained(tmp_path)
    assert proc.num_crops == 4
    assert proc.image_mean == pytest.approx(tuple(mean)) and proc.image_std == pytest.approx(tuple(std))
    image = noise_image(400, 300, seed=2)
    out = proc(image)
    expected, _ = ref_preprocess(image, 4, mean=tuple(mean), std=tuple(std))
    assert tuple(out.pixel_values.shape) == (1, 5, 3, CROP, CROP)
    assert (out.pixel_values[0] - expected).abs().max().item() <= TOL
    # Keyword arguments override the file.
    assert Phi3VImageProcessor.from_pretrained(tmp_path, num_crops=16).num_crops == 16


def test_from_pretrained_without_preprocessor_config_uses_released_defaults(tmp_path: Path) -> None:
    proc = Phi3VImageProcessor.from_pretrained(tmp_path)
    assert proc.num_crops == 16
    assert proc.image_mean == pytest.approx(CLIP_MEAN) and proc.image_std == pytest.approx(CLIP_STD)


def test_from_pretrained_on_built_checkpoint(ckpt4: Path, ckpt: Path) -> None:
    assert Phi3VImageProcessor.from_pretrained(ckpt4).num_crops == 4
    proc = Phi3VImageProcessor.from_pretrained(str(ckpt))
    assert proc.num_crops == 16
    assert proc.image_mean == pytest.approx(CLIP_MEAN) and proc.image_std == pytest.approx(CLIP_STD)


def test_bytes_from_memory_buffer() -> None:
    buf = io.BytesIO()
    noise_image(50, 40, seed=1).save(buf, format="PNG")
    out = Phi3VImageProcessor(num_crops=4)([buf.getvalue(), bytearray(buf.getvalue())])
    assert torch.equal(out.pixel_values[0], out.pixel_values[1])
