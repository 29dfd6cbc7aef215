"""Robust image decoding: any input kind -> RGB ``PIL.Image``, with errors that name the input.

Accepted inputs: ``PIL.Image.Image``, ``HxWx3`` (or ``HxW``) ``uint8`` numpy arrays, file paths
(``str``/``os.PathLike``) and encoded bytes. Files and bytes get their EXIF orientation applied;
every mode becomes RGB the way ``Image.convert("RGB")`` does it (which is what the released
Phi-3-vision processor does; ``keep_alpha`` keeps transparency for encoders, like CLIP's, whose
processor composites it onto white), except 16/32-bit integer and float images, which are scaled
to 8 bits instead of being clipped to white. Animated images give their first frame.

Failures raise :class:`ImageDecodeError` (a ``ValueError``) whose message names the input and
says what to do; :func:`try_load_image` returns the reason as a value for bulk runs.
"""

from __future__ import annotations

import io
import os
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ImageInput = Image.Image | np.ndarray | str | os.PathLike | bytes | bytearray | memoryview

#: Default pixel limit (width * height) above which an image is refused as a decompression bomb.
#: PIL's own default warning threshold, about 89.5 megapixels (e.g. 9459 x 9459).
DEFAULT_MAX_PIXELS: int = 89_478_485


class ImageDecodeError(ValueError):
    """An input could not be turned into an RGB image. ``source`` names it, ``reason`` says why."""

    def __init__(self, source: str, reason: str, stage: str = "decode") -> None:
        self.source = source
        self.reason = reason
        self.stage = stage
        super().__init__(f"{source}: {reason}")


def describe_source(image: Any) -> str:
    """A short human-readable name for an input, used in error messages."""
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return f"<{len(image)} bytes>"
    if isinstance(image, np.ndarray):
        return f"<array {tuple(image.shape)} {image.dtype}>"
    if isinstance(image, Image.Image):
        return f"<PIL image {image.mode} {image.size[0]}x{image.size[1]}>"
    return f"<{type(image).__name__}>"


