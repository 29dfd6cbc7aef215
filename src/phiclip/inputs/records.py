"""What every input source produces: :class:`Record` rows in an :class:`InputListing`, with the one
set of image extensions and the one column guesser every source uses.

A record's ``id`` is a hash of its source (:func:`record_id`): the bytes of an absolute path, or the
text ``TABLE#row=N`` / ``hf:NAME/SPLIT#row=N`` for rows, or the text itself for texts; so the same
input always gets the same id. ``source`` is its printable name (a path in the lossless text form of
:func:`phiclip.schema.path_to_source`). Optional annotations ride along: ``label``, ``captions``,
``split`` and ``metadata`` (extra columns asked for by name).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from phiclip.images import Unreadable
from phiclip.schema import path_to_source

#: File extensions taken as images (compared lower-case), by every source and every command.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".dib", ".tif", ".tiff", ".webp",
     ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico"}
)
#: Suffixes read as tables.
TABLE_SUFFIXES = (".parquet", ".pq", ".csv", ".tsv")
#: Suffixes of data formats that are neither tables nor text lists of paths (refused by name instead
#: of being read as a list of paths).
OTHER_DATA_SUFFIXES = frozenset(
    {".json", ".jsonl", ".ndjson", ".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".7z", ".npy", ".npz", ".arrow",
     ".feather", ".h5", ".hdf5", ".pkl", ".pickle", ".xls", ".xlsx", ".safetensors", ".pt", ".bin"}
)

#: Column names tried, in order (case-insensitive), for each role a table or dataset column can play.
IMAGE_COLUMNS = ("image", "img", "path", "image_path", "filepath", "file", "filename", "file_name", "bytes", "url",
                 "image_url", "img_url", "photo_url")
TEXT_COLUMNS = ("text", "caption", "prompt", "sentence", "query")
LABEL_COLUMNS = ("label", "labels", "class", "category", "fine_label")
CAPTION_COLUMNS = ("caption", "captions", "text", "sentence", "sentences")
SPLIT_COLUMN = "split"
#: Names of split folders (``ROOT/<split>/<class>/...``) and the evaluation splits, in order of preference.
SPLIT_NAMES = ("train", "test", "val", "validation", "valid")


class InputError(ValueError):
    """An input is missing, empty or not understood. The message names the input and the fix."""


#: The name evaluation and fine-tuning code has always caught; the same class.
DataError = InputError


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
    """One input. ``kind`` names the :class:`Source` that reads it (a key of
    :data:`phiclip.inputs.sources.SOURCES`: ``file``, ``table``, ``hf``, ``url``, ``data``, ``wds``...);
    ``locator`` is what that source needs to fetch it (a path, a row number, a URL, a shard member, or
    the text itself); ``error`` is set when the input already failed while listing (an unreadable
    folder), so that it is reported instead of vanishing. ``label`` (a name or an integer),
    ``captions``, ``split`` and ``metadata`` (``{column: value}``) are the annotations the source has
    for it, when it has them."""

    id: str
    source: str
    locator: Any = None
    error: str | None = None
    label: str | int | None = None
    captions: tuple[str, ...] = ()
    split: str | None = None
    metadata: Mapping[str, Any] | None = field(default=None, compare=False, hash=False)
    kind: str = "file"


class PayloadReader:
    """Fetches what each record points to, in a worker process: a path (``str``), encoded bytes,
    a ``{"bytes", "path"}`` dict or a PIL image. Must be picklable and cheap to copy."""

    def read(self, records: Sequence[Record]) -> list[Any]:
        """One payload per record, in order."""
        return [r.locator for r in records]


class Source(PayloadReader):
    """How the records of one input kind are read: :meth:`read` turns each record's ``locator`` into a
    payload (encoded bytes, or a path :func:`phiclip.images.load_image` opens) or an :class:`Unreadable`
    (never an exception for one bad record). One class per kind, registered in
    :data:`phiclip.inputs.sources.SOURCES`; picklable (worker processes, Ray tasks) and cheap to copy.
    ``prefetch``: how many chunks ahead the step may read (a network source: reads overlap encoding)."""

    kind: str = ""
    prefetch: int = 0

    def read(self, records: Sequence[Record]) -> list[Any]:  # pragma: no cover - abstract
        raise NotImplementedError


#: How to build the source of each kind: :data:`phiclip.inputs.sources.SOURCES`, registered here when that module
#: is imported (``phiclip.inputs`` imports it), so that this module needs none of the sources' modules.
_REGISTRY: dict[str, Any] = {}


def register_sources(table: Mapping[str, Any]) -> None:
    """Make ``table`` (kind -> a callable building its source) the registry :class:`RecordReader` builds from."""
    _REGISTRY.update(table)


class RecordReader(PayloadReader):
    """The reader of a listing: each record read by the :class:`Source` of its ``kind`` (``sources``
    holds the listing's own, stateful ones: a table's file, a dataset; the others are built from the
    registry). A record that failed while listing, or has no payload, comes back :class:`Unreadable`;
    a source that raises fails only its own records."""

    def __init__(self, sources: Mapping[str, PayloadReader] | None = None) -> None:
        self.sources: dict[str, PayloadReader] = dict(sources or {})

    @property
    def prefetch(self) -> int:
        """The most chunks ahead any of its sources asks to be read."""
        return max((int(getattr(s, "prefetch", 0)) for s in self.sources.values()), default=0)

    def source(self, kind: str) -> PayloadReader:
        """The source of ``kind`` (built from the registry the first time)."""
        got = self.sources.get(kind)
        if got is None:
            build = _REGISTRY.get(kind)
            if build is None:
                raise ValueError(f"no input source of kind {kind!r}; kinds: {', '.join(_REGISTRY)}")
            got = self.sources[kind] = build()
        return got

    def read(self, records: Sequence[Record]) -> list[Any]:
        """One payload or :class:`Unreadable` per record, in order."""
        out: list[Any] = [None] * len(records)
        by_kind: dict[str, list[int]] = {}
        for j, r in enumerate(records):
            if r.error is not None:
                out[j] = Unreadable("read", r.error)
            else:
                by_kind.setdefault(getattr(r, "kind", "file"), []).append(j)
        for kind, at in by_kind.items():
            try:
                got = self.source(kind).read([records[j] for j in at])
            except Exception as e:  # noqa: BLE001 - one unreadable block must not stop the run
                got = [Unreadable("read", f"cannot read ({type(e).__name__}: {e})")] * len(at)
            for j, payload in zip(at, got):
                out[j] = Unreadable("read", "no image in this row (null)") if payload is None else payload
        return out


@dataclass
class InputListing:
    """What a source lists: the records, how to read them, and a description for the manifest.

    ``duplicates``: repeated sources merged into one record; ``ignored``: entries that are not inputs
    (files without an image extension, hidden files, blank lines and cells); ``skipped``: ``(path,
    reason)`` of each file or folder among them (blank lines and cells are only counted);
    ``classnames``: the class names the source declares (a ``ClassLabel`` feature), in label order.
    """

    description: dict[str, Any]
    records: list[Record]
    reader: PayloadReader = field(default_factory=RecordReader)
    duplicates: int = 0
    ignored: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    classnames: list[str] | None = None

    def __post_init__(self) -> None:
        if type(self.reader) is PayloadReader:
            self.reader = RecordReader()
        elif not isinstance(self.reader, RecordReader):  # one source given: the reader of its kind
            kind = getattr(self.reader, "kind", "") or "file"
            self.reader = RecordReader({kind: self.reader})

    def fingerprint(self) -> str:
        """A hash of every id in order: two listings with the same fingerprint shard identically."""
        h = hashlib.blake2b(digest_size=16)
        for r in self.records:
            h.update(r.id.encode("ascii"))
            h.update(b"\n")
        return h.hexdigest()


# --- shared helpers of the sources ---------------------------------------------------------------
def is_image_name(name: str) -> bool:
    """Whether a file name has one of :data:`IMAGE_EXTENSIONS`."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def skip_reason(name: str) -> str:
    """Why a listed file is not taken as an input."""
    if os.path.basename(name).startswith("."):
        return "hidden file (its name starts with '.'); rename it to embed it"
    ext = os.path.splitext(name)[1].lower()
    shown = f"extension {path_to_source(ext)!r}" if ext else "no extension"
    return (f"not taken as an image: {shown} is not one of {' '.join(sorted(IMAGE_EXTENSIONS))}; convert it to "
            "PNG or JPEG to embed it")


