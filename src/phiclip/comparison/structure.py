"""How two embedding spaces of the same images relate: pure numpy, no model needed.

Every function takes ``(n, d)`` arrays whose row ``i`` is image ``i`` in both spaces (the
dimensions ``d`` may differ between spaces). Neighbours and similarities are cosine: rows are
L2-normalised first, so the answers do not depend on whether an encoder normalised its output.

- :func:`knn_indices` / :func:`knn_overlap`: which images are each image's ``k`` nearest
  neighbours, and what fraction of them two spaces share (1 = same neighbourhoods; chance is
  about ``k / (n - 1)``).
- :func:`linear_cka`: linear centred kernel alignment (Kornblith et al., 2019), a similarity of
  representations in [0, 1] that is invariant to orthogonal transforms and isotropic scaling.
- :func:`similarity_histogram`: the distribution of pairwise cosine similarities, split into
  same-label and different-label pairs when labels are known.
- :func:`pca_2d` and :func:`align_2d`: a deterministic 2-D projection for plotting, and an
  orthogonal alignment of one projection onto another so two plots can be read side by side.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from phiclip.models.ops import l2_normalize

#: Rows per block when a full (n, n) similarity matrix would be too large to hold at once.
_BLOCK = 1024


def _as_matrix(x: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (n, dim) array, got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape}); embed at least two images")
    if not np.all(np.isfinite(arr)):
        bad = int(np.count_nonzero(~np.all(np.isfinite(arr), axis=1)))
        raise ValueError(f"{name} has {bad} row(s) with NaN or infinite values; check the encoder's dtype")
    return arr


def _same_rows(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"the two spaces must embed the same images: a has {a.shape[0]} rows and b has {b.shape[0]}"
        )


def knn_indices(x: np.ndarray, k: int) -> np.ndarray:
    """Each row's ``k`` nearest other rows by cosine similarity, nearest first.

    Args:
        x: ``(n, d)`` embeddings.
        k: neighbours per row, ``1 <= k <= n - 1`` (a row is never its own neighbour).

    Returns:
        ``(n, k)`` int64 indices. Ties are broken by the lower index, so the answer is deterministic.
    """
    x = _as_matrix(x, "embeddings")
    n = x.shape[0]
    if not 1 <= k <= n - 1:
        raise ValueError(f"k={k} neighbours needs 1 <= k <= n - 1 = {n - 1} (there are {n} images)")
    xn = l2_normalize(x)
    out = np.empty((n, k), dtype=np.int64)
    m = min(n - 1, k + 8)  # candidates per row: the k nearest and a margin for ties
    for start in range(0, n, _BLOCK):
        stop = min(start + _BLOCK, n)
        sims = xn[start:stop] @ xn.T  # (b, n)
        rows = np.arange(stop - start)
        sims[rows, rows + start] = -np.inf  # a row is not its own neighbour
        # The m most similar, unordered; then ordered by (-similarity, index) (lexsort: last key first).
        cand = np.argpartition(-sims, m - 1, axis=1)[:, :m]  # (b, m)
        cand_sims = np.take_along_axis(sims, cand, axis=1)
        order = np.lexsort((cand, -cand_sims), axis=1)
        cand = np.take_along_axis(cand, order, axis=1)
        cand_sims = np.take_along_axis(cand_sims, order, axis=1)
        out[start:stop] = cand[:, :k]
        if m < n - 1:
            # Everything outside the candidates is at most as similar as the last candidate. Where
            # the k-th ties with it, a lower index may lie outside: order those rows in full.
            unsure = np.flatnonzero(cand_sims[:, k - 1] <= cand_sims[:, m - 1])
            if unsure.size:
                full = sims[unsure]
                cols = np.broadcast_to(np.arange(n), full.shape)
                out[start + unsure] = np.lexsort((cols, -full), axis=1)[:, :k]
    return out


@dataclass
class KnnOverlap:
    """Overlap of each image's ``k`` nearest neighbours between two spaces.

    ``per_image[i]`` is ``|N_a(i) & N_b(i)| / k`` (shape ``(n,)``); ``mean`` its mean; ``chance``
    the expected overlap of two unrelated spaces, ``k / (n - 1)``.
    """

    k: int
    per_image: np.ndarray
    mean: float
    chance: float


def knn_overlap(a: np.ndarray, b: np.ndarray, k: int) -> KnnOverlap:
    """The fraction of each image's ``k`` nearest neighbours that spaces ``a`` and ``b`` share.

    Args:
        a: ``(n, d_a)`` embeddings of n images.
        b: ``(n, d_b)`` embeddings of the same n images, in the same order.
        k: neighbours per image, ``1 <= k <= n - 1``.
    """
    a = _as_matrix(a, "a")
    b = _as_matrix(b, "b")
    _same_rows(a, b)
    na, nb = knn_indices(a, k), knn_indices(b, k)
    n = a.shape[0]
    # Each row's neighbours are distinct, so after sorting a row of both lists side by side every
    # shared neighbour appears exactly twice, as two adjacent equal entries.
    both = np.sort(np.concatenate([na, nb], axis=1), axis=1)  # (n, 2k)
    shared = np.count_nonzero(both[:, 1:] == both[:, :-1], axis=1)
    per_image = shared.astype(np.float64) / k
    return KnnOverlap(k=k, per_image=per_image, mean=float(per_image.mean()), chance=k / (n - 1))


def _centered(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x - x.mean(axis=0, keepdims=True)


def linear_cka(a: np.ndarray, b: np.ndarray) -> float:
    """Linear CKA between two representations of the same n items, in [0, 1].

    ``CKA = ||B'^T A'||_F^2 / (||A'^T A'||_F * ||B'^T B'||_F)`` with ``A'``, ``B'`` column-centred.
    1 when ``b`` is an orthogonal transform and/or isotropic scaling of ``a`` (plus any shift).

    Args:
        a: ``(n, d_a)``; b: ``(n, d_b)``, rows in the same order.

    Raises:
        ValueError: when the shapes disagree or one space is constant (it has no variance to compare).
    """
    a = _centered(_as_matrix(a, "a"))
    b = _centered(_as_matrix(b, "b"))
    _same_rows(a, b)
    n, da = a.shape
    db = b.shape[1]
    # Feature-space products cost n*d^2; Gram (n x n) products cost n^2*d: use the cheaper.
    if n * n * (da + db) < n * (da * da + db * db + da * db):
        ka, kb = a @ a.T, b @ b.T  # (n, n)
        cross = float(np.sum(ka * kb))
        self_a = float(np.linalg.norm(ka))
        self_b = float(np.linalg.norm(kb))
    else:
        cross = float(np.linalg.norm(b.T @ a) ** 2)  # (d_b, d_a)
        self_a = float(np.linalg.norm(a.T @ a))  # (d_a, d_a)
        self_b = float(np.linalg.norm(b.T @ b))  # (d_b, d_b)
    if self_a == 0.0 or self_b == 0.0:
        which = "a" if self_a == 0.0 else "b"
        raise ValueError(f"space {which} is constant over the images (every row the same); CKA is undefined")
    return float(np.clip(cross / (self_a * self_b), 0.0, 1.0))


@dataclass
class SimilarityHistogram:
    """Counts of pairwise cosine similarities (each unordered pair of distinct images once).

    ``edges``: ``(bins + 1,)``. ``all``: ``(bins,)`` counts over every pair. ``same`` / ``different``:
    counts over pairs with equal / unequal labels (``None`` without labels). ``*_mean``: the mean
    similarity of those pairs (``None`` where there are none).
    """

    edges: np.ndarray
    all: np.ndarray
    same: np.ndarray | None
    different: np.ndarray | None
    mean: float
    std: float
    same_mean: float | None
    different_mean: float | None


def similarity_range(x: np.ndarray) -> tuple[float, float]:
    """The smallest and largest cosine similarity over pairs of distinct rows of ``x`` ``(n, d)``."""
    x = _as_matrix(x, "embeddings")
    n = x.shape[0]
    if n < 2:
        raise ValueError("a similarity range needs at least two images")
    xn = l2_normalize(x)
    lo, hi = np.inf, -np.inf
    for start in range(0, n, _BLOCK):
        stop = min(start + _BLOCK, n)
        sims = xn[start:stop] @ xn.T  # (b, n)
        upper = np.arange(n)[None, :] > np.arange(start, stop)[:, None]
        vals = sims[upper]
        if vals.size:
            lo, hi = min(lo, float(vals.min())), max(hi, float(vals.max()))
    return lo, hi


def similarity_histogram(
    x: np.ndarray,
    labels: Sequence[object] | np.ndarray | None = None,
    *,
    bins: int = 40,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> SimilarityHistogram:
    """Histogram of the cosine similarities of all ``n (n - 1) / 2`` pairs of distinct rows.

    Args:
        x: ``(n, d)`` embeddings, ``n >= 2``.
        labels: optional ``(n,)`` labels; adds same-label and different-label histograms.
        bins: number of equal-width bins over ``value_range``.
        value_range: the histogram's range; similarities outside it are clipped into the end bins.
    """
    x = _as_matrix(x, "embeddings")
    n = x.shape[0]
    if n < 2:
        raise ValueError("a similarity histogram needs at least two images")
    lab = None
    if labels is not None:
        lab = np.asarray(labels)
        if lab.shape != (n,):
            raise ValueError(f"labels must have one entry per image: {lab.shape[0] if lab.ndim else 0} labels for {n} images")
    lo, hi = value_range
    edges = np.linspace(lo, hi, bins + 1)
    xn = l2_normalize(x)
    counts = {key: np.zeros(bins, dtype=np.int64) for key in ("all", "same", "different")}
    sums = {key: 0.0 for key in counts}
    sq_sum = 0.0
    npairs = {key: 0 for key in counts}
    for start in range(0, n, _BLOCK):
        stop = min(start + _BLOCK, n)
        sims = xn[start:stop] @ xn.T  # (b, n)
        # Upper triangle only: pairs (i, j) with j > i.
        upper = np.arange(n)[None, :] > np.arange(start, stop)[:, None]
        masks = {"all": upper}
        if lab is not None:
            eq = lab[start:stop, None] == lab[None, :]
            masks["same"] = upper & eq
            masks["different"] = upper & ~eq
        for key, m in masks.items():
            vals = np.clip(sims[m].astype(np.float64), lo, hi)
            counts[key] += np.histogram(vals, bins=edges)[0]
            sums[key] += float(vals.sum())
            npairs[key] += vals.size
            if key == "all":
                sq_sum += float(np.square(vals).sum())
    total = npairs["all"]
    mean = sums["all"] / total
    std = float(np.sqrt(max(sq_sum / total - mean * mean, 0.0)))

    def _mean(key: str) -> float | None:
        return sums[key] / npairs[key] if npairs[key] else None

    return SimilarityHistogram(
        edges=edges,
        all=counts["all"],
        same=counts["same"] if lab is not None else None,
        different=counts["different"] if lab is not None else None,
        mean=float(mean),
        std=std,
        same_mean=_mean("same") if lab is not None else None,
        different_mean=_mean("different") if lab is not None else None,
    )


@dataclass
class Projection2D:
    """A 2-D view of a space: ``points`` ``(n, 2)`` and the share of variance each axis explains."""

    points: np.ndarray
    explained_variance_ratio: tuple[float, float]


def pca_2d(x: np.ndarray) -> Projection2D:
    """Project rows onto the first two principal components of the centred data.

    The components come from a symmetric eigendecomposition of the smaller of the two Gram
    matrices (``d x d`` covariance or ``n x n`` inner products), which gives the same axes as an
    SVD of the data at a fraction of the cost. Deterministic: each component's sign is chosen so
    that its largest-magnitude loading is positive. With rank one, the second coordinate is zero.
    """
    x = _as_matrix(x, "embeddings")
    xc = _centered(x)
    n, d = xc.shape
    comps = np.zeros((2, d))
    if d <= n:
        evals, evecs = np.linalg.eigh(xc.T @ xc)  # (d,), (d, d); ascending
        evals, evecs = evals[::-1], evecs[:, ::-1]
        r = min(2, d)
        comps[:r] = evecs[:, :r].T
    else:
        evals, evecs = np.linalg.eigh(xc @ xc.T)  # (n,), (n, n); ascending
        evals, evecs = evals[::-1], evecs[:, ::-1]
        r = min(2, n)
        for i in range(r):
            if evals[i] > 0:
                v = xc.T @ evecs[:, i]  # (d,): a right singular vector times its singular value
                comps[i] = v / np.linalg.norm(v)
    var = np.clip(evals, 0.0, None)
    total = float(var.sum())
    tiny = total * 1e-12
    for i in range(min(2, var.size)):
        if var[i] <= tiny:  # no variance left along this axis: a zero coordinate, not noise
            comps[i] = 0.0
            continue
        j = int(np.argmax(np.abs(comps[i])))
        if comps[i, j] < 0:
            comps[i] = -comps[i]
    points = xc @ comps.T  # (n, d) @ (d, 2) -> (n, 2)
    ratios = [float(var[i] / total) if total > 0 and i < var.size else 0.0 for i in range(2)]
    return Projection2D(points=points, explained_variance_ratio=(ratios[0], ratios[1]))


def align_2d(reference: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Rotate/reflect ``points`` ``(n, 2)`` to best match ``reference`` ``(n, 2)`` (orthogonal
    Procrustes about the centroids), and scale them to the same RMS spread.

    Only a rotation, a reflection and one uniform scale are applied, so every point's neighbours
    stay the same; the two plots just share an orientation.
    """
    ref = _centered(np.asarray(reference, dtype=np.float64))
    pts = _centered(np.asarray(points, dtype=np.float64))
    if ref.shape != pts.shape or ref.ndim != 2:
        raise ValueError(f"align_2d needs two (n, 2) arrays of the same shape, got {ref.shape} and {pts.shape}")
    u, _, vt = np.linalg.svd(pts.T @ ref)  # (2, 2)
    rotated = pts @ (u @ vt)
    rms_ref = float(np.sqrt(np.mean(np.sum(ref**2, axis=1))))
    rms_pts = float(np.sqrt(np.mean(np.sum(rotated**2, axis=1))))
    if rms_pts > 0 and rms_ref > 0:
        rotated *= rms_ref / rms_pts
    return rotated
