"""Representation alignment: how alike two sets of vectors of the same items are.

Two embeddings of one collection (two encoders, two layers, float32 and int8...) are joined by id
(:func:`join_by_id`, which reports how many ids are common and how many only on one side), then
compared with

* :func:`mutual_knn`: the mean over items of ``|kNN_A(i) ∩ kNN_B(i)| / k``, neighbours by inner product
  (cosine, since :func:`alignment` L2-normalises first), the item itself excluded (Huh et al. 2024,
  "The Platonic Representation Hypothesis", ``AlignmentMetrics.mutual_knn``);
* :func:`cknna`: CKA restricted to mutual nearest neighbours as their ``AlignmentMetrics.cknna`` defines it:
  kernels ``K = A Aᵀ`` and ``L = B Bᵀ``; for a pair of kernels ``(X, Y)`` the mask keeps entry (i, j) when
  j is among the top-k of row i in both X and Y (the diagonal excluded from the top-k in the unbiased
  variant, included in the biased one); ``sim(X, Y) = HSIC(mask∘X, mask∘Y)`` with the unbiased (Song et
  al. 2012) or biased (``tr(X H Y H)``, H the centering matrix) estimator, and
  ``CKNNA = sim(K, L) / sqrt(sim(K, K) sim(L, L))``. Their code adds 1e-6 to that denominator; ``eps``
  reproduces it, the default (0) gives the formula itself;
* :func:`cka`: linear CKA (Kornblith et al. 2019), biased (``tr(KHLH)``) or unbiased (HSIC of Song et
  al. 2012).

Everything is computed without an (n, n) matrix: neighbours in row blocks, the masked kernels as sparse
(≤ k entries per row) lists, linear CKA in feature space (``‖AᵀB‖²_F`` and friends); memory is O(n·(d + k)).
Ties in a top-k are broken by the lower index. Sums are in float64.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from phiclip.collection.vectors import VectorSet, l2_normalize

__all__ = [
    "DEFAULT_K",
    "AlignmentReport",
    "IdJoin",
    "alignment",
    "cka",
    "cknna",
    "join_by_id",
    "knn_indices",
    "mutual_knn",
]

#: Neighbours per item of :func:`mutual_knn` and :func:`cknna` (the paper's default).
DEFAULT_K = 10
#: Rows per block when finding neighbours: a (block, n) similarity block lives at a time.
_BLOCK = 1024


@dataclass
class IdJoin:
    """The join of two vector sets by id: ``rows_a[i]`` and ``rows_b[i]`` hold the same item ``ids[i]``
    (in the order of A); ``only_a`` / ``only_b`` are the ids present on one side only."""

    ids: list[str]
    rows_a: np.ndarray
    rows_b: np.ndarray
    only_a: list[str]
    only_b: list[str]

    @property
    def n_common(self) -> int:
        """Number of ids on both sides."""
        return len(self.ids)

    def summary(self) -> dict[str, int]:
        """``{"common": .., "only_a": .., "only_b": ..}``."""
        return {"common": self.n_common, "only_a": len(self.only_a), "only_b": len(self.only_b)}


def join_by_id(a: VectorSet, b: VectorSet) -> IdJoin:
    """Match the rows of ``a`` and ``b`` by id (ids are unique on each side, :func:`read_vectors` checks)."""
    index_b = b.index_of()
    rows_a: list[int] = []
    rows_b: list[int] = []
    ids: list[str] = []
    only_a: list[str] = []
    for i, item in enumerate(a.ids):
        j = index_b.get(item)
        if j is None:
            only_a.append(item)
        else:
            ids.append(item)
            rows_a.append(i)
            rows_b.append(j)
    common = set(ids)
    only_b = [item for item in b.ids if item not in common]
    return IdJoin(ids, np.asarray(rows_a, dtype=np.int64), np.asarray(rows_b, dtype=np.int64), only_a, only_b)


def _as_float(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"expected a (n, d) matrix, got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=np.result_type(x.dtype, np.float32))


def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"the two sets have {a.shape[0]} and {b.shape[0]} rows; row i must be the same item in both"
        )


def knn_indices(x: np.ndarray, k: int, *, exclude_self: bool = True) -> np.ndarray:
    """The (n, k) indices of each row's k largest inner products with the rows of ``x``, best first.

    Args:
        x: (n, d) vectors (L2-normalise them first for cosine neighbours).
        k: neighbours per row.
        exclude_self: leave row i out of row i's neighbours (the paper's ``mutual_knn`` does; the biased
            CKNNA does not).

    Ties are broken by the lower index. Computed in blocks of rows (memory O(block·n)), in the dtype of
    ``x`` (float32 stays float32, float64 stays float64).
    """
    x = _as_float(x)
    n = x.shape[0]
    limit = n - 1 if exclude_self else n
    if not 1 <= k <= limit:
        raise ValueError(
            f"k={k} neighbours need at least {k + (1 if exclude_self else 0)} items; there are {n}"
        )
    out = np.empty((n, k), dtype=np.int64)
    for start in range(0, n, _BLOCK):
        stop = min(n, start + _BLOCK)
        sims = x[start:stop] @ x.T
        if exclude_self:
            sims[np.arange(stop - start), np.arange(start, stop)] = -np.inf
        # lexsort on (index, -sim): the k best, ties to the lower index; argpartition first for speed
        part = (
            np.argpartition(-sims, k - 1, axis=1)[:, :k]
            if k < n
            else np.tile(np.arange(n), (stop - start, 1))
        )
        kth = np.take_along_axis(sims, part, axis=1).min(axis=1, keepdims=True)
        for r in range(stop - start):
            row = sims[r]
            cand = np.flatnonzero(row >= kth[r])  # everything tied with the k-th value, too
            order = np.lexsort((cand, -row[cand]))[:k]
            out[start + r] = cand[order]
    return out


def mutual_knn(a: np.ndarray, b: np.ndarray, k: int = DEFAULT_K) -> float:
    """Mean over items of ``|kNN_A(i) ∩ kNN_B(i)| / k`` (self excluded), neighbours by inner product.

    Row i of ``a`` and of ``b`` must be the same item. Give L2-normalised rows for cosine neighbours (as
    :func:`alignment` does). 1.0 when both sets rank every item's neighbours alike.
    """
    a, b = _as_float(a), _as_float(b)
    _check_pair(a, b)
    knn_a = knn_indices(a, k)
    knn_b = knn_indices(b, k)
    n = a.shape[0]
    # |row ∩ row| through sorted rows: an item occurs at most once per row
    both = np.concatenate([knn_a, knn_b], axis=1)
    both.sort(axis=1)
    shared = (both[:, 1:] == both[:, :-1]).sum(axis=1)
    return float(shared.sum(dtype=np.float64) / (n * k))


@dataclass
class _Sparse:
    """An (n, n) matrix with few entries: rows, cols, values (float64); no duplicate (row, col)."""

    n: int
    rows: np.ndarray
    cols: np.ndarray
    vals: np.ndarray

    def without_diagonal(self) -> _Sparse:
        keep = self.rows != self.cols
        return _Sparse(self.n, self.rows[keep], self.cols[keep], self.vals[keep])

    def row_sums(self) -> np.ndarray:
        return np.bincount(self.rows, weights=self.vals, minlength=self.n)

    def col_sums(self) -> np.ndarray:
        return np.bincount(self.cols, weights=self.vals, minlength=self.n)

    def total(self) -> float:
        return float(self.vals.sum())


def _sum_transposed_product(x: _Sparse, y: _Sparse) -> float:
    """``Σ_ij X_ij Y_ji`` = tr(X Y)."""
    kx = x.rows * x.n + x.cols
    ky = y.cols * y.n + y.rows  # Y_ji keyed as (i, j)
    _, ix, iy = np.intersect1d(kx, ky, assume_unique=True, return_indices=True)
    return float(np.dot(x.vals[ix], y.vals[iy]))


def _hsic_biased_sparse(x: _Sparse, y: _Sparse) -> float:
    """``tr(X H Y H)``, H = I - 11ᵀ/n, expanded so that only sums over stored entries remain."""
    n = x.n
    return (
        _sum_transposed_product(x, y)
        - float(np.dot(y.col_sums(), x.row_sums())) / n
        - float(np.dot(x.col_sums(), y.row_sums())) / n
        + x.total() * y.total() / n**2
    )


def _hsic_unbiased_sparse(x: _Sparse, y: _Sparse) -> float:
    """Song et al. 2012, eq. 5, on X and Y with their diagonals set to zero:
    ``[tr(X̃Ỹ) + 1ᵀX̃1·1ᵀỸ1/((n-1)(n-2)) - 2·1ᵀX̃Ỹ1/(n-2)] / (n(n-3))``."""
    n = x.n
    if n < 4:
        raise ValueError(f"the unbiased HSIC needs at least 4 items; there are {n}")
    xt, yt = x.without_diagonal(), y.without_diagonal()
    value = (
        _sum_transposed_product(xt, yt)
        + xt.total() * yt.total() / ((n - 1) * (n - 2))
        - 2.0 * float(np.dot(xt.col_sums(), yt.row_sums())) / (n - 2)
    )
    return value / (n * (n - 3))


def cknna(
    a: np.ndarray,
    b: np.ndarray,
    k: int = DEFAULT_K,
    *,
    unbiased: bool = True,
    eps: float = 0.0,
) -> float:
    """CKNNA of Huh et al. 2024 (see the module docstring): CKA on mutual k-nearest-neighbour kernels.

    Args:
        a, b: (n, d_a) and (n, d_b), row i the same item in both; L2-normalise them first as the paper does.
        k: neighbours per item, at least 2 (as their code requires).
        unbiased: unbiased HSIC and self excluded from the neighbours (their default), else biased HSIC
            with self allowed among the neighbours.
        eps: added to the denominator; 1e-6 reproduces their code's numbers, 0 the formula.

    Returns:
        The score (NaN when a denominator is 0, e.g. no neighbour shared at all with ``eps=0``).
    """
    if k < 2:
        raise ValueError("CKNNA needs k >= 2")
    a, b = _as_float(a), _as_float(b)
    _check_pair(a, b)
    n = a.shape[0]
    knn_a = knn_indices(a, k, exclude_self=unbiased)
    knn_b = knn_indices(b, k, exclude_self=unbiased)
    rows = np.repeat(np.arange(n, dtype=np.int64), k)
    key_a = rows * n + knn_a.reshape(-1)
    key_b = rows * n + knn_b.reshape(-1)
    a64, b64 = a.astype(np.float64, copy=False), b.astype(np.float64, copy=False)

    def kernel_on(keys: np.ndarray, x: np.ndarray) -> _Sparse:
        r, c = np.divmod(keys, n)
        return _Sparse(n, r, c, np.einsum("ij,ij->i", x[r], x[c]))

    hsic = _hsic_unbiased_sparse if unbiased else _hsic_biased_sparse
    # mask(K, L) = topk(K) ∩ topk(L); mask(K, K) = topk(K)
    shared = np.intersect1d(key_a, key_b, assume_unique=True)
    sim_kl = hsic(kernel_on(shared, a64), kernel_on(shared, b64))
    ka, lb = kernel_on(key_a, a64), kernel_on(key_b, b64)
    sim_kk = hsic(ka, ka)
    sim_ll = hsic(lb, lb)
    denom = float(np.sqrt(sim_kk * sim_ll)) + eps
    return float(sim_kl / denom) if denom != 0 else float("nan")


def _hsic_linear_biased(x: np.ndarray, y: np.ndarray) -> float:
    """``tr(K H L H)`` for K = XXᵀ, L = YYᵀ: ``‖X̄ᵀȲ‖²_F`` with column-centred X̄, Ȳ."""
    xc = x - x.mean(axis=0)
    yc = y - y.mean(axis=0)
    return float(np.sum((xc.T @ yc) ** 2))


def _hsic_linear_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Song et al.'s unbiased HSIC of K = XXᵀ and L = YYᵀ computed in feature space."""
    n = x.shape[0]
    if n < 4:
        raise ValueError(f"the unbiased HSIC needs at least 4 items; there are {n}")
    dk = np.einsum("ij,ij->i", x, x)  # diag K
    dl = np.einsum("ij,ij->i", y, y)
    trace = float(np.sum((x.T @ y) ** 2)) - float(np.dot(dk, dl))  # Σ_{i≠j} K_ij L_ij
    k1 = x @ x.sum(axis=0) - dk  # K̃ 1
    l1 = y @ y.sum(axis=0) - dl
    value = (
        trace
        + float(k1.sum()) * float(l1.sum()) / ((n - 1) * (n - 2))
        - 2.0 * float(np.dot(k1, l1)) / (n - 2)
    )
    return value / (n * (n - 3))


