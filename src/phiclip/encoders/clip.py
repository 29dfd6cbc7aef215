"""CLIP and SigLIP encoders through transformers.

Both load a checkpoint saved by ``save_pretrained`` (a hub id or a local directory) with
``CLIPModel`` / ``SiglipModel`` from safetensors only, the checkpoint's own image processor
settings (read from its ``processor_config.json`` / ``preprocessor_config.json``) and its tokenizer.

Image vectors are what ``model.get_image_features`` gives for what the checkpoint's image processor
(the PIL backend) gives, L2-normalised unless ``normalize=false``. Only the vision tower and its
projection run for images. The preprocessing is :mod:`phiclip.encoders.clip_preprocessing`.

Checkpoints are data, never code: the checkpoint is opened the one way
(:func:`phiclip.checkpoints.open_checkpoint`: located once, a hub id pinned to the commit whose
``config.json`` was checked, ``config.json`` vetted as data: a ``model_type`` the kind table knows,
no ``auto_map``, sizes of the right type and range; the index's shard names; the image processor's
values) before transformers reads it, and every transformers call passes ``trust_remote_code=False``
and that commit. ``describe()["weights_fingerprint"]`` fingerprints every tensor of the safetensors
files loaded; ``describe()["details"]["revision"]`` is the commit.

Spec options (``clip:DIR?normalize=false&max_batch=64``): :class:`~phiclip.encoders.options.ContrastiveOptions`.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from PIL import Image

from phiclip.checkpoints import open_checkpoint
from phiclip.cpu import accelerate
from phiclip.encoders.base import (
    EncodedBatch,
    Encoder,
    EncoderDescription,
    check_texts,
    count_parameters,
    dtype_name,
)
from phiclip.encoders.clip_preprocessing import (
    ImagePreprocessor,
    ProcessorPreprocessor,
    pil_backend_kwarg,
)
from phiclip.encoders.device import Placement
from phiclip.encoders.options import ContrastiveOptions
from phiclip.encoders.spec import EncoderSpec
from phiclip.encoders.text_side import TextSideRunner, tokenizer_call
from phiclip.models.checkpoint import LazyFingerprint, fingerprint_module
from phiclip.models.ops import l2_normalize

if TYPE_CHECKING:
    import torch

    from phiclip.checkpoints import Checkpoint
    from phiclip.cpu.runtimes import CompiledImagePath

def open_transformers_checkpoint(spec: EncoderSpec, kind: str) -> tuple[Checkpoint, str, dict[str, Any], Any]:
    """Open ``spec``'s checkpoint for a kind that transformers builds: located, pinned and vetted (config.json,
    index, image processor values) before transformers reads anything, then its config read with no code from the
    checkpoint (a hub id at the checked commit, from the cache alone while the hub is unreachable).

    Returns:
        ``(checkpoint, location, no_code, config)``: ``no_code`` are the keyword arguments every later
        ``from_pretrained`` of this checkpoint takes.

    Raises:
        ValueError: ``spec`` is of another kind, or the checkpoint or its config cannot be read (naming which).
    """
    if spec.kind != kind:
        raise ValueError(f"encoder spec {str(spec)!r} is not a {kind}: spec")
    checkpoint = open_checkpoint(spec.location, kind=kind)
    checkpoint.image_processor_config()
    # Imported once the checkpoint passed its checks (seconds of import time a bad location need not pay).
    from transformers import AutoConfig

    location = str(checkpoint.location)
    no_code = checkpoint.transformers_kwargs()
    try:
        config = AutoConfig.from_pretrained(location, **no_code)
    except (OSError, ValueError) as e:
        raise _load_error(spec, "config", e) from None
    return checkpoint, location, no_code, config


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
    #: The checkpoint loaded (:func:`phiclip.checkpoints.open_checkpoint`: where, at which commit), set by
    #: :meth:`build`; None for an encoder built around a model in memory.
    checkpoint: Checkpoint | None = None

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
        weights_fingerprint: str | LazyFingerprint | None = None,
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
        # A checkpoint's fingerprint may still be hashing (LazyFingerprint): read only where it is used.
        self.weights_fingerprint = weights_fingerprint or fingerprint_module(model)
        # What runs the image side, and why (phiclip.cpu.accelerate): a compiled runtime (OpenVINO / ONNX
        # Runtime), or phiclip's image path where it reproduces the model exactly (CLIP; fast=true), in
        # int8 or 16-bit on the CPU, else transformers' get_image_features.
        path = accelerate(
            model, precision=placement.precision, record=placement.record(), device_type=self.device.type,
            image_features=self._fast_image_features if options.fast else None, runtime=options.runtime,
            calibration=options.calibration, calibration_images=options.calibration_images,
            fingerprint=self._weights_fingerprint, image_size=int(model.config.vision_config.image_size),
            preprocess=self.preprocess, preprocess_key=json.dumps(self.preprocessor.describe(), sort_keys=True, default=str),
            keep_alpha=self.keeps_alpha, name=str(spec))
        self.compiled: CompiledImagePath | None = path.compiled
        self.image_features: Any = path.image_features
        self.precision = path.record
        # What runs the text tower: decided on its first use (phiclip.encoders.text_side).
        self.text_side = None if tokenizer is None else TextSideRunner(
            model, precision=placement.precision, runtime=options.runtime, fingerprint=self._weights_fingerprint,
            device_type=self.device.type, record=self.precision,
            tokenize=tokenizer_call(tokenizer, self.text_padding, self.text_max_length))

    def share_model_weights_(self) -> None:
        """Make the image path read ``self.model``'s own weights again, dropping a packed inference
        copy (the fused CPU tower, a 16-bit copy): call before training ``self.model``, so that the
        trained weights show in ``encode_images`` and no second copy of the image tower is held.
        A compiled runtime (``runtime=``) or an int8 image path cannot follow training: refused."""
        # The fingerprint names the weights as loaded: taken before training changes them in place.
        _ = self.weights_fingerprint
        if self.compiled is not None or self.precision.get("dtype") == "int8":
            raise ValueError(f"{self.name}: the image path is compiled or quantised ({self.precision.get('dtype')}, "
                             f"runtime {self.precision.get('runtime', {}).get('runtime', 'torch')}); load it at "
                             "float32 with runtime=torch to train it")
        if self.image_features is not None:
            self.image_features = self._fast_image_features()
            self.precision["cpu_kernels"] = "torch"
        if self.text_side is not None and self.text_side.runtime != "torch":  # torch's text tower follows training
            self.text_side = TextSideRunner(self.model, precision=self.text_side.precision, runtime="torch",
                                            fingerprint=self.weights_fingerprint, device_type=self.device.type,
                                            record=self.precision, tokenize=self.text_side.tokenize)

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
        checkpoint, location, no_code, config = open_transformers_checkpoint(spec, cls.kind)
        import torch
        import transformers
        from transformers import AutoImageProcessor, AutoTokenizer

        cls._check_config(spec, config)

        try:
            image_processor = AutoImageProcessor.from_pretrained(location, **no_code, **pil_backend_kwarg())
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
        # Every tensor of the files just loaded (streamed, page-cache warm): text and image towers, hashed
        # in the background; the encoder waits for it where its fingerprint is first read.
        fingerprint = checkpoint.hash_weight_files_in_background()
        model = model.to(placement.device).eval()
        encoder = cls(spec, model, preprocessor, tokenizer, placement=placement, options=options,
                      text_unavailable=text_unavailable, weights_fingerprint=fingerprint)
        encoder.checkpoint = checkpoint
        return encoder

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
        check_texts(self.name, texts)
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = []
        step = max(1, min(batch_size, self.max_batch))
        with torch.inference_mode(), self._autocast():
            for start in range(0, len(texts), step):
                enc = self.text_side.tokenize(list(texts[start : start + step]))
                inputs = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
                out.append(self._finish(self.text_side(inputs, lambda x: _pooled(self.model.get_text_features(**x)))))
        return np.concatenate(out, axis=0)

    # --- description --------------------------------------------------------------------------
    def _image_modules(self) -> tuple[Any, ...]:
        """The modules that turn pixels into the image vector."""
        raise NotImplementedError

    def description(self) -> EncoderDescription:
        """The common fields, and in ``details``: model class and type, stored weights dtype, image
        path, sizes, text settings, the whole model's parameter count, transformers' version and the
        commit the checkpoint was loaded at (None: a local folder)."""
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
                "revision": self.checkpoint.revision if self.checkpoint is not None else None,
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
    "CLIPEncoder",
    "SigLIPEncoder",
]
