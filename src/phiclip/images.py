"""Robust image decoding: any input kind -> RGB ``PIL.Image``, with errors that name the input.

Accepted inputs: ``PIL.Image.Image``, ``HxWx3`` (or ``HxW``) ``uint8`` numpy arrays, file paths
(``str``/``os.PathLike``) and encoded bytes. Files and bytes get their EXIF orientation applied;
every mode becomes RGB the way ``Image.convert("RGB")`` does it (which is what the released
Phi-3-vision processor does; ``keep_alpha`` keeps transparency for encoders, like CLIP's, whose
processor composites it onto white), except 16/32-bit integer and float images, which are scaled
to 8 bits instead of being clipped to white (see *High bit depth* below). Animated images give their
first frame.

High bit depth: PIL's ``convert`` (and so the released Phi-3-vision processor) clips every value
over 255 to white. phiclip maps such images to 8 bits by the bits they actually use instead:

- integer images (``I;16``, ``I;16B``..., ``I``) with no negative value are shifted right by
  ``max(0, b - 8)`` where ``b`` is the bit length of their largest value. A 16-bit image that uses
  the full range is shifted by 8 (65535 -> 255), a 12-bit camera image (largest value under 4096)
  by 4, and an 8-bit picture saved in a 16-bit container (every value under 256) is kept as it is,
  instead of coming out nearly black. A dark 16-bit image is therefore brightened to use the
  8-bit range its largest value allows (the file does not record the intended range).
- float images (``F``) with values in [0, 1] are scaled by 255, those in [0, 255] kept; integer or
  float images with negative values or values over 65535 are stretched from their minimum to their
  maximum.

The mapped grey image is then repeated into R, G and B.

Files are opened lazily: the header (format, width and height) is read and checked against the
pixel limit before any pixel data is read, a file that is not an image is refused from its first
bytes, and at most :data:`HEADER_READ_LIMIT` bytes are read before the size is known and about
twice the raw size of the image after it, so the memory a file can take is bounded by the pixel
limit, not by the size of the file.

Failures raise :class:`ImageDecodeError` (a ``ValueError``) whose message names the input and
says what to do; :func:`try_load_image` returns the reason as a value for bulk runs.
"""

from __future__ import annotations

import io
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from phiclip.schema import path_to_source

ImageInput = Image.Image | np.ndarray | str | os.PathLike | bytes | bytearray | memoryview

#: Default pixel limit (width * height) above which an image is refused as a decompression bomb.
#: PIL's own default warning threshold, about 89.5 megapixels (e.g. 9459 x 9459).
DEFAULT_MAX_PIXELS: int = 89_478_485
#: Bytes a file may give before its width and height are known (its header, with EXIF, ICC
#: profiles, XMP...). A file that needs more to say what it is (e.g. a PNG "chunk" of gigabytes
#: before its pixels) is refused instead of being read into memory.
HEADER_READ_LIMIT: int = 64 * 1024 * 1024
#: Read-ahead of an image file, filled before PIL parses the header (one read for most files).
_READ_AHEAD = 256 * 1024


@dataclass(frozen=True)
class Unreadable:
    """An input that could not be read, as a value (what an input source gives instead of its bytes): the
    ``stage`` (``read``, ``fetch``) and the ``reason``, written to ``errors/`` as they are (reasons name
    no input, so that they group). Defined here, with the other data helpers, so that
    :mod:`phiclip.fetch` and :mod:`phiclip.inputs` share it; :mod:`phiclip.inputs.records` exports it."""

    stage: str
    reason: str


class ImageDecodeError(ValueError):
    """An input could not be turned into an RGB image. ``source`` names it, ``reason`` says why."""

    def __init__(self, source: str, reason: str, stage: str = "decode") -> None:
        self.source = source
        self.reason = reason
        self.stage = stage
        super().__init__(f"{source}: {reason}")


def describe_source(image: Any) -> str:
    """A short human-readable name for an input, used in error messages (a path in the text form of
    :func:`phiclip.schema.path_to_source`, which survives names that are not UTF-8)."""
    if isinstance(image, (str, os.PathLike)):
        return path_to_source(image)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return f"<{len(image)} bytes>"
    if isinstance(image, np.ndarray):
        return f"<array {tuple(image.shape)} {image.dtype}>"
    if isinstance(image, Image.Image):
        return f"<PIL image {image.mode} {image.size[0]}x{image.size[1]}>"
    return f"<{type(image).__name__}>"


