"""DINOv3 preprocessing: ``DINOv3ViTImageProcessor``'s steps, without torchvision.

DINOv2 checkpoints use ``BitImageProcessor`` (shorter side to 256, bicubic, centre crop 224,
ImageNet mean/std), whose PIL path :class:`~phiclip.encoders.clip_preprocessing.ImagePreprocessor`
reproduces exactly. DINOv3's image processor exists only as a torchvision processor in transformers
(torchvision is not a dependency of phiclip), and it orders its steps differently: **rescale to
float first, then resize** (bilinear with antialiasing, on the float image), then centre crop (when
set) and normalise. :class:`Dinov3Preprocessor` does the same steps with the same torch operations
that torchvision's tensor resize calls (``torch.nn.functional.interpolate`` with
``align_corners=False, antialias=True``), so the values are the processor's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from phiclip.encoders.clip_preprocessing import MAX_RESIZED_PIXELS, processor_rgb, shortest_edge_size

if TYPE_CHECKING:
    import torch

#: PIL filter numbers -> torch interpolation modes (as transformers maps them for torchvision).
_TORCH_MODES = {0: "nearest-exact", 2: "bilinear", 3: "bicubic"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Dinov3Preprocessor:
    """``DINOv3ViTImageProcessor`` reimplemented with torch: ``__call__(image) -> (3, H, W)`` float32."""

    resize_mode: str | None  # "fixed" | "shortest_edge" | None
    resize_size: tuple[int, ...]
    crop_size: tuple[int, int] | None
    resample: int
    rescale_factor: float | None
    image_mean: tuple[float, float, float] | None
    image_std: tuple[float, float, float] | None
    processor_class: str = "DINOv3ViTImageProcessor"

    def __post_init__(self) -> None:
        if self.resize_mode is not None and self.resample not in _TORCH_MODES:
            raise ValueError(f"resample {self.resample} is not one DINOv3's torch resize runs "
                             f"({', '.join(f'{k} ({v})' for k, v in _TORCH_MODES.items())})")

    @classmethod
    def from_config(cls, data: dict[str, Any]) -> Dinov3Preprocessor:
        """From the image processor settings (``preprocessor_config.json``, checked by
        :meth:`phiclip.checkpoints.Checkpoint.image_processor_config`), with the processor's defaults:
        224 x 224, bilinear, rescale 1/255, ImageNet mean/std, no crop."""

        def size_of(value: Any) -> tuple[str | None, tuple[int, ...]]:
            if isinstance(value, int):
                return "fixed", (value, value)
            if isinstance(value, dict) and value.get("height") and value.get("width"):
                return "fixed", (int(value["height"]), int(value["width"]))
            if isinstance(value, dict) and value.get("shortest_edge") and not value.get("longest_edge"):
                return "shortest_edge", (int(value["shortest_edge"]),)
            raise ValueError(f"image processor size {value!r} is not height/width or shortest_edge")

        mode, size = size_of(data.get("size") or {"height": 224, "width": 224})
        if data.get("do_resize") is False:
            mode, size = None, ()
        crop = None
        if data.get("do_center_crop"):
            crop_mode, crop_size = size_of(data.get("crop_size") or {"height": 224, "width": 224})
            if crop_mode != "fixed":
                raise ValueError(f"image processor crop_size {data.get('crop_size')!r} is not height/width")
            crop = (crop_size[0], crop_size[1])
        normalize = data.get("do_normalize", True) is not False
        mean = tuple(float(v) for v in (data.get("image_mean") or IMAGENET_MEAN))
        std = tuple(float(v) for v in (data.get("image_std") or IMAGENET_STD))
        return cls(
            resize_mode=mode, resize_size=size, crop_size=crop,
            resample=int(data["resample"]) if data.get("resample") is not None else 2,
            rescale_factor=float(data.get("rescale_factor") or 1 / 255) if data.get("do_rescale", True) is not False
            else None,
            image_mean=mean if normalize else None,  # type: ignore[arg-type]
            image_std=std if normalize else None,  # type: ignore[arg-type]
            processor_class=str(data.get("image_processor_type") or "DINOv3ViTImageProcessor"),
        )

    def output_size(self) -> tuple[int, int] | None:
        if self.crop_size is not None:
            return self.crop_size
        return (self.resize_size[0], self.resize_size[1]) if self.resize_mode == "fixed" else None

    def __call__(self, image: Image.Image) -> torch.Tensor:
        import torch

        if not isinstance(image, Image.Image):
            raise TypeError(
                f"preprocess takes a PIL image, got {type(image).__name__}; decode it with phiclip.images.load_image")
        image = processor_rgb(image)
        x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)  # (3, H, W) uint8
        if self.rescale_factor is not None:
            x = x * self.rescale_factor  # float32, as the processor rescales before resizing
        else:
            x = x.float()
        height, width = int(x.shape[1]), int(x.shape[2])
        if self.resize_mode is not None:
            if self.resize_mode == "fixed":
                new_h, new_w = self.resize_size[0], self.resize_size[1]
            else:
                new_h, new_w = shortest_edge_size(height, width, self.resize_size[0])
            if new_h * new_w > MAX_RESIZED_PIXELS:
                raise ValueError(f"image {width}x{height} would be resized to {new_w}x{new_h} (over "
                                 f"{MAX_RESIZED_PIXELS} pixels); its aspect ratio is too extreme, crop it first")
            if (new_h, new_w) != (height, width):
                mode = _TORCH_MODES[self.resample]
                kwargs: dict[str, Any] = {} if mode == "nearest-exact" else {"align_corners": False, "antialias": True}
                x = torch.nn.functional.interpolate(x[None], size=(new_h, new_w), mode=mode, **kwargs)[0]
            height, width = new_h, new_w
        if self.crop_size is not None:
            crop_h, crop_w = self.crop_size
            if crop_h > height or crop_w > width:  # zero padding, as the processor's centre crop pads
                pad_t, pad_l = max(0, (crop_h - height) // 2), max(0, (crop_w - width) // 2)
                padded = x.new_zeros(3, max(height, crop_h), max(width, crop_w))
                padded[:, pad_t:pad_t + height, pad_l:pad_l + width] = x
                x, height, width = padded, padded.shape[1], padded.shape[2]
            top, left = int((height - crop_h) / 2.0), int((width - crop_w) / 2.0)
            x = x[:, top:top + crop_h, left:left + crop_w]
        if self.image_mean is not None and self.image_std is not None:
            mean = torch.tensor(self.image_mean, dtype=x.dtype).view(-1, 1, 1)
            std = torch.tensor(self.image_std, dtype=x.dtype).view(-1, 1, 1)
            x = (x - mean) / std
        return x.contiguous()

    def describe(self) -> dict[str, Any]:
        """The settings, as plain JSON-able values."""
        resize: dict[str, int] | None = None
        if self.resize_mode == "fixed":
            resize = {"height": self.resize_size[0], "width": self.resize_size[1]}
        elif self.resize_mode == "shortest_edge":
            resize = {"shortest_edge": self.resize_size[0]}
        return {
            "implementation": "phiclip (DINOv3ViTImageProcessor's steps with torch: rescale, antialiased resize, "
                              "crop, normalise)",
            "processor_class": self.processor_class,
            "convert_rgb": "alpha composited onto white, like transformers' convert_to_rgb",
            "resize": resize,
            "resample": _TORCH_MODES.get(self.resample),
            "crop": None if self.crop_size is None else {"height": self.crop_size[0], "width": self.crop_size[1]},
            "rescale_factor": self.rescale_factor,
            "mean": list(self.image_mean) if self.image_mean is not None else None,
            "std": list(self.image_std) if self.image_std is not None else None,
            "output_size": list(self.output_size() or []) or None,
        }


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Dinov3Preprocessor"]
