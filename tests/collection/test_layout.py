"""collection.layout: exact and randomized PCA against an independent eigendecomposition, the UMAP path
(through a stand-in module: umap-learn is an optional extra) and the fallback when umap-learn is absent."""

from __future__ import annotations

import importlib.abc
import sys
import types
from typing import Any

import numpy as np
import pytest

from phiclip.collection import layout as layout_mod
from phiclip.collection.layout import EXACT_PCA_LIMIT, MIN_UMAP_ITEMS, Layout, layout_2d, pca_2d


def _data(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Vectors with a decaying spectrum (distinct leading axes) and an offset (PCA must centre)."""
    rng = np.random.default_rng(seed)
    scales = 1.0 / (1.0 + np.arange(d)) ** 0.8
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (rng.standard_normal((n, d)) * scales) @ basis.T + 3.0


def _reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scores on the two leading eigenvectors of the covariance (eigh), and their variance shares."""
    xc = x.astype(np.float64) - x.mean(axis=0)
    evals, evecs = np.linalg.eigh(xc.T @ xc)
    top = np.argsort(evals)[::-1][:2]
    return xc @ evecs[:, top], evals[top] / evals.sum()


def _equal_up_to_sign(a: np.ndarray, b: np.ndarray, rtol: float) -> None:
    for axis in range(2):
        u, v = a[:, axis].astype(np.float64), b[:, axis].astype(np.float64)
        sign = np.sign(np.dot(u, v)) or 1.0
        scale = np.abs(v).max()
        np.testing.assert_allclose(u * sign, v, atol=rtol * scale, err_msg=f"axis {axis}")


def test_exact_pca_matches_the_covariance_eigenvectors() -> None:
    x = _data(600, 40)
    coords, explained = pca_2d(x, randomized=False)
    ref, ref_share = _reference(x)
    assert coords.shape == (600, 2) and coords.dtype == np.float32
    _equal_up_to_sign(coords, ref, 1e-5)
    np.testing.assert_allclose(explained, ref_share, rtol=1e-8)


@pytest.mark.parametrize("seed", [0, 7])
def test_randomized_pca_equals_exact_pca(seed: int) -> None:
    x = _data(3000, 96, seed=seed)
    exact, e_exact = pca_2d(x, randomized=False)
    fast, e_fast = pca_2d(x, randomized=True, seed=seed + 100)
    _equal_up_to_sign(fast, exact, 1e-4)
    np.testing.assert_allclose(e_fast, e_exact, rtol=1e-6)
    # the sign rule makes the two paths agree without any flip, too
    np.testing.assert_allclose(fast, exact, atol=1e-4 * np.abs(exact).max())


def test_randomized_path_is_taken_above_the_limit_and_matches_the_reference() -> None:
    x = _data(EXACT_PCA_LIMIT + 2000, 64, seed=3).astype(np.float32)
    calls: list[bool] = []
    real_svd = np.linalg.svd

    def spy(a: np.ndarray, *args: Any, **kwargs: Any) -> Any:
        calls.append(a.shape[0] == x.shape[0])  # an SVD of the full matrix would be the exact path
        return real_svd(a, *args, **kwargs)

    np.linalg.svd = spy  # type: ignore[assignment]
    try:
        coords, _ = pca_2d(x)
    finally:
        np.linalg.svd = real_svd  # type: ignore[assignment]
    assert calls and not any(calls)
    ref, _ = _reference(x)
    _equal_up_to_sign(coords, ref, 1e-3)


def test_signs_are_fixed_by_the_largest_loading() -> None:
    x = _data(400, 20, seed=5)
    a, _ = pca_2d(x, randomized=False)
    b, _ = pca_2d(-x, randomized=False)  # negated data: same axes up to sign, the rule picks the same ones
    np.testing.assert_allclose(a, -b, atol=1e-9 + 1e-5 * np.abs(a).max())
    c, _ = pca_2d(x[::-1], randomized=False)
    np.testing.assert_allclose(a[::-1], c, atol=1e-5 * np.abs(a).max())


def test_degenerate_inputs() -> None:
    coords, explained = pca_2d(np.ones((5, 3)))
    assert np.all(coords == 0) and explained == (0.0, 0.0)
    coords, explained = pca_2d(np.zeros((0, 4)))
    assert coords.shape == (0, 2)
    line = np.outer(np.arange(6.0), [1.0, 2.0, 2.0])  # rank one: all variance on axis 1
    coords, explained = pca_2d(line, randomized=False)
    np.testing.assert_allclose(np.abs(coords[:, 0]), np.abs(np.arange(6.0) - 2.5) * 3.0, rtol=1e-6)
    np.testing.assert_allclose(coords[:, 1], 0.0, atol=1e-6)
    assert explained[0] == pytest.approx(1.0) and explained[1] == pytest.approx(0.0, abs=1e-12)
    one_dim = np.arange(5.0)[:, None]
    coords, explained = pca_2d(one_dim)
    np.testing.assert_allclose(np.abs(coords[:, 0]), np.abs(np.arange(5.0) - 2.0), rtol=1e-6)
    assert np.all(coords[:, 1] == 0) and explained == (pytest.approx(1.0), 0.0)
    with pytest.raises(ValueError, match=r"\(n, d\)"):
        pca_2d(np.ones(4))


@pytest.fixture
def no_umap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "umap", None)  # `import umap` now raises ImportError


