"""open_clip's inference transform (``image_transform_v2(cfg, is_train=False)``) without
torchvision, equal to it pixel for pixel on PIL images.

torchvision on a PIL image does (for the preprocess_cfg of a checkpoint):

* ``resize_mode="shortest"`` (default): ``Resize(size)``: the shorter side to ``size``, the longer
  ``int(size * long / short)`` (no resize when already that size), PIL ``resize`` with the filter;
  then ``CenterCrop(size)``: offsets ``int(round((h - size) / 2))`` (Python's round: half to even;
  transformers' CLIP processor floors instead), zero padding where the image is smaller;
* ``"longest"``: ``ResizeKeepRatio(size, longest=1)``: both sides ``round(side / ratio)`` with
  ``ratio = max(h / size, w / size)``; then ``CenterCropOrPad(size, fill=fill_color)``: pad with
  ``fill_color`` (left/top ``(size - side) // 2``), then the centre crop as above;
* ``"squash"``: ``Resize((size, size))``;
* then ``convert("RGB")`` (after the resize: transparency is dropped, not composited onto white),
  ``ToTensor`` (``uint8 / 255`` in float32) and ``Normalize`` (``(x - mean) / std`` in float32),
  the last two through a (3, 256) lookup table computed with the same float32 arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from phiclip.open_clip.config import PreprocessConfig

if TYPE_CHECKING:
    import torch

_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
#: A resize that would make more pixels than this is refused (an image of extreme aspect ratio).
MAX_RESIZED_PIXELS = 1 << 26


@dataclass(frozen=True)
class OpenCLIPPreprocessor:
    """``__call__(PIL image) -> (3, size, size) float32 tensor``, open_clip's transform exactly. Picklable."""

    config: PreprocessConfig
    lut: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        values = np.arange(256, dtype=np.float32) / np.float32(255)
        mean = np.asarray(self.config.mean, dtype=np.float32)
        std = np.asarray(self.config.std, dtype=np.float32)
        object.__setattr__(self, "lut", ((values[None, :] - mean[:, None]) / std[:, None]).astype(np.float32))

    @property
    def size(self) -> int:
        return self.config.size

    def output_size(self) -> tuple[int, int]:
        return self.size, self.size

    def _resize(self, image: Image.Image, new_h: int, new_w: int) -> Image.Image:
        if new_h * new_w > MAX_RESIZED_PIXELS:
            raise ValueError(f"image {image.size[0]}x{image.size[1]} would be resized to {new_w}x{new_h} "
                             f"(over {MAX_RESIZED_PIXELS} pixels); its aspect ratio is too extreme, crop it first")
        if (new_w, new_h) == image.size:
            return image
        return image.resize((new_w, new_h), _FILTERS[self.config.interpolation])

    def _center_crop(self, image: Image.Image, fill: int) -> Image.Image:
        size = self.size
        width, height = image.size
        if size > width or size > height:
            left, top = max(0, (size - width) // 2), max(0, (size - height) // 2)
            padded = Image.new(image.mode, (width + max(0, size - width), height + max(0, size - height)),
                               _fill_value(image, fill))
            padded.paste(image, (left, top))
            image = padded
            width, height = image.size
            if (width, height) == (size, size):
                return image
        top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
        return image.crop((left, top, left + size, top + size))

    def transform_pil(self, image: Image.Image) -> Image.Image:
        """The PIL steps (resize, crop or pad, RGB), before ``ToTensor``."""
        if not isinstance(image, Image.Image):
            raise TypeError(f"preprocess takes a PIL image, got {type(image).__name__}; "
                            "decode it with phiclip.images.load_image")
        size, mode = self.size, self.config.resize_mode
        width, height = image.size
        if mode == "squash":
            image = self._resize(image, size, size)
        elif mode == "longest":
            ratio = max(height / size, width / size)
            image = self._resize(image, round(height / ratio), round(width / ratio))
            image = self._center_crop(image, self.config.fill_color)
        else:
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = size, int(size * long / short)
            new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
            image = self._resize(image, new_h, new_w)
            image = self._center_crop(image, 0)
        return image.convert("RGB")

    def __call__(self, image: Image.Image) -> torch.Tensor:
        import torch

        pixels = np.asarray(self.transform_pil(image))
        out = np.empty((3, pixels.shape[0], pixels.shape[1]), dtype=np.float32)
        for c in range(3):
            np.take(self.lut[c], pixels[:, :, c], out=out[c])
        return torch.from_numpy(out)

    def describe(self) -> dict[str, Any]:
        c = self.config
        return {"implementation": "phiclip (exact reimplementation of open_clip's inference transform)",
                "size": c.size, "resize_mode": c.resize_mode, "interpolation": c.interpolation,
                "fill_color": c.fill_color, "mean": list(c.mean), "std": list(c.std),
                "convert_rgb": "after the resize, alpha dropped (open_clip's MaybeConvertMode)",
                "output_size": [c.size, c.size]}


def _fill_value(image: Image.Image, fill: int) -> Any:
    bands = len(image.getbands())
    return fill if bands == 1 else (fill,) * bands


__all__ = ["MAX_RESIZED_PIXELS", "OpenCLIPPreprocessor"]
