"""Hugging Face datasets as inputs, with one grammar for every command::

    hf:NAME[?config=CFG&split=SPLIT&revision=REV]

``NAME`` is a hub id (``user/dataset``), a local folder of data files (read by
``datasets.load_dataset``) or a folder written by ``Dataset.save_to_disk`` /
``DatasetDict.save_to_disk``. A command's ``--split`` option overrides ``split=``; ``SPLIT`` may use
the ``datasets`` slice syntax (``test[:500]``) for hub and data-file datasets. Without a split,
``embed`` reads ``train`` and ``eval``/``compare`` read every split (and use their names). A
``Dataset`` saved on its own is the split ``train``. Options are joined by ``&``; the older
``hf:NAME?config=A,split=B`` is refused with the message to write ``&``.

Images are read undecoded (the ``Image`` feature with ``decode=False``), so workers get bytes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phiclip.inputs.files import checked_payload
from phiclip.inputs.records import (
    CAPTION_COLUMNS,
    IMAGE_COLUMNS,
    LABEL_COLUMNS,
    TEXT_COLUMNS,
    InputError,
    InputListing,
    Record,
    Source,
    guess_column,
    record_id,
)
from phiclip.inputs.tables import LABEL_KINDS, caption_list, unpack_image_struct
from phiclip.schema import path_to_source

#: The options ``hf:NAME?...`` takes.
HF_OPTIONS = ("config", "split", "revision")
#: Files that mark a folder written by ``save_to_disk``.
_SAVED_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")
#: The split read when none is given (by ``embed``).
DEFAULT_SPLIT = "train"


@dataclass(frozen=True)
class HFSource:
    """A parsed ``hf:`` input."""

    name: str
    config: str | None = None
    split: str | None = None
    revision: str | None = None

    @property
    def text(self) -> str:
        """The input as written in the grammar (without the split)."""
        opts = "&".join(f"{k}={v}" for k, v in (("config", self.config), ("revision", self.revision)) if v)
        return f"hf:{self.name}" + (f"?{opts}" if opts else "")

    @property
    def local(self) -> Path | None:
        """The local folder ``NAME`` names, if it is one."""
        p = Path(self.name).expanduser()
        return p if p.is_dir() else None

    @property
    def key(self) -> str:
        """What record sources start with: ``hf:NAME`` (a local folder as its absolute path), plus the config."""
        local = self.local
        at = path_to_source(os.path.abspath(local)) if local is not None else self.name
        return f"hf:{at}" + (f"?config={self.config}" if self.config else "")


def parse_hf(text: str, split: str | None = None) -> HFSource:
    """``hf:NAME[?config=CFG&split=SPLIT&revision=REV]`` -> :class:`HFSource`; ``split`` (a command's
    ``--split``) overrides the one written in the input.

    Raises:
        InputError: no name, an unknown option or an option that is not ``key=value``.
    """
    rest = text[len("hf:"):] if text.startswith("hf:") else text
    name, _, query = rest.partition("?")
    options: dict[str, str] = {}
    for part in query.split("&") if query else []:
        key, eq, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key:
            raise InputError(f"{text}: option {part!r} is not key=value; write hf:NAME?config=CFG&split=SPLIT")
        if "=" in value and "," in value:
            raise InputError(f"{text}: join the options with '&', not ',': hf:{name}?{query.replace(',', '&')}")
        options[key] = value
    if not name.strip():
        raise InputError(f"{text}: names no dataset; write hf:<hub id or folder>[?config=CFG&split=SPLIT]")
    unknown = set(options) - set(HF_OPTIONS)
    if unknown:
        raise InputError(f"{text}: unknown option(s) {', '.join(sorted(unknown))}; known: {', '.join(HF_OPTIONS)}")
    return HFSource(name=name.strip(), config=options.get("config") or None,
                    split=split or options.get("split") or None, revision=options.get("revision") or None)


def _is_saved(path: Path) -> bool:
    return any((path / f).is_file() for f in _SAVED_MARKERS)


def load_hf(src: HFSource, *, all_splits: bool = False) -> list[tuple[str, Any]]:
    """Load the dataset -> ``[(split name, datasets.Dataset)]``: the split asked for, else
    :data:`DEFAULT_SPLIT`, or with ``all_splits`` every split.

    Raises:
        InputError: ``datasets`` is missing, or the dataset or split cannot be loaded (naming the fix).
    """
    try:
        import datasets
    except ImportError:
        raise InputError(f"{src.text}: reading Hugging Face datasets needs `pip install datasets`") from None
    split = src.split or (None if all_splits else DEFAULT_SPLIT)
    local = src.local
    try:
        if local is not None and _is_saved(local):
            loaded = datasets.load_from_disk(str(local))
            if isinstance(loaded, datasets.Dataset):
                if split not in (None, DEFAULT_SPLIT):
                    raise InputError(f"{src.text}: a single saved split (read as {DEFAULT_SPLIT!r}); drop the split "
                                     f"({split!r})")
                return [(DEFAULT_SPLIT, loaded)]
        else:
            loaded = datasets.load_dataset(str(local) if local is not None else src.name, src.config, split=split,
                                           revision=src.revision)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds (not found, offline, bad split)
        raise InputError(
            f"{src.text}: cannot load the dataset ({type(e).__name__}: {e}); check the name, config and split "
            "(--split), and that the hub is reachable (or give a local folder)"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if split is None:
            return [(k, loaded[k]) for k in loaded]
        if split not in loaded:
            raise InputError(f"{src.text}: no split {split!r}; splits: {', '.join(loaded)}; pick one with "
                             "--split (or hf:NAME?split=SPLIT)")
        return [(split, loaded[split])]
    return [(str(split), loaded)]


def _feature_kind(feature: Any) -> str | None:
    import datasets

    if isinstance(feature, datasets.Image):
        return "image"
    if isinstance(feature, datasets.ClassLabel):
        return "classlabel"
    if isinstance(feature, datasets.Value):
        dt = str(feature.dtype)
        if dt in ("string", "large_string"):
            return "text"
        if dt in ("binary", "large_binary"):
            return "bytes"
        if dt.startswith(("int", "uint")):
            return "int"
        return None
    if isinstance(feature, (list, datasets.Sequence)) or type(feature).__name__ in ("LargeList", "List"):
        return "list"
    if isinstance(feature, dict) and "bytes" in feature:
        return "image"
    return None


class HFDatasetReader(Source):
    """The source of kind ``hf``: reads one column of Arrow-backed ``datasets.Dataset`` splits (memory-mapped, so cheap to share);
    a record's locator is ``(part, row)``, or a row of the first part."""

    kind = "hf"

    def __init__(self, dataset: Any, column: str) -> None:
        self.parts = dataset if isinstance(dataset, list) else [dataset]
        self.column = column

    def read(self, records: Any) -> list[Any]:
        """The bytes (or path, or PIL image) of each row."""
        where = [r.locator if isinstance(r.locator, tuple) else (0, r.locator) for r in records]
        out: list[Any] = [None] * len(where)
        for part in sorted({w[0] for w in where}):
            at = [j for j, w in enumerate(where) if w[0] == part]
            values = self.parts[part][[int(where[j][1]) for j in at]][self.column]
            for j, v in zip(at, values):
                out[j] = checked_payload(unpack_image_struct(v, None))
        return out


