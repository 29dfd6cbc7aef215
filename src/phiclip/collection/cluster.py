"""k-means of a collection and, with labels, how well the clusters match them.

:func:`kmeans` runs :class:`faiss.Kmeans` (seeded, ``niter`` iterations) on the L2-normalised vectors
and gives each item its cluster and its Euclidean distance to the cluster's centroid, each cluster its
size and its representative (the member nearest the centroid). :func:`label_scores` compares the
assignment with labels: homogeneity, completeness, V-measure (β = 1) and normalised mutual information
(arithmetic mean of the entropies), with natural logarithms and the same conventions for the limit
cases as scikit-learn (a labelling with one class has entropy 0: homogeneity 1.0 when the classes have
entropy 0, completeness 1.0 when the clusters have; NMI 1.0 when both sides are one class, else 0.0
when the mutual information is 0). :func:`write_clusters` writes the tables as Parquet.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from phiclip.atomic import atomic_path
from phiclip.collection.vectors import l2_normalize

__all__ = ["ClusterResult", "LabelScores", "kmeans", "label_scores", "write_clusters"]

ASSIGNMENTS_FILE = "clusters.parquet"
SUMMARY_FILE = "cluster_summary.parquet"


@dataclass
class ClusterResult:
    """A k-means assignment of n items to k clusters.

    ``assignment[i]`` is item i's cluster, ``distance[i]`` its Euclidean distance to that centroid (in
    the space clustered: L2-normalised vectors unless ``normalize=False``); ``sizes[c]`` the number of
    members of cluster c and ``representatives[c]`` the row of the member nearest its centroid (-1 for an
    empty cluster); ``inertia`` the sum of squared distances.
    """

    assignment: np.ndarray
    distance: np.ndarray
    centroids: np.ndarray
    sizes: np.ndarray
    representatives: np.ndarray
    inertia: float
    seed: int
    niter: int
    nredo: int

    @property
    def k(self) -> int:
        """Number of clusters."""
        return int(self.centroids.shape[0])


def kmeans(
    vectors: np.ndarray,
    k: int,
    *,
    niter: int = 20,
    seed: int = 1234,
    normalize: bool = True,
    nredo: int = 3,
    max_points_per_centroid: int = 256,
) -> ClusterResult:
    """k-means through :class:`faiss.Kmeans`.

    Args:
        vectors: (n, d) vectors, n ≥ k.
        k: number of clusters.
        niter: k-means iterations.
        seed: FAISS's seed (same data, seed and machine: same clusters).
        normalize: cluster L2-normalised copies (cosine geometry), as embeddings are compared.
        nredo: trainings from different random starts, the one with the lowest objective kept (FAISS
            starts from k random items, and one start can put two centroids in one cluster).
        max_points_per_centroid: FAISS trains on a sample of at most k times this many items; every item
            is then assigned to its nearest centroid.
    """
    import faiss

    x = np.asarray(vectors, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected (n, d) vectors, got shape {x.shape}")
    n, d = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"k={k} clusters need 1 <= k <= n items; there are {n}")
    x = l2_normalize(x) if normalize else np.ascontiguousarray(x)
    km = faiss.Kmeans(
        d,
        k,
        niter=niter,
        nredo=nredo,
        seed=seed,
        verbose=False,
        max_points_per_centroid=max_points_per_centroid,
        # FAISS only prints a warning below this many items per cluster (the training is the same); a
        # small collection (the demo's 36 images in 4 clusters) is clustered without it.
        min_points_per_centroid=1,
    )
    km.train(x)
    centroids = np.array(km.centroids, dtype=np.float32).reshape(k, d)
    index = faiss.IndexFlatL2(d)
    index.add(centroids)
    sq, assign = index.search(x, 1)
    assignment = assign[:, 0].astype(np.int64)
    # distances recomputed in float64 (FAISS's expansion ‖x‖² - 2x·c + ‖c‖² can go slightly negative)
    diff = x.astype(np.float64) - centroids[assignment].astype(np.float64)
    distance = np.sqrt(np.einsum("ij,ij->i", diff, diff))
    sizes = np.bincount(assignment, minlength=k).astype(np.int64)
    reps = np.full(k, -1, dtype=np.int64)
    order = np.lexsort((np.arange(n), distance, assignment))  # per cluster: nearest first, ties to lower row
    first = np.ones(n, dtype=bool)
    first[1:] = assignment[order][1:] != assignment[order][:-1]
    reps[assignment[order][first]] = order[first]
    return ClusterResult(
        assignment=assignment,
        distance=distance,
        centroids=centroids,
        sizes=sizes,
        representatives=reps,
        inertia=float(np.sum(distance**2)),
        seed=seed,
        niter=niter,
        nredo=nredo,
    )


@dataclass
class LabelScores:
    """Agreement of a clustering with labels (natural logarithms)."""

    homogeneity: float
    completeness: float
    v_measure: float
    nmi: float
    mutual_information: float
    entropy_labels: float
    entropy_clusters: float


def _codes(values: Sequence[object] | np.ndarray) -> np.ndarray:
    _, inverse = np.unique(np.asarray(values, dtype=object).astype(str), return_inverse=True)
    return inverse.reshape(-1)


def _entropy_of_counts(counts: np.ndarray) -> float:
    counts = counts[counts > 0].astype(np.float64)
    total = counts.sum()
    p = counts / total
    return float(-np.sum(p * np.log(p)))


def label_scores(
    labels: Sequence[object] | np.ndarray, clusters: Sequence[object] | np.ndarray
) -> LabelScores:
    """Homogeneity, completeness, V-measure and NMI of ``clusters`` against ``labels``.

    Both are sequences of hashable values (compared as text), one per item. For n items with contingency
    counts ``n_ck`` (label c, cluster k): ``MI = Σ n_ck/n · log(n·n_ck / (n_c·n_k))``, ``H(C)``, ``H(K)``
    the entropies of the two labellings; ``homogeneity = MI / H(C)`` (1 when H(C) = 0),
    ``completeness = MI / H(K)`` (1 when H(K) = 0), ``v_measure`` their harmonic mean (0 when both are
    0), ``nmi = MI / ((H(C) + H(K)) / 2)`` (1 when both labellings have a single class, 0 when MI = 0).
    """
    lab = _codes(labels)
    clu = _codes(clusters)
    if len(lab) != len(clu):
        raise ValueError(f"{len(lab)} labels but {len(clu)} cluster assignments")
    n = len(lab)
    if n == 0:
        return LabelScores(1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0)
    n_c, n_k = int(lab.max()) + 1, int(clu.max()) + 1
    pair, counts = np.unique(lab.astype(np.int64) * n_k + clu, return_counts=True)
    c_of, k_of = np.divmod(pair, n_k)
    row = np.bincount(lab, minlength=n_c).astype(np.float64)
    col = np.bincount(clu, minlength=n_k).astype(np.float64)
    h_c = _entropy_of_counts(row)
    h_k = _entropy_of_counts(col)
    if n_c == 1 or n_k == 1:
        mi = 0.0
    else:
        nck = counts.astype(np.float64)
        mi = float(np.sum(nck / n * (np.log(nck) + np.log(n) - np.log(row[c_of]) - np.log(col[k_of]))))
        mi = max(mi, 0.0)
    homogeneity = mi / h_c if h_c else 1.0
    completeness = mi / h_k if h_k else 1.0
    hc_sum = homogeneity + completeness
    v = 0.0 if hc_sum == 0 else 2.0 * homogeneity * completeness / hc_sum
    if n_c == n_k == 1:
        nmi = 1.0
    elif mi == 0:
        nmi = 0.0
    else:
        nmi = mi / ((h_c + h_k) / 2.0)
    return LabelScores(homogeneity, completeness, v, nmi, mi, h_c, h_k)


def write_clusters(result: ClusterResult, ids: Sequence[str], folder: str | Path) -> dict[str, Path]:
    """Write ``clusters.parquet`` (``id``, ``cluster``, ``distance``, ``is_representative``, one row per
    item) and ``cluster_summary.parquet`` (``cluster``, ``size``, ``representative_id``, null for an empty
    cluster) into ``folder`` (created), each atomically.

    Returns:
        ``{"assignments": path, "summary": path}``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = [str(i) for i in ids]
    if len(ids) != len(result.assignment):
        raise ValueError(f"{len(ids)} ids but {len(result.assignment)} assigned items")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    is_rep = np.zeros(len(ids), dtype=bool)
    reps = result.representatives
    is_rep[reps[reps >= 0]] = True
    assignments = pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "cluster": pa.array(result.assignment, pa.int32()),
            "distance": pa.array(result.distance, pa.float32()),
            "is_representative": pa.array(is_rep, pa.bool_()),
        }
    )
    summary = pa.table(
        {
            "cluster": pa.array(np.arange(result.k), pa.int32()),
            "size": pa.array(result.sizes, pa.int64()),
            "representative_id": pa.array([ids[r] if r >= 0 else None for r in reps.tolist()], pa.string()),
        }
    )
    paths = {"assignments": out / ASSIGNMENTS_FILE, "summary": out / SUMMARY_FILE}
    for table, key in ((assignments, "assignments"), (summary, "summary")):
        with atomic_path(paths[key]) as tmp:
            pq.write_table(table, tmp)
    return paths
