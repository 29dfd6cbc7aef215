"""What every fine-tuning loop shares: the learning-rate schedule, the data order, checkpoints that
resume exactly, metrics to JSONL (and TensorBoard), the progress bar.

Exact resume. A run is a pure function of its settings and seed: the data order of epoch ``e`` is a
permutation drawn from ``(seed, e)``, the micro-batch ``m`` takes positions ``[m*b, (m+1)*b)`` of
the endless concatenation of those permutations, and the learning rate of step ``s`` is
:func:`lr_at`. A checkpoint holds what is not a function of the settings: the trainable tensors,
the optimizer's moments, the step, and the random generators (Python, NumPy, torch CPU and CUDA,
for dropout). Restoring them and continuing gives the loss curve of an uninterrupted run.

Everything is written without pickle: tensors in safetensors files, the rest in JSON. A
checkpoint folder is written through :func:`phiclip.atomic.atomic_directory`, so it exists whole or
not at all. The loop that uses all this is :mod:`phiclip.finetune.loop`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from phiclip.atomic import atomic_directory, atomic_write_text
from phiclip.encoders.spec import EncoderSpec
from phiclip.manifest import differences

CHECKPOINTS_DIR = "checkpoints"
METRICS_JSONL = "metrics.jsonl"
METRICS_JSON = "metrics.json"
_CKPT_PREFIX = "step-"


class TrainingError(ValueError):
    """A fine-tuning run cannot start or continue as asked; the message names the fix."""


# --- schedule ------------------------------------------------------------------------------------
def lr_at(step: int, *, base_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """The learning rate of optimizer step ``step`` (0-based): linear warmup over ``warmup_steps``
    (from ``base_lr / warmup_steps`` up to ``base_lr``), then cosine decay to ``min_lr_ratio * base_lr``
    at ``total_steps``.

    >>> [round(lr_at(s, base_lr=1.0, warmup_steps=2, total_steps=6), 3) for s in range(6)]
    [0.5, 1.0, 1.0, 0.854, 0.5, 0.146]
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    floor = base_lr * min_lr_ratio
    return floor + (base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def resolve_warmup(warmup: float, total_steps: int) -> int:
    """Warmup steps from ``warmup``: a fraction of the run when below 1, else a step count."""
    if warmup < 0:
        raise TrainingError(f"warmup must be >= 0 (a fraction below 1 or a number of steps), got {warmup}")
    steps = int(round(warmup * total_steps)) if warmup < 1 else int(warmup)
    return min(steps, total_steps)


def resolve_total_steps(steps: int | None, epochs: float | None, num_items: int, items_per_step: int) -> int:
    """Optimizer steps of a run: ``steps`` if given, else ``ceil(epochs * items / items_per_step)``."""
    if steps is not None and epochs is not None:
        raise TrainingError("give --steps or --epochs, not both")
    if steps is not None:
        if steps < 1:
            raise TrainingError(f"--steps must be at least 1, got {steps}")
        return int(steps)
    epochs = 1.0 if epochs is None else float(epochs)
    if epochs <= 0:
        raise TrainingError(f"--epochs must be positive, got {epochs}")
    return max(1, math.ceil(epochs * num_items / items_per_step))


# --- data order ----------------------------------------------------------------------------------
def epoch_order(num_items: int, seed: int, epoch: int) -> np.ndarray:
    """(num_items,) the order of epoch ``epoch``: a permutation drawn from ``(seed, epoch)``."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(num_items)


def batch_positions(num_items: int, seed: int, start: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Items at stream positions ``[start, start + size)`` of the endless sequence of epoch orders,
    and the epoch of each. A batch may straddle two epochs."""
    if num_items < 1:
        raise TrainingError("no training items")
    items, epochs = [], []
    pos = start
    while pos < start + size:
        epoch, offset = divmod(pos, num_items)
        take = min(num_items - offset, start + size - pos)
        items.append(epoch_order(num_items, seed, epoch)[offset : offset + take])
        epochs.append(np.full(take, epoch))
        pos += take
    return np.concatenate(items), np.concatenate(epochs)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (CPU and every CUDA device)."""
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# --- random generator states -------------------------------------------------------------------
def rng_state() -> tuple[dict[str, Any], dict[str, Any]]:
    """``(tensors, json)``: every generator's state, split into tensors and JSON values."""
    import torch

    tensors: dict[str, Any] = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).view(np.int32).copy())
    version, pystate, gauss = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(cached)], "python": [version, list(pystate), gauss]}
    return tensors, meta


