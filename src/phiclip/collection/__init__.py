"""Know your collection: the computations behind the collection commands (issue 24).

* :mod:`~phiclip.collection.vectors`: :func:`read_vectors` reads ids and vectors (plus sources or
  labels) from an embed output folder or a Parquet file, refusing bad input with a message that names
  the file and the fix; :func:`vector_set` wraps arrays in memory; :func:`l2_normalize`.
* :mod:`~phiclip.collection.align`: :func:`alignment` joins two vector sets by id (:func:`join_by_id`)
  and scores how alike they are: :func:`mutual_knn` and :func:`cknna` as Huh et al. 2024 define them,
  linear :func:`cka` biased and unbiased (Kornblith et al. 2019, Song et al. 2012).
* :mod:`~phiclip.collection.dedup`: :func:`find_duplicates` finds exact duplicates (hash of the bytes)
  and near duplicates (cosine ≥ a threshold through FAISS), groups them without chaining and gives a
  keep-list; :func:`write_duplicates` writes both as Parquet. Nothing is ever deleted.
* :mod:`~phiclip.collection.cluster`: :func:`kmeans` (FAISS, seeded) with per-item distances, sizes and
  representatives; :func:`label_scores` (homogeneity, completeness, V-measure, NMI against labels);
  :func:`write_clusters` writes the tables as Parquet.
"""

from __future__ import annotations

from phiclip.collection.align import (
    DEFAULT_K,
    AlignmentReport,
    IdJoin,
    alignment,
    cka,
    cknna,
    join_by_id,
    knn_indices,
    mutual_knn,
)
from phiclip.collection.cluster import ClusterResult, LabelScores, kmeans, label_scores, write_clusters
from phiclip.collection.dedup import (
    DEFAULT_THRESHOLD,
    DuplicateReport,
    exact_duplicates,
    find_duplicates,
    group_pairs,
    near_duplicate_pairs,
    source_reader,
    write_duplicates,
)
from phiclip.collection.vectors import CollectionInputError, VectorSet, l2_normalize, read_vectors, vector_set

__all__ = [
    "DEFAULT_K",
    "DEFAULT_THRESHOLD",
    "AlignmentReport",
    "ClusterResult",
    "CollectionInputError",
    "DuplicateReport",
    "IdJoin",
    "LabelScores",
    "VectorSet",
    "alignment",
    "cka",
    "cknna",
    "exact_duplicates",
    "find_duplicates",
    "group_pairs",
    "join_by_id",
    "kmeans",
    "knn_indices",
    "l2_normalize",
    "label_scores",
    "mutual_knn",
    "near_duplicate_pairs",
    "read_vectors",
    "source_reader",
    "vector_set",
    "write_clusters",
    "write_duplicates",
]
