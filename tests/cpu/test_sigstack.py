"""phiclip.cpu.sigstack: a thread's signal alternate stack put back after a block that replaced it (OpenVINO's
CPU plugin does, and could leave it unmapped: the next Python-handled signal then killed the process)."""

from __future__ import annotations

import ctypes
import errno
import mmap
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

import phiclip.cpu.sigstack as S

linux_only = pytest.mark.skipif(S.current_signal_stack() is None, reason="sigaltstack is read on Linux only")


def _stack(size: int = 32 * 1024) -> tuple[mmap.mmap, S.SignalStack]:
    block = mmap.mmap(-1, size)
    return block, S.SignalStack(ctypes.addressof(ctypes.c_char.from_buffer(block)), 0, size)


def _in_a_thread(fn) -> None:
    """Run ``fn`` in a thread of its own (the main thread keeps faulthandler's stack) and re-raise what it raised."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test's thread
            errors.append(e)
        finally:
            S._install(S.SignalStack(0, S.SS_DISABLE, 0))  # the test's stacks are freed after the thread ends

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if errors:
        raise errors[0]


@linux_only
def test_the_stack_replaced_in_the_block_is_put_back() -> None:
    _block, before = _stack()
    _block2, other = _stack()

    def check() -> None:
        assert S.current_signal_stack().disabled  # a new thread has none
        assert S._install(before) == 0
        with S.keeping_signal_stack():
            assert S._install(other) == 0
            assert S.current_signal_stack().same_as(other)
        assert S.current_signal_stack().same_as(before)
        assert S.restore_signal_stack(before) is None  # nothing to do

    _in_a_thread(check)
    disabled = S.SignalStack(0, S.SS_DISABLE, 0)

    def from_none() -> None:
        with S.keeping_signal_stack():
            S._install(other)
        assert S.current_signal_stack().same_as(disabled)

    _in_a_thread(from_none)


@linux_only
def test_a_stack_the_kernel_refuses_is_replaced_by_one_of_our_own(monkeypatch) -> None:
    _block, small = _stack(16 * 1024)
    _block2, big = _stack(48 * 1024)
    real = S._sigaltstack

    def kernel_with_larger_frames(new, old):
        """Refuses stacks under 32 KiB, as Linux does once a process may use larger signal frames (AMX)."""
        if new and not new.contents.ss_flags & S.SS_DISABLE and new.contents.ss_size < 32 * 1024:
            ctypes.set_errno(errno.ENOMEM)
            return -1
        return real(new, old)

    def check() -> None:
        assert S._install(small) == 0
        monkeypatch.setattr(S, "_sigaltstack", kernel_with_larger_frames)
        with S.keeping_signal_stack():
            assert S._install(big) == 0
        now = S.current_signal_stack()
        assert not now.disabled and not now.same_as(small) and not now.same_as(big)
        assert now.size >= max(S.OWN_STACK_MIN, 2 * big.size)
        assert any(ctypes.addressof(ctypes.c_char.from_buffer(b)) == now.address for b in S._own_stacks)

    _in_a_thread(check)


#: Two OpenVINO CPU paths loaded, then destroyed in the order they were made, then a signal handled by Python.
_PLUGINS_DESTROYED_IN_CREATION_ORDER = textwrap.dedent("""
    import gc, os, signal, sys
    from pathlib import Path

    import numpy as np
    import openvino as ov
    import openvino.opset13 as ops

    from phiclip.cpu.runtimes import CompiledPath
    from phiclip.cpu.sigstack import current_signal_stack

    folder = Path(sys.argv[1])
    x = ops.parameter([-1, 4], np.float32, name="x")
    ov.save_model(ov.Model([ops.relu(x)], [x], "tiny"), str(folder / "model.xml"))
    handled = []
    signal.signal(signal.SIGUSR1, lambda *_: handled.append(True))  # CPython: SA_ONSTACK
    before = current_signal_stack()
    first = CompiledPath("openvino", "float32", folder / "model.xml", 1, converted=False)
    print("kept after a load:", current_signal_stack().same_as(before), flush=True)
    second = CompiledPath("openvino", "float32", folder / "model.xml", 1, converted=False)
    del first
    gc.collect()
    del second
    gc.collect()
    print("kept after both were dropped:", current_signal_stack().same_as(before), flush=True)
    os.kill(os.getpid(), signal.SIGUSR1)
    print("signal handled:", bool(handled), flush=True)
""")


@pytest.mark.compiled_runtime
def test_openvino_paths_dropped_in_creation_order_leave_signals_working(tmp_path: Path) -> None:
    pytest.importorskip("openvino", reason="OpenVINO is not installed (phiclip[cpu-runtimes])")
    if S.current_signal_stack() is None:
        pytest.skip("sigaltstack is read on Linux only")
    run = subprocess.run([sys.executable, "-X", "faulthandler", "-c", _PLUGINS_DESTROYED_IN_CREATION_ORDER,
                          str(tmp_path)], capture_output=True, text=True, timeout=300)
    # Before phiclip kept the stack: "kept after a load: False", then SIGSEGV (return code -11) at the signal.
    assert run.returncode == 0, (run.returncode, run.stdout, run.stderr[-2000:])
    assert run.stdout.splitlines() == ["kept after a load: True", "kept after both were dropped: True",
                                       "signal handled: True"]
