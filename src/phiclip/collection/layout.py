"""2-D coordinates of a vector set for the collection map.

:func:`layout_2d` places each item on a plane: through UMAP (``umap-learn``, cosine metric, seeded) when
that package imports and there are enough items, through PCA otherwise. The method actually used comes
back with the coordinates (:class:`Layout`), with a sentence the caller prints or records and the map page
states, e.g. ``"PCA (umap-learn not installed)"``.

PCA projects the centred vectors (L2-normalised first by default, as embeddings are compared by cosine)
on their two leading principal axes. Up to :data:`EXACT_PCA_LIMIT` rows it is an exact SVD of the
centred matrix (float64); above, a randomized SVD (Halko, Martinsson and Tropp 2011, algorithm 4.4:
a Gaussian sketch of ``2 + oversample`` columns refined by ``n_iter`` QR-orthonormalised power
iterations), O(n·d) memory and time: 100,000 × 512 takes seconds on two cores. Signs are fixed so that
each axis's largest loading is positive (the same item lands on the same side whichever path ran).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from phiclip.collection.vectors import l2_normalize

__all__ = ["EXACT_PCA_LIMIT", "MIN_UMAP_ITEMS", "Layout", "layout_2d", "pca_2d"]

#: Up to this many rows PCA is an exact SVD; above it a randomized SVD.
EXACT_PCA_LIMIT = 5000
#: UMAP needs a neighbourhood graph; with fewer items than this, PCA is used instead.
MIN_UMAP_ITEMS = 16
#: Below this many matrix entries the randomized SVD works in float64, above in float32 (half the memory).
_FLOAT64_ENTRIES = 1 << 24


@dataclass
class Layout:
    """2-D coordinates, row i for item i, and how they were made.

    ``method`` is ``"umap"`` or ``"pca"``; ``description`` says it in words, with the reason for a
    fallback (``"PCA (umap-learn not installed)"``); ``explained_variance`` is the share of the variance
    each PCA axis carries (``None`` for UMAP).
    """

    coords: np.ndarray
    method: str
    description: str
    explained_variance: tuple[float, float] | None = None

    def __len__(self) -> int:
        return int(self.coords.shape[0])


def _flip_signs(vt: np.ndarray) -> np.ndarray:
    """``vt`` (k, d) with each row's sign set so that its entry of largest magnitude is positive."""
    idx = np.argmax(np.abs(vt), axis=1)
    signs = np.sign(vt[np.arange(vt.shape[0]), idx])
    signs[signs == 0] = 1.0
    return vt * signs[:, None]


def _orthonormal(a: np.ndarray) -> np.ndarray:
    q, _ = np.linalg.qr(a)
    return q


def pca_2d(
    vectors: np.ndarray,
    *,
    randomized: bool | None = None,
    seed: int = 1234,
    n_iter: int = 7,
    oversample: int = 10,
) -> tuple[np.ndarray, tuple[float, float]]:
    """Project ``vectors`` (n, d) on their two leading principal axes.

    Args:
        vectors: (n, d); centred here (a copy), not normalised.
        randomized: randomized SVD (``True``), exact SVD (``False``), or by size (``None``: randomized
            above :data:`EXACT_PCA_LIMIT` rows).
        seed: seed of the randomized sketch.
        n_iter: power iterations of the randomized SVD (more: closer to exact when the leading singular
            values are close).
        oversample: extra sketch columns beyond the two wanted.

    Returns:
        ``(coords, explained)``: coords (n, 2) float32, the scores on axis 1 and 2 (an axis beyond the
        rank of the data is 0); explained the share of the total variance on each axis (0 when there is
        no variance).
    """
    x = np.asarray(vectors)
    if x.ndim != 2:
        raise ValueError(f"expected (n, d) vectors, got shape {x.shape}")
    n, d = x.shape
    out = np.zeros((n, 2), dtype=np.float32)
    if n == 0 or d == 0:
        return out, (0.0, 0.0)
    if randomized is None:
        randomized = n > EXACT_PCA_LIMIT
    dtype = np.float64 if (not randomized or n * d <= _FLOAT64_ENTRIES) else np.float32
    mean = x.mean(axis=0, dtype=np.float64)
    xc = np.asarray(x, dtype=dtype) - mean.astype(dtype)
    total = float(np.einsum("ij,ij->", xc, xc, dtype=np.float64))
    k = min(2, n, d)
    if total <= 0.0:
        return out, (0.0, 0.0)
    if not randomized:
        _, s, vt = np.linalg.svd(xc, full_matrices=False)
        vt = vt[:k]
        s = s[:k]
    else:
        width = min(d, n, k + oversample)
        rng = np.random.default_rng(seed)
        q = _orthonormal(xc @ rng.standard_normal((d, width)).astype(dtype))
        for _ in range(n_iter):
            q = _orthonormal(xc.T @ q)
            q = _orthonormal(xc @ q)
        b = (q.T @ xc).astype(np.float64)  # (width, d)
        _, s, vt = np.linalg.svd(b, full_matrices=False)
        vt = vt[:k]
        s = s[:k]
    vt = _flip_signs(np.asarray(vt, dtype=np.float64))
    coords = xc @ vt.T.astype(dtype)
    out[:, :k] = coords
    explained = [float(v) ** 2 / total for v in s] + [0.0] * (2 - k)
    return out, (explained[0], explained[1])


