"""One interface for every embedding method (:class:`Encoder`), and its typed description.

An :class:`Encoder` carries everything that decides its vectors: the model, the preprocessing it
applies, the device and compute precision (``device``, ``dtype``: decided once, by
:func:`phiclip.encoders.device.resolve_placement`). :meth:`Encoder.description` returns all of it as
an :class:`EncoderDescription` (the same fields for every encoder); ``describe()`` is its
``to_dict()``, which a bulk run writes into its manifest so the vectors can always be traced to
what produced them.

The bulk pipeline splits the work in three steps so that decoding and preprocessing can run in
worker processes (beside a GPU) or on threads (on the CPU): ``preprocess(image) -> item`` (CPU,
picklable, thread-safe), ``collate(items) -> batch`` and ``encode_batch(batch) -> EncodedBatch``.
:func:`phiclip.pipeline.step.encode_images` is the same three steps in one call, for Python users.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from phiclip.encoders.registry import SPEC_KINDS, parse_spec
from phiclip.encoders.spec import EncoderSpec, option_bool, option_int
from phiclip.images import DEFAULT_MAX_PIXELS
from phiclip.models.checkpoint import LazyFingerprint, resolve_fingerprint


def default_prep_threads() -> int:
    """Threads that decode and preprocess inputs in the model's process: as many as torch uses for
    the model. The two take turns at the cores: on a CPU the model's matrix products already use
    every one of them, so preparing the next batch meanwhile would only slow both down."""
    import torch  # delayed on purpose: the command line imports this module

    return max(1, torch.get_num_threads())


def dtype_name(dtype: Any) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (strings pass through)."""
    return str(dtype).replace("torch.", "")


def count_parameters(*modules: Any) -> int:
    """Parameters of torch modules, each counted once (shared tensors too)."""
    seen: set[int] = set()
    total = 0
    for module in modules:
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def check_texts(name: str, texts: Sequence[str]) -> None:
    """Refuse what ``encode_texts`` cannot take, naming the encoder: one string instead of a list, or an item
    that is not a string."""
    if isinstance(texts, str):
        raise ValueError(f"{name}: encode_texts takes a list of texts, got one string; wrap it in a list")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise ValueError(f"{name}: encode_texts takes strings; item {bad[0]} is {type(texts[bad[0]]).__name__}")


