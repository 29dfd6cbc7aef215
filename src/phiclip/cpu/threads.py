"""Threads for the CPU fast path, sized from the cores other processes leave free.

torch splits every matrix product and element-wise pass of a chunk evenly over its threads and
waits for the last one. When another process runs on one of those cores, the scheduler shares
that core between it and one of torch's threads, and every parallel step waits for that thread's
next time slice (milliseconds; a 0.3 ms element-wise pass measured at 12-20 ms on a 2-core machine
with other processes running). The Phi-3-vision tower's small CPU chunks (4 crops) make thousands
of such steps, so it lost most of its lead over the released code beside one CPU-bound process.

:func:`advised_threads` reads how busy the allowed cores were since the last call (``/proc/stat``
less this process's own CPU time, nice'd processes not counted) and gives torch one thread per
core left free: beside one CPU-bound process on 2 cores, 1 thread that runs undisturbed instead
of 2 that keep waiting for each other. On a quiet machine it changes nothing.
:func:`threads_for_free_cores` applies that around a block, per chunk, and restores the thread
count after. ``PHICLIP_ADAPTIVE_THREADS=0`` turns it off.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

ENV = "PHICLIP_ADAPTIVE_THREADS"
#: Shortest window (s) over which others' CPU use is averaged; the first call of a process waits this long once.
MIN_WINDOW = 0.03
#: Others' average use (in cores) is rounded up from this fraction: 0.4 busy cores leave every core to torch, 0.7 take one.
SLACK = 0.4

_lock = threading.Lock()
_state: dict[str, Any] = {}
_disabled = threading.local()


def allowed_cpus() -> list[int]:
    """The CPUs this process may run on (``sched_getaffinity``; all CPUs where it is unknown)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def _busy_seconds(cpus: list[int]) -> float | None:
    """CPU seconds spent not idle (nice'd time left out) on ``cpus`` since boot, from /proc/stat."""
    try:
        text = open("/proc/stat").read()  # noqa: SIM115 - one read
    except OSError:
        return None
    wanted = {f"cpu{c}" for c in cpus}
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total = 0
    found = False
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] in wanted:
            # user nice system idle iowait irq softirq steal ...
            v = [int(x) for x in parts[1:9]]
            total += v[0] + v[2] + v[5] + v[6] + v[7]
            found = True
    return total / ticks if found else None


def _sample(cpus: list[int]) -> tuple[float, float, float | None]:
    """(wall clock, this process's CPU seconds, non-idle CPU seconds of ``cpus``) now."""
    return time.monotonic(), time.process_time(), _busy_seconds(cpus)


def _others_cores(start: tuple[float, float, float], end: tuple[float, float, float]) -> float:
    """Cores other processes kept busy between two samples: all busy time less this process's own."""
    return max(0.0, (end[2] - start[2]) - (end[1] - start[1])) / (end[0] - start[0])


def others_busy_cores() -> float | None:
    """Cores that other processes kept busy on this process's CPUs, averaged since the previous
    call (the first call of a process samples ``MIN_WINDOW`` seconds); None where /proc/stat is
    not available."""
    cpus = allowed_cpus()
    with _lock:
        now = _sample(cpus)
        if now[2] is None:
            return None
        last = _state.get("sample")
        if last is None or last[3] != cpus:
            time.sleep(MIN_WINDOW)
            last = (*now, cpus)
            now = _sample(cpus)
            if now[2] is None:
                return None
        if now[0] - last[0] < MIN_WINDOW:
            return _state.get("others", 0.0)
        others = _others_cores(last, now)
        _state["sample"] = (*now, cpus)
        _state["others"] = others
        return others


class OthersBusy(contextlib.AbstractContextManager):
    """``with OthersBusy() as busy: ...`` -> ``busy.cores``: the cores other processes kept busy on
    this process's CPUs during the block (None where /proc/stat is not available, or for a block
    shorter than ``MIN_WINDOW``). Independent of
    :func:`others_busy_cores`' running sample."""

    cores: float | None = None

    def __enter__(self) -> OthersBusy:
        self._cpus = allowed_cpus()
        self._start = _sample(self._cpus)
        return self

    def __exit__(self, *exc: object) -> None:
        end = _sample(self._cpus)
        if self._start[2] is None or end[2] is None or end[0] - self._start[0] < MIN_WINDOW:
            self.cores = None  # no /proc/stat, or too short to tell from its ticks
            return
        self.cores = _others_cores(self._start, end)


def advised_threads(max_threads: int) -> int:
    """Threads for the next chunk: ``max_threads`` less the cores others keep busy (rounded up from
    :data:`SLACK`), at least 1."""
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off") or getattr(_disabled, "on", False):
        return max_threads
    others = others_busy_cores()
    if others is None:
        return max_threads
    free = len(allowed_cpus()) - max(0, math.ceil(others - SLACK))
    return max(1, min(max_threads, free))


@contextlib.contextmanager
def adaptive_threads_disabled() -> Iterator[None]:
    """Within the block (this thread), :func:`advised_threads` keeps the thread count as it is."""
    old = getattr(_disabled, "on", False)
    _disabled.on = True
    try:
        yield
    finally:
        _disabled.on = old


class threads_for_free_cores(contextlib.AbstractContextManager):  # noqa: N801 - used like a function
    """``with threads_for_free_cores() as adapt: for chunk: adapt(); ...``: each ``adapt()`` sets
    torch's thread count to :func:`advised_threads` (of the count at entry); the count at entry is
    restored on exit."""

    def __enter__(self) -> threads_for_free_cores:
        import torch

        self._torch = torch
        self.max_threads = torch.get_num_threads()
        return self

    def __call__(self) -> int:
        n = advised_threads(self.max_threads)
        if n != self._torch.get_num_threads():
            self._torch.set_num_threads(n)
        return n

    def __exit__(self, *exc: object) -> None:
        if self._torch.get_num_threads() != self.max_threads:
            self._torch.set_num_threads(self.max_threads)


__all__ = ["ENV", "adaptive_threads_disabled", "advised_threads", "allowed_cpus", "others_busy_cores", "threads_for_free_cores"]
