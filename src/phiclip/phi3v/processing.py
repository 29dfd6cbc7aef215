"""The Phi-3-vision HD image transform: size arithmetic (pure functions) and the pixel path.

Behaviour of the released processor (see ``docs/phi3v-image-path.md``), per image with
``num_crops = N``: transpose portraits, pick the largest ``scale`` with
``scale * ceil(scale / ratio) <= N``, resize to ``scale * 336`` wide with PIL bilinear, pad the
height with white to a multiple of 336 (centred), transpose back, normalise, then
``[global view (bicubic 336x336 of the normalised canvas), crop_1 .. crop_hw]``.

phiclip differs on purpose in three places only: ``num_crops`` must be an integer from 1 to
:data:`~phiclip.phi3v.config.MAX_NUM_CROPS` (64; the released models use 16 and 4), an image so
thin that its resized height would be 0 is kept 1 pixel tall, and an image whose HD canvas would
exceed the processor's ``max_pixels`` (the same budget as ``--max-pixels``) is refused before any
pixel is resized or allocated (:class:`CanvasTooLargeError`, one failed image, not a failed run).
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from phiclip.atomic import atomic_write_json
from phiclip.checkpoints import Checkpoint
from phiclip.hub import Location, resolve_file
from phiclip.images import DEFAULT_MAX_PIXELS, ImageInput, load_image
from phiclip.models.checkpoint import check_image_processor_values, load_json_file
from phiclip.phi3v.config import (
    CROP_SIZE,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    Phi3VImageProcessorConfig,
    check_num_crops,
    num_tokens_for_crop_grid,
)
from phiclip.phi3v.student import STUDENT_PROCESSOR_TYPE

#: The image processor's settings file.
PROCESSOR_FILE = "preprocessor_config.json"


def _check_num_crops(num_crops: int) -> None:
    check_num_crops(num_crops, "Phi3VImageProcessor", error=ValueError)


def normalization(image_mean: Sequence[float], image_std: Sequence[float]) -> tuple[tuple[float, ...], tuple[float, ...],
                                                                                  torch.Tensor, torch.Tensor]:
    """Checked per-channel mean and std: as tuples, and as ``(3, 1, 1)`` float32 tensors (float32 like
    the released code: ToTensor then Normalize in float32). ``ValueError`` unless 3 values each, std
    non-zero."""
    if len(image_mean) != 3 or len(image_std) != 3 or any(s == 0 for s in image_std):
        raise ValueError(f"image_mean and image_std need 3 values each (std non-zero), got {image_mean}, {image_std}")
    mean, std = tuple(float(m) for m in image_mean), tuple(float(s) for s in image_std)
    return mean, std, torch.tensor(mean, dtype=torch.float32).view(3, 1, 1), torch.tensor(std, dtype=torch.float32).view(3, 1, 1)


class CanvasTooLargeError(ValueError):
    """An image's HD canvas would hold more pixels than the processor's ``max_pixels`` allows."""


def check_canvas(width: int, height: int, num_crops: int, max_pixels: int | None) -> tuple[int, int]:
    """The HD canvas ``(H, W)`` of a ``width x height`` image, computed from the sizes alone;
    :class:`CanvasTooLargeError` when it holds more than ``max_pixels`` pixels (``None``: no limit).
    With ``num_crops <= MAX_NUM_CROPS`` a canvas never exceeds ``MAX_NUM_CROPS * 336 * 336`` pixels."""
    h, w = hd_size(width, height, num_crops)
    if max_pixels is not None and h * w > max_pixels:
        raise CanvasTooLargeError(
            f"image {width}x{height} at num_crops {num_crops} needs an HD canvas of {w}x{h} = {h * w} pixels, "
            f"over the pixel limit of {max_pixels} (max_pixels / --max-pixels); lower num_crops or raise the limit"
        )
    return h, w


def hd_scale(width: int, height: int, num_crops: int = 16) -> int:
    """Number of 336-px crops across the long side: the largest ``s`` with ``s * ceil(s / ratio) <= N``
    where ``ratio = long / short`` side."""
    _check_num_crops(num_crops)
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    long_side, short_side = max(width, height), min(width, height)
    ratio = long_side / short_side
    scale = 1
    while scale * math.ceil(scale / ratio) <= num_crops:
        scale += 1
    return scale - 1


def resized_size(width: int, height: int, num_crops: int = 16) -> tuple[int, int]:
    """The size ``(w, h)`` the image is resized to before padding (in its own orientation)."""
    scale = hd_scale(width, height, num_crops)
    long_side, short_side = max(width, height), min(width, height)
    new_long = scale * CROP_SIZE
    # int() truncates like the released code; at least 1 pixel (phiclip's fix for very thin images).
    new_short = max(1, int(new_long / (long_side / short_side)))
    return (new_long, new_short) if width >= height else (new_short, new_long)


def hd_size(width: int, height: int, num_crops: int = 16) -> tuple[int, int]:
    """The HD canvas size ``(H, W)`` (both multiples of 336) for an image of ``width x height``.

    This is the image's ``image_sizes`` entry, computed without touching pixels.
    """
    new_w, new_h = resized_size(width, height, num_crops)
    if width >= height:
        return math.ceil(new_h / CROP_SIZE) * CROP_SIZE, new_w
    return new_h, math.ceil(new_w / CROP_SIZE) * CROP_SIZE


def num_tokens_for_hd_size(hd_height: int, hd_width: int) -> int:
    """Image tokens for an HD canvas of ``hd_height x hd_width``: ``(h*w + 1) * 144 + 1 + (h + 1) * 12``."""
    return num_tokens_for_crop_grid(hd_height // CROP_SIZE, hd_width // CROP_SIZE)


def num_image_tokens(width: int, height: int, num_crops: int = 16) -> int:
    """Number of image tokens Phi-3-vision produces for an image of ``width x height`` pixels."""
    return num_tokens_for_hd_size(*hd_size(width, height, num_crops))


def num_crops_for_hd_size(hd_height: int, hd_width: int) -> int:
    """Real crops of an image (global view included): ``1 + h * w``."""
    return 1 + (hd_height // CROP_SIZE) * (hd_width // CROP_SIZE)


@dataclass
class Phi3VImageInputs:
    """The processor's output.

    Attributes:
        pixel_values: padded: ``(n, num_crops + 1, 3, 336, 336)`` float32, blank crops zero;
            unpadded: a list of ``(1 + h_i * w_i, 3, 336, 336)`` tensors (global view first).
        image_sizes: ``(n, 2)`` int64, the HD canvas ``[H, W]`` of each image.
        num_img_tokens: image tokens per image.
    """

    pixel_values: torch.Tensor | list[torch.Tensor]
    image_sizes: torch.Tensor
    num_img_tokens: list[int]

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def keys(self) -> list[str]:
        return ["pixel_values", "image_sizes", "num_img_tokens"]

    @property
    def num_crops_per_image(self) -> list[int]:
        """Real crops per image (``1 + h * w``)."""
        return [num_crops_for_hd_size(int(h), int(w)) for h, w in self.image_sizes.tolist()]


class Phi3VImageProcessor:
    """Phi-3-vision's image processor, exact to the released one, without its remote code.

    >>> proc = Phi3VImageProcessor(num_crops=16)
    >>> out = proc([image_a, "photo.jpg"])          # doctest: +SKIP
    >>> out.pixel_values.shape                      # doctest: +SKIP
    torch.Size([2, 17, 3, 336, 336])

    Accepts PIL images, ``HxWx3`` uint8 arrays, file paths and bytes (EXIF orientation applied,
    every mode converted to RGB).
    """

    def __init__(
        self,
        num_crops: int = 16,
        image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
        image_std: Sequence[float] = OPENAI_CLIP_STD,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        _check_num_crops(num_crops)
        self.num_crops = int(num_crops)
        self.image_mean, self.image_std, self._mean, self._std = normalization(image_mean, image_std)
        self.max_pixels = max_pixels
        # The normalised value of a white pixel, used for the padding band.
        self._white = (torch.ones(3, 1, 1) - self._mean) / self._std

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | Path | Location | Checkpoint,
                        **kwargs: Any) -> Phi3VImageProcessor | StudentImageProcessor:
        """Read ``preprocessor_config.json`` (num_crops, image_mean, image_std) from a local
        directory, a hub id or an opened checkpoint (:func:`phiclip.checkpoints.open_checkpoint`:
        then from its pinned commit); keyword arguments override what the file says. A student
        tower's file (:data:`~phiclip.phi3v.student.STUDENT_PROCESSOR_TYPE`) gives a
        :class:`StudentImageProcessor`."""
        if isinstance(path_or_hub_id, Checkpoint):
            path = path_or_hub_id.file(PROCESSOR_FILE, required=False)
        else:
            path = resolve_file(path_or_hub_id, PROCESSOR_FILE, required=False)
        data = None if path is None else load_json_file(path)
        if is_student_processor_config(data):
            return StudentImageProcessor.from_dict(data, source=path, **kwargs)  # type: ignore[arg-type]
        cfg = Phi3VImageProcessorConfig() if path is None else Phi3VImageProcessorConfig.from_dict(data, source=path)  # type: ignore[arg-type]
        args = {"num_crops": cfg.num_crops, "image_mean": cfg.image_mean, "image_std": cfg.image_std}
        args.update(kwargs)
        return cls(**args)

    def to_dict(self) -> dict[str, Any]:
        """Settings that decide the output (for manifests)."""
        return {
            "name": "phi3v_hd_transform",
            "num_crops": self.num_crops,
            "crop_size": CROP_SIZE,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "resize": "PIL bilinear (antialiased) to scale*336 on the long side, white padding to a multiple of 336",
            "global_view": "bicubic (align_corners=False, no antialias) of the normalised canvas to 336x336",
        }

    # --- the pixel path -----------------------------------------------------------------------
    def _resize(self, image: Image.Image) -> tuple[np.ndarray, int, int, bool]:
        """PIL part: ``(resized uint8 (new_h, new_w, 3) in landscape orientation, top padding,
        padded height, transposed?)``."""
        width, height = image.size
        transposed = width < height
        if transposed:
            # A flip over the main diagonal, as the released code does (resizing the transposed
            # image is not bit-identical to resizing the original with swapped sizes).
            image = image.transpose(Image.Transpose.TRANSPOSE)
            width, height = height, width
        new_w, new_h = resized_size(width, height, self.num_crops)
        resized = np.asarray(image.resize((new_w, new_h), Image.Resampling.BILINEAR), dtype=np.uint8)
        target_h = math.ceil(new_h / CROP_SIZE) * CROP_SIZE
        top = int((target_h - new_h) / 2)
        return resized, top, target_h, transposed

    def hd_canvas(self, image: Image.Image, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """One RGB image -> its normalised HD canvas ``(3, H, W)`` float32.

        ``buffer``: an optional 1-D float32 tensor to build the canvas in (reused across images
        to avoid allocating, and page-faulting in, tens of MB per image); used when large enough.
        """
        check_canvas(image.size[0], image.size[1], self.num_crops, self.max_pixels)  # before any allocation
        resized, top, target_h, transposed = self._resize(image)
        new_h, new_w = resized.shape[:2]
        numel = 3 * new_w * target_h
        storage = buffer[:numel] if buffer is not None and buffer.numel() >= numel else torch.empty(numel)
        if transposed:
            # Portrait: the canvas is the transposed landscape canvas; write it transposed directly.
            canvas = storage.view(3, new_w, target_h)  # (3, H, W)
            region = canvas[:, :, top : top + new_h]
            src_chw = resized.transpose(2, 1, 0)  # (3, new_w, new_h)
            canvas[:, :, :top] = self._white
            canvas[:, :, top + new_h :] = self._white
        else:
            canvas = storage.view(3, target_h, new_w)  # (3, H, W)
            region = canvas[:, top : top + new_h, :]
            src_chw = resized.transpose(2, 0, 1)  # (3, new_h, new_w)
            canvas[:, :top, :] = self._white
            canvas[:, top + new_h :, :] = self._white
        # uint8 -> float32 (numpy reads PIL's read-only buffer directly, one thread per image: images
        # are prepared on parallel threads), then in [0, 1] and normalised in place: ToTensor then
        # Normalize, the same float ops.
        np.copyto(region.numpy(), src_chw, casting="unsafe")
        region.div_(255.0).sub_(self._mean).div_(self._std)
        return canvas

    def crops_from_canvas(self, canvas: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``(3, H, W)`` canvas -> ``(1 + h*w, 3, 336, 336)``: global view, then crops row-major.
        Written into ``out`` when given (e.g. a slice of a padded batch), avoiding extra copies."""
        _, H, W = canvas.shape
        h, w = H // CROP_SIZE, W // CROP_SIZE
        if out is None:
            out = torch.empty(1 + h * w, 3, CROP_SIZE, CROP_SIZE)
        out[0] = F.interpolate(canvas[None], size=(CROP_SIZE, CROP_SIZE), mode="bicubic", align_corners=False)[0]
        # (3, h*336, w*336) -> (3, h, 336, w, 336) -> (h, w, 3, 336, 336), copied straight into the crops
        tiles = canvas.view(3, h, CROP_SIZE, w, CROP_SIZE).permute(1, 3, 0, 2, 4)
        out[1 : 1 + h * w].view(h, w, 3, CROP_SIZE, CROP_SIZE).copy_(tiles)
        return out

    def preprocess_image(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        """One RGB PIL image -> ``(crops (1 + h*w, 3, 336, 336), (H, W))``."""
        canvas = self.hd_canvas(image)
        return self.crops_from_canvas(canvas), (int(canvas.shape[1]), int(canvas.shape[2]))

    def __call__(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        padding: bool = True,
        return_tensors: str = "pt",
        num_threads: int | None = None,
    ) -> Phi3VImageInputs:
        """Preprocess one image or a list of images.

        Args:
            images: PIL images, ``HxWx3`` uint8 arrays, paths or bytes (or one of them).
            padding: ``True`` pads every image to ``num_crops + 1`` crops (the released format);
                ``False`` returns a list of per-image tensors with only their real crops.
            return_tensors: only ``"pt"`` is supported.
            num_threads: images decoded and resized in parallel (PIL releases the GIL);
                default: the number of CPUs, at most the number of images.
        """
        if return_tensors != "pt":
            raise ValueError(f"return_tensors={return_tensors!r} is not supported; use 'pt'")
        batch = list(images) if isinstance(images, (list, tuple)) else [images]
        if not batch:
            raise ValueError("no images given; pass a list with at least one image")

        results: list[tuple[torch.Tensor, tuple[int, int]] | None] = [None] * len(batch)
        out: torch.Tensor | None = None

        local = threading.local()  # one reused canvas buffer per thread, sized for its largest image

        def work(i: int) -> None:
            image = load_image(batch[i], max_pixels=self.max_pixels)
            h_c, w_c = check_canvas(image.size[0], image.size[1], self.num_crops, self.max_pixels)
            buffer = getattr(local, "buffer", None)
            if buffer is None or buffer.numel() < 3 * h_c * w_c:
                buffer = local.buffer = torch.empty(3 * h_c * w_c)
            canvas = self.hd_canvas(image, buffer)
            size = (int(canvas.shape[1]), int(canvas.shape[2]))
            if padding:
                target = out[i, : num_crops_for_hd_size(*size)]  # type: ignore[index]
                self.crops_from_canvas(canvas, target)
                out[i, target.shape[0] :].zero_()  # type: ignore[index]  # blank crops, as released
                results[i] = (target, size)
            else:
                results[i] = (self.crops_from_canvas(canvas), size)

        if padding:
            out = torch.empty(len(batch), self.num_crops + 1, 3, CROP_SIZE, CROP_SIZE)
        threads = min(len(batch), num_threads or os.cpu_count() or 1)
        if threads > 1:
            # Each thread takes the next image when it is free: sizes (and costs) vary a lot.
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(work, range(len(batch))))
        else:
            for i in range(len(batch)):
                work(i)
        sizes = [r[1] for r in results]  # type: ignore[index]
        image_sizes = torch.tensor(sizes, dtype=torch.int64)
        tokens = [num_tokens_for_hd_size(h, w) for h, w in sizes]
        if not padding:
            return Phi3VImageInputs(pixel_values=[r[0] for r in results], image_sizes=image_sizes, num_img_tokens=tokens)  # type: ignore[index]
        return Phi3VImageInputs(pixel_values=out, image_sizes=image_sizes, num_img_tokens=tokens)


