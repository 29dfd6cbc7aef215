"""``eval`` and ``compare`` give the same number on the same labelled folder with the same options: one
implementation per task (the protocol objects of :mod:`phiclip.evaluate`)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from typer.testing import CliRunner

from phiclip import evaluate
from phiclip.cli import app
from phiclip.comparison import runner

from .conftest import CompareRun


def test_the_defaults_are_one() -> None:
    assert runner.DEFAULT_K == evaluate.DEFAULT_KNN_K == evaluate.EvalOptions().k
    assert runner.DEFAULT_TEST_FRACTION == evaluate.DEFAULT_TEST_FRACTION == evaluate.EvalOptions().test_fraction


@pytest.mark.parametrize(
    "task, metric, compare_metric",
    [
        ("knn", "acc1", "knn_accuracy"),
        ("linear-probe", "acc1", "linear_probe_accuracy"),
        ("zeroshot", "acc1", "zero_shot_top1"),
        ("clustering", "v_measure", "clustering_v_measure"),
        ("retrieval", "image_retrieval_recall@1", "text_to_image_recall@1"),
        ("retrieval", "text_retrieval_recall@5", "image_to_text_recall@5"),
    ],
)
def test_eval_equals_compare(compare_run: CompareRun, task: str, metric: str, compare_metric: str) -> None:
    k = compare_run.report.settings["k"]
    for i, spec in enumerate(compare_run.specs):
        got = evaluate.evaluate(spec, task, str(compare_run.data), k=k, batch_size=8)
        q = compare_run.report.models[i].quality
        assert got["metrics"][metric] == pytest.approx(q.metrics[compare_metric], abs=1e-6), (spec, task)
        # the same protocol, split and n, said the same way
        mine, theirs = got["protocol"], q.protocols[compare_metric]
        assert mine["description"] == theirs["description"] and mine["split"] == theirs["split"]
        assert mine["n"] == theirs["n"] and mine["settings"] == theirs["settings"]


def test_cli_eval_says_its_protocol_and_equals_compare(compare_run: CompareRun) -> None:
    args = ["eval", "-m", compare_run.specs[0], "--task", "knn", "--data", str(compare_run.data), "--k", "5"]
    res = CliRunner().invoke(app, [*args, "--json"])
    assert res.exit_code == 0, res.output
    data: dict[str, Any] = json.loads(res.stdout)
    assert data["metrics"]["acc1"] == pytest.approx(compare_run.report.models[0].quality.metrics["knn_accuracy"])
    assert data["protocol"]["name"] == "knn" and data["protocol"]["n"]["test"] > 0
    table = CliRunner().invoke(app, args, terminal_width=200)
    assert table.exit_code == 0, table.output
    text = " ".join(table.stdout.split())
    assert "protocol: kNN: cosine, k=5" in text and "split: stratified 70%/30%, seed 0" in text and "n: train" in text