def resolve_against(base_dir: str | os.PathLike[str], p: str) -> str:
    """An absolute, normalised path for ``p`` (``~`` expanded; relative -> under ``base_dir``).
    Symlinks are not followed, so a link's own path stays its source."""
    q = os.path.expanduser(p.strip())
    if not os.path.isabs(q):
        q = os.path.join(os.fspath(base_dir), q)
    return os.path.normpath(q)


def path_record(path: str, error: str | None = None, **annotations: Any) -> Record:
    """A file input: the id from the path's bytes, ``source`` its lossless text, ``locator`` the path
    as Python's ``os`` functions take it (undecodable bytes kept by ``surrogateescape``)."""
    return Record(id=record_id(os.fsencode(path)), source=path_to_source(path), locator=path, error=error, **annotations)


def merge_repeats(records: Iterable[Record], where: str = "") -> tuple[list[Record], int]:
    """Keep the first record of each id; a repeat adds its captions to the first (a table listing
    an image once per caption). Returns the records and how many repeats were merged.

    Raises:
        InputError: a repeated image has two different labels.
    """
    out: list[Record] = []
    at: dict[str, int] = {}
    dup = 0
    for r in records:
        j = at.get(r.id)
        if j is None:
            at[r.id] = len(out)
            out.append(r)
            continue
        dup += 1
        first = out[j]
        if r.label is not None and first.label is not None and r.label != first.label:
            raise InputError(f"{where or first.source}: image {first.source} appears with two labels "
                             f"({first.label!r}, {r.label!r}); give each image one label")
        if r.captions:
            out[j] = replace(first, captions=first.captions + r.captions)
    return out, dup