def set_rng_state(tensors: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    import torch

    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda_")), key=lambda k: int(k[5:]))]
        if states and len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    kind, pos, has_gauss, cached = meta["numpy"]
    keys = tensors["numpy_keys"].numpy().view(np.uint32)
    np.random.set_state((kind, keys, pos, has_gauss, cached))
    version, pystate, gauss = meta["python"]
    random.setstate((version, tuple(pystate), gauss))


# --- optimizer state without pickle -----------------------------------------------------------
def optimizer_state(optimizer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(tensors, json)`` of ``optimizer.state_dict()``: per-parameter tensors by
    ``state.<index>.<name>``, the param groups and scalar state in JSON."""
    import torch

    sd = optimizer.state_dict()
    tensors: dict[str, Any] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for name, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(optimizer: Any, tensors: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
    """Restore what :func:`optimizer_state` returned into ``optimizer``."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for idx, values in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# --- checkpoints -----------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    """A loaded checkpoint: ``step``, the trainable tensors by parameter name, the optimizer and
    generator states, and ``state`` (the JSON: run identity, position, metrics so far)."""

    path: Path
    step: int
    weights: dict[str, Any]
    optimizer: tuple[dict[str, Any], dict[str, Any]]
    rng: tuple[dict[str, Any], dict[str, Any]]
    state: dict[str, Any]


def checkpoint_dirs(output: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(output) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_CKPT_PREFIX) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(_CKPT_PREFIX):]))


def save_checkpoint(
    output: Path,
    step: int,
    model: Any,
    optimizer: Any,
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write ``OUT/checkpoints/step-NNNNNNN/`` (trainable tensors, optimizer, generators, state.json)
    atomically, then delete all but the newest ``keep`` checkpoints (``keep <= 0`` keeps all)."""
    from safetensors.torch import save_file

    root = Path(output) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_CKPT_PREFIX}{step:07d}"
    with atomic_directory(final) as tmp:
        weights = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(weights, str(tmp / "trainable.safetensors"))
        opt_tensors, opt_meta = optimizer_state(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        rng_tensors, rng_meta = rng_state()
        save_file({k: v.contiguous() for k, v in rng_tensors.items()}, str(tmp / "rng.safetensors"))
        payload = {"step": step, "optimizer": opt_meta, "rng": rng_meta, **state}
        (tmp / "state.json").write_text(json.dumps(payload), encoding="utf-8")
    if keep > 0:
        for old in checkpoint_dirs(output)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint folder written by :func:`save_checkpoint`."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        weights = load_file(str(path / "trainable.safetensors"))
        opt_tensors = load_file(str(path / "optimizer.safetensors"))
        rng_tensors = load_file(str(path / "rng.safetensors"))
    except (OSError, ValueError) as e:
        raise TrainingError(f"{path}: the checkpoint cannot be read ({e}); delete it to resume from an earlier one") from None
    return Checkpoint(
        path=path,
        step=int(state["step"]),
        weights=weights,
        optimizer=(opt_tensors, state.pop("optimizer")),
        rng=(rng_tensors, state.pop("rng")),
        state=state,
    )


def restore_trainable(model: Any, weights: Mapping[str, Any], where: Path) -> None:
    """Copy a checkpoint's tensors into the model's trainable parameters (same names, same shapes)."""
    import torch

    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(weights):
        missing = sorted(set(params) - set(weights))[:3]
        extra = sorted(set(weights) - set(params))[:3]
        raise TrainingError(
            f"{where}: the checkpoint's trainable tensors do not match this run's (missing {missing}, unexpected {extra}); "
            "resume with the options of the interrupted run"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name].to(p.device))


def options_identity(options: Any, exclude: frozenset[str]) -> dict[str, Any]:
    """A training options dataclass as JSON-able settings, without ``exclude`` (settings that do not
    change the loss curve, such as progress bars and checkpoint cadence): what a resume must match."""
    d = dataclasses.asdict(options)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items() if k not in exclude}


def prepare_output(output: Path, resume: bool, identity: dict[str, Any]) -> Checkpoint | None:
    """Check the output folder against the run and return the checkpoint to resume from (or None).

    A folder holding another run's files is refused unless ``resume``; resuming refuses a checkpoint
    of a run with different settings, naming them.
    """
    output = Path(output)
    ckpts = checkpoint_dirs(output)
    if not resume:
        taken = [n for n in (METRICS_JSONL, METRICS_JSON, CHECKPOINTS_DIR, "config.json") if (output / n).exists()]
        if taken:
            raise TrainingError(
                f"{output}: already holds a run ({', '.join(taken)}); pass --resume to continue it, "
                "or choose another --output"
            )
        return None
    if not ckpts:
        if (output / METRICS_JSON).is_file():
            raise TrainingError(f"{output}: the run is already complete (metrics.json); choose another --output")
        return None  # nothing to resume yet: a fresh start
    ckpt = load_checkpoint(ckpts[-1])
    diff = differences(ckpt.state.get("identity", {}), identity, form="{key}: {old!r} -> {new!r}")
    if diff:
        raise TrainingError(
            f"{ckpts[-1]}: was written by a run with other settings ({'; '.join(diff)}); "
            "resume with the same options, or start over in another --output"
        )
    return ckpt


