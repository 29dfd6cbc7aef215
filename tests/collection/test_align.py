"""Alignment scores against plain reference implementations written here from the published formulas
(explicit loops, full n x n matrices), and their invariances."""

from __future__ import annotations

import math

import numpy as np
import pytest

from phiclip.collection import align
from phiclip.collection.align import alignment, cka, cknna, join_by_id, knn_indices, mutual_knn
from phiclip.collection.vectors import l2_normalize, vector_set

# --- references: the definitions, written out --------------------------------------------------------


def ref_neighbours(x: np.ndarray, k: int, exclude_self: bool) -> list[set[int]]:
    """Each row's k largest inner products, by an explicit sort of every candidate."""
    n = len(x)
    out = []
    for i in range(n):
        cands = []
        for j in range(n):
            if exclude_self and j == i:
                continue
            cands.append((-sum(float(x[i, t]) * float(x[j, t]) for t in range(x.shape[1])), j))
        cands.sort()
        out.append({j for _, j in cands[:k]})
    return out


def ref_mutual_knn(a: np.ndarray, b: np.ndarray, k: int) -> float:
    na, nb = ref_neighbours(a, k, True), ref_neighbours(b, k, True)
    return sum(len(sa & sb) / k for sa, sb in zip(na, nb)) / len(a)


def ref_hsic_biased(k_mat: np.ndarray, l_mat: np.ndarray) -> float:
    """tr(K H L H), H = I - 11ᵀ/n."""
    n = len(k_mat)
    h = np.eye(n) - np.ones((n, n)) / n
    return float(np.trace(k_mat @ h @ l_mat @ h))


def ref_hsic_unbiased(k_mat: np.ndarray, l_mat: np.ndarray) -> float:
    """Song et al. 2012 eq. 5, every sum an explicit loop over K̃, L̃ (diagonals zeroed)."""
    n = len(k_mat)
    kt = [[0.0 if i == j else float(k_mat[i, j]) for j in range(n)] for i in range(n)]
    lt = [[0.0 if i == j else float(l_mat[i, j]) for j in range(n)] for i in range(n)]
    trace = sum(kt[i][j] * lt[j][i] for i in range(n) for j in range(n))
    sum_k = sum(map(sum, kt))
    sum_l = sum(map(sum, lt))
    # 1ᵀ K̃ L̃ 1 = Σ_i Σ_j Σ_m K̃_im L̃_mj
    col_k = [sum(kt[i][m] for i in range(n)) for m in range(n)]
    row_l = [sum(lt[m][j] for j in range(n)) for m in range(n)]
    ones_kl = sum(col_k[m] * row_l[m] for m in range(n))
    return (trace + sum_k * sum_l / ((n - 1) * (n - 2)) - 2 * ones_kl / (n - 2)) / (n * (n - 3))


def ref_cknna(a: np.ndarray, b: np.ndarray, k: int, unbiased: bool) -> float:
    n = len(a)
    kk, ll = a @ a.T, b @ b.T
    nbr_a = ref_neighbours(a, k, exclude_self=unbiased)
    nbr_b = ref_neighbours(b, k, exclude_self=unbiased)
    hsic = ref_hsic_unbiased if unbiased else ref_hsic_biased

    def sim(x, y, nx, ny):
        mask = np.zeros((n, n))
        for i in range(n):
            for j in nx[i] & ny[i]:
                mask[i, j] = 1.0
        return hsic(mask * x, mask * y)

    return sim(kk, ll, nbr_a, nbr_b) / math.sqrt(sim(kk, kk, nbr_a, nbr_a) * sim(ll, ll, nbr_b, nbr_b))


def ref_cka_biased(a: np.ndarray, b: np.ndarray) -> float:
    """Kornblith et al. 2019, linear CKA in feature space: ‖ȲᵀX̄‖²_F / (‖X̄ᵀX̄‖_F ‖ȲᵀȲ‖_F)."""
    xa = a - a.mean(axis=0)
    xb = b - b.mean(axis=0)
    return float(np.linalg.norm(xb.T @ xa) ** 2 / (np.linalg.norm(xa.T @ xa) * np.linalg.norm(xb.T @ xb)))