# ==============================================================================================
# A student tower's processor (phiclip.phi3v.student)
# ==============================================================================================
class StudentImageProcessor:
    """The HD transform with crops of ``crop_size`` pixels (see the module docstring).

    ``preprocess_image(image) -> (crops (1 + h*w, 3, S, S), (H, W))`` with ``(H, W)`` the released
    canvas size in 336-px units (what ``image_sizes`` holds).
    """

    def __init__(self, crop_size: int, num_crops: int = 16, image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
                 image_std: Sequence[float] = OPENAI_CLIP_STD, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
        if int(crop_size) < 1:
            raise ValueError(f"crop_size must be positive, got {crop_size}")
        if not isinstance(num_crops, (int, np.integer)) or num_crops < 1:
            raise ValueError(f"num_crops must be an integer >= 1, got {num_crops!r}")
        self.crop_size = int(crop_size)
        self.num_crops = int(num_crops)
        self.image_mean, self.image_std, self._mean, self._std = normalization(image_mean, image_std)
        self.max_pixels = max_pixels

    # --- files ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """``preprocessor_config.json`` contents (also what decides the pixels, for manifests)."""
        return {
            "image_processor_type": STUDENT_PROCESSOR_TYPE,
            "processor_class": "Phi3VProcessor",
            "name": "phiclip_student_hd_transform",
            "crop_size": self.crop_size,
            "num_crops": self.num_crops,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "resize": f"PIL bilinear to the released size times {self.crop_size}/{CROP_SIZE}, white padding to whole crops",
            "global_view": f"bicubic (align_corners=False) of the normalised canvas to {self.crop_size}x{self.crop_size}",
        }

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``preprocessor_config.json``."""
        return atomic_write_json(Path(directory) / PROCESSOR_FILE, self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | Path = PROCESSOR_FILE, **kwargs: Any) -> StudentImageProcessor:
        """From ``preprocessor_config.json`` contents (``source`` names the file in errors);
        keyword arguments override them."""
        check_image_processor_values(d, source)
        args = {"crop_size": d.get("crop_size"), "num_crops": d.get("num_crops", 16),
                "image_mean": d.get("image_mean", OPENAI_CLIP_MEAN), "image_std": d.get("image_std", OPENAI_CLIP_STD)}
        if args["crop_size"] is None:
            raise ValueError("a student preprocessor_config.json needs crop_size (the student's input size)")
        args.update(kwargs)
        return cls(**args)

    # --- pixels -----------------------------------------------------------------------------
    def canvas(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        """One RGB image -> ``(normalised canvas (3, h*S, w*S), (H, W) in 336-px units)``."""
        width, height = image.size
        H, W = hd_size(width, height, self.num_crops)  # the released canvas: decides h and w
        h, w = H // CROP_SIZE, W // CROP_SIZE
        s = self.crop_size
        if self.max_pixels is not None and h * s * w * s > self.max_pixels:
            raise ValueError(f"image {width}x{height} needs a {w * s}x{h * s} canvas, over the pixel limit of {self.max_pixels}")
        rw, rh = resized_size(width, height, self.num_crops)  # the released resize, in 336-px units
        new_w = min(w * s, max(1, round(rw * s / CROP_SIZE)))
        new_h = min(h * s, max(1, round(rh * s / CROP_SIZE)))
        resized = np.asarray(image.convert("RGB").resize((new_w, new_h), Image.Resampling.BILINEAR), dtype=np.uint8)
        canvas = torch.ones(3, h * s, w * s)
        top, left = int((h * s - new_h) / 2), int((w * s - new_w) / 2)  # centred white padding, as released
        canvas[:, top : top + new_h, left : left + new_w] = torch.from_numpy(resized.transpose(2, 0, 1).copy()).float() / 255.0
        return (canvas - self._mean) / self._std, (H, W)

    def crops_from_canvas(self, canvas: torch.Tensor) -> torch.Tensor:
        """``(3, h*S, w*S)`` -> ``(1 + h*w, 3, S, S)``: global view, then the crops row-major."""
        s = self.crop_size
        _, ch, cw = canvas.shape
        h, w = ch // s, cw // s
        glb = F.interpolate(canvas[None], size=(s, s), mode="bicubic", align_corners=False)  # (1, 3, S, S)
        # (3, h*S, w*S) -> (3, h, S, w, S) -> (h, w, 3, S, S) -> (h*w, 3, S, S)
        tiles = canvas.view(3, h, s, w, s).permute(1, 3, 0, 2, 4).reshape(h * w, 3, s, s)
        return torch.cat([glb, tiles], dim=0)

    def preprocess_image(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        """One RGB PIL image -> ``(crops (1 + h*w, 3, S, S), (H, W))``."""
        canvas, size = self.canvas(image)
        return self.crops_from_canvas(canvas), size

    def __call__(self, images: ImageInput | Sequence[ImageInput], *, padding: bool = True,
                 return_tensors: str = "pt") -> Phi3VImageInputs:
        """Like :class:`~phiclip.phi3v.processing.Phi3VImageProcessor`: padded ``(n, N + 1, 3, S, S)``
        pixel values (or a list without ``padding``), ``image_sizes`` in 336-px units, token counts."""
        if return_tensors != "pt":
            raise ValueError(f"return_tensors={return_tensors!r} is not supported; use 'pt'")
        batch = list(images) if isinstance(images, (list, tuple)) else [images]
        if not batch:
            raise ValueError("no images given; pass a list with at least one image")
        results = [self.preprocess_image(load_image(im, max_pixels=self.max_pixels)) for im in batch]
        sizes = torch.tensor([r[1] for r in results], dtype=torch.int64)
        tokens = [num_tokens_for_hd_size(h, w) for h, w in sizes.tolist()]
        if not padding:
            return Phi3VImageInputs(pixel_values=[r[0] for r in results], image_sizes=sizes, num_img_tokens=tokens)
        s = self.crop_size
        out = torch.zeros(len(batch), self.num_crops + 1, 3, s, s)
        for i, (crops, _) in enumerate(results):
            out[i, : crops.shape[0]] = crops
        return Phi3VImageInputs(pixel_values=out, image_sizes=sizes, num_img_tokens=tokens)


def is_student_processor_config(d: Any) -> bool:
    """Whether a ``preprocessor_config.json``'s contents describe a student's processor."""
    return isinstance(d, dict) and d.get("image_processor_type") == STUDENT_PROCESSOR_TYPE
