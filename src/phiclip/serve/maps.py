"""The 2-D map of a served collection (``GET /map?collection=NAME``, shown in the search page's Map panel).

Where the coordinates come from, decided once per collection at its first map request (then kept):

1. **A ``phiclip map`` output next to the collection**: ``OUT/map/map.parquet``, as written by
   ``phiclip map OUT -o OUT/map`` (UMAP when umap-learn is installed). It is used when its ``id`` column
   holds exactly the collection's ids; the page states the layout its metadata records.
2. **Otherwise computed by the server**: PCA of the collection's stored vectors
   (:func:`phiclip.collection.layout.layout_2d` with ``method="pca"``: seconds for 100,000 items on two
   cores, where UMAP takes minutes), and the page says so, with the reason (no map file, or one whose ids
   differ from the collection's: a stale map of an earlier run).

Computing at the first request rather than at start-up keeps ``phiclip serve``'s start as fast as before
for whoever never opens the map. A collection of more than :data:`MAX_SERVED_POINTS` items is shown as a
seeded sample of that many (stated on the page), so that the page stays small and responsive.

The page itself is :func:`phiclip.collection.pages.map_page` (the page of ``phiclip map``) with the
server's thumbnail route for the hover images and, as a click's target, the search page's "more like
this" URL. Points are coloured by the collection's ``label`` column when it has one, else by the map
file's ``label`` or ``cluster`` column when it has one.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from phiclip.collection.layout import Layout, layout_2d
from phiclip.collection.pages import map_page
from phiclip.collection.vectors import read_vectors_into_memmap
from phiclip.serve.collections import LABEL_COLUMN, Collection

log = logging.getLogger(__name__)

__all__ = ["MAP_FILE", "MAP_FOLDER", "MAX_SERVED_POINTS", "CollectionMap", "MapCache", "collection_map"]

#: The folder of an output where the server looks for a ``phiclip map`` output (``phiclip map OUT -o OUT/map``).
MAP_FOLDER = "map"
#: The coordinates file of a ``phiclip map`` output.
MAP_FILE = "map.parquet"
#: Above this many items the served map shows a seeded sample of this many.
MAX_SERVED_POINTS = 200_000


@dataclass
class CollectionMap:
    """Coordinates of (a sample of) a collection's items, row i for ``ids[i]``.

    ``description`` says how they were made and where they come from; ``categories`` (one per item, or
    ``None``) colour the points, named by ``colour_by`` (``"labels"`` or ``"clusters"``).
    """

    ids: list[str]
    coords: np.ndarray
    description: str
    source: str  # "file" or "computed"
    total: int
    categories: list[str] | None = None
    colour_by: str | None = None


def _collection_ids(coll: Collection) -> list[str]:
    ids = coll.index.ids
    return [str(v) for v in (ids.to_pylist() if hasattr(ids, "to_pylist") else ids)]


def _collection_labels(coll: Collection) -> list[str] | None:
    if LABEL_COLUMN not in coll.fields.column_names:
        return None
    return ["" if v is None else str(v) for v in coll.fields.column(LABEL_COLUMN).to_pylist()]


def _from_file(path: Path, ids: list[str]) -> tuple[CollectionMap | None, str]:
    """The map of ``path`` reordered to ``ids``, or ``(None, why not)``."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - any unreadable file: computed instead, the reason stated
        return None, f"{path} is not readable ({type(e).__name__}: {e})"
    missing = [c for c in ("id", "x", "y") if c not in table.column_names]
    if missing:
        return None, f"{path} has no {', '.join(missing)} column (not a `phiclip map` output)"
    file_ids = [str(v) for v in table.column("id").to_pylist()]
    row_of = {v: r for r, v in enumerate(file_ids)}
    if len(row_of) != len(file_ids) or set(row_of) != set(ids):
        absent = sum(1 for v in ids if v not in row_of)
        extra = len(set(row_of) - set(ids))
        return None, (f"{path} is stale: {absent:,} of the collection's items are not in it and {extra:,} of its "
                      "ids are not in the collection (run `phiclip map` again)")
    order = np.fromiter((row_of[v] for v in ids), dtype=np.int64, count=len(ids))
    xy = np.stack([table.column("x").to_numpy(zero_copy_only=False),
                   table.column("y").to_numpy(zero_copy_only=False)], axis=1)[order].astype(np.float64)
    if not np.isfinite(xy).all():
        return None, f"{path} holds coordinates that are not finite"
    meta = table.schema.metadata or {}
    layout = meta.get(b"phiclip.layout", b"a layout it does not name").decode("utf-8", "replace")
    categories, colour_by = None, None
    for column, kind in (("label", "labels"), ("cluster", "clusters")):
        if column in table.column_names:
            values = table.column(column).to_pylist()
            categories = [("" if values[r] is None else str(values[r])) for r in order.tolist()]
            if kind == "clusters":
                categories = [f"cluster {c}" if c else "" for c in categories]
            colour_by = kind
            break
    return CollectionMap(ids, xy, f"{layout}, from {path}", "file", len(ids), categories, colour_by), ""


