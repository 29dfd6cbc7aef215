"""Inputs of a bulk run -> records with a stable id, in a stable order, cut into fixed shards.

An input is one of:

- a folder (walked recursively; files with an image extension, hidden entries skipped),
- a glob (``"photos/**/*.jpg"``; ``**`` recurses),
- a text file of image paths, one per line (``#`` comments and blank lines skipped),
- a Parquet or CSV table with a column of paths, or (Parquet) a column of encoded image bytes or of
  ``{bytes, path}`` structs as ``datasets`` exports its ``Image`` feature,
- a Hugging Face dataset, ``hf:NAME`` (a hub id, a local folder of data files, or a folder written by
  ``Dataset.save_to_disk``), with a split and an image column,
- a single image file.

Every input becomes a :class:`Record`: ``id`` is a hash of the bytes of the absolute path (or of
the text ``table#row=N`` / ``hf:NAME/SPLIT#row=N`` for rows), so the same input always gets the same
id; ``source`` is the path in the lossless text form of :func:`phiclip.schema.path_to_source` (the
path itself unless it is not UTF-8 or has a backslash), so a file name that is not UTF-8 is embedded
like any other. Files are listed in sorted order, rows in table order, and a repeated source is kept
once. Relative paths inside a list or table are resolved against the folder of that list or table.

Files of a folder or glob that are not taken as inputs (no image extension, hidden) are counted in
``ignored`` and named in :attr:`InputListing.skipped`, which the runner writes to
``errors/skipped.parquet`` (stage ``skip``).

The records are cut into shards of ``shard_size`` consecutive records (:func:`plan_shards`); a
shard is the unit of work and of resume. Reading the bytes of a record (:class:`PayloadReader`) is
separate from listing, so that worker processes can do it.
"""

from __future__ import annotations

import codecs
import glob as globlib
import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phiclip.schema import path_to_source

#: File extensions taken as images when a folder or glob is listed (compared lower-case).
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".dib", ".tif", ".tiff", ".webp",
     ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico"}
)
#: Suffixes read as tables, and as text lists of paths.
TABLE_SUFFIXES = (".parquet", ".pq", ".csv", ".tsv")
#: Column names tried, in order, when a table's image (path or bytes) column is not given.
IMAGE_COLUMN_CANDIDATES = ("image", "img", "path", "image_path", "filepath", "file", "filename", "file_name", "bytes")
#: Column names tried, in order, when a table's text column is not given.
TEXT_COLUMN_CANDIDATES = ("text", "caption", "prompt", "sentence", "query")


class InputError(ValueError):
    """The input of a bulk run is missing, empty or not understood. The message names the fix."""


def record_id(source: str | bytes) -> str:
    """The stable id of an input: 32 hex digits of BLAKE2b over its source (bytes as given; text as
    UTF-8, with the undecodable bytes of a ``surrogateescape``-decoded file name restored, so that a
    path gives the same id as text and as ``os.fsencode`` bytes)."""
    if isinstance(source, str):
        try:
            source = source.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # a lone surrogate that no file name decodes to
            source = source.encode("utf-8", "surrogatepass")
    return hashlib.blake2b(source, digest_size=16).hexdigest()


@dataclass(frozen=True)
class Record:
    """One input. ``locator`` is what :class:`PayloadReader` needs to fetch it (a path, a row number,
    or the text itself); ``error`` is set when the input already failed while listing (an
    unreadable folder), so that it lands in the errors table instead of vanishing."""

    id: str
    source: str
    locator: Any = None
    error: str | None = None


class PayloadReader:
    """Fetches what each record points to, in a worker process: a path (``str``), encoded bytes,
    a ``{"bytes", "path"}`` dict or a PIL image. Must be picklable and cheap to copy."""

    def read(self, records: Sequence[Record]) -> list[Any]:
        """One payload per record, in order."""
        return [r.locator for r in records]


@dataclass
class InputListing:
    """What a source lists: the records, how to read them, and a description for the manifest.

    ``duplicates``: repeated sources dropped; ``ignored``: entries that are not inputs (files
    without an image extension, hidden files, blank lines); ``skipped``: ``(path, reason)`` of each
    file or folder among them (the blank lines and comments of a list are only counted).
    """

    description: dict[str, Any]
    records: list[Record]
    reader: PayloadReader = field(default_factory=PayloadReader)
    duplicates: int = 0
    ignored: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def fingerprint(self) -> str:
        """A hash of every id in order: two listings with the same fingerprint shard identically."""
        h = hashlib.blake2b(digest_size=16)
        for r in self.records:
            h.update(r.id.encode("ascii"))
            h.update(b"\n")
        return h.hexdigest()


