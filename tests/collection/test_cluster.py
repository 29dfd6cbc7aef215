"""k-means through FAISS (assignments, distances, representatives) and label scores equal to
scikit-learn's on the same assignments."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from phiclip.collection.cluster import kmeans, label_scores, write_clusters
from phiclip.collection.vectors import l2_normalize

metrics = pytest.importorskip("sklearn.metrics", reason="scikit-learn is not installed (dev extra)")


def _blobs(per: int = 40, d: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.eye(d)[:3] * 5
    x = np.vstack([c + 0.3 * rng.normal(size=(per, d)) for c in centres]).astype(np.float32)
    return x, np.repeat(np.arange(3), per)


def _sklearn(labels, clusters) -> tuple[float, float, float, float]:
    h, c, v = metrics.homogeneity_completeness_v_measure(labels, clusters)
    return h, c, v, metrics.normalized_mutual_info_score(labels, clusters)


def _ours(labels, clusters) -> tuple[float, float, float, float]:
    s = label_scores(labels, clusters)
    return s.homogeneity, s.completeness, s.v_measure, s.nmi


def test_kmeans_recovers_blobs_and_reports_each_item():
    x, truth = _blobs()
    res = kmeans(x, 3, niter=20, seed=1)  # seed 1 with a single start (nredo=1) merges two blobs
    assert sorted(res.sizes.tolist()) == [40, 40, 40]
    assert label_scores(truth, res.assignment).v_measure == pytest.approx(1.0, abs=1e-12)
    unit = l2_normalize(x)
    # distance: Euclidean to the item's own centroid, which is its nearest
    all_d = np.linalg.norm(unit[:, None, :] - res.centroids[None, :, :], axis=2)
    assert np.allclose(res.distance, all_d[np.arange(len(x)), res.assignment], atol=1e-5)
    assert (res.assignment == all_d.argmin(axis=1)).all()
    # representative: the member nearest the centroid
    for c in range(3):
        members = np.flatnonzero(res.assignment == c)
        assert res.representatives[c] == members[np.argmin(res.distance[members])]
    assert res.inertia == pytest.approx(float(np.sum(res.distance**2)))
    assert res.k == 3


def test_kmeans_is_seeded():
    x = np.random.default_rng(4).normal(size=(300, 8)).astype(np.float32)
    a, b = kmeans(x, 6, seed=7, niter=10), kmeans(x, 6, seed=7, niter=10)
    assert np.array_equal(a.assignment, b.assignment) and np.array_equal(a.centroids, b.centroids)


def test_kmeans_edges():
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    one = kmeans(x, 1)
    assert one.sizes.tolist() == [5] and (one.assignment == 0).all()
    with pytest.raises(ValueError, match="k=6"):
        kmeans(x, 6)
    raw = kmeans(x * 10, 1, normalize=False)
    assert np.allclose(raw.centroids[0], (x * 10).mean(axis=0), atol=1e-4)


@pytest.mark.parametrize("seed", range(6))
def test_label_scores_equal_sklearn_on_random_assignments(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 400))
    labels = rng.integers(0, int(rng.integers(2, 12)), size=n)
    clusters = rng.integers(0, int(rng.integers(2, 30)), size=n)
    ours, ref = _ours(labels, clusters), _sklearn(labels, clusters)
    assert max(abs(o - r) for o, r in zip(ours, ref)) <= 1e-12, (ours, ref)
    assert 0 < ours[2] < 1


@pytest.mark.parametrize(
    "labels, clusters",
    [
        ([0, 0, 1, 1, 2, 2], [0, 0, 0, 0, 0, 0]),  # one cluster
        ([0, 0, 1, 1, 2, 2], [0, 1, 2, 3, 4, 5]),  # all singletons
        ([0, 0, 0, 0], [0, 1, 2, 3]),  # one class, singletons
        ([0, 0, 0], [5, 5, 5]),  # one class, one cluster
        ([7], [3]),  # one item
        ([0, 1, 0, 1], [0, 0, 1, 1]),  # independent: MI = 0
        (["cat", "dog", "dog", "cat"], ["b", "a", "a", "b"]),  # identical up to naming
        ([0, 0, 1, 1, 1, 2], [1, 1, 0, 0, 2, 2]),
    ],
)
def test_label_scores_equal_sklearn_on_edge_cases(labels, clusters):
    ours, ref = _ours(labels, clusters), _sklearn(labels, clusters)
    assert max(abs(o - r) for o, r in zip(ours, ref)) <= 1e-12, (ours, ref)


def test_label_scores_length_mismatch():
    with pytest.raises(ValueError, match="3 labels but 2"):
        label_scores([0, 1, 2], [0, 1])


def test_write_clusters(tmp_path):
    x, _ = _blobs(per=10)
    res = kmeans(x, 3, seed=2)
    ids = [f"i{n}" for n in range(len(x))]
    paths = write_clusters(res, ids, tmp_path / "clusters")
    items = pq.read_table(paths["assignments"]).to_pydict()
    assert items["id"] == ids and items["cluster"] == res.assignment.tolist()
    assert np.allclose(items["distance"], res.distance, atol=1e-6)
    assert sum(items["is_representative"]) == 3
    summary = pq.read_table(paths["summary"]).to_pydict()
    assert summary["cluster"] == [0, 1, 2] and summary["size"] == res.sizes.tolist()
    assert summary["representative_id"] == [ids[r] for r in res.representatives]
    assert sorted(p.name for p in (tmp_path / "clusters").iterdir()) == [
        "cluster_summary.parquet",
        "clusters.parquet",
    ]
    with pytest.raises(ValueError, match="2 ids"):
        write_clusters(res, ids[:2], tmp_path / "bad")