def ref_cka_unbiased(a: np.ndarray, b: np.ndarray) -> float:
    kk, ll = a @ a.T, b @ b.T
    return ref_hsic_unbiased(kk, ll) / math.sqrt(ref_hsic_unbiased(kk, kk) * ref_hsic_unbiased(ll, ll))


# --- fixtures -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def feats() -> tuple[np.ndarray, np.ndarray]:
    """Two related sets (B = a random linear map of A plus noise, another width), L2-normalised."""
    rng = np.random.default_rng(20240513)
    a = rng.normal(size=(40, 12))
    b = a @ rng.normal(size=(12, 9)) + 0.8 * rng.normal(size=(40, 9))
    return l2_normalize(a), l2_normalize(b)


# --- agreement with the references --------------------------------------------------------------------


@pytest.mark.parametrize("k", [3, 10])
def test_mutual_knn_matches_reference(feats, k):
    a, b = feats
    got = mutual_knn(a, b, k)
    assert got == pytest.approx(ref_mutual_knn(a, b, k), abs=1e-6)
    assert 0.0 < got < 1.0  # related but not identical neighbourhoods: the fixture exercises both terms


@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("k", [3, 10])
def test_cknna_matches_reference(feats, k, unbiased):
    a, b = feats
    got = cknna(a, b, k, unbiased=unbiased)
    assert got == pytest.approx(ref_cknna(a, b, k, unbiased), abs=1e-6)
    assert abs(got) < 0.999


def test_cknna_eps_reproduces_the_published_denominator(feats):
    """Their code divides by sqrt(sim_kk sim_ll) + 1e-6: eps=1e-6 gives exactly that."""
    a, b = feats
    denom = _cknna_denominator(a, b, 5)
    sim_kl = ref_cknna(a, b, 5, True) * denom
    assert cknna(a, b, 5, eps=1e-6) == pytest.approx(sim_kl / (denom + 1e-6), rel=1e-9)
    assert cknna(a, b, 5, eps=1e-6) != pytest.approx(cknna(a, b, 5), rel=1e-7, abs=0)


def _cknna_denominator(a: np.ndarray, b: np.ndarray, k: int) -> float:
    n = len(a)
    na, nb = ref_neighbours(a, k, True), ref_neighbours(b, k, True)
    kk, ll = a @ a.T, b @ b.T

    def masked(x, nbrs):
        m = np.zeros((n, n))
        for i in range(n):
            m[i, list(nbrs[i])] = 1
        return m * x

    return math.sqrt(
        ref_hsic_unbiased(masked(kk, na), masked(kk, na)) * ref_hsic_unbiased(masked(ll, nb), masked(ll, nb))
    )


@pytest.mark.parametrize("unbiased", [False, True])
def test_cka_matches_reference(feats, unbiased):
    a, b = feats
    ref = ref_cka_unbiased(a, b) if unbiased else ref_cka_biased(a, b)
    got = cka(a, b, unbiased=unbiased)
    assert got == pytest.approx(ref, abs=1e-6)
    assert 0.1 < got < 0.999


def test_biased_cka_kernel_form_equals_feature_form(feats):
    a, b = feats
    kk, ll = a @ a.T, b @ b.T
    ref = ref_hsic_biased(kk, ll) / math.sqrt(ref_hsic_biased(kk, kk) * ref_hsic_biased(ll, ll))
    assert cka(a, b) == pytest.approx(ref, abs=1e-9)


def test_neighbours_across_row_blocks(feats, monkeypatch):
    a, _ = feats
    monkeypatch.setattr(align, "_BLOCK", 7)
    got = knn_indices(a, 4)
    ref = ref_neighbours(a, 4, True)
    assert [set(r) for r in got.tolist()] == ref
    # best first
    sims = np.take_along_axis(a @ a.T, got, axis=1)
    assert (np.diff(sims, axis=1) <= 0).all()


def test_neighbour_ties_go_to_the_lower_index():
    x = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    # row 0: rows 4 (1.0) then 1, 2, 3 tie at 0.0; row 1: rows 2, 3 tie at 1.0
    assert knn_indices(x, 2).tolist()[0] == [4, 1]
    assert knn_indices(x, 2).tolist()[1] == [2, 3]
    assert knn_indices(x, 2, exclude_self=False).tolist()[1] == [1, 2]


# --- invariances and limits --------------------------------------------------------------------------


