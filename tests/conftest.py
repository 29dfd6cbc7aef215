"""Suite-wide settings: a wide terminal for CLI output (rich wraps at the terminal width, and the
tests read messages that contain long temporary paths)."""

from __future__ import annotations

from pathlib import Path

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


@pytest.fixture
def unreachable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Online mode (HF_HUB_OFFLINE unset) with a hub endpoint nothing listens on; returns the cache."""
    from huggingface_hub import constants

    from phiclip import hub

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for name in hub._PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: connection refused
    monkeypatch.setattr(hub, "_probes", {})
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    return cache