def collection_map(coll: Collection, *, seed: int = 0, max_points: int = MAX_SERVED_POINTS) -> CollectionMap:
    """The map of a served collection: read from ``OUT/map/map.parquet`` when it matches the collection,
    else a PCA computed here (module docstring); a seeded sample of ``max_points`` above that many."""
    ids = _collection_ids(coll)
    path = coll.path / MAP_FOLDER / MAP_FILE
    found, why = _from_file(path, ids) if path.is_file() else (None, f"no {MAP_FOLDER}/{MAP_FILE} in {coll.path}")
    if found is None:
        # in chunks: the matrix and one chunk at a time, not an Arrow table of the whole collection besides
        vs = read_vectors_into_memmap(coll.path, None, allow_incomplete=True, normalize=False)
        if vs.ids != ids:  # the index's row order, whatever order the shards were read in
            row_of = vs.index_of()
            vectors = vs.vectors[np.fromiter((row_of[v] for v in ids), dtype=np.int64, count=len(ids))]
        else:
            vectors = vs.vectors
        layout: Layout = layout_2d(vectors, method="pca", seed=seed)
        found = CollectionMap(ids, layout.coords.astype(np.float64),
                              f"{layout.description}, computed by the server ({why}; `phiclip map {coll.path} "
                              f"-o {coll.path / MAP_FOLDER}` makes a UMAP map it shows instead)", "computed", len(ids))
    labels = _collection_labels(coll)
    if labels is not None:
        found.categories, found.colour_by = labels, "labels"
    if len(ids) > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(len(ids), max_points, replace=False))
        found.ids = [found.ids[r] for r in keep.tolist()]
        found.coords = found.coords[keep]
        if found.categories is not None:
            found.categories = [found.categories[r] for r in keep.tolist()]
        found.description += f"; a seeded sample of {max_points:,} of the {len(ids):,} items is shown"
    return found


def map_html(coll: Collection, cmap: CollectionMap) -> str:
    """The page of ``cmap``, with URLs relative to the server's root (the page is ``GET /map``)."""
    name = quote(coll.name, safe="")
    thumbs = f"api/items/{name}/{{id}}/thumbnail?size=128" if coll.kind == "image" else None
    return map_page(
        cmap.coords, cmap.ids, method=cmap.description,
        labels=cmap.categories if cmap.colour_by == "labels" else None,
        clusters=None, colour_by="labels" if cmap.categories is not None else None,
        max_thumbnails=0, title=f"Map of {coll.name} ({cmap.total:,} items)",
        thumbnail_url=thumbs, item_link=f"./?collection={name}&like={{id}}",
        item_link_hint="click a point for the items most like it",
    )


class MapCache:
    """Each collection's map page, made once (at its first request, one maker at a time per collection)."""

    def __init__(self) -> None:
        self._pages: dict[str, bytes] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def page(self, coll: Collection, make: Any = None) -> bytes:
        """The UTF-8 page of ``coll`` (``make(coll) -> str`` builds it; default: :func:`collection_map`
        then :func:`map_html`)."""
        with self._lock:
            done = self._pages.get(coll.name)
            lock = self._locks.setdefault(coll.name, threading.Lock())
        if done is not None:
            return done
        with lock:
            with self._lock:
                done = self._pages.get(coll.name)
            if done is not None:
                return done
            build = make or (lambda c: map_html(c, collection_map(c)))
            page = build(coll).encode("utf-8")
            log.info("map of %s: %d bytes", coll.name, len(page))
            with self._lock:
                self._pages[coll.name] = page
            return page
