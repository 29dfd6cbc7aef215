"""Fixtures for the pipeline tests: the mixed good/bad image folder, a tiny CLIP checkpoint (built
once per session) and the test-only mean-colour encoder."""

from __future__ import annotations

from pathlib import Path

import pytest

from phiclip.testing import build_tiny_clip

from ._helpers import Expected, MeanColourEncoder, make_mixed_folder


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach a hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def mixed_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Expected]]:
    """(folder, {path: Expected}) of good images and every bad kind; shared, do not modify."""
    root = tmp_path_factory.mktemp("mixed") / "images"
    return root, make_mixed_folder(root)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight CLIP at 32 px (patch 16) in the hub layout."""
    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip") / "clip", image_size=32, patch_size=16)


@pytest.fixture(scope="session")
def tiny_clip(tiny_clip_dir: Path):
    """The tiny CLIP loaded through ``load_encoder`` (CPU, float32)."""
    from phiclip.encoders import load_encoder

    return load_encoder(f"clip:{tiny_clip_dir}", device="cpu", dtype="float32")


@pytest.fixture()
def mean_colour() -> MeanColourEncoder:
    return MeanColourEncoder()
