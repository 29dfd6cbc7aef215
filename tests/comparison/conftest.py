"""Shared fixtures: two tiny random CLIPs (different seeds), labelled and captioned sample images,
and one full ``compare`` run on them (each encoder in its own subprocess, as by default)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from phiclip.comparison import CompareReport, compare
from phiclip.testing import build_tiny_clip, make_sample_images

#: Small and fast: 64-pixel inputs, 16-pixel patches (16 patches), hidden 32, 2 layers.
TINY = dict(image_size=64, patch_size=16, hidden_size=32, num_layers=2, num_heads=2, projection_dim=16)


@pytest.fixture(scope="session")
def tiny_clip_specs(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("clips")
    return [f"clip:{build_tiny_clip(root / f'clip-seed{s}', seed=s, **TINY)}" for s in (0, 1)]


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 images: 4 colours x 3 shapes x 2, labelled by colour, captioned ("a red circle"), with labels.csv."""
    root = tmp_path_factory.mktemp("shapes")
    make_sample_images(root, per_class=2)
    return root


@dataclass
class CompareRun:
    report: CompareReport
    output: Path
    specs: list[str]
    data: Path


@pytest.fixture(scope="session")
def compare_run(tiny_clip_specs: list[str], sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> CompareRun:
    out = tmp_path_factory.mktemp("compare") / "report"
    data = sample_dir / "labels.csv"
    report = compare(tiny_clip_specs, data, out, k=5, batch_size=8)
    return CompareRun(report=report, output=out, specs=tiny_clip_specs, data=data)
