"""The calling thread's signal alternate stack, kept as it was across a call into OpenVINO.

OpenVINO's CPU plugin (``ov::intel_cpu::SigAltStackSetup``, made with each plugin instance, i.e. with
each ``openvino.Core`` that loads ``"CPU"``, NNCF's included) maps a new alternate signal stack for the
thread that loads it (room for AMX's larger signal frames), installs it with ``sigaltstack`` and keeps
the one it replaced; when the plugin is destroyed it puts the kept one back only if its own is still
the current one, and unmaps its own either way. Two plugins destroyed in the order they were made
(the first ``Core`` collected first) leave the thread's alternate stack pointing at unmapped memory:

* plugin A installs stack A (keeps P); plugin B installs stack B (keeps A);
* A is destroyed: B is current, so nothing is put back; A is unmapped;
* B is destroyed: B is current, so the kept one is put back: A, unmapped.

CPython installs every signal handler with ``SA_ONSTACK`` (its SIGINT handler at start-up, anything
``signal.signal`` sets, faulthandler's, pytest-timeout's SIGALRM, the SIGCHLD handler a process pool
sets): the next such signal delivered to that thread finds no stack to run on, and the kernel kills the
process with SIGSEGV (``si_code`` SI_KERNEL), before faulthandler can print anything (its handler runs
on the same stack). In the test suite that was a SIGCHLD arriving while ``subprocess.run`` waited, long
after the OpenVINO tests, at whatever line the main thread was on: it looked like heap corruption.

:func:`keeping_signal_stack` puts the thread's alternate stack back as it was before the block, so the
stack a plugin installs is never current after the block, and its destructor, finding it not current,
only unmaps it. Where the kernel refuses the old stack (too small for signal frames the block enabled,
e.g. AMX state), a stack of phiclip's own, as large as the plugin's, is installed instead and never
freed. Linux only: elsewhere (no such plugin code) it does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

#: ``ss_flags`` bits (linux/signal.h).
SS_ONSTACK = 1
SS_DISABLE = 2

#: Smallest stack of phiclip's own (bytes) installed where the kernel refuses the one the block replaced.
OWN_STACK_MIN = 64 * 1024


class _StackT(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


@dataclass(frozen=True)
class SignalStack:
    """One thread's alternate signal stack: its address, ``ss_flags`` and size (``SS_DISABLE``: none)."""

    address: int
    flags: int
    size: int

    @property
    def disabled(self) -> bool:
        return bool(self.flags & SS_DISABLE)

    def same_as(self, other: SignalStack) -> bool:
        """The same stack in effect (two disabled stacks are the same whatever their address)."""
        if self.disabled or other.disabled:
            return self.disabled == other.disabled
        return (self.address, self.size) == (other.address, other.size)


def _libc_sigaltstack() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sigaltstack
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.POINTER(_StackT), ctypes.POINTER(_StackT))
    fn.restype = ctypes.c_int
    return fn


#: ``sigaltstack(2)`` (None off Linux); tests replace it to play a kernel that refuses a stack.
_sigaltstack = _libc_sigaltstack()
#: Stacks of phiclip's own: installed on some thread, so never freed.
_own_stacks: list[mmap.mmap] = []
_own_lock = threading.Lock()


def current_signal_stack() -> SignalStack | None:
    """The calling thread's alternate signal stack; None where it cannot be read (not Linux)."""
    if _sigaltstack is None:
        return None
    now = _StackT()
    if _sigaltstack(None, ctypes.pointer(now)) != 0:
        return None
    return SignalStack(int(now.ss_sp or 0), int(now.ss_flags), int(now.ss_size))


def _install(stack: SignalStack) -> int:
    """Make ``stack`` the calling thread's alternate stack: 0, or the errno the kernel answered."""
    assert _sigaltstack is not None
    new = _StackT(ctypes.c_void_p(stack.address or None), stack.flags & ~SS_ONSTACK, stack.size)
    if _sigaltstack(ctypes.pointer(new), None) == 0:
        return 0
    return ctypes.get_errno() or errno.EINVAL


def _own_stack(size: int) -> SignalStack:
    size = max(OWN_STACK_MIN, -(-size // mmap.PAGESIZE) * mmap.PAGESIZE)
    block = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with _own_lock:
        _own_stacks.append(block)
    return SignalStack(ctypes.addressof(ctypes.c_char.from_buffer(block)), 0, size)


def restore_signal_stack(before: SignalStack) -> SignalStack | None:
    """Make ``before`` the calling thread's alternate stack again if something replaced it; where the
    kernel refuses it (too small for the signal frames now enabled), install a stack of phiclip's own, at
    least as large as the current one. Returns the stack installed (None: nothing to do or possible)."""
    now = current_signal_stack()
    if now is None or now.same_as(before):
        return None
    if _install(before) == 0:
        return before
    own = _own_stack(max(now.size, before.size) * 2)
    return own if _install(own) == 0 else None


@contextlib.contextmanager
def keeping_signal_stack() -> Iterator[None]:
    """Run the block, then put the calling thread's alternate signal stack back as it was before it
    (see the module's docstring: OpenVINO's CPU plugin replaces it and can leave it unmapped)."""
    before = current_signal_stack()
    try:
        yield
    finally:
        if before is not None:
            restore_signal_stack(before)


__all__ = ["OWN_STACK_MIN", "SS_DISABLE", "SignalStack", "current_signal_stack", "keeping_signal_stack",
           "restore_signal_stack"]