def _high_bit_depth_to_rgb(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float images -> 8 bits by the bits they use (see the module
    docstring; PIL's convert would clip at 255)."""
    arr = np.asarray(img)
    lo, hi = (arr.min().item(), arr.max().item()) if arr.size else (0, 0)
    if arr.dtype.kind in "iu" and lo >= 0 and hi <= 65535:
        shift = max(0, int(hi).bit_length() - 8)
        arr8 = (arr.astype(np.uint32) >> shift).astype(np.uint8)
    else:
        arr = arr.astype(np.float64)
        lo, hi = float(lo), float(hi)
        if img.mode == "F" and lo >= 0.0 and hi <= 1.0:
            arr8 = np.round(arr * 255.0).astype(np.uint8)
        elif lo >= 0 and hi <= 255:
            arr8 = arr.astype(np.uint8)
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


class _ReadLimitError(OSError):
    """A file gave more bytes than an image of its kind needs (raised by :class:`_LimitedReader`)."""


class _LimitedReader:
    """A read-only binary file over ``f`` that gives at most ``limit`` bytes in all (counting every
    byte returned, re-reads included), then raises :class:`_ReadLimitError`. No ``fileno``, like the
    in-memory buffer PIL was given before, so PIL reads through it."""

    def __init__(self, f: Any, limit: int) -> None:
        self._f = f
        self.limit = limit
        self.given = 0

    def _take(self, data: bytes) -> bytes:
        self.given += len(data)
        if self.given > self.limit:
            raise _ReadLimitError(f"over {self.limit} bytes read")
        return data

    def _room(self, size: int | None) -> int:
        if self.given > self.limit:  # already over: PIL may catch the first error and read on
            raise _ReadLimitError(f"over {self.limit} bytes read")
        room = self.limit - self.given + 1  # one byte more than allowed: enough to know it is over
        return room if size is None or size < 0 else min(size, room)

    def read(self, size: int | None = -1) -> bytes:
        """Like ``io.BufferedReader.read``, within the limit."""
        return self._take(self._f.read(self._room(size)))

    def readline(self, size: int | None = -1) -> bytes:
        """Like ``io.BufferedReader.readline``, within the limit."""
        return self._take(self._f.readline(self._room(size)))

    def seek(self, offset: int, whence: int = 0) -> int:
        """Move in the file (free)."""
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        """The position in the file."""
        return self._f.tell()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True


def _raw_bytes(img: Image.Image) -> int:
    """The size of an image's pixels uncompressed (bytes)."""
    per_band = 4 if img.mode in ("I", "F") or img.mode.startswith(("I;32", "F;")) else 2 if img.mode.startswith("I;16") else 1
    return img.size[0] * img.size[1] * max(1, len(img.getbands())) * per_band


def _open_encoded(fp: Any, source: str, max_pixels: int | None) -> Image.Image:
    """Open (header only), check the size against ``max_pixels``, then decode. With a
    :class:`_LimitedReader`, the header must fit in :data:`HEADER_READ_LIMIT` bytes and the pixels in
    about twice their raw size."""
    limited = isinstance(fp, _LimitedReader)
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
    except _ReadLimitError:
        raise ImageDecodeError(
            source, f"not a readable image: its header runs past the first {HEADER_READ_LIMIT // 2**20} MiB (a damaged "
            "or hostile file); remove it or convert it to JPEG/PNG"
        ) from None
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
    if limited:
        fp.limit = fp.given + HEADER_READ_LIMIT + 2 * _raw_bytes(img)
    try:
        if getattr(img, "is_animated", False):
            img.seek(0)
        img.load()
    except _ReadLimitError:
        raise ImageDecodeError(
            source, f"holds far more data than a {width}x{height} {img.mode} image needs (over {fp.limit // 2**20} MiB "
            "read); re-export it or remove the file"
        ) from None
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
            f = open(path, "rb", buffering=_READ_AHEAD)  # noqa: SIM115 - closed below, after decoding
        except OSError as e:
            raise ImageDecodeError(source, f"cannot read ({e.strerror or e}); check its permissions", stage="read") from None
        with f:
            try:
                f.peek(1)  # fills the read-ahead here, not under the lock around Image.open
            except OSError as e:
                raise ImageDecodeError(source, f"cannot read ({e.strerror or e})", stage="read") from None
            return to_rgb(_open_encoded(_LimitedReader(f, HEADER_READ_LIMIT), source, max_pixels), keep_alpha=keep_alpha)
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

