"""Shared by the tests of the compiled CPU runtimes (tests/cpu/test_runtimes.py,
tests/encoders/test_phi3v_runtimes.py): pretending which runtime packages are installed, and
photo-like calibration images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import phiclip.cpu.runtimes as R


def installed(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Pretend that only the packages ``names`` are installed (runtimes, and nncf)."""
    def missing(rt: str, precision: str | None = None) -> list[str]:
        wanted = R.RUNTIME_PACKAGES.get(rt, ()) + R.PRECISION_PACKAGES.get((rt, precision or ""), ())
        return [p for p in wanted if p not in names]

    monkeypatch.setattr(R, "missing_packages", missing)


def write_images(folder: Path, n: int, seed: int = 0, sizes: list[tuple[int, int]] | None = None) -> Path:
    """``n`` smooth random PNGs in ``folder`` (``sizes``: their (width, height) in turn; default about 50x40)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        small = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
        size = sizes[i % len(sizes)] if sizes else (50 + i % 3, 40)
        Image.fromarray(small).resize(size, Image.Resampling.BICUBIC).save(folder / f"img_{i:03d}.png")
    return folder
