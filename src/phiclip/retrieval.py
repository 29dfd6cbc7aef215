"""Nearest-neighbour search over an embedding output directory, with FAISS.

Similarity is cosine: vectors are L2-normalised (again, whatever the manifest says) and compared by
inner product. The index type follows the size of the set (:func:`choose_index`):

- up to ``EXACT_MAX_ROWS`` vectors: ``IndexFlatIP``, exact;
- up to ``HNSW_MAX_ROWS``: HNSW (``IndexHNSWFlat``), no training, high recall;
- beyond: IVF (``IndexIVFFlat``) with about ``4 * sqrt(n)`` lists, trained on a sample.

At build time the recall@10 of the index against exact search is measured on a sample of the
indexed vectors used as queries (each query's own row left out of both lists); when an approximate
index falls short of ``target_recall`` its search breadth (``efSearch`` / ``nprobe``) is doubled
until it reaches it or a limit. The index and a small ``meta.json`` (type, parameters, n, dim,
recall, the encoder spec of the manifest, a fingerprint of the shards) are saved under
``OUT/index/``; :func:`open_index` reopens them without rebuilding and rebuilds only when the
embeddings changed since (the fingerprint differs).

A query must be embedded by the encoder that wrote the vectors: :func:`search` loads it from the
manifest's ``encoder["spec"]`` when none is given, and refuses one whose spec differs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from phiclip import schema
from phiclip.store import (
    EmbeddingStoreError,
    encoder_spec_of,
    fingerprint,
    open_embeddings,
    read_manifest,
    shard_files,
)

if TYPE_CHECKING:  # pragma: no cover
    from phiclip.encoders.base import Encoder
    from phiclip.images import ImageInput

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
META_FILE = "meta.json"
META_FORMAT = 1

#: Sets up to this size get an exact ``IndexFlatIP``.
EXACT_MAX_ROWS = 100_000
#: Sets up to this size get HNSW; larger ones IVF.
HNSW_MAX_ROWS = 1_000_000
#: Number of indexed vectors used as queries to measure recall@10 at build time.
RECALL_QUERIES = 500
#: The recall@10 an approximate index is tuned to reach at build time.
TARGET_RECALL = 0.95

INDEX_TYPES = ("auto", "flat", "hnsw", "ivf")


class SearchError(ValueError):
    """A search cannot run as asked (wrong encoder, missing text side, bad query...)."""


@dataclass(frozen=True)
class SearchHit:
    """One result: ``rank`` from 1, the row's ``id`` and ``source``, and its cosine ``score``."""

    rank: int
    id: str
    source: str
    score: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True)
class IndexPlan:
    """Which FAISS index to build. ``params``: hnsw ``M``/``ef_construction``/``ef_search``;
    ivf ``nlist``/``nprobe``/``train_size``; nothing for flat."""

    type: str
    params: dict[str, int] = field(default_factory=dict)

    @property
    def exact(self) -> bool:
        """Whether the index returns the exact nearest neighbours."""
        return self.type == "flat"


@dataclass
class IndexInfo:
    """What ``meta.json`` records about a built index (and whether this call built it)."""

    type: str
    params: dict[str, int]
    n: int
    dim: int
    recall_at_10: float | None
    recall_queries: int
    encoder_spec: str | None
    fingerprint: str
    build_seconds: float
    requested_type: str = "auto"
    metric: str = "cosine"
    path: str = ""
    built_now: bool = False

    def to_meta(self) -> dict[str, Any]:
        """The JSON written to ``index/meta.json``."""
        from phiclip import __version__

        d = asdict(self)
        d.pop("path")
        d.pop("built_now")
        d["format"] = META_FORMAT
        d["phiclip_version"] = __version__
        return d

    @classmethod
    def from_meta(cls, meta: dict[str, Any], path: Path) -> IndexInfo:
        """Read back what :meth:`to_meta` wrote."""
        keys = {f for f in cls.__dataclass_fields__ if f not in ("path", "built_now")}
        missing = keys - set(meta) - {"requested_type", "metric"}
        if missing:
            raise KeyError(", ".join(sorted(missing)))
        return cls(**{k: meta[k] for k in keys if k in meta}, path=str(path))


