"""CLIP and SigLIP image preprocessing: the checkpoint's image processor (PIL backend), exact and fast.

:class:`ImagePreprocessor` reimplements the PIL path of transformers' ``CLIPImageProcessor`` /
``SiglipImageProcessor`` (same PIL resize, same crop, rescale and normalisation through a lookup
table computed with the processor's own float arithmetic, so the values are identical); it is about
1.5x faster (the PIL resize it shares with the processor is most of what is left) and picklable, for
worker processes. Settings it does not cover (for example ``longest_edge`` or padding) use the
transformers processor itself (:class:`ProcessorPreprocessor`).

The processor's values are checked when the checkpoint is opened
(:meth:`phiclip.checkpoints.Checkpoint.image_processor_config`). Torch is imported only when
pixels are made.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from phiclip.images import has_alpha

if TYPE_CHECKING:
    import torch

#: A shortest-edge resize that would make more pixels than this is refused (an image of extreme
#: aspect ratio, e.g. 1 x 2000, becomes 224 x 448000 before the crop).
MAX_RESIZED_PIXELS = 1 << 26

# PIL resampling filter numbers (PIL.Image.Resampling) and their names, for describe().
_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}

# Image processors whose PIL path ImagePreprocessor reproduces (given supported settings): the
# transformers 5 "...Pil" classes, and the transformers 4 classes of the same base name.
_FAST_PATH_PROCESSORS = {"CLIPImageProcessor", "SiglipImageProcessor", "BitImageProcessor"}


# --------------------------------------------------------------------------------------------------
# Image preprocessing
# --------------------------------------------------------------------------------------------------


def processor_rgb(image: Image.Image) -> Image.Image:
    """Make an image RGB the way transformers' image processors do (``convert_to_rgb``): images with
    alpha (an alpha band or a transparency key) are composited onto white, others ``convert("RGB")``.
    """
    if image.mode == "RGB":
        return image
    if has_alpha(image):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def shortest_edge_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """(height, width) after resizing the shorter side to ``shortest_edge``, the longer side scaled
    and truncated to an int, as transformers' ``get_resize_output_image_size`` computes it."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shortest_edge, int(shortest_edge * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def _size_value(size: Any, key: str) -> Any:
    """``size[key]`` for a transformers ``SizeDict`` or a plain dict (None when absent)."""
    if size is None:
        return None
    if isinstance(size, int):
        return None
    return size.get(key)


