"""Duplicates in a collection: exact copies (same bytes) and near copies (cosine ≥ a threshold).

Nothing is ever deleted: :func:`find_duplicates` returns a groups table and a keep-list, and
:func:`write_duplicates` writes them as Parquet (through :func:`phiclip.atomic.atomic_path`).

**Exact duplicates** (:func:`exact_duplicates`): the SHA-256 of each item's bytes, read through a
callable the caller gives (:func:`source_reader` reads the ``source`` paths of an embed output). An
item whose bytes cannot be read is reported in ``unreadable`` and takes no part in exact grouping.

**Near duplicates** (:func:`near_duplicate_pairs`): pairs of L2-normalised vectors with inner product
(cosine) ≥ ``threshold``. Up to ``exact_limit`` items (20 000) this is exact: a FAISS ``IndexFlatIP``
``range_search`` in blocks of queries sized so that a block's results stay bounded even when everything
is a duplicate. Above it, inverted lists find the candidates (:func:`_ivf_pairs`): a spherical k-means
of ``nlist ≈ 2·sqrt(n)`` centroids (trained on a sample), each item filed under its nearest centroid,
and each item compared with the items of its ``nprobe`` (8) nearest lists by one float32 matrix product
per list, straight from the given vectors (no index copy of them, no n x n). Every similarity reported
is that exact product, so no pair below the threshold is ever kept; the approximation is only which
pairs get compared: a pair is missed when neither item probes the other's list (measured in
BENCHMARKS.md, "Know your collection"). Cost ``2·n·d·(nlist + nprobe·n/nlist)`` flops: about n^1.5.
Each item keeps at most ``max_neighbors`` pairs (its
most similar), so memory is O(n·max_neighbors) whatever the data.

**Groups** (:func:`group_pairs`): connected components of the pairs, then the *star rule* against
chaining: a component's representative is its member nearest the component's mean direction (largest
``v_i · Σ_j v_j``) and the group is the representative plus the members with cosine ≥ ``threshold`` to
it; the members left out form components again among themselves (with the pairs between them) and are
grouped the same way until none is left. So every member of a group is within the threshold of its
representative and a chain A~B~C with A≁C is never one group unless B is the representative (then A and
C are both near B, which is what the group says). Chosen over complete-link refinement because it is
O(m·d) per component instead of O(m²), and the table can state each member's similarity to the item
that is kept.

Exact groups are formed first; their non-representative copies are left out of near grouping (their
vectors are the representative's) so each copy appears once. An exact group's representative can then
also be a member of a near group: the keep-list holds every id that is not a non-representative member
of some group (one per group, and every singleton).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from phiclip import schema
from phiclip.atomic import atomic_path
from phiclip.collection.vectors import l2_normalize

__all__ = [
    "DEFAULT_THRESHOLD",
    "DuplicateReport",
    "exact_duplicates",
    "find_duplicates",
    "group_pairs",
    "near_duplicate_pairs",
    "source_reader",
    "write_duplicates",
]

#: Cosine at or above which two items are near duplicates by default.
DEFAULT_THRESHOLD = 0.95
#: Up to this many items near duplicates are searched exactly (IndexFlatIP range_search), above it
#: through inverted lists (n^2 flops: 20 000 x 20 000 x 512 is 4e11, seconds on 2 cores).
EXACT_LIMIT = 20_000
#: Above ``EXACT_LIMIT``: each item is compared with the items of its this many nearest lists.
DEFAULT_NPROBE = 8
_KMEANS_ITER = 5
_KMEANS_POINTS = 24
_ASSIGN_BLOCK = 65_536
#: Results of one range_search block are at most about this many pairs (the query block shrinks with n).
_PAIR_BUDGET = 1 << 24
_MAX_QUERY_BLOCK = 4096
#: Similarities are float32 inner products: an item and its exact copy can measure 1 - 6e-8, a pair built
#: at cosine t can measure t ± 1e-7. A pair counts when its similarity is ≥ threshold - SIM_TOLERANCE.
SIM_TOLERANCE = 1e-6

GROUPS_FILE = "duplicates.parquet"
KEEP_FILE = "keep.parquet"
UNREADABLE_FILE = "unreadable.parquet"


def source_reader(ids: Sequence[str], sources: Sequence[str]) -> Callable[[str], bytes]:
    """A reader of the bytes of each id's ``source`` (a file path as :mod:`phiclip.schema` stores it).

    The returned callable raises (``OSError``, ``KeyError``, ``ValueError``) for an id without a readable
    file; :func:`exact_duplicates` reports those as unreadable.
    """
    by_id = dict(zip(ids, sources))

    def read(item: str) -> bytes:
        source = by_id[item]
        if not source:
            raise ValueError("no source recorded")
        if "://" in source:
            raise ValueError(f"not a local file: {source}")
        with open(schema.source_to_path(source), "rb") as f:
            return f.read()

    return read


def exact_duplicates(
    ids: Sequence[str], read_bytes: Callable[[str], bytes]
) -> tuple[list[list[int]], list[tuple[str, str]]]:
    """Groups of rows whose bytes are identical (SHA-256), and the ids that could not be read.

    Returns:
        ``(groups, unreadable)``: each group a list of row numbers (two or more, the first row the
        representative); ``unreadable`` a list of ``(id, reason)``.
    """
    by_hash: dict[bytes, list[int]] = {}
    unreadable: list[tuple[str, str]] = []
    for row, item in enumerate(ids):
        try:
            data = read_bytes(item)
        except Exception as e:  # noqa: BLE001 - any failure to read one item is reported, not fatal
            unreadable.append((item, f"{type(e).__name__}: {e}"))
            continue
        by_hash.setdefault(hashlib.sha256(data).digest(), []).append(row)
    groups = [rows for rows in by_hash.values() if len(rows) > 1]
    groups.sort(key=lambda g: g[0])
    return groups, unreadable


def _cap_per_query(q: np.ndarray, j: np.ndarray, s: np.ndarray, max_neighbors: int) -> np.ndarray:
    """Indices of the entries kept when each query keeps its ``max_neighbors`` most similar results."""
    order = np.lexsort((j, -s, q))  # by query, then most similar first
    qs = q[order]
    starts = np.searchsorted(qs, qs, side="left")
    rank = np.arange(len(qs)) - starts
    return order[rank < max_neighbors]


def _ivf_lists(x: np.ndarray, nlist: int, nprobe: int, seed: int) -> np.ndarray:
    """Each row's ``nprobe`` nearest centroids (int32 (n, nprobe), nearest first) of a spherical k-means."""
    import faiss

    n, d = x.shape
    km = faiss.Kmeans(d, nlist, niter=_KMEANS_ITER, spherical=True, seed=seed, verbose=False,
                      max_points_per_centroid=_KMEANS_POINTS, min_points_per_centroid=1)
    if n > nlist * _KMEANS_POINTS:  # sample here: faiss would copy all of x first
        sample = np.sort(np.random.default_rng(seed).choice(n, nlist * _KMEANS_POINTS, replace=False))
        km.train(np.ascontiguousarray(x[sample]))
    else:
        km.train(x)
    quantizer = faiss.IndexFlatIP(d)
    quantizer.add(km.centroids)
    probes = np.empty((n, nprobe), dtype=np.int32)
    for start in range(0, n, _ASSIGN_BLOCK):
        stop = min(n, start + _ASSIGN_BLOCK)
        _, labels = quantizer.search(x[start:stop], nprobe)
        probes[start:stop] = labels
    return probes


