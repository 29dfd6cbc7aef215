"""Labelled and captioned images for ``eval``, ``compare`` and fine-tuning, built from the same
listing as ``embed`` (:func:`~phiclip.inputs.listing.list_inputs`).

- **Folder per class**: ``ROOT/<class>/**/<image>``; or ``ROOT/<split>/<class>/...`` when every
  subfolder is named ``train``, ``test``, ``val``, ``validation`` or ``valid``. Classes are the folder
  names in sorted order; an image directly under ``ROOT`` (in no class folder) is left out and named.
- **CSV / Parquet**: one row per (image, label) and/or (image, caption). Labels are names or
  integers; captions a text or a list. With captions, rows repeating an image add captions to it;
  without, every row is one image. A ``split`` column gives each row's split.
- **hf:NAME[?config=..&split=..]**: the label column is the first ``ClassLabel`` feature (its names
  are the class names) unless named; without a split every split is read, with its name.
- **A glob or a list of paths**: images without labels (``compare`` takes them).

:class:`LabelledData` holds what each image's reader gives (paths, bytes or PIL images), with its
printable ``sources`` and ``left_out``: inputs the listing could not use, with the reason.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from phiclip.inputs.files import has_glob, list_folder
from phiclip.inputs.hf import list_hf
from phiclip.inputs.listing import list_inputs
from phiclip.inputs.records import (
    CAPTION_COLUMNS,
    LABEL_COLUMNS,
    SPLIT_NAMES,
    TABLE_SUFFIXES,
    DataError,
    InputListing,
    Record,
    Unreadable,
)
from phiclip.inputs.tables import list_table
from phiclip.schema import path_to_source


@dataclass
class LabelledData:
    """Images with labels and/or captions.

    ``images``: n items (path strings, PIL images or bytes). ``labels``: (n,) int64 indices into
    ``classnames`` (or raw integer labels when ``classnames`` is ``None``). ``captions``: n lists of
    texts. ``splits``: n split names, when the source has splits. ``source``: what was read.
    ``sources``: n printable names (``None``: the paths themselves, else ``SOURCE#i``).
    ``left_out``: ``{"source", "stage", "reason"}`` of each input that is not among the images.
    """

    images: list[Any]
    labels: np.ndarray | None = None
    classnames: list[str] | None = None
    captions: list[list[str]] | None = None
    splits: list[str] | None = None
    source: str = ""
    sources: list[str] | None = None
    left_out: list[dict[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def name_of(self, i: int) -> str:
        """The printable name of image ``i``."""
        if self.sources is not None:
            return self.sources[i]
        image = self.images[i]
        if isinstance(image, (str, os.PathLike)):
            return path_to_source(image)
        return f"{self.source}#{i}"

    def subset(self, indices: Sequence[int] | np.ndarray) -> LabelledData:
        """The rows at ``indices`` (same class names)."""
        idx = np.asarray(indices, dtype=np.int64)
        return replace(
            self,
            images=[self.images[i] for i in idx],
            labels=None if self.labels is None else self.labels[idx],
            captions=None if self.captions is None else [self.captions[i] for i in idx],
            splits=None if self.splits is None else [self.splits[i] for i in idx],
            sources=None if self.sources is None else [self.sources[i] for i in idx],
            left_out=list(self.left_out),
        )

    def select_split(self, name: str) -> LabelledData:
        """The rows of one split (same class names)."""
        if self.splits is None:
            raise DataError(f"{self.source}: has no splits, so split {name!r} cannot be selected")
        idx = [i for i, s in enumerate(self.splits) if s == name]
        if not idx:
            raise DataError(f"{self.source}: no rows in split {name!r}; splits: {', '.join(sorted(set(self.splits)))}")
        out = self.subset(idx)
        out.source = f"{self.source} [{name}]"
        return out

    def texts_and_owners(self) -> tuple[list[str], np.ndarray]:
        """All captions flattened, and (T,) the index of each caption's image (for retrieval)."""
        if self.captions is None:
            raise DataError(f"{self.source}: has no captions; retrieval needs (image, caption) data")
        texts = [t for caps in self.captions for t in caps]
        owners = np.asarray([i for i, caps in enumerate(self.captions) for _ in caps], dtype=np.int64)
        if not texts:
            raise DataError(f"{self.source}: every caption is empty; retrieval needs (image, caption) data")
        return texts, owners


def _labels_from_values(values: Sequence[Any], source: str) -> tuple[np.ndarray, list[str] | None]:
    """Label values (names or integers) -> (int64 labels, class names or None for integers)."""
    if any(v is None or (isinstance(v, float) and np.isnan(v)) or (isinstance(v, str) and not v.strip()) for v in values):
        raise DataError(f"{source}: some rows have no label; fill them in or remove those rows")
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        arr = np.asarray(values, dtype=np.int64)
        if len(arr) and arr.min() < 0:
            raise DataError(f"{source}: integer labels must be >= 0, found {int(arr.min())}")
        return arr, None
    names = sorted({str(v) for v in values})
    lookup = {n: i for i, n in enumerate(names)}
    return np.asarray([lookup[str(v)] for v in values], dtype=np.int64), names


def align_label_spaces(a: LabelledData, b: LabelledData) -> tuple[LabelledData, LabelledData]:
    """Give two datasets (e.g. train and test loaded apart) one label space, matched by class name."""
    if a.classnames == b.classnames:
        return a, b
    if a.classnames is None or b.classnames is None:
        raise DataError(f"{a.source} and {b.source}: one has named classes and the other integer labels")
    names = sorted(set(a.classnames) | set(b.classnames))
    lookup = {n: i for i, n in enumerate(names)}

    def remap(d: LabelledData) -> LabelledData:
        assert d.classnames is not None
        labels = None if d.labels is None else np.asarray([lookup[d.classnames[i]] for i in d.labels], dtype=np.int64)
        return replace(d, labels=labels, classnames=names)

    return remap(a), remap(b)


def _left(source: str, reason: str, stage: str = "skip") -> dict[str, str]:
    return {"source": source, "stage": stage, "reason": reason}


def from_listing(
    listing: InputListing,
    *,
    source: str,
    labels_from: str = "records",
    splits: bool = True,
    left_out: Sequence[dict[str, str]] = (),
) -> LabelledData:
    """Build :class:`LabelledData` from the records of a listing (read through its reader).

    Records that failed while listing are left out and named. ``labels_from="records"`` takes each
    record's ``label``; ``splits``: keep each record's split (when they differ).
    """
    lost = list(left_out)
    good: list[Record] = []
    images: list[Any] = []
    listed = [r for r in listing.records if r.error is None]
    lost += [_left(r.source, r.error, "read") for r in listing.records if r.error is not None]
    # Each record read by its kind's source; a file stays its path (checked when it is opened), so that the
    # missing files of a table are refused as a whole (_strict).
    remote = [r for r in listed if r.kind != "file"]
    read = dict(zip((r.id for r in remote), listing.reader.read(remote)))
    for r, payload in ((r, read[r.id] if r.kind != "file" else r.locator) for r in listed):
        if isinstance(payload, Unreadable):
            lost.append(_left(r.source, payload.reason, payload.stage))
        else:
            good.append(r)
            images.append(payload)
    if not good:
        raise DataError(f"{source}: no images" + (f" ({len(lost)} left out: {lost[0]['source']}: {lost[0]['reason']})"
                                                  if lost else ""))
    labels, names = None, None
    if any(r.label is not None for r in good):
        labels, names = _labels_from_values([r.label for r in good], source)
        if listing.classnames is not None:  # names given by the source (a ClassLabel feature)
            if labels.max() >= len(listing.classnames):
                raise DataError(f"{source}: label {int(labels.max())} has no class name ({len(listing.classnames)} names)")
            names = list(listing.classnames)
    has_captions = listing.description.get("caption_column") is not None
    split_names = [r.split or "" for r in good]
    return LabelledData(
        images=images,
        labels=labels,
        classnames=names,
        captions=[list(r.captions) for r in good] if has_captions else None,
        splits=split_names if splits and len(set(split_names)) > 1 else None,
        source=source,
        sources=[r.source for r in good],
        left_out=lost,
    )


def _load_folder(root: Path, split: str | None) -> LabelledData:
    """``ROOT/<class>/<images>`` or ``ROOT/<split>/<class>/<images>``: the class (and split) of each
    image from its folders."""
    base = Path(root).expanduser()
    subdirs = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    split_dirs = [d for d in subdirs if d.lower() in SPLIT_NAMES]
    has_splits = bool(split_dirs) and len(split_dirs) == len(subdirs)
    if split is not None:
        if not has_splits:
            raise DataError(f"{base}: has no split folders ({', '.join(SPLIT_NAMES)}), so split {split!r} does not apply")
        if split not in split_dirs:
            raise DataError(f"{base}: no split folder {split!r}; found {', '.join(split_dirs)}")
    listing = list_folder(base)
    top = listing.description["location"]
    depth = 3 if has_splits else 2  # (split,) class, file
    kept: list[Record] = []
    lost: list[dict[str, str]] = []
    for r in listing.records:
        parts = Path(os.path.relpath(r.locator, os.path.abspath(base))).parts
        if r.error is not None:
            kept.append(r)
        elif len(parts) < depth:
            where = "a class folder inside a split folder" if has_splits else "a class folder"
            lost.append(_left(r.source, f"not in {where} ({top}/{'<split>/' if has_splits else ''}<class>/...)"))
        elif split is None or parts[0] == split:
            kept.append(replace(r, label=parts[depth - 2], split=parts[0] if has_splits else None))
    if not any(r.error is None for r in kept):
        raise DataError(
            f"{base}: no images found in class folders; expected {base}/<class>/<image files> "
            f"(or {base}/<train|test>/<class>/...)"
        )
    listing.records = kept
    name = str(base) if split is None else f"{base} [{split}]"
    return from_listing(listing, source=name, splits=has_splits and split is None, left_out=lost)


def load_data(
    data: str | os.PathLike[str],
    *,
    split: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    caption_column: str | None = None,
) -> LabelledData:
    """Read labelled or captioned images from a folder per class, a CSV/TSV/Parquet table,
    ``hf:NAME[?config=..&split=..]``, or (unlabelled) a glob or a list of paths.

    Args:
        data: what to read (see the module docstring for the layouts).
        split: one split only (a split folder, the ``split`` column's value, or a dataset split;
            overrides ``?split=``).
        image_column, label_column, caption_column: for tables and Hugging Face datasets.

    Raises:
        DataError: the data cannot be read as asked (the message names the input and the fix).
    """
    text = os.fspath(data)
    cols = dict(label_column=label_column, caption_column=caption_column)
    if text.startswith("hf:"):
        listing = list_hf(text, split=split, column=image_column, all_splits=True, **cols)
        _need_annotations(listing, text)
        parts = listing.description["split"].split(",")
        chosen = len(parts) == 1 and (split is not None or "split=" in text)
        return _strict(from_listing(listing, source=f"{text} [{parts[0]}]" if chosen else text), text)
    path = Path(text).expanduser()
    if path.is_dir():
        if any(v is not None for v in (image_column, label_column, caption_column)):
            raise DataError(f"{path}: column options apply to tables and Hugging Face datasets, not to a folder per class")
        return _load_folder(path, split)
    if path.suffix.lower() in TABLE_SUFFIXES and path.is_file():
        listing = list_table(path, image_column, split=split, keep_repeats=True, **cols)
        _need_annotations(listing, str(path))
        for r in listing.records:
            if r.error is not None:  # a URL of a scheme that is not fetched (http, https and data: are)
                raise DataError(f"{path}: image {r.source!r}: {r.error}")
        name = str(path) if split is None else f"{path} [{split}]"
        return _strict(from_listing(listing, source=name, splits=split is None), str(path))
    if not path.exists() and not has_glob(text):
        raise DataError(f"{text}: no such file or directory (for a Hugging Face dataset write hf:{text})")
    if split is not None or any(v is not None for v in (image_column, label_column, caption_column)):
        raise DataError(f"{text}: a list of images has no splits or columns; drop --split and the column options")
    return from_listing(list_inputs(text), source=text)


def _need_annotations(listing: InputListing, where: str) -> None:
    desc = listing.description
    if "label_column" not in desc and "caption_column" not in desc:
        raise DataError(
            f"{where}: no label column ({', '.join(LABEL_COLUMNS)}) and no caption column "
            f"({', '.join(CAPTION_COLUMNS)}); name one with --label-column or --caption-column"
        )


def _strict(data: LabelledData, where: str) -> LabelledData:
    """Tables name each image: a row whose file is missing is a mistake in the table, refused as a
    whole (usually the paths are relative to another folder)."""
    missing = [s for s, im in zip(data.sources or [], data.images) if isinstance(im, str) and not os.path.isfile(im)]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DataError(
            f"{where}: {len(missing)} image file(s) do not exist: {shown}; image paths are read relative "
            "to the table's folder, fix them or remove those rows"
        )
    return data
