"""CSV/TSV and Parquet tables as inputs: one row per image (or text), with optional annotations.

The image column holds paths (any table; relative paths are read from the table's folder), or in
Parquet encoded bytes or ``{bytes, path}`` structs as ``datasets`` exports its ``Image`` feature.
Optional columns ride along on each record: a label, captions (a text or a list of texts), a
``split`` and any metadata columns named. Columns are found by
:func:`~phiclip.inputs.records.guess_column` when not named.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from phiclip.inputs.files import checked_payload
from phiclip.inputs.records import (
    CAPTION_COLUMNS,
    IMAGE_COLUMNS,
    LABEL_COLUMNS,
    SPLIT_COLUMN,
    TEXT_COLUMNS,
    InputError,
    InputListing,
    Record,
    Source,
    guess_column,
    merge_repeats,
    path_record,
    record_id,
    resolve_against,
)
from phiclip.inputs.urls import remote_record
from phiclip.schema import path_to_source

#: The largest block pyarrow's CSV reader accepts (an int32): no cell can be longer.
_MAX_CSV_BLOCK = 2**31 - 1
#: How the image column's kind is named in a listing's description.
_IMAGE_KIND_NAMES = {"text": "path", "bytes": "bytes", "image": "struct"}
#: Column kinds a label may have.
LABEL_KINDS = ("text", "int", "classlabel")


def read_csv_table(path: str | os.PathLike[str], *, delimiter: str = ",", columns: Sequence[str] | None = None) -> Any:
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


def is_csv(path: Path) -> bool:
    """Whether a table is read as CSV/TSV (else Parquet)."""
    return path.suffix.lower() in (".csv", ".tsv")


def read_table(path: Path, columns: Sequence[str] | None = None) -> Any:
    """A pyarrow table of ``path`` (only ``columns`` when given).

    Raises:
        InputError: the file cannot be read as a table.
    """
    import pyarrow.parquet as pq

    try:
        if is_csv(path):
            return read_csv_table(path, delimiter="\t" if path.suffix.lower() == ".tsv" else ",", columns=columns)
        return pq.read_table(path, columns=list(columns) if columns is not None else None)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds for unreadable tables
        raise InputError(f"{path_to_source(path)}: cannot be read as a table ({type(e).__name__}: {e})") from None


def _schema(path: Path) -> Any:
    import pyarrow.parquet as pq

    if is_csv(path):
        return read_table(path).schema
    try:
        return pq.read_schema(path)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{path_to_source(path)}: cannot be read as a table ({type(e).__name__}: {e})") from None


def column_kind(typ: Any) -> str | None:
    """The kind of an Arrow type for :func:`~phiclip.inputs.records.guess_column`."""
    import pyarrow as pa

    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        return "text"
    if pa.types.is_binary(typ) or pa.types.is_large_binary(typ):
        return "bytes"
    if pa.types.is_struct(typ) and typ.get_field_index("bytes") >= 0:
        return "image"
    if pa.types.is_integer(typ):
        return "int"
    if pa.types.is_list(typ) or pa.types.is_large_list(typ):
        return "list"
    return None


def caption_list(value: Any, where: str) -> tuple[str, ...]:
    """A caption cell (a text, a list of texts or of ``{"raw": text}``, or empty) -> its texts."""
    if value is None or (isinstance(value, float) and value != value):
        return ()
    if isinstance(value, str):
        return (value,) if value.strip() else ()
    if isinstance(value, (list, tuple)):
        out = []
        for v in value:
            if isinstance(v, dict) and "raw" in v:  # e.g. {"raw": "...", "tokens": [...]}
                v = v["raw"]
            if not isinstance(v, str):
                raise InputError(f"{where}: a caption is {type(v).__name__}, not text")
            if v.strip():
                out.append(v)
        return tuple(out)
    raise InputError(f"{where}: a caption is {type(value).__name__}, not text or a list of texts")


def unpack_image_struct(value: Any, base_dir: str | None) -> Any:
    """A ``{"bytes", "path"}`` dict (the ``datasets`` Image layout) -> its bytes, else its path
    (made absolute against ``base_dir`` when given); other values pass through."""
    if not isinstance(value, dict):
        return value
    if value.get("bytes"):
        return value["bytes"]
    path = value.get("path")
    if not path:
        return None
    return resolve_against(base_dir, str(path)) if base_dir else str(path)


class ParquetBytesReader(Source):
    """The source of kind ``table`` (image bytes in a table): reads a bytes or ``{bytes, path}`` column of
    a Parquet file row group by row group, keeping the last row group read (workers get neighbouring
    chunks, so most reads hit it). A path found in a struct is read as a file afterwards."""

    kind = "table"

    def __init__(self, path: str, column: str, base_dir: str) -> None:
        self.path = path
        self.column = column
        self.base_dir = base_dir
        self._cache: tuple[int, Any] | None = None  # (row group, column values)
        self._offsets: list[int] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": None}

    def _group_values(self, group: int) -> Any:
        import pyarrow.parquet as pq

        if self._cache is None or self._cache[0] != group:
            col = pq.ParquetFile(self.path).read_row_group(group, columns=[self.column]).column(0)
            self._cache = (group, col)
        return self._cache[1]

    def read(self, records: Sequence[Record]) -> list[Any]:
        """The bytes (or ``{bytes, path}`` dict, with the path made absolute) of each row."""
        import pyarrow.parquet as pq

        if self._offsets is None:
            md = pq.ParquetFile(self.path).metadata
            offsets = [0]
            for g in range(md.num_row_groups):
                offsets.append(offsets[-1] + md.row_group(g).num_rows)
            self._offsets = offsets
        out: list[Any] = []
        for r in records:
            row = int(r.locator)
            group = bisect.bisect_right(self._offsets, row) - 1
            value = self._group_values(group)[row - self._offsets[group]].as_py()
            out.append(checked_payload(unpack_image_struct(value, self.base_dir)))
        return out


def _split_rows(where: str, splits: list[Any] | None, split: str | None) -> list[int] | None:
    """Row numbers of ``split`` (``None``: every row)."""
    if split is None:
        return None
    if splits is None:
        raise InputError(f"{where}: has no {SPLIT_COLUMN!r} column, so split {split!r} cannot be selected")
    rows = [i for i, s in enumerate(splits) if str(s) == split]
    if not rows:
        found = sorted({str(s) for s in splits})
        raise InputError(f"{where}: no rows in split {split!r}; splits: {', '.join(found)}")
    return rows


def list_table(
    path: str | os.PathLike[str],
    column: str | None = None,
    *,
    label_column: str | None = None,
    caption_column: str | None = None,
    metadata_columns: Sequence[str] = (),
    split: str | None = None,
    keep_repeats: bool = False,
) -> InputListing:
    """A Parquet/CSV table whose ``column`` holds image paths (any table) or encoded bytes / ``{bytes,
    path}`` structs (Parquet). Without ``column``, a column named like an image column is used, or the
    only one of a usable type. Label, caption and split columns are found by name when not given
    (``label``, ``caption``, ``split``...); ``metadata_columns`` are carried as they are.

    Args:
        split: keep only the rows whose ``split`` column holds this value.
        keep_repeats: keep a repeated image path as separate rows when there are no captions to
            merge (labelled data as written); by default a repeat is merged into its first row.
    """
    p = Path(path).expanduser().absolute()
    at = path_to_source(p)
    schema = _schema(p)
    kinds = {n: column_kind(schema.field(n).type) for n in schema.names}
    accept = ("text",) if is_csv(p) else ("text", "bytes", "image")
    col = guess_column(at, kinds, column, candidates=IMAGE_COLUMNS, accept=accept, what="images", only_one=True)
    if col is None:
        raise InputError(
            f"{at}: no image column found (none is named {', '.join(IMAGE_COLUMNS)}, and more than one could "
            f"be: columns {', '.join(schema.names)}); name it with --column"
        )
    label_col = guess_column(at, kinds, label_column, candidates=LABEL_COLUMNS, accept=LABEL_KINDS, what="labels",
                             exclude=(col,))
    caption_col = guess_column(at, kinds, caption_column, candidates=CAPTION_COLUMNS, accept=("text", "list"),
                               what="captions", exclude=(col, label_col))
    split_col = SPLIT_COLUMN if SPLIT_COLUMN in kinds and SPLIT_COLUMN not in (col, label_col, caption_col) else None
    for m in metadata_columns:
        if m not in kinds:
            raise InputError(f"{at}: no column {m!r} for the metadata; its columns are {', '.join(schema.names)}")
    kind = kinds[col]
    extra = [c for c in dict.fromkeys([label_col, caption_col, split_col, *metadata_columns]) if c and c != col]
    table = read_table(p, [col, *extra] if kind == "text" else extra)
    values = {c: table.column(c).to_pylist() for c in extra}
    n = table.num_rows if extra or kind == "text" else _num_rows(p)
    rows = _split_rows(at, values.get(split_col) if split_col else None, split)

    def annotations(i: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if label_col:
            out["label"] = values[label_col][i]
        if caption_col:
            out["captions"] = caption_list(values[caption_col][i], at)
        if split_col:
            out["split"] = None if values[split_col][i] is None else str(values[split_col][i])
        if metadata_columns:
            out["metadata"] = {m: values[m][i] for m in metadata_columns}
        return out

    desc: dict[str, Any] = {"kind": "table", "location": at, "column": col, "column_kind": _IMAGE_KIND_NAMES[kind]}
    desc.update({k: v for k, v in (("label_column", label_col), ("caption_column", caption_col)) if v})
    order = range(n) if rows is None else rows
    ignored = 0
    if kind == "text":
        paths = table.column(col).to_pylist()
        records: list[Record] = []
        for i in order:
            v = paths[i]
            if v is None or not str(v).strip():
                ignored += 1
                continue
            text = str(v).strip()
            remote = remote_record(text, **annotations(i))  # a URL or data: URI (kind url / data)
            if remote is not None:
                records.append(remote)
                continue
            if "://" in text:
                records.append(Record(id=record_id(text), source=text, locator=text, error=(
                    "a URL of a scheme phiclip does not fetch (http, https and data: are read)"), **annotations(i)))
                continue
            records.append(path_record(resolve_against(p.parent, text), **annotations(i)))
        if keep_repeats and caption_col is None:
            return InputListing(desc, records, ignored=ignored)
        records, dup = merge_repeats(records, at)
        return InputListing(desc, records, duplicates=dup, ignored=ignored)
    records = [Record(id=record_id(f"{at}#row={i}"), source=f"{at}#row={i}", locator=i, kind="table", **annotations(i))
               for i in order]
    return InputListing(desc, records, reader=ParquetBytesReader(str(p), col, str(p.parent)))


def _num_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return int(pq.ParquetFile(path).metadata.num_rows)


def table_texts(path: Path, column: str | None) -> tuple[list[Any], str]:
    """The values of a table's text column (named, or guessed) and the column's name."""
    at = path_to_source(path)
    schema = _schema(path)
    kinds = {n: column_kind(schema.field(n).type) for n in schema.names}
    col = guess_column(at, kinds, column, candidates=TEXT_COLUMNS, accept=("text",), what="texts", only_one=True)
    if col is None:
        raise InputError(f"{at}: cannot tell which column holds texts (columns: {', '.join(schema.names)}); "
                         "name it with --column")
    return read_table(path, [col]).column(col).to_pylist(), col