# --- planning --------------------------------------------------------------------------------


def _power_of_two_near(x: float) -> int:
    return int(2 ** round(math.log2(max(x, 1.0))))


def choose_index(n: int, index_type: str = "auto") -> IndexPlan:
    """Pick the index for ``n`` vectors (``index_type='auto'``) or fill in the parameters of a forced type.

    >>> choose_index(5_000).type, choose_index(500_000).type, choose_index(5_000_000).type
    ('flat', 'hnsw', 'ivf')
    """
    if index_type not in INDEX_TYPES:
        raise ValueError(f"index type {index_type!r} is not one of {', '.join(INDEX_TYPES)}")
    if n < 1:
        raise ValueError("cannot index an empty set of vectors")
    if index_type == "auto":
        index_type = "flat" if n <= EXACT_MAX_ROWS else "hnsw" if n <= HNSW_MAX_ROWS else "ivf"
    if index_type == "flat":
        return IndexPlan("flat")
    if index_type == "hnsw":
        return IndexPlan("hnsw", {"M": 32, "ef_construction": 80, "ef_search": 64})
    # IVF: about 4 * sqrt(n) lists (a power of two), at least ~39 training points per list (FAISS's
    # own minimum), a training sample of up to 64 points per list, and 1/32 of the lists probed.
    nlist = max(1, min(_power_of_two_near(4 * math.sqrt(n)), n // 39))
    nprobe = max(1, min(nlist, max(8, nlist // 32)))
    return IndexPlan("ivf", {"nlist": nlist, "nprobe": nprobe, "train_size": min(n, 64 * nlist)})


# --- building --------------------------------------------------------------------------------


def normalize_rows(x: np.ndarray, *, inplace: bool = False, chunk: int = 65536) -> np.ndarray:
    """(n, d) -> (n, d) C-contiguous float32 with unit L2 rows (all-zero rows stay zero).

    ``inplace=True`` reuses ``x``'s memory when it already is writable C-contiguous float32.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = x if inplace and x.flags.writeable else np.empty_like(x)
    for start in range(0, len(x), chunk):
        block = x[start : start + chunk]
        norms = np.linalg.norm(block, axis=1, keepdims=True)
        out[start : start + chunk] = block / np.where(norms > 0, norms, 1.0)
    return out


def _set_breadth(index: Any, plan_type: str, value: int) -> None:
    import faiss

    if plan_type == "hnsw":
        faiss.downcast_index(index).hnsw.efSearch = int(value)
    elif plan_type == "ivf":
        faiss.extract_index_ivf(index).nprobe = int(value)


def _make_index(plan: IndexPlan, x: np.ndarray, seed: int) -> Any:
    """Build and fill the FAISS index of ``plan`` with the (n, d) unit rows ``x``."""
    import faiss

    n, d = x.shape
    if plan.type == "flat":
        index = faiss.IndexFlatIP(d)
    elif plan.type == "hnsw":
        index = faiss.IndexHNSWFlat(d, plan.params["M"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = plan.params["ef_construction"]
    elif plan.type == "ivf":
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, plan.params["nlist"], faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        sample = x[np.sort(rng.choice(n, size=plan.params["train_size"], replace=False))]
        index.cp.seed = seed
        index.train(sample)
    else:  # pragma: no cover - choose_index rejects other types
        raise ValueError(plan.type)
    index.add(x)
    if plan.type == "hnsw":
        _set_breadth(index, "hnsw", plan.params["ef_search"])
    elif plan.type == "ivf":
        _set_breadth(index, "ivf", plan.params["nprobe"])
    return index


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int) -> float:
    """Mean over queries of |approx top-k ∩ exact top-k| / k.

    Args:
        approx_ids, exact_ids: (q, >=k) row ids, best first (-1 for "no result").
    """
    if approx_ids.shape[0] == 0 or k < 1:
        raise ValueError("recall needs at least one query and k >= 1")
    hits = 0
    for a, e in zip(approx_ids[:, :k], exact_ids[:, :k]):
        hits += len(set(a[a >= 0].tolist()) & set(e[e >= 0].tolist()))
    return hits / (k * approx_ids.shape[0])


def _without_self(ids: np.ndarray, self_ids: np.ndarray, k: int) -> np.ndarray:
    """(q, k+1) neighbour ids -> (q, k): each query's own row removed (or the last one dropped)."""
    out = np.empty((ids.shape[0], k), dtype=ids.dtype)
    for i, (row, s) in enumerate(zip(ids, self_ids)):
        keep = row[row != s]
        out[i] = keep[:k] if len(keep) >= k else np.pad(keep, (0, k - len(keep)), constant_values=-1)
    return out


@dataclass
class RecallProbe:
    """Sample queries (rows ``qidx`` of the indexed set) and their exact neighbours, computed once so
    that an index can be re-measured cheaply while its search breadth is tuned."""

    qidx: np.ndarray  # (q,) row numbers of the queries
    exact_ids: np.ndarray  # (q, k + 1) exact neighbours, best first
    k: int

    @classmethod
    def sample(cls, x: np.ndarray, *, k: int = 10, queries: int = RECALL_QUERIES, seed: int = 0) -> RecallProbe | None:
        """Draw up to ``queries`` rows of ``x`` (n, d) and find their exact neighbours (brute force,
        without a second copy of ``x``). ``None`` for fewer than two rows."""
        import faiss

        n = x.shape[0]
        if n < 2:
            return None
        k = min(k, n - 1)
        rng = np.random.default_rng(seed)
        qidx = np.sort(rng.choice(n, size=min(n, queries), replace=False))
        _, exact_ids = faiss.knn(x[qidx], x, k + 1, metric=faiss.METRIC_INNER_PRODUCT)
        return cls(qidx=qidx, exact_ids=exact_ids, k=k)

    def recall(self, index: Any, x: np.ndarray) -> float:
        """Recall@k of ``index`` (holding the rows of ``x``) on these queries, each query's own row
        left out of both neighbour lists."""
        _, approx_ids = index.search(x[self.qidx], self.k + 1)
        return recall_at_k(
            _without_self(approx_ids, self.qidx, self.k), _without_self(self.exact_ids, self.qidx, self.k), self.k
        )


def measure_recall(index: Any, x: np.ndarray, *, k: int = 10, queries: int = RECALL_QUERIES, seed: int = 0) -> tuple[float | None, int]:
    """Recall@k of ``index`` against exact inner-product search over ``x`` (n, d).

    The queries are a random sample of the indexed rows; each query's own row is left out of both
    neighbour lists, so the measure is about the *other* neighbours. Returns ``(recall, n_queries)``
    (``(None, 0)`` for fewer than two rows).
    """
    probe = RecallProbe.sample(x, k=k, queries=queries, seed=seed)
    if probe is None:
        return None, 0
    return probe.recall(index, x), len(probe.qidx)


def _index_dir(emb_dir: Path) -> Path:
    return emb_dir / schema.INDEX_DIR


def _write_atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _read_meta(emb_dir: Path) -> IndexInfo | None:
    idir = _index_dir(emb_dir)
    mpath = idir / META_FILE
    if not mpath.is_file() or not (idir / INDEX_FILE).is_file():
        return None
    try:
        meta = json.loads(mpath.read_text(encoding="utf-8"))
        if meta.get("format") != META_FORMAT:
            return None
        return IndexInfo.from_meta(meta, idir)
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("%s is unreadable; the index will be rebuilt", mpath)
        return None


def build_index(
    emb_dir: str | Path,
    *,
    index_type: str = "auto",
    force: bool = False,
    target_recall: float = TARGET_RECALL,
    seed: int = 0,
) -> IndexInfo:
    """Build (or reuse) the FAISS index of an embedding output directory and save it under ``index/``.

    An index already there is reused when the embeddings have not changed since it was built and it
    was built with the same ``index_type`` request; ``force=True`` always rebuilds.

    Args:
        emb_dir: the ``--output`` directory of ``phiclip embed``.
        index_type: ``auto`` (by size, see :func:`choose_index`), ``flat``, ``hnsw`` or ``ivf``.
        force: rebuild even when an up-to-date index exists.
        target_recall: approximate indexes widen their search until their measured recall@10
            reaches this (or a limit); the value reached is recorded either way.
        seed: seed of the IVF training sample and of the recall queries.

    Returns:
        The :class:`IndexInfo` written to ``index/meta.json`` (``built_now`` says whether it was built).
    """
    import faiss

    root = Path(emb_dir)
    if index_type not in INDEX_TYPES:
        raise ValueError(f"index type {index_type!r} is not one of {', '.join(INDEX_TYPES)}")
    manifest = read_manifest(root)
    if not force:
        info = _read_meta(root)
        if info is not None and info.fingerprint == fingerprint(root) and info.requested_type == index_type:
            return info
    fp = fingerprint(root)  # before reading: a change during the build makes the index stale, not wrong
    emb = open_embeddings(root)
    t0 = time.perf_counter()
    x = normalize_rows(emb.embeddings, inplace=True)  # (n, d) unit rows: inner product = cosine
    del emb
    plan = choose_index(len(x), index_type)
    index = _make_index(plan, x, seed)
    params = dict(plan.params)
    probe = RecallProbe.sample(x, seed=seed)
    recall = None if probe is None else probe.recall(index, x)
    nq = 0 if probe is None else len(probe.qidx)
    if not plan.exact and probe is not None and recall is not None:
        key, limit = ("ef_search", 1024) if plan.type == "hnsw" else ("nprobe", params.get("nlist", 1))
        while recall < target_recall and params[key] < limit:
            params[key] = min(limit, params[key] * 2)
            _set_breadth(index, plan.type, params[key])
            recall = probe.recall(index, x)
    seconds = time.perf_counter() - t0
    info = IndexInfo(
        type=plan.type,
        params=params,
        n=len(x),
        dim=x.shape[1],
        recall_at_10=None if recall is None else round(float(recall), 4),
        recall_queries=nq,
        encoder_spec=encoder_spec_of(manifest),
        fingerprint=fp,
        build_seconds=round(seconds, 3),
        requested_type=index_type,
        path=str(_index_dir(root)),
        built_now=True,
    )
    idir = _index_dir(root)
    try:
        idir.mkdir(exist_ok=True)
        (idir / META_FILE).unlink(missing_ok=True)  # no meta while the index file is being replaced
        _write_atomic(idir / INDEX_FILE, lambda p: faiss.write_index(index, str(p)))
        _write_atomic(
            idir / META_FILE, lambda p: p.write_text(json.dumps(info.to_meta(), indent=2) + "\n", encoding="utf-8")
        )
    except OSError as e:
        raise SearchError(f"{idir}: cannot write the index ({e.strerror or e}); make the directory writable") from None
    log.info("built a %s index of %d vectors (recall@10 %s) in %.2fs", plan.type, len(x), info.recall_at_10, seconds)
    return info


# --- opening and querying --------------------------------------------------------------------


class SearchIndex:
    """An opened index with the ids and sources of its rows; query it many times with :meth:`query`.

    ``ids`` and ``sources`` are Arrow string arrays (or lists), row i belonging to index row i; only
    the rows of the hits are turned into Python strings.
    """

    def __init__(self, index: Any, info: IndexInfo, ids: Any, sources: Any, manifest: dict[str, Any]):
        self.index = index
        self.info = info
        self.ids = ids
        self.sources = sources
        self.manifest = manifest

    def _row(self, i: int) -> tuple[str, str]:
        rid, src = self.ids[i], self.sources[i]
        rid = rid.as_py() if hasattr(rid, "as_py") else rid
        src = src.as_py() if hasattr(src, "as_py") else src
        return str(rid), "" if src is None else str(src)

    def __len__(self) -> int:
        return len(self.ids)

    def query(self, vectors: np.ndarray, k: int = 10) -> list[list[SearchHit]]:
        """(q, dim) query vectors -> for each query up to ``k`` hits, best first (cosine scores)."""
        q = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        if q.shape[1] != self.info.dim:
            raise SearchError(f"query vectors have {q.shape[1]} values but the index holds {self.info.dim}-d vectors")
        if k < 1:
            raise SearchError(f"k must be at least 1, got {k}")
        scores, rows = self.index.search(normalize_rows(q), min(k, len(self.ids)))
        out = []
        for srow, irow in zip(scores, rows, strict=True):
            found = [(float(s), int(i)) for s, i in zip(srow, irow, strict=True) if i >= 0]  # -1: no result
            out.append([SearchHit(r + 1, *self._row(i), score=s) for r, (s, i) in enumerate(found)])
        return out


def _row_labels(root: Path) -> tuple[Any, Any]:
    """The id and source columns of every shard, in index row order, as two Arrow string arrays."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids, sources = [], []
    for shard in shard_files(root):
        names = pq.read_schema(shard).names
        table = pq.read_table(shard, columns=[c for c in (schema.COL_ID, schema.COL_SOURCE) if c in names])
        if schema.COL_ID not in names:
            raise EmbeddingStoreError(f"{shard}: no {schema.COL_ID!r} column; it was not written by `phiclip embed`")
        ids.append(table.column(schema.COL_ID).combine_chunks().cast(pa.string()))
        src = table.column(schema.COL_SOURCE).combine_chunks() if schema.COL_SOURCE in names else pa.nulls(table.num_rows)
        sources.append(src.cast(pa.string()))
    if not ids:
        return pa.array([], pa.string()), pa.array([], pa.string())
    return pa.concat_arrays(ids), pa.concat_arrays(sources)


def index_is_fresh(emb_dir: str | Path) -> bool:
    """Whether ``emb_dir/index/`` holds an index built from the current embeddings (no build needed)."""
    root = Path(emb_dir)
    info = _read_meta(root)
    try:
        return info is not None and info.fingerprint == fingerprint(root)
    except OSError:
        return False


def open_index(emb_dir: str | Path, *, rebuild_stale: bool = True, index_type: str | None = None) -> SearchIndex:
    """Open the saved index of an embedding output directory, building it first when it is absent
    or was built from other embeddings (and ``rebuild_stale``).

    Args:
        emb_dir: the ``--output`` directory of ``phiclip embed``.
        rebuild_stale: rebuild a missing or stale index; ``False`` raises :class:`SearchError` instead.
        index_type: the type to (re)build with; default: what the old index was asked for, else ``auto``.
    """
    import faiss

    root = Path(emb_dir)
    manifest = read_manifest(root)
    info = _read_meta(root)
    fresh = info is not None and info.fingerprint == fingerprint(root)
    if not fresh:
        if not rebuild_stale:
            what = "no index" if info is None else "the index is older than the embeddings"
            raise SearchError(f"{root}: {what}; run `phiclip index {root}`")
        log.info("%s: %s; building it", root, "no index yet" if info is None else "embeddings changed")
        info = build_index(root, index_type=index_type or (info.requested_type if info else "auto"), force=True)
    assert info is not None
    idir = _index_dir(root)
    try:
        index = faiss.read_index(str(idir / INDEX_FILE))
    except RuntimeError as e:
        if not rebuild_stale:
            raise SearchError(f"{idir / INDEX_FILE}: unreadable index ({e}); run `phiclip index --force {root}`") from None
        info = build_index(root, index_type=info.requested_type, force=True)
        index = faiss.read_index(str(idir / INDEX_FILE))
    if info.type in ("hnsw", "ivf"):
        _set_breadth(index, info.type, info.params["ef_search" if info.type == "hnsw" else "nprobe"])
    ids, sources = _row_labels(root)
    if len(ids) != index.ntotal:
        raise SearchError(
            f"{root}: the index holds {index.ntotal} vectors but the shards {len(ids)}; run `phiclip index --force {root}`"
        )
    return SearchIndex(index, info, ids, sources, manifest)


def _canonical_spec(spec: str) -> str:
    """A spec with sorted options and, for a local directory, its resolved absolute path."""
    from phiclip.encoders.base import EncoderSpec, parse_spec

    try:
        parsed = parse_spec(spec)
    except ValueError:
        return spec.strip()
    local = Path(parsed.location).expanduser()
    if local.is_dir():
        parsed = EncoderSpec(parsed.kind, str(local.resolve()), parsed.options)
    return str(parsed)


def _same_spec(a: str, b: str) -> bool:
    """Spec strings naming the same encoder: equal up to option order, kind case and the spelling
    of a local directory's path."""
    return _canonical_spec(a) == _canonical_spec(b)


def check_encoder(encoder: Encoder, manifest: dict[str, Any], where: str | Path = "") -> None:
    """Refuse an encoder other than the one that wrote the vectors (spec or width differ).

    Raises:
        SearchError: naming both specs.
    """
    expected = encoder_spec_of(manifest)
    got = str(encoder.describe().get("spec") or getattr(encoder, "name", ""))
    prefix = f"{where}: " if where else ""
    if expected and not _same_spec(got, expected):
        raise SearchError(
            f"{prefix}the vectors were made by {expected!r} but the query encoder is {got!r}; "
            "queries must use the encoder that made the index (omit the encoder to load it from the manifest)"
        )
    if int(encoder.dim) != int(manifest["dim"]):
        raise SearchError(f"{prefix}the query encoder makes {encoder.dim}-d vectors but the index holds {manifest['dim']}-d ones")


def require_text_side(encoder: Encoder, where: str | Path = "") -> None:
    """Raise :class:`SearchError` unless ``encoder`` can embed text."""
    if "text" not in encoder.modalities:
        prefix = f"{where}: " if where else ""
        raise SearchError(
            f"{prefix}the vectors were made by {encoder.name!r}, which embeds images only, so a text query "
            "cannot be embedded; query with --image instead, or embed the images with a CLIP or SigLIP model"
        )


def embed_query(
    encoder: Encoder, *, text: str | None = None, image: ImageInput | None = None, where: str | Path = ""
) -> np.ndarray:
    """Embed exactly one query (text or image) with ``encoder`` -> (1, dim) float32."""
    if (text is None) == (image is None):
        raise SearchError("give exactly one query: text or image")
    if text is not None:
        if not text.strip():
            raise SearchError("the text query is empty")
        require_text_side(encoder, where)
        return np.asarray(encoder.encode_texts([text]), dtype=np.float32)
    return np.asarray(encoder.encode_images([image]), dtype=np.float32)


def search(
    emb_dir: str | Path,
    text: str | None = None,
    image: ImageInput | None = None,
    k: int = 10,
    encoder: Encoder | None = None,
    *,
    device: str = "auto",
    dtype: str = "auto",
) -> list[SearchHit]:
    """Find the ``k`` stored vectors nearest (by cosine) to one text or image query.

    The index under ``emb_dir/index/`` is opened (built first when absent or stale). The query is
    embedded by ``encoder``, or by the encoder named in the manifest (loaded on ``device``/``dtype``).

    Args:
        emb_dir: the ``--output`` directory of ``phiclip embed``.
        text: a text query (needs an encoder with a text side, e.g. CLIP).
        image: an image query: a path, PIL image, array or bytes.
        k: number of results.
        encoder: an already loaded encoder; it must be the one in the manifest.

    Returns:
        Up to ``k`` :class:`SearchHit`, best first.

    Raises:
        SearchError: no or two queries, a text query for an image-only encoder, an encoder mismatch.
        EmbeddingStoreError: ``emb_dir`` is not a finished embedding output directory.
    """
    root = Path(emb_dir)
    if (text is None) == (image is None):
        raise SearchError("give exactly one query: text or image")
    manifest = read_manifest(root)
    if encoder is None:
        spec = encoder_spec_of(manifest)
        if not spec:
            raise SearchError(f"{root}: the manifest names no encoder spec; pass the encoder that made the vectors")
        from phiclip.encoders import load_encoder

        encoder = load_encoder(spec, device=device, dtype=dtype)
    check_encoder(encoder, manifest, root)
    if text is not None:
        require_text_side(encoder, root)  # before a possibly long index build
    index = open_index(root)
    return index.query(embed_query(encoder, text=text, image=image, where=root), k)[0]


__all__ = [
    "EXACT_MAX_ROWS",
    "HNSW_MAX_ROWS",
    "INDEX_TYPES",
    "EmbeddingStoreError",
    "IndexInfo",
    "IndexPlan",
    "SearchError",
    "SearchHit",
    "SearchIndex",
    "build_index",
    "check_encoder",
    "choose_index",
    "embed_query",
    "index_is_fresh",
    "RecallProbe",
    "measure_recall",
    "normalize_rows",
    "open_index",
    "recall_at_k",
    "require_text_side",
    "search",
]