# --- metrics -------------------------------------------------------------------------------------
class MetricsLog:
    """Appends one JSON object per line to ``OUT/metrics.jsonl`` (and to TensorBoard when asked and
    installed). On resume, lines after the checkpoint's step are dropped first."""

    def __init__(self, output: Path, *, resume_step: int | None = None, tensorboard: bool | None = None) -> None:
        self.path = Path(output) / METRICS_JSONL
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("", encoding="utf-8")
        else:
            self._truncate_after(resume_step)
        self.tb = None
        if tensorboard is not False:
            try:
                import tensorboard  # noqa: F401
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                if tensorboard:
                    raise TrainingError("--tensorboard needs `pip install tensorboard`") from None
            else:
                self.tb = SummaryWriter(str(Path(output) / "tensorboard"), purge_step=resume_step)

    def _truncate_after(self, step: int) -> None:
        if not self.path.is_file():
            self.path.write_text("", encoding="utf-8")
            return
        kept = [ln for ln in self.path.read_text(encoding="utf-8").splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
        atomic_write_text(self.path, "".join(ln + "\n" for ln in kept))  # a crash here keeps the whole old log

    def log(self, record: dict[str, Any]) -> None:
        """Append ``record`` (must hold ``step``)."""
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        """Flush and close TensorBoard."""
        if self.tb is not None:
            self.tb.close()


def read_metrics(output: Path) -> list[dict[str, Any]]:
    """The records of ``OUT/metrics.jsonl``."""
    path = Path(output) / METRICS_JSONL
    return [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def progress_bar(total: int, initial: int, enabled: bool, desc: str) -> Any:
    """A tqdm bar over optimizer steps (on stderr); ``set_postfix`` shows loss and lr."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", desc=desc, disable=not enabled, dynamic_ncols=True)


class Timer:
    """Seconds spent in training steps (excluding evaluation and checkpoints)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.steps = 0

    def time(self) -> contextlib.AbstractContextManager[None]:
        """Context manager around one step."""

        @contextlib.contextmanager
        def cm() -> Iterator[None]:
            t0 = time.perf_counter()
            yield
            self.seconds += time.perf_counter() - t0
            self.steps += 1

        return cm()

    @property
    def per_step(self) -> float | None:
        """Mean seconds per step, or None before the first."""
        return self.seconds / self.steps if self.steps else None


def resolve_device(device: str) -> Any:
    """``auto`` -> CUDA when present, else the CPU; a clear error for CUDA without CUDA."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"device {device!r} asks for CUDA, which this machine does not have; use --device cpu or auto")
    return dev


def autocast_for(device: Any, precision: str) -> Any:
    """bf16 autocast on CUDA for ``auto``/``bfloat16``; nothing on the CPU or for ``float32``."""
    import torch

    if precision not in ("auto", "float32", "bfloat16"):
        raise TrainingError(f"--precision must be auto, float32 or bfloat16, got {precision!r}")
    if device.type == "cuda" and precision in ("auto", "bfloat16"):
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and precision == "bfloat16":
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()



def torch_runtime(spec: EncoderSpec) -> EncoderSpec:
    """``spec`` with ``runtime=torch`` unless it names a runtime: what training loads (a compiled tower
    cannot follow training, and a model whose tower is replaced by a compiled one cannot be copied from)."""
    if "runtime" in spec.options:
        return spec
    return EncoderSpec(spec.kind, spec.location, {**spec.options, "runtime": "torch"})

__all__ = [
    "torch_runtime",
    "CHECKPOINTS_DIR",
    "METRICS_JSON",
    "METRICS_JSONL",
    "Checkpoint",
    "MetricsLog",
    "Timer",
    "TrainingError",
    "autocast_for",
    "batch_positions",
    "checkpoint_dirs",
    "epoch_order",
    "load_checkpoint",
    "lr_at",
    "prepare_output",
    "progress_bar",
    "read_metrics",
    "resolve_device",
    "resolve_total_steps",
    "resolve_warmup",
    "restore_trainable",
    "save_checkpoint",
    "seed_everything",
]