def test_falls_back_to_pca_when_umap_is_absent(no_umap: None) -> None:
    x = _data(200, 16)
    out = layout_2d(x)
    assert isinstance(out, Layout) and out.method == "pca" and len(out) == 200
    assert out.description.startswith("PCA (umap-learn not installed")
    assert out.explained_variance is not None and 0 < out.explained_variance[1] <= out.explained_variance[0]
    # layout PCA runs on the L2-normalised vectors
    normed = x / np.linalg.norm(x, axis=1, keepdims=True)
    ref, _ = pca_2d(normed)
    np.testing.assert_allclose(out.coords, ref, atol=1e-5)
    with pytest.raises(ImportError, match=r"phiclip\[umap\]"):
        layout_2d(x, method="umap")


def test_explicit_pca_says_so_without_a_reason() -> None:
    out = layout_2d(_data(50, 8), method="pca")
    assert out.method == "pca" and out.description.startswith("PCA (axes explain")
    scaled = layout_2d(_data(50, 8) * 7.5, method="pca")  # normalised first: the scale does not matter
    np.testing.assert_allclose(out.coords, scaled.coords, atol=1e-5)
    raw = layout_2d(_data(50, 8), method="pca", normalize=False)
    assert not np.allclose(raw.coords, out.coords, atol=1e-3)
    with pytest.raises(ValueError, match="method="):
        layout_2d(_data(50, 8), method="tsne")  # type: ignore[arg-type]


class _FakeUMAP:
    """Stands in for umap.UMAP: records its arguments and input, returns the first two columns."""

    seen: list[dict[str, Any]] = []

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs

    def fit_transform(self, x: np.ndarray) -> np.ndarray:
        self.seen.append({"kwargs": self.kwargs, "x": x})
        return x[:, :2] * 10


@pytest.fixture
def fake_umap(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    _FakeUMAP.seen = []
    monkeypatch.setitem(sys.modules, "umap", types.SimpleNamespace(UMAP=_FakeUMAP))
    return _FakeUMAP.seen


def test_uses_umap_with_cosine_and_the_seed_when_importable(fake_umap: list[dict[str, Any]]) -> None:
    x = _data(100, 12)
    out = layout_2d(x, seed=42, n_neighbors=30)
    assert out.method == "umap" and out.explained_variance is None
    assert out.description == "UMAP (umap-learn, cosine, 30 neighbours, seed 42)"
    (call,) = fake_umap
    kw = call["kwargs"]
    assert kw["metric"] == "cosine" and kw["random_state"] == 42 and kw["n_components"] == 2
    np.testing.assert_allclose(np.linalg.norm(call["x"], axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(out.coords, call["x"][:, :2] * 10)
    # n_neighbors is capped at n - 1
    layout_2d(_data(MIN_UMAP_ITEMS, 4))
    assert fake_umap[-1]["kwargs"]["n_neighbors"] == MIN_UMAP_ITEMS - 1


def test_too_few_items_for_umap(fake_umap: list[dict[str, Any]]) -> None:
    out = layout_2d(_data(MIN_UMAP_ITEMS - 1, 6))
    assert out.method == "pca" and f"{MIN_UMAP_ITEMS - 1} items are too few for UMAP" in out.description
    assert not fake_umap
    with pytest.raises(ValueError, match="at least"):
        layout_2d(_data(5, 6), method="umap")


class _BrokenFinder(importlib.abc.MetaPathFinder):
    """Makes `import umap` fail as a broken install does (numba / llvmlite errors are not ImportError)."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name == "umap":
            raise OSError("libllvmlite.so: cannot open shared object file")
        return None


def test_a_broken_umap_install_falls_back_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "umap", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_BrokenFinder(), *sys.meta_path])
    module, reason = layout_mod._import_umap()
    assert module is None and reason.startswith("umap-learn failed to import: OSError")
    out = layout_2d(_data(40, 5))
    assert out.method == "pca" and "libllvmlite" in out.description
