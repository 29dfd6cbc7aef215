"""Suite-wide settings: a wide terminal for CLI output (rich wraps at the terminal width, and the
tests read messages that contain long temporary paths)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def _cpu_precision(tmp_path_factory: pytest.TempPathFactory):
    """Exact float32 for ``precision=auto`` on the CPU, whatever this CPU's bfloat16 measures (the
    suite compares against float32 references), and measurements cached in a temporary folder,
    never in the user's cache. Session-wide, so that module-scoped encoders see it too;
    tests/test_precision.py unsets it where it tests the measured choice."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PHICLIP_CPU_PRECISION", "float32")
        mp.setenv("PHICLIP_CACHE_DIR", str(tmp_path_factory.mktemp("phiclip-cache")))
        yield


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")
