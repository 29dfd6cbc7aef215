"""What the ``phiclip`` commands share: option types, error printing, progress lines and summary tables.

Light on purpose (typer and rich only): every command module imports it, and ``phiclip --help`` imports
every command module.
"""

from __future__ import annotations

import enum
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from phiclip.console import escape_control, safe_text

T = TypeVar("T")

#: How many rows of a list of left-out inputs a summary shows.
LEFT_OUT_SHOWN = 10


class QueryPrecision(str, enum.Enum):
    """Compute precision of a query or evaluation encoder."""

    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


# --- encoder specs ---------------------------------------------------------------------------------
def _with_kind(spec: str) -> str:
    head, sep, _ = spec.partition(":")
    if not spec.strip() or (sep and len(head.strip()) > 1):
        return spec  # has a kind (or names an unknown one, or is empty): the API checks and says what is wrong
    # lazy: the registry reads the checkpoint's config (phiclip.hub, no torch); not for --help
    from phiclip.encoders.registry import resolve_spec

    try:
        return str(resolve_spec(spec))
    except ValueError as e:  # CheckpointError too: no config file, a model_type no kind loads
        raise typer.BadParameter(str(e)) from None


def spec_with_kind(value: T) -> T:
    """Option callback for encoder specs: a spec written without ``KIND:`` (``/models/dinov2``,
    ``laion/CLIP-ViT-B-32-laion2B-s34B-b79K``, ``DIR?normalize=false``) gets the kind its checkpoint's
    ``config.json`` (or ``open_clip_config.json``) names (:func:`phiclip.encoders.registry.resolve_spec`);
    specs with a kind pass unchanged. A list (an option given several times) is resolved item by item."""
    if value is None:
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(_with_kind(v) for v in value)  # type: ignore[return-value]
    return _with_kind(value)  # type: ignore[arg-type,return-value]


# --- option types shared by several commands -------------------------------------------------------
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1,
                                       help="Batch budget: images (CLIP/SigLIP) or crops (Phi-3-vision).")]
WorkersOpt = Annotated[int | None, typer.Option("--num-workers", "-j", min=0, help=(
    "Decode/preprocess processes; 0 = in-process threads between model calls "
    "(default: min(4, CPUs) with a GPU, 0 on the CPU)."))]
ColumnOpt = Annotated[str | None, typer.Option("--column", help=(
    "Table/dataset column holding the inputs (default: guessed from names and types)."))]
