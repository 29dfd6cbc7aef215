"""Fixtures for the Phi-3-vision tests: tiny checkpoints in the released sharded layout, built once
per session (cached by their build arguments), and the reference image path built from them."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from phiclip.testing import build_tiny_phi3v

from .helpers import TINY_TOWER
from .reference import ReferenceImagePath


@pytest.fixture(scope="session")
def build_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``build_ckpt(**build_tiny_phi3v kwargs)`` -> checkpoint directory, built once per argument set.
    The directories are shared: tests that change files must copy them first (``helpers.copy_ckpt``)."""
    cache: dict[str, Path] = {}

    def build(**kwargs: Any) -> Path:
        kwargs.setdefault("vision_config", TINY_TOWER)
        key = json.dumps(kwargs, sort_keys=True)
        if key not in cache:
            cache[key] = build_tiny_phi3v(tmp_path_factory.mktemp("phi3v_ckpt"), **kwargs)
        return cache[key]

    return build


@pytest.fixture(scope="session")
def ckpt(build_ckpt: Callable[..., Path]) -> Path:
    """The released configuration (sub_glb, mlp, layer_idx absent -> -2, num_crops 16)."""
    return build_ckpt()


@pytest.fixture(scope="session")
def ckpt4(build_ckpt: Callable[..., Path]) -> Path:
    """As ``ckpt`` with num_crops 4 (Phi-3.5-vision), for tests that need fewer tokens."""
    return build_ckpt(num_crops=4)


@pytest.fixture(scope="session")
def reference_for() -> Callable[[Path], ReferenceImagePath]:
    """``reference_for(ckpt)`` -> the reference image path of that checkpoint (cached)."""
    cache: dict[Path, ReferenceImagePath] = {}

    def get(path: Path) -> ReferenceImagePath:
        if path not in cache:
            cache[path] = ReferenceImagePath(path)
        return cache[path]

    return get
