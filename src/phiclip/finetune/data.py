"""Training data for fine-tuning, read through phiclip's one input layer (:mod:`phiclip.inputs`).

- :func:`load_training_data`: a CSV/Parquet of (image, caption) or (image, label) rows, a folder per
  class, or ``hf:NAME`` -> :class:`~phiclip.inputs.LabelledData`. For (image, caption) training,
  class names become captions through templates (``a photo of a {c}.``).
- :func:`train_eval_split`: the data's own splits (``train`` and ``val``/``validation``/``test``) or
  a seeded hold-out (stratified by label when there are labels).
- :class:`ImageBatchLoader`: decodes and preprocesses the images of a batch on a thread pool; an image
  that cannot be decoded or preprocessed is skipped and counted, never fatal.
- :func:`data_fingerprint`: a hash of what the data holds (paths with their size and modification
  time, or the bytes), for caches and for refusing to resume on other data.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from phiclip.encoders.base import default_prep_threads
from phiclip.evaluate import fill_template, prompt_name, stratified_split
from phiclip.images import describe_source, try_load_image
from phiclip.inputs import DataError, LabelledData, load_data

#: Captions made from class names when the data has labels but no captions.
DEFAULT_CAPTION_TEMPLATES: tuple[str, ...] = ("a photo of a {c}.",)
#: Split names taken as the evaluation split, in order of preference.
EVAL_SPLIT_NAMES = ("val", "validation", "valid", "test")


def load_training_data(
    data: str | os.PathLike | LabelledData,
    *,
    need: str,
    templates: Sequence[str] | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    caption_column: str | None = None,
) -> LabelledData:
    """Read training data.

    Args:
        data: a folder per class, a CSV/TSV/Parquet file, ``hf:NAME`` or loaded data.
        need: ``"captions"`` (labels become captions through ``templates`` when there are no
            captions; images without any caption are dropped), ``"labels"`` or ``"images"``.

    Raises:
        DataError: the data cannot be read, or lacks what ``need`` asks for.
    """
    if isinstance(data, LabelledData):
        ds = data
    else:
        cols = dict(image_column=image_column, label_column=label_column, caption_column=caption_column)
        if not str(data).startswith("hf:") and os.path.isdir(os.path.expanduser(str(data))):
            cols = {}  # a folder per class has no columns
        ds = load_data(data, **cols)
    if need == "labels" and ds.labels is None:
        raise DataError(f"{ds.source}: has no labels; a probe needs (image, label) data (a folder per class or a label column)")
    if need == "captions":
        if ds.captions is None:
            if ds.labels is None or ds.classnames is None:
                raise DataError(
                    f"{ds.source}: has neither captions nor named labels; give (image, caption) rows or a folder per class"
                )
            temps = list(templates or DEFAULT_CAPTION_TEMPLATES)
            names = [prompt_name(n) for n in ds.classnames]
            ds = replace(ds, captions=[[fill_template(t, names[int(y)]) for t in temps] for y in ds.labels])
        keep = [i for i, caps in enumerate(ds.captions) if caps]
        if not keep:
            raise DataError(f"{ds.source}: every caption is empty")
        if len(keep) < len(ds):
            source = ds.source
            ds = ds.subset(keep)
            ds.source = source
    return ds


def train_eval_split(
    ds: LabelledData,
    *,
    eval_split: str | None = None,
    eval_fraction: float = 0.1,
    seed: int = 0,
    max_eval: int | None = None,
) -> tuple[LabelledData, LabelledData | None, str]:
    """``(train, eval or None, how)``: the data's ``train`` split and ``eval_split`` (default: the
    first of val, validation, valid, test present), else a seeded hold-out of ``eval_fraction`` of
    the images (stratified by label when labelled; ``eval_fraction=0`` holds nothing out).

    ``how`` states the real counts: a stratified hold-out takes ``round(eval_fraction * m)`` of each
    class of ``m >= 2`` images but at least one (and none of a class of one), an unlabelled one at
    least one image, so the share held out can be well above ``eval_fraction`` on small data; and at
    most ``max_eval`` of the held-out images are evaluated (the others are not trained on either)."""
    if ds.splits is not None and len(set(ds.splits)) > 1:
        names = set(ds.splits)
        if eval_split is not None and eval_split not in names:
            raise DataError(f"{ds.source}: no split {eval_split!r}; splits: {', '.join(sorted(names))}")
        ev = eval_split or next((n for n in EVAL_SPLIT_NAMES if n in names), None)
        train_name = "train" if "train" in names else None
        if ev is not None and train_name is not None:
            train, held = ds.select_split(train_name), ds.select_split(ev)
            capped = _cap(held, max_eval, seed)
            how = f"given splits (train / {ev}: {len(train)} / {len(held)} images)"
            return train, capped, how + _evaluated_note(capped, held)
    if eval_split is not None:
        raise DataError(f"{ds.source}: has no splits, so --eval-split {eval_split!r} does not apply; use --eval-fraction")
    if eval_fraction <= 0:
        return ds, None, "no evaluation split"
    if not eval_fraction < 1:
        raise DataError(f"--eval-fraction must be below 1, got {eval_fraction}")
    if ds.labels is not None:
        tr, te = stratified_split(ds.labels, eval_fraction, seed)
    else:
        order = np.random.default_rng(seed).permutation(len(ds))
        n_eval = min(len(ds) - 1, max(1, int(round(len(ds) * eval_fraction))))
        tr, te = np.sort(order[n_eval:]), np.sort(order[:n_eval])
    if len(te) == 0 or len(tr) == 0:
        raise DataError(f"{ds.source}: too few images ({len(ds)}) to hold out an evaluation split; add images or pass --eval-fraction 0")
    train, held = ds.subset(tr), ds.subset(te)
    train.source, held.source = f"{ds.source} [train]", f"{ds.source} [held out]"
    capped = _cap(held, max_eval, seed)
    share = len(te) / len(ds)
    parts = [f"{share:.0%}"] + (["stratified by label"] if ds.labels is not None else [])
    if round(share * 100) != round(eval_fraction * 100):
        rule = ("rounded per class, at least one of each class of two or more images" if ds.labels is not None
                else "rounded to whole images, at least one")
        parts.append(f"{eval_fraction:.0%} asked, {rule}")
    how = f"held out {len(te)} of {len(ds)} images ({'; '.join([*parts, f'seed {seed}'])})"
    return train, capped, how + _evaluated_note(capped, held)


def _evaluated_note(evaluated: LabelledData, held: LabelledData) -> str:
    """``, evaluated on N of them (--max-eval)`` when the evaluation set was capped."""
    return "" if len(evaluated) == len(held) else f", evaluated on {len(evaluated)} of them (--max-eval)"


def _cap(ds: LabelledData, max_items: int | None, seed: int) -> LabelledData:
    if max_items is None or len(ds) <= max_items:
        return ds
    keep = np.sort(np.random.default_rng(seed).permutation(len(ds))[:max_items])
    out = ds.subset(keep)
    out.source = f"{ds.source} (first {max_items} of a seeded shuffle)"
    return out


def _item_digest(item: Any) -> str:
    if isinstance(item, (str, os.PathLike)):
        try:
            st = os.stat(item)
            return f"path:{os.path.abspath(item)}:{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            return f"path:{os.path.abspath(item)}:missing"
    if isinstance(item, (bytes, bytearray, memoryview)):
        return "bytes:" + hashlib.blake2b(bytes(item), digest_size=16).hexdigest()
    if hasattr(item, "tobytes"):  # PIL images, arrays
        return "pixels:" + hashlib.blake2b(item.tobytes(), digest_size=16).hexdigest()
    return f"other:{item!r}"


def data_fingerprint(ds: LabelledData) -> str:
    """32 hex digits over every image (path, size, mtime; or bytes), label and caption, in order."""
    h = hashlib.blake2b(digest_size=16)
    for i, item in enumerate(ds.images):
        h.update(_item_digest(item).encode("utf-8", "surrogateescape"))
        if ds.labels is not None:
            h.update(f"|{int(ds.labels[i])}".encode())
        if ds.captions is not None:
            h.update(("|" + "\x1f".join(ds.captions[i])).encode("utf-8", "surrogateescape"))
        h.update(b"\n")
    if ds.classnames is not None:
        h.update("\x1f".join(ds.classnames).encode("utf-8", "surrogateescape"))
    return h.hexdigest()


@dataclass
class SkippedImages:
    """Images that could not be decoded or preprocessed: by index, with the reason."""

    reasons: dict[int, str] = field(default_factory=dict)

    def add(self, index: int, reason: str) -> None:
        """Record a failure (once per image)."""
        self.reasons.setdefault(int(index), reason)

    def __len__(self) -> int:
        return len(self.reasons)

    def summary(self, limit: int = 5) -> dict[str, Any]:
        """``{"count", "examples"}`` for metrics.json."""
        return {"count": len(self.reasons), "examples": [self.reasons[i] for i in sorted(self.reasons)[:limit]]}


class ImageBatchLoader:
    """Decode + preprocess the images at given indices on a thread pool (PIL releases the GIL).

    ``prepare(pil_image) -> item`` is the model's preprocessing. Failed images are skipped and
    recorded in ``skipped`` (the same image is not retried once it failed).
    """

    def __init__(self, images: Sequence[Any], prepare: Callable[[Any], Any], *, keep_alpha: bool = False,
                 threads: int | None = None, skipped: SkippedImages | None = None) -> None:
        self.images = images
        self.prepare = prepare
        self.keep_alpha = keep_alpha
        self.threads = max(1, threads or default_prep_threads())
        self.skipped = skipped if skipped is not None else SkippedImages()
        self._pool: ThreadPoolExecutor | None = None

    def _one(self, index: int) -> tuple[int, Any, str | None]:
        if index in self.skipped.reasons:
            return index, None, self.skipped.reasons[index]
        image, error = try_load_image(self.images[index], keep_alpha=self.keep_alpha)
        if error is not None:
            return index, None, str(error)
        try:
            return index, self.prepare(image), None
        except (ValueError, TypeError, OSError) as e:
            return index, None, f"{describe_source(self.images[index])}: cannot be preprocessed ({e})"

    def load(self, indices: Sequence[int]) -> tuple[list[int], list[Any]]:
        """``(kept indices, prepared items)`` in the order given, failures left out."""
        idx = [int(i) for i in indices]
        if self.threads > 1 and len(idx) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="phiclip-train-prep")
            results = list(self._pool.map(self._one, idx))
        else:
            results = [self._one(i) for i in idx]
        kept, items = [], []
        for i, item, error in results:
            if error is not None:
                self.skipped.add(i, error)
            else:
                kept.append(i)
                items.append(item)
        return kept, items

    def close(self) -> None:
        """Stop the thread pool."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


__all__ = [
    "DEFAULT_CAPTION_TEMPLATES",
    "ImageBatchLoader",
    "SkippedImages",
    "data_fingerprint",
    "load_training_data",
    "train_eval_split",
]
