"""Fixtures of the command-line tests: a tiny CLIP checkpoint (built once per session), offline."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from phiclip.testing import build_tiny_clip


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach a hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_clip_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight CLIP at 32 px (patch 16) in the hub layout."""
    return build_tiny_clip(tmp_path_factory.mktemp("cli_tiny_clip") / "clip", image_size=32, patch_size=16)


@pytest.fixture
def cli() -> CliRunner:
    return CliRunner()
