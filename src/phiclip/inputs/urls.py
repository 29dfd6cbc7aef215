"""URLs and ``data:`` URIs as inputs (record kinds ``url`` and ``data``), wherever a path is accepted: the
lines of a ``.txt`` list, the cells of a table's path column (a LAION / DataComp style ``url`` column).

A URL record's id is the hash of the URL and its ``source`` the URL; a ``data:`` URI's id is the hash of
the URI and its source the URI shortened (:func:`phiclip.fetch.shown_uri`). :class:`URLSource` fetches a
chunk's URLs concurrently (:mod:`phiclip.fetch`); the step reads a few chunks ahead on threads
(``prefetch``), so fetching overlaps decoding and encoding while memory stays bounded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from phiclip.fetch import FetchOptions, decode_data_uri, fetch_many, is_data_uri, is_url, shown_uri
from phiclip.inputs.records import Record, Source, record_id


class URLSource(Source):
    """Kind ``url``: fetches each record's URL (:func:`phiclip.fetch.fetch_many`) -> bytes or ``Unreadable``."""

    kind = "url"

    def __init__(self, options: FetchOptions | None = None, prefetch: int = 3) -> None:
        self.options = options or FetchOptions()
        self.prefetch = prefetch

    def read(self, records: Sequence[Record]) -> list[Any]:
        """The body of each record's URL, or why it could not be fetched."""
        return list(fetch_many([str(r.locator) for r in records], self.options))


class DataURISource(Source):
    """Kind ``data``: the bytes a ``data:`` URI holds."""

    kind = "data"

    def read(self, records: Sequence[Record]) -> list[Any]:
        """The decoded bytes of each record's URI, or why not."""
        return [decode_data_uri(str(r.locator)) for r in records]


def remote_record(text: str, **annotations: Any) -> Record | None:
    """A record for a URL or a ``data:`` URI (None for anything else, e.g. a path)."""
    if is_url(text):
        return Record(id=record_id(text), source=text, locator=text, kind="url", **annotations)
    if is_data_uri(text):
        return Record(id=record_id(text), source=shown_uri(text), locator=text, kind="data", **annotations)
    return None


__all__ = ["DataURISource", "URLSource", "remote_record"]
