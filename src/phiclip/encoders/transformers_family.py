"""What the SigLIP 2, MetaCLIP 2, AIMv2 and DINO encoders share: a transformers model loaded from a
vetted checkpoint, the family's own preprocessing, batching, and (where the family has one) a text side.

:class:`FamilyEncoder` loads the way the CLIP encoder does: the checkpoint opened the one way
(:func:`phiclip.checkpoints.open_checkpoint`: located once, a hub id pinned to the commit whose
``config.json`` was checked, ``config.json`` vetted as data against the kind table, the image
processor's values checked), then transformers reads it with ``trust_remote_code=False`` at that
commit, weights from safetensors only, in float32; ``describe()["weights_fingerprint"]``
fingerprints every tensor of the weight files. On the CPU the image side is shaped once by
:func:`phiclip.cpu.accelerate` (the one call the CLIP / SigLIP / Phi-3-vision encoders make too):
``bfloat16`` / ``float16`` turn the image tower's weights 16-bit in place (under autocast, which
would otherwise convert every float32 weight again on every call); ``int8`` quantises the image
tower's products in place (dynamic int8 from the float32 weights loaded, the rest in the int8
plan's float precision); a text side keeps its float32 weights (under autocast for 16-bit, plain
float32 for int8). What runs is recorded in ``describe()["precision"]``. Each family's
module says which transformers class loads which ``model_type``, how images are preprocessed
(equal to the family's image processor) and what the image (and text) vector is.

Image-only families say so the way the :class:`~phiclip.encoders.base.Encoder` contract does:
``modalities`` is ``{"image"}`` and ``encode_texts`` is the contract's default, a
``NotImplementedError`` naming the kind (commands check ``modalities`` first and say the same).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from PIL import Image

from phiclip.cpu import accelerate
from phiclip.cpu.calibration import DEFAULT_CALIBRATION_IMAGES
from phiclip.encoders.base import (
    EncodedBatch,
    Encoder,
    EncoderDescription,
    check_texts,
    count_parameters,
    dtype_name,
)
from phiclip.encoders.clip import _dtype_kwarg, _load_error, _pooled, open_transformers_checkpoint
from phiclip.encoders.clip_preprocessing import ImagePreprocessor, ProcessorPreprocessor, pil_backend_kwarg
from phiclip.encoders.device import Placement
from phiclip.encoders.family_options import FamilyOptions
from phiclip.encoders.spec import EncoderSpec
from phiclip.encoders.text_side import TextSideRunner, tokenizer_call
from phiclip.models.checkpoint import LazyFingerprint, fingerprint_with
from phiclip.models.ops import l2_normalize

if TYPE_CHECKING:
    import torch

    from phiclip.checkpoints import Checkpoint


class FamilyEncoder(Encoder):
    """A transformers image (and text) encoder of one family; subclasses fill in the hooks."""

    kind: ClassVar[str]
    #: ``model_type`` -> the transformers class that loads it.
    model_classes: ClassVar[dict[str, str]]
    #: The tokenizer's padding for texts (``"max_length"``: SigLIP 2's processor; ``"longest"``).
    text_padding: ClassVar[str] = "longest"
    keeps_alpha = True  # the processors composite transparency onto white (processor_rgb)
    checkpoint: Checkpoint | None = None

    def __init__(self, spec: EncoderSpec, model: Any, preprocessor: Any, tokenizer: Any | None, *,
                 placement: Placement, options: FamilyOptions, weights_fingerprint: str | LazyFingerprint | None = None,
                 text_unavailable: str | None = None) -> None:
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
        self.modalities = frozenset({"image", "text"} if tokenizer is not None else {"image"})
        self.dim = self._image_dim()
        self.text_max_length = self._text_max_length()
        self.weights_fingerprint = weights_fingerprint
        #: What ``encode_batch`` runs for a model call (None: :meth:`_image_features`): a module with the
        #: inputs and outputs of :meth:`image_module`.
        self.image_path: Any = None
        # Counted before acceleration (an int8 product holds its weight as a buffer).
        self._parameter_counts = (count_parameters(*self._image_modules()), count_parameters(self.model))
        # The CPU speed of the image side, the one way (phiclip.cpu.accelerate): the image tower's own
        # modules in place (int8 products, or 16-bit weights); the text tower is never among them.
        # A fixed-shape image path may instead be compiled (runtime=: OpenVINO / ONNX Runtime) from the
        # float32 weights; the cache entry is named by the weights and the options that change the vector.
        size = self._fixed_image_size()
        key = fingerprint_with(weights_fingerprint, f"|{self.kind}|{self._output_key()}")
        path = accelerate(model, precision=placement.precision, record=placement.record(),
                          device_type=self.device.type, tower=self._image_modules(), name=str(spec),
                          runtime=getattr(options, "runtime", "torch"), fingerprint=key, image_size=size,
                          compile_module=self.image_module, preprocess=self.preprocess, keep_alpha=self.keeps_alpha,
                          calibration=getattr(options, "calibration", None),
                          calibration_images=getattr(options, "calibration_images", DEFAULT_CALIBRATION_IMAGES),
                          preprocess_key=json.dumps(self.preprocessor.describe(), sort_keys=True, default=str))
        self.precision = path.record
        if path.compiled is not None:
            self.image_path = path.compiled
        #: The autocast dtype of the image and of the text side (None: none).
        self._image_autocast, self._text_autocast = self._autocast_dtypes(placement.precision)
        # What runs the text tower: decided on its first use (phiclip.encoders.text_side).
        self.text_side = None if tokenizer is None else TextSideRunner(
            model, precision=placement.precision, runtime=getattr(options, "runtime", "torch"),
            fingerprint=weights_fingerprint, device_type=self.device.type, record=self.precision,
            tokenize=tokenizer_call(tokenizer, self.text_padding, self.text_max_length))

    # --- loading ------------------------------------------------------------------------------
    @classmethod
    def build(cls, spec: EncoderSpec, options: FamilyOptions, placement: Placement) -> FamilyEncoder:
        """Load the checkpoint a spec names (the registry's builder; see the module docstring).

        Raises:
            ValueError: a missing or incomplete checkpoint, another model type, settings the family
                does not embed with (each says which).
        """
        checkpoint, location, no_code, config = open_transformers_checkpoint(spec, cls.kind)
        import torch
        import transformers

        cls._check_config(spec, config, options)
        preprocessor = cls._preprocessor(spec, checkpoint, config, options, no_code)
        tokenizer, text_unavailable = cls._tokenizer(spec, checkpoint, config, no_code)
        model_class = getattr(transformers, cls.model_classes[config.model_type])
        try:
            model = model_class.from_pretrained(location, use_safetensors=True, **no_code, **_dtype_kwarg(torch.float32))
        except OSError as e:
            if "safetensors" in str(e).lower() or ".bin" in str(e):
                raise ValueError(
                    f"encoder spec {str(spec)!r}: no safetensors weights (model.safetensors) at {location!r}; "
                    "phiclip loads weights only from safetensors: re-save the checkpoint with "
                    "save_pretrained(..., safe_serialization=True)") from None
            raise _load_error(spec, "model weights", e) from None
        except Exception as e:  # noqa: BLE001 - corrupt files surface as many error types
            raise _load_error(spec, "model weights", e) from None
        fingerprint = checkpoint.hash_weight_files_in_background()  # waited for where it is first read
        model = cls._prepare_model(model).to(placement.device).eval()
        encoder = cls(spec, model, preprocessor, tokenizer, placement=placement, options=options,
                      weights_fingerprint=fingerprint, text_unavailable=text_unavailable)
        encoder.checkpoint = checkpoint
        return encoder

    @classmethod
    def _check_config(cls, spec: EncoderSpec, config: Any, options: FamilyOptions) -> None:
        """Refuse configurations the encoder cannot embed with (default: none)."""

    @classmethod
    def _prepare_model(cls, model: Any) -> Any:
        """The loaded model, adjusted where the family needs it (default: as loaded)."""
        return model

    @classmethod
    def _has_text(cls, config: Any) -> bool:
        """Whether checkpoints of this config have a text side (default: none)."""
        return False

    @classmethod
    def _preprocessor(cls, spec: EncoderSpec, checkpoint: Checkpoint, config: Any, options: FamilyOptions,
                      no_code: dict[str, Any]) -> Any:
        """The family's preprocessing; by default the checkpoint's image processor (PIL backend),
        reimplemented exactly where :class:`ImagePreprocessor` covers its settings."""
        image_processor = load_image_processor(spec, no_code, str(checkpoint.location))
        return ImagePreprocessor.from_image_processor(image_processor) or ProcessorPreprocessor(image_processor)

    @classmethod
    def _tokenizer(cls, spec: EncoderSpec, checkpoint: Checkpoint, config: Any,
                   no_code: dict[str, Any]) -> tuple[Any | None, str | None]:
        """The checkpoint's tokenizer for a family with a text side, or ``(None, why)``."""
        if not cls._has_text(config):
            return None, None
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(checkpoint.location), **no_code), None
        except Exception as e:  # noqa: BLE001 - any failure leaves an image-only encoder, said loudly
            why = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
            warnings.warn(f"{spec}: no tokenizer could be loaded, so this encoder embeds images only ({why})",
                          stacklevel=3)
            return None, why

    def _image_dim(self) -> int:
        raise NotImplementedError

    def _text_max_length(self) -> int | None:
        if self.tokenizer is None:
            return None
        positions = int(self.model.config.text_config.max_position_embeddings)
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        return tok_max if isinstance(tok_max, int) and 0 < tok_max < positions else positions

    # --- the three steps ----------------------------------------------------------------------
    def preprocess(self, image: Image.Image) -> Any:
        """One PIL image -> the family's picklable item (``preprocessor`` is the same, picklable)."""
        return self.preprocessor(image)

    def collate(self, items: Sequence[Any]) -> Any:
        """(3, H, W) tensors -> one (n, 3, H, W) batch."""
        import torch

        if not items:
            raise ValueError("collate got no items")
        shapes = {tuple(t.shape) for t in items}
        if len(shapes) != 1:
            raise ValueError(f"cannot batch pixel values of different shapes: {sorted(shapes)}")
        return torch.stack(list(items))

    def _batch_size(self, batch: Any) -> int:
        return int(batch.shape[0])

    def _batch_slice(self, batch: Any, start: int, stop: int) -> Any:
        return batch[start:stop].to(self.device)

    def _image_features(self, batch: Any) -> torch.Tensor:
        """One model call's image vectors (before normalisation)."""
        raise NotImplementedError

    def image_module(self) -> torch.nn.Module:
        """The image path as one ``torch.nn.Module`` on the model's own weights: ``forward(batch)``
        (a collated model-call batch: (n, 3, H, W) pixels, or SigLIP 2 NaFlex's dict of
        ``pixel_values``, ``pixel_attention_mask``, ``spatial_shapes``) -> (n, dim) vectors before
        normalisation. What a CPU accelerator quantises, packs or compiles; its result goes in
        :attr:`image_path`."""
        import torch

        encoder = self

        class ImagePath(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = encoder.model

            def forward(self, pixel_values: Any) -> torch.Tensor:  # the name a compiled runtime's export uses
                return encoder._image_features(pixel_values)

        return ImagePath()

    def _text_features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return _pooled(self.model.get_text_features(**inputs))

    def _fixed_image_size(self) -> int | None:
        """The side of the square pixels the image path takes (a compiled runtime's input), or None
        where the shape varies (SigLIP 2 NaFlex)."""
        pixels = self.preprocessor(Image.new("RGB", (32, 32)))
        shape = tuple(getattr(pixels, "shape", ()))
        return int(shape[-1]) if len(shape) == 3 and shape[-1] == shape[-2] else None

    def _output_key(self) -> str:
        """What besides the weights changes the image vector (names a compiled runtime's cache entry)."""
        import json

        return json.dumps({"details": self._details(), "preprocessing": self.preprocessor.describe()},
                          sort_keys=True, default=str)

    def _autocast_dtypes(self, precision: str) -> tuple[Any, Any]:
        """(image, text) autocast dtypes: none for float32; the precision for 16-bit; for int8 the
        plan's float precision on the image side (bfloat16 where it measured faster) and float32 text."""
        import torch

        if precision == "float32":
            return None, None
        if precision == "int8":
            float_dtype = self.precision.get("int8", {}).get("float_dtype", "float32")
            return (None if float_dtype == "float32" else getattr(torch, float_dtype)), None
        return self.dtype, self.dtype

    def _autocast(self, dtype: Any = None) -> Any:
        import contextlib

        import torch

        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _finish(self, features: torch.Tensor) -> np.ndarray:
        features = features.float()
        if self.normalize:
            features = l2_normalize(features)
        return features.cpu().numpy()

    def encode_batch(self, batch: Any, *, with_tokens: bool = False) -> EncodedBatch:
        """A collated batch -> (n, dim) float32 vectors, ``max_batch`` images per model call."""
        import torch

        if with_tokens:
            raise ValueError(f"{self.name}: {self.kind} encoders give one pooled vector per image; "
                             "image tokens are a phi3v option")
        n = self._batch_size(batch)
        if n == 0:
            return EncodedBatch(embeddings=np.zeros((0, self.dim), dtype=np.float32))
        run = self.image_path or self._image_features
        out = []
        with torch.inference_mode(), self._autocast(self._image_autocast):
            for start in range(0, n, self.max_batch):
                out.append(self._finish(run(self._batch_slice(batch, start, start + self.max_batch))))
        return EncodedBatch(embeddings=np.concatenate(out, axis=0))

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Texts -> (n, dim) float32 vectors from the text tower with the checkpoint's tokenizer
        (truncated to the model's maximum length).

        Raises:
            NotImplementedError: an encoder without a text side (naming its kind; the Encoder contract).
            ValueError: a tokenizer that could not be loaded, or texts that are not strings.
        """
        import torch

        if self.tokenizer is None and self.text_unavailable is None:
            return super().encode_texts(texts, batch_size)  # no text side: the Encoder contract's error
        if self.tokenizer is None:
            raise ValueError(f"{self.name}: this checkpoint's tokenizer could not be loaded, so it cannot embed "
                             f"text ({self.text_unavailable})")
        check_texts(self.name, texts)
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = []
        step = max(1, min(batch_size, self.max_batch))
        with torch.inference_mode(), self._autocast(self._text_autocast):
            for start in range(0, len(texts), step):
                enc = self.text_side.tokenize(list(texts[start:start + step]))
                inputs = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
                out.append(self._finish(self.text_side(inputs, self._text_features)))
        return np.concatenate(out, axis=0)

    # --- description --------------------------------------------------------------------------
    def _image_modules(self) -> tuple[Any, ...]:
        """The modules that turn pixels into the image vector."""
        raise NotImplementedError

    def _details(self) -> dict[str, Any]:
        """What only this family has, for ``describe()["details"]``."""
        return {}

    def description(self) -> EncoderDescription:
        """The common fields, and in ``details``: model class and type, stored weights dtype, text
        settings, the whole model's parameter count, transformers' version, the commit, and the
        family's own (:meth:`_details`)."""
        import transformers

        return self.described(
            parameters=self._parameter_counts[0],
            preprocessing=self.preprocessor.describe(),
            options=self.options.to_dict(),
            details={
                "model_class": type(self.model).__name__,
                "model_type": self.model.config.model_type,
                "weights_dtype": dtype_name(next(self.model.parameters()).dtype),
                "text": None if self.tokenizer is None else {
                    "tokenizer_class": type(self.tokenizer).__name__, "padding": self.text_padding,
                    "max_length": self.text_max_length, "truncation": True},
                "text_unavailable": self.text_unavailable,
                "total_parameters": self._parameter_counts[1],
                "transformers_version": transformers.__version__,
                "revision": self.checkpoint.revision if self.checkpoint is not None else None,
                **self._details(),
            },
        )


def load_image_processor(spec: EncoderSpec, no_code: dict[str, Any], location: str) -> Any:
    """The checkpoint's transformers image processor, PIL backend (a named error when absent)."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(location, **no_code, **pil_backend_kwarg())
    except (OSError, ValueError) as e:
        raise _load_error(spec, "image processor (preprocessor_config.json / processor_config.json)", e) from None


__all__ = ["FamilyEncoder", "load_image_processor"]
