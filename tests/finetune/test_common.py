"""The shared loop machinery: schedule, data order, checkpoints without pickle, resume checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from phiclip.finetune.common import (
    MetricsLog,
    TrainingError,
    batch_positions,
    epoch_order,
    load_checkpoint,
    load_optimizer_state,
    lr_at,
    prepare_output,
    read_metrics,
    resolve_total_steps,
    resolve_warmup,
    restore_trainable,
    save_checkpoint,
    set_rng_state,
)


def test_warmup_then_cosine() -> None:
    lrs = [lr_at(s, base_lr=0.1, warmup_steps=4, total_steps=20, min_lr_ratio=0.1) for s in range(20)]
    assert lrs[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1])  # linear warmup up to the peak
    assert lrs[4] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # then never rises
    assert lr_at(20, base_lr=0.1, warmup_steps=4, total_steps=20, min_lr_ratio=0.1) == pytest.approx(0.01)
    mid = 4 + 8  # half way through the decay: half way between peak and floor
    assert lrs[mid] == pytest.approx(0.01 + 0.09 * 0.5)


def test_steps_and_warmup_resolution() -> None:
    assert resolve_total_steps(None, 2, num_items=10, items_per_step=4) == 5
    assert resolve_total_steps(7, None, num_items=10, items_per_step=4) == 7
    assert resolve_total_steps(None, None, num_items=10, items_per_step=4) == 3
    with pytest.raises(TrainingError, match="not both"):
        resolve_total_steps(3, 1.0, 10, 4)
    assert resolve_warmup(0.1, 50) == 5
    assert resolve_warmup(7, 50) == 7
    assert resolve_warmup(100, 50) == 50


def test_data_order_is_a_seeded_permutation_per_epoch() -> None:
    first, epochs = batch_positions(10, seed=3, start=0, size=10)
    assert sorted(first.tolist()) == list(range(10)) and set(epochs.tolist()) == {0}
    straddle, ep = batch_positions(10, seed=3, start=8, size=5)  # two of epoch 0, three of epoch 1
    assert straddle[:2].tolist() == first[8:].tolist()
    assert straddle[2:].tolist() == epoch_order(10, 3, 1)[:3].tolist() and ep.tolist() == [0, 0, 1, 1, 1]
    assert not np.array_equal(epoch_order(10, 3, 0), epoch_order(10, 4, 0))
    assert np.array_equal(epoch_order(10, 3, 0), batch_positions(10, 3, 0, 10)[0])


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        x = torch.randn(8, 4)
        loss = ((model(torch.nn.functional.dropout(x, 0.3)) - x.sum(1, keepdim=True)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_checkpoint_restores_weights_optimizer_and_generators(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    _train(model, opt, 3)
    path = save_checkpoint(tmp_path, 3, model, opt, {"identity": {"a": 1}})
    assert sorted(p.name for p in path.iterdir()) == ["optimizer.safetensors", "rng.safetensors", "state.json", "trainable.safetensors"]
    continued = _train(model, opt, 4)  # what an uninterrupted run does next (generators included)

    fresh = torch.nn.Linear(4, 1)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.05)
    ckpt = load_checkpoint(path)
    restore_trainable(fresh, ckpt.weights, ckpt.path)
    load_optimizer_state(fresh_opt, *ckpt.optimizer)
    torch.manual_seed(123)  # a different generator state, undone by the checkpoint
    set_rng_state(*ckpt.rng)
    assert ckpt.step == 3 and ckpt.state["identity"] == {"a": 1}
    assert _train(fresh, fresh_opt, 4) == continued


def test_only_the_newest_checkpoints_are_kept(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, model, opt, {}, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000004", "step-0000006"]


def test_output_folder_rules(tmp_path: Path) -> None:
    assert prepare_output(tmp_path / "new", resume=False, identity={}) is None
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(TrainingError, match="--resume"):
        prepare_output(tmp_path, resume=False, identity={})
    model = torch.nn.Linear(2, 2)
    save_checkpoint(tmp_path, 5, model, torch.optim.SGD(model.parameters(), lr=0.1), {"identity": {"lr": 0.1, "seed": 0}})
    with pytest.raises(TrainingError, match=r"lr: 0.1 -> 0.2"):
        prepare_output(tmp_path, resume=True, identity={"lr": 0.2, "seed": 0})
    assert prepare_output(tmp_path, resume=True, identity={"lr": 0.1, "seed": 0}).step == 5


def test_metrics_log_drops_lines_after_the_checkpoint_on_resume(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path, tensorboard=False)
    for step in range(1, 6):
        log.log({"step": step, "loss": 1.0 / step})
    log.close()
    MetricsLog(tmp_path, resume_step=3, tensorboard=False).close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    MetricsLog(tmp_path, tensorboard=False).close()  # a fresh run starts an empty log
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_metrics_reach_tensorboard_when_installed(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (it is in the dev extra)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLog(tmp_path)  # tensorboard=None: on when installed
    for step in range(1, 4):
        log.log({"step": step, "loss": 1.0 / step, "lr": 0.1, "note": "text is not a scalar"})
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"loss", "lr"}
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("loss")] == [(1, 1.0), (2, 0.5), (3, round(1 / 3, 6))]


def test_tensorboard_asked_for_but_absent_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    with pytest.raises(TrainingError, match="pip install tensorboard"):
        MetricsLog(tmp_path, tensorboard=True)
    MetricsLog(tmp_path).close()  # not asked for: runs without it