def _import_umap() -> tuple[Any | None, str]:
    """``(umap module, "")``, or ``(None, why)`` when umap-learn cannot be imported."""
    try:
        import umap  # type: ignore[import-not-found]
    except ImportError:
        return None, "umap-learn not installed"
    except Exception as e:  # noqa: BLE001 - a broken install (numba, llvmlite) must not break the map
        return None, f"umap-learn failed to import: {type(e).__name__}: {e}"
    return umap, ""


def layout_2d(
    vectors: np.ndarray,
    *,
    method: Literal["auto", "umap", "pca"] = "auto",
    seed: int = 1234,
    normalize: bool = True,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
) -> Layout:
    """2-D coordinates of ``vectors`` (n, d): UMAP when possible (``method="auto"``), else PCA.

    Args:
        vectors: (n, d) vectors, row i for item i.
        method: ``"auto"`` (UMAP when umap-learn imports and there are at least :data:`MIN_UMAP_ITEMS`
            items, PCA otherwise), ``"umap"`` (raise when umap-learn is missing), ``"pca"``.
        seed: UMAP's ``random_state`` (which makes it single-threaded and reproducible) and the seed of
            the randomized PCA.
        normalize: L2-normalise the vectors first (cosine geometry, as embeddings are compared).
        n_neighbors, min_dist: UMAP parameters (``n_neighbors`` is capped at n - 1).

    Returns:
        A :class:`Layout` whose ``method`` / ``description`` say what was used and, for a fallback, why.

    Raises:
        ImportError: ``method="umap"`` and umap-learn cannot be imported (``pip install 'phiclip[umap]'``).
        ValueError: an unknown method, a matrix that is not (n, d), or ``method="umap"`` with too few items.
    """
    if method not in ("auto", "umap", "pca"):
        raise ValueError(f"method={method!r}: use 'auto', 'umap' or 'pca'")
    x = np.asarray(vectors, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected (n, d) vectors, got shape {x.shape}")
    n = x.shape[0]
    if normalize:
        x = l2_normalize(x)
    reason = ""
    if method in ("auto", "umap"):
        umap, reason = _import_umap()
        if umap is None and method == "umap":
            raise ImportError(f"{reason}: pip install 'phiclip[umap]' (or use method='pca')")
        if umap is not None and n < MIN_UMAP_ITEMS:
            if method == "umap":
                raise ValueError(f"UMAP needs at least {MIN_UMAP_ITEMS} items; there are {n}")
            umap, reason = None, f"{n} items are too few for UMAP"
        if umap is not None:
            k = max(2, min(n_neighbors, n - 1))
            reducer = umap.UMAP(
                n_components=2, metric="cosine", n_neighbors=k, min_dist=min_dist, random_state=seed
            )
            coords = np.asarray(reducer.fit_transform(x), dtype=np.float32)
            if coords.shape != (n, 2):
                raise RuntimeError(f"UMAP returned shape {coords.shape}, expected {(n, 2)}")
            return Layout(coords, "umap", f"UMAP (umap-learn, cosine, {k} neighbours, seed {seed})")
    coords, explained = pca_2d(x, seed=seed)
    share = f"axes explain {100 * explained[0]:.1f}% and {100 * explained[1]:.1f}% of the variance"
    description = f"PCA ({reason}; {share})" if reason else f"PCA ({share})"
    return Layout(coords, "pca", description, explained)
