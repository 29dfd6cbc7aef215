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
recall, the encoder spec of the manifest, a fingerprint of the shards, the sha256 of ``index.faiss``)
are saved under ``OUT/index/``; :func:`open_index` reopens them without rebuilding and rebuilds when
the index is missing, when the embeddings changed since (the fingerprint differs), and, with a
warning, when the index is damaged or does not match its ``meta.json`` (another sha256, type, width or
size; a ``meta.json`` that is not valid, or from a phiclip that recorded no checksum). FAISS never
reads an ``index.faiss`` whose checksum does not match.

Stored vectors that are not finite (NaN or infinity: an encoder that overflowed) are refused at build
time with an error naming their shards, rather than indexed: FAISS would rank them arbitrarily.

A query must be embedded by the encoder that wrote the vectors: :func:`search` loads it from the
manifest's ``encoder["spec"]`` when none is given (:func:`phiclip.manifest.recorded_spec`), and refuses
one whose spec or width differs, or whose weights differ (``weights_fingerprint`` of the manifest and
of the encoder) unless ``allow_other_weights``. A shard whose ``id`` column is not strings, or that
repeats an id, is refused at index building, naming the shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from phiclip import manifest as manifests
from phiclip import schema
from phiclip.atomic import atomic_path, atomic_write_json
from phiclip.encoders import load_encoder
from phiclip.encoders.base import Encoder, parse_spec
from phiclip.hub import looks_like_path
from phiclip.images import ImageInput
from phiclip.pipeline.step import encode_images
from phiclip.store import (
    EmbeddingStoreError,
    check_complete,
    check_id_column,
    encoder_spec_of,
    fingerprint,
    open_embeddings,
    read_manifest,
    shard_files,
)
from phiclip.version import __version__

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
META_FILE = "meta.json"
#: 2: ``index_sha256`` (the checksum of ``index.faiss``) added; format 1 files are rebuilt.
META_FORMAT = 2
#: Cosine scores beyond [-1, 1] by more than this mean the index holds other vectors than it should.
SCORE_TOLERANCE = 1e-3

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
    index_sha256: str = ""
    path: str = ""
    built_now: bool = False

    def to_meta(self) -> dict[str, Any]:
        """The JSON written to ``index/meta.json``."""

        d = asdict(self)
        d.pop("path")
        d.pop("built_now")
        d["format"] = META_FORMAT
        d["phiclip_version"] = __version__
        return d

    @classmethod
    def from_meta(cls, meta: dict[str, Any], path: Path) -> IndexInfo:
        """Read back what :meth:`to_meta` wrote, checking every field's type.

        Raises:
            ValueError: a field is missing or has the wrong type or value (the message names it).
        """
        keys = {f for f in cls.__dataclass_fields__ if f not in ("path", "built_now")}
        missing = keys - set(meta) - {"requested_type", "metric"}
        if missing:
            raise ValueError(f"no {', '.join(repr(k) for k in sorted(missing))}")
        _check_meta_fields(meta)
        return cls(**{k: meta[k] for k in keys if k in meta}, path=str(path))


