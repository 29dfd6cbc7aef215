"""The Phi-3-vision encoder: pooled vectors (and, when asked, the full image-token sequences).

Spec: ``phi3v:<hub id or directory>[?num_crops=16&pooling=mean&normalize=true&max_crops=4]``.
``num_crops`` defaults to the checkpoint's ``preprocessor_config.json``; ``pooling`` is ``mean``
(mean of the projected image tokens, separators excluded; ``hidden_size``-wide) or ``global``
(mean of the tower's global-view patch features; 1024-wide, and only the global view is run).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from phiclip.encoders.base import EncodedBatch, Encoder, EncoderSpec, option_bool, option_int

_OPTIONS = {"num_crops", "pooling", "normalize", "max_crops"}
class Phi3VEncoder(Encoder):
    """Phi-3-vision image embeddings through :class:`~phiclip.phi3v.Phi3VImageEmbedding`."""

    modalities = frozenset({"image"})

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        name: str,
        pooling: str = "mean",
        normalize: bool = True,
    ) -> None:
        if pooling not in ("mean", "global"):
            raise ValueError(f"pooling must be 'mean' or 'global', got {pooling!r}")
        self.model = model
        self.processor = processor
        self.name = name
        self.pooling = pooling
        self.normalize = normalize
        self.dim = model.hidden_size if pooling == "mean" else model.image_dim_out
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype

    @classmethod
    def from_spec(cls, spec: EncoderSpec, *, device: str = "auto", dtype: str = "auto") -> Phi3VEncoder:
        """Build from a parsed spec (see the module docstring for the options)."""
        from phiclip.encoders import resolve_device_dtype
        from phiclip.phi3v import Phi3VImageEmbedding, Phi3VImageProcessor

        unknown = set(spec.options) - _OPTIONS
        if unknown:
            raise ValueError(f"encoder spec {spec}: unknown option(s) {sorted(unknown)}; known: {sorted(_OPTIONS)}")
        dev, dt = resolve_device_dtype(device, dtype)
        num_crops = option_int(spec, "num_crops", None)
        max_crops = option_int(spec, "max_crops", None)  # None: the model's default for the device
        processor = Phi3VImageProcessor.from_pretrained(spec.location, **({"num_crops": num_crops} if num_crops is not None else {}))
        model = Phi3VImageEmbedding.from_pretrained(spec.location, torch_dtype=dt, device=dev, max_crops_per_batch=max_crops)
        return cls(
            model,
            processor,
            name=str(spec),
            pooling=spec.options.get("pooling", "mean"),
            normalize=option_bool(spec, "normalize", True),
        )

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
            means = [t[~self.model.separator_mask(int(h), int(w)).to(t.device)].mean(dim=0) for t, (h, w) in zip(tokens, sizes.tolist())]
            vecs = torch.stack(means)
        else:
            vecs = self.model.pooled(crops, sizes, pooling="mean")
        if self.normalize:
            vecs = torch.nn.functional.normalize(vecs.float(), dim=-1)
        return EncodedBatch(
            embeddings=vecs.float().cpu().numpy(),
            tokens=[t.float().cpu().numpy() for t in tokens] if tokens is not None else None,
        )

    def encode_tokens(self, images: Sequence[Any]) -> list[np.ndarray]:
        """Images -> per image its ``(T_i, hidden_size)`` token sequence (float32)."""
        from phiclip.images import load_image

        if self.pooling == "global":
            raise ValueError("token output needs every crop; load the encoder with pooling=mean")
        batch = self.collate([self.preprocess(load_image(im)) for im in images])
        return self.encode_batch(batch, with_tokens=True).tokens or []

    def describe(self) -> dict[str, Any]:
        from phiclip.phi3v.modeling import count_parameters

        return {
            "spec": self.name,
            "kind": "phi3v",
            "model_class": type(self.model).__name__,
            "dim": self.dim,
            "pooling": self.pooling,
            "normalize": self.normalize,
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": str(self.device),
            "parameters": count_parameters(self.model),
            "hidden_size": self.model.hidden_size,
            "layer_idx": self.model.layer_idx,
            "hd_transform_order": self.model.hd_transform_order,
            "preprocessing": self.processor.to_dict(),
        }

    def tokens_per_image(self, width: int, height: int) -> int:
        """Image tokens for an image of this size at this encoder's num_crops."""
        from phiclip.phi3v.processing import num_image_tokens

        return num_image_tokens(width, height, self.processor.num_crops)