def list_hf(
    name: str,
    *,
    split: str | None = None,
    column: str | None = None,
    label_column: str | None = None,
    caption_column: str | None = None,
    metadata_columns: tuple[str, ...] = (),
    all_splits: bool = False,
) -> InputListing:
    """The rows of a Hugging Face dataset (``name`` with or without ``hf:`` and its options); images
    are read undecoded (bytes) by the reader. Record sources are ``hf:NAME/SPLIT#row=N``.

    Args:
        split: overrides the input's ``split=``; without either, ``train`` (or, with ``all_splits``,
            every split).
        column, label_column, caption_column: named columns (default: the first ``Image`` feature /
            ``ClassLabel`` feature, else the usual names).
        metadata_columns: carried on each record as they are.
    """
    import datasets

    src = parse_hf(name if name.startswith("hf:") else f"hf:{name}", split)
    parts = load_hf(src, all_splits=all_splits)  # first: it explains a missing `datasets` package
    features = parts[0][1].features
    kinds = {c: _feature_kind(f) for c, f in features.items()}
    where = src.text
    col = guess_column(where, kinds, column, candidates=IMAGE_COLUMNS, accept=("image", "text", "bytes"),
                       what="images", prefer=("image",))
    if col is None:
        raise InputError(f"{where}: no Image feature or image column (columns: {', '.join(kinds)}); "
                         "name it with --column")
    label_col = guess_column(where, kinds, label_column, candidates=LABEL_COLUMNS, accept=LABEL_KINDS, what="labels",
                             prefer=("classlabel",), exclude=(col,))
    caption_col = guess_column(where, kinds, caption_column, candidates=CAPTION_COLUMNS, accept=("text", "list"),
                               what="captions", exclude=(col, label_col))
    for m in metadata_columns:
        if m not in kinds:
            raise InputError(f"{where}: no column {m!r} for the metadata; its columns are {', '.join(kinds)}")
    classnames = list(features[label_col].names) if label_col and kinds[label_col] == "classlabel" else None
    records: list[Record] = []
    readers: list[Any] = []
    for p, (split_name, ds) in enumerate(parts):
        if isinstance(ds.features[col], datasets.Image):
            ds = ds.cast_column(col, datasets.Image(decode=False))
        readers.append(ds.select_columns([col]))
        extra = [c for c in dict.fromkeys([label_col, caption_col, *metadata_columns]) if c and c != col]
        values = ds.select_columns(extra).to_dict() if extra else {}
        for i in range(len(ds)):
            source = f"{src.key}/{split_name}#row={i}"
            ann: dict[str, Any] = {"split": split_name}
            if label_col:
                ann["label"] = values[label_col][i]
            if caption_col:
                ann["captions"] = caption_list(values[caption_col][i], where)
            if metadata_columns:
                ann["metadata"] = {m: values[m][i] for m in metadata_columns}
            records.append(Record(id=record_id(source), source=source, locator=(p, i) if len(parts) > 1 else i, kind="hf",
                                  **ann))
    desc: dict[str, Any] = {"kind": "hf", "location": src.key[len("hf:"):], "split": ",".join(s for s, _ in parts),
                            "column": col}
    if src.config:
        desc["config"] = src.config
    desc.update({k: v for k, v in (("label_column", label_col), ("caption_column", caption_col)) if v})
    return InputListing(desc, records, reader=HFDatasetReader(readers, col), classnames=classnames)


def hf_texts(name: str, *, split: str | None, column: str | None) -> tuple[list[Any], list[str], dict[str, Any]]:
    """The texts of a dataset's text column: ``(texts, sources, description)``."""
    src = parse_hf(name if name.startswith("hf:") else f"hf:{name}", split)
    ((split_name, ds),) = load_hf(src)
    kinds = {c: _feature_kind(f) for c, f in ds.features.items()}
    col = guess_column(src.text, kinds, column, candidates=TEXT_COLUMNS, accept=("text",), what="texts")
    if col is None:
        raise InputError(f"{src.text}: cannot tell which column holds the texts (columns: {', '.join(kinds)}); "
                         "name it with --column")
    texts = list(ds[col])
    sources = [f"{src.key}/{split_name}#row={i}" for i in range(len(texts))]
    desc = {"kind": "hf", "location": src.key[len("hf:"):], "split": split_name, "column": col}
    return texts, sources, desc
