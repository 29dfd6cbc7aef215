"""The Phi-3-vision encoder: pooled vectors (and, when asked, the full image-token sequences).

Spec: ``phi3v:<hub id or directory>[?num_crops=16&pooling=mean&normalize=true&max_crops=4&runtime=auto]``
(:class:`~phiclip.encoders.options.Phi3VOptions`). ``num_crops`` (an integer from 1 to 64; the
released models use 16 and 4) defaults to the checkpoint's ``preprocessor_config.json``;
``pooling`` is ``mean`` (mean of the projected image tokens, separators excluded;
``hidden_size``-wide) or ``global`` (mean of the tower's global-view patch features; 1024-wide, and
only the global view is run).

On the CPU the tower (``model.img_processor``: crops in, the hidden state at ``layer_idx`` out) runs
the way ``runtime=`` says (:func:`phiclip.cpu.accelerate`): torch (fused bfloat16, int8 in place), or
compiled by OpenVINO / ONNX Runtime from the float32 weights (``auto``: the fastest measured on this
CPU within the precision's bound, on one tower call's crops); a compiled tower replaces
``model.img_processor`` (:class:`~phiclip.cpu.runtimes.CompiledModule`). The HD crops, the 2x2
merge, the separators and the projection always run on torch, in the precision's float dtype.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from phiclip.checkpoints import open_checkpoint
from phiclip.cpu import AcceleratedPath, accelerate
from phiclip.cpu.acceleration import may_compile
from phiclip.cpu.runtimes import CompiledModule
from phiclip.encoders.base import EncodedBatch, Encoder, EncoderDescription, dtype_name
from phiclip.encoders.device import Placement
from phiclip.encoders.options import Phi3VOptions
from phiclip.encoders.spec import EncoderSpec
from phiclip.images import load_image
from phiclip.models.checkpoint import fingerprint_module
from phiclip.models.ops import l2_normalize
from phiclip.phi3v.modeling import Phi3VImageEmbedding
from phiclip.phi3v.processing import Phi3VImageProcessor, num_image_tokens


class Phi3VEncoder(Encoder):
    """Phi-3-vision image embeddings through :class:`~phiclip.phi3v.Phi3VImageEmbedding`."""

    kind = "phi3v"
    modalities = frozenset({"image"})

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        name: str,
        options: Phi3VOptions | None = None,
        precision: dict[str, Any] | None = None,
    ) -> None:
        options = options or Phi3VOptions()
        if options.pooling not in ("mean", "global"):
            raise ValueError(f"pooling must be 'mean' or 'global', got {options.pooling!r}")
        self.model = model
        self.processor = processor
        self.name = name
        self.options = options
        self.pooling = options.pooling
        self.normalize = options.normalize
        self.dim = model.hidden_size if self.pooling == "mean" else model.image_dim_out
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        # What runs and why (phiclip.cpu.precision); int8: the tower was quantised (phiclip.cpu.int8).
        self.precision = dict(precision or {"requested": dtype_name(self.dtype), "dtype": dtype_name(self.dtype)})
        if self.precision["dtype"] == "int8":
            self.dtype = torch.int8
        self.max_pixels = getattr(processor, "max_pixels", self.max_pixels)
        # A model built in memory (not loaded from a checkpoint) has no fingerprint yet.
        self.weights_fingerprint: str = getattr(model, "weights_fingerprint", None) or fingerprint_module(model)

    def set_max_pixels(self, max_pixels: int | None) -> None:
        """The pixel budget of an image's HD canvas."""
        super().set_max_pixels(max_pixels)
        self.processor.max_pixels = max_pixels

    @classmethod
    def build(cls, spec: EncoderSpec, options: Phi3VOptions, placement: Placement) -> Phi3VEncoder:
        """Load the checkpoint a spec names: the builder of the registry (:func:`phiclip.encoders.load_encoder`)."""
        # Opened once, the one way (located, pinned, vetted): the processor and the weights come from it.
        checkpoint = open_checkpoint(spec.location, kind=cls.kind)
        overrides = {"num_crops": options.num_crops} if options.num_crops is not None else {}
        processor = Phi3VImageProcessor.from_pretrained(checkpoint, **overrides)
        # int8, or a tower a compiled runtime may convert: loaded in float32 (quantised or converted from
        # those weights; torch's 16-bit way then makes them 16-bit: accelerate's torch_weights).
        float32 = placement.precision == "int8" or may_compile(
            options.runtime, placement.precision, placement.device.type, calibrated=options.calibration is not None)
        model = Phi3VImageEmbedding.from_pretrained(checkpoint, torch_dtype=torch.float32 if float32 else placement.dtype,
                                                    device=placement.device, max_crops_per_batch=options.max_crops)
        path = accelerate_tower(model, processor, options=options, precision=placement.precision,
                                record=placement.record(), device_type=placement.device.type, name=str(spec))
        return cls(model, processor, name=str(spec), options=options, precision=path.record)

    # --- pipeline steps -----------------------------------------------------------------------
    def preprocess(self, image: Any) -> dict[str, Any]:
        """RGB PIL image -> ``{"crops": (1 + h*w, 3, 336, 336), "image_size": (H, W)}`` (only the
        global view is kept for ``pooling=global``)."""
        crops, size = self.processor.preprocess_image(image)
        if self.pooling == "global":
            crops = crops[:1].clone()
        return {"crops": crops, "image_size": size}

    def item_cost(self, item: dict[str, Any]) -> int:
        """Tower passes this image costs: its crop count."""
        return int(item["crops"].shape[0])

    def typical_item_cost(self) -> int:
        """Photos at num_crops N use most of their N + 1 crops; the global pooling runs one."""
        return 1 if self.pooling == "global" else self.processor.num_crops + 1

    def collate(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return {
            "crops": [it["crops"] for it in items],
            "image_sizes": torch.tensor([it["image_size"] for it in items], dtype=torch.int64),
        }

    @torch.inference_mode()
    def encode_batch(self, batch: dict[str, Any], *, with_tokens: bool = False) -> EncodedBatch:
        crops, sizes = batch["crops"], batch["image_sizes"]
        if self.pooling == "global" and not with_tokens:
            globals_ = torch.cat([c[:1] for c in crops], dim=0)[:, None]  # (n, 1, 3, 336, 336)
            vecs = self.model.pooled(globals_, sizes, pooling="global", normalize=self.normalize)
            return EncodedBatch(embeddings=vecs.float().cpu().numpy())
        if with_tokens and self.pooling == "global":
            raise ValueError("token output needs every crop; use pooling=mean with tokens")
        tokens = None
        if with_tokens:
            # One tower pass for both: the mean over the non-separator tokens is the pooled vector.
            tokens = self.model.image_tokens(crops, sizes)
            vecs = self.model.pooled_from_tokens(tokens, sizes)
        else:
            vecs = self.model.pooled(crops, sizes, pooling="mean")
        if self.normalize:
            vecs = l2_normalize(vecs.float())
        return EncodedBatch(
            embeddings=vecs.float().cpu().numpy(),
            tokens=[t.float().cpu().numpy() for t in tokens] if tokens is not None else None,
        )

    def encode_tokens(self, images: Sequence[Any]) -> list[np.ndarray]:
        """Images -> per image its ``(T_i, hidden_size)`` token sequence (float32)."""
        if self.pooling == "global":
            raise ValueError("token output needs every crop; load the encoder with pooling=mean")
        batch = self.collate([self.preprocess(load_image(im, max_pixels=self.max_pixels)) for im in images])
        return self.encode_batch(batch, with_tokens=True).tokens or []

    def description(self) -> EncoderDescription:
        """The common fields, and in ``details``: model class, LM width, the tower layer read, the
        HD transform's order and the commit the weights came from (None: a local folder)."""
        return self.described(
            parameters=self.model.image_path_parameters(),
            preprocessing=self.processor.to_dict(),
            options=self.options.to_dict(),
            details={
                "model_class": type(self.model).__name__,
                "hidden_size": self.model.hidden_size,
                "layer_idx": self.model.layer_idx,
                "hd_transform_order": self.model.hd_transform_order,
                "revision": getattr(self.model, "revision", None),
            },
        )

    def tokens_per_image(self, width: int, height: int) -> int:
        """Image tokens for an image of this size at this encoder's num_crops."""
        return num_image_tokens(width, height, self.processor.num_crops)


def accelerate_tower(model: Phi3VImageEmbedding, processor: Any, *, options: Phi3VOptions, precision: str,
                     record: dict[str, Any], device_type: str, name: str = "") -> AcceleratedPath:
    """Decide and apply what runs ``model``'s tower at ``precision`` (:func:`phiclip.cpu.accelerate`):
    torch (int8 products quantised in place; bfloat16 on the CPU: the tower fused in place where this
    torch has oneDNN's kernels), or a compiled runtime, which then replaces ``model.img_processor``
    while the rest of the model (separators, projection) is put in the precision's float dtype.
    ``auto`` times the ways on one tower call's crops (:meth:`~Phi3VImageEmbedding.crops_per_call`) of
    photo-like images cut by ``processor``; static int8 is calibrated on the crops of the
    ``calibration=`` images."""
    tower_parameters = sum(p.numel() for p in model.img_processor.parameters())

    def crops(image: Any) -> torch.Tensor:
        return processor.preprocess_image(image)[0]  # (1 + h*w, 3, S, S)

    def torch_weights(dtype: str) -> None:
        model.to(getattr(torch, dtype))

    path = accelerate(
        model, precision=precision, record=record, device_type=device_type, runtime=options.runtime,
        calibration=options.calibration, calibration_images=options.calibration_images,
        # The tower's output depends on its weights and on how many of its layers run.
        fingerprint=f"{model.weights_fingerprint}:phi3v-tower:{model.num_layers_run}",
        image_size=model.crop_size, preprocess=crops, preprocess_key=json.dumps(processor.to_dict(), sort_keys=True, default=str),
        name=name, compile_module=lambda: model.img_processor, part="tower",
        example_rows=model.crops_per_call(torch.device(device_type)), torch_weights=torch_weights,
        torch_input=lambda x: x.to(model.img_processor.input_dtype))
    if path.compiled is not None:
        dtype = getattr(torch, path.torch_dtype)
        model.img_processor = CompiledModule(path.compiled, output_dtype=dtype, parameters=tower_parameters)
        model.to(dtype)
        path.record["runtime"]["then_torch"] = f"HD merge, separators and projection on torch in {path.torch_dtype}"
    return path
