"""CLIP and SigLIP encoders through transformers, with an exact and fast image preprocessing.

Both load a checkpoint saved by ``save_pretrained`` (a hub id or a local directory) with
``CLIPModel`` / ``SiglipModel`` from safetensors only, the checkpoint's own image processor
settings (read from its ``processor_config.json`` / ``preprocessor_config.json``) and its tokenizer.

Image vectors are what ``model.get_image_features`` gives for what the checkpoint's image processor
(the PIL backend) gives, L2-normalised unless ``normalize=false``. Only the vision tower and its
projection run for images. The preprocessing is :class:`ImagePreprocessor`, a reimplementation of
the processor's PIL path (same PIL resize, same crop, rescale and normalisation through a lookup
table computed with the processor's own float arithmetic, so the values are identical) that is
about 1.5x faster (the PIL resize it shares with the processor is most of what is left) and
picklable, for worker processes. Settings it does not cover (for example
``longest_edge`` or padding) make the encoder use the transformers processor itself.

Checkpoints are data, never code: before transformers reads a folder, phiclip checks its
``config.json`` (a ``model_type`` it knows, no ``auto_map``, sizes of the right type and range) and
its ``model.safetensors.index.json`` (plain shard names inside the folder), and every transformers
call passes ``trust_remote_code=False``. A hub id is pinned to the commit whose ``config.json`` was
checked. ``describe()["weights_fingerprint"]`` fingerprints every tensor of the safetensors files
loaded.

Spec options (``clip:DIR?normalize=false&max_batch=64``): :class:`~phiclip.encoders.options.ContrastiveOptions`.
Where the checkpoint comes from (a folder or the hub) follows :mod:`phiclip.hub`'s one rule.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from PIL import Image

from phiclip.cpu import accelerate
from phiclip.encoders.base import EncodedBatch, Encoder, EncoderDescription, count_parameters, dtype_name
from phiclip.encoders.device import Placement
from phiclip.encoders.options import ContrastiveOptions
from phiclip.encoders.spec import EncoderSpec
from phiclip.hub import (
    CheckpointError,
    Location,
    hub_kwargs_for_transformers,
    resolve_file,
    resolve_location,
    snapshot_commit,
)
from phiclip.images import has_alpha
from phiclip.models.checkpoint import (
    INDEX_FILE,
    check_field,
    fingerprint_files,
    fingerprint_module,
    load_json_file,
    read_index,
    weight_files,
)
from phiclip.models.ops import l2_normalize

if TYPE_CHECKING:
    import torch

    from phiclip.cpu.runtimes import CompiledImagePath

#: A shortest-edge resize that would make more pixels than this is refused (an image of extreme
#: aspect ratio, e.g. 1 x 2000, becomes 224 x 448000 before the crop).
MAX_RESIZED_PIXELS = 1 << 26

# PIL resampling filter numbers (PIL.Image.Resampling) and their names, for describe().
_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}

# Image processors whose PIL path ImagePreprocessor reproduces (given supported settings): the
# transformers 5 "...Pil" classes, and the transformers 4 classes of the same base name.
_FAST_PATH_PROCESSORS = {"CLIPImageProcessor", "SiglipImageProcessor"}


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


# --------------------------------------------------------------------------------------------------
# Checking a checkpoint before transformers reads it
# --------------------------------------------------------------------------------------------------


def _location(spec: EncoderSpec) -> Location:
    """The spec's location by the one local-or-hub rule (:func:`phiclip.hub.resolve_location`); a
    local directory must hold a ``config.json``."""
    try:
        loc = resolve_location(spec.location)
    except CheckpointError as e:
        raise CheckpointError(f"encoder spec {str(spec)!r}: {e}") from None
    if loc.path is not None and not (loc.path / "config.json").is_file():
        raise CheckpointError(
            f"encoder spec {str(spec)!r}: directory {str(loc.path)!r} has no config.json; give a directory "
            "saved with save_pretrained (config.json, model.safetensors, processor files) or a hub id"
        )
    return loc


def check_location(spec: EncoderSpec) -> str:
    """A local directory (checked to hold a ``config.json``) or a hub id, as ``from_pretrained`` takes it.

    Raises:
        CheckpointError: for a path that does not exist, a file, or a directory without ``config.json``.
    """
    return str(_location(spec))


#: ``model_type`` values phiclip loads, and the spec kind that loads each. Anything else (or no
#: model_type) is refused before transformers reads the folder: an unknown type is how a checkpoint
#: asks transformers to import its own code.
KNOWN_MODEL_TYPES: dict[str, str] = {"clip": "clip:", "siglip": "siglip:", "phi3_v": "phi3v:"}

# Integer sizes checked in config.json (top level, vision_config and text_config) before transformers
# builds anything from them.
_POSITIVE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "patch_size", "image_size", "max_position_embeddings", "vocab_size", "num_channels")


@dataclass(frozen=True)
class CheckedCheckpoint:
    """What :func:`check_checkpoint` found: the ``config.json`` it read and, for a hub id, the
    commit it came from (every later file is loaded from that commit)."""

    config_path: Path
    config: dict[str, Any]
    revision: str | None

    @property
    def hub_kwargs(self) -> dict[str, Any]:
        """``{"revision": commit}`` for a hub id, ``{}`` for a local directory."""
        return {"revision": self.revision} if self.revision else {}


def wrong_type_message(spec: EncoderSpec, kind: str, expected: str, found: str) -> str:
    """The error for a checkpoint of another known model type, with the spec that loads it."""
    suggestion = KNOWN_MODEL_TYPES.get(found)
    hint = f"; use '{suggestion}{spec.location}'" if suggestion else f"; the '{kind}:' kind loads {expected} models"
    return f"encoder spec {str(spec)!r}: the checkpoint is a {found!r} model, not {expected!r}{hint}"


def check_checkpoint(spec: EncoderSpec, location: str | Location, expected_model_type: str | None = None) -> CheckedCheckpoint:
    """Check a transformers checkpoint as data before transformers reads it.

    ``config.json`` must be a JSON object with a ``model_type`` phiclip knows
    (:data:`KNOWN_MODEL_TYPES`; ``expected_model_type`` when given, else a ``ValueError`` naming the
    spec that loads it) and no ``auto_map``; its sizes (top level, ``vision_config``,
    ``text_config``) positive integers, heads dividing widths; ``model.safetensors.index.json``,
    when present, must name plain shard files inside the checkpoint.

    Raises:
        CheckpointError: naming the file and the field or entry.
    """
    loc = location if isinstance(location, Location) else resolve_location(location)
    try:
        config_path = resolve_file(loc, "config.json")
    except CheckpointError as e:
        raise CheckpointError(f"encoder spec {str(spec)!r}: {e}") from None
    assert config_path is not None
    revision = None if loc.is_local else snapshot_commit(config_path)
    data = load_json_file(config_path, "the checkpoint's config is damaged")
    check_field(data, "(the whole file)", config_path, kind="dict")
    model_type = data.get("model_type")
    if not isinstance(model_type, str) or model_type not in KNOWN_MODEL_TYPES:
        raise CheckpointError(
            f"{config_path}: model_type {model_type!r} is not one phiclip loads ({', '.join(KNOWN_MODEL_TYPES)}); "
            "phiclip never runs code from a checkpoint, so custom model types are refused"
        )
    if expected_model_type is not None and model_type != expected_model_type:
        raise ValueError(wrong_type_message(spec, spec.kind, expected_model_type, model_type))
    if "auto_map" in data:
        raise CheckpointError(
            f"{config_path}: auto_map {data['auto_map']!r:.200} names code in the checkpoint for transformers to import; "
            "phiclip never runs code from a checkpoint, so this checkpoint is refused "
            "(remove auto_map if the model is a standard one)"
        )
    for prefix, part in (("", data), ("vision_config.", data.get("vision_config")), ("text_config.", data.get("text_config"))):
        if part is None:
            continue
        check_field(part, prefix.rstrip(".") or "(the whole file)", config_path, kind="dict")
        for key in _POSITIVE_FIELDS:
            if key in part and part[key] is not None:
                check_field(part[key], prefix + key, config_path, minimum=1)
        if isinstance(part.get("hidden_size"), int) and isinstance(part.get("num_attention_heads"), int):
            if part["hidden_size"] % part["num_attention_heads"]:
                raise CheckpointError(
                    f"{config_path}: {prefix}hidden_size {part['hidden_size']} is not divisible by "
                    f"{prefix}num_attention_heads {part['num_attention_heads']}"
                )
    if "projection_dim" in data and data["projection_dim"] is not None:
        check_field(data["projection_dim"], "projection_dim", config_path, minimum=1)
    hub = {"revision": revision} if revision else {}
    index = resolve_file(loc, INDEX_FILE, required=False, **hub)
    if index is not None:
        read_index(index)  # shard names: plain files inside the checkpoint, or a CheckpointError naming the entry
    return CheckedCheckpoint(config_path=config_path, config=data, revision=revision)


def _load_error(spec: EncoderSpec, what: str, error: BaseException) -> ValueError:
    location = spec.location
    local = Path(location).expanduser().exists()
    reason = " ".join(str(error).split())
    if len(reason) > 400:
        reason = reason[:400] + "..."
    hint = (
        "check that the directory is a complete save_pretrained checkpoint"
        if local
        else f"{location!r} is not a local directory, so it was looked up as a hub id: give a local directory, "
        "or check the hub id and the network (HF_HUB_OFFLINE=1 uses only the cache)"
    )
    return ValueError(f"encoder spec {str(spec)!r}: could not load the {what} from {location!r} ({reason}); {hint}")


def _dtype_kwarg(dtype: Any) -> dict[str, Any]:
    """``from_pretrained``'s dtype argument: ``dtype`` in transformers 5, ``torch_dtype`` before."""
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"dtype": dtype} if major >= 5 else {"torch_dtype": dtype}


