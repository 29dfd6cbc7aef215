"""Fixtures of the input tests: a local HTTP server with faults (127.0.0.1 only)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ._http import FaultServer


@pytest.fixture()
def http_server() -> Iterator[FaultServer]:
    """A fresh fault server (hit counts start at zero)."""
    server = FaultServer()
    try:
        yield server
    finally:
        server.close()