def _is_int(v: Any, minimum: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= minimum


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_meta_fields(meta: dict[str, Any]) -> None:
    """Raise ValueError naming the first field of a ``meta.json`` dict that is not what
    :meth:`IndexInfo.to_meta` writes."""
    typ, params = meta["type"], meta["params"]
    need = {"flat": (), "hnsw": ("ef_search",), "ivf": ("nprobe",)}
    checks: list[tuple[str, bool, str]] = [
        ("type", typ in need, "flat, hnsw or ivf"),
        ("params", isinstance(params, dict) and all(_is_int(v, 1) for v in params.values())
         and all(k in params for k in need.get(typ, ())), "the parameters of its type (positive integers)"),
        ("n", _is_int(meta["n"], 1), "a positive integer"),
        ("dim", _is_int(meta["dim"], 1), "a positive integer"),
        ("recall_at_10", meta["recall_at_10"] is None or _is_number(meta["recall_at_10"]), "a number or null"),
        ("recall_queries", _is_int(meta["recall_queries"]), "a count"),
        ("encoder_spec", meta["encoder_spec"] is None or isinstance(meta["encoder_spec"], str), "a string or null"),
        ("fingerprint", isinstance(meta["fingerprint"], str), "a string"),
        ("build_seconds", _is_number(meta["build_seconds"]), "a number"),
        ("requested_type", meta.get("requested_type", "auto") in INDEX_TYPES, ", ".join(INDEX_TYPES)),
        ("metric", meta.get("metric", "cosine") == "cosine", "cosine"),
        ("index_sha256", isinstance(meta["index_sha256"], str) and len(meta["index_sha256"]) == 64, "a sha256 (64 hex digits)"),
    ]
    for key, ok, expected in checks:
        if not ok:
            value = repr(meta.get(key))
            raise ValueError(f"{key!r} is {value[:60]}{'...' if len(value) > 60 else ''}, not {expected}")


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


def _index_dir(emb_dir: Path) -> Path:
    return emb_dir / schema.INDEX_DIR


def _file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _load_meta(emb_dir: Path) -> tuple[IndexInfo | None, str | None]:
    """``(info, None)`` for a valid ``meta.json`` beside an ``index.faiss``; ``(None, None)`` when
    there is no index (nothing to warn about); ``(None, why)`` when ``meta.json`` cannot be trusted."""
    idir = _index_dir(emb_dir)
    mpath = idir / META_FILE
    if not mpath.is_file() or not (idir / INDEX_FILE).is_file():
        return None, None  # never built, or a build interrupted before it wrote meta.json
    try:
        meta = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: JSON and UTF-8 errors
        return None, f"{mpath} is not readable JSON ({e})"
    if not isinstance(meta, dict):
        return None, f"{mpath} is not a JSON object"
    fmt = meta.get("format")
    if fmt == 1:
        return None, f"{mpath} was written by an older phiclip and records no checksum of {INDEX_FILE}"
    if fmt != META_FORMAT:
        return None, f"{mpath} has format {fmt!r:.20}, not {META_FORMAT}"
    try:
        return IndexInfo.from_meta(meta, idir), None
    except ValueError as e:
        return None, f"{mpath}: {e}"


def _check_stored(root: Path, info: IndexInfo, manifest: dict[str, Any]) -> tuple[str | None, bool]:
    """Whether the saved index can be used as it is, without reading it into FAISS.

    Returns ``(None, False)`` when it can; ``(why, False)`` when it is stale (the embeddings changed);
    ``(why, True)`` when it is damaged or does not match its ``meta.json`` (checked: the embeddings'
    fingerprint, the width in the manifest, the sha256 of ``index.faiss``).
    """
    try:
        if info.fingerprint != fingerprint(root):
            return "the embeddings changed since the index was built", False
    except OSError as e:
        return f"{root}: cannot read the embeddings ({e.strerror or e})", True
    mpath = Path(info.path) / META_FILE
    if info.dim != manifest["dim"]:
        return f"{mpath} says the vectors are {info.dim}-d but the manifest says {manifest['dim']}-d", True
    ipath = Path(info.path) / INDEX_FILE
    try:
        sha = _file_sha256(ipath)
    except OSError as e:
        return f"{ipath}: unreadable ({e.strerror or e})", True
    if sha != info.index_sha256:
        return f"{ipath} does not match the sha256 recorded in {mpath} (damaged or replaced)", True
    return None, False


def _actual_type(index: Any) -> str:
    """flat / hnsw / ivf, or the FAISS class name of anything else."""
    import faiss

    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexFlat):
        return "flat"
    if isinstance(index, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(index, faiss.IndexIVF):
        return "ivf"
    return type(index).__name__


def _read_checked(info: IndexInfo) -> tuple[Any, str | None]:
    """Read ``index.faiss`` (its checksum already verified) and check it is what ``meta.json`` says:
    ``(index, None)``, or ``(None, why)``. Sets the search breadth recorded at build time."""
    import faiss

    ipath, mpath = Path(info.path) / INDEX_FILE, Path(info.path) / META_FILE
    try:
        index = faiss.read_index(str(ipath))
    except (RuntimeError, MemoryError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return None, f"{ipath}: unreadable index ({first})"
    actual = _actual_type(index)
    problem = None
    if actual != info.type:
        problem = f"{mpath} says the index is {info.type} but {ipath} holds a {actual} index"
    elif index.d != info.dim:
        problem = f"{ipath} holds {index.d}-d vectors but {mpath} says {info.dim}-d"
    elif index.ntotal != info.n:
        problem = f"{ipath} holds {index.ntotal} vectors but {mpath} says {info.n}"
    elif index.metric_type != faiss.METRIC_INNER_PRODUCT:
        problem = f"{ipath} does not compare vectors by inner product"
    if problem:
        return None, problem
    if info.type in ("hnsw", "ivf"):
        _set_breadth(index, info.type, info.params["ef_search" if info.type == "hnsw" else "nprobe"])
    return index, None


def _check_finite(x: np.ndarray, shards: list[Path], root: Path, chunk: int = 65536) -> None:
    """Refuse stored vectors that are NaN or infinite, naming their shards."""
    bad = np.zeros(len(x), dtype=bool)
    for start in range(0, len(x), chunk):
        bad[start : start + chunk] = ~np.isfinite(x[start : start + chunk]).all(axis=1)
    if not bad.any():
        return
    import pyarrow.parquet as pq

    where, start = [], 0
    for shard in shards:
        rows = pq.ParquetFile(shard).metadata.num_rows
        nbad = int(bad[start : start + rows].sum())
        if nbad:
            where.append(f"{shard.name} ({nbad} of {rows} rows)")
        start += rows
    listed = ", ".join(where[:5]) + (f" and {len(where) - 5} more shards" if len(where) > 5 else "")
    raise SearchError(
        f"{root}: {int(bad.sum())} of {len(x)} stored vectors are not finite (NaN or infinity), in {listed}; "
        "the encoder produced invalid vectors for those inputs, so nothing is indexed: delete those shards from "
        f"{schema.EMBEDDINGS_DIR}/ and rerun the same `phiclip embed` command (it embeds missing shards again); "
        "if they come out NaN again, the model or its weights are broken (try --precision float32)"
    )


def build_index(
    emb_dir: str | Path,
    *,
    index_type: str = "auto",
    force: bool = False,
    target_recall: float = TARGET_RECALL,
    seed: int = 0,
    allow_incomplete: bool = False,
    model: str | None = None,
    allow_other_weights: bool = False,
) -> IndexInfo:
    """Build (or reuse) the FAISS index of an embedding output directory and save it under ``index/``.

    An index already there is reused when the embeddings have not changed since it was built, it
    was built with the same ``index_type`` request, and it is intact (its sha256, type, width and size
    are those in ``meta.json``); a damaged one is rebuilt with a warning. ``force=True`` always rebuilds.

    Args:
        emb_dir: the ``--output`` directory of ``phiclip embed``.
        index_type: ``auto`` (by size, see :func:`choose_index`), ``flat``, ``hnsw`` or ``ivf``.
        force: rebuild even when an up-to-date index exists.
        target_recall: approximate indexes widen their search until their measured recall@10
            reaches this (or a limit); the value reached is recorded either way.
        seed: seed of the IVF training sample and of the recall queries.
        allow_incomplete: index the shards of an unfinished run (``complete: false``) instead of
            refusing it; the index goes stale (rebuilt on the next use) when the run writes more.
        model: the encoder spec recorded in ``meta.json`` in place of the manifest's (a checkpoint that moved);
            it is loaded (on the CPU) and refused when its weights differ, unless ``allow_other_weights``.

    Returns:
        The :class:`IndexInfo` written to ``index/meta.json`` (``built_now`` says whether it was built).

    Raises:
        SearchError: the stored vectors are not finite, or the index cannot be written.
        EmbeddingStoreError: ``emb_dir`` is not a (finished) embedding output directory.
    """
    import faiss

    root = Path(emb_dir)
    if index_type not in INDEX_TYPES:
        raise ValueError(f"index type {index_type!r} is not one of {', '.join(INDEX_TYPES)}")
    manifest = read_manifest(root)
    check_complete(root, manifest, allow_incomplete)
    spec = encoder_spec_of(manifest)
    if model:
        load_query_encoder(root, manifest, model, device="cpu", allow_other_weights=allow_other_weights)
        spec = model
    if not force:
        info, why = _load_meta(root)
        if info is not None and info.requested_type == index_type and info.encoder_spec == spec:
            why, damaged = _check_stored(root, info, manifest)
            if why is None:
                _, why = _read_checked(info)
                if why is None:
                    return info
            elif not damaged:
                why = None  # stale: rebuilt without a warning
        if why is not None:
            log.warning("%s; rebuilding the index", why)
    fp = fingerprint(root)  # before reading: a change during the build makes the index stale, not wrong
    emb = open_embeddings(root, allow_incomplete=allow_incomplete)
    shards = emb.shard_files
    t0 = time.perf_counter()
    _check_finite(emb.embeddings, shards, root)
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
    idir = _index_dir(root)
    info = IndexInfo(
        type=plan.type,
        params=params,
        n=len(x),
        dim=x.shape[1],
        recall_at_10=None if recall is None else round(float(recall), 4),
        recall_queries=nq,
        encoder_spec=spec,
        fingerprint=fp,
        build_seconds=round(seconds, 3),
        requested_type=index_type,
        path=str(idir),
        built_now=True,
    )

    try:
        idir.mkdir(exist_ok=True)
        (idir / META_FILE).unlink(missing_ok=True)  # no meta while the index file is being replaced
        with atomic_path(idir / INDEX_FILE) as tmp:
            faiss.write_index(index, str(tmp))
            info.index_sha256 = _file_sha256(tmp)
        atomic_write_json(idir / META_FILE, info.to_meta(), indent=2)
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
        """(q, dim) query vectors -> for each query up to ``k`` hits, best first (cosine scores).

        Raises:
            SearchError: a query of another width or not finite, ``k < 1``, or scores that are not
                cosines (the index holds other vectors than it should: rebuild it).
        """
        q = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        dim = int(self.index.d)
        if q.ndim != 2 or q.shape[1] != dim:
            raise SearchError(f"query vectors have {q.shape[-1]} values but the index holds {dim}-d vectors")
        if not np.isfinite(q).all():
            raise SearchError("the query embedding is not finite (NaN or infinity); the encoder failed on this query")
        if k < 1:
            raise SearchError(f"k must be at least 1, got {k}")
        scores, rows = self.index.search(normalize_rows(q), min(k, len(self.ids)))
        found_scores = scores[rows >= 0]  # -1: no result
        if found_scores.size and not (np.abs(found_scores) <= 1 + SCORE_TOLERANCE).all():
            worst = found_scores[~(np.abs(found_scores) <= 1 + SCORE_TOLERANCE)][0]
            raise SearchError(
                f"{self.info.path}: the index returned a cosine of {worst:.4g}, so it holds other vectors than the "
                f"embeddings; rebuild it with `phiclip index --force {Path(self.info.path).parent}`"
            )
        out = []
        for srow, irow in zip(scores, rows, strict=True):
            found = [(float(s), int(i)) for s, i in zip(srow, irow, strict=True) if i >= 0]
            out.append([SearchHit(r + 1, *self._row(i), score=s) for r, (s, i) in enumerate(found)])
        return out


def _row_labels(root: Path) -> tuple[Any, Any]:
    """The id and source columns of every shard, in index row order, as two Arrow string arrays."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids, sources = [], []
    for shard in shard_files(root):
        shard_schema = pq.read_schema(shard)
        check_id_column(shard_schema, shard)
        names = shard_schema.names
        table = pq.read_table(shard, columns=[c for c in (schema.COL_ID, schema.COL_SOURCE) if c in names])
        ids.append(table.column(schema.COL_ID).combine_chunks().cast(pa.string()))
        src = table.column(schema.COL_SOURCE).combine_chunks() if schema.COL_SOURCE in names else pa.nulls(table.num_rows)
        sources.append(src.cast(pa.string()))
    if not ids:
        return pa.array([], pa.string()), pa.array([], pa.string())
    return pa.concat_arrays(ids), pa.concat_arrays(sources)


def index_is_fresh(emb_dir: str | Path) -> bool:
    """Whether ``emb_dir/index/`` holds an index built from the current embeddings (no build needed).

    A quick look (``meta.json`` and the shards' fingerprint); :func:`open_index` also verifies the
    checksum of ``index.faiss`` and rebuilds a damaged one.
    """
    root = Path(emb_dir)
    info, _ = _load_meta(root)
    try:
        return info is not None and info.fingerprint == fingerprint(root)
    except OSError:
        return False


def open_index(
    emb_dir: str | Path,
    *,
    rebuild_stale: bool = True,
    index_type: str | None = None,
    allow_incomplete: bool = False,
) -> SearchIndex:
    """Open the saved index of an embedding output directory, building it first when it is absent,
    was built from other embeddings, or is damaged (and ``rebuild_stale``).

    ``index.faiss`` is only handed to FAISS when its sha256 is the one in ``meta.json``; then its
    type, width and size must be those ``meta.json`` records. A damaged index is rebuilt with a
    warning (logged), as a missing one is.

    Args:
        emb_dir: the ``--output`` directory of ``phiclip embed``.
        rebuild_stale: rebuild a missing, stale or damaged index; ``False`` raises :class:`SearchError` instead.
        index_type: the type to (re)build with; default: what the old index was asked for, else ``auto``.
        allow_incomplete: open the index of an unfinished run (``complete: false``) instead of refusing it.
    """
    root = Path(emb_dir)
    manifest = read_manifest(root)
    check_complete(root, manifest, allow_incomplete)
    info, why = _load_meta(root)
    damaged = why is not None
    index = None
    if info is not None:
        why, damaged = _check_stored(root, info, manifest)
        if why is None:
            index, why = _read_checked(info)
            damaged = why is not None
    if index is None:
        if not rebuild_stale:
            if why is None:
                raise SearchError(f"{root}: no index; run `phiclip index {root}`")
            if not damaged:
                raise SearchError(f"{root}: the index is older than the embeddings; run `phiclip index {root}`")
            raise SearchError(f"{why}; run `phiclip index --force {root}`")
        if damaged:
            log.warning("%s; rebuilding the index", why)
        else:
            log.info("%s: %s; building it", root, why or "no index yet")
        requested = index_type or (info.requested_type if info else "auto")
        info = build_index(root, index_type=requested, force=True, allow_incomplete=allow_incomplete)
        index, why = _read_checked(info)
        if index is None:
            raise SearchError(f"{why}; the index was just rebuilt and is still unreadable: check the disk")
    assert info is not None
    ids, sources = _row_labels(root)
    if len(ids) != index.ntotal:
        raise SearchError(
            f"{root}: the index holds {index.ntotal} vectors but the shards {len(ids)}; run `phiclip index --force {root}`"
        )
    return SearchIndex(index, info, ids, sources, manifest)


def check_encoder(encoder: Encoder, manifest: dict[str, Any], where: str | Path = "", *,
                  allow_other_weights: bool = False, relocated: bool = False) -> None:
    """Refuse an encoder other than the one that wrote the vectors: another spec or width, or (when both
    record one) another weights fingerprint, unless ``allow_other_weights``
    (:func:`phiclip.manifest.check_encoder`; ``relocated``: the caller named where the checkpoint is now).

    Raises:
        SearchError: naming both specs, widths or fingerprints, and the fix.
    """
    described = {**encoder.describe(), "dim": int(encoder.dim)}
    described.setdefault("spec", getattr(encoder, "name", ""))
    manifests.check_encoder(manifest, described, where=where or "the index", purpose="query", error=SearchError,
                            allow_other_weights=allow_other_weights, relocated=relocated)


def require_text_side(encoder: Encoder, where: str | Path = "") -> None:
    """Raise :class:`SearchError` unless ``encoder`` can embed text."""
    if "text" not in encoder.modalities:
        prefix = f"{where}: " if where else ""
        raise SearchError(
            f"{prefix}the vectors were made by {encoder.name!r}, which embeds images only, so a text query "
            "cannot be embedded; query with --image instead, or embed the images with a CLIP or SigLIP model"
        )


def recorded_checkpoint(manifest: dict[str, Any]) -> tuple[str | None, Path | None]:
    """The encoder spec a manifest records (as it was typed) and, when its location is a local folder,
    that folder as an absolute path (resolved against the current folder; ``None`` for a hub id)."""
    spec = encoder_spec_of(manifest)
    if not spec:
        return None, None
    try:
        location = parse_spec(spec).location
    except ValueError:
        return spec, None
    local = Path(location).expanduser()
    if local.is_dir() or looks_like_path(location):
        return spec, local.resolve()
    return spec, None


def query_spec(root: str | Path, manifest: dict[str, Any], model: str | None = None) -> str:
    """The spec of the encoder that embeds queries for ``root``: ``model`` (an override, for a checkpoint that
    moved) or the spec the manifest records.

    Raises:
        SearchError: no ``model`` and the manifest records no spec.
    """
    if model:
        return model
    spec = manifests.recorded_spec(manifest, root)
    if not spec:
        raise SearchError(f"{root}: the manifest names no encoder spec; pass the encoder that made the vectors "
                          "with --model (model= in Python)")
    return spec


def _unloadable(root: str | Path, manifest: dict[str, Any], error: BaseException) -> SearchError:
    """The error for a recorded checkpoint that does not load: it names the checkpoint (and, for a local folder,
    where it was looked for) and suggests ``--model``."""
    spec, local = recorded_checkpoint(manifest)
    kind = str(spec).split(":", 1)[0]
    where = f" (looked for in {str(local)!r})" if local is not None and not local.is_dir() else ""
    return SearchError(
        f"{root}: the vectors were made by {spec!r}{where}, which cannot be loaded here ({error}); if its checkpoint "
        f"moved, or is a folder recorded relative to another working folder, give its current location with "
        f"--model {kind}:NEW_PATH (model= in Python)"
    )


def check_query_encoder(encoder: Encoder, manifest: dict[str, Any], where: str | Path = "", *,
                        override: bool = False, allow_other_weights: bool = False) -> None:
    """:func:`check_encoder` for the encoder that embeds queries; ``override``: it was given with ``--model`` in
    place of the recorded one (accepted under another path only when it loads the recorded weights)."""
    check_encoder(encoder, manifest, where, allow_other_weights=allow_other_weights, relocated=override)


def load_query_encoder(root: str | Path, manifest: dict[str, Any], model: str | None = None, *, device: str = "auto",
                       dtype: str = "auto", allow_other_weights: bool = False, load: Any = None) -> Encoder:
    """Load the encoder that embeds queries for ``root`` and check it against the manifest: the recorded one
    (:func:`check_query_encoder`), or ``model`` in its place. ``load`` defaults to
    :func:`phiclip.encoders.load_encoder`.

    Raises:
        SearchError: no spec; the recorded checkpoint cannot be loaded (moved, or a relative folder that does not
            resolve here: the message names it and suggests ``--model``); a check fails.
    """
    spec = query_spec(root, manifest, model)
    try:
        encoder = (load or load_encoder)(spec, device=device, dtype=dtype)
    except (ValueError, OSError) as e:
        if model:
            raise
        raise _unloadable(root, manifest, e) from None
    check_query_encoder(encoder, manifest, root, override=bool(model), allow_other_weights=allow_other_weights)
    return encoder


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
    return np.asarray(encode_images(encoder, [image]), dtype=np.float32)


def search(
    emb_dir: str | Path,
    text: str | None = None,
    image: ImageInput | None = None,
    k: int = 10,
    encoder: Encoder | None = None,
    *,
    device: str = "auto",
    dtype: str = "auto",
    allow_incomplete: bool = False,
    model: str | None = None,
    allow_other_weights: bool = False,
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
        allow_incomplete: search the shards of an unfinished run (``complete: false``) instead of refusing it.
        model: an encoder spec used in place of the recorded one (a checkpoint that moved); refused when
            its weights differ from the recorded ones, unless ``allow_other_weights``.

    Returns:
        Up to ``k`` :class:`SearchHit`, best first.

    Raises:
        SearchError: no or two queries, a text query for an image-only encoder, an encoder mismatch (spec,
            width, or weights unless ``allow_other_weights``).
        EmbeddingStoreError: ``emb_dir`` is not a finished embedding output directory.
    """
    root = Path(emb_dir)
    if (text is None) == (image is None):
        raise SearchError("give exactly one query: text or image")
    manifest = read_manifest(root)
    check_complete(root, manifest, allow_incomplete)  # before loading a model
    if encoder is None:
        encoder = load_query_encoder(root, manifest, model, device=device, dtype=dtype,
                                     allow_other_weights=allow_other_weights)
    else:
        check_query_encoder(encoder, manifest, root, allow_other_weights=allow_other_weights)
    if text is not None:
        require_text_side(encoder, root)  # before a possibly long index build
    index = open_index(root, allow_incomplete=allow_incomplete)
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
    "check_query_encoder",
    "choose_index",
    "embed_query",
    "index_is_fresh",
    "load_query_encoder",
    "query_spec",
    "recorded_checkpoint",
    "RecallProbe",
    "normalize_rows",
    "open_index",
    "recall_at_k",
    "require_text_side",
    "search",
]
