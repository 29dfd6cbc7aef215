"""Suite-wide settings: a wide terminal for CLI output (rich wraps at the terminal width, and the
tests read messages that contain long temporary paths)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")
