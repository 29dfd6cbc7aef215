"""Know your collection: the computations behind the collection commands.

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
* :mod:`~phiclip.collection.layout`: :func:`layout_2d` gives 2-D coordinates (UMAP through umap-learn
  when it imports, PCA otherwise, exact or randomized), with the method used (:class:`Layout`).
* :mod:`~phiclip.collection.pages`: self-contained offline HTML pages: :func:`duplicates_page`,
  :func:`clusters_page`, :func:`map_page` (canvas scatter: pan, zoom, hover), :func:`write_page`.
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
from phiclip.collection.layout import Layout, layout_2d, pca_2d
from phiclip.collection.pages import clusters_page, duplicates_page, map_page, thumbnail_uri, write_page
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
    "Layout",
    "VectorSet",
    "alignment",
    "cka",
    "cknna",
    "clusters_page",
    "duplicates_page",
    "exact_duplicates",
    "find_duplicates",
    "group_pairs",
    "join_by_id",
    "kmeans",
    "knn_indices",
    "l2_normalize",
    "label_scores",
    "layout_2d",
    "map_page",
    "mutual_knn",
    "near_duplicate_pairs",
    "pca_2d",
    "read_vectors",
    "source_reader",
    "thumbnail_uri",
    "vector_set",
    "write_clusters",
    "write_duplicates",
    "write_page",
]