def test_a_set_aligned_with_itself_scores_one(feats):
    a, _ = feats
    assert mutual_knn(a, a, 10) == 1.0
    assert cknna(a, a, 10) == pytest.approx(1.0, abs=1e-12)
    assert cknna(a, a, 10, unbiased=False) == pytest.approx(1.0, abs=1e-12)
    assert cka(a, a) == pytest.approx(1.0, abs=1e-12)
    assert cka(a, a, unbiased=True) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("unbiased", [False, True])
def test_cka_invariant_to_orthogonal_maps_and_isotropic_scaling(feats, unbiased):
    a, b = feats
    rng = np.random.default_rng(7)
    q, _ = np.linalg.qr(rng.normal(size=(a.shape[1], a.shape[1])))
    base = cka(a, b, unbiased=unbiased)
    assert cka(a @ q, b, unbiased=unbiased) == pytest.approx(base, abs=1e-10)
    assert cka(3.7 * a, 0.01 * b, unbiased=unbiased) == pytest.approx(base, abs=1e-10)
    # not invariant to an anisotropic scaling (the test can tell a wrong formula)
    assert cka(a * np.linspace(0.1, 5, a.shape[1]), b, unbiased=unbiased) != pytest.approx(base, abs=1e-3)


def test_knn_scores_invariant_to_rotation(feats):
    a, b = feats
    q, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(a.shape[1],) * 2))
    assert mutual_knn(a @ q, b, 5) == mutual_knn(a, b, 5)
    assert cknna(a @ q, b, 5) == pytest.approx(cknna(a, b, 5), abs=1e-10)


def test_unrelated_sets_score_near_chance():
    rng = np.random.default_rng(11)
    a = l2_normalize(rng.normal(size=(300, 16)))
    b = l2_normalize(rng.normal(size=(300, 16)))
    assert mutual_knn(a, b, 10) < 0.1  # chance is k / (n - 1) ≈ 0.03
    assert abs(cknna(a, b, 10)) < 0.1


def test_bad_arguments():
    a = np.eye(5)
    with pytest.raises(ValueError, match="rows"):
        mutual_knn(a, np.eye(4), 2)
    with pytest.raises(ValueError, match="k=5"):
        mutual_knn(a, a, 5)
    with pytest.raises(ValueError, match="k >= 2"):
        cknna(a, a, 1)
    with pytest.raises(ValueError, match="at least 4"):
        cka(np.eye(3), np.eye(3), unbiased=True)


# --- the join and the report ---------------------------------------------------------------------------


def test_alignment_joins_by_id_and_reports_the_join(feats):
    a, b = feats
    ids = [f"img{i}" for i in range(len(a))]
    set_a = vector_set(ids + ["only-a"], np.vstack([a, np.ones((1, a.shape[1]))]))
    perm = np.random.default_rng(5).permutation(len(b))
    set_b = vector_set(
        [ids[p] for p in perm] + ["only-b1", "only-b2"], np.vstack([b[perm], np.ones((2, b.shape[1]))])
    )
    join = join_by_id(set_a, set_b)
    assert join.summary() == {"common": 40, "only_a": 1, "only_b": 2}
    assert join.only_a == ["only-a"] and join.only_b == ["only-b1", "only-b2"]
    report = alignment(set_a, set_b, k=5)
    assert (report.n_common, report.n_only_a, report.n_only_b) == (40, 1, 2)
    a32, b32 = l2_normalize(a.astype(np.float32)), l2_normalize(b.astype(np.float32))
    assert report.scores["mutual_knn"] == pytest.approx(ref_mutual_knn(a32, b32, 5), abs=1e-6)
    assert report.scores["cknna"] == pytest.approx(ref_cknna(a, b, 5, True), abs=1e-5)
    assert report.scores["cka"] == pytest.approx(ref_cka_biased(a, b), abs=1e-5)
    assert report.as_dict()["join"] == {"common": 40, "only_a": 1, "only_b": 2}


def test_alignment_refuses_too_few_common_ids():
    x = np.random.default_rng(0).normal(size=(20, 4))
    a = vector_set([f"a{i}" for i in range(20)], x)
    b = vector_set([f"a{i}" for i in range(5)] + [f"b{i}" for i in range(15)], x)
    with pytest.raises(
        ValueError, match="only 5 ids are common.*15 only in the first, 15 only in the second"
    ):
        alignment(a, b, k=10)