def cka(a: np.ndarray, b: np.ndarray, *, unbiased: bool = False, eps: float = 0.0) -> float:
    """Linear CKA (Kornblith et al. 2019): ``HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))``, K = AAᵀ, L = BBᵀ.

    Args:
        a, b: (n, d_a) and (n, d_b), row i the same item in both.
        unbiased: Song et al.'s unbiased HSIC (n ≥ 4) instead of the biased ``tr(KHLH)``.
        eps: added to the denominator (1e-6 in Huh et al.'s code), 0 for the formula.

    Invariant to orthogonal transforms and isotropic scaling of either side; computed in feature space
    (O(n·d²)), in float64. NaN when a side is constant (zero denominator, ``eps=0``).
    """
    a, b = _as_float(a).astype(np.float64), _as_float(b).astype(np.float64)
    _check_pair(a, b)
    hsic = _hsic_linear_unbiased if unbiased else _hsic_linear_biased
    denom = float(np.sqrt(hsic(a, a) * hsic(b, b))) + eps
    return hsic(a, b) / denom if denom != 0 else float("nan")


@dataclass
class AlignmentReport:
    """The scores of :func:`alignment` and the join they were computed on."""

    k: int
    n_common: int
    n_only_a: int
    n_only_b: int
    scores: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able form."""
        return {
            "k": self.k,
            "join": {"common": self.n_common, "only_a": self.n_only_a, "only_b": self.n_only_b},
            "scores": dict(self.scores),
        }


def alignment(a: VectorSet, b: VectorSet, k: int = DEFAULT_K, *, normalize: bool = True) -> AlignmentReport:
    """Join two vector sets by id and compute every score on the common items.

    Scores: ``mutual_knn``, ``cknna`` (unbiased, their default), ``cknna_biased``, ``cka`` (linear,
    biased), ``cka_unbiased``. Vectors are L2-normalised first unless ``normalize=False`` (as in the
    paper's ``measure_alignment.py``).

    Raises:
        ValueError: fewer than ``k + 1`` common items (and at least 4), with the join's counts.
    """
    join = join_by_id(a, b)
    n = join.n_common
    if n < max(k + 1, 4):
        raise ValueError(
            f"only {n} ids are common to both sets ({len(join.only_a)} only in the first, {len(join.only_b)} only "
            f"in the second); k={k} needs at least {max(k + 1, 4)}: are these embeddings of the same items?"
        )
    xa = a.vectors[join.rows_a]
    xb = b.vectors[join.rows_b]
    if normalize:
        xa, xb = l2_normalize(xa), l2_normalize(xb)
    scores = {
        "mutual_knn": mutual_knn(xa, xb, k),
        "cknna": cknna(xa, xb, k, unbiased=True),
        "cknna_biased": cknna(xa, xb, k, unbiased=False),
        "cka": cka(xa, xb),
        "cka_unbiased": cka(xa, xb, unbiased=True),
    }
    return AlignmentReport(k, n, len(join.only_a), len(join.only_b), scores)
