"""``phiclip eval``: one benchmark task on labelled or captioned images (:func:`phiclip.evaluate.evaluate`)."""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from phiclip import evaluate as evaluation
from phiclip.atomic import atomic_write_text
from phiclip.cli.common import (
    AutoProgressOpt,
    CaptionColumnOpt,
    ImageColumnOpt,
    JsonOpt,
    LabelColumnOpt,
    MaxPixelsOpt,
    QueryDeviceOpt,
    QueryPrecision,
    QueryPrecisionOpt,
    TemplateOpt,
    api_errors,
    echo_json,
    fail_cli,
    print_left_out_items,
    progress_wanted,
    spec_with_kind,
)
from phiclip.console import safe_text

_DEFAULTS = evaluation.EvalOptions()


class EvalTask(str, enum.Enum):
    zeroshot = "zeroshot"
    knn = "knn"
    linear_probe = "linear-probe"
    retrieval = "retrieval"
    clustering = "clustering"


def evaluate(
    model: Annotated[str, typer.Option("--model", "-m", callback=spec_with_kind, help=(
        "Encoder spec: clip:DIR_OR_HUB_ID, siglip:..., open_clip:..., phi3v:... (without KIND:, found from the "
        "checkpoint's config file)."))],
    task: Annotated[EvalTask, typer.Option("--task", help=(
        "zeroshot (CLIP-like), knn or linear-probe (any encoder), retrieval (image-text, CLIP-like), "
        "clustering (k-means V-measure, any encoder)."))],
    data: Annotated[str, typer.Option("--data", "-d", help=(
        "A folder per class (optionally under train/ and test/), a CSV/Parquet table with image and "
        "label or caption columns, or hf:DATASET[?config=CFG&split=SPLIT] (hub id, local folder, save_to_disk "
        "folder)."))],
    split: Annotated[str | None, typer.Option("--split", help=(
        "Split to evaluate on, overriding hf:...?split= (default: test/validation when the data has splits; "
        "hf: accepts test[:500]).")) ] = _DEFAULTS.split,
    train_split: Annotated[str | None, typer.Option("--train-split", help=(
        "knn/linear-probe: the split to train on (default: the data's train split, else a seeded stratified split)."))]
    = _DEFAULTS.train_split,
    template: TemplateOpt = None,
    templates_file: Annotated[Path | None, typer.Option("--templates", help="A file of templates, one per line.")] = None,
    classnames: Annotated[Path | None, typer.Option("--classnames", help=(
        "Zero-shot: a file of class names in label order, one per line (default: the data's names)."))] = None,
    k: Annotated[int, typer.Option("--k", min=1, help="Neighbours for knn (the same default as compare's --k).")]
    = _DEFAULTS.k,
    shots: Annotated[int | None, typer.Option("--shots", min=1, help=(
        "linear-probe: train on this many images per class (MIEB: 16) instead of every training image."))]
    = _DEFAULTS.shots,
    probe_seeds: Annotated[int, typer.Option("--probe-seeds", min=1, help=(
        "linear-probe with --shots: seeded draws of the training images, the mean reported (MIEB: 5)."))]
    = _DEFAULTS.probe_seeds,
    test_fraction: Annotated[float, typer.Option("--test-fraction", min=0.01, max=0.99, help=(
        "knn/linear-probe without given splits: the share held out for testing."))] = _DEFAULTS.test_fraction,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the stratified split and of the probe's validation split.")]
    = _DEFAULTS.seed,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per forward pass.")]
    = _DEFAULTS.batch_size,
    max_pixels: MaxPixelsOpt = _DEFAULTS.max_pixels or 0,
    device: QueryDeviceOpt = _DEFAULTS.device,
    precision: QueryPrecisionOpt = QueryPrecision(_DEFAULTS.dtype),
    image_column: ImageColumnOpt = None,
    label_column: LabelColumnOpt = None,
    caption_column: CaptionColumnOpt = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the result as JSON to this file.")] = None,
    progress: AutoProgressOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Evaluate an encoder on labelled or captioned images (CLIP_benchmark's protocol) and print the metrics."""
    if template and templates_file:
        fail_cli("give --template or --templates, not both")
    with api_errors():
        result = evaluation.evaluate(
            model, task.value, data, split=split, train_split=train_split,
            templates=template or (str(templates_file) if templates_file else None),
            classnames=str(classnames) if classnames else None, k=k, test_fraction=test_fraction, seed=seed,
            shots=shots, probe_seeds=probe_seeds,
            batch_size=batch_size, max_pixels=max_pixels or None, device=device, dtype=precision.value,
            image_column=image_column, label_column=label_column, caption_column=caption_column,
            progress=progress_wanted(progress),
        )
        if output is not None:
            output.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(output, json.dumps(result, indent=2) + "\n")
    if as_json:
        echo_json(result)
        return
    table = Table(title=safe_text(f"phiclip eval: {result['task']} of {result['model']} on {result['data']}"),
                  title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in result["metrics"].items():
        table.add_row(safe_text(name), f"{value:.4f}")
    for name, value in result["details"].items():
        table.add_row(safe_text(name, "dim"), safe_text(value, "dim"))
    protocol = result.get("protocol") or {}
    if protocol:
        n = ", ".join(f"{key} {value}" for key, value in protocol["n"].items())
        table.caption = safe_text(f"protocol: {protocol['description']}; split: {protocol['split']}; n: {n}")
    out = Console()
    out.print(table)
    print_left_out_items(result["left_out"]["items"], out)
    if output is not None:
        out.print(safe_text(f"Written: {output}"), highlight=False, soft_wrap=True)
