"""phiclip.images: every input kind becomes an RGB image; every failure names the input and the fix."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from phiclip.images import (
    ImageDecodeError,
    describe_source,
    has_alpha,
    load_image,
    to_rgb,
    try_load_image,
)


def _encoded(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _gradient(width: int = 48, height: int = 32) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.uint8)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.uint8)[:, None, None]
    return Image.fromarray(np.concatenate([np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1)),
                                           np.full((height, width, 1), 77, np.uint8)], axis=2))


# --- every input kind -----------------------------------------------------------------------------------
def test_every_input_kind_gives_the_same_rgb_pixels(tmp_path: Path) -> None:
    img = _gradient()
    path = tmp_path / "g.png"
    img.save(path)
    data = path.read_bytes()
    arr = np.asarray(img)
    for given in (img, arr, str(path), path, data, bytearray(data), memoryview(data)):
        out = load_image(given)
        assert out.mode == "RGB" and out.size == (48, 32), type(given)
        assert np.array_equal(np.asarray(out), arr), type(given)


def test_arrays_grey_and_rgba_become_rgb() -> None:
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert np.array_equal(np.asarray(load_image(grey))[:, :, 1], grey)
    rgba = np.zeros((3, 4, 4), np.uint8)
    rgba[..., 0] = 200
    assert np.asarray(load_image(rgba)).shape == (3, 4, 3)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F", "1"])
def test_every_mode_becomes_rgb(mode: str) -> None:
    img = _gradient().convert(mode) if mode not in ("I;16", "I", "F") else Image.fromarray(
        (np.asarray(_gradient().convert("L")).astype(np.uint16) * 257).astype({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]))
    out = load_image(img)
    assert out.mode == "RGB" and out.size == img.size


def test_sixteen_bit_images_are_scaled_not_clipped() -> None:
    # PIL's convert would clip every value over 255 to white; phiclip keeps the gradient.
    arr = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    out = np.asarray(load_image(Image.fromarray(arr)))
    assert out[..., 0].min() == 0 and out[..., 0].max() == 255 and len(np.unique(out)) > 32


@pytest.mark.parametrize("mode", ["I;16", "I"])
@pytest.mark.parametrize(("top", "shift"), [(255, 0), (256, 1), (4095, 4), (65535, 8)])
def test_high_bit_depth_is_mapped_by_the_bits_it_uses(tmp_path: Path, mode: str, top: int, shift: int) -> None:
    # An 8-bit picture in a 16-bit container (top 255) stays as it is instead of turning nearly
    # black; 12-bit data (top 4095) is shifted by 4, full 16-bit data by 8.
    arr = (np.linspace(0, 1, 48 * 32).reshape(32, 48) * top).round().astype(np.uint16)
    img = Image.fromarray(arr) if mode == "I;16" else Image.fromarray(arr.astype(np.int32))
    assert img.mode == mode
    want = (arr.astype(np.uint32) >> shift).astype(np.uint8)
    out = np.asarray(load_image(img))
    assert np.array_equal(out[..., 0], want) and np.array_equal(out[..., 2], want)
    path = tmp_path / ("deep.png" if mode == "I;16" else "deep.tif")  # and the same from a file
    img.save(path)
    assert np.array_equal(np.asarray(load_image(path))[..., 1], want)


def test_a_header_longer_than_the_limit_is_refused_without_reading_on(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import struct
    import zlib

    from phiclip import images

    monkeypatch.setattr(images, "HEADER_READ_LIMIT", 4096)
    png = _encoded(Image.new("RGB", (5, 4), (9, 8, 7)))
    chunk = b"zzZz" + b"\0" * 20_000  # a private chunk before the pixels
    hostile = png[:33] + struct.pack(">I", 20_000) + chunk + struct.pack(">I", zlib.crc32(chunk)) + png[33:]
    (tmp_path / "h.png").write_bytes(hostile)
    assert Image.open(tmp_path / "h.png").size == (5, 4)  # a valid PNG for PIL
    _, err = try_load_image(tmp_path / "h.png")
    assert err is not None and "header runs past the first" in err.reason
    # Pixel data is bounded by the image's raw size, not by the header limit.
    (tmp_path / "big.png").write_bytes(_encoded(Image.fromarray(
        np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8))))
    assert (tmp_path / "big.png").stat().st_size > 4096
    assert load_image(tmp_path / "big.png").size == (300, 200)


def test_transparency_kept_only_when_asked() -> None:
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert has_alpha(rgba) and not has_alpha(rgba.convert("RGB"))
    assert to_rgb(rgba).mode == "RGB"
    assert load_image(rgba, keep_alpha=True).mode == "RGBA"
    pal = Image.new("P", (4, 4), 0)
    pal.info["transparency"] = 0
    assert has_alpha(pal) and load_image(pal, keep_alpha=True).mode == "RGBA" and load_image(pal).mode == "RGB"


def test_exif_orientation_is_applied_and_cleared() -> None:
    stored = _gradient(60, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = _encoded(stored, "JPEG", exif=exif.tobytes(), quality=95)
    out = load_image(data)
    assert out.size == (40, 60)
    # The right way round: the pixels are the decoded image turned as PIL turns it for orientation 6.
    decoded = Image.open(io.BytesIO(data))
    assert np.array_equal(np.asarray(out), np.asarray(decoded.transpose(Image.Transpose.ROTATE_270).convert("RGB")))
    assert out.getexif().get(0x0112, 1) == 1  # the tag is gone: a second transpose would be wrong
    # No orientation tag: the decoded image itself comes back, same pixels as a plain decode.
    plain = load_image(_encoded(stored, "JPEG", quality=95))
    assert plain.size == (60, 40)
    assert np.array_equal(np.asarray(plain), np.asarray(Image.open(io.BytesIO(_encoded(stored, "JPEG", quality=95))).convert("RGB")))


def test_animated_images_give_their_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    assert load_image(buf.getvalue()).getpixel((0, 0)) == (255, 0, 0)


# --- failures name the input and what to do -----------------------------------------------------------
def _write(name: str, data: bytes):
    def make(folder: Path) -> Path:
        (folder / name).write_bytes(data)
        return folder / name

    return make


@pytest.mark.parametrize(
    "make,stage,words",
    [
        (lambda p: p / "missing.jpg", "decode", "no such file"),
        (_write("empty.jpg", b""), "read", "0 bytes"),
        (_write("notes.jpg", b"hello, not an image"), "decode", "not a readable image"),
        (lambda p: p, "read", "directory"),
        (_write("cut.jpg", _encoded(_gradient(200, 200), "JPEG")[:300]), "decode", "truncated"),
    ],
    ids=["missing", "empty", "text_as_jpg", "directory", "truncated"],
)
def test_bad_files_are_named(tmp_path: Path, make, stage: str, words: str) -> None:
    path = make(tmp_path)
    with pytest.raises(ImageDecodeError) as info:
        load_image(path)
    err = info.value
    assert str(path) in str(err) and words in err.reason and err.stage == stage
    img, got = try_load_image(path)
    assert img is None and got is not None and got.reason == err.reason


def test_pixel_limit_refuses_bombs_with_the_fix() -> None:
    data = _encoded(Image.new("RGB", (200, 100)))
    with pytest.raises(ImageDecodeError, match="max_pixels"):
        load_image(data, max_pixels=10_000)
    assert load_image(data, max_pixels=None).size == (200, 100)


@pytest.mark.parametrize(
    "bad,words",
    [
        (np.zeros((4, 4, 3), np.float32), "uint8"),
        (np.zeros((3, 4, 4, 3), np.uint8), "HxWx3"),
        (np.zeros((0, 4, 3), np.uint8), "HxWx3"),
        (b"", "empty"),
        (12345, "unsupported input type"),
        (Image.new("RGB", (0, 0)), "no pixels"),
    ],
    ids=["float_array", "4d_array", "empty_array", "empty_bytes", "int", "empty_image"],
)
def test_bad_values_are_named(bad, words: str) -> None:
    with pytest.raises(ImageDecodeError, match=words) as info:
        load_image(bad)
    assert str(info.value).startswith(describe_source(bad))


def test_a_callers_image_is_never_changed() -> None:
    img = _gradient(60, 40)
    exif = Image.Exif()
    exif[0x0112] = 6
    img.info["exif"] = exif.tobytes()
    before = np.asarray(img).copy()
    out = load_image(img)
    assert img.size == (60, 40) and np.array_equal(np.asarray(img), before)
    assert out.size == (60, 40)  # a PIL image is taken as it is: orientation applies to encoded files


def test_max_pixels_above_pils_own_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL alone refuses over 2000 pixels
    data = _encoded(Image.new("RGB", (100, 100)))
    assert load_image(data, max_pixels=None).size == (100, 100)
    assert load_image(data, max_pixels=20_000).size == (100, 100)
    with pytest.raises(ImageDecodeError, match="pixel limit"):
        load_image(data, max_pixels=1000)
    assert Image.MAX_IMAGE_PIXELS == 1000
