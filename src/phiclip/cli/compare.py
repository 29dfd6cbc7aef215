"""``phiclip compare``: two or more encoders on the same images (:func:`phiclip.comparison.runner.compare`).
Defaults come from :mod:`phiclip.comparison.runner` (importing it loads numpy only)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from phiclip.cli.common import (
    CaptionColumnOpt,
    ImageColumnOpt,
    LabelColumnOpt,
    MaxPixelsOpt,
    QueryPrecision,
    QueryPrecisionOpt,
    TemplateOpt,
    api_errors,
    echo_json,
    interrupted,
    say_dim,
    spec_with_kind,
)
from phiclip.comparison import runner
from phiclip.comparison.report import print_report
from phiclip.console import safe_text


def compare(
    model: Annotated[list[str], typer.Option("--model", "-m", callback=spec_with_kind, help=(
        "Encoder spec, given two or more times: clip:DIR_OR_HUB_ID, phi3v:...?num_crops=4, ...; "
        "the first is A, the second B."))],
    data: Annotated[str, typer.Option("--data", "-d", help=(
        "Images to compare on: a folder per class, a CSV/Parquet table (image, label and/or caption "
        "columns; captions enable retrieval), hf:DATASET[?config=CFG&split=SPLIT], or a quoted glob."))],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for report.html, report.json and embeddings/.")],
    k: Annotated[int, typer.Option("--k", min=1, help=(
        "Neighbours for the k-NN overlap, the alignment scores and the kNN classifier (eval's --k default too)."))]
    = runner.DEFAULT_K,
    shots: Annotated[int | None, typer.Option("--shots", min=1, help=(
        "Linear probe: train on this many images per class (MIEB: 16) instead of every training image."))] = None,
    probe_seeds: Annotated[int, typer.Option("--probe-seeds", min=1, help=(
        "Linear probe with --shots: seeded draws of the training images, the mean reported (MIEB: 5)."))] = 1,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:1 ...")] = "auto",
    precision: QueryPrecisionOpt = QueryPrecision.auto,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per forward pass.")]
    = runner.DEFAULT_BATCH_SIZE,
    max_images: Annotated[int | None, typer.Option("--max-images", min=2, help=(
        "Compare at most this many images, spread evenly over the data."))] = None,
    passes: Annotated[int, typer.Option("--passes", min=1, help=(
        "Timed passes over the images: speed is the median pass, shown with the slowest and fastest."))]
    = runner.DEFAULT_PASSES,
    max_pixels: MaxPixelsOpt = runner.DEFAULT_MAX_PIXELS,
    split: Annotated[str | None, typer.Option("--split", help=(
        "One split of the data (a split folder, a split column's value, or an hf: split).")) ] = None,
    image_column: ImageColumnOpt = None,
    label_column: LabelColumnOpt = None,
    caption_column: CaptionColumnOpt = None,
    template: TemplateOpt = None,
    in_process: Annotated[bool, typer.Option("--in-process", help=(
        "Run every encoder in this process (starts faster; peak memory per encoder is then less exact)."))]
    = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help=(
        "Show each model's stages (loading, warm-up, each timed pass, the text side) as they start."))] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print report.json instead of the tables.")] = False,
) -> None:
    """Embed the same images with each encoder and report cost, quality and structure side by side
    (report.html, report.json and a table here)."""
    try:
        with api_errors():
            options = runner.CompareOptions(
                k=k, device=device, dtype=precision.value, batch_size=batch_size, passes=passes,
                max_pixels=max_pixels or None, max_images=max_images, templates=tuple(template or ()) or None,
                isolate=not in_process, split=split, image_column=image_column, label_column=label_column,
                caption_column=caption_column, shots=shots, probe_seeds=probe_seeds,
            )
            report = runner.compare(model, data, output, options,
                                    progress=say_dim(Console(stderr=True)) if progress and not as_json else None)
    except KeyboardInterrupt:
        interrupted("the comparison stopped; rerun the same command to start it again")
    if as_json:
        echo_json(report.to_dict(), indent=1)
        return
    print_report(report)
    Console().print(safe_text(f"Report: {Path(output) / 'report.html'} (numbers in {Path(output) / 'report.json'})"),
                    highlight=False, soft_wrap=True)
