"""Any input -> an :class:`~phiclip.inputs.records.InputListing`: the one dispatch every command uses."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phiclip.inputs.files import has_glob, list_folder, list_glob, list_image_file, list_path_file
from phiclip.inputs.hf import hf_texts, list_hf
from phiclip.inputs.records import (
    OTHER_DATA_SUFFIXES,
    TABLE_SUFFIXES,
    InputError,
    InputListing,
    Record,
    is_image_name,
    merge_repeats,
    record_id,
)
from phiclip.inputs.tables import list_table, table_texts
from phiclip.inputs.urls import URLSource
from phiclip.inputs.webdataset import is_webdataset, list_webdataset
from phiclip.schema import path_to_source

#: What every "cannot read this input" message says can be given.
INPUT_KINDS = ("a folder, a glob in quotes ('imgs/**/*.jpg'), a .txt list of paths or URLs, a Parquet/CSV table, "
               "WebDataset shards ('shards/{000..099}.tar') or hf:DATASET[?config=CFG&split=SPLIT]")


@dataclass(frozen=True)
class InputOptions:
    """How to read an input beyond its name: the image (or text) ``column``, the ``split`` of an
    ``hf:`` dataset (overriding ``?split=``), and the annotation columns (``None``: found by name)."""

    column: str | None = None
    split: str | None = None
    label_column: str | None = None
    caption_column: str | None = None
    metadata_columns: tuple[str, ...] = ()
    #: How URLs are fetched (``None``: :class:`phiclip.fetch.FetchOptions` defaults).
    fetch: Any = None


def _refuse_other_data(p: Path) -> None:
    if p.suffix.lower() in OTHER_DATA_SUFFIXES:
        raise InputError(f"{path_to_source(p)}: not a folder, a .csv/.tsv/.parquet table, a .txt list of paths, a "
                         f"glob or hf:NAME (a {p.suffix} file is none of them); give one of those")


def list_inputs(
    input: str | os.PathLike[str],
    *,
    column: str | None = None,
    split: str | None = None,
    options: InputOptions | None = None,
) -> InputListing:
    """List the images of any supported input: a folder, a glob, a text list of paths, a Parquet/CSV
    table, ``hf:NAME[?config=..&split=..]`` or one image file (see :mod:`phiclip.inputs`).

    ``column`` and ``split`` are shorthands for the fields of ``options``. ``split`` picks the split
    of an ``hf:`` dataset (default: the input's ``?split=``, else ``train``).

    Raises:
        InputError: the input does not exist, or a table/dataset column cannot be found.
    """
    opts = options or InputOptions()
    listing = _list_inputs(input, opts, column if column is not None else opts.column,
                           split if split is not None else opts.split)
    if any(r.kind == "url" for r in listing.records):
        # Built here, not on first read, so that the step sees the source's ``prefetch`` before it starts:
        # without it no chunk is fetched while the previous one is encoded.
        listing.reader.sources["url"] = URLSource(opts.fetch)  # type: ignore[attr-defined]
    return listing


def _list_inputs(input: str | os.PathLike[str], opts: InputOptions, col: str | None, sp: str | None) -> InputListing:
    s = os.fspath(input)
    if is_webdataset(s):
        return list_webdataset(s, opts.fetch)
    if s.startswith("hf:"):
        return list_hf(s, split=sp, column=col, label_column=opts.label_column, caption_column=opts.caption_column,
                       metadata_columns=opts.metadata_columns)
    p = Path(s).expanduser()
    if p.is_dir():
        return list_folder(p)
    if p.is_file():
        if p.suffix.lower() in TABLE_SUFFIXES:
            return list_table(p, col, label_column=opts.label_column, caption_column=opts.caption_column,
                              metadata_columns=opts.metadata_columns)
        if is_image_name(p.name):
            return list_image_file(p)
        _refuse_other_data(p)
        return list_path_file(p)
    if has_glob(s):
        return list_glob(s)
    raise InputError(f"{s}: no such file or folder; give {INPUT_KINDS}")


def list_texts(input: str | os.PathLike[str], *, column: str | None = None, split: str | None = None) -> InputListing:
    """Texts to embed: a text file (one text per line, blank lines skipped), a Parquet/CSV table
    with a text column, or ``hf:NAME``. A text's id is the hash of the text, so a repeated text is
    embedded once; ``source`` is ``FILE:LINE`` or ``FILE#row=N``."""
    s = os.fspath(input)
    texts: list[Any]
    if s.startswith("hf:"):
        texts, sources, desc = hf_texts(s, split=split, column=column)
    else:
        p = Path(s).expanduser().absolute()
        if not p.is_file():
            raise InputError(f"{s}: no such file; give a .txt file (one text per line), a Parquet/CSV table or hf:DATASET")
        at = path_to_source(p)
        if p.suffix.lower() in TABLE_SUFFIXES:
            texts, col = table_texts(p, column)
            sources = [f"{at}#row={i}" for i in range(len(texts))]
            desc = {"kind": "table", "location": at, "column": col}
        else:
            try:
                texts = p.read_text(encoding="utf-8").splitlines()
            except UnicodeDecodeError:
                raise InputError(f"{p}: not a UTF-8 text file; save it as UTF-8 (one text per line)") from None
            sources = [f"{at}:{i + 1}" for i in range(len(texts))]
            desc = {"kind": "text", "location": at}
    records: list[Record] = []
    ignored = 0
    for text, source in zip(texts, sources):
        if text is None or not str(text).strip():
            ignored += 1
            continue
        t = str(text).strip()
        records.append(Record(id=record_id(t), source=source, locator=t, kind="text"))
    records, dup = merge_repeats(records)
    return InputListing(desc, records, duplicates=dup, ignored=ignored)
