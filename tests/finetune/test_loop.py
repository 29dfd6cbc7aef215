"""The one training loop, driven by a toy mode: gradient accumulation, evaluation cadence with the
eval-set size, checkpoints and an exact resume, the export and metrics.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from phiclip.finetune.common import prepare_output, read_metrics
from phiclip.finetune.data import SkippedImages
from phiclip.finetune.loop import LoopSettings, TrainingMode, finish_run, run_training


class ToyRegression(TrainingMode):
    """y = x @ w with dropout (so the restored generators matter); micro-batch 3 has no images."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Dropout(0.2), torch.nn.Linear(4, 1))
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(1)
        self.x = torch.randn(64, 4, generator=gen)
        self.y = self.x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
        self.seen: list[int] = []
        self.exported = False
        self.closed = False

    def micro_batch_loss(self, index: int) -> tuple[Any, int] | None:
        self.seen.append(index)
        if index == 3:
            return None  # e.g. every image of the batch unreadable
        rows = torch.arange(index * 8, index * 8 + 8) % len(self.x)
        return ((self.net(self.x[rows]) - self.y[rows]) ** 2).mean(), len(rows)

    def evaluate(self) -> dict[str, Any] | None:
        self.net.eval()
        with torch.no_grad():
            return {"mse": round(float(((self.net(self.x[:16]) - self.y[:16]) ** 2).mean()), 6), "images": 16}

    def step_record(self, step: int, images: int) -> dict[str, Any]:
        return {"images": images}

    def checkpoint_state(self) -> dict[str, Any]:
        return {"toy": 1}

    def export(self, output: Path) -> None:
        self.exported = True
        (output / "model.txt").write_text("trained")

    def close(self) -> None:
        self.closed = True


def _settings(**kw: Any) -> LoopSettings:
    return LoopSettings(**{**dict(total_steps=6, lr=0.05, warmup_steps=1, grad_accum=2, max_grad_norm=1.0, eval_every=2,
                                  save_every=2, progress=False, tensorboard=False), **kw})


def test_the_loop_accumulates_evaluates_with_the_eval_size_and_exports(tmp_path: Path) -> None:
    mode = ToyRegression()
    out = run_training(mode, tmp_path, _settings(), identity={"toy": True}, checkpoint=None, skipped=SkippedImages())
    assert mode.seen[:4] == [0, 1, 2, 3] and len(mode.seen) == 12  # 6 steps x 2 micro-batches
    assert mode.exported and mode.closed and out.resumed_from is None
    lines = read_metrics(tmp_path)
    steps = [r for r in lines if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert steps[1]["images"] == 8  # micro-batch 3 had nothing: one of two counted
    assert list(steps[0]) == ["step", "loss", "lr", "images", "seconds"]
    evals = [r for r in lines if "eval" in r]
    assert [r["step"] for r in evals] == [0, 2, 4, 6] and all(r["eval"]["images"] == 16 for r in evals)
    assert out.after is not None and out.before is not None and out.after["mse"] < out.before["mse"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    finish_run(tmp_path, {"after": out.after})
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"after": out.after}
    assert not (tmp_path / "checkpoints").exists()


def test_a_resumed_run_follows_the_uninterrupted_loss_curve(tmp_path: Path) -> None:
    whole = run_training(ToyRegression(), tmp_path / "whole", _settings(), identity={"toy": True}, checkpoint=None,
                         skipped=SkippedImages())

    def stop(step: int, loss: float) -> None:
        if step == 5:
            raise KeyboardInterrupt

    interrupted = ToyRegression()
    with pytest.raises(KeyboardInterrupt):
        run_training(interrupted, tmp_path / "split", _settings(), identity={"toy": True}, checkpoint=None,
                     skipped=SkippedImages(), on_step=stop)
    assert interrupted.closed and not interrupted.exported
    ckpt = prepare_output(tmp_path / "split", True, {"toy": True})
    assert ckpt is not None and ckpt.step == 4 and ckpt.state["toy"] == 1
    skipped = SkippedImages()
    resumed = run_training(ToyRegression(), tmp_path / "split", _settings(), identity={"toy": True}, checkpoint=ckpt,
                           skipped=skipped)
    assert resumed.resumed_from == 4 and resumed.before == whole.before
    losses = [[r["loss"] for r in read_metrics(tmp_path / d) if "loss" in r] for d in ("whole", "split")]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-6)
    assert resumed.final_loss == pytest.approx(whole.final_loss, rel=1e-6)
