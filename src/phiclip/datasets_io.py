"""Labelled image data for evaluation: a folder per class, a CSV/Parquet table, a Hugging Face dataset.

Every loader returns a :class:`LabelledData`: the images (file paths, PIL images or encoded bytes,
all accepted by :func:`phiclip.images.load_image`), integer labels with their class names, the
captions of each image, and the split of each image when the source says.

- **Folder per class**: ``ROOT/<class>/**/<image>``; or ``ROOT/<split>/<class>/...`` with split
  folders named ``train``, ``test``, ``val``, ``validation`` or ``valid``. Classes are the folder
  names in sorted order. Files PIL does not recognise by extension and hidden files are skipped.
- **CSV / Parquet**: one row per (image, label) or (image, caption). The image column (``image``,
  ``path``, ``file``, ``filename``, ``image_path`` or ``filepath``, or ``--image-column``) holds paths
  relative to the table's folder (or absolute), or, in Parquet, encoded bytes or ``{bytes, path}``
  structs. The label column (``label``, ``labels``, ``class``, ``category``) holds names or integers.
  The caption column (``caption``, ``captions``, ``text``, ``sentence``) holds one text or a list; rows
  repeating an image add captions to it. A ``split`` column, when present, gives each row's split.
- **Hugging Face**: ``hf:NAME`` (hub id or a local directory; ``hf:NAME?config=CFG`` for a
  configuration) through ``datasets.load_dataset``, or a directory written by ``save_to_disk``
  through ``datasets.load_from_disk``. The image column is the first ``Image`` feature and the label
  column the first ``ClassLabel`` (whose names become the class names), unless named.

Missing files, unknown columns and unreadable tables raise :class:`DataError` naming the input.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

SPLIT_NAMES = ("train", "test", "val", "validation", "valid")
IMAGE_COLUMNS = ("image", "img", "path", "file", "filename", "image_path", "filepath", "file_name")
LABEL_COLUMNS = ("label", "labels", "class", "category", "fine_label")
CAPTION_COLUMNS = ("caption", "captions", "text", "sentence", "sentences")
SPLIT_COLUMN = "split"


class DataError(ValueError):
    """Evaluation data cannot be read as asked."""


@dataclass
class LabelledData:
    """Images with labels and/or captions.

    ``images``: n items (path strings, PIL images or bytes). ``labels``: (n,) int64 indices into
    ``classnames`` (or raw integer labels when ``classnames`` is ``None``). ``captions``: n lists of
    texts. ``splits``: n split names, when the source has splits. ``source``: what was read.
    """

    images: list[Any]
    labels: np.ndarray | None = None
    classnames: list[str] | None = None
    captions: list[list[str]] | None = None
    splits: list[str] | None = None
    source: str = ""

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, indices: Sequence[int] | np.ndarray) -> LabelledData:
        """The rows at ``indices`` (same class names)."""
        idx = np.asarray(indices, dtype=np.int64)
        return replace(
            self,
            images=[self.images[i] for i in idx],
            labels=None if self.labels is None else self.labels[idx],
            captions=None if self.captions is None else [self.captions[i] for i in idx],
            splits=None if self.splits is None else [self.splits[i] for i in idx],
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


# --- helpers -----------------------------------------------------------------------------------

#: The largest block pyarrow's CSV reader accepts (an int32): no cell can be longer.
_MAX_CSV_BLOCK = 2**31 - 1


def read_csv_table(path: str | os.PathLike, *, delimiter: str = ",", columns: Sequence[str] | None = None) -> Any:
    """Read a CSV/TSV file with pyarrow, whatever the length of its cells.

    pyarrow parses in blocks (1 MiB by default) and refuses a cell longer than a block ("straddling
    object straddles two block boundaries"); the file is then read again in one block as large as
    the file (at most 2 GiB, the largest pyarrow takes), so a 50 MB caption reads fine. Only a cell
    that still does not fit is refused, with a ``ValueError`` naming the file and the fix.

    Args:
        path: the file. delimiter: ``","`` or ``"\\t"``. columns: read only these (``None``: all).
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv

    parse = pacsv.ParseOptions(delimiter=delimiter)
    convert = pacsv.ConvertOptions(include_columns=list(columns) if columns else None)
    try:
        return pacsv.read_csv(path, parse_options=parse, convert_options=convert)
    except pa.ArrowInvalid as e:
        if "straddl" not in str(e):
            raise
    read = pacsv.ReadOptions(block_size=min(max(os.path.getsize(path) + 1, 1 << 20), _MAX_CSV_BLOCK))
    try:
        return pacsv.read_csv(path, read_options=read, parse_options=parse, convert_options=convert)
    except pa.ArrowInvalid as e:
        if "straddl" not in str(e):
            raise
        raise ValueError(
            f"{path}: a cell is longer than pyarrow's CSV reader can take (2 GiB); convert the table to Parquet "
            "(or split the long cells) and use that"
        ) from None


def _image_extensions() -> set[str]:
    from PIL import Image

    return {ext.lower() for ext in Image.registered_extensions()}


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


def _check_files_exist(paths: Sequence[str], source: str) -> None:
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        from phiclip.schema import path_to_source  # names that are not UTF-8 stay printable

        shown = ", ".join(path_to_source(m) for m in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DataError(
            f"{source}: {len(missing)} image file(s) do not exist: {shown}; image paths are read relative "
            "to the table's folder, fix them or remove those rows"
        )


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


# --- folder per class --------------------------------------------------------------------------


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def load_folder(root: str | Path, *, split: str | None = None) -> LabelledData:
    """``ROOT/<class>/<images>`` or ``ROOT/<split>/<class>/<images>`` -> :class:`LabelledData`.

    Args:
        root: the folder. split: with split folders, read only this one (default: all, with
            ``splits`` set).
    """
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DataError(f"{base}: no such directory")
    subdirs = _class_dirs(base)
    split_dirs = [d for d in subdirs if d.name.lower() in SPLIT_NAMES]
    has_splits = bool(split_dirs) and len(split_dirs) == len(subdirs)
    if split is not None:
        if not has_splits:
            raise DataError(f"{base}: has no split folders ({', '.join(SPLIT_NAMES)}), so split {split!r} does not apply")
        chosen = [d for d in split_dirs if d.name == split]
        if not chosen:
            raise DataError(f"{base}: no split folder {split!r}; found {', '.join(d.name for d in split_dirs)}")
        split_dirs = chosen
    exts = _image_extensions()
    groups = [(d.name, d) for d in split_dirs] if has_splits else [(None, base)]
    rows: list[tuple[str, str, str | None]] = []  # (path, class name, split)
    for split_name, folder in groups:
        for cdir in _class_dirs(folder):
            for p in sorted(cdir.rglob("*")):
                if p.is_file() and p.suffix.lower() in exts and not p.name.startswith("."):
                    rows.append((str(p), cdir.name, split_name))
    if not rows:
        raise DataError(
            f"{base}: no images found in class folders; expected {base}/<class>/<image files> "
            f"(or {base}/<train|test>/<class>/...)"
        )
    names = sorted({c for _, c, _ in rows})
    lookup = {n: i for i, n in enumerate(names)}
    return LabelledData(
        images=[p for p, _, _ in rows],
        labels=np.asarray([lookup[c] for _, c, _ in rows], dtype=np.int64),
        classnames=names,
        captions=None,
        splits=[s for _, _, s in rows] if has_splits and split is None else None,
        source=str(base) if split is None else f"{base} [{split}]",
    )


# --- tables ------------------------------------------------------------------------------------


def _pick_column(columns: Sequence[str], wanted: str | None, candidates: Sequence[str], what: str, source: str) -> str | None:
    if wanted is not None:
        if wanted not in columns:
            raise DataError(f"{source}: no column {wanted!r} for the {what}; columns: {', '.join(columns)}")
        return wanted
    lower = {c.lower(): c for c in columns}
    for cand in candidates:
        if cand in lower:
            return lower[cand]
    return None


def _caption_list(value: Any, source: str) -> list[str]:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, (list, tuple, np.ndarray)):
        out = []
        for v in value:
            if isinstance(v, dict) and "raw" in v:  # e.g. {"raw": "...", "tokens": [...]}
                v = v["raw"]
            if not isinstance(v, str):
                raise DataError(f"{source}: a caption is {type(v).__name__}, not text")
            if v.strip():
                out.append(v)
        return out
    raise DataError(f"{source}: a caption is {type(value).__name__}, not text or a list of texts")


def _image_item(value: Any, base: Path, source: str) -> tuple[Any, str]:
    """A table cell -> (image input for load_image, a key that identifies the image)."""
    if isinstance(value, dict):  # {"bytes": ..., "path": ...} as Hugging Face writes images
        if value.get("bytes"):
            value = value["bytes"]
        elif value.get("path"):
            value = value["path"]
        else:
            raise DataError(f"{source}: an image cell has neither bytes nor a path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        return data, "sha1:" + hashlib.sha1(data, usedforsecurity=False).hexdigest()
    if isinstance(value, (str, os.PathLike)):
        text = str(value).strip()
        if not text:
            raise DataError(f"{source}: an image cell is empty")
        if "://" in text:
            raise DataError(f"{source}: image {text!r} is a URL; download the images and list local paths")
        path = Path(text).expanduser()
        path = path if path.is_absolute() else base / path
        return str(path), str(path)
    if value is None or (isinstance(value, float) and np.isnan(value)):
        raise DataError(f"{source}: some rows have no image; fill them in or remove those rows")
    # PIL images (e.g. from a decoded Hugging Face column)
    from PIL import Image

    if isinstance(value, Image.Image):
        return value, f"pil:{id(value)}"
    raise DataError(f"{source}: an image cell is {type(value).__name__}; expected a path, bytes or an image")


def _from_records(
    records: dict[str, list[Any]],
    *,
    image_col: str,
    label_col: str | None,
    caption_col: str | None,
    split_col: str | None,
    base: Path,
    source: str,
    split: str | None,
    classnames: list[str] | None = None,
    check_files: bool = True,
) -> LabelledData:
    """Column lists -> LabelledData. With captions, rows that repeat an image are merged into one
    image with all their captions; without, every row is one image (duplicates kept)."""
    n = len(records[image_col])
    keep = range(n)
    if split is not None:
        if split_col is None:
            raise DataError(f"{source}: has no {SPLIT_COLUMN!r} column, so split {split!r} cannot be selected")
        keep = [i for i in range(n) if str(records[split_col][i]) == split]
        if not keep:
            found = sorted({str(s) for s in records[split_col]})
            raise DataError(f"{source}: no rows in split {split!r}; splits: {', '.join(found)}")
    order: dict[str, int] = {}
    images: list[Any] = []
    captions: list[list[str]] = []
    row_labels: list[Any] = []
    splits: list[str] = []
    group = caption_col is not None  # rows repeating an image are one image with several captions
    for i in keep:
        item, key = _image_item(records[image_col][i], base, source)
        label = records[label_col][i] if label_col else None
        if group and key in order:
            j = order[key]
            if label_col and row_labels[j] != label:
                raise DataError(f"{source}: image {key} appears with two labels ({row_labels[j]!r}, {label!r})")
        else:
            j = len(images)
            if group:
                order[key] = j
            images.append(item)
            captions.append([])
            row_labels.append(label)
            splits.append(str(records[split_col][i]) if split_col else "")
        if caption_col:
            captions[j].extend(_caption_list(records[caption_col][i], source))
    if not images:
        raise DataError(f"{source}: no rows")
    if check_files:
        _check_files_exist([im for im in images if isinstance(im, str)], source)
    labels, names = (None, None)
    if label_col:
        labels, names = _labels_from_values(row_labels, source)
        if classnames is not None:  # names given by the source (a ClassLabel feature)
            if labels.max() >= len(classnames):
                raise DataError(f"{source}: label {int(labels.max())} has no class name ({len(classnames)} names)")
            names = list(classnames)
    return LabelledData(
        images=images,
        labels=labels,
        classnames=names,
        captions=captions if caption_col else None,
        splits=splits if split_col and split is None else None,
        source=source if split is None else f"{source} [{split}]",
    )


def load_table(
    path: str | Path,
    *,
    split: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    caption_column: str | None = None,
) -> LabelledData:
    """A CSV/TSV or Parquet file of (image, label) and/or (image, caption) rows -> :class:`LabelledData`.

    Args:
        path: the table; relative image paths are read from its folder.
        split: keep the rows whose ``split`` column equals this.
        image_column, label_column, caption_column: column names when not the usual ones.
    """
    file = Path(path).expanduser()
    source = str(file)
    if not file.is_file():
        raise DataError(f"{source}: no such file")
    suffix = file.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(file)
            records = {name: table.column(name).to_pylist() for name in table.column_names}
        elif suffix in (".csv", ".tsv"):
            table = read_csv_table(file, delimiter="\t" if suffix == ".tsv" else ",")
            records = {name: table.column(name).to_pylist() for name in table.column_names}
        else:
            raise DataError(f"{source}: not a .csv, .tsv or .parquet file")
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - pyarrow raises many kinds for malformed files
        raise DataError(f"{source}: cannot be read as a table ({type(e).__name__}: {e})") from None
    columns = list(records)
    image_col = _pick_column(columns, image_column, IMAGE_COLUMNS, "images", source)
    if image_col is None:
        raise DataError(f"{source}: no image column (one of {', '.join(IMAGE_COLUMNS)}); name it with --image-column")
    label_col = _pick_column(columns, label_column, LABEL_COLUMNS, "labels", source)
    caption_col = _pick_column(columns, caption_column, CAPTION_COLUMNS, "captions", source)
    if label_col is None and caption_col is None:
        raise DataError(
            f"{source}: no label column ({', '.join(LABEL_COLUMNS)}) and no caption column "
            f"({', '.join(CAPTION_COLUMNS)}); name one with --label-column or --caption-column"
        )
    split_col = SPLIT_COLUMN if SPLIT_COLUMN in columns else None
    return _from_records(
        records,
        image_col=image_col,
        label_col=label_col,
        caption_col=caption_col,
        split_col=split_col,
        base=file.parent,
        source=source,
        split=split,
    )


# --- Hugging Face datasets ---------------------------------------------------------------------


def _parse_hf(spec: str) -> tuple[str, dict[str, str]]:
    rest = spec[len("hf:") :]
    name, _, query = rest.partition("?")
    options: dict[str, str] = {}
    for part in query.replace(",", "&").split("&") if query else []:
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise DataError(f"{spec}: option {part!r} is not key=value")
        options[key.strip()] = value.strip()
    if not name.strip():
        raise DataError(f"{spec}: names no dataset; write hf:<hub id or directory>")
    unknown = set(options) - {"config", "split", "revision"}
    if unknown:
        raise DataError(f"{spec}: unknown option(s) {', '.join(sorted(unknown))}; known: config, split, revision")
    return name.strip(), options


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "state.json", "dataset_info.json"))


