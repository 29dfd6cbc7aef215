"""The collection commands as API functions: one function per ``phiclip`` command, each reading its input,
computing, and writing Parquet, an HTML page and a ``summary.json`` into an output folder.

* :func:`dedup_collection` (``phiclip dedup``): exact and near duplicates, a groups table, a keep-list,
  a page of the largest groups. Never deletes or moves a file.
* :func:`cluster_collection` (``phiclip cluster``): k-means, per-item cluster and distance, sizes and
  representatives; with labels, homogeneity, completeness, V-measure and NMI.
* :func:`map_collection` (``phiclip map``): 2-D coordinates (UMAP or PCA, the method stated) and an
  interactive scatter page.
* :func:`align_collections` (``phiclip align``): mutual-kNN, CKNNA and linear CKA between two vector sets
  of the same items, joined by id; a JSON file.

An input is an embed output folder or a Parquet file with an id column and a vector column
(:func:`~phiclip.collection.vectors.read_vectors`). Labels come from a Parquet column (``labels="COLUMN"``)
or, for inputs whose sources are image paths, from each image's folder name (``labels="folder"``).
Every function takes ``progress``: a callable given one line of text as each step starts.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from phiclip import schema
from phiclip.atomic import atomic_path, atomic_write_json
from phiclip.collection.align import DEFAULT_K, AlignmentReport, alignment
from phiclip.collection.cluster import ClusterResult, kmeans, label_scores, write_clusters
from phiclip.collection.dedup import (
    DEFAULT_THRESHOLD,
    DuplicateReport,
    find_duplicates,
    source_reader,
    write_duplicates,
)
from phiclip.collection.layout import Layout, layout_2d
from phiclip.collection.pages import clusters_page, duplicates_page, map_page, write_page
from phiclip.collection.vectors import (
    CollectionInputError,
    VectorSet,
    read_vectors,
    read_vectors_into_memmap,
)

__all__ = [
    "FOLDER_LABELS",
    "AlignResult",
    "ClusterSummary",
    "DedupResult",
    "MapResult",
    "align_collections",
    "cluster_collection",
    "dedup_collection",
    "load_collection",
    "map_collection",
]

#: ``labels=`` value that takes each item's label from the folder its image sits in.
FOLDER_LABELS = "folder"
SUMMARY_FILE = "summary.json"
DUPLICATES_PAGE = "duplicates.html"
CLUSTERS_PAGE = "clusters.html"
MAP_FILE = "map.parquet"
MAP_PAGE = "map.html"
ALIGNMENT_FILE = "alignment.json"

Progress = Callable[[str], None] | None


def _say(progress: Progress) -> Callable[[str], None]:
    return progress or (lambda _msg: None)


def _folder_labels(vs: VectorSet) -> list[str]:
    if not vs.sources or not any(vs.sources):
        raise CollectionInputError(
            f"{vs.path}: labels='folder' takes each label from the folder of the item's image, but this input "
            "records no image paths (no source column); give a label column of a Parquet file instead"
        )
    out = []
    for s in vs.sources:
        try:
            path = os.fsdecode(schema.source_to_path(s)) if s else ""
        except ValueError:
            path = s
        out.append(Path(path).parent.name if path else "")
    return out


def load_collection(
    path: str | Path,
    *,
    vector_column: str | None = None,
    id_column: str = schema.COL_ID,
    labels: str | None = None,
    allow_incomplete: bool = False,
) -> VectorSet:
    """Read an input of a collection command (:func:`read_vectors`) with its labels.

    ``labels``: ``None`` (none), ``"folder"`` (the parent folder name of each item's image path, from the
    ``source`` column; a Parquet column named ``folder`` wins over that), or a Parquet column name.
    """
    p = Path(path).expanduser()
    if labels is None:
        return read_vectors(p, vector_column=vector_column, id_column=id_column, allow_incomplete=allow_incomplete)
    if labels == FOLDER_LABELS and (p.is_dir() or not _has_column(p, labels)):
        vs = read_vectors(p, vector_column=vector_column, id_column=id_column, allow_incomplete=allow_incomplete)
        vs.labels = _folder_labels(vs)
        return vs
    if p.is_dir():
        raise CollectionInputError(
            f"{p}: an embed output folder has no label column ({labels!r}); use --labels folder (the folder of "
            "each image) or export ids, vectors and labels to one Parquet file"
        )
    return read_vectors(p, vector_column=vector_column, id_column=id_column, label_column=labels)


def _has_column(path: Path, name: str) -> bool:
    try:
        import pyarrow.parquet as pq

        return name in pq.read_schema(path).names
    except Exception:  # noqa: BLE001 - unreadable: read_vectors says why
        return False


def _prepare_output(output: str | Path) -> Path:
    out = Path(output).expanduser()
    if out.exists() and not out.is_dir():
        raise CollectionInputError(f"{out}: exists and is not a folder; give a folder for -o/--output")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _input_record(vs: VectorSet) -> dict[str, Any]:
    encoder = (vs.manifest or {}).get("encoder") or {}
    return {"path": str(vs.path), "items": len(vs), "dim": vs.dim, "encoder": encoder.get("spec")}


def _sources_by_id(vs: VectorSet) -> dict[str, str]:
    if not vs.sources:
        return {}
    out: dict[str, str] = {}
    for item, s in zip(vs.ids, vs.sources):
        if not s or "://" in s:
            continue
        try:
            out[item] = os.fsdecode(schema.source_to_path(s))
        except ValueError:
            continue
    return out


def _page_sources(vs: VectorSet) -> list[str] | None:
    if not vs.sources:
        return None
    by_id = _sources_by_id(vs)
    return [by_id.get(i, "") for i in vs.ids]


# --- dedup ----------------------------------------------------------------------------------------------


@dataclass
class DedupResult:
    """What :func:`dedup_collection` found and wrote (``paths``: groups, keep, page, summary...)."""

    report: DuplicateReport
    summary: dict[str, Any]
    paths: dict[str, Path] = field(default_factory=dict)


def dedup_collection(
    input: str | Path,
    output: str | Path,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    exact: bool = True,
    vector_column: str | None = None,
    id_column: str = schema.COL_ID,
    max_groups: int = 50,
    allow_incomplete: bool = False,
    memmap_dir: str | Path | None = None,
    progress: Progress = None,
) -> DedupResult:
    """Exact duplicates (same bytes, when the input records image paths and ``exact``) and near duplicates
    (cosine ≥ ``threshold``) of a collection.

    Writes into ``output``: ``duplicates.parquet`` (group_id, id, representative_id, similarity, kind),
    ``keep.parquet`` (the ids to keep: each group's representative and every item in no group),
    ``unreadable.parquet`` when some bytes could not be read, ``duplicates.html`` and ``summary.json``.
    Nothing is deleted or moved.

    ``memmap_dir``: read the vectors in chunks into a float32 memory-mapped file in this folder
    (:func:`~phiclip.collection.vectors.read_vectors_into_memmap`, removed when done) instead of into
    memory, for a collection whose vectors do not fit in RAM; the groups are the same either way.
    """
    say = _say(progress)
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"--threshold {threshold}: a cosine threshold lies in [-1, 1] (0.95 finds near copies)")
    say(f"reading {input}" + (f" into a memory map in {memmap_dir}" if memmap_dir is not None else ""))
    # read in chunks, normalised as they are read: into one array, or a memory map with memmap_dir
    vs = read_vectors_into_memmap(input, memmap_dir, vector_column=vector_column, id_column=id_column,
                                  allow_incomplete=allow_incomplete)
    out = _prepare_output(output)
    read_bytes = None
    if exact and vs.sources and any(vs.sources):
        by_id = _sources_by_id(vs)
        read_bytes = source_reader(vs.ids, [vs.sources[n] if vs.ids[n] in by_id else "" for n in range(len(vs))])
        say(f"{len(vs):,} items of dim {vs.dim}: hashing the bytes of {len(by_id):,} image files, then near "
            f"duplicates at cosine >= {threshold:g}")
    else:
        say(f"{len(vs):,} items of dim {vs.dim}: near duplicates at cosine >= {threshold:g} (no image paths: "
            "exact duplicates not checked)" if exact else f"{len(vs):,} items of dim {vs.dim}: near duplicates "
            f"at cosine >= {threshold:g}")
    t0 = time.perf_counter()
    report = find_duplicates(vs.ids, vs.vectors, threshold=threshold, read_bytes=read_bytes, normalized=True,
                             overwrite=True)
    seconds = time.perf_counter() - t0
    say(f"found {report.n_groups:,} groups in {seconds:.1f} s ({report.method}); writing {out}")
    paths = write_duplicates(report, out)
    kinds: dict[str, int] = {}
    for _, kind in {(g[0], g[4]) for g in report.groups}:
        kinds[kind] = kinds.get(kind, 0) + 1
    summary = {
        "command": "dedup",
        "input": _input_record(vs),
        "threshold": threshold,
        "method": report.method,
        "exact_checked": read_bytes is not None,
        "groups": report.n_groups,
        "exact_groups": kinds.get("exact", 0),
        "near_groups": kinds.get("near", 0),
        "items_in_groups": len({g[1] for g in report.groups}),
        "keep": len(report.keep),
        "drop_candidates": len(vs) - len(report.keep),
        "unreadable": len(report.unreadable),
        "seconds": round(seconds, 3),
        "vectors": "memory-mapped" if memmap_dir is not None else "in memory",
        "deleted": 0,
    }
    page = duplicates_page(report, _sources_by_id(vs), title=f"Duplicates in {vs.path}", max_groups=max_groups)
    paths["page"] = write_page(page, out / DUPLICATES_PAGE)
    paths["summary"] = atomic_write_json(out / SUMMARY_FILE, {**summary, "files": {k: str(v) for k, v in paths.items()}},
                                         indent=2)
    return DedupResult(report, summary, paths)


# --- cluster --------------------------------------------------------------------------------------------


@dataclass
class ClusterSummary:
    """What :func:`cluster_collection` computed and wrote."""

    result: ClusterResult
    ids: list[str]
    summary: dict[str, Any]
    paths: dict[str, Path] = field(default_factory=dict)


def cluster_collection(
    input: str | Path,
    output: str | Path,
    *,
    k: int,
    labels: str | None = None,
    seed: int = 1234,
    niter: int = 20,
    nredo: int = 1,
    vector_column: str | None = None,
    id_column: str = schema.COL_ID,
    allow_incomplete: bool = False,
    progress: Progress = None,
) -> ClusterSummary:
    """k-means (FAISS, on L2-normalised vectors) of a collection into ``k`` clusters.

    Writes ``clusters.parquet`` (id, cluster, distance, is_representative), ``cluster_summary.parquet``
    (cluster, size, representative_id), ``clusters.html`` and ``summary.json``; with ``labels``, the
    summary holds homogeneity, completeness, V-measure and NMI (scikit-learn's definitions).
    """
    say = _say(progress)
    say(f"reading {input}")
    vs = load_collection(input, vector_column=vector_column, id_column=id_column, labels=labels,
                         allow_incomplete=allow_incomplete)
    if not 1 <= k <= len(vs):
        raise ValueError(f"--k {k}: k-means needs 1 <= k <= the number of items ({len(vs)} in {vs.path}); lower --k")
    out = _prepare_output(output)
    say(f"k-means of {len(vs):,} items of dim {vs.dim} into {k} clusters (FAISS, seed {seed}, {niter} iterations)")
    t0 = time.perf_counter()
    result = kmeans(vs.vectors, k, niter=niter, seed=seed, nredo=nredo)
    seconds = time.perf_counter() - t0
    say(f"done in {seconds:.1f} s; writing {out}")
    paths = write_clusters(result, vs.ids, out)
    summary: dict[str, Any] = {
        "command": "cluster",
        "input": _input_record(vs),
        "k": k,
        "protocol": f"k-means (FAISS) on L2-normalised vectors, seed {seed}, {niter} iterations, best of {nredo}",
        "sizes": [int(s) for s in result.sizes],
        "empty_clusters": int(np.sum(result.sizes == 0)),
        "inertia": result.inertia,
        "seconds": round(seconds, 3),
    }
    if vs.labels is not None:
        scores = label_scores(vs.labels, result.assignment)
        summary["labels"] = {
            "source": labels,
            "classes": len(set(vs.labels)),
            "n": len(vs),
            "homogeneity": scores.homogeneity,
            "completeness": scores.completeness,
            "v_measure": scores.v_measure,
            "nmi": scores.nmi,
        }
    page = clusters_page(result, vs.ids, sources=_page_sources(vs), labels=vs.labels,
                         title=f"{k} clusters of {vs.path}")
    paths["page"] = write_page(page, out / CLUSTERS_PAGE)
    paths["summary"] = atomic_write_json(out / SUMMARY_FILE, {**summary, "files": {k_: str(v) for k_, v in paths.items()}},
                                         indent=2)
    return ClusterSummary(result, list(vs.ids), summary, paths)


# --- map ------------------------------------------------------------------------------------------------


@dataclass
class MapResult:
    """What :func:`map_collection` computed and wrote."""

    layout: Layout
    summary: dict[str, Any]
    paths: dict[str, Path] = field(default_factory=dict)


def map_collection(
    input: str | Path,
    output: str | Path,
    *,
    colour_by: Literal["label", "cluster"] | None = None,
    labels: str | None = None,
    k: int = 10,
    method: Literal["auto", "umap", "pca"] = "auto",
    seed: int = 1234,
    max_thumbnails: int = 2000,
    vector_column: str | None = None,
    id_column: str = schema.COL_ID,
    allow_incomplete: bool = False,
    progress: Progress = None,
) -> MapResult:
    """2-D coordinates of a collection and an interactive scatter page.

    ``method``: ``auto`` (UMAP when umap-learn imports, PCA otherwise), ``umap`` or ``pca``; the method used
    is stated in ``summary.json`` and on the page. ``colour_by``: ``label`` (needs ``labels``; default
    ``folder`` when the input records image paths) or ``cluster`` (k-means with ``k``). Writes
    ``map.parquet`` (id, x, y, and label / cluster when coloured), ``map.html`` and ``summary.json``.
    """
    say = _say(progress)
    if colour_by not in (None, "label", "cluster"):
        raise ValueError(f"--colour-by {colour_by!r}: use label or cluster")
    if colour_by == "label" and labels is None:
        labels = FOLDER_LABELS
    say(f"reading {input}")
    vs = load_collection(input, vector_column=vector_column, id_column=id_column, labels=labels,
                         allow_incomplete=allow_incomplete)
    out = _prepare_output(output)
    say(f"2-D layout of {len(vs):,} items of dim {vs.dim} ({method})")
    t0 = time.perf_counter()
    layout = layout_2d(vs.vectors, method=method, seed=seed)
    seconds = time.perf_counter() - t0
    say(f"{layout.description}: {seconds:.1f} s")
    clusters = None
    if colour_by == "cluster":
        kk = min(k, len(vs))
        say(f"k-means into {kk} clusters for the colours")
        clusters = kmeans(vs.vectors, kk, seed=seed).assignment
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols: dict[str, Any] = {
        "id": pa.array(vs.ids, pa.string()),
        "x": pa.array(layout.coords[:, 0], pa.float32()),
        "y": pa.array(layout.coords[:, 1], pa.float32()),
    }
    if vs.labels is not None:
        cols["label"] = pa.array(vs.labels, pa.string())
    if clusters is not None:
        cols["cluster"] = pa.array(clusters, pa.int32())
    table = pa.table(cols, metadata={b"phiclip.layout": layout.description.encode("utf-8")})
    paths: dict[str, Path] = {}
    with atomic_path(out / MAP_FILE) as tmp:
        pq.write_table(table, tmp)
    paths["coords"] = out / MAP_FILE
    say(f"writing the page ({min(max_thumbnails, len(vs)):,} thumbnails at most)")
    page = map_page(
        layout, vs.ids, sources=_page_sources(vs), labels=vs.labels, clusters=clusters,
        colour_by={"label": "labels", "cluster": "clusters", None: None}[colour_by],
        max_thumbnails=max_thumbnails, seed=seed, title=f"Map of {vs.path}",
    )
    paths["page"] = write_page(page, out / MAP_PAGE)
    summary = {
        "command": "map",
        "input": _input_record(vs),
        "method": layout.method,
        "description": layout.description,
        "explained_variance": list(layout.explained_variance) if layout.explained_variance else None,
        "colour_by": colour_by,
        "seconds": round(seconds, 3),
    }
    paths["summary"] = atomic_write_json(out / SUMMARY_FILE, {**summary, "files": {k_: str(v) for k_, v in paths.items()}},
                                         indent=2)
    return MapResult(layout, summary, paths)


# --- align ----------------------------------------------------------------------------------------------


@dataclass
class AlignResult:
    """What :func:`align_collections` computed (``data``: the JSON written, when ``output`` is given)."""

    report: AlignmentReport
    data: dict[str, Any]
    path: Path | None = None


#: What each alignment score is, stated in the JSON and the CLI table.
SCORE_DEFINITIONS = {
    "mutual_knn": "mutual k-NN (Huh et al. 2024): mean |kNN_A(i) ∩ kNN_B(i)| / k, cosine, self excluded",
    "cknna": "CKNNA (Huh et al. 2024), unbiased HSIC, mutual top-k mask, self excluded",
    "cknna_biased": "CKNNA (Huh et al. 2024), biased HSIC, self allowed in the top-k",
    "cka": "linear CKA (Kornblith et al. 2019), biased HSIC",
    "cka_unbiased": "linear CKA, unbiased HSIC (Song et al. 2012)",
}


def align_collections(
    a: str | Path,
    b: str | Path,
    *,
    k: int = DEFAULT_K,
    output: str | Path | None = None,
    vector_column: str | None = None,
    id_column: str = schema.COL_ID,
    allow_incomplete: bool = False,
    progress: Progress = None,
) -> AlignResult:
    """Alignment of two vector sets of the same items, joined by id: mutual-kNN, CKNNA (unbiased and
    biased), linear CKA (biased and unbiased), on L2-normalised vectors.

    ``output``: a JSON file (or a folder, which gets ``alignment.json``); ``None`` writes nothing.
    """
    say = _say(progress)
    if k < 2:
        raise ValueError(f"--k {k}: CKNNA needs at least 2 neighbours")
    say(f"reading {a}")
    va = read_vectors(a, vector_column=vector_column, id_column=id_column, allow_incomplete=allow_incomplete)
    say(f"reading {b}")
    vb = read_vectors(b, vector_column=vector_column, id_column=id_column, allow_incomplete=allow_incomplete)
    say(f"joining {len(va):,} and {len(vb):,} items by id; scoring with k={k}")
    t0 = time.perf_counter()
    try:
        report = alignment(va, vb, k)
    except ValueError as e:
        raise CollectionInputError(f"{va.path} and {vb.path}: {e}") from None
    seconds = time.perf_counter() - t0
    data = {
        "command": "align",
        "a": _input_record(va),
        "b": _input_record(vb),
        **report.as_dict(),
        "normalized": True,
        "definitions": SCORE_DEFINITIONS,
        "seconds": round(seconds, 3),
    }
    path = None
    if output is not None:
        p = Path(output).expanduser()
        if p.is_dir() or (not p.suffix and not p.exists()):
            p = p / ALIGNMENT_FILE
        p.parent.mkdir(parents=True, exist_ok=True)
        path = atomic_write_json(p, data, indent=2)
    return AlignResult(report, json.loads(json.dumps(data)), path)