def plan_shards(num_records: int, shard_size: int) -> list[range]:
    """Consecutive record positions of each shard: ``[0, s), [s, 2s), ...``; the last may be short.

    >>> plan_shards(5, 2)
    [range(0, 2), range(2, 4), range(4, 5)]
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    return [range(start, min(start + shard_size, num_records)) for start in range(0, num_records, shard_size)]


def _dedupe(records: Iterable[Record]) -> tuple[list[Record], int]:
    seen: set[str] = set()
    out: list[Record] = []
    dup = 0
    for r in records:
        if r.id in seen:
            dup += 1
            continue
        seen.add(r.id)
        out.append(r)
    return out, dup


def _path_record(path: str, error: str | None = None) -> Record:
    """A file input: the id from the path's bytes, ``source`` its lossless text, ``locator`` the path
    as Python's ``os`` functions take it (undecodable bytes kept by ``surrogateescape``)."""
    return Record(id=record_id(os.fsencode(path)), source=path_to_source(path), locator=path, error=error)


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _skip_reason(name: str) -> str:
    """Why a listed file is not taken as an input."""
    if os.path.basename(name).startswith("."):
        return "hidden file (its name starts with '.'); rename it to embed it"
    ext = os.path.splitext(name)[1].lower()
    shown = f"extension {path_to_source(ext)!r}" if ext else "no extension"
    return (f"not taken as an image: {shown} is not one of {' '.join(sorted(IMAGE_EXTENSIONS))}; convert it to "
            "PNG or JPEG to embed it")


def _resolve_against(base_dir: Path, p: str) -> str:
    """An absolute, normalised path for ``p`` (``~`` expanded; relative -> under ``base_dir``).
    Symlinks are not followed, so a link's own path stays its source."""
    q = os.path.expanduser(p.strip())
    if not os.path.isabs(q):
        q = os.path.join(str(base_dir), q)
    return os.path.normpath(q)