def _high_bit_depth_to_rgb(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float images: scale to 8 bits (PIL's convert would clip at 255)."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16") or (arr.dtype == np.uint16):
        arr8 = (arr.astype(np.uint32) >> 8).astype(np.uint8)
    else:
        arr = arr.astype(np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        if img.mode == "F" and lo >= 0.0 and hi <= 1.0:
            arr8 = np.round(arr * 255.0).astype(np.uint8)
        elif lo >= 0 and hi <= 255:
            arr8 = arr.astype(np.uint8)
        elif lo >= 0 and hi <= 65535:
            arr8 = (arr / 257.0).round().astype(np.uint8)
        else:
            arr8 = ((arr - lo) / max(hi - lo, 1e-12) * 255.0).round().astype(np.uint8)
    return Image.fromarray(arr8, mode="L").convert("RGB")


def has_alpha(img: Image.Image) -> bool:
    """Whether an image carries transparency (an alpha band or a palette/colour-key transparency)."""
    return "A" in img.getbands() or img.info.get("transparency") is not None


def to_rgb(img: Image.Image, *, keep_alpha: bool = False) -> Image.Image:
    """Convert any PIL mode to RGB (palette transparency handled, alpha dropped like ``convert``).

    With ``keep_alpha``, images with transparency become RGBA instead, for encoders whose own
    processor flattens transparency itself (transformers' CLIP/SigLIP processors composite onto
    white; Phi-3-vision's ``convert("RGB")`` drops alpha).
    """
    if keep_alpha and has_alpha(img) and img.mode not in ("I", "F") and not img.mode.startswith("I;16"):
        return img if img.mode == "RGBA" else img.convert("RGBA")
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        return _high_bit_depth_to_rgb(img)
    if img.mode == "P" and "transparency" in img.info:
        # Going through RGBA avoids PIL's "palette images with transparency" warning; the colour
        # values are the same as a direct convert("RGB").
        img = img.convert("RGBA")
    return img.convert("RGB")


#: Serialises ``Image.open`` in :func:`_open_encoded`: around it the warning filters and PIL's
#: process-wide pixel limit are changed, and neither may be changed by two threads at once (bulk runs
#: decode on threads). ``Image.open`` only reads the header; decoding happens outside the lock.
_OPEN_LOCK = threading.Lock()


def _open_encoded(fp: Any, source: str, max_pixels: int | None) -> Image.Image:
    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # PIL refuses images over twice its own limit before ``max_pixels`` is checked below:
            # lift its limit for this call when ``max_pixels`` allows more (the check below applies).
            pil_limit = Image.MAX_IMAGE_PIXELS
            lift = pil_limit is not None and (max_pixels is None or max_pixels > pil_limit)
            if lift:
                Image.MAX_IMAGE_PIXELS = None
            try:
                img = Image.open(fp)
            finally:
                if lift:
                    Image.MAX_IMAGE_PIXELS = pil_limit
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(source, f"over the pixel limit ({e}); raise max_pixels to accept it") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(
            source, "not a readable image (unknown or corrupt format); remove it or convert it to JPEG/PNG"
        ) from None
    except (OSError, SyntaxError, ValueError) as e:  # e.g. a header cut short: "Truncated File Read"
        raise ImageDecodeError(source, f"corrupt or truncated image header ({e}); re-export or remove the file") from None
    width, height = img.size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageDecodeError(
            source,
            f"{width}x{height} = {width * height} pixels is over the pixel limit of {max_pixels} "
            "(a possible decompression bomb); raise max_pixels to accept it",
        )
    if width < 1 or height < 1:
        raise ImageDecodeError(source, f"image has no pixels ({width}x{height})")
    if getattr(img, "is_animated", False):
        img.seek(0)
    try:
        img.load()
    except OSError as e:
        raise ImageDecodeError(source, f"truncated or corrupt image data ({e}); re-export or remove the file") from None
    except Exception as e:  # noqa: BLE001 - decoder plugins raise many kinds of errors
        raise ImageDecodeError(source, f"could not decode the image ({type(e).__name__}: {e})") from None
    try:
        # In place: this image was just opened here, and the default (a new image) copies every
        # pixel even when there is nothing to rotate.
        ImageOps.exif_transpose(img, in_place=True)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not lose the image
        pass
    return img


def load_image(
    image: ImageInput, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, keep_alpha: bool = False
) -> Image.Image:
    """Turn one input into an RGB ``PIL.Image`` (RGBA for transparent images with ``keep_alpha``).

    Args:
        image: a PIL image, an ``HxWx3``/``HxW`` uint8 array, a file path, or encoded bytes.
        max_pixels: refuse encoded images with more pixels than this (``None``: no limit).
        keep_alpha: return images with transparency as RGBA (see :func:`to_rgb`).

    Raises:
        ImageDecodeError: naming the input and the reason.
    """
    source = describe_source(image)
    if isinstance(image, Image.Image):
        if image.size[0] < 1 or image.size[1] < 1:
            raise ImageDecodeError(source, "image has no pixels")
        return to_rgb(image, keep_alpha=keep_alpha)
    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8:
            raise ImageDecodeError(source, "arrays must be uint8 (HxWx3 RGB or HxW grey); convert with .astype(np.uint8)")
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.shape[0] < 1 or arr.shape[1] < 1:
            raise ImageDecodeError(source, f"arrays must be HxWx3 (channels last), got shape {tuple(image.shape)}")
        return Image.fromarray(np.ascontiguousarray(arr[:, :, :3]), mode="RGB")
    if isinstance(image, (bytes, bytearray, memoryview)):
        if len(image) == 0:
            raise ImageDecodeError(source, "empty (0 bytes)")
        return to_rgb(_open_encoded(io.BytesIO(bytes(image)), source, max_pixels), keep_alpha=keep_alpha)
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise ImageDecodeError(source, "no such file; check the path") from None
        except OSError as e:
            raise ImageDecodeError(source, f"cannot read ({e.strerror or e})", stage="read") from None
        if path.is_dir():
            raise ImageDecodeError(source, "is a directory, not an image file", stage="read")
        if size == 0:
            raise ImageDecodeError(source, "empty file (0 bytes)", stage="read")
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ImageDecodeError(source, f"cannot read ({e.strerror or e}); check its permissions", stage="read") from None
        return to_rgb(_open_encoded(io.BytesIO(data), source, max_pixels), keep_alpha=keep_alpha)
    raise ImageDecodeError(
        source, "unsupported input type; pass a PIL image, an HxWx3 uint8 array, a file path or bytes", stage="read"
    )


def try_load_image(
    image: ImageInput, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, keep_alpha: bool = False
) -> tuple[Image.Image | None, ImageDecodeError | None]:
    """Like :func:`load_image`, but returns ``(image, None)`` or ``(None, error)`` instead of raising."""
    try:
        return load_image(image, max_pixels=max_pixels, keep_alpha=keep_alpha), None
    except ImageDecodeError as e:
        return None, e

