"""Where an encoder runs and in which precision: decided once, by :func:`resolve_placement`, for
``load_encoder``, the bulk pipeline and ``compare`` alike.

torch is imported by the functions that need it, on purpose: importing the encoders package stays
light for the command line.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from phiclip.cpu.precision import (
    PrecisionDecision,
    decide_cpu_precision,
    describe_precision,
    slow_precision_reason,
)

#: Precision names accepted besides ``auto`` (short forms included).
PRECISION_NAMES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16", "int8")
_CANONICAL = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class Placement:
    """A resolved device and compute precision, and the precision as it was asked for.

    ``device``: a ``torch.device``. ``dtype``: the compute ``torch.dtype`` (``torch.int8``: the
    image tower's products are quantised). ``requested``: ``auto``, ``float32``... as given.
    """

    device: Any
    dtype: Any
    requested: str = "auto"

    @property
    def precision(self) -> str:
        """The compute precision's name: ``float32``, ``bfloat16``, ``float16`` or ``int8``."""
        return str(self.dtype).replace("torch.", "")

    def record(self) -> dict[str, Any]:
        """What encoders record as their ``precision`` (:func:`precision_record`)."""
        return precision_record(self.device, self.requested)


def resolve_placement(device: str = "auto", precision: str = "auto") -> Placement:
    """Turn a device request and a precision request into what runs.

    ``device``: ``auto`` (CUDA when present, else the CPU), ``cpu``, ``cuda``, ``cuda:1``, ``mps``...
    ``precision``: ``auto`` -> bfloat16 on CUDA, on the CPU the faster of float32 and bfloat16
    (measured: :func:`phiclip.cpu.precision.decide_cpu_precision`), float32 elsewhere; ``float32``,
    ``bfloat16``, ``float16`` (or ``fp32``, ``bf16``, ``fp16``); ``int8`` (CPU only) -> ``torch.int8``.

    Raises:
        ValueError: an unknown precision, int8 off the CPU, or CUDA asked for on a machine without it.
    """
    import torch

    requested = str(precision)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if requested == "auto":
        if dev.type == "cpu":
            dt = getattr(torch, decide_cpu_precision("auto").dtype)
        else:
            dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    else:
        if requested not in PRECISION_NAMES:
            raise ValueError(f"dtype {requested!r} is not one of auto, {', '.join(PRECISION_NAMES)}")
        dt = getattr(torch, _CANONICAL.get(requested, requested))
        if dt == torch.int8 and dev.type != "cpu":
            raise ValueError(f"precision int8 runs on the CPU only (device {device!r}); on a GPU use bfloat16")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asks for CUDA, which this machine does not have (or torch was built "
                         "without it); use device='cpu' or 'auto'")
    return Placement(dev, dt, requested)


def resolve_device_dtype(device: str = "auto", dtype: str = "auto") -> tuple[Any, Any]:
    """``(torch.device, torch.dtype)`` of :func:`resolve_placement` (for callers that need only the pair)."""
    placement = resolve_placement(device, dtype)
    return placement.device, placement.dtype


def precision_record(device: Any, requested: str) -> dict[str, Any]:
    """What an encoder records under ``describe()["precision"]`` (and so in a run's manifest):
    the precision asked for, the one that runs, and why (for ``auto`` on the CPU: the measured
    speedup it rests on)."""
    import torch

    requested = _CANONICAL.get(str(requested), str(requested))
    dev = torch.device(device)
    if dev.type == "cpu":
        return describe_precision(decide_cpu_precision(requested))
    chosen = resolve_placement(str(device), requested).precision
    return describe_precision(PrecisionDecision(requested, chosen, f"{requested} on {dev.type}: {chosen}"))


def slow_cpu_dtype_reason(device: Any, dtype: Any) -> str | None:
    """Why ``dtype`` would be slower than float32 on this CPU, or None: from a short measurement of
    this CPU's matrix products in each precision (:func:`phiclip.cpu.precision.cpu_matmul_rates`,
    cached per CPU model and torch version), not from instruction-set flags: bfloat16 runs at
    0.5x float32 on one AVX512-BF16 CPU without AMX and at 2x on another."""
    import torch

    if torch.device(device).type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return None
    return slow_precision_reason(str(dtype).replace("torch.", ""))


def warn_if_slow_cpu_dtype(device: Any, dtype: Any) -> None:
    """A ``UserWarning`` with :func:`slow_cpu_dtype_reason`, when there is one."""
    reason = slow_cpu_dtype_reason(device, dtype)
    if reason is not None:
        warnings.warn(reason, UserWarning, stacklevel=3)


__all__ = [
    "PRECISION_NAMES",
    "Placement",
    "precision_record",
    "resolve_device_dtype",
    "resolve_placement",
    "slow_cpu_dtype_reason",
    "warn_if_slow_cpu_dtype",
]