def _pil_backend_kwarg() -> dict[str, Any]:
    """Ask for the PIL image processor (the reference ImagePreprocessor reproduces)."""
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"backend": "pil"} if major >= 5 else {"use_fast": False}


def _pooled(output: Any) -> torch.Tensor:
    """``get_*_features`` returns a tensor (transformers 4) or a ModelOutput whose ``pooler_output``
    is the projected vector (transformers 5)."""
    import torch

    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if pooled is None:
        raise TypeError(f"get_*_features returned {type(output).__name__} without pooler_output")
    return pooled


# --------------------------------------------------------------------------------------------------
# Encoders
# --------------------------------------------------------------------------------------------------


class _ContrastiveEncoder(Encoder):
    """What CLIP and SigLIP share: a transformers dual encoder with an image processor and tokenizer."""

    kind: ClassVar[str]
    model_type: ClassVar[str]  # config.model_type the checkpoint must have
    model_class_name: ClassVar[str]  # transformers class that loads it
    keeps_alpha = True  # the processors composite transparency onto white (processor_rgb)
    text_padding: ClassVar[str]  # "longest" (CLIP) or "max_length" (SigLIP pools the last position)

    def __init__(
        self,
        spec: EncoderSpec,
        model: Any,
        preprocessor: ImagePreprocessor | ProcessorPreprocessor,
        tokenizer: Any | None,
        *,
        placement: Placement,
        options: ContrastiveOptions | None = None,
        text_unavailable: str | None = None,
        weights_fingerprint: str | None = None,
    ) -> None:
        options = options or ContrastiveOptions()
        self.spec = spec
        self.name = str(spec)
        self.model = model
        self.preprocessor = preprocessor
        self.tokenizer = tokenizer
        self.options = options
        self.device = placement.device
        self.dtype = placement.dtype
        self.normalize = options.normalize
        self.max_batch = options.max_batch
        self.text_unavailable = text_unavailable
        self.dim = self._image_dim(model.config)
        self.modalities = frozenset({"image", "text"} if tokenizer is not None else {"image"})
        self.text_max_length = self._text_max_length()
        self.weights_fingerprint: str = weights_fingerprint or fingerprint_module(model)
        # What runs the image side, and why (phiclip.cpu.accelerate): a compiled runtime (OpenVINO / ONNX
        # Runtime), or phiclip's image path where it reproduces the model exactly (CLIP; fast=true), in
        # int8 or 16-bit on the CPU, else transformers' get_image_features.
        path = accelerate(
            model, precision=placement.precision, record=placement.record(), device_type=self.device.type,
            image_features=self._fast_image_features if options.fast else None, runtime=options.runtime,
            calibration=options.calibration, calibration_images=options.calibration_images,
            fingerprint=self.weights_fingerprint, image_size=int(model.config.vision_config.image_size),
            preprocess=self.preprocess, preprocess_key=json.dumps(self.preprocessor.describe(), sort_keys=True, default=str),
            keep_alpha=self.keeps_alpha, name=str(spec))
        self.compiled: CompiledImagePath | None = path.compiled
        self.image_features: Any = path.image_features
        self.precision = path.record

    def share_model_weights_(self) -> None:
        """Make the image path read ``self.model``'s own weights again, dropping a packed inference
        copy (the fused CPU tower, a 16-bit copy): call before training ``self.model``, so that the
        trained weights show in ``encode_images`` and no second copy of the image tower is held.
        A compiled runtime (``runtime=``) or an int8 image path cannot follow training: refused."""
        if self.compiled is not None or self.precision.get("dtype") == "int8":
            raise ValueError(f"{self.name}: the image path is compiled or quantised ({self.precision.get('dtype')}, "
                             f"runtime {self.precision.get('runtime', {}).get('runtime', 'torch')}); load it at "
                             "float32 with runtime=torch to train it")
        if self.image_features is not None:
            self.image_features = self._fast_image_features()
            self.precision["cpu_kernels"] = "torch"

    # --- loading ------------------------------------------------------------------------------
    @classmethod
    def build(cls, spec: EncoderSpec, options: ContrastiveOptions, placement: Placement) -> _ContrastiveEncoder:
        """Load the checkpoint a spec names (``kind:hub-id-or-directory[?options]``): the builder of
        the registry (:func:`phiclip.encoders.load_encoder`). The weights stay float32; 16-bit
        precisions run under autocast; int8 quantises the image side (:mod:`phiclip.cpu.int8`).

        Raises:
            ValueError: a missing or incomplete directory, an unreachable hub id, or a checkpoint of
                another model type.
        """
        if spec.kind != cls.kind:
            raise ValueError(f"encoder spec {str(spec)!r} is not a {cls.kind}: spec")
        loc = _location(spec)
        checked = check_checkpoint(spec, loc, cls.model_type)  # before transformers reads anything
        # Imported once the checkpoint passed its checks (seconds of import time a bad location need not pay).
        import torch
        import transformers
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

        location = str(loc)
        # A hub id: the commit whose config.json was checked, and only the cache while the hub is unreachable.
        no_code = {"trust_remote_code": False, **hub_kwargs_for_transformers(loc, checked.revision)}

        try:
            config = AutoConfig.from_pretrained(location, **no_code)
        except (OSError, ValueError) as e:
            raise _load_error(spec, "config", e) from None
        if config.model_type != cls.model_type:
            raise ValueError(cls._wrong_type_message(spec, config.model_type))
        cls._check_config(spec, config)

        try:
            image_processor = AutoImageProcessor.from_pretrained(location, **no_code, **_pil_backend_kwarg())
        except (OSError, ValueError) as e:
            raise _load_error(spec, "image processor (preprocessor_config.json / processor_config.json)", e) from None
        fast = ImagePreprocessor.from_image_processor(image_processor)
        preprocessor: ImagePreprocessor | ProcessorPreprocessor = fast or ProcessorPreprocessor(image_processor)

        image_size = int(config.vision_config.image_size)
        out_size = preprocessor.output_size()
        if out_size is not None and out_size != (image_size, image_size):
            raise ValueError(
                f"encoder spec {str(spec)!r}: the image processor makes {out_size[0]}x{out_size[1]} images "
                f"but the vision model takes {image_size}x{image_size}; fix crop_size/size in the "
                "checkpoint's processor config"
            )

        tokenizer = None
        text_unavailable = None
        try:
            tokenizer = AutoTokenizer.from_pretrained(location, **no_code)
        except Exception as e:  # noqa: BLE001 - any failure leaves an image-only encoder, said loudly
            text_unavailable = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
            if cls.kind == "siglip":
                text_unavailable += " (SigLIP's sentencepiece tokenizer needs `pip install sentencepiece protobuf`)"
            warnings.warn(
                f"{spec}: no tokenizer could be loaded, so this encoder embeds images only ({text_unavailable})",
                stacklevel=2,
            )

        model_class = getattr(transformers, cls.model_class_name)
        try:
            model = model_class.from_pretrained(location, use_safetensors=True, **no_code, **_dtype_kwarg(torch.float32))
        except OSError as e:
            if "safetensors" in str(e).lower() or ".bin" in str(e):
                raise ValueError(
                    f"encoder spec {str(spec)!r}: no safetensors weights (model.safetensors) at {location!r}; "
                    "phiclip loads weights only from safetensors: re-save the checkpoint with "
                    "save_pretrained(..., safe_serialization=True)"
                ) from None
            raise _load_error(spec, "model weights", e) from None
        except Exception as e:  # noqa: BLE001 - corrupt files surface as many error types
            raise _load_error(spec, "model weights", e) from None
        # Every tensor of the files just loaded (streamed, page-cache warm): text and image towers.
        fingerprint = fingerprint_files(weight_files(loc, checked.revision))
        model = model.to(placement.device).eval()
        return cls(spec, model, preprocessor, tokenizer, placement=placement, options=options,
                   text_unavailable=text_unavailable, weights_fingerprint=fingerprint)

    @classmethod
    def _wrong_type_message(cls, spec: EncoderSpec, model_type: str) -> str:
        return wrong_type_message(spec, cls.kind, cls.model_type, model_type)

    @staticmethod
    def _image_dim(config: Any) -> int:
        raise NotImplementedError

    def _fast_image_features(self) -> Any:
        """A faster module equal to ``get_image_features``, or ``None`` (the default: none)."""
        return None

    @classmethod
    def _check_config(cls, spec: EncoderSpec, config: Any) -> None:
        """Refuse configurations the encoder cannot embed with (none for CLIP)."""

    def _text_max_length(self) -> int | None:
        if self.tokenizer is None:
            return None
        positions = int(self.model.config.text_config.max_position_embeddings)
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(tok_max, int) and 0 < tok_max < positions:
            return tok_max
        return positions

    # --- the three steps ----------------------------------------------------------------------
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """One PIL image -> (3, H, W) float32 pixel values (no model access; see ``preprocessor``
        for a picklable callable to hand to worker processes)."""
        return self.preprocessor(image)

    def collate(self, items: Sequence[torch.Tensor]) -> torch.Tensor:
        """(3, H, W) tensors -> one (n, 3, H, W) batch."""
        import torch

        if not items:
            raise ValueError("collate got no items")
        shapes = {tuple(t.shape) for t in items}
        if len(shapes) != 1:
            raise ValueError(f"cannot batch pixel values of different shapes: {sorted(shapes)}")
        return torch.stack(list(items))

    def _autocast(self) -> Any:
        import contextlib

        import torch

        if self.dtype in (torch.float32, torch.int8):  # int8: its image path sets its own dtypes; text in float32
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def _finish(self, features: torch.Tensor) -> np.ndarray:
        features = features.float()
        if self.normalize:
            features = l2_normalize(features)
        return features.cpu().numpy()


    def encode_batch(self, batch: torch.Tensor, *, with_tokens: bool = False) -> EncodedBatch:
        """(n, 3, H, W) pixel values -> (n, dim) float32 vectors (vision tower + projection only)."""
        import torch

        if with_tokens:
            raise ValueError(f"{self.name}: {self.kind} encoders give one pooled vector per image; "
                             "image tokens are a phi3v option")
        if not isinstance(batch, torch.Tensor) or batch.ndim != 4 or batch.shape[1] != 3:
            shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
            raise ValueError(f"{self.name}: encode_batch takes (n, 3, H, W) pixel values, got {shape}")
        if batch.shape[0] == 0:
            return EncodedBatch(embeddings=np.zeros((0, self.dim), dtype=np.float32))
        out = []
        step = self.max_batch
        with torch.inference_mode(), self._autocast():
            for start in range(0, batch.shape[0], step):
                pixels = batch[start : start + step].to(self.device, non_blocking=True)
                if self.compiled is not None:
                    out.append(self._finish(self.compiled(pixels)))
                elif self.image_features is not None:
                    out.append(self._finish(self.image_features(pixels)))
                else:
                    out.append(self._finish(_pooled(self.model.get_image_features(pixel_values=pixels))))
        return EncodedBatch(embeddings=np.concatenate(out, axis=0))

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Texts -> (n, dim) float32 vectors from ``get_text_features`` with the checkpoint's tokenizer
        (truncated to the model's maximum length)."""
        import torch

        if self.tokenizer is None:
            raise ValueError(f"{self.name}: this checkpoint's tokenizer could not be loaded, so it cannot "
                             f"embed text ({self.text_unavailable})")
        if isinstance(texts, str):
            raise ValueError(f"{self.name}: encode_texts takes a list of texts, got one string; wrap it in a list")
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise ValueError(f"{self.name}: encode_texts takes strings; item {bad[0]} is {type(texts[bad[0]]).__name__}")
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = []
        step = max(1, min(batch_size, self.max_batch))
        with torch.inference_mode(), self._autocast():
            for start in range(0, len(texts), step):
                chunk = list(texts[start : start + step])
                enc = self.tokenizer(
                    chunk,
                    padding=self.text_padding,
                    truncation=True,
                    max_length=self.text_max_length,
                    return_tensors="pt",
                )
                inputs = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
                out.append(self._finish(_pooled(self.model.get_text_features(**inputs))))
        return np.concatenate(out, axis=0)

    # --- description --------------------------------------------------------------------------
    def _image_modules(self) -> tuple[Any, ...]:
        """The modules that turn pixels into the image vector."""
        raise NotImplementedError

    def description(self) -> EncoderDescription:
        """The common fields, and in ``details``: model class and type, stored weights dtype, image
        path, sizes, text settings, the whole model's parameter count and transformers' version."""
        import transformers

        return self.described(
            parameters=count_parameters(*self._image_modules()),
            preprocessing=self.preprocessor.describe(),
            options=self.options.to_dict(),
            details={
                "model_class": type(self.model).__name__,
                "model_type": self.model.config.model_type,
                "weights_dtype": dtype_name(next(self.model.parameters()).dtype),
                "image_path": "phiclip CLIPImageFeatures" if self.image_features is not None else "transformers get_image_features",
                "image_size": int(self.model.config.vision_config.image_size),
                "patch_size": int(self.model.config.vision_config.patch_size),
                "text": None
                if self.tokenizer is None
                else {
                    "tokenizer_class": type(self.tokenizer).__name__,
                    "padding": self.text_padding,
                    "max_length": self.text_max_length,
                    "truncation": True,
                },
                "text_unavailable": self.text_unavailable,
                "total_parameters": count_parameters(self.model),
                "transformers_version": transformers.__version__,
            },
        )


class CLIPEncoder(_ContrastiveEncoder):
    """OpenAI-style CLIP (``CLIPModel``): images through ``vision_model`` + ``visual_projection``,
    texts through ``text_model`` + ``text_projection``, padded to the longest text."""

    kind = "clip"
    model_type = "clip"
    model_class_name = "CLIPModel"
    text_padding = "longest"

    @staticmethod
    def _image_dim(config: Any) -> int:
        return int(config.projection_dim)

    def _image_modules(self) -> tuple[Any, ...]:
        return (self.model.vision_model, self.model.visual_projection)

    def _fast_image_features(self) -> Any:
        from phiclip.models.clip_vision import CLIPImageFeatures  # lazy: imports torch

        return CLIPImageFeatures.from_clip_model(self.model)


class SigLIPEncoder(_ContrastiveEncoder):
    """SigLIP (``SiglipModel``): images through ``vision_model`` (its attention-pooling head is the
    output), texts padded to the maximum length (the text tower pools the last position)."""

    kind = "siglip"
    model_type = "siglip"
    model_class_name = "SiglipModel"
    text_padding = "max_length"

    @staticmethod
    def _image_dim(config: Any) -> int:
        return int(config.vision_config.hidden_size)

    @classmethod
    def _check_config(cls, spec: EncoderSpec, config: Any) -> None:
        if getattr(config.vision_config, "vision_use_head", True) is False:
            raise ValueError(
                f"encoder spec {str(spec)!r}: the vision model has no pooling head (vision_use_head=false), "
                "so it gives no image vector; use a SigLIP checkpoint with its head"
            )

    def _image_modules(self) -> tuple[Any, ...]:
        return (self.model.vision_model,)


__all__: list[str] = [
    "KNOWN_MODEL_TYPES",
    "CLIPEncoder",
    "CheckedCheckpoint",
    "ImagePreprocessor",
    "ProcessorPreprocessor",
    "SigLIPEncoder",
    "check_checkpoint",
    "check_location",
    "processor_rgb",
    "shortest_edge_size",
    "wrong_type_message",
]
