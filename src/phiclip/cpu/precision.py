"""Which compute precision to use on this CPU: measured, not guessed from instruction-set flags.

CPUs differ a lot in how fast they multiply 16-bit floats. With AMX tiles (Intel Sapphire Rapids
and later) bfloat16 matrix products run at several times the float32 rate; with AVX512-BF16 only
(AMD Zen 4) at about 2-2.7x; with AVX512-BF16 but AMX switched off (some virtual machines) at half
the float32 rate. No flag tells these apart reliably, so phiclip measures: a short run of the
tower's own matrix products in float32, bfloat16 and float16 (:data:`MEASURE_SHAPES`, about a
second), cached per CPU model, instruction set and torch version in ``cpu-precision.json`` under
phiclip's cache root (:func:`phiclip.cache.cache_root`: ``$PHICLIP_CACHE``, else
``$XDG_CACHE_HOME/phiclip``, else ``~/.cache/phiclip``).

``precision="auto"`` on the CPU (:func:`decide_cpu_precision`) then takes bfloat16 when its
products measured at least :data:`AUTO_MIN_SPEEDUP` times the float32 rate, else float32. It only
ever picks a precision whose stated error bound (:data:`ERROR_BOUNDS`) is within
:data:`AUTO_MIN_COSINE` of float32: bfloat16 qualifies, float16 (its 5-bit exponent can overflow on
the activations of real checkpoints) and int8 are never chosen by ``auto``; ask for them by name.
``PHICLIP_CPU_PRECISION=float32`` (or ``bfloat16``) fixes auto's choice without measuring.

:func:`describe_precision` is what encoders put in ``describe()`` (and so in a run's manifest):
what was asked, what runs, and why.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from phiclip.atomic import atomic_write_json
from phiclip.cache import cache_root
from phiclip.cpu.threads import OthersBusy

#: Environment variable: fix ``auto``'s CPU choice (``float32`` or ``bfloat16``) without measuring.
AUTO_ENV = "PHICLIP_CPU_PRECISION"
#: The measurements' file in the cache root (the int8 kernel choice, :mod:`phiclip.cpu.int8`, is kept there too).
CACHE_FILE = "cpu-precision.json"
#: Bumped when the measurement changes, so that old cache entries are measured again.
MEASURE_VERSION = 1

#: (rows, in, out) of the matrix products measured: the MLP of the Phi-3-vision tower (ViT-L/14 at
#: 336 px, 2 crops of 577 tokens) both ways, and of CLIP ViT-B/32 (16 images of 50 tokens).
MEASURE_SHAPES: tuple[tuple[int, int, int], ...] = ((1154, 1024, 4096), (1154, 4096, 1024), (800, 768, 3072))

#: ``auto`` takes a 16-bit precision only when its matrix products run at least this many times the
#: float32 rate: the rest of the model (attention softmax, norms, conversions) gains less.
AUTO_MIN_SPEEDUP = 1.25

#: A cached measurement taken while others kept this many cores busy is measured again, by the first
#: process that loads a model at least ``BUSY_REMEASURE_AFTER_S`` seconds later (a machine that stays
#: busy then pays for a measurement at most that often, not on every load).
BUSY_REMEASURE_CORES = 0.5
BUSY_REMEASURE_AFTER_S = 600

#: ``auto`` only takes a precision whose stated bound keeps every vector at least this close to float32.
AUTO_MIN_COSINE = 0.999


@dataclass(frozen=True)
class ErrorBound:
    """How far a precision's output may be from float32's on the same weights and inputs:
    every L2-normalised vector has cosine >= ``min_cosine`` to the float32 one, the mean over
    vectors >= ``mean_cosine``, and no component of a normalised vector differs by more than
    ``max_abs``. Checked on tiny models by ``tests/cpu/test_precision.py`` / ``tests/cpu/test_int8.py``;
    real-size numbers are in BENCHMARKS.md ("CPU precision")."""

    min_cosine: float
    mean_cosine: float
    max_abs: float

    def check(self, ref: Any, out: Any) -> dict[str, float]:
        """Cosine and max abs of ``out`` against ``ref`` ((n, d) arrays, normalised here); raises
        ``AssertionError`` naming the numbers when the bound is not met."""
        import numpy as np

        a = np.asarray(ref, dtype=np.float64)
        b = np.asarray(out, dtype=np.float64)
        a = a / np.linalg.norm(a, axis=-1, keepdims=True)
        b = b / np.linalg.norm(b, axis=-1, keepdims=True)
        cos = (a * b).sum(-1)
        stats = {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()), "max_abs": float(np.abs(a - b).max())}
        ok = stats["min_cosine"] >= self.min_cosine and stats["mean_cosine"] >= self.mean_cosine and stats["max_abs"] <= self.max_abs
        if not ok:
            raise AssertionError(f"outside the bound {self}: {stats}")
        return stats


#: The error each precision is allowed against float32 (see :class:`ErrorBound`).
ERROR_BOUNDS: dict[str, ErrorBound] = {
    "float32": ErrorBound(min_cosine=0.999999, mean_cosine=0.999999, max_abs=1e-4),
    "bfloat16": ErrorBound(min_cosine=0.999, mean_cosine=0.9995, max_abs=0.03),
    "float16": ErrorBound(min_cosine=0.9999, mean_cosine=0.99995, max_abs=0.01),
    "int8": ErrorBound(min_cosine=0.98, mean_cosine=0.99, max_abs=0.1),
}

#: Precisions a user can ask for on the CPU.
PRECISIONS = ("auto", "float32", "bfloat16", "float16", "int8")


# --------------------------------------------------------------------------------------------------
# The CPU at hand
# --------------------------------------------------------------------------------------------------
#: Instruction-set flags (from /proc/cpuinfo) that decide 16-bit and int8 matrix speed.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16",
             "amx_int8", "amx_fp16", "bf16", "i8mm", "asimddp", "sve", "sve2", "sme")


def _cpuinfo_fields() -> dict[str, str]:
    out: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, sep, value = line.partition(":")
            key = key.strip()
            if sep and key not in out:
                out[key] = value.strip()
            if not line.strip() and out:
                break  # the first processor's block is enough
    return out


def cpu_name() -> str:
    """The CPU model as the OS names it (``Intel(R) Xeon(R) Processor``; family/model appended on
    x86, where virtual machines often hide the marketing name)."""
    info = _cpuinfo_fields()
    name = info.get("model name") or info.get("Hardware") or platform.processor() or platform.machine() or "unknown CPU"
    if info.get("cpu family") and info.get("model"):
        name += f" (family {info['cpu family']}, model {info['model']})"
    return name


def cpu_isa_flags() -> list[str]:
    """The flags of :data:`ISA_FLAGS` this CPU reports (x86 ``flags`` or Arm ``Features``)."""
    info = _cpuinfo_fields()
    have = set((info.get("flags") or info.get("Features") or "").split())
    return [f for f in ISA_FLAGS if f in have]


def cpu_key() -> str:
    """The cache key of a measurement: CPU model, instruction sets, torch version."""
    import torch

    return f"{cpu_name()} | {' '.join(cpu_isa_flags())} | torch {torch.__version__} | v{MEASURE_VERSION}"


def read_cache(name: str = CACHE_FILE) -> dict[str, Any]:
    """The entries of the cache file ``name`` in the cache root (``{}`` when absent or unreadable)."""
    try:
        data = json.loads((cache_root() / name).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_cache_json(path: Path, data: Any, **dump_kwargs: Any) -> None:
    """Write ``data`` as JSON to ``path`` in the cache (:func:`phiclip.atomic.atomic_write_json`, not
    fsync'ed: a cache can be computed again). An unwritable folder is ignored: what was to be cached
    is computed again next time."""
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, data, durable=False, **dump_kwargs)


_write_lock = threading.Lock()


def write_cache_entry(key: str, value: dict[str, Any], name: str = CACHE_FILE) -> None:
    """Add ``key: value`` to the cache file ``name`` (read, updated and written under one lock, so that
    this process's threads do not drop each other's entries; :func:`write_cache_json`: an unwritable
    folder is ignored, the measurement then runs again in the next process)."""
    with _write_lock:
        data = read_cache(name)
        data[key] = value
        write_cache_json(cache_root() / name, data, indent=1, sort_keys=True)


# --------------------------------------------------------------------------------------------------
# The measurement
# --------------------------------------------------------------------------------------------------
def measure_matmul_rates(dtypes: tuple[str, ...] = ("float32", "bfloat16", "float16"),
                         shapes: tuple[tuple[int, int, int], ...] = MEASURE_SHAPES, rounds: int = 3) -> dict[str, float]:
    """GFLOP/s of ``F.linear`` in each dtype over ``shapes`` (all shapes once per round, the dtypes
    in turn within a round so that a busy spell hits each alike; each shape's best round counts:
    other processes can only slow a run down). A dtype the CPU cannot multiply gets 0."""
    import torch

    gen = torch.Generator().manual_seed(0)
    operands = [(torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen) * k ** -0.5) for m, k, n in shapes]
    flops = [2.0 * m * k * n for m, k, n in shapes]
    best: dict[str, list[float]] = {dt: [float("inf")] * len(shapes) for dt in dtypes}
    cast = {dt: [(a.to(getattr(torch, dt)), w.to(getattr(torch, dt))) for a, w in operands] for dt in dtypes}
    failed: set[str] = set()
    with torch.inference_mode():
        for r in range(rounds + 1):  # round 0 warms up (oneDNN builds its kernels on first use)
            for dt in dtypes:
                if dt in failed:
                    continue
                for i, (a, w) in enumerate(cast[dt]):
                    t0 = time.perf_counter()
                    try:
                        torch.nn.functional.linear(a, w)
                    except RuntimeError:
                        failed.add(dt)
                        break
                    if r:
                        best[dt][i] = min(best[dt][i], time.perf_counter() - t0)
    return {dt: 0.0 if dt in failed else sum(flops) / sum(best[dt]) / 1e9 for dt in dtypes}


_lock = threading.Lock()
_memo: dict[str, dict[str, Any]] = {}


def cpu_matmul_rates(refresh: bool = False) -> dict[str, Any]:
    """This CPU's measured matrix-product rates, from the cache or measured now (and cached):
    ``{"rates": {dtype: GFLOP/s}, "speedups": {dtype: rate / float32 rate}, "cpu": ..., "flags":
    [...], "torch": ..., "threads": ..., "measured_at": ..., "source": "cache" | "measured"}``."""
    import torch

    key = cpu_key()
    with _lock:
        if not refresh and key in _memo:
            return _memo[key]
        entry = None if refresh else read_cache().get(key)
        if isinstance(entry, dict) and isinstance(entry.get("rates"), dict) and not measured_under_load(entry):
            result = {**entry, "source": "cache"}
        else:
            previous = entry if isinstance(entry, dict) and isinstance(entry.get("rates"), dict) else None
            with OthersBusy() as busy:
                rates = measure_matmul_rates()
            f32 = rates.get("float32") or 1.0
            result = {
                "others_busy_cores": None if busy.cores is None else round(busy.cores, 2),
                "rates": {k: round(v, 1) for k, v in rates.items()},
                "speedups": {k: round(v / f32, 3) for k, v in rates.items()},
                "cpu": cpu_name(), "flags": cpu_isa_flags(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                "shapes": [list(s) for s in MEASURE_SHAPES],
                "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            fresh = result
            result = keep_quieter(previous, fresh)
            write_cache_entry(key, result)
            result = {**result, "source": "measured" if result["rates"] is fresh["rates"] else "cache"}
        _memo[key] = result
        return result


def measured_under_load(entry: dict[str, Any]) -> bool:
    """Whether a cached measurement was taken while other processes kept at least
    :data:`BUSY_REMEASURE_CORES` cores busy: such an entry is measured again by the next process
    (a busy spell can turn a ranking around, e.g. one int8 kernel against another). An entry that
    does not say (written before phiclip recorded the load) counts as taken under load; one whose
    load could not be read (``None``: no /proc/stat) is kept."""
    if "others_busy_cores" not in entry:
        return True
    busy = entry.get("others_busy_cores")
    if not (isinstance(busy, (int, float)) and busy >= BUSY_REMEASURE_CORES):
        return False
    stamp = entry.get("checked_at")
    return not (isinstance(stamp, (int, float)) and time.time() - stamp < BUSY_REMEASURE_AFTER_S)


def keep_quieter(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """Of a cached measurement and a new one of the same thing, the one taken with fewer cores busy
    elsewhere (the new one when the old does not say), stamped ``checked_at`` now."""
    def busy(e: dict[str, Any] | None) -> float:
        v = None if e is None else e.get("others_busy_cores")
        return float(v) if isinstance(v, (int, float)) else float("inf")

    kept = old if old is not None and "others_busy_cores" in old and busy(old) < busy(new) else new
    return {**kept, "checked_at": time.time()}


def clear_memo() -> None:
    """Forget in-process measurements (the cache file stays); for tests."""
    with _lock:
        _memo.clear()


# --------------------------------------------------------------------------------------------------
# Decisions
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PrecisionDecision:
    """What runs for a requested precision, and why (JSON-able through :meth:`to_dict`)."""

    requested: str
    dtype: str  # float32 | bfloat16 | float16 | int8
    reason: str
    speedups: dict[str, float] = field(default_factory=dict)
    cpu: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _speedup_text(speedups: dict[str, float], dtype: str) -> str:
    s = speedups.get(dtype)
    return "not measured" if s is None else f"{s:.2f}x the float32 rate"


def decide_cpu_precision(requested: str = "auto") -> PrecisionDecision:
    """The precision the CPU runs for ``requested`` (``auto``, ``float32``, ``bfloat16``,
    ``float16``, ``int8``), with the reason. Only ``auto`` may change what runs: to bfloat16 when
    this CPU's bfloat16 products measured >= :data:`AUTO_MIN_SPEEDUP` x float32 (and its error
    bound is within :data:`AUTO_MIN_COSINE`), else float32. Explicit requests are kept; the reason
    then says how fast they measured (see :func:`slow_precision_reason`)."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision {requested!r} is not one of {', '.join(PRECISIONS)}")
    forced = os.environ.get(AUTO_ENV, "").strip().lower()
    if requested == "auto" and forced:
        if forced not in ("float32", "bfloat16"):
            raise ValueError(f"{AUTO_ENV}={forced!r}: auto can be fixed to float32 or bfloat16")
        return PrecisionDecision("auto", forced, f"auto fixed to {forced} by {AUTO_ENV}", {}, cpu_name())
    if requested == "float32":
        return PrecisionDecision(requested, "float32", "float32 asked for (exact)", {}, cpu_name())
    info = cpu_matmul_rates()
    sp = {k: float(v) for k, v in info["speedups"].items()}
    if requested != "auto":
        if requested == "int8":
            reason = "int8 asked for: int8 weights per output channel, activations quantised per call (phiclip.cpu.int8)"
        else:
            reason = f"{requested} asked for; its matrix products measured at {_speedup_text(sp, requested)} on this CPU"
        return PrecisionDecision(requested, requested, reason, sp, info["cpu"])
    bf16 = sp.get("bfloat16", 0.0)
    within = ERROR_BOUNDS["bfloat16"].min_cosine >= AUTO_MIN_COSINE
    if bf16 >= AUTO_MIN_SPEEDUP and within:
        reason = (f"auto: bfloat16 matrix products measured at {bf16:.2f}x the float32 rate on this CPU "
                  f"(>= {AUTO_MIN_SPEEDUP}x), and bfloat16 stays within cosine {ERROR_BOUNDS['bfloat16'].min_cosine} of float32")
        return PrecisionDecision("auto", "bfloat16", reason, sp, info["cpu"])
    reason = (f"auto: float32 (exact); bfloat16 matrix products measured at {bf16:.2f}x the float32 rate on this CPU "
              f"(< {AUTO_MIN_SPEEDUP}x)")
    return PrecisionDecision("auto", "float32", reason, sp, info["cpu"])


