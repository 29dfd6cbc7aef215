"""The collections a server answers for: each embedding output with its index, its row metadata and
the encoder named in its manifest.

:func:`load_collections` opens every output directory once (building its index when absent or stale,
with :func:`phiclip.retrieval.open_index`) and loads each distinct encoder spec once: collections
written by the same encoder share it. A :class:`Collection` answers nearest-neighbour queries for
query vectors (optionally only among rows with one label), gives back the stored vector of one of
its items ("more like this" without running the model), and reads the image of one of its items
from the source recorded in its shards, never from anything a request names.
"""

from __future__ import annotations

import bisect
import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from phiclip import schema
from phiclip.encoders.base import Encoder
from phiclip.images import ImageDecodeError, load_image
from phiclip.retrieval import (
    SearchError,
    SearchIndex,
    check_query_encoder,
    load_query_encoder,
    normalize_rows,
    open_index,
    query_spec,
)
from phiclip.store import EmbeddingStoreError, shard_files

log = logging.getLogger(__name__)

#: Shard columns that are never returned as fields of a result.
_HIDDEN_COLUMNS = {schema.COL_ID, schema.COL_SOURCE, schema.COL_EMBEDDING}
#: A column with this name drives the label filter.
LABEL_COLUMN = "label"
#: The most distinct labels a collection lists for the filter (more: no filter list).
MAX_LISTED_LABELS = 1000


class ItemNotFound(LookupError):
    """No item with that id in the collection."""


class NoImage(LookupError):
    """The item exists but its image cannot be read back (text item, dataset row, missing file)."""


@dataclass
class Collection:
    """One served output directory.

    ``fields`` holds the shards' scalar columns other than id/source/embedding (width, height,
    text, and any label/caption/metadata columns), row i belonging to index row i.
    """

    name: str
    path: Path
    index: SearchIndex
    spec: str
    fields: Any  # pyarrow.Table
    labels: list[str] | None = None
    _id_order: Any = field(default=None, repr=False)  # row numbers sorted by id, for lookups
    _selectors: dict[str, Any] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # --- description ----------------------------------------------------------------------------
    @property
    def manifest(self) -> dict[str, Any]:
        """The output's manifest."""
        return self.index.manifest

    @property
    def kind(self) -> str:
        """``image`` or ``text`` (what the rows are)."""
        return str(self.manifest.get("kind") or ("text" if schema.COL_TEXT in self.fields.column_names else "image"))

    def __len__(self) -> int:
        return len(self.index)

    def describe(self, modalities: frozenset[str] | set[str]) -> dict[str, Any]:
        """What ``GET /api/collections`` says about this collection."""
        info = self.index.info
        return {
            "name": self.name,
            "kind": self.kind,
            "count": len(self),
            "dim": int(info.dim),
            "complete": self.manifest.get("complete") is not False,
            "encoder": {"spec": self.spec, "modalities": sorted(modalities)},
            "index": {"type": info.type, "recall_at_10": info.recall_at_10, "params": info.params},
            "fields": [c for c in self.fields.column_names],
            "labels": self.labels,
            "has_labels": LABEL_COLUMN in self.fields.column_names,
        }

    # --- rows -----------------------------------------------------------------------------------
    def row_of(self, item_id: str) -> int:
        """The index row of an item id.

        Raises:
            ItemNotFound: no such id.
        """
        view = self.sorted_ids()
        i = bisect.bisect_left(view, item_id)
        if i < len(view) and view[i] == item_id:
            return int(view.order[i])
        raise ItemNotFound(f"collection {self.name!r} has no item with id {item_id!r}")

    def sorted_ids(self) -> _SortedIds:
        """The ids in sorted order (the sort is made once, by :func:`open_collection`)."""
        if self._id_order is None:
            import pyarrow.compute as pc

            self._id_order = pc.sort_indices(self.index.ids).to_numpy()
        return _SortedIds(self.index.ids, self._id_order)

    def record(self, row: int) -> dict[str, Any]:
        """id, source and the scalar fields of one row."""
        rec: dict[str, Any] = {"id": str(self.index.ids[row].as_py()), "source": self.index.sources[row].as_py() or ""}
        for name in self.fields.column_names:
            value = self.fields.column(name)[row].as_py()
            rec[name] = value
        return rec

    # --- search ---------------------------------------------------------------------------------
    def _selector(self, label: str) -> tuple[Any, int]:
        """A FAISS id selector of the rows with ``label`` (cached) and their number."""
        import faiss
        import pyarrow.compute as pc

        with self._lock:
            cached = self._selectors.get(label)
        if cached is not None:
            return cached[0], cached[1]
        col = self.fields.column(LABEL_COLUMN)
        mask = pc.fill_null(pc.equal(pc.cast(col, "string"), label), False)
        rows = np.flatnonzero(mask.to_numpy(zero_copy_only=False)).astype(np.int64)
        entry = (faiss.IDSelectorBatch(rows), int(len(rows)), rows)  # rows kept with their selector
        with self._lock:
            if len(self._selectors) > 256:
                self._selectors.clear()
            self._selectors[label] = entry
        return entry[0], entry[1]

    def _search_params(self, k: int, selector: Any, fraction: float) -> Any:
        import faiss

        info = self.index.info
        if info.type == "hnsw":
            p = faiss.SearchParametersHNSW()
            # A filter leaves fewer candidates on the graph walk: widen it as the share shrinks.
            p.efSearch = int(min(4096, max(k, info.params.get("ef_search", 64)) / max(fraction, 1 / 64)))
        elif info.type == "ivf":
            p = faiss.SearchParametersIVF()
            nlist = info.params.get("nlist", 1)
            p.nprobe = int(min(nlist, info.params.get("nprobe", 1) / max(fraction, 1 / nlist)))
        else:
            p = faiss.SearchParameters()
        p.sel = selector
        return p

    def search(self, vectors: np.ndarray, k: int, label: str | None = None) -> list[list[tuple[int, float]]]:
        """(q, dim) query vectors -> for each, up to ``k`` ``(row, cosine score)`` best first, only
        among rows whose label is ``label`` when given.

        Raises:
            SearchError: a label filter on a collection without labels, or a wrong query width.
        """
        q = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        if q.ndim != 2 or q.shape[1] != self.index.info.dim:
            raise SearchError(f"query vectors have {q.shape[-1]} values but {self.name!r} holds {self.index.info.dim}-d vectors")
        if not np.isfinite(q).all():
            raise SearchError("the query embedding is not finite (NaN or infinity); the encoder failed on this query")
        k = min(int(k), len(self))
        if label is None:
            scores, rows = self.index.index.search(normalize_rows(q), k)
        else:
            if LABEL_COLUMN not in self.fields.column_names:
                raise SearchError(f"collection {self.name!r} has no {LABEL_COLUMN!r} column to filter on")
            selector, n = self._selector(label)
            if n == 0:
                return [[] for _ in range(len(q))]
            params = self._search_params(min(k, n), selector, n / max(1, len(self)))
            scores, rows = self.index.index.search(normalize_rows(q), min(k, n), params=params)
        return [
            [(int(r), float(s)) for s, r in zip(srow, rrow) if r >= 0]
            for srow, rrow in zip(scores, rows)
        ]

    def stored_vector(self, row: int) -> np.ndarray:
        """The (1, dim) unit vector of one row, as indexed."""
        return np.asarray(self.index.index.reconstruct(int(row)), dtype=np.float32)[None, :]

    # --- images ---------------------------------------------------------------------------------
    def image_payload(self, row: int) -> str | bytes:
        """Where the image of a row lives: its file path, or its encoded bytes in a Parquet input.

        Raises:
            NoImage: a text item, a dataset row, or a source that is not a readable file.
        """
        rec_id = self.index.ids[row].as_py()
        source = self.index.sources[row].as_py() or ""
        if self.kind == "text":
            raise NoImage(f"item {rec_id!r} of {self.name!r} is a text; it has no image")
        m = re.fullmatch(r"(.+)#row=(\d+)", source)
        if m is not None:
            return _table_image(self.manifest.get("input") or {}, m.group(1), int(m.group(2)), rec_id)
        if source.startswith(("hf:", "http://", "https://")):
            raise NoImage(f"item {rec_id!r}: the image of {source!r} is not read back by the server")
        path = Path(source)
        if not path.is_file():
            raise NoImage(f"item {rec_id!r}: its source {source!r} is not a readable file (moved or deleted?)")
        return str(path)


