"""One interface for every embedding method, and the spec strings that name them.

An :class:`Encoder` carries everything that decides its vectors: the model, the preprocessing it
applies, the device and dtype. ``describe()`` returns all of it as a dict, which a bulk run writes
into its manifest so the vectors can always be traced to what produced them.

The bulk pipeline splits the work in three steps so that decoding and preprocessing can run in
worker processes (beside a GPU) or on threads (on the CPU): ``preprocess(image) -> item`` (CPU,
picklable, thread-safe), ``collate(items) -> batch`` and ``encode_batch(batch) -> EncodedBatch``.
``encode_images`` is the same three steps in one call, for Python users.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from phiclip.images import ImageInput, load_image


def default_prep_threads() -> int:
    """Threads that decode and preprocess inputs in the model's process: as many as torch uses for
    the model. The two take turns at the cores: on a CPU the model's matrix products already use
    every one of them, so preparing the next batch meanwhile would only slow both down."""
    import torch

    return max(1, torch.get_num_threads())


#: Spec kinds and what they mean (the prefix of ``kind:location``).
SPEC_KINDS = ("clip", "siglip", "phi3v")


@dataclass(frozen=True)
class EncoderSpec:
    """A parsed encoder spec such as ``phi3v:microsoft/Phi-3-vision-128k-instruct?num_crops=4``.

    ``location`` is a Hugging Face hub id or a local directory; ``options`` are ``key=value`` pairs
    after ``?`` (separated by ``&`` or ``,``), kept as strings for the builder to interpret.
    """

    kind: str
    location: str
    options: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        opts = "&".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.kind}:{self.location}" + (f"?{opts}" if opts else "")


def parse_spec(spec: str) -> EncoderSpec:
    """Parse ``kind:location[?key=value&key=value]``.

    >>> parse_spec("clip:openai/clip-vit-base-patch32")
    EncoderSpec(kind='clip', location='openai/clip-vit-base-patch32', options={})
    >>> parse_spec("phi3v:/models/phi3v?num_crops=4&pooling=global").options
    {'num_crops': '4', 'pooling': 'global'}

    Raises:
        ValueError: for an unknown kind, an empty location or a malformed option.
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(
            f"encoder spec {spec!r} has no kind; write one of "
            + ", ".join(f"'{k}:<hub id or directory>'" for k in SPEC_KINDS)
        )
    kind, rest = spec.split(":", 1)
    kind = kind.strip().lower()
    if kind not in SPEC_KINDS:
        raise ValueError(f"encoder spec {spec!r}: unknown kind {kind!r}; known kinds: {', '.join(SPEC_KINDS)}")
    location, _, query = rest.partition("?")
    location = location.strip()
    if not location:
        raise ValueError(f"encoder spec {spec!r} names no model; add a hub id or a local directory after '{kind}:'")
    options: dict[str, str] = {}
    if query:
        for part in query.replace(",", "&").split("&"):
            if not part:
                continue
            key, eq, value = part.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"encoder spec {spec!r}: option {part!r} is not key=value")
            options[key.strip()] = value.strip()
    return EncoderSpec(kind=kind, location=location, options=options)


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def option_bool(spec: EncoderSpec, key: str, default: bool) -> bool:
    """A ``true``/``false`` spec option (also 1/0, yes/no, on/off); a clear error otherwise."""
    raw = spec.options.get(key)
    if raw is None:
        return default
    if raw.strip().lower() in _TRUE:
        return True
    if raw.strip().lower() in _FALSE:
        return False
    raise ValueError(f"encoder spec {str(spec)!r}: option {key}={raw!r} must be true or false")


def option_int(spec: EncoderSpec, key: str, default: int | None, minimum: int = 1) -> int | None:
    """An integer spec option of at least ``minimum``; a clear error otherwise."""
    raw = spec.options.get(key)
    if raw is None:
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise ValueError(f"encoder spec {str(spec)!r}: option {key}={raw!r} must be an integer >= {minimum}") from None
    if value < minimum:
        raise ValueError(f"encoder spec {str(spec)!r}: option {key}={raw!r} must be an integer >= {minimum}")
    return value


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
    #: Output dimension of ``encode_images`` / ``encode_texts``.
    dim: int
    #: ``{"image"}`` or ``{"image", "text"}``.
    modalities: frozenset[str]
    #: Whether the vectors are L2-normalised.
    normalize: bool = True
    #: Whether ``preprocess`` wants transparent images as RGBA (it flattens them itself, as its
    #: checkpoint's processor does); otherwise images arrive as RGB with alpha dropped.
    keeps_alpha: bool = False

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

    def typical_item_cost(self) -> int:
        """What an item usually costs, before any is preprocessed (to size the work per worker)."""
        return 1

    # --- convenience --------------------------------------------------------------------------
    def encode_images(self, images: Sequence[ImageInput], batch_size: int = 32) -> np.ndarray:
        """Images (PIL, arrays, paths or bytes) -> (n, dim) float32 embeddings."""
        def prepare(image: ImageInput) -> Any:
            return self.preprocess(load_image(image, keep_alpha=self.keeps_alpha))

        # Decoding and preprocessing run on a thread pool between model calls (PIL releases the GIL).
        threads = min(default_prep_threads(), batch_size, len(images))
        out = []
        with contextlib.ExitStack() as stack:
            pool = stack.enter_context(ThreadPoolExecutor(threads, thread_name_prefix="phiclip-prep")) if threads > 1 else None
            for start in range(0, len(images), batch_size):
                part = images[start : start + batch_size]
                chunk = list(pool.map(prepare, part)) if pool is not None else [prepare(im) for im in part]
                out.append(self.encode_batch(self.collate(chunk)).embeddings)
        if not out:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(out, axis=0).astype(np.float32, copy=False)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Texts -> (n, dim) float32 embeddings, for encoders with a text side."""
        raise NotImplementedError(
            f"{self.name} embeds images only (modalities: {sorted(self.modalities)}); "
            "use a CLIP or SigLIP model for text"
        )

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """Everything that decides the vectors (spec, dim, preprocessing, dtype, device, ...)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, dim={self.dim})"