def _ivf_pairs(
    x: np.ndarray, floor: np.float32, max_neighbors: int, nlist: int | None, nprobe: int, seed: int = 0
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Candidate pairs through inverted lists, each scored exactly (float32 dot products of ``x``).

    Row ``b`` lives in the list of its nearest centroid; row ``a`` is compared with every row of its
    ``nprobe`` nearest lists: one matrix product per list (the rows probing it times the rows in it),
    no index copy of ``x``. A pair is found when either row probes the other's list.
    """
    n = x.shape[0]
    if nlist is None:
        nlist = int(round(2 * np.sqrt(n)))
    nlist = max(1, min(nlist, n // 16))
    nprobe = max(1, min(nprobe, nlist))
    probes = _ivf_lists(x, nlist, nprobe, seed)
    home = probes[:, 0]
    home_order = np.argsort(home, kind="stable")
    home_bounds = np.searchsorted(home[home_order], np.arange(nlist + 1))
    flat = probes.reshape(-1)
    probe_order = np.argsort(flat, kind="stable")
    probe_bounds = np.searchsorted(flat[probe_order], np.arange(nlist + 1))
    probe_rows = (probe_order // nprobe).astype(np.int64)
    del flat, probe_order, probes
    qs: list[np.ndarray] = []
    js: list[np.ndarray] = []
    ss: list[np.ndarray] = []
    held = 0
    for lst in range(nlist):
        members = home_order[home_bounds[lst]:home_bounds[lst + 1]].astype(np.int64)
        if len(members) == 0:
            continue
        queries = probe_rows[probe_bounds[lst]:probe_bounds[lst + 1]]
        xm = x[members]
        block = max(1, _PAIR_BUDGET // 4 // len(members))
        for start in range(0, len(queries), block):
            qrows = queries[start:start + block]
            sims = x[qrows] @ xm.T
            qa, mb = np.nonzero(sims >= floor)
            if len(qa) == 0:
                continue
            q, j, s = qrows[qa], members[mb], sims[qa, mb]
            keep = j != q
            q, j, s = q[keep], j[keep], s[keep]
            if len(q) and np.bincount(qa[keep]).max() > max_neighbors:
                sel = _cap_per_query(q, j, s, max_neighbors)
                q, j, s = q[sel], j[sel], s[sel]
            qs.append(q)
            js.append(j)
            ss.append(s)
            held += len(q)
        if held > _PAIR_BUDGET:  # bound memory: one query's results from all its lists, capped again
            q, j, s = np.concatenate(qs), np.concatenate(js), np.concatenate(ss)
            sel = _cap_per_query(q, j, s, max_neighbors)
            qs, js, ss = [q[sel]], [j[sel]], [s[sel]]
            held = len(qs[0])
    if qs:
        q, j, s = np.concatenate(qs), np.concatenate(js), np.concatenate(ss)
        sel = _cap_per_query(q, j, s, max_neighbors)
        qs, js, ss = [q[sel]], [j[sel]], [s[sel]]
    return qs, js, ss


def near_duplicate_pairs(
    vectors: np.ndarray,
    threshold: float = DEFAULT_THRESHOLD,
    *,
    max_neighbors: int = 64,
    exact_limit: int = EXACT_LIMIT,
    nlist: int | None = None,
    nprobe: int = DEFAULT_NPROBE,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i, j), i < j, of rows with inner product ≥ ``threshold``, and their similarities.

    Args:
        vectors: (n, d), L2-normalised for cosine.
        threshold: the similarity at or above which a pair is kept (inclusive, within ``SIM_TOLERANCE``).
        max_neighbors: each row keeps at most this many partners, its most similar.
        exact_limit: above this many rows inverted lists (:func:`_ivf_pairs`) replace the exact search.
        nlist: inverted lists above ``exact_limit`` (default ``2·sqrt(n)``, at most ``n/16``).
        nprobe: lists each row is compared with above ``exact_limit`` (its nearest centroids).

    Returns:
        ``(i, j, sim)`` arrays (int64, int64, float32), sorted by (i, j).
    """
    import faiss

    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n = x.shape[0] if x.ndim == 2 else 0
    empty = (np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32))
    if n < 2:
        return empty
    d = x.shape[1]
    qs: list[np.ndarray] = []
    js: list[np.ndarray] = []
    ss: list[np.ndarray] = []
    if n <= exact_limit:
        index = faiss.IndexFlatIP(d)
        index.add(x)
        block = max(1, min(_MAX_QUERY_BLOCK, _PAIR_BUDGET // n))
        floor = np.float32(threshold - SIM_TOLERANCE)
        # range_search keeps sim > radius; the largest float32 below the floor makes it ≥ floor
        radius = float(np.nextafter(floor, np.float32(-np.inf)))
        for start in range(0, n, block):
            stop = min(n, start + block)
            lims, dist, labels = index.range_search(x[start:stop], radius)
            q = np.repeat(np.arange(start, stop, dtype=np.int64), np.diff(lims).astype(np.int64))
            j = labels.astype(np.int64)
            s = dist.astype(np.float32)
            keep = (j != q) & (s >= floor)
            q, j, s = q[keep], j[keep], s[keep]
            sel = _cap_per_query(q, j, s, max_neighbors)
            qs.append(q[sel])
            js.append(j[sel])
            ss.append(s[sel])
    else:
        floor = np.float32(threshold - SIM_TOLERANCE)
        qs, js, ss = _ivf_pairs(x, floor, max_neighbors, nlist, nprobe)
    q = np.concatenate(qs) if qs else empty[0]
    j = np.concatenate(js) if js else empty[1]
    s = np.concatenate(ss) if ss else empty[2]
    lo, hi = np.minimum(q, j), np.maximum(q, j)
    key = lo * n + hi
    key, first = np.unique(key, return_index=True)  # each unordered pair once
    return lo[first], hi[first], s[first]


def _squeeze_rows(x: np.ndarray, rows: np.ndarray, block: int = _ASSIGN_BLOCK) -> np.ndarray:
    """``x[rows]`` (``rows`` increasing) moved to the top of ``x`` in place, block by block; returns that
    view. Row k's source ``rows[k] >= k``, and each block is gathered before it is written, so no row is
    overwritten before it is read."""
    for start in range(0, len(rows), block):
        stop = min(len(rows), start + block)
        x[start:stop] = x[rows[start:stop]]
    return x[: len(rows)]


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, a: int) -> int:
        p = self.parent
        root = a
        while p[root] != root:
            root = int(p[root])
        while p[a] != root:
            p[a], a = root, int(p[a])
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _components(members: np.ndarray, i: np.ndarray, j: np.ndarray) -> list[np.ndarray]:
    """Connected components (two or more rows) of the pairs restricted to ``members``, in row order."""
    if len(members) < 2 or len(i) == 0:
        return []
    local = {int(m): t for t, m in enumerate(members)}
    uf = _UnionFind(len(members))
    for a, b in zip(i.tolist(), j.tolist()):
        ta, tb = local.get(a), local.get(b)
        if ta is not None and tb is not None:
            uf.union(ta, tb)
    roots = np.array([uf.find(t) for t in range(len(members))])
    comps = []
    for r in np.unique(roots):
        rows = members[roots == r]
        if len(rows) > 1:
            comps.append(np.sort(rows))
    comps.sort(key=lambda c: int(c[0]))
    return comps


def group_pairs(
    vectors: np.ndarray, i: np.ndarray, j: np.ndarray, threshold: float = DEFAULT_THRESHOLD
) -> list[tuple[int, list[int], list[float]]]:
    """Near-duplicate groups from pairs by the star rule (module docstring).

    Args:
        vectors: (n, d) L2-normalised.
        i, j: the pairs (row numbers) at or above ``threshold``.
        threshold: the cosine every member must reach with its group's representative.

    Returns:
        ``[(representative_row, member_rows, member_sims)]`` with the representative first in
        ``member_rows`` (its similarity 1.0 by definition), groups of two or more only.
    """
    x = np.asarray(vectors, dtype=np.float32)
    thr = np.float32(threshold - SIM_TOLERANCE)
    groups: list[tuple[int, list[int], list[float]]] = []
    pending = _components(np.unique(np.concatenate([i, j])) if len(i) else np.empty(0, np.int64), i, j)
    while pending:
        comp = pending.pop(0)
        v = x[comp].astype(np.float64)
        centrality = v @ v.sum(axis=0)
        rep_local = int(np.argmax(centrality))  # ties: the lowest row
        rep = int(comp[rep_local])
        sims = (x[comp] @ x[rep]).astype(np.float32)
        inside = sims >= thr
        inside[rep_local] = True
        members = comp[inside]
        if len(members) > 1:
            member_sims = sims[inside]
            order = np.lexsort((members, -member_sims))  # most similar first, then by row
            others = [(int(m), float(s)) for m, s in zip(members[order], member_sims[order]) if int(m) != rep]
            groups.append((rep, [rep, *(m for m, _ in others)], [1.0, *(s for _, s in others)]))
        rest = comp[~inside]
        if len(rest) > 1:
            # pairs among the rest only: restrict once, then split into components again
            in_rest = np.isin(i, rest) & np.isin(j, rest)
            pending.extend(_components(rest, i[in_rest], j[in_rest]))
            pending.sort(key=lambda c: int(c[0]))
    groups.sort(key=lambda g: g[0])
    return groups


@dataclass
class DuplicateReport:
    """What :func:`find_duplicates` found.

    ``groups`` rows are ``(group_id, id, representative_id, similarity, kind)``, kind ``"exact"`` or
    ``"near"``, the representative's own row included (similarity 1.0). ``keep`` lists the ids to keep
    (input order); ``unreadable`` the ``(id, reason)`` of items whose bytes could not be read.
    """

    groups: list[tuple[int, str, str, float, str]]
    keep: list[str]
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    threshold: float = DEFAULT_THRESHOLD
    method: str = "none"

    @property
    def n_groups(self) -> int:
        """Number of groups (exact and near)."""
        return len({g[0] for g in self.groups})

    def group_of(self, item: str, kind: str | None = None) -> list[str]:
        """The ids in the (first) group of ``kind`` that holds ``item`` (empty when none)."""
        gids = [g[0] for g in self.groups if g[1] == item and (kind is None or g[4] == kind)]
        if not gids:
            return []
        return [g[1] for g in self.groups if g[0] == gids[0]]


def find_duplicates(
    ids: Sequence[str],
    vectors: np.ndarray | None,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    read_bytes: Callable[[str], bytes] | None = None,
    max_neighbors: int = 64,
    exact_limit: int = EXACT_LIMIT,
    nprobe: int = DEFAULT_NPROBE,
    normalized: bool = False,
    overwrite: bool = False,
) -> DuplicateReport:
    """Exact duplicates (when ``read_bytes`` is given) and near duplicates (when ``vectors`` is given).

    Args:
        ids: one id per row.
        vectors: (n, d) vectors, L2-normalised here (a copy); ``None`` for exact duplicates only.
        threshold: cosine at or above which two items are near duplicates, in [-1, 1].
        read_bytes: ``read_bytes(id) -> bytes`` for exact duplicates (e.g. :func:`source_reader`); its
            failures are reported in ``unreadable``.
        max_neighbors, exact_limit, nprobe: see :func:`near_duplicate_pairs`.
        normalized: the rows of ``vectors`` (float32, C-contiguous) are L2-normalised already, so no
            normalised copy is made (for a million vectors of dim 512, 2 GB less).
        overwrite: with ``normalized``, the rows of ``vectors`` may be overwritten: the rows left out of
            the near-duplicate search (exact copies) are then squeezed out in place instead of into a
            copy of the others (a memory-mapped matrix stays the only one). The results are the same.

    Returns:
        A :class:`DuplicateReport`. Nothing is deleted or moved.
    """
    ids = [str(x) for x in ids]
    n = len(ids)
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold={threshold}: a cosine threshold lies in [-1, 1]")
    if vectors is not None and np.asarray(vectors).shape[0] != n:
        raise ValueError(f"{n} ids but {np.asarray(vectors).shape[0]} vectors")
    rows: list[tuple[int, str, str, float, str]] = []
    dropped: set[int] = set()
    gid = 0
    unreadable: list[tuple[str, str]] = []
    exact_copies: set[int] = set()
    if read_bytes is not None:
        groups, unreadable = exact_duplicates(ids, read_bytes)
        for g in groups:
            rep = g[0]
            for r in g:
                rows.append((gid, ids[r], ids[rep], 1.0, "exact"))
                if r != rep:
                    dropped.add(r)
                    exact_copies.add(r)
            gid += 1
    method = "none"
    if vectors is not None and n > 1:
        given = np.asarray(vectors, dtype=np.float32)
        x = np.ascontiguousarray(given) if normalized else l2_normalize(given)
        part = np.array([r for r in range(n) if r not in exact_copies], dtype=np.int64)
        if len(part) == n:
            sub = x  # no copy when there is no exact copy
        elif normalized and overwrite and x.flags.writeable:
            sub = _squeeze_rows(x, part)
        else:
            sub = np.ascontiguousarray(x[part])
        i, j, _ = near_duplicate_pairs(
            sub, threshold, max_neighbors=max_neighbors, exact_limit=exact_limit, nprobe=nprobe
        )
        method = (
            "exact range search (IndexFlatIP)"
            if len(part) <= exact_limit
            else f"inverted lists (spherical k-means, nprobe {nprobe}), candidates scored exactly"
        )
        for rep, members, sims in group_pairs(sub, i, j, threshold):
            for m, s in zip(members, sims):
                rows.append((gid, ids[part[m]], ids[part[rep]], s, "near"))
                if m != rep:
                    dropped.add(int(part[m]))
            gid += 1
    keep = [ids[r] for r in range(n) if r not in dropped]
    return DuplicateReport(rows, keep, unreadable, threshold, method)


def write_duplicates(report: DuplicateReport, folder: str | Path) -> dict[str, Path]:
    """Write ``duplicates.parquet`` (the groups), ``keep.parquet`` (column ``id``) and, when any,
    ``unreadable.parquet`` (``id``, ``reason``) into ``folder`` (created), each atomically.

    Returns:
        ``{"groups": path, "keep": path[, "unreadable": path]}``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    g = report.groups
    groups = pa.table(
        {
            "group_id": pa.array([r[0] for r in g], pa.int64()),
            "id": pa.array([r[1] for r in g], pa.string()),
            "representative_id": pa.array([r[2] for r in g], pa.string()),
            "similarity": pa.array([r[3] for r in g], pa.float32()),
            "kind": pa.array([r[4] for r in g], pa.string()),
        }
    )
    paths: dict[str, Path] = {}
    with atomic_path(out / GROUPS_FILE) as tmp:
        pq.write_table(groups, tmp)
    paths["groups"] = out / GROUPS_FILE
    with atomic_path(out / KEEP_FILE) as tmp:
        pq.write_table(pa.table({"id": pa.array(report.keep, pa.string())}), tmp)
    paths["keep"] = out / KEEP_FILE
    if report.unreadable:
        table = pa.table(
            {
                "id": pa.array([u[0] for u in report.unreadable], pa.string()),
                "reason": pa.array([u[1] for u in report.unreadable], pa.string()),
            }
        )
        with atomic_path(out / UNREADABLE_FILE) as tmp:
            pq.write_table(table, tmp)
        paths["unreadable"] = out / UNREADABLE_FILE
    return paths