class _SortedIds:
    """The ids of a collection in sorted order, read on demand (binary search without a Python copy
    of every id: Arrow sorts strings by their UTF-8 bytes, the order of Python's ``str`` comparison)."""

    def __init__(self, ids: Any, order: np.ndarray) -> None:
        self.ids = ids
        self.order = order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> str:
        return str(self.ids[int(self.order[i])].as_py())


def _table_image(input_desc: dict[str, Any], table: str, row: int, rec_id: str) -> str | bytes:
    """The bytes (or path) of row ``row`` of the Parquet input the output was embedded from."""
    import pyarrow.parquet as pq

    if input_desc.get("kind") != "table" or input_desc.get("location") != table or not input_desc.get("column"):
        raise NoImage(f"item {rec_id!r}: the manifest does not say which column of {table} holds the images")
    try:
        pf = pq.ParquetFile(table)
        starts = [0]
        for g in range(pf.metadata.num_row_groups):
            starts.append(starts[-1] + pf.metadata.row_group(g).num_rows)
        group = bisect.bisect_right(starts, row) - 1
        value = pf.read_row_group(group, columns=[input_desc["column"]]).column(0)[row - starts[group]].as_py()
    except (OSError, ValueError, IndexError, KeyError) as e:
        raise NoImage(f"item {rec_id!r}: cannot read row {row} of {table} ({e})") from None
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str) and value:
        p = Path(value)
        p = p if p.is_absolute() else Path(table).parent / p
        if p.is_file():
            return str(p)
    raise NoImage(f"item {rec_id!r}: row {row} of {table} holds no readable image")


