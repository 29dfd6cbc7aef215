"""The one input layer: what ``embed``, ``embed-text``, ``eval``, ``compare`` and fine-tuning read.

An input is one of:

- a folder (walked recursively; files with an image extension, hidden entries skipped),
- a glob (``"photos/**/*.jpg"``, quoted so the shell leaves it; ``**`` recurses),
- a text file of image paths, one per line (``#`` comments and blank lines skipped),
- a Parquet or CSV/TSV table with a column of paths, or (Parquet) of encoded image bytes or of
  ``{bytes, path}`` structs as ``datasets`` exports its ``Image`` feature,
- a Hugging Face dataset: ``hf:NAME[?config=CFG&split=SPLIT&revision=REV]`` (a hub id, a local folder
  of data files, or a folder written by ``save_to_disk``); ``--split`` overrides ``split=``,
- a single image file.

Every input becomes a list of :class:`Record` (stable id, printable source, how to read it, and the
optional annotations ``label``, ``captions``, ``split``, ``metadata``) in an :class:`InputListing`.
Relative paths inside a list or table are read from the folder of that list or table. Columns are
found by one guesser (:func:`~phiclip.inputs.records.guess_column`): the image column by name
(``image``, ``path``, ``file``...) or as the only usable column, labels by ``label``/``class``... or a
``ClassLabel`` feature, captions by ``caption``/``text``..., and a ``split`` column.

- :func:`list_inputs` / :func:`list_texts`: images / texts to embed (files in ``embed``'s order).
- :func:`load_data`: :class:`LabelledData` for ``eval``, ``compare`` and fine-tuning, built from the
  same listing (a folder per class gives labels from folder names).

Where a new kind of input goes: a module here that returns an :class:`InputListing`, and one branch in
:func:`~phiclip.inputs.listing.list_inputs` (and :func:`load_data` if it has labels).
"""

from __future__ import annotations

from phiclip.inputs.files import list_folder, list_glob, list_image_file, list_path_file
from phiclip.inputs.hf import HFSource, list_hf, parse_hf
from phiclip.inputs.labelled import LabelledData, align_label_spaces, from_listing, load_data
from phiclip.inputs.listing import InputOptions, list_inputs, list_texts
from phiclip.inputs.records import (
    IMAGE_EXTENSIONS,
    DataError,
    InputError,
    InputListing,
    PayloadReader,
    Record,
    guess_column,
    record_id,
)
from phiclip.inputs.sources import SOURCES
from phiclip.inputs.tables import list_table, read_csv_table

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataError",
    "HFSource",
    "InputError",
    "InputListing",
    "InputOptions",
    "LabelledData",
    "SOURCES",
    "PayloadReader",
    "Record",
    "align_label_spaces",
    "from_listing",
    "guess_column",
    "list_folder",
    "list_glob",
    "list_hf",
    "list_image_file",
    "list_inputs",
    "list_path_file",
    "list_table",
    "list_texts",
    "load_data",
    "parse_hf",
    "read_csv_table",
    "record_id",
]
