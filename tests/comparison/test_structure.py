"""Structure metrics on constructed embeddings whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from phiclip.comparison.structure import (
    align_2d,
    knn_indices,
    knn_overlap,
    l2_normalize,
    linear_cka,
    pca_2d,
    similarity_histogram,
)


def _random_orthogonal(d: int, seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q * np.sign(np.diag(r))


@pytest.fixture
def space() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(60, 12))


# --- nearest neighbours ------------------------------------------------------------------------


def test_knn_indices_on_a_line_of_points() -> None:
    # Points on the unit circle at angles 0, 10, 20, 30, 90 degrees: cosine neighbours are known.
    angles = np.deg2rad([0, 10, 20, 30, 90])
    x = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    nn = knn_indices(x, 2)
    assert nn.tolist() == [[1, 2], [0, 2], [1, 3], [2, 1], [3, 2]]


def test_knn_indices_is_cosine_not_euclidean() -> None:
    # Row 2 is row 0 scaled by 100: same direction, far away in Euclidean distance.
    x = np.array([[1.0, 0.0], [0.8, 0.6], [100.0, 0.0]])
    assert knn_indices(x, 1)[:, 0].tolist() == [2, 0, 0]


def test_knn_indices_breaks_ties_by_lower_index() -> None:
    x = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    # Rows 1..3 are identical: each one's nearest are the other two, lower index first.
    assert knn_indices(x, 2)[1:].tolist() == [[2, 3], [1, 3], [1, 2]]


def _brute_force_knn(x: np.ndarray, k: int) -> np.ndarray:
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = xn @ xn.T
    np.fill_diagonal(sims, -np.inf)
    n = len(x)
    return np.array([sorted(range(n), key=lambda j: (-sims[i, j], j))[:k] for i in range(n)])


@pytest.mark.parametrize("k", [1, 7])
def test_knn_indices_match_brute_force(k: int) -> None:
    x = np.random.default_rng(11).normal(size=(70, 5))
    assert knn_indices(x, k).tolist() == _brute_force_knn(x, k).tolist()


def test_knn_indices_with_large_groups_of_ties() -> None:
    # Groups of 30 identical images: more tied neighbours than the candidates kept per row.
    x = np.repeat(np.eye(4), 30, axis=0) + np.repeat(np.arange(4)[:, None] * 0.01, 30, axis=0)
    assert knn_indices(x, 12).tolist() == _brute_force_knn(x, 12).tolist()


@pytest.mark.parametrize("k", [0, 5])
def test_knn_indices_rejects_impossible_k(k: int) -> None:
    with pytest.raises(ValueError, match="k=.*n - 1"):
        knn_indices(np.eye(5), k)


def test_identical_spaces_overlap_fully(space: np.ndarray) -> None:
    result = knn_overlap(space, space.copy(), k=5)
    assert result.mean == 1.0
    assert np.all(result.per_image == 1.0)
    assert result.chance == pytest.approx(5 / 59)


def test_overlap_invariant_to_rotation_and_scale(space: np.ndarray) -> None:
    rotated = 3.5 * space @ _random_orthogonal(space.shape[1], seed=1)
    assert knn_overlap(space, rotated, k=5).mean == 1.0


def test_independent_spaces_overlap_near_chance() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(300, 16)), rng.normal(size=(300, 24))
    result = knn_overlap(a, b, k=10)
    assert result.mean < 3 * result.chance
    assert result.mean < 0.15


def _on_circle(degrees: list[float]) -> np.ndarray:
    t = np.deg2rad(degrees)
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def test_overlap_counts_shared_neighbours_exactly() -> None:
    # a: images at 0, 10, 30 and 90, 100, 130 degrees. b: images 2 and 3 swap positions.
    a = _on_circle([0, 10, 30, 90, 100, 130])
    b = _on_circle([0, 10, 90, 30, 100, 130])
    # Nearest under a: 0->1 1->0 2->1 3->4 4->3 5->4; under b: 0->1 1->0 2->4 3->1 4->2 5->4.
    result = knn_overlap(a, b, k=1)
    assert result.per_image.tolist() == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    assert result.mean == 0.5
    # k=2: a: 0{1,2} 1{0,2} 2{1,0} 3{4,5} 4{3,5} 5{4,3}; b: 0{1,3} 1{0,3} 2{4,5} 3{1,0} 4{2,5} 5{4,2}
    result2 = knn_overlap(a, b, k=2)
    assert result2.per_image.tolist() == [0.5, 0.5, 0.0, 0.0, 0.5, 0.5]


def test_overlap_rejects_different_image_counts() -> None:
    with pytest.raises(ValueError, match="same images"):
        knn_overlap(np.eye(5), np.eye(6)[:, :5][:6], k=2)


# --- CKA -----------------------------------------------------------------------------------------


def test_cka_identical_is_one(space: np.ndarray) -> None:
    assert linear_cka(space, space) == pytest.approx(1.0, abs=1e-12)


def test_cka_invariant_to_rotation_scale_and_shift(space: np.ndarray) -> None:
    other = 0.01 * space @ _random_orthogonal(space.shape[1], seed=2) + 7.0
    assert linear_cka(space, other) == pytest.approx(1.0, abs=1e-10)


def test_cka_both_code_paths_agree() -> None:
    rng = np.random.default_rng(3)
    # Few rows, many features (Gram path) versus many rows, few features (feature path):
    # the same data transposed in role must give the value computed by the definition.
    for n, da, db in [(10, 200, 150), (400, 5, 7)]:
        a, b = rng.normal(size=(n, da)), rng.normal(size=(n, db))
        ac, bc = a - a.mean(0), b - b.mean(0)
        ka, kb = ac @ ac.T, bc @ bc.T
        definition = np.sum(ka * kb) / (np.linalg.norm(ka) * np.linalg.norm(kb))
        assert linear_cka(a, b) == pytest.approx(definition, rel=1e-9)


def test_cka_independent_spaces_is_low() -> None:
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(500, 8)), rng.normal(size=(500, 8))
    assert linear_cka(a, b) < 0.1


def test_cka_not_invariant_to_non_isotropic_scaling(space: np.ndarray) -> None:
    stretched = space * np.r_[np.full(6, 10.0), np.full(6, 0.1)]
    assert linear_cka(space, stretched) < 0.9


def test_cka_of_a_subspace_is_between() -> None:
    rng = np.random.default_rng(5)
    a = rng.normal(size=(400, 10))
    partly = np.concatenate([a[:, :5], rng.normal(size=(400, 5))], axis=1)
    value = linear_cka(a, partly)
    assert 0.3 < value < 0.7  # half the (isotropic) variance is shared: about 0.5


def test_cka_rejects_constant_space(space: np.ndarray) -> None:
    with pytest.raises(ValueError, match="constant"):
        linear_cka(space, np.ones((space.shape[0], 3)))


def test_cka_rejects_nan(space: np.ndarray) -> None:
    bad = space.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        linear_cka(space, bad)


# --- similarity histograms ---------------------------------------------------------------------


def test_histogram_counts_each_pair_once() -> None:
    x = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    h = similarity_histogram(x, labels=["a", "a", "b", "b"], bins=4)
    # Pairs: (0,1)=1, (0,2)=0, (0,3)=-1, (1,2)=0, (1,3)=-1, (2,3)=0 ; bins [-1,-.5,0,.5,1]
    assert h.edges.tolist() == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert h.all.tolist() == [2, 0, 3, 1]
    assert h.same.tolist() == [0, 0, 1, 1]  # (0,1)=1 and (2,3)=0
    assert h.different.tolist() == [2, 0, 2, 0]
    assert h.mean == pytest.approx(-1 / 6)
    assert h.same_mean == pytest.approx(0.5)
    assert h.different_mean == pytest.approx(-0.5)
    assert int(h.all.sum()) == 6


def test_histogram_separates_clustered_labels() -> None:
    rng = np.random.default_rng(6)
    centres = rng.normal(size=(3, 16)) * 5
    labels = np.repeat(np.arange(3), 20)
    x = centres[labels] + rng.normal(size=(60, 16))
    h = similarity_histogram(x, labels=labels)
    assert h.same_mean > h.different_mean + 0.3
    assert int(h.same.sum()) == 3 * 20 * 19 // 2
    assert int(h.all.sum()) == 60 * 59 // 2


def test_histogram_without_labels() -> None:
    h = similarity_histogram(np.random.default_rng(7).normal(size=(10, 4)))
    assert h.same is None and h.different is None and h.same_mean is None
    assert int(h.all.sum()) == 45


def test_histogram_rejects_label_count_mismatch() -> None:
    with pytest.raises(ValueError, match="one entry per image"):
        similarity_histogram(np.eye(4), labels=[0, 1])


# --- 2-D projection ----------------------------------------------------------------------------


def test_pca_recovers_the_dominant_plane() -> None:
    rng = np.random.default_rng(8)
    plane = rng.normal(size=(200, 2)) * np.array([10.0, 3.0])
    basis = _random_orthogonal(6, seed=9)[:2]  # (2, 6)
    x = plane @ basis + 0.01 * rng.normal(size=(200, 6))
    proj = pca_2d(x)
    assert proj.points.shape == (200, 2)
    assert sum(proj.explained_variance_ratio) > 0.999
    assert proj.explained_variance_ratio[0] > proj.explained_variance_ratio[1]
    # The projection preserves the plane's pairwise distances.
    d_true = np.linalg.norm(plane[:, None] - plane[None], axis=-1)
    d_proj = np.linalg.norm(proj.points[:, None] - proj.points[None], axis=-1)
    assert np.allclose(d_true, d_proj, atol=0.1)


@pytest.mark.parametrize("shape", [(40, 7), (8, 50)])
def test_pca_matches_svd(shape: tuple[int, int]) -> None:
    x = np.random.default_rng(12).normal(size=shape) * np.linspace(3, 1, shape[1])
    xc = x - x.mean(0)
    u, s, _ = np.linalg.svd(xc, full_matrices=False)
    proj = pca_2d(x)
    assert np.allclose(np.abs(proj.points), np.abs(u[:, :2] * s[:2]), atol=1e-8)
    assert proj.explained_variance_ratio == pytest.approx(tuple(s[:2] ** 2 / np.sum(s**2)))


def test_pca_is_deterministic_in_sign(space: np.ndarray) -> None:
    p1 = pca_2d(space).points
    p2 = pca_2d(space[::-1].copy()).points[::-1]
    assert np.allclose(p1, p2)
    p3 = pca_2d(-space).points  # the data flipped: loadings flip, signs are re-chosen
    assert np.allclose(np.abs(p1), np.abs(p3))


def test_pca_of_one_feature() -> None:
    proj = pca_2d(np.arange(5.0)[:, None])
    assert np.allclose(proj.points[:, 1], 0.0)
    assert proj.explained_variance_ratio == pytest.approx((1.0, 0.0))


def test_align_2d_undoes_a_rotation_and_reflection() -> None:
    rng = np.random.default_rng(10)
    ref = rng.normal(size=(30, 2))
    theta = 1.1
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]) @ np.diag([1, -1])
    moved = 4.0 * ref @ rot + 3.0
    aligned = align_2d(ref, moved)
    assert np.allclose(aligned, ref - ref.mean(0), atol=1e-9)


def test_l2_normalize_keeps_zero_rows() -> None:
    out = l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0]]))
    assert np.allclose(out, [[0.6, 0.8], [0.0, 0.0]])
