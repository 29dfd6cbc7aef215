"""The one registry of input kinds: how the records of each kind are read (its :class:`Source`).

A :class:`~phiclip.inputs.records.Record` names its kind (``record.kind``); the listing's reader
(:class:`~phiclip.inputs.records.RecordReader`) asks the source of that kind to turn each record's
``locator`` into a payload (a path to open, or encoded bytes) or an
:class:`~phiclip.inputs.records.Unreadable` ``(stage, reason)``. Everything that reads inputs (the
embedding step, calibration, labelled data for eval / compare / fine-tuning) goes through it, so a new
kind of input is one module (its listing and its ``Source``) plus one row here.

=========  ============================================  =====================================================
kind       locator                                       source
=========  ============================================  =====================================================
file       a path on this machine                        :class:`~phiclip.inputs.files.FileSource`
table      a row of a Parquet bytes / struct column      :class:`~phiclip.inputs.tables.ParquetBytesReader`
hf         a row (or ``(split, row)``) of a dataset      :class:`~phiclip.inputs.hf.HFDatasetReader`
url        an ``http(s)://`` URL                         :class:`~phiclip.inputs.urls.URLSource`
data       a ``data:`` URI                               :class:`~phiclip.inputs.urls.DataURISource`
wds        a member of a WebDataset tar shard            :class:`~phiclip.inputs.webdataset.WebDatasetSource`
text       the text itself (``embed-text``)              :class:`TextSource`
memory     an image given in memory (``encode_images``)  :class:`MemorySource`
=========  ============================================  =====================================================

Sources that need the listing's state (a table's file, a dataset) are built by their listing and carried
in its reader; the others are built from this table when a record of their kind is first read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from phiclip.inputs.files import FileSource, checked_payload
from phiclip.inputs.hf import HFDatasetReader
from phiclip.inputs.records import PayloadReader, Record, Source, Unreadable, register_sources
from phiclip.inputs.tables import ParquetBytesReader
from phiclip.inputs.urls import DataURISource, URLSource
from phiclip.inputs.webdataset import WebDatasetSource


class TextSource(Source):
    """Kind ``text``: the locator is the text itself."""

    kind = "text"

    def read(self, records: Sequence[Record]) -> list[Any]:
        """The text of each record."""
        return [r.locator for r in records]


class MemorySource(Source):
    """Kind ``memory``: the locator is the image (PIL, array, bytes, a path, or an :class:`Unreadable`
    passed on); a path is checked as a file's."""

    kind = "memory"

    def read(self, records: Sequence[Record]) -> list[Any]:
        """The image of each record."""
        return [checked_payload(r.locator) for r in records]


def _needs_listing(kind: str) -> Callable[[], Source]:
    def refuse() -> Source:
        raise ValueError(f"records of kind {kind!r} are read by the source their listing built; this reader has none")

    return refuse


#: Every input kind and how to build its source (those that need a listing's state are built by it).
SOURCES: dict[str, Callable[[], Source]] = {
    "file": FileSource,
    "table": _needs_listing("table"),
    "hf": _needs_listing("hf"),
    "url": URLSource,
    "data": DataURISource,
    "wds": WebDatasetSource,
    "text": TextSource,
    "memory": MemorySource,
}
#: The source class of each kind, for documentation and checks.
SOURCE_CLASSES: dict[str, str] = {
    "file": FileSource.__qualname__, "table": ParquetBytesReader.__qualname__, "hf": HFDatasetReader.__qualname__,
    "url": URLSource.__qualname__, "data": DataURISource.__qualname__, "wds": WebDatasetSource.__qualname__,
    "text": TextSource.__qualname__,
    "memory": MemorySource.__qualname__,
}


register_sources(SOURCES)


def source_for(kind: str) -> PayloadReader:
    """A new source of ``kind`` (:data:`SOURCES`)."""
    try:
        build = SOURCES[kind]
    except KeyError:
        raise ValueError(f"no input source of kind {kind!r}; kinds: {', '.join(SOURCES)}") from None
    return build()


__all__ = ["SOURCES", "MemorySource", "TextSource", "Unreadable", "source_for"]