def _hf_splits(spec: str, split: str | None) -> list[tuple[str | None, Any]]:
    """Load a Hugging Face dataset -> [(split name or None, Dataset)]."""
    import datasets

    name, options = _parse_hf(spec)
    split = split or options.get("split")
    local = Path(name).expanduser()
    try:
        if _is_saved_dataset(local):
            loaded = datasets.load_from_disk(str(local))
            if isinstance(loaded, datasets.DatasetDict) and split is not None:
                if split not in loaded:
                    raise DataError(f"{spec}: no split {split!r}; splits: {', '.join(loaded)}")
                loaded = loaded[split]
            elif isinstance(loaded, datasets.Dataset) and split is not None:
                raise DataError(f"{spec}: a single saved split; drop the split option ({split!r})")
        else:
            loaded = datasets.load_dataset(
                str(local) if local.is_dir() else name,
                options.get("config"),
                split=split,
                revision=options.get("revision"),
            )
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds (offline, missing config, ...)
        raise DataError(
            f"{spec}: cannot load the dataset ({type(e).__name__}: {e}); check the name, config and split, "
            "and that the hub is reachable (or give a local directory)"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        return [(k, loaded[k]) for k in loaded]
    return [(split, loaded)]


def load_hf(
    spec: str,
    *,
    split: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    caption_column: str | None = None,
) -> LabelledData:
    """``hf:NAME[?config=..&split=..]`` (hub id, local dataset folder or ``save_to_disk`` output) -> LabelledData.

    Images are taken encoded (the ``Image`` feature with ``decode=False``) and decoded later by
    :func:`phiclip.images.load_image`. ``split`` accepts the ``datasets`` slice syntax (``test[:500]``).
    """
    import datasets

    parts = _hf_splits(spec, split)
    first = parts[0][1]
    features = first.features
    columns = list(features)
    image_col = image_column or next((c for c in columns if isinstance(features[c], datasets.Image)), None)
    image_col = _pick_column(columns, image_col, IMAGE_COLUMNS, "images", spec)
    if image_col is None:
        raise DataError(f"{spec}: no Image feature or image column; columns: {', '.join(columns)}; use --image-column")
    label_col = label_column or next((c for c in columns if isinstance(features[c], datasets.ClassLabel)), None)
    label_col = _pick_column(columns, label_col, LABEL_COLUMNS, "labels", spec)
    caption_col = _pick_column(columns, caption_column, CAPTION_COLUMNS, "captions", spec)
    if label_col is None and caption_col is None:
        raise DataError(f"{spec}: no label or caption column; columns: {', '.join(columns)}; use --label-column/--caption-column")
    classnames = features[label_col].names if label_col and isinstance(features[label_col], datasets.ClassLabel) else None
    records: dict[str, list[Any]] = {image_col: [], "__split__": []}
    for col in (label_col, caption_col):
        if col:
            records[col] = []
    for split_name, ds in parts:
        if isinstance(ds.features[image_col], datasets.Image):
            ds = ds.cast_column(image_col, datasets.Image(decode=False))
        cols = ds.select_columns([c for c in (image_col, label_col, caption_col) if c]).to_dict()
        for c, values in cols.items():
            records[c].extend(values)
        records["__split__"].extend([split_name or ""] * len(ds))
    local = Path(_parse_hf(spec)[0]).expanduser()
    base = local if local.is_dir() else Path.cwd()
    multi = len(parts) > 1
    data = _from_records(
        records,
        image_col=image_col,
        label_col=label_col,
        caption_col=caption_col,
        split_col="__split__" if multi else None,
        base=base,
        source=spec,
        split=None,
        classnames=classnames,
    )
    if not multi and (split or parts[0][0]):
        data.source = f"{spec} [{split or parts[0][0]}]"
    return data


# --- one entry point ---------------------------------------------------------------------------


def load_data(
    data: str | Path,
    *,
    split: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    caption_column: str | None = None,
) -> LabelledData:
    """Read evaluation data from a folder per class, a CSV/TSV/Parquet file or ``hf:NAME``.

    Args:
        data: what to read (see the module docstring for the layouts).
        split: one split only (a split folder, the ``split`` column's value, or a Hugging Face split).
        image_column, label_column, caption_column: for tables and Hugging Face datasets.
    """
    text = str(data)
    cols = dict(image_column=image_column, label_column=label_column, caption_column=caption_column)
    if text.startswith("hf:"):
        return load_hf(text, split=split, **cols)
    path = Path(text).expanduser()
    if path.is_dir():
        if any(v is not None for v in cols.values()):
            raise DataError(f"{path}: column options apply to tables and Hugging Face datasets, not to a folder per class")
        return load_folder(path, split=split)
    if path.suffix.lower() in (".csv", ".tsv", ".parquet"):
        return load_table(path, split=split, **cols)
    if not path.exists():
        raise DataError(f"{text}: no such file or directory (for a Hugging Face dataset write hf:{text})")
    raise DataError(f"{text}: not a folder, a .csv/.tsv/.parquet file or hf:NAME")


__all__ = [
    "DataError",
    "LabelledData",
    "align_label_spaces",
    "load_data",
    "load_folder",
    "load_hf",
    "load_table",
    "read_csv_table",
]