# --- folders and globs -------------------------------------------------------------------------
def list_folder(root: str | os.PathLike) -> InputListing:
    """Every file with an image extension under ``root`` (recursive, symlinks followed once, hidden
    files and folders skipped), sorted by path. A subfolder that cannot be listed becomes an error
    record, so nothing under it vanishes silently."""
    top = os.path.normpath(os.path.abspath(os.fspath(root)))
    records: list[Record] = []
    seen_dirs: set[str] = set()
    skipped: list[tuple[str, str]] = []

    def on_error(err: OSError) -> None:
        where = os.fsdecode(err.filename or top)
        reason = f"cannot list this folder ({err.strerror or err}); check its permissions"
        records.append(_path_record(where, error=reason))

    for dirpath, dirnames, filenames in os.walk(top, onerror=on_error, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:  # a symlink loop or a second link to the same folder
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        kept = sorted(d for d in dirnames if not d.startswith("."))
        skipped += [(os.path.join(dirpath, d), "hidden folder (its name starts with '.'); nothing in it is read")
                    for d in sorted(dirnames) if d.startswith(".")]
        dirnames[:] = kept
        for name in filenames:
            if name.startswith(".") or not _is_image_name(name):
                skipped.append((os.path.join(dirpath, name), _skip_reason(name)))
                continue
            records.append(_path_record(os.path.join(dirpath, name)))
    records.sort(key=lambda r: r.locator)  # the path, so names that are not UTF-8 sort among the others
    records, dup = _dedupe(records)
    skipped.sort()
    return InputListing({"kind": "folder", "location": path_to_source(top)}, records, duplicates=dup, ignored=len(skipped),
                        skipped=skipped)


def list_glob(pattern: str) -> InputListing:
    """Files matched by a glob pattern (``**`` recurses) that have an image extension, sorted."""
    expanded = os.path.expanduser(pattern)
    base = os.path.abspath(expanded)
    records: list[Record] = []
    skipped: list[tuple[str, str]] = []
    for match in globlib.glob(base, recursive=True):
        if os.path.isdir(match):
            continue
        if not _is_image_name(match):
            skipped.append((os.path.normpath(match), _skip_reason(match)))
            continue
        records.append(_path_record(os.path.normpath(match)))
    records.sort(key=lambda r: r.locator)
    records, dup = _dedupe(records)
    skipped.sort()
    return InputListing({"kind": "glob", "location": path_to_source(base)}, records, duplicates=dup, ignored=len(skipped),
                        skipped=skipped)


def list_path_file(path: str | os.PathLike) -> InputListing:
    """A text file of image paths, one per line, in file order (blank and ``#`` lines skipped).

    Lines are file names as bytes (POSIX paths need not be UTF-8): a line that is not UTF-8 names the
    file with exactly those bytes. A file holding NUL bytes (binary, or UTF-16 text) is refused.
    """
    p = Path(path).expanduser().absolute()
    data = p.read_bytes()
    if b"\x00" in data:
        raise InputError(
            f"{path_to_source(p)}: not a text file of paths (it holds NUL bytes, which no path has: binary or "
            "UTF-16?); save it as UTF-8 text with one path per line, or give a folder, a glob, a Parquet/CSV "
            "table or hf:DATASET"
        )
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    lines = [os.fsdecode(line) for line in data.splitlines()]
    records: list[Record] = []
    ignored = 0
    for line in lines:
        s = line.strip()
        if not s or s.startswith("#"):
            ignored += 1
            continue
        records.append(_path_record(_resolve_against(p.parent, s)))
    records, dup = _dedupe(records)
    return InputListing({"kind": "list", "location": path_to_source(p)}, records, duplicates=dup, ignored=ignored)


# --- tables ------------------------------------------------------------------------------------
def _read_table_columns(path: Path, columns: Sequence[str] | None = None) -> Any:
    import pyarrow.parquet as pq

    from phiclip.datasets_io import read_csv_table

    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            return read_csv_table(path, delimiter="\t" if suffix == ".tsv" else ",", columns=columns)
        return pq.read_table(path, columns=list(columns) if columns else None)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds for unreadable tables
        raise InputError(f"{path_to_source(path)}: cannot read this table ({type(e).__name__}: {e})") from None


def _table_schema(path: Path) -> Any:
    import pyarrow.parquet as pq

    if path.suffix.lower() in (".csv", ".tsv"):
        return _read_table_columns(path).schema
    try:
        return pq.read_schema(path)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None


def _column_kind(typ: Any) -> str | None:
    """'path' for strings, 'bytes' for binary, 'struct' for {bytes, path} structs, else None."""
    import pyarrow as pa

    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        return "path"
    if pa.types.is_binary(typ) or pa.types.is_large_binary(typ):
        return "bytes"
    if pa.types.is_struct(typ) and typ.get_field_index("bytes") >= 0:
        return "struct"
    return None


def _choose_column(path: Path, schema: Any, column: str | None, candidates: Sequence[str], what: str,
                   accept: Sequence[str]) -> tuple[str, str]:
    names = list(schema.names)
    if column is not None:
        if column not in names:
            raise InputError(f"{path}: no column {column!r}; its columns are {names}")
        kind = _column_kind(schema.field(column).type)
        if kind not in accept:
            raise InputError(
                f"{path}: column {column!r} has type {schema.field(column).type}, which does not hold {what}; "
                f"its columns are {[(n, str(schema.field(n).type)) for n in names]}"
            )
        return column, kind
    for cand in candidates:
        if cand in names and _column_kind(schema.field(cand).type) in accept:
            return cand, _column_kind(schema.field(cand).type)  # type: ignore[return-value]
    usable = [n for n in names if _column_kind(schema.field(n).type) in accept]
    if len(usable) == 1:
        return usable[0], _column_kind(schema.field(usable[0]).type)  # type: ignore[return-value]
    raise InputError(
        f"{path}: cannot tell which column holds {what} (columns: {names}); name it with --column"
    )


def _unpack_image_struct(value: Any, base_dir: str | None) -> Any:
    """A ``{"bytes", "path"}`` dict (the ``datasets`` Image layout) -> its bytes, else its path
    (made absolute against ``base_dir`` when given); other values pass through."""
    if not isinstance(value, dict):
        return value
    if value.get("bytes"):
        return value["bytes"]
    path = value.get("path")
    if not path:
        return None
    return _resolve_against(Path(base_dir), str(path)) if base_dir else str(path)


class ParquetBytesReader(PayloadReader):
    """Reads a bytes or ``{bytes, path}`` column of a Parquet file row group by row group, keeping the
    last row group read (workers get neighbouring chunks, so most reads hit it)."""

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
            pf = pq.ParquetFile(self.path)
            col = pf.read_row_group(group, columns=[self.column]).column(0)
            self._cache = (group, col)
        return self._cache[1]

    def read(self, records: Sequence[Record]) -> list[Any]:
        """The bytes (or ``{bytes, path}`` dict, with the path made absolute) of each row."""
        import bisect

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
            out.append(_unpack_image_struct(value, self.base_dir))
        return out


def list_table(path: str | os.PathLike, column: str | None = None) -> InputListing:
    """A Parquet/CSV table whose ``column`` holds image paths (any table) or encoded bytes / ``{bytes,
    path}`` structs (Parquet). Without ``column``, a column named like an image column is used, or the
    only one of a usable type."""
    p = Path(path).expanduser().absolute()
    is_csv = p.suffix.lower() in (".csv", ".tsv")
    schema = _table_schema(p)
    accept = ("path",) if is_csv else ("path", "bytes", "struct")
    col, kind = _choose_column(p, schema, column, IMAGE_COLUMN_CANDIDATES, "image paths or bytes", accept)
    desc = {"kind": "table", "location": path_to_source(p), "column": col, "column_kind": kind}
    if kind == "path":
        values = _read_table_columns(p, [col]).column(col).to_pylist()
        records = []
        ignored = 0
        for v in values:
            if v is None or not str(v).strip():
                ignored += 1
                continue
            records.append(_path_record(_resolve_against(p.parent, str(v))))
        records, dup = _dedupe(records)
        return InputListing(desc, records, duplicates=dup, ignored=ignored)
    import pyarrow.parquet as pq

    n = pq.ParquetFile(p).metadata.num_rows
    at = path_to_source(p)
    records = [Record(id=record_id(f"{at}#row={i}"), source=f"{at}#row={i}", locator=i) for i in range(n)]
    return InputListing(desc, records, reader=ParquetBytesReader(str(p), col, str(p.parent)))


# --- Hugging Face datasets -----------------------------------------------------------------------
def _load_hf(name: str, split: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise InputError(f"hf:{name}: reading Hugging Face datasets needs `pip install datasets`") from None
    local = Path(name).expanduser()
    try:
        if local.is_dir() and ((local / "state.json").exists() or (local / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise InputError(f"hf:{name}: no split {split!r}; its splits are {list(ds)}; pick one with --split")
                ds = ds[split]
            return ds
        return datasets.load_dataset(str(local) if local.is_dir() else name, split=split)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds (not found, offline, bad split)
        raise InputError(
            f"hf:{name}: cannot load split {split!r} ({type(e).__name__}: {e}); check the name, the split "
            "(--split) and, for the hub, the network"
        ) from None


class HFDatasetReader(PayloadReader):
    """Reads one column of an Arrow-backed ``datasets.Dataset`` (memory-mapped, so cheap to share)."""

    def __init__(self, dataset: Any, column: str) -> None:
        self.dataset = dataset
        self.column = column

    def read(self, records: Sequence[Record]) -> list[Any]:
        """The bytes (or path, or PIL image) of each row."""
        rows = [int(r.locator) for r in records]
        return [_unpack_image_struct(v, None) for v in self.dataset[rows][self.column]]


def _hf_column(name: str, ds: Any, column: str | None, want: str) -> str:
    import datasets

    feats = ds.features
    names = list(feats)
    if column is not None:
        if column not in feats:
            raise InputError(f"hf:{name}: no column {column!r}; its columns are {names}")
        return column
    if want == "image":
        images = [c for c, f in feats.items() if isinstance(f, datasets.Image)]
        if images:
            return images[0]
        cands = IMAGE_COLUMN_CANDIDATES
    else:
        cands = TEXT_COLUMN_CANDIDATES
    for c in cands:
        if c in feats:
            return c
    raise InputError(f"hf:{name}: cannot tell which column holds the {want}s (columns: {names}); name it with --column")


def list_hf(name: str, *, split: str = "train", column: str | None = None) -> InputListing:
    """The rows of a Hugging Face dataset split; images are read undecoded (bytes) in the workers."""
    ds = _load_hf(name, split)  # first: it explains a missing `datasets` package
    import datasets

    col = _hf_column(name, ds, column, "image")
    ds = ds.select_columns([col])
    if isinstance(ds.features[col], datasets.Image):
        ds = ds.cast_column(col, datasets.Image(decode=False))
    key = os.path.abspath(os.path.expanduser(name)) if Path(name).expanduser().is_dir() else name
    at = path_to_source(key)
    records = [
        Record(id=record_id(f"hf:{at}/{split}#row={i}"), source=f"hf:{at}/{split}#row={i}", locator=i)
        for i in range(len(ds))
    ]
    desc = {"kind": "hf", "location": at, "split": split, "column": col}
    return InputListing(desc, records, reader=HFDatasetReader(ds, col))


# --- dispatch ------------------------------------------------------------------------------------
def _has_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


def list_inputs(input: str | os.PathLike, *, column: str | None = None, split: str = "train") -> InputListing:
    """List the images of any supported input (see the module docstring).

    Raises:
        InputError: the input does not exist, or a table/dataset column cannot be found.
    """
    s = os.fspath(input)
    if s.startswith("hf:"):
        return list_hf(s[3:], split=split, column=column)
    p = Path(s).expanduser()
    if p.is_dir():
        return list_folder(p)
    if p.is_file():
        if p.suffix.lower() in TABLE_SUFFIXES:
            return list_table(p, column)
        if _is_image_name(p.name):
            return InputListing({"kind": "file", "location": path_to_source(p.absolute())}, [_path_record(str(p.absolute()))])
        return list_path_file(p)
    if _has_glob(s):
        return list_glob(s)
    raise InputError(
        f"{s}: no such file or folder; give a folder, a glob in quotes ('imgs/**/*.jpg'), a .txt list of "
        "paths, a Parquet/CSV table or hf:DATASET"
    )


def list_texts(input: str | os.PathLike, *, column: str | None = None, split: str = "train") -> InputListing:
    """Texts to embed: a text file (one text per line, blank lines skipped), a Parquet/CSV table
    with a text column, or ``hf:NAME``. A text's id is the hash of the text, so a repeated text is
    embedded once; ``source`` is ``FILE:LINE`` or ``FILE#row=N``."""
    s = os.fspath(input)
    if s.startswith("hf:"):
        ds = _load_hf(s[3:], split)
        col = _hf_column(s[3:], ds, column, "text")
        texts = list(ds[col])
        key = s[3:]
        sources = [f"hf:{key}/{split}#row={i}" for i in range(len(texts))]
        desc: dict[str, Any] = {"kind": "hf", "location": key, "split": split, "column": col}
    else:
        p = Path(s).expanduser().absolute()
        if not p.is_file():
            raise InputError(f"{s}: no such file; give a .txt file (one text per line), a Parquet/CSV table or hf:DATASET")
        if p.suffix.lower() in TABLE_SUFFIXES:
            schema = _table_schema(p)
            col, _ = _choose_column(p, schema, column, TEXT_COLUMN_CANDIDATES, "texts", ("path",))
            texts = _read_table_columns(p, [col]).column(col).to_pylist()
            sources = [f"{path_to_source(p)}#row={i}" for i in range(len(texts))]
            desc = {"kind": "table", "location": path_to_source(p), "column": col}
        else:
            try:
                texts = p.read_text(encoding="utf-8").splitlines()
            except UnicodeDecodeError:
                raise InputError(f"{p}: not a UTF-8 text file; save it as UTF-8 (one text per line)") from None
            sources = [f"{path_to_source(p)}:{i + 1}" for i in range(len(texts))]
            desc = {"kind": "text", "location": path_to_source(p)}
    records: list[Record] = []
    ignored = 0
    for text, source in zip(texts, sources):
        if text is None or not str(text).strip():
            ignored += 1
            continue
        t = str(text).strip()
        records.append(Record(id=record_id(t), source=source, locator=t))
    records, dup = _dedupe(records)
    return InputListing(desc, records, duplicates=dup, ignored=ignored)
