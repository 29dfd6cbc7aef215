"""Former home of the evaluation data readers; they are now part of the one input layer,
:mod:`phiclip.inputs` (:func:`~phiclip.inputs.load_data` and :class:`~phiclip.inputs.LabelledData`).
These names stay importable from here."""

from __future__ import annotations

import os
from pathlib import Path

from phiclip.inputs import DataError, LabelledData, align_label_spaces, load_data, read_csv_table
from phiclip.inputs.records import TABLE_SUFFIXES


def load_table(path: str | os.PathLike[str], **options: str | None) -> LabelledData:
    """A CSV/TSV or Parquet table of (image, label) and/or (image, caption) rows (:func:`load_data`)."""
    if Path(path).suffix.lower() not in TABLE_SUFFIXES:
        raise DataError(f"{path}: not a .csv, .tsv or .parquet file")
    return load_data(path, **options)


__all__ = ["DataError", "LabelledData", "align_label_spaces", "load_data", "load_table", "read_csv_table"]
