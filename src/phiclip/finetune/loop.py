"""The one training loop of phiclip's fine-tuning modes (contrastive CLIP/SigLIP in :mod:`.clip`, the
Phi-3-vision student in :mod:`.adapter`).

A mode is a :class:`TrainingMode`: the network and its optimizer, the loss of one micro-batch, an
evaluation on held-out data, what its metrics lines and checkpoints add, and its export.
:func:`run_training` does the rest the same way for every mode:

- resume: the newest checkpoint's trainable tensors, optimizer moments and random generators are
  restored, its metrics lines after the checkpoint dropped (:mod:`.common` explains why the run then
  follows the uninterrupted loss curve);
- every optimizer step ``s``: the learning rate :func:`~phiclip.finetune.common.lr_at` ``(s)``, the
  gradients of micro-batches ``s * grad_accum ... s * grad_accum + grad_accum - 1`` summed (each loss
  divided by ``grad_accum``), clipping by global norm, one line to ``metrics.jsonl`` (and TensorBoard),
  the progress bar, ``on_step``;
- evaluation before training, every ``eval_every`` steps and after (each logged with its step; every
  evaluation says on how many images it was measured, ``images``);
- a checkpoint every ``save_every`` steps (the newest ``keep_checkpoints`` kept), the export at the end,
  and :func:`finish_run`: ``metrics.json`` written, the checkpoints removed.
"""

from __future__ import annotations

import abc
import contextlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from phiclip.atomic import atomic_write_json
from phiclip.finetune.common import (
    CHECKPOINTS_DIR,
    METRICS_JSON,
    Checkpoint,
    MetricsLog,
    Timer,
    load_optimizer_state,
    lr_at,
    progress_bar,
    resolve_total_steps,
    resolve_warmup,
    restore_trainable,
    save_checkpoint,
    set_rng_state,
)
from phiclip.finetune.data import SkippedImages


class TrainingMode(abc.ABC):
    """What a fine-tuning mode gives :func:`run_training`.

    ``net`` is the ``torch.nn.Module`` trained (its parameters with ``requires_grad`` are what a
    checkpoint holds) and ``optimizer`` its optimizer; both are set by the mode before the run.
    """

    net: Any
    optimizer: Any

    @abc.abstractmethod
    def micro_batch_loss(self, index: int) -> tuple[Any, int] | None:
        """``(loss, images)`` of micro-batch ``index`` (counted over the whole run: optimizer step ``s``
        takes ``s * grad_accum`` up to ``s * grad_accum + grad_accum - 1``): a scalar tensor to
        backpropagate and the number of images in it; ``None`` when it holds nothing to learn from
        (its images could not be read)."""

    @abc.abstractmethod
    def export(self, output: Path) -> None:
        """Write the trained model into ``output``."""

    def after_step(self) -> None:
        """Called after each optimizer step (e.g. to clamp a parameter)."""
        return None

    def evaluate(self) -> dict[str, Any] | None:
        """Metrics on the held-out data, with ``images``: how many images they were measured on
        (``None`` when there is no held-out data)."""
        return None

    def step_record(self, step: int, images: int) -> dict[str, Any]:
        """Fields of the metrics line of optimizer step ``step`` (1-based) after ``lr``; ``images``: the
        images its micro-batches held."""
        return {}

    def checkpoint_state(self) -> dict[str, Any]:
        """JSON a checkpoint holds for this mode (what resuming needs that its settings do not give)."""
        return {}

    def close(self) -> None:
        """Release what the mode holds open (image loaders' threads); called once the run ends."""
        return None


@dataclass
class LoopSettings:
    """The loop's settings, as a mode's options give them (:meth:`from_options`)."""

    total_steps: int
    lr: float
    warmup_steps: int
    min_lr_ratio: float = 0.0
    grad_accum: int = 1
    #: Gradient clipping by global norm (0: off).
    max_grad_norm: float = 0.0
    #: Evaluate every N steps too (0: before and after only).
    eval_every: int = 0
    #: A checkpoint every N steps (0: none), the newest ``keep_checkpoints`` kept.
    save_every: int = 0
    keep_checkpoints: int = 2
    progress: bool = True
    tensorboard: bool | None = None
    #: The progress bar's label.
    desc: str = "train"

    @classmethod
    def from_options(cls, options: Any, num_items: int, desc: str) -> LoopSettings:
        """From a mode's options dataclass (``steps``/``epochs``, ``batch_size``, ``grad_accum``, ``lr``,
        ``warmup``, ``min_lr_ratio``, ``max_grad_norm``, ``save_every``, ``keep_checkpoints``,
        ``progress``, ``tensorboard``, and ``eval_every`` when it has one) and the training items."""
        total = resolve_total_steps(options.steps, options.epochs, num_items, options.batch_size * options.grad_accum)
        return cls(total_steps=total, lr=options.lr, warmup_steps=resolve_warmup(options.warmup, total),
                   min_lr_ratio=options.min_lr_ratio, grad_accum=options.grad_accum,
                   max_grad_norm=options.max_grad_norm, eval_every=getattr(options, "eval_every", 0),
                   save_every=options.save_every, keep_checkpoints=options.keep_checkpoints,
                   progress=options.progress, tensorboard=options.tensorboard, desc=desc)


