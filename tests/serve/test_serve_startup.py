"""``phiclip serve`` start-up and request parsing: a port in use is reported before "serving on", with the
fix and exit code 2; JSON nested too deep for the parser is a 400, not a 500."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from starlette.testclient import TestClient
from typer.testing import CliRunner

from phiclip.cli import app
from phiclip.serve.listener import PortInUseError, bind_listener

from .conftest import Built, colour_loader, make_app, serve_options


@pytest.fixture
def busy_port() -> Any:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


def test_a_port_in_use_is_reported_first_with_the_fix(colour_collection: Built, busy_port: int) -> None:
    res = CliRunner().invoke(app, ["serve", str(colour_collection.path), "--port", str(busy_port)])
    assert res.exit_code == 2, res.output
    assert f"port {busy_port}" in res.output and "already in use" in res.output and "--port" in res.output
    assert "serving on" not in res.output and "collection" not in res.output and "Traceback" not in res.output


def test_bind_listener(busy_port: int) -> None:
    with pytest.raises(PortInUseError, match=f"port {busy_port} .* --port") as info:
        bind_listener("127.0.0.1", busy_port)
    assert info.value.port == busy_port
    sock = bind_listener("127.0.0.1", 0)
    try:
        assert sock.getsockname()[1] > 0
    finally:
        sock.close()


def test_deeply_nested_json_is_a_clear_400(colour_collection: Built) -> None:
    app_, _ = make_app([colour_collection.path], serve_options(), load=colour_loader())
    body = b"[" * 200_000 + b"]" * 200_000
    with TestClient(app_) as client:
        for route in ("/v1/embeddings", "/api/search"):
            r = client.post(route, content=body, headers={"content-type": "application/json"})
            assert r.status_code == 400, (route, r.status_code, r.text[:200])
            assert "too deeply" in r.json()["error"]["message"]
