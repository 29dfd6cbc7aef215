"""``phiclip info OUT``: what an embedding output holds (:func:`phiclip.output_summary.summarize_output`)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from phiclip.cli.common import EmbDirArg, JsonOpt, api_errors, echo_json, print_rows
from phiclip.console import safe_text
from phiclip.output_summary import DEFAULT_TOP_REASONS, OutputSummary, summarize_output


def _counts(s: OutputSummary) -> str:
    text = f"{s.inputs if s.inputs is not None else '?'} inputs: {s.embedded if s.embedded is not None else '?'} " \
           f"embedded, {s.failed if s.failed is not None else '?'} failed"
    extra = [f"{n} {what}" for n, what in ((s.duplicates, "duplicates"), (s.ignored, "ignored (not inputs)")) if n]
    return text + (f" ({', '.join(extra)})" if extra else "")


def info(
    emb_dir: EmbDirArg,
    top: Annotated[int, typer.Option("--top", min=0, help="How many groups of failed inputs (stage and reason) to list.")]
    = DEFAULT_TOP_REASONS,
    as_json: JsonOpt = False,
) -> None:
    """Show what EMB_DIR holds: the model and whether its checkpoint is reachable, precision, width, counts,
    why inputs failed (grouped), and whether the run is complete."""
    with api_errors():
        s = summarize_output(emb_dir, top=top)
    if as_json:
        echo_json(s.to_dict())
        return
    precision = s.precision or "?"
    if s.precision_requested and s.precision_requested != s.precision:
        precision += f" (asked: {s.precision_requested})"
    print_rows(f"phiclip info {s.path}", [
        ("model (as recorded)", s.spec),
        ("checkpoint", (s.checkpoint or "hub id") if s.spec else None),
        ("checkpoint status", s.checkpoint_status),
        ("weights fingerprint", s.weights_fingerprint),
        ("compute precision", precision),
        ("vectors", f"{s.dim}-d, stored as {s.vector_dtype or '?'}, {s.kind or '?'} inputs, {s.shards} shards"),
        ("counts", _counts(s)),
        ("complete", "yes" if s.complete else "NO: rerun the same `phiclip embed` command to finish it"),
    ])
    if not s.failure_groups:
        return
    shown = f"the {len(s.failure_groups)} most frequent of {s.failure_groups_total}" \
        if s.failure_groups_total > len(s.failure_groups) else f"all {s.failure_groups_total}"
    table = Table(title=f"Failed or skipped inputs by stage and reason ({shown})", title_justify="left")
    table.add_column("count", justify="right")
    table.add_column("stage")
    table.add_column("reason", overflow="fold")
    table.add_column("for example", overflow="fold")
    for g in s.failure_groups:
        table.add_row(str(g.count), safe_text(g.stage), safe_text(g.reason), safe_text(g.example))
    Console().print(table)
