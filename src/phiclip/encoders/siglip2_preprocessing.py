"""SigLIP 2 NaFlex preprocessing: ``Siglip2ImageProcessor``'s PIL path, exact and picklable.

NaFlex keeps an image's aspect ratio: the image is resized (PIL, the processor's filter) to the
largest size whose sides are multiples of the patch size with at most ``max_num_patches`` patches
(the processor's own binary search, :func:`size_for_max_num_patches`), rescaled and normalised (the
lookup table of :class:`~phiclip.encoders.clip_preprocessing.ImagePreprocessor`, the processor's
float arithmetic), and cut into a (patches, patch_size * patch_size * 3) array in the processor's
order. :meth:`NaFlexPreprocessor.collate` pads a batch to ``max_num_patches`` rows with zeros and
gives the patch attention mask (1 for real patches) and each image's (rows, columns) of patches:
``pixel_values``, ``pixel_attention_mask`` and ``spatial_shapes``, as the processor does, so that
images of different aspect ratios share one batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from phiclip.encoders.clip_preprocessing import _RESAMPLE_NAMES, ImagePreprocessor, _triple, processor_rgb

if TYPE_CHECKING:
    import torch


def size_for_max_num_patches(height: int, width: int, patch_size: int, max_num_patches: int,
                             eps: float = 1e-5) -> tuple[int, int]:
    """(height, width) NaFlex resizes an image to: sides multiples of ``patch_size`` (at least one
    patch), at most ``max_num_patches`` patches, the scale found by the same binary search (same
    float steps) as transformers' ``get_image_size_for_max_num_patches``."""

    def scaled(scale: float, size: int) -> int:
        return int(max(patch_size, math.ceil(size * scale / patch_size) * patch_size))

    low, high = eps / 10, 100.0
    while (high - low) >= eps:
        scale = (low + high) / 2
        patches = (scaled(scale, height) / patch_size) * (scaled(scale, width) / patch_size)
        if patches <= max_num_patches:
            low = scale
        else:
            high = scale
    return scaled(low, height), scaled(low, width)


@dataclass(frozen=True)
class NaFlexItem:
    """One preprocessed image: its patches (n, patch_size * patch_size * 3), float32, unpadded, and
    its (rows, columns) of patches."""

    patches: Any
    spatial_shape: tuple[int, int]


@dataclass(frozen=True)
class NaFlexPreprocessor:
    """``Siglip2ImageProcessor`` (PIL backend) reimplemented: ``__call__(image) -> NaFlexItem``,
    :meth:`collate` ``(items) -> dict`` of the model's three image inputs."""

    patch_size: int
    max_num_patches: int
    resample: int
    rescale_factor: float | None
    image_mean: tuple[float, float, float] | None
    image_std: tuple[float, float, float] | None
    do_resize: bool = True
    processor_class: str = "Siglip2ImageProcessorPil"
    _values: ImagePreprocessor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.patch_size < 1 or self.max_num_patches < 1:
            raise ValueError(f"patch_size {self.patch_size} and max_num_patches {self.max_num_patches} must be >= 1")
        object.__setattr__(self, "_values", ImagePreprocessor(
            resize_mode=None, resize_size=(), crop_size=None, resample=self.resample,
            rescale_factor=self.rescale_factor, image_mean=self.image_mean, image_std=self.image_std))

    @classmethod
    def from_image_processor(cls, processor: Any, max_num_patches: int | None = None) -> NaFlexPreprocessor:
        """Read a loaded ``Siglip2ImageProcessor(Pil)``'s settings (``max_num_patches`` in place of its own)."""
        resample = getattr(processor, "resample", None)
        return cls(
            patch_size=int(processor.patch_size),
            max_num_patches=int(max_num_patches or processor.max_num_patches),
            resample=2 if resample is None else int(resample),
            rescale_factor=float(processor.rescale_factor) if getattr(processor, "do_rescale", True) else None,
            image_mean=_triple(processor.image_mean, "image_mean") if getattr(processor, "do_normalize", True) else None,
            image_std=_triple(processor.image_std, "image_std") if getattr(processor, "do_normalize", True) else None,
            do_resize=bool(getattr(processor, "do_resize", True)),
            processor_class=type(processor).__name__,
        )

    def __call__(self, image: Image.Image) -> NaFlexItem:
        import torch

        if not isinstance(image, Image.Image):
            raise TypeError(
                f"preprocess takes a PIL image, got {type(image).__name__}; decode it with phiclip.images.load_image")
        image = processor_rgb(image)
        width, height = image.size
        if self.do_resize:
            new_h, new_w = size_for_max_num_patches(height, width, self.patch_size, self.max_num_patches)
            if (new_w, new_h) != (width, height):
                image = image.resize((new_w, new_h), resample=self.resample)
        pixels = self._values(image).numpy()  # (3, H, W) float32, the processor's values
        rows, cols = pixels.shape[1] // self.patch_size, pixels.shape[2] // self.patch_size
        if rows * cols > self.max_num_patches:  # only without resizing
            raise ValueError(f"image {width}x{height} makes {rows * cols} patches, over max_num_patches "
                             f"{self.max_num_patches}")
        p = self.patch_size
        patches = pixels[:, : rows * p, : cols * p].reshape(3, rows, p, cols, p).transpose(1, 3, 2, 4, 0)
        return NaFlexItem(torch.from_numpy(np.ascontiguousarray(patches.reshape(rows * cols, -1))), (rows, cols))

    def collate(self, items: list[NaFlexItem]) -> dict[str, torch.Tensor]:
        """Items -> ``pixel_values`` (n, max_num_patches, patch_size * patch_size * 3) zero-padded,
        ``pixel_attention_mask`` (n, max_num_patches) int32 and ``spatial_shapes`` (n, 2) int64."""
        import torch

        if not items:
            raise ValueError("collate got no items")
        dim = 3 * self.patch_size * self.patch_size
        values = torch.zeros(len(items), self.max_num_patches, dim, dtype=torch.float32)
        mask = torch.zeros(len(items), self.max_num_patches, dtype=torch.int32)
        for i, item in enumerate(items):
            n = item.patches.shape[0]
            values[i, :n] = item.patches
            mask[i, :n] = 1
        shapes = torch.tensor([item.spatial_shape for item in items], dtype=torch.int64)
        return {"pixel_values": values, "pixel_attention_mask": mask, "spatial_shapes": shapes}

    def describe(self) -> dict[str, Any]:
        """The settings, as plain JSON-able values."""
        return {
            "implementation": "phiclip (exact reimplementation of the SigLIP 2 NaFlex processor's PIL path)",
            "processor_class": self.processor_class,
            "convert_rgb": "alpha composited onto white, like transformers' convert_to_rgb",
            "resize": "aspect ratio kept, sides multiples of patch_size, at most max_num_patches patches"
            if self.do_resize else None,
            "patch_size": self.patch_size,
            "max_num_patches": self.max_num_patches,
            "resample": _RESAMPLE_NAMES.get(self.resample, str(self.resample)),
            "rescale_factor": self.rescale_factor,
            "mean": list(self.image_mean) if self.image_mean is not None else None,
            "std": list(self.image_std) if self.image_std is not None else None,
        }


__all__ = ["NaFlexItem", "NaFlexPreprocessor", "size_for_max_num_patches"]