def slow_precision_reason(dtype: str) -> str | None:
    """Why a 16-bit ``dtype`` asked for on the CPU would be slower than float32 here, from the
    measurement (None when it measured at >= 0.9x float32, or for other dtypes)."""
    if dtype not in ("bfloat16", "float16"):
        return None
    info = cpu_matmul_rates()
    s = float(info["speedups"].get(dtype, 1.0))
    if s >= 0.9:
        return None
    return (f"{dtype} matrix products measured at {s:.2f}x the float32 rate on this CPU ({info['cpu']}); "
            "float32 is faster here and exact (precision auto picks the faster one)")


def describe_precision(decision: PrecisionDecision) -> dict[str, Any]:
    """The entry encoders put under ``"precision"`` in ``describe()``: requested, chosen, reason,
    and the measured speedups it rests on."""
    return {"requested": decision.requested, "dtype": decision.dtype, "reason": decision.reason,
            "measured_speedups": dict(decision.speedups), "cpu": decision.cpu}


__all__ = ["AUTO_ENV", "AUTO_MIN_COSINE", "AUTO_MIN_SPEEDUP", "CACHE_FILE", "ERROR_BOUNDS", "ErrorBound", "MEASURE_SHAPES",
           "PRECISIONS", "PrecisionDecision", "cpu_isa_flags", "cpu_key", "cpu_matmul_rates", "cpu_name",
           "decide_cpu_precision", "describe_precision", "keep_quieter", "measure_matmul_rates", "measured_under_load",
           "read_cache", "slow_precision_reason", "write_cache_entry", "write_cache_json"]