def _triple(value: Any, what: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    values = tuple(float(v) for v in value)
    if len(values) != 3:
        raise ValueError(f"image processor {what} has {len(values)} values; RGB needs 3")
    return values  # type: ignore[return-value]


@dataclass(frozen=True)
class ImagePreprocessor:
    """The PIL path of a CLIP / SigLIP image processor, reimplemented exactly and picklable.

    Steps (each as the transformers PIL backend does it): RGB conversion (alpha onto white), resize
    (``shortest_edge``: shorter side to that size; ``fixed``: to ``resize_size``) with PIL's
    ``resample`` filter, centre crop to ``crop_size`` (zero padding where the image is smaller),
    then ``(uint8 * rescale_factor - mean) / std`` in float32, which depends only on the channel and
    the byte, so it is applied through a (3, 256) lookup table computed with the same arithmetic.

    ``__call__(image) -> torch.Tensor`` of shape (3, H, W), float32.
    """

    resize_mode: str | None  # "shortest_edge" | "fixed" | None (no resize)
    resize_size: tuple[int, ...]  # (shortest_edge,) or (height, width); () without resize
    crop_size: tuple[int, int] | None  # (height, width) or None (no crop)
    resample: int  # PIL.Image.Resampling value
    rescale_factor: float | None  # None: no rescale
    image_mean: tuple[float, float, float] | None  # None: no normalisation
    image_std: tuple[float, float, float] | None
    processor_class: str = ""
    lut: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.resize_mode not in ("shortest_edge", "fixed", None):
            raise ValueError(f"resize_mode {self.resize_mode!r} is not shortest_edge, fixed or None")
        object.__setattr__(self, "lut", self._lookup_table())

    def _lookup_table(self) -> np.ndarray:
        """(3, 256) float32: the processor's output value for each channel and byte value."""
        values = np.arange(256, dtype=np.uint8)
        lut = np.empty((3, 256), dtype=np.float32)
        for c in range(3):
            x: np.ndarray = values
            if self.rescale_factor is not None:
                # transformers' rescale: upcast to float64, multiply, downcast to float32.
                x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
            if self.image_mean is not None and self.image_std is not None:
                # transformers' normalize: float32 (x - mean) / std with float32 mean and std.
                x = x.astype(np.float32, copy=False)
                mean = np.array(self.image_mean, dtype=np.float32)[c]
                std = np.array(self.image_std, dtype=np.float32)[c]
                x = (x - mean) / std
            lut[c] = x
        return lut

    @classmethod
    def from_image_processor(cls, processor: Any) -> ImagePreprocessor | None:
        """Read a loaded transformers image processor's settings; None when this class cannot
        reproduce them (another processor class, ``longest_edge``, ``max_height``, padding, ...)."""
        name = type(processor).__name__
        base_name = name[: -len("Pil")] if name.endswith("Pil") else name
        if base_name not in _FAST_PATH_PROCESSORS:
            return None  # another processor, or a torchvision one ("...Fast" in transformers 4)
        if getattr(processor, "backend", "pil") != "pil":
            return None  # the torchvision backend of transformers 5 resizes differently
        if getattr(processor, "do_pad", None):
            return None
        resize_mode: str | None = None
        resize_size: tuple[int, ...] = ()
        if getattr(processor, "do_resize", False):
            size = processor.size
            if isinstance(size, int):
                # An int size only reaches here from old configs; transformers turns it into a dict.
                return None
            if any(_size_value(size, k) for k in ("longest_edge", "max_height", "max_width", "min_pixels", "max_pixels")):
                return None
            if _size_value(size, "shortest_edge"):
                resize_mode, resize_size = "shortest_edge", (int(size.get("shortest_edge")),)
            elif _size_value(size, "height") and _size_value(size, "width"):
                resize_mode, resize_size = "fixed", (int(size.get("height")), int(size.get("width")))
            else:
                return None
        crop_size = None
        if getattr(processor, "do_center_crop", False):
            crop = processor.crop_size
            if not (_size_value(crop, "height") and _size_value(crop, "width")):
                return None
            crop_size = (int(crop.get("height")), int(crop.get("width")))
        resample = getattr(processor, "resample", None)
        resample = 2 if resample is None else resample  # the backend's default: bilinear
        try:
            resample = int(resample)
        except (TypeError, ValueError):  # e.g. a torchvision InterpolationMode
            return None
        if resample not in _RESAMPLE_NAMES:
            return None
        rescale = float(processor.rescale_factor) if getattr(processor, "do_rescale", False) else None
        if getattr(processor, "do_normalize", False):
            mean, std = _triple(processor.image_mean, "image_mean"), _triple(processor.image_std, "image_std")
        else:
            mean = std = None
        return cls(
            resize_mode=resize_mode,
            resize_size=resize_size,
            crop_size=crop_size,
            resample=resample,
            rescale_factor=rescale,
            image_mean=mean,
            image_std=std,
            processor_class=name,
        )

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the resize step."""
        if self.resize_mode == "shortest_edge":
            return shortest_edge_size(height, width, self.resize_size[0])
        if self.resize_mode == "fixed":
            return self.resize_size[0], self.resize_size[1]
        return height, width

    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of every output, or None when it depends on the input size."""
        if self.crop_size is not None:
            return self.crop_size
        if self.resize_mode == "fixed":
            return self.resize_size[0], self.resize_size[1]
        return None

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """One PIL image -> (3, H, W) float32 tensor, equal to the processor's ``pixel_values[0]``."""
        import torch

        if not isinstance(image, Image.Image):
            raise TypeError(
                f"preprocess takes a PIL image, got {type(image).__name__}; decode it with phiclip.images.load_image"
            )
        image = processor_rgb(image)
        width, height = image.size
        if self.resize_mode is not None:
            new_h, new_w = self.resized_size(height, width)
            if new_h * new_w > MAX_RESIZED_PIXELS:
                if self.crop_size is None:
                    raise ValueError(
                        f"image {width}x{height} would be resized to {new_w}x{new_h} "
                        f"(over {MAX_RESIZED_PIXELS} pixels); its aspect ratio is too extreme, crop it first"
                    )
                image = self._resize_crop_region(image, new_h, new_w)
                width, height = image.size
                new_h, new_w = height, width
            if (new_w, new_h) != (width, height):
                image = image.resize((new_w, new_h), resample=self.resample)
            width, height = new_w, new_h
        if self.crop_size is not None:
            crop_h, crop_w = self.crop_size
            top, left = (height - crop_h) // 2, (width - crop_w) // 2
            if (top, left, crop_h, crop_w) != (0, 0, height, width):
                # PIL fills the part of the box outside the image with zeros, at the same offsets
                # as transformers' center_crop pads (top = -pad when the image is smaller).
                image = image.crop((left, top, left + crop_w, top + crop_h))
        pixels = np.asarray(image)  # (H, W, 3) uint8
        out = np.empty((3, pixels.shape[0], pixels.shape[1]), dtype=np.float32)
        for c in range(3):
            np.take(self.lut[c], pixels[:, :, c], out=out[c])
        return torch.from_numpy(out)

    def _resize_crop_region(self, image: Image.Image, new_h: int, new_w: int) -> Image.Image:
        """For extreme aspect ratios (e.g. 1 x 20000), resize only the part of the image that the
        centre crop keeps, with PIL's ``box`` argument, instead of materialising a resized image of
        billions of pixels. Same filter scale and sample positions as the full resize; values can
        differ from it by float rounding only."""
        assert self.crop_size is not None
        crop_h, crop_w = self.crop_size
        width, height = image.size
        top, left = max(0, (new_h - crop_h) // 2), max(0, (new_w - crop_w) // 2)
        out_h, out_w = min(crop_h, new_h), min(crop_w, new_w)
        sx, sy = width / new_w, height / new_h
        box = (left * sx, top * sy, (left + out_w) * sx, (top + out_h) * sy)
        return image.resize((out_w, out_h), resample=self.resample, box=box)

    def describe(self) -> dict[str, Any]:
        """The settings, as plain JSON-able values."""
        if self.resize_mode == "shortest_edge":
            resize: dict[str, int] | None = {"shortest_edge": self.resize_size[0]}
        elif self.resize_mode == "fixed":
            resize = {"height": self.resize_size[0], "width": self.resize_size[1]}
        else:
            resize = None
        return {
            "implementation": "phiclip (exact reimplementation of the processor's PIL path)",
            "processor_class": self.processor_class,
            "convert_rgb": "alpha composited onto white, like transformers' convert_to_rgb",
            "resize": resize,
            "resample": _RESAMPLE_NAMES[self.resample],
            "crop": None if self.crop_size is None else {"height": self.crop_size[0], "width": self.crop_size[1]},
            "rescale_factor": self.rescale_factor,
            "mean": list(self.image_mean) if self.image_mean is not None else None,
            "std": list(self.image_std) if self.image_std is not None else None,
            "output_size": list(self.output_size() or []) or None,
        }


class ProcessorPreprocessor:
    """The checkpoint's transformers image processor itself, for settings that
    :class:`ImagePreprocessor` does not reproduce. Picklable; slower."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """One PIL image -> (3, H, W) float32 tensor (the processor's ``pixel_values[0]``)."""
        pixel_values = self.processor(images=[image], return_tensors="pt")["pixel_values"]
        return pixel_values[0].float()

    def output_size(self) -> tuple[int, int] | None:
        """Unknown in general."""
        return None

    def describe(self) -> dict[str, Any]:
        """The processor's own settings (its ``to_dict()``)."""
        settings = {k: v for k, v in self.processor.to_dict().items() if not k.startswith("_")}
        return {"implementation": "transformers image processor", "processor_class": type(self.processor).__name__,
                "settings": _jsonable(settings)}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "__iter__") and hasattr(value, "get"):  # SizeDict
        return {k: v for k, v in value}
    return str(value)


def pil_backend_kwarg() -> dict[str, Any]:
    """Ask for the PIL image processor (the reference ImagePreprocessor reproduces)."""
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"backend": "pil"} if major >= 5 else {"use_fast": False}


__all__ = [
    "MAX_RESIZED_PIXELS",
    "ImagePreprocessor",
    "ProcessorPreprocessor",
    "pil_backend_kwarg",
    "processor_rgb",
    "shortest_edge_size",
]