def guess_column(
    where: str,
    kinds: Mapping[str, str | None],
    given: str | None,
    *,
    candidates: Sequence[str],
    accept: Sequence[str],
    what: str,
    prefer: Sequence[str] = (),
    only_one: bool = False,
    exclude: Sequence[str | None] = (),
) -> str | None:
    """The one column guesser of every table and dataset.

    ``kinds`` maps each column to its kind (``"text"``, ``"bytes"``, ``"image"`` (bytes/path structs,
    Image features), ``"int"``, ``"classlabel"``, ``"list"``, or ``None``). A ``given`` column must
    exist and be of an accepted kind. Otherwise: the first column of a ``prefer`` kind, then the first
    of ``candidates`` (case-insensitive) of an accepted kind, then (``only_one``) the only column of
    an accepted kind; else ``None``. Columns in ``exclude`` are never guessed.

    Raises:
        InputError: ``given`` is not a column, or not of an accepted kind.
    """
    names = list(kinds)
    if given is not None:
        if given not in kinds:
            raise InputError(f"{where}: no column {given!r} for the {what}; its columns are {', '.join(names)}")
        if kinds[given] not in accept:
            shown = ", ".join(f"{n} ({kinds[n] or 'other'})" for n in names)
            raise InputError(
                f"{where}: column {given!r} ({kinds[given] or 'another type'}) does not hold {what}; "
                f"its columns are {shown}"
            )
        return given
    usable = [n for n in names if kinds[n] in accept and n not in exclude]
    for n in usable:
        if kinds[n] in prefer:
            return n
    lower = {n.lower(): n for n in usable}
    for cand in candidates:
        if cand in lower:
            return lower[cand]
    if only_one and len(usable) == 1:
        return usable[0]
    return None