def _read_fields(root: Path) -> Any:
    """The scalar columns of every shard except id/source/embedding, in index row order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for shard in shard_files(root):
        sch = pq.read_schema(shard)
        names = [f.name for f in sch if f.name not in _HIDDEN_COLUMNS and not pa.types.is_nested(f.type)
                 and not pa.types.is_binary(f.type) and not pa.types.is_large_binary(f.type)]
        tables.append(pq.read_table(shard, columns=names))
    if not tables:
        return pa.table({})
    fields = pa.concat_tables(tables, promote_options="default")
    # Annotation columns every row leaves empty (a folder has no labels) are no fields of this collection.
    empty = [n for n in fields.column_names if fields.column(n).null_count == fields.num_rows and fields.num_rows]
    return fields.drop_columns(empty) if empty else fields


def _labels_of(fields: Any) -> list[str] | None:
    import pyarrow.compute as pc

    if LABEL_COLUMN not in fields.column_names:
        return None
    values = pc.unique(pc.cast(fields.column(LABEL_COLUMN), "string").combine_chunks()).drop_null().to_pylist()
    return sorted(values)[:MAX_LISTED_LABELS] if len(values) <= MAX_LISTED_LABELS else None


def collection_names(paths: list[Path]) -> list[str]:
    """One short, unique, URL-safe name per directory (its folder name; ``-2``, ``-3`` for repeats)."""
    names: list[str] = []
    for p in paths:
        base = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(p).resolve().name).strip("-.") or "collection"
        name, i = base, 2
        while name in names:
            name, i = f"{base}-{i}", i + 1
        names.append(name)
    return names


def open_collection(path: str | Path, name: str, *, allow_incomplete: bool = False,
                    model: str | None = None) -> Collection:
    """Open one output directory: its index (built when absent or stale), fields and labels;
    ``allow_incomplete`` serves an unfinished run instead of refusing it; ``model`` is the encoder spec that
    embeds its queries in place of the recorded one (checked when the encoder loads: :func:`load_collections`).

    Raises:
        EmbeddingStoreError / SearchError: not an embedding output, no encoder spec, unreadable shards.
    """
    root = Path(path).expanduser()
    index = open_index(root, **({"allow_incomplete": True} if allow_incomplete else {}))
    spec = query_spec(root, index.manifest, model)
    info = index.info
    if info.type == "ivf":  # reconstruct() of an IVF index needs its direct map
        import faiss

        faiss.extract_index_ivf(index.index).make_direct_map()
    fields = _read_fields(root)
    if fields.num_columns and fields.num_rows != len(index):
        raise EmbeddingStoreError(f"{root}: the shards hold {fields.num_rows} rows but the index {len(index)}")
    coll = Collection(name=name, path=root, index=index, spec=spec, fields=fields, labels=_labels_of(fields))
    coll.sorted_ids()  # sort now, not in a request
    return coll


def load_collections(paths: list[str | Path], *, device: str = "auto", dtype: str = "auto",
                     allow_incomplete: bool = False, load: Any = None, model: str | None = None,
                     allow_other_weights: bool = False) -> tuple[list[Collection], dict[str, Encoder]]:
    """Open every output directory and load each distinct encoder once.

    Args:
        paths: output directories of ``phiclip embed`` / ``embed-text``.
        device, dtype: where and in what precision the encoders run.
        allow_incomplete: serve unfinished runs too.
        load: the encoder loader (default :func:`phiclip.encoders.load_encoder`).
        model: an encoder spec used in place of each output's recorded one (a checkpoint that moved);
            refused for an output whose recorded weights differ, unless ``allow_other_weights``.

    Returns:
        ``(collections, encoders)``: ``encoders`` maps each collection's spec to its loaded encoder.

    Raises:
        ValueError: no paths; any directory that cannot be served (the message names it).
    """
    if not paths:
        raise ValueError("give at least one output directory of `phiclip embed`")
    roots = [Path(p).expanduser() for p in paths]
    collections = [open_collection(p, n, allow_incomplete=allow_incomplete, model=model)
                   for p, n in zip(roots, collection_names(roots))]
    encoders: dict[str, Encoder] = {}
    for c in collections:
        if c.spec not in encoders:
            log.info("loading encoder %s", c.spec)
            encoders[c.spec] = load_query_encoder(c.path, c.manifest, model, device=device, dtype=dtype,
                                                  allow_other_weights=allow_other_weights, load=load)
        else:
            check_query_encoder(encoders[c.spec], c.manifest, c.path, override=bool(model),
                                allow_other_weights=allow_other_weights)
    return collections, encoders


def decode_upload(data: bytes, name: str, *, max_pixels: int | None, keep_alpha: bool) -> Any:
    """Encoded image bytes from a request -> PIL image, with :func:`phiclip.images.load_image`'s pixel
    limit and error messages (``ImageDecodeError`` naming ``name``)."""

    try:
        return load_image(bytes(data), max_pixels=max_pixels, keep_alpha=keep_alpha)
    except ImageDecodeError as e:
        raise ImageDecodeError(name, e.reason, e.stage) from None


__all__ = [
    "LABEL_COLUMN",
    "Collection",
    "ItemNotFound",
    "NoImage",
    "collection_names",
    "decode_upload",
    "load_collections",
    "open_collection",
]