SplitOpt = Annotated[str, typer.Option("--split", help="Split of an hf: dataset.")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")]
AutoProgressOpt = Annotated[bool | None, typer.Option("--progress/--no-progress", help=(
    "Show progress on stderr (default: when stderr is a terminal)."))]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON instead of a table.")]
EmbDirArg = Annotated[Path, typer.Argument(help="An output folder of `phiclip embed` (holds manifest.json).")]
QueryDeviceOpt = Annotated[str, typer.Option("--device", help="Where the query encoder runs: auto, cpu, cuda, cuda:1 ...")]
QueryPrecisionOpt = Annotated[QueryPrecision, typer.Option("--precision", help=(
    "Compute dtype (auto: bfloat16 on CUDA, float32 on CPU)."))]
AllowIncompleteOpt = Annotated[bool, typer.Option("--allow-incomplete", help=(
    "Use the shards of an unfinished `phiclip embed` run (manifest 'complete' false) instead of refusing it."))]
ModelOverrideOpt = Annotated[str | None, typer.Option("--model", "-m", callback=spec_with_kind, help=(
    "The encoder spec to use in place of the one the output records (its checkpoint moved): "
    "clip:NEW_PATH ...; refused when its weights differ from the recorded ones."))]
AllowOtherWeightsOpt = Annotated[bool, typer.Option("--allow-other-weights", help=(
    "With --model: accept weights other than the ones that made the vectors (scores may then mean nothing)."))]
MaxPixelsOpt = Annotated[int, typer.Option("--max-pixels", min=0, help=(
    "Leave out (and list) images with more pixels (decompression bombs); 0 = no limit."))]
ImageColumnOpt = Annotated[str | None, typer.Option("--image-column", "--column", help=(
    "Table/dataset column of the images (default: guessed from names and types)."))]
LabelColumnOpt = Annotated[str | None, typer.Option("--label-column", help="Table/dataset column of the labels.")]
CaptionColumnOpt = Annotated[str | None, typer.Option("--caption-column", help="Table/dataset column of the captions.")]
FetchTimeoutOpt = Annotated[float, typer.Option("--fetch-timeout", min=0.01, help=(
    "URLs: seconds without a byte before a fetch fails (retried; connect timeout the same, at most 10 s)."))]
FetchRetriesOpt = Annotated[int, typer.Option("--fetch-retries", min=0, help=(
    "URLs: retries on timeouts, 5xx and 429 (with backoff; Retry-After honoured)."))]
TemplateOpt = Annotated[list[str] | None, typer.Option("--template", help=(
    "Zero-shot prompt template with {c} for the class name; repeat for several (default: a generic set)."))]


# --- messages ----------------------------------------------------------------------------------------
def progress_wanted(progress: bool | None) -> bool:
    """``--progress`` / ``--no-progress`` as given, else whether stderr is a terminal (no bars in logs)."""
    return sys.stderr.isatty() if progress is None else progress


def say(message: Any) -> None:
    """Print a progress line of a long command, control characters in it escaped."""
    typer.echo(escape_control(message, keep_newlines=True))


def say_dim(err: Console) -> Callable[[str], None]:
    """A progress callback printing dim lines on ``err`` (user data in them escaped)."""
    return lambda msg: err.print(safe_text(msg, "dim"), highlight=False, soft_wrap=True)


def fail_cli(e: BaseException | str, code: int = 1) -> NoReturn:
    """Print ``error: MESSAGE`` on stderr (the message escaped: it often holds file names) and exit ``code``."""
    Console(stderr=True).print(Text.assemble(("error:", "red"), " ", safe_text(e, keep_newlines=True)),
                               highlight=False, soft_wrap=True)
    raise typer.Exit(code) from None


@contextmanager
def api_errors() -> Iterator[None]:
    """Turn the API's errors for bad input (``ValueError``, ``RuntimeError``, ``OSError``) into ``error: ...``
    and exit code 1, never a traceback."""
    try:
        yield
    except (ValueError, RuntimeError, OSError) as e:
        fail_cli(e)


def interrupted(message: str) -> NoReturn:
    """Say that the command was interrupted (``interrupted: MESSAGE``) and exit 130."""
    Console(stderr=True).print(Text.assemble(("interrupted", "yellow"), safe_text(f": {message}")),
                               highlight=False, soft_wrap=True)
    raise typer.Exit(130) from None


def echo_json(data: Any, indent: int = 2) -> None:
    """Print ``data`` as JSON (values JSON cannot hold as their ``str``)."""
    typer.echo(json.dumps(data, indent=indent, default=str))


# --- summary tables ----------------------------------------------------------------------------------
def print_rows(title: str, rows: list[tuple[str, Any]]) -> None:
    """A two-column table (what, value) under ``title``, everything escaped; ``None`` shows as ``-``."""
    table = Table(title=safe_text(title), show_header=False, title_justify="left")
    table.add_column("what")
    table.add_column("value", overflow="fold")
    for name, value in rows:
        table.add_row(safe_text(name), safe_text("-" if value is None else value))
    Console().print(table)


def left_out_table(title: str, rows: list[tuple[Any, Any, Any]]) -> Table:
    """The table of inputs a command left out: source, stage, reason (escaped)."""
    t = Table(title=title, title_justify="left")
    t.add_column("source", overflow="fold")
    t.add_column("stage")
    t.add_column("reason", overflow="fold")
    for source, stage, reason in rows:
        t.add_row(safe_text("" if source is None else source), safe_text(stage or ""), safe_text(reason or ""))
    return t


def print_left_out_items(items: list[dict[str, str]], out: Console) -> None:
    """Name the images a command left out (``{"source", "stage", "reason"}``), the first ``LEFT_OUT_SHOWN``."""
    if not items:
        return
    shown = f"the first {LEFT_OUT_SHOWN} of {len(items)}" if len(items) > LEFT_OUT_SHOWN else f"all {len(items)}"
    rows = [(i["source"], i["stage"], i["reason"]) for i in items[:LEFT_OUT_SHOWN]]
    out.print(left_out_table(f"Left out ({shown}; every one is in the JSON result)", rows))


def enum_values(**kw: Any) -> dict[str, Any]:
    """Keyword arguments with every enum member replaced by its value (what the API functions take)."""
    return {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in kw.items()}


def split_csv(text: str) -> tuple[str, ...]:
    """``"a, b,,c"`` -> ``("a", "b", "c")``."""
    return tuple(t.strip() for t in text.split(",") if t.strip())
