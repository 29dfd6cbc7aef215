"""phiclip.cpu.threads: torch threads sized from the cores other processes leave free."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

import phiclip.cpu.threads as T


class FakeClock:
    """/proc/stat, the wall clock and this process's CPU time, advanced by hand."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, cpus: int = 2) -> None:
        self.wall = 100.0
        self.own = 5.0
        self.busy = 50.0
        monkeypatch.setattr(T, "allowed_cpus", lambda: list(range(cpus)))
        monkeypatch.setattr(T, "_busy_seconds", lambda c: self.busy)
        monkeypatch.setattr(T.time, "monotonic", lambda: self.wall)
        monkeypatch.setattr(T.time, "process_time", lambda: self.own)
        monkeypatch.setattr(T.time, "sleep", lambda s: self.advance(s, own=0.0, others=0.0))
        T._state.clear()

    def advance(self, seconds: float, own: float, others: float) -> None:
        """``seconds`` pass; this process uses ``own`` cores, other processes ``others``."""
        self.wall += seconds
        self.own += own * seconds
        self.busy += (own + others) * seconds


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(T.ENV, raising=False)
    T._state.clear()
    yield
    T._state.clear()


@pytest.mark.parametrize("others, threads", [(0.0, 2), (0.3, 2), (0.7, 1), (1.0, 1), (2.0, 1)])
def test_threads_from_the_cores_others_use(monkeypatch, others, threads) -> None:
    clock = FakeClock(monkeypatch)
    T.others_busy_cores()  # first sample
    clock.advance(1.0, own=2.0 if threads == 2 else 1.0, others=others)
    assert T.others_busy_cores() == pytest.approx(others)
    clock.advance(1.0, own=1.0, others=others)
    assert T.advised_threads(2) == threads


def test_more_cores_and_the_cap(monkeypatch) -> None:
    clock = FakeClock(monkeypatch, cpus=8)
    T.others_busy_cores()
    clock.advance(1.0, own=4.0, others=2.0)
    assert T.advised_threads(8) == 6
    clock.advance(1.0, own=4.0, others=2.0)
    assert T.advised_threads(4) == 4  # never more than torch was given


def test_short_windows_reuse_the_last_estimate(monkeypatch) -> None:
    clock = FakeClock(monkeypatch)
    T.others_busy_cores()
    clock.advance(1.0, own=1.0, others=1.0)
    assert T.others_busy_cores() == pytest.approx(1.0)
    clock.advance(T.MIN_WINDOW / 10, own=2.0, others=0.0)  # too short to say anything new
    assert T.others_busy_cores() == pytest.approx(1.0)


def test_switched_off_by_env_and_context(monkeypatch) -> None:
    clock = FakeClock(monkeypatch)
    T.others_busy_cores()
    clock.advance(1.0, own=1.0, others=1.0)
    monkeypatch.setenv(T.ENV, "0")
    assert T.advised_threads(2) == 2
    monkeypatch.delenv(T.ENV)
    with T.adaptive_threads_disabled():
        assert T.advised_threads(2) == 2
    assert T.advised_threads(2) == 1


def test_context_restores_the_thread_count(monkeypatch) -> None:
    clock = FakeClock(monkeypatch)
    before = torch.get_num_threads()
    T.others_busy_cores()
    clock.advance(1.0, own=1.0, others=float(len(T.allowed_cpus())))
    with T.threads_for_free_cores() as adapt:
        assert adapt() == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_tower_runs_on_the_free_cores_and_gives_the_same_tokens(monkeypatch, tmp_path) -> None:
    from phiclip.phi3v import Phi3VImageEmbedding
    from phiclip.testing import build_tiny_phi3v

    model = Phi3VImageEmbedding.from_pretrained(build_tiny_phi3v(tmp_path / "m"), max_crops_per_batch=2).eval()
    crops = torch.randn(5, 3, 336, 336)
    with torch.inference_mode():
        quiet = model.crop_features(crops)
    seen = []
    monkeypatch.setattr(T, "advised_threads", lambda n: seen.append(n) or 1)
    before = torch.get_num_threads()
    with torch.inference_mode():
        busy = model.crop_features(crops)
    assert len(seen) == 3  # asked before each of the 3 chunks
    assert torch.get_num_threads() == before
    torch.testing.assert_close(busy, quiet, rtol=1e-5, atol=1e-5)


def test_a_real_busy_process_is_seen() -> None:
    """A CPU-bound process beside this one shows up as (at least half) a busy core."""
    if T._busy_seconds(T.allowed_cpus()) is None:
        pytest.skip("no /proc/stat here")
    T.others_busy_cores()
    proc = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 5: pass"])
    try:
        time.sleep(1.0)
        T.others_busy_cores()  # the window now starts with the competitor running
        time.sleep(1.0)
        assert T.others_busy_cores() >= 0.5
    finally:
        proc.kill()
        proc.wait()
