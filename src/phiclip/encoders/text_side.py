"""What runs an encoder's text tower: torch or a compiled runtime, decided on first use.

The CLIP-like encoders (CLIP, SigLIP, open_clip) hold a :class:`TextSideRunner`. The first text call
(or :meth:`TextSideRunner.prepare`, which a text run calls before it writes its manifest) decides,
through :func:`phiclip.cpu.acceleration.accelerate_text`, whether the encoder's ``runtime=`` compiles
the text tower (``auto``: measured against torch on :data:`SAMPLE_TEXTS` on this CPU, once), so an
image-only run never pays for the text side. The decision is recorded under
``describe()["precision"]["text"]``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from phiclip.cpu.acceleration import TextPath
    from phiclip.models.checkpoint import LazyFingerprint

#: Sentences of everyday lengths the text tower's ways are timed on (``runtime=auto``).
SAMPLE_TEXTS: tuple[str, ...] = (
    "a photo of a dog", "a cat sleeping on a red sofa in the afternoon sun", "the Eiffel Tower at night",
    "two people riding bicycles along a river", "a plate of pasta with tomato sauce and basil",
    "a diagram of the water cycle", "an old black and white portrait of a woman wearing a hat",
    "a red car", "snow-covered mountains under a clear blue sky, seen from a valley with pine trees",
    "a screenshot of a spreadsheet", "children playing football in a park", "a close-up of a bee on a flower",
    "a bowl of fruit", "a crowded train station during rush hour", "a handwritten note on yellow paper",
    "an aerial view of a city with tall buildings and a harbour",
)


class TextSideRunner:
    """An encoder's text tower as it runs: ``runner(inputs, torch_features)`` gives the text features
    of the tokenizer's tensors ``inputs``, through the compiled runtime chosen, or ``torch_features``
    (the encoder's own torch call, under its autocast) when torch runs it.

    Args:
        model: the transformers dual encoder (float32 weights).
        precision: the compute precision of the encoder.
        runtime: the spec's ``runtime=`` (None: torch).
        fingerprint: names the compiled text tower's cache entry (the weights, and whatever else
            changes the text vector).
        device_type: where the model runs.
        tokenize: the encoder's tokenization of a list of texts into tensors.
        record: the encoder's precision record; the text side's choice is added under ``"text"``.
    """

    def __init__(self, model: Any, *, precision: str, runtime: str | None, fingerprint: str | LazyFingerprint | None,
                 device_type: str,
                 tokenize: Callable[[list[str]], dict[str, torch.Tensor]], record: dict[str, Any]) -> None:
        self.model, self.precision, self.runtime = model, precision, runtime
        self.fingerprint, self.device_type, self.tokenize, self.record = fingerprint, device_type, tokenize, record
        self._path: TextPath | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without the model, the lock and the compiled path (a CPU-side copy of the encoder,
        shipped to preprocessing workers, never runs the text tower)."""
        return {k: v for k, v in self.__dict__.items() if k not in ("model", "_lock", "_path")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.model, self._path, self._lock = None, None, threading.Lock()

    def prepare(self) -> TextPath:
        """Decide (once) and build what runs the text tower; records it in ``record["text"]``."""
        with self._lock:
            if self._path is None:
                if self.model is None:
                    raise RuntimeError("this copy of the encoder was pickled without its model: it cannot embed text")
                import torch

                from phiclip.cpu.acceleration import accelerate_text  # lazy: imports torch

                example = {k: v for k, v in self.tokenize(list(SAMPLE_TEXTS)).items() if k in ("input_ids", "attention_mask")}
                # Decided outside the caller's autocast: the float32 reference and the conversion are float32.
                with torch.autocast(device_type=self.device_type, enabled=False):
                    self._path = accelerate_text(self.model, precision=self.precision, runtime=self.runtime,
                                                 fingerprint=self.fingerprint, example=example,
                                                 device_type=self.device_type)
                self.record["text"] = self._path.record
            return self._path

    @property
    def compiled(self) -> bool:
        """Whether a compiled runtime runs the text tower (deciding it if not yet decided)."""
        return self.prepare().compiled is not None

    def __call__(self, inputs: dict[str, torch.Tensor], torch_features: Callable[[dict[str, torch.Tensor]], torch.Tensor]
                 ) -> torch.Tensor:
        compiled = self.prepare().compiled
        if compiled is None:
            return torch_features(inputs)
        return compiled(*(inputs[name] for name in compiled.input_names))


class _Tokenize:
    """The tokenization an encoder applies to texts (a class, not a closure: it pickles)."""

    def __init__(self, tokenizer: Any, padding: str, max_length: int | None) -> None:
        self.tokenizer, self.padding, self.max_length = tokenizer, padding, max_length

    def __call__(self, texts: Sequence[str]) -> dict[str, Any]:
        return dict(self.tokenizer(list(texts), padding=self.padding, truncation=True, max_length=self.max_length,
                                   return_tensors="pt"))


def tokenizer_call(tokenizer: Any, padding: str, max_length: int | None) -> Callable[[Sequence[str]], dict[str, Any]]:
    """The tokenization an encoder applies to texts (padded, truncated to ``max_length``, torch tensors)."""
    return _Tokenize(tokenizer, padding, max_length)


__all__ = ["SAMPLE_TEXTS", "TextSideRunner", "tokenizer_call"]