@dataclass(frozen=True)
class EncoderDescription:
    """What decides an encoder's vectors, with the same fields for every encoder.

    ``dtype`` is the compute precision (``float32``, ``bfloat16``, ``float16``, ``int8``);
    ``parameters`` counts those that turn an image into its vector; ``options`` are the spec's
    options as parsed (defaults filled in); ``precision`` says what was asked for and why this
    precision runs (:func:`phiclip.cpu.precision.describe_precision`); ``details`` holds what only this
    kind has (model class, text settings...). :meth:`to_dict` is what ``describe()`` returns.
    """

    spec: str
    kind: str
    dim: int
    modalities: tuple[str, ...]
    normalized: bool
    dtype: str
    device: str
    parameters: int | None
    weights_fingerprint: str | None
    preprocessing: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    precision: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (the manifest's ``encoder`` entry)."""
        return {
            "spec": self.spec,
            "kind": self.kind,
            "dim": int(self.dim),
            "modalities": sorted(self.modalities),
            "normalized": bool(self.normalized),
            "dtype": self.dtype,
            "device": self.device,
            "parameters": self.parameters,
            "weights_fingerprint": self.weights_fingerprint,
            "preprocessing": dict(self.preprocessing),
            "options": dict(self.options),
            "precision": dict(self.precision),
            "details": dict(self.details),
        }


@dataclass
class EncodedBatch:
    """What ``encode_batch`` returns: one row per item, in order.

    ``embeddings``: (n, dim) float32. ``tokens``: optional per-item (T_i, token_dim) float32 arrays
    (Phi-3-vision image tokens when asked for).
    """

    embeddings: np.ndarray
    tokens: list[np.ndarray] | None = None


class Encoder(abc.ABC):
    """An embedding method. Subclasses set ``name``, ``dim`` and ``modalities`` and implement the
    preprocess / collate / encode_batch steps (and ``encode_texts`` where there is a text side)."""

    #: The spec string that rebuilds this encoder.
    name: str
    #: Output dimension of the vectors (images and texts).
    dim: int
    #: ``{"image"}`` or ``{"image", "text"}``.
    modalities: frozenset[str]
    #: Whether the vectors are L2-normalised.
    normalize: bool = True
    #: Whether ``preprocess`` wants transparent images as RGBA (it flattens them itself, as its
    #: checkpoint's processor does); otherwise images arrive as RGB with alpha dropped.
    keeps_alpha: bool = False
    #: The pixel budget ``preprocess`` keeps to (``--max-pixels``); set it with :meth:`set_max_pixels`.
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    #: Where the model runs (a ``torch.device``) and its compute precision (a ``torch.dtype``),
    #: from :func:`~phiclip.encoders.device.resolve_placement`.
    device: Any
    dtype: Any
    #: The registry kind (``clip``, ``phi3v``...), the weights fingerprint (``sha256:...``) and what
    #: decided the precision (:func:`phiclip.cpu.precision.describe_precision`), set by each encoder.
    kind: str
    precision: dict[str, Any]
    #: What :attr:`weights_fingerprint` gives: a string, a fingerprint still being hashed, or None.
    _weights_fingerprint: str | LazyFingerprint | None = None

    @property
    def weights_fingerprint(self) -> str | None:
        """The weights fingerprint (``"sha256:<hex>"``), or None for an encoder without one. An encoder
        loaded from a checkpoint may hold it as a :class:`~phiclip.models.checkpoint.LazyFingerprint`
        (hashed in the background after the load): the first read waits for the hashing."""
        fingerprint = resolve_fingerprint(self._weights_fingerprint)
        self._weights_fingerprint = fingerprint
        return fingerprint

    @weights_fingerprint.setter
    def weights_fingerprint(self, value: str | LazyFingerprint | None) -> None:
        self._weights_fingerprint = value

    def set_max_pixels(self, max_pixels: int | None) -> None:
        """The pixel budget (``--max-pixels``; ``None``: no limit) for what ``preprocess`` builds from
        an image: Phi-3-vision refuses an image whose HD canvas would exceed it, before allocating it.
        The bulk runner calls this with the run's ``max_pixels``, which also bounds decoding."""
        if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1):
            raise ValueError(f"max_pixels must be a positive integer or None, got {max_pixels!r}")
        self.max_pixels = max_pixels

    # --- the three steps of the bulk pipeline -------------------------------------------------
    @abc.abstractmethod
    def preprocess(self, image: Any) -> Any:
        """One RGB PIL image -> a picklable CPU item (tensors) ready for ``collate``."""

    @abc.abstractmethod
    def collate(self, items: Sequence[Any]) -> Any:
        """Items from ``preprocess`` -> one batch for ``encode_batch``."""

    @abc.abstractmethod
    def encode_batch(self, batch: Any, *, with_tokens: bool = False) -> EncodedBatch:
        """Run the model on a collated batch."""

    def item_cost(self, item: Any) -> int:
        """Relative cost of an item for batching (Phi-3-vision: its crop count). Default 1."""
        return 1

    def item_crops(self, item: Any) -> int:
        """Vision-tower passes (crops) an item takes, for cost reports. The batching cost by default;
        encoders whose batching counts something else (prompt tokens) say so here."""
        return self.item_cost(item)

    def typical_item_cost(self) -> int:
        """What an item usually costs, before any is preprocessed (to size the work per worker)."""
        return 1

    def prepare_texts(self) -> None:
        """Decide and build what runs the text side before the first text (an encoder whose text
        tower may be compiled records the choice in ``describe()``); a text run calls it before it
        writes its manifest. Encoders holding a :class:`~phiclip.encoders.text_side.TextSideRunner` as
        ``text_side`` decide it there; the others have nothing to decide."""
        text_side = getattr(self, "text_side", None)
        if text_side is not None:
            text_side.prepare()

    # --- convenience ---------------------------------------------------------------------------
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Texts -> (n, dim) float32 embeddings, for encoders with a text side. An encoder without one
        (``"text"`` not in ``modalities``) keeps this default: a ``NotImplementedError`` naming its kind."""
        raise NotImplementedError(
            f"{self.name}: {getattr(self, 'kind', type(self).__name__)} encoders embed images only "
            f"(modalities: {sorted(self.modalities)}); use a model with a text side for text (clip, siglip, "
            "siglip2, metaclip2, open_clip, aimv2 LiT)"
        )

    def described(self, *, parameters: int | None, preprocessing: dict[str, Any], options: dict[str, Any],
                  details: dict[str, Any]) -> EncoderDescription:
        """An :class:`EncoderDescription` whose common fields (spec, kind, dim, modalities, normalised,
        dtype, device, weights fingerprint, precision) come from this encoder's attributes; a kind's
        :meth:`description` gives the rest."""
        return EncoderDescription(
            spec=self.name,
            kind=self.kind,
            dim=self.dim,
            modalities=tuple(sorted(self.modalities)),
            normalized=self.normalize,
            dtype=dtype_name(self.dtype),
            device=str(self.device),
            parameters=parameters,
            weights_fingerprint=self.weights_fingerprint,
            preprocessing=preprocessing,
            options=options,
            precision=self.precision,
            details=details,
        )

    def description(self) -> EncoderDescription:
        """Everything that decides the vectors (see :class:`EncoderDescription`)."""
        raise NotImplementedError(f"{type(self).__name__} implements neither description() nor describe()")

    def describe(self) -> dict[str, Any]:
        """:meth:`description` as a dict (what a run's manifest records).

        Encoders built from a checkpoint include ``"weights_fingerprint"``: ``"sha256:<hex>"`` over
        the name, dtype, shape and bytes of every tensor loaded
        (:class:`phiclip.models.checkpoint.WeightsHasher`), so outputs can be tied to the weights
        themselves, not only to the path or hub id they came from."""
        return self.description().to_dict()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, dim={self.dim})"


__all__ = [
    "SPEC_KINDS",
    "EncodedBatch",
    "Encoder",
    "EncoderDescription",
    "EncoderSpec",
    "count_parameters",
    "default_prep_threads",
    "dtype_name",
    "option_bool",
    "option_int",
    "parse_spec",
]
