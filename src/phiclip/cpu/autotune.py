"""``runtime=auto``: run a tower the way that measured fastest on this CPU, within its precision's bound.

A tower (an encoder's image side, its text side, the Phi-3-vision tower) can run in torch (phiclip's
own CPU path: fused bfloat16, int8, 16-bit weights) or compiled by OpenVINO or ONNX Runtime
(:mod:`phiclip.cpu.runtimes`). Which is faster depends on the CPU, the model's size, the precision
and the input's shape: on a 2-core Xeon with AMX OpenVINO's bfloat16 text tower ran 1.7x torch's,
while on an AMD EPYC (Zen 4) phiclip's fused bfloat16 image tower and OpenVINO's ran within 2% of
each other (BENCHMARKS.md). So ``auto`` measures instead of guessing (:func:`fastest`):

1. every way is built (a compiled runtime is converted once and cached on disk) and run on the same
   example inputs; a way whose output leaves the precision's stated bound
   (:data:`phiclip.cpu.precision.ERROR_BOUNDS`) of the float32 reference is passed over;
2. the ways are timed in rotating order (:data:`ROUNDS` rounds after a warm-up call, the median
   kept); a compiled runtime is taken only when it beat torch by :data:`COMPILED_MARGIN` (it holds a
   second copy of the weights);
3. the decision is cached in ``runtime-choices.json`` under phiclip's cache root, keyed by the
   weights' fingerprint, the part, the precision, the inputs' shape, the installed runtimes'
   versions and this CPU (:func:`phiclip.cpu.precision.cpu_key`): a later load builds only the way
   chosen (a compiled one read back from the conversion cache), so it pays no conversion and no
   measurement.

What ``auto`` chose and the times it measured go into the encoder's ``describe()["precision"]``
(and so into a run's manifest). ``PHICLIP_RUNTIME`` (:data:`RUNTIME_ENV`) sets the runtime of a spec
that names none (``torch`` to keep every tower on torch without editing specs). Torch is imported
only when a tower is measured.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from phiclip.cpu.precision import ERROR_BOUNDS, cpu_key, cpu_name, read_cache, write_cache_entry

#: Environment variable: the runtime of a spec that names none (default ``auto``).
RUNTIME_ENV = "PHICLIP_RUNTIME"
#: What ``runtime=`` accepts (the same as :data:`phiclip.cpu.runtimes.RUNTIMES`, without importing torch).
RUNTIME_NAMES = ("torch", "auto", "openvino", "onnxruntime")
#: The file of ``auto``'s decisions in phiclip's cache root.
CHOICES_FILE = "runtime-choices.json"
#: Bumped when the measurement changes, so that old decisions are measured again.
TUNE_VERSION = 1
#: Timed rounds per way (after one warm-up call each); the median is kept.
ROUNDS = 3
#: A compiled runtime is chosen over torch only when at least this many times faster.
COMPILED_MARGIN = 1.03


def default_runtime() -> str:
    """The runtime of a spec that names none: ``$PHICLIP_RUNTIME`` when set, else ``auto``.

    Raises:
        ValueError: ``PHICLIP_RUNTIME`` is set to something else than a runtime.
    """
    value = os.environ.get(RUNTIME_ENV, "").strip()
    if not value:
        return "auto"
    if value not in RUNTIME_NAMES:
        raise ValueError(f"{RUNTIME_ENV}={value!r} must be one of {', '.join(RUNTIME_NAMES)} (or unset: auto)")
    return value


@dataclass(frozen=True)
class Way:
    """One way to run a tower: its name (``torch``, ``openvino``, ``onnxruntime``) and how to build
    it (a callable taking the tower's inputs, giving float features). ``build`` may raise
    ``ValueError`` (a conversion that failed): that way is then passed over, saying why."""

    name: str
    build: Callable[[], Callable[..., Any]]


@dataclass
class Tuned:
    """The way chosen, built, and the record of the choice (``describe()``'s ``auto``)."""

    name: str
    run: Callable[..., Any]
    record: dict[str, Any]

    def reason(self, precision: str) -> str:
        """Why this way runs, for the precision record: each way's time, and whether it was measured now."""
        how = "read back from this CPU's earlier measurement" if self.record.get("from_cache") else "measured now"
        times = ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in self.record.get("seconds", {}).items())
        return f"auto: {self.name} measured fastest on this CPU at {precision} ({times}; {how})"


def choice_key(fields: dict[str, Any]) -> str:
    """The cache key of one decision: ``fields`` (weights, part, precision, shape, versions) and this CPU."""
    text = json.dumps([TUNE_VERSION, cpu_key(), fields], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _installed_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("openvino", "onnxruntime", "nncf"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return out


def fastest(ways: Sequence[Way], inputs: Sequence[Any], *, precision: str, reference: Callable[[], Any] | None,
            key_fields: dict[str, Any], rounds: int = ROUNDS) -> Tuned:
    """Build ``ways``, keep those within ``precision``'s bound of ``reference()`` (the float32 output on
    ``inputs``, computed before any way is built; None: not checked), time them on ``inputs`` and
    return the fastest (see the module's docstring), or the way cached for the same ``key_fields`` on
    this CPU (then nothing else is built or run).

    ``ways`` are built in order: put torch last where building it changes the model in place (the
    compiled runtimes convert the float32 weights first). Each way's callable sets its own autocast.

    Raises:
        ValueError: no way could be built within the bound (the last one, torch, re-raises its own error).
    """
    import torch

    fields = {**key_fields, "precision": precision, "shape": [list(getattr(x, "shape", ())) for x in inputs],
              "runtimes": _installed_versions()}
    key = choice_key(fields)
    names = [w.name for w in ways]
    cached = read_cache(CHOICES_FILE).get(key)
    if isinstance(cached, dict) and cached.get("chosen") in names:
        way = ways[names.index(cached["chosen"])]
        try:
            return Tuned(way.name, way.build(), {**cached, "from_cache": True})
        except ValueError:
            pass  # a cached conversion that no longer builds: measure again
    if reference is not None:
        with torch.inference_mode():
            expected = np.asarray(reference(), dtype=np.float32)
    built: dict[str, Callable[..., Any]] = {}
    passed_over: dict[str, str] = {}
    closeness: dict[str, dict[str, float]] = {}
    for way in ways:
        try:
            run = way.build()
        except ValueError as e:
            if way is ways[-1] and not built:
                raise
            passed_over[way.name] = str(e)
            continue
        with torch.inference_mode():
            out = run(*inputs)
        if reference is not None:
            try:
                closeness[way.name] = ERROR_BOUNDS[precision].check(expected, out.float().cpu().numpy())
            except AssertionError as e:
                passed_over[way.name] = f"outside the {precision} bound of float32 ({e})"
                continue
        built[way.name] = run
    if not built:
        raise ValueError(f"no way to run this at {precision} stayed within its bound: {passed_over}")
    times: dict[str, list[float]] = {name: [] for name in built}
    order = list(built)
    with torch.inference_mode():
        for name in order:  # warm-up
            built[name](*inputs)
        for r in range(rounds):
            for name in order[r % len(order):] + order[: r % len(order)]:
                start = time.perf_counter()
                built[name](*inputs)
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    chosen = min(median, key=median.__getitem__)
    if chosen != "torch" and "torch" in median and median["torch"] < COMPILED_MARGIN * median[chosen]:
        chosen = "torch"
    record = {"chosen": chosen, "seconds": {k: round(v, 6) for k, v in median.items()}, "passed_over": passed_over,
              "closeness": closeness, "measured_on": fields["shape"], "cpu": cpu_name(),
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "from_cache": False}
    write_cache_entry(key, {k: v for k, v in record.items() if k != "from_cache"}, name=CHOICES_FILE)
    return Tuned(chosen, built[chosen], record)


__all__ = ["CHOICES_FILE", "COMPILED_MARGIN", "ROUNDS", "RUNTIME_ENV", "RUNTIME_NAMES", "TUNE_VERSION", "Tuned", "Way",
           "choice_key", "default_runtime", "fastest"]
