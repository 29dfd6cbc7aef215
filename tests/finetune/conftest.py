"""Fixtures for the fine-tuning tests: generated captioned and labelled images, tiny CLIP, SigLIP
and Phi-3-vision checkpoints (built once per session), no network, one torch thread (the models are
tiny: more threads only add contention on a shared machine)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from phiclip.testing import (
    build_tiny_clip,
    build_tiny_phi3v,
    build_tiny_siglip,
    make_caption_images,
    make_sample_images,
)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach a hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_corrupt(path: Path) -> Path:
    """A file with an image name and bytes that are not an image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n but not really an image")
    return path


@pytest.fixture(scope="session")
def caption_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """captions.csv (image, caption, split): 24 combinations x 3 train + 1 val renderings, plus two
    corrupt images in the train split."""
    root = tmp_path_factory.mktemp("captions")
    csv = make_caption_images(root, size=(64, 48))
    for i in range(2):
        write_corrupt(root / "images" / f"broken_{i}.png")
    with open(csv, "a", encoding="utf-8") as f:
        f.write("images/broken_0.png,a broken image,train\nimages/broken_1.png,another broken image,train\n")
    return csv


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight CLIP at 32 px, patch 8 (a 4 x 4 grid)."""
    return build_tiny_clip(tmp_path_factory.mktemp("ft_clip") / "clip", image_size=32, patch_size=8)


@pytest.fixture(scope="session")
def tiny_siglip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_siglip(tmp_path_factory.mktemp("ft_siglip") / "siglip", image_size=32, patch_size=8)


@pytest.fixture(scope="session")
def colour_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder per colour (4 classes x 3 shapes x 4 images) plus one corrupt image in red/."""
    root = tmp_path_factory.mktemp("colours") / "images"
    make_sample_images(root, per_class=4)
    (root / "labels.csv").unlink()
    write_corrupt(root / "red" / "broken.png")
    return root


@pytest.fixture(scope="session")
def tiny_phi3v_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The released layout with a tiny 336-px / patch-14 tower (the teacher)."""
    return build_tiny_phi3v(tmp_path_factory.mktemp("ft_phi3v") / "phi3v", num_crops=4)