@dataclass
class LoopOutcome:
    """What :func:`run_training` did."""

    resumed_from: int | None
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    #: The mean micro-batch loss of the last optimizer step that had one.
    final_loss: float | None
    #: Seconds in training steps, those of the interrupted run included (evaluation and checkpoints not).
    train_seconds: float


def run_training(
    mode: TrainingMode,
    output: Path,
    settings: LoopSettings,
    *,
    identity: dict[str, Any],
    checkpoint: Checkpoint | None,
    skipped: SkippedImages,
    on_step: Callable[[int, float], None] | None = None,
) -> LoopOutcome:
    """Train ``mode`` for ``settings.total_steps`` optimizer steps (from ``checkpoint``'s step when
    resuming), then evaluate and export it into ``output``; the mode is closed in any case.

    Args:
        identity: what a resumed run must match (stored in every checkpoint).
        checkpoint: the checkpoint to resume from (:func:`~phiclip.finetune.common.prepare_output`).
        skipped: the images found unreadable so far (kept in checkpoints, restored on resume).
        on_step: called as ``on_step(step, loss)`` after every optimizer step (``nan`` before the first
            loss).
    """
    import torch

    net, optimizer, total = mode.net, mode.optimizer, settings.total_steps
    log: MetricsLog | None = None
    bar: Any = None
    try:
        if checkpoint is not None:
            restore_trainable(net, checkpoint.weights, checkpoint.path)
            load_optimizer_state(optimizer, *checkpoint.optimizer)
            set_rng_state(*checkpoint.rng)
            start, before = checkpoint.step, checkpoint.state.get("before")
            skipped.reasons.update({int(k): v for k, v in checkpoint.state.get("skipped", {}).items()})
            prior_seconds = float(checkpoint.state.get("train_seconds", 0.0))
        else:
            start, prior_seconds = 0, 0.0
            before = mode.evaluate()
        log = MetricsLog(output, resume_step=start if checkpoint is not None else None, tensorboard=settings.tensorboard)
        if checkpoint is None and before is not None:
            log.log({"step": 0, "eval": before})
        timer = Timer()
        loss_value: float | None = None
        bar = progress_bar(total, start, settings.progress, settings.desc)
        for step in range(start, total):
            with timer.time():
                net.train()
                lr = lr_at(step, base_lr=settings.lr, warmup_steps=settings.warmup_steps, total_steps=total,
                           min_lr_ratio=settings.min_lr_ratio)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                optimizer.zero_grad(set_to_none=True)
                losses, seen = [], 0
                for micro in range(settings.grad_accum):
                    got = mode.micro_batch_loss(step * settings.grad_accum + micro)
                    if got is None:
                        continue
                    loss, images = got
                    (loss / settings.grad_accum).backward()
                    losses.append(float(loss.detach()))
                    seen += images
                if losses:
                    if settings.max_grad_norm > 0:
                        torch.nn.utils.clip_grad_norm_([p for p in net.parameters() if p.requires_grad],
                                                       settings.max_grad_norm)
                    optimizer.step()
                    mode.after_step()
                    loss_value = float(np.mean(losses))
            done = step + 1
            log.log({"step": done, "loss": loss_value, "lr": lr, **mode.step_record(done, seen),
                     "seconds": round(timer.seconds + prior_seconds, 4)})
            bar.set_postfix(loss=f"{loss_value:.4f}" if loss_value is not None else "-", lr=f"{lr:.2e}")
            bar.update(1)
            if on_step is not None:
                on_step(done, float("nan") if loss_value is None else loss_value)
            if settings.eval_every and done % settings.eval_every == 0 and done < total:
                metrics = mode.evaluate()
                if metrics is not None:
                    log.log({"step": done, "eval": metrics})
            if settings.save_every and done % settings.save_every == 0 and done < total:
                save_checkpoint(output, done, net, optimizer, {
                    "identity": identity, "before": before, **mode.checkpoint_state(),
                    "train_seconds": timer.seconds + prior_seconds,
                    "skipped": {str(k): v for k, v in skipped.reasons.items()}}, keep=settings.keep_checkpoints)
        bar.close()
        after = mode.evaluate()
        if after is not None:
            log.log({"step": total, "eval": after})
        mode.export(output)
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
        mode.close()
    return LoopOutcome(resumed_from=None if checkpoint is None else checkpoint.step, before=before, after=after,
                       final_loss=loss_value, train_seconds=timer.seconds + prior_seconds)


def finish_run(output: Path, metrics: dict[str, Any]) -> None:
    """Write ``OUT/metrics.json`` (atomically) and remove the run's checkpoints (it is complete)."""
    atomic_write_json(Path(output) / METRICS_JSON, metrics, indent=2, default=str)
    with contextlib.suppress(OSError):
        shutil.rmtree(Path(output) / CHECKPOINTS_DIR)


__all__ = ["LoopOutcome", "LoopSettings", "TrainingMode", "finish_run", "run_training"]
