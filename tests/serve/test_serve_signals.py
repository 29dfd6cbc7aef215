"""SIGTERM to ``phiclip serve`` (a real process on loopback, a tiny CLIP): it stops accepting connections,
``/readyz`` turns 503, the requests in flight all finish with 200, and the process exits 0."""

from __future__ import annotations

import base64
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import Built

pytestmark = pytest.mark.timeout(120)

SRC = Path(__file__).resolve().parents[2] / "src"


def start_serve(collection: Path, *args: str, log: Path) -> tuple[subprocess.Popen, str]:
    """``phiclip serve`` on a free loopback port; returns the process and its base URL once /readyz is 200."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    out = log.open("w")
    proc = subprocess.Popen([sys.executable, "-m", "phiclip.cli", "serve", str(collection), "--port", "0", *args],
                            stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 60
    base = None
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        if base is None:
            m = re.search(r"serving on (http://127\.0\.0\.1:\d+)/", log.read_text())
            base = m.group(1) if m else None
        if base is not None:
            try:
                if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                    return proc, base
            except httpx.HTTPError:
                pass
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"not ready within 60 s:\n{log.read_text()}")


def test_sigterm_drains_requests_in_flight_and_exits_0(clip_collection: Built, tmp_path: Path) -> None:
    # every batch waits 1.5 s for more inputs (far below --max-batch): requests stay in flight long enough
    proc, base = start_serve(clip_collection.path, "--batch-wait-ms", "1500", "--max-batch", "1024",
                             "--drain-seconds", "20", log=tmp_path / "serve.log")
    try:
        uris = ["data:image/png;base64," + base64.b64encode(Path(r["path"]).read_bytes()).decode()
                for r in clip_collection.records[:8]]

        def one(i: int) -> httpx.Response:
            return httpx.post(base + "/v1/embeddings", json={"input": uris + [f"text {i}"]}, timeout=30)

        with ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(one, i) for i in range(16)]
            deadline = time.monotonic() + 10
            while httpx.get(base + "/api/stats", timeout=5).json()["batchers"][clip_collection.spec]["queue_depth"] < 16 * 9:
                assert time.monotonic() < deadline, "the requests did not reach the queue"
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)  # all 16 are waiting for their batch now
            time.sleep(0.4)
            with pytest.raises(httpx.ConnectError):  # no longer accepting
                httpx.get(base + "/healthz", timeout=2)
            answers = [f.result(30) for f in futures]
        assert [r.status_code for r in answers] == [200] * 16, [r.text[:200] for r in answers if r.status_code != 200]
        assert all(len(r.json()["data"]) == 9 for r in answers)
        assert proc.wait(30) == 0, (tmp_path / "serve.log").read_text()
        assert "SIGTERM" in (tmp_path / "serve.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_a_server_that_cannot_load_stops_with_the_reason(tmp_path: Path, clip_collection: Built) -> None:
    """A load failure after the port is bound (here: another model's weights given with --model) ends the
    process with the message and exit 1, not a server that answers 503 forever."""
    other: Any = tmp_path / "nothing-here"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    res = subprocess.run([sys.executable, "-m", "phiclip.cli", "serve", str(clip_collection.path), "--port", "0",
                          "--model", f"clip:{other}"], capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "nothing-here" in res.stdout + res.stderr
