"""The ``phiclip`` command line: thin; parses, calls the Python API, prints.

Each command lives in the section of the capability it belongs to.
"""

from __future__ import annotations

import enum
import logging
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from typer.core import TyperGroup

# Light imports only (numpy, PIL): torch, transformers and faiss load inside the commands.
from phiclip.comparison import runner as _compare_runner
from phiclip.pipeline.runner import EmbedOptions as _EmbedOptions

_UNQUOTED_GLOB_HINT = (
    "\nIf you passed a glob such as imgs/*.jpg without quotes, the shell expanded it into many arguments: "
    "quote it (-i 'imgs/**/*.jpg') so that phiclip expands it itself."
)


class _PhiclipGroup(TyperGroup):
    """The root command group: usage errors that come from a shell-expanded glob say how to quote it."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as e:
            # click's UsageError (typer may carry its own copy of click, so matched by name)
            usage = any(c.__name__ == "UsageError" for c in type(e).__mro__)
            if usage and "unexpected extra argument" in str(getattr(e, "message", "")).lower():
                e.message += _UNQUOTED_GLOB_HINT  # type: ignore[attr-defined]
            raise


app = typer.Typer(
    name="phiclip",
    cls=_PhiclipGroup,
    help="Image embeddings with CLIP and Phi-3-vision's image encoder, side by side.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # click's plain help: option names, then the help text wrapped to the terminal (rich's three-column
    # panels leave a 20-character column for the text in an 80-column terminal).
    rich_markup_mode=None,
)


class _ConsoleLogHandler(logging.Handler):
    """phiclip's logged warnings on stderr, as ``warning: ...``, with user data in them escaped."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from rich.console import Console
            from rich.text import Text

            from phiclip.console import safe_text

            label = "error: " if record.levelno >= logging.ERROR else "warning: "
            line = Text(label, style="red" if record.levelno >= logging.ERROR else "yellow")
            line.append_text(safe_text(self.format(record), keep_newlines=True))
            Console(stderr=True, soft_wrap=True).print(line, highlight=False)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def _log_to_console() -> None:
    """Show the warnings of phiclip's modules (a damaged index rebuilt, other weights...) on stderr."""
    logger = logging.getLogger("phiclip")
    if not any(isinstance(h, _ConsoleLogHandler) for h in logger.handlers):
        logger.addHandler(_ConsoleLogHandler(level=logging.WARNING))


def _print_version(value: bool) -> None:
    if value:
        from phiclip import __version__

        typer.echo(f"phiclip {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print phiclip's version and exit.")] = False,
) -> None:
    """Image embeddings with CLIP and Phi-3-vision's image encoder, side by side."""
    _log_to_console()


@app.command()
def version() -> None:
    """Print phiclip's version."""
    from phiclip import __version__

    typer.echo(__version__)


# === embed / embed-text (pipeline) ===========================================================
# Defaults come from EmbedOptions (declared once there).


_EMBED_DEFAULTS = _EmbedOptions()


class _VectorDtype(str, enum.Enum):
    float16 = "float16"
    float32 = "float32"


class _Precision(str, enum.Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"
    int8 = "int8"


_ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Encoder spec: clip:DIR_OR_HUB_ID, siglip:..., phi3v:...?num_crops=4.")]
_OutputOpt = Annotated[Path, typer.Option("--output", "-o", help="Output folder (rerun the same command to resume).")]
_BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1,
                                        help="Batch budget: images (CLIP/SigLIP) or crops (Phi-3-vision).")]
_WorkersOpt = Annotated[int | None, typer.Option("--num-workers", "-j", min=0,
                                                 help="Decode/preprocess processes; 0 = in-process threads between model calls "
                                                      "(default: min(4, CPUs) with a GPU, 0 on the CPU).")]
_TextBatchOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Texts per model call.")]
_ShardOpt = Annotated[int, typer.Option("--shard-size", min=1, help="Inputs per output shard (the unit of resume).")]
_DtypeOpt = Annotated[_VectorDtype, typer.Option("--dtype", help="dtype of the stored vectors.")]
_DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:1 ...")]
_PrecisionOpt = Annotated[_Precision, typer.Option("--precision", help=(
    "Compute precision (auto: bfloat16 on CUDA; on the CPU bfloat16 where it measured faster than float32, else "
    "float32; int8: CPU, CLIP/SigLIP/Phi-3-vision, int8 weights and activations)."))]
_ColumnOpt = Annotated[str | None, typer.Option("--column", help="Table/dataset column holding the inputs (default: guessed from names and types).")]
_SplitOpt = Annotated[str, typer.Option("--split", help="Split of an hf: dataset.")]
_ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")]
_JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON instead of a table.")]


def _embed_settings(**kw: Any) -> dict[str, Any]:
    return {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in kw.items()}


def _run_embed(fn_name: str, model: str, input: str, output: Path, settings: dict[str, Any], as_json: bool) -> None:
    import json

    from rich.console import Console
    from rich.text import Text

    from phiclip.console import safe_text
    from phiclip.pipeline import runner

    err = Console(stderr=True)
    try:
        result = getattr(runner, fn_name)(model, input, output, **settings)
    except KeyboardInterrupt:
        err.print(Text.assemble(("interrupted", "yellow"), safe_text(
            f": the shards already written in {output} are kept; rerun the same command to resume")),
                  highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    except (ValueError, RuntimeError, OSError) as e:
        _fail_cli(e)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    _print_embed_summary(result)


def _print_embed_summary(result: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    from phiclip.console import safe_text

    out = Console()
    if result.status == "already_complete":
        out.print(safe_text(f"Nothing to do: {result.output} is already complete "
                            f"({result.embedded} embedded, {result.failed} failed of {result.inputs} inputs)."),
                  highlight=False, soft_wrap=True)
        _print_disappeared(result, out)
        return
    table = Table(title=safe_text(f"phiclip embed -> {result.output}"), show_header=False, title_justify="left")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("inputs", str(result.inputs))
    table.add_row("embedded (in the output)", str(result.embedded))
    table.add_row("failed (in the output)", f"{result.failed}" + (" (see errors/)" if result.failed else ""))
    table.add_row("done by this run", str(result.processed))
    if result.skipped:
        table.add_row("done by an earlier run (kept)", str(result.skipped))
    if result.duplicates:
        table.add_row("duplicates (listed once)", str(result.duplicates))
    if result.ignored:
        table.add_row("ignored (not inputs)", f"{result.ignored} (listed in errors/, stage skip)")
    # Both on the whole command's wall time, so that time x rate = what this run did.
    rate = result.processed / result.seconds if result.seconds > 0 else 0.0
    table.add_row("time", f"{result.seconds:.1f} s")
    table.add_row("per second", f"{rate:.1f}")
    stages = ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items() if k != "loop")
    table.add_row("stages", stages)
    out.print(table)
    _print_disappeared(result, out)
    _print_left_out(Path(result.output), out)


def _print_disappeared(result: Any, out: Any) -> None:
    """Name the inputs in the output that are no longer listed (`embed --update`), and the pruned count."""
    from phiclip.console import safe_text

    if getattr(result, "pruned", 0):
        out.print(safe_text(f"Removed the rows of {result.pruned} inputs that are no longer in the input (--prune)."),
                  highlight=False, soft_wrap=True)
    gone = list(getattr(result, "disappeared_sources", []))
    if gone:
        shown = "; ".join(gone[:_LEFT_OUT_SHOWN]) + (f"; and {len(gone) - _LEFT_OUT_SHOWN} more" if len(gone) > _LEFT_OUT_SHOWN else "")
        out.print(safe_text(f"{len(gone)} inputs in the output are no longer in the input (kept; --update --prune "
                            f"removes them): {shown}"), highlight=False, soft_wrap=True)


#: How many rows of errors/ the end summary of `phiclip embed` lists.
_LEFT_OUT_SHOWN = 10


def _print_left_out(output: Path, out: Any) -> None:
    """List the first rows of OUTPUT/errors/ (source, stage, reason), file names escaped."""
    import pyarrow.parquet as pq
    from rich.table import Table

    from phiclip import schema
    from phiclip.console import safe_text

    rows: list[tuple[Any, ...]] = []
    total = 0
    edir = output / schema.ERRORS_DIR
    wanted = (schema.COL_SOURCE, schema.COL_STAGE, schema.COL_REASON)
    for f in sorted(edir.glob("*.parquet")) if edir.is_dir() else []:
        if f.name.startswith((".", "_")):
            continue
        try:
            if len(rows) >= _LEFT_OUT_SHOWN:  # only count the rest
                total += pq.ParquetFile(f).metadata.num_rows
                continue
            names = set(pq.read_schema(f).names)
            table = pq.read_table(f, columns=[c for c in wanted if c in names])
        except Exception:  # noqa: BLE001 - a damaged errors file must not hide the summary
            continue
        total += table.num_rows
        cols = [table.column(c).to_pylist() if c in names else [None] * table.num_rows for c in wanted]
        rows.extend(list(zip(*cols, strict=True))[: _LEFT_OUT_SHOWN - len(rows)])
    if not rows:
        return
    shown = f"the first {len(rows)} of {total}" if total > len(rows) else f"all {total}"
    t = Table(title=f"Not embedded ({shown}; every one is in {schema.ERRORS_DIR}/)", title_justify="left")
    t.add_column("source", overflow="fold")
    t.add_column("stage")
    t.add_column("reason", overflow="fold")
    for source, stage, reason in rows:
        t.add_row(safe_text("" if source is None else source), safe_text(stage or ""), safe_text(reason or ""))
    out.print(t)


class _Engine(str, enum.Enum):
    local = "local"
    ray = "ray"


_UpdateOpt = Annotated[bool, typer.Option("--update", help=(
    "Embed only the inputs that are not in OUTPUT yet (a folder that grew) into new shards; inputs that "
    "disappeared are reported and kept."))]
_PruneOpt = Annotated[bool, typer.Option("--prune", help="With --update: also remove the rows of inputs that disappeared.")]
_FlushOpt = Annotated[float, typer.Option("--flush-seconds", min=0, help=(
    "Write partial work at least this often, so a crash loses at most about this much; 0 = whole shards only."))]
_EngineOpt = Annotated[_Engine, typer.Option("--engine", help=(
    "local: this machine; ray: Ray Data on a local Ray instance (every GPU) or a cluster (--ray-address)."))]
_RayAddressOpt = Annotated[str | None, typer.Option("--ray-address", help=(
    "--engine ray: the cluster to join (auto, ray://HOST:10001); default: a running local instance, or a new one."))]
_GpusPerActorOpt = Annotated[float | None, typer.Option("--gpus-per-actor", min=0, help=(
    "--engine ray: GPUs per encoding actor (0.5: two actors share a GPU); default 1 with GPUs, else 0."))]
_ActorsOpt = Annotated[int | None, typer.Option("--num-actors", min=1, help=(
    "--engine ray: encoding actors (default: one per GPU, or one without GPUs)."))]


@app.command("embed")
def embed_cmd(
    model: _ModelOpt,
    input: Annotated[str, typer.Option("--input", "-i", help=(
        "A folder (recursive), a quoted glob ('imgs/**/*.jpg'), a .txt list of paths, a Parquet/CSV table "
        "with a path or bytes column, or hf:DATASET (hub id, data folder or save_to_disk folder)."))],
    output: _OutputOpt,
    batch_size: _BatchOpt = _EMBED_DEFAULTS.batch_size,
    num_workers: _WorkersOpt = _EMBED_DEFAULTS.num_workers,
    shard_size: _ShardOpt = _EMBED_DEFAULTS.shard_size,
    dtype: _DtypeOpt = _VectorDtype(_EMBED_DEFAULTS.dtype),
    device: _DeviceOpt = _EMBED_DEFAULTS.device,
    precision: _PrecisionOpt = _Precision(_EMBED_DEFAULTS.precision),
    max_pixels: Annotated[int, typer.Option("--max-pixels", min=0,
                                            help="Refuse images with more pixels (decompression bombs); 0 = no limit.")]
    = _EMBED_DEFAULTS.max_pixels or 0,
    tokens: Annotated[bool, typer.Option("--tokens", help="Phi-3-vision: also write full token sequences to tokens/.")]
    = _EMBED_DEFAULTS.tokens,
    update: _UpdateOpt = _EMBED_DEFAULTS.update,
    prune: _PruneOpt = _EMBED_DEFAULTS.prune,
    flush_seconds: _FlushOpt = _EMBED_DEFAULTS.flush_seconds or 0,
    engine: _EngineOpt = _Engine(_EMBED_DEFAULTS.engine),
    ray_address: _RayAddressOpt = _EMBED_DEFAULTS.ray_address,
    gpus_per_actor: _GpusPerActorOpt = _EMBED_DEFAULTS.gpus_per_actor,
    num_actors: _ActorsOpt = _EMBED_DEFAULTS.num_actors,
    column: _ColumnOpt = _EMBED_DEFAULTS.column,
    split: _SplitOpt = _EMBED_DEFAULTS.split,
    progress: _ProgressOpt = _EMBED_DEFAULTS.progress,
    as_json: _JsonOpt = False,
) -> None:
    """Embed every image of INPUT into Parquet shards in OUTPUT (resumable; bad inputs go to errors/)."""
    settings = _embed_settings(batch_size=batch_size, num_workers=num_workers, shard_size=shard_size, dtype=dtype,
                               device=device, precision=precision, max_pixels=max_pixels or None, tokens=tokens,
                               column=column, split=split, progress=progress, update=update, prune=prune,
                               flush_seconds=flush_seconds or None, engine=engine, ray_address=ray_address,
                               gpus_per_actor=gpus_per_actor, num_actors=num_actors)
    _run_embed("embed", model, input, output, settings, as_json)


@app.command("embed-text")
def embed_text_cmd(
    model: _ModelOpt,
    input: Annotated[str, typer.Option("--input", "-i", help=(
        "A .txt file (one text per line), a Parquet/CSV table with a text column, or hf:DATASET."))],
    output: _OutputOpt,
    batch_size: _TextBatchOpt = _EMBED_DEFAULTS.batch_size,
    shard_size: _ShardOpt = _EMBED_DEFAULTS.shard_size,
    dtype: _DtypeOpt = _VectorDtype(_EMBED_DEFAULTS.dtype),
    device: _DeviceOpt = _EMBED_DEFAULTS.device,
    precision: _PrecisionOpt = _Precision(_EMBED_DEFAULTS.precision),
    column: _ColumnOpt = _EMBED_DEFAULTS.column,
    split: _SplitOpt = _EMBED_DEFAULTS.split,
    progress: _ProgressOpt = _EMBED_DEFAULTS.progress,
    as_json: _JsonOpt = False,
) -> None:
    """Embed texts with a CLIP-like model into Parquet shards in OUTPUT (same layout as embed)."""
    settings = _embed_settings(batch_size=batch_size, shard_size=shard_size, dtype=dtype, device=device,
                               precision=precision, column=column, split=split, progress=progress)
    _run_embed("embed_text", model, input, output, settings, as_json)


# === index / search / eval ===================================================================


class _IndexType(str, enum.Enum):
    auto = "auto"
    flat = "flat"
    hnsw = "hnsw"
    ivf = "ivf"


class _EvalTask(str, enum.Enum):
    zeroshot = "zeroshot"
    knn = "knn"
    linear_probe = "linear-probe"
    retrieval = "retrieval"


class _QueryPrecision(str, enum.Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


_EmbDirArg = Annotated[Path, typer.Argument(help="An output folder of `phiclip embed` (holds manifest.json).")]
_QueryDeviceOpt = Annotated[str, typer.Option("--device", help="Where the query encoder runs: auto, cpu, cuda, cuda:1 ...")]
_QueryPrecisionOpt = Annotated[_QueryPrecision, typer.Option("--precision", help="Compute dtype (auto: bfloat16 on CUDA, float32 on CPU).")]


def _say(message: Any) -> None:
    """Print a progress line of a long command, control characters in it escaped."""
    from phiclip.console import escape_control

    typer.echo(escape_control(message, keep_newlines=True))


def _fail_cli(e: BaseException) -> NoReturn:
    """Print ``error: MESSAGE`` on stderr (the message escaped: it often holds file names) and exit 1."""
    from rich.console import Console
    from rich.text import Text

    from phiclip.console import safe_text

    Console(stderr=True).print(Text.assemble(("error:", "red"), " ", safe_text(e, keep_newlines=True)),
                               highlight=False, soft_wrap=True)
    raise typer.Exit(1) from None


_AllowIncompleteOpt = Annotated[bool, typer.Option("--allow-incomplete", help=(
    "Use the shards of an unfinished `phiclip embed` run (manifest 'complete' false) instead of refusing it."))]


@app.command("index")
def index_cmd(
    emb_dir: _EmbDirArg,
    index_type: Annotated[_IndexType, typer.Option("--type", help=(
        "auto: exact (flat) up to 100k vectors, HNSW up to 1M, IVF beyond."))] = _IndexType.auto,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even when the index is up to date.")] = False,
    allow_incomplete: _AllowIncompleteOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the index description as JSON.")] = False,
) -> None:
    """Build the FAISS index of EMB_DIR under EMB_DIR/index/ and print its measured recall@10."""
    import json

    from rich.console import Console
    from rich.table import Table

    from phiclip.console import safe_text
    from phiclip.retrieval import build_index

    try:
        info = build_index(emb_dir, index_type=index_type.value, force=force, allow_incomplete=allow_incomplete)
    except (ValueError, RuntimeError, OSError) as e:
        _fail_cli(e)
    if as_json:
        typer.echo(json.dumps({**info.to_meta(), "path": info.path, "built_now": info.built_now}, indent=2))
        return
    recall = "n/a (fewer than 2 vectors)" if info.recall_at_10 is None else f"{info.recall_at_10:.4f}"
    table = Table(title=safe_text(f"phiclip index -> {info.path}" + ("" if info.built_now else " (up to date, not rebuilt)")),
                  show_header=False, title_justify="left")
    table.add_column("what")
    table.add_column("value")
    table.add_row("type", info.type + (" (exact)" if info.type == "flat" else " (approximate)"))
    table.add_row("vectors", f"{info.n} x {info.dim}")
    table.add_row("recall@10 vs exact", f"{recall} on {info.recall_queries} sample queries")
    if info.params:
        table.add_row("parameters", ", ".join(f"{k}={v}" for k, v in info.params.items()))
    table.add_row("encoder", safe_text(info.encoder_spec))
    table.add_row("build time", f"{info.build_seconds:.2f} s")
    Console().print(table)


@app.command("search")
def search_cmd(
    emb_dir: _EmbDirArg,
    text: Annotated[str | None, typer.Option("--text", "-t", help="A text query (needs a CLIP-like encoder).")] = None,
    image: Annotated[Path | None, typer.Option("--image", "-i", help="An image file as the query.")] = None,
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="Number of results.")] = 10,
    device: _QueryDeviceOpt = "auto",
    precision: _QueryPrecisionOpt = _QueryPrecision.auto,
    allow_incomplete: _AllowIncompleteOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the hits as a JSON list.")] = False,
    model: Annotated[str | None, typer.Option("--model", "-m", help=(
        "Encoder spec to embed the query with (default: the one the manifest records), e.g. where the "
        "checkpoint moved."))] = None,
    allow_other_weights: Annotated[bool, typer.Option("--allow-other-weights", help=(
        "Query even when the encoder's weights fingerprint differs from the one the vectors were made with."))] = False,
) -> None:
    """Print the K stored items nearest (cosine) to a text or image query, embedded with the index's encoder."""
    import json

    from rich.console import Console
    from rich.table import Table

    from phiclip.console import safe_text
    from phiclip.retrieval import index_is_fresh, search
    from phiclip.schema import MANIFEST_FILE

    if (text is None) == (image is None):
        _fail_cli(ValueError("give exactly one query: --text 'a red car' or --image path.jpg"))
    try:
        if not as_json and (emb_dir / MANIFEST_FILE).is_file() and not index_is_fresh(emb_dir):
            Console(stderr=True).print(safe_text(f"building the index of {emb_dir} (once; `phiclip index` does it ahead)",
                                                 "dim"), highlight=False, soft_wrap=True)
        hits = search(emb_dir, text=text, image=image, k=k, device=device, dtype=precision.value,
                      allow_incomplete=allow_incomplete, model=model, allow_other_weights=allow_other_weights)
    except (ValueError, RuntimeError, OSError) as e:
        _fail_cli(e)
    if as_json:
        typer.echo(json.dumps([h.to_dict() for h in hits], indent=2))
        return
    query = f"text {text!r}" if text is not None else f"image {image}"
    table = Table(title=safe_text(f"{len(hits)} nearest to {query}"), title_justify="left")
    table.add_column("rank", justify="right")
    table.add_column("score", justify="right")
    table.add_column("source", overflow="fold")
    table.add_column("id", style="dim", overflow="ellipsis", no_wrap=True, max_width=12)
    for h in hits:
        table.add_row(str(h.rank), f"{h.score:.4f}", safe_text(h.source), safe_text(h.id))
    Console().print(table)


_EvalMaxPixelsOpt = Annotated[int, typer.Option("--max-pixels", min=0, help=(
    "Leave out (and list) images with more pixels (decompression bombs); 0 = no limit."))]
_ImageColumnOpt = Annotated[str | None, typer.Option("--image-column", "--column", help=(
    "Table/dataset column of the images (default: guessed from names and types)."))]
_LabelColumnOpt = Annotated[str | None, typer.Option("--label-column", help="Table/dataset column of the labels.")]
_CaptionColumnOpt = Annotated[str | None, typer.Option("--caption-column", help="Table/dataset column of the captions.")]


@app.command("eval")
def eval_cmd(
    model: Annotated[str, typer.Option("--model", "-m", help="Encoder spec: clip:DIR_OR_HUB_ID, siglip:..., phi3v:...")],
    task: Annotated[_EvalTask, typer.Option("--task", help=(
        "zeroshot (CLIP-like), knn or linear-probe (any encoder), retrieval (image-text, CLIP-like)."))],
    data: Annotated[str, typer.Option("--data", "-d", help=(
        "A folder per class (optionally under train/ and test/), a CSV/Parquet table with image and "
        "label or caption columns, or hf:DATASET[?config=CFG&split=SPLIT] (hub id, local folder, save_to_disk "
        "folder)."))],
    split: Annotated[str | None, typer.Option("--split", help=(
        "Split to evaluate on, overriding hf:...?split= (default: test/validation when the data has splits; "
        "hf: accepts test[:500]).")) ] = None,
    train_split: Annotated[str | None, typer.Option("--train-split", help=(
        "knn/linear-probe: the split to train on (default: the data's train split, else a seeded stratified split)."))]
    = None,
    template: Annotated[list[str] | None, typer.Option("--template", help=(
        "Zero-shot prompt template with {c} for the class name; repeat for several (default: a generic set)."))]
    = None,
    templates_file: Annotated[Path | None, typer.Option("--templates", help="A file of templates, one per line.")] = None,
    classnames: Annotated[Path | None, typer.Option("--classnames", help=(
        "Zero-shot: a file of class names in label order, one per line (default: the data's names)."))] = None,
    k: Annotated[int, typer.Option("--k", min=1, help="Neighbours for knn.")] = 20,
    test_fraction: Annotated[float, typer.Option("--test-fraction", min=0.01, max=0.99, help=(
        "knn/linear-probe without given splits: the share held out for testing."))] = 0.3,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the stratified split and of the probe's validation split.")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per forward pass.")] = 32,
    max_pixels: _EvalMaxPixelsOpt = _compare_runner.DEFAULT_MAX_PIXELS,
    device: _QueryDeviceOpt = "auto",
    precision: _QueryPrecisionOpt = _QueryPrecision.auto,
    image_column: _ImageColumnOpt = None,
    label_column: _LabelColumnOpt = None,
    caption_column: _CaptionColumnOpt = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the result as JSON to this file.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON instead of a table.")] = False,
) -> None:
    """Evaluate an encoder on labelled or captioned images (CLIP_benchmark's protocol) and print the metrics."""
    import json

    from rich.console import Console
    from rich.table import Table

    from phiclip.console import safe_text
    from phiclip.evaluate import evaluate

    if template and templates_file:
        _fail_cli(ValueError("give --template or --templates, not both"))
    try:
        result = evaluate(
            model, task.value, data, split=split, train_split=train_split,
            templates=template or (str(templates_file) if templates_file else None),
            classnames=str(classnames) if classnames else None, k=k, test_fraction=test_fraction, seed=seed,
            batch_size=batch_size, max_pixels=max_pixels or None, device=device, dtype=precision.value,
            image_column=image_column, label_column=label_column, caption_column=caption_column,
        )
        if output is not None:
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    except (ValueError, RuntimeError, OSError) as e:
        _fail_cli(e)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    table = Table(title=safe_text(f"phiclip eval: {result['task']} of {result['model']} on {result['data']}"),
                  title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in result["metrics"].items():
        table.add_row(safe_text(name), f"{value:.4f}")
    for name, value in result["details"].items():
        table.add_row(safe_text(name, "dim"), safe_text(value, "dim"))
    out = Console()
    out.print(table)
    _print_left_out_items(result["left_out"]["items"], out)
    if output is not None:
        out.print(safe_text(f"Written: {output}"), highlight=False, soft_wrap=True)


def _print_left_out_items(items: list[dict[str, str]], out: Any) -> None:
    """Name the images a command left out (source, stage, reason), file names escaped."""
    from rich.table import Table

    from phiclip.console import safe_text

    if not items:
        return
    shown = f"the first {_LEFT_OUT_SHOWN} of {len(items)}" if len(items) > _LEFT_OUT_SHOWN else f"all {len(items)}"
    t = Table(title=f"Left out ({shown}; every one is in the JSON result)", title_justify="left")
    t.add_column("source", overflow="fold")
    t.add_column("stage")
    t.add_column("reason", overflow="fold")
    for item in items[:_LEFT_OUT_SHOWN]:
        t.add_row(safe_text(item["source"]), safe_text(item["stage"]), safe_text(item["reason"]))
    out.print(t)


# === compare =================================================================================
# Defaults come from phiclip.comparison.runner (declared once there); importing it loads numpy only.


class _ComparePrecision(str, enum.Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


@app.command("compare")
def compare_cmd(
    model: Annotated[list[str], typer.Option("--model", "-m", help=(
        "Encoder spec, given two or more times: clip:DIR_OR_HUB_ID, phi3v:...?num_crops=4, ...; "
        "the first is A, the second B."))],
    data: Annotated[str, typer.Option("--data", "-d", help=(
        "Images to compare on: a folder per class, a CSV/Parquet table (image, label and/or caption "
        "columns; captions enable retrieval), hf:DATASET[?config=CFG&split=SPLIT], or a quoted glob."))],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for report.html, report.json and embeddings/.")],
    k: Annotated[int, typer.Option("--k", min=1, help="Neighbours for the k-NN overlap and the kNN classifier.")]
    = _compare_runner.DEFAULT_K,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:1 ...")] = "auto",
    precision: Annotated[_ComparePrecision, typer.Option("--precision", help=(
        "Compute dtype (auto: bfloat16 on CUDA, float32 on CPU)."))] = _ComparePrecision.auto,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per forward pass.")]
    = _compare_runner.DEFAULT_BATCH_SIZE,
    max_images: Annotated[int | None, typer.Option("--max-images", min=2, help=(
        "Compare at most this many images, spread evenly over the data."))] = None,
    passes: Annotated[int, typer.Option("--passes", min=1, help=(
        "Timed passes over the images: speed is the median pass, shown with the slowest and fastest."))]
    = _compare_runner.DEFAULT_PASSES,
    max_pixels: _EvalMaxPixelsOpt = _compare_runner.DEFAULT_MAX_PIXELS,
    split: Annotated[str | None, typer.Option("--split", help=(
        "One split of the data (a split folder, a split column's value, or an hf: split).")) ] = None,
    image_column: _ImageColumnOpt = None,
    label_column: _LabelColumnOpt = None,
    caption_column: _CaptionColumnOpt = None,
    template: Annotated[list[str] | None, typer.Option("--template", help=(
        "Zero-shot prompt template with {c} for the class name; repeat for several (default: a generic set)."))]
    = None,
    in_process: Annotated[bool, typer.Option("--in-process", help=(
        "Run every encoder in this process (starts faster; peak memory per encoder is then less exact)."))]
    = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print report.json instead of the tables.")] = False,
) -> None:
    """Embed the same images with each encoder and report cost, quality and structure side by side
    (report.html, report.json and a table here)."""
    import json

    from rich.console import Console

    from phiclip.comparison.report import print_report
    from phiclip.console import safe_text

    err = Console(stderr=True)
    try:
        options = _compare_runner.CompareOptions(
            k=k, device=device, dtype=precision.value, batch_size=batch_size, passes=passes,
            max_pixels=max_pixels or None, max_images=max_images, templates=tuple(template or ()) or None,
            isolate=not in_process, split=split, image_column=image_column, label_column=label_column,
            caption_column=caption_column,
        )
        report = _compare_runner.compare(
            model, data, output, options,
            progress=None if as_json else (lambda msg: err.print(safe_text(msg, "dim"), highlight=False)),
        )
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]")
        raise typer.Exit(130) from None
    except (ValueError, RuntimeError, OSError) as e:
        _fail_cli(e)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=1))
        return
    print_report(report)
    Console().print(safe_text(f"Report: {Path(output) / 'report.html'} (numbers in {Path(output) / 'report.json'})"),
                    highlight=False, soft_wrap=True)


# === demo ====================================================================================
@app.command()
def demo(
    output: Path = typer.Option(Path("demo-output"), "--output", "-o", help="Where everything is written."),
    clip_model: str = typer.Option(None, "--clip-model", envvar="PHICLIP_CLIP_MODEL",
                                   help="A CLIP hub id or local directory (default: openai/clip-vit-base-patch32 when reachable)."),
    phi3v_model: str = typer.Option(None, "--phi3v-model", envvar="PHICLIP_PHI3V_MODEL",
                                    help="A Phi-3-vision hub id or local directory (default: microsoft/Phi-3-vision-128k-instruct when reachable)."),
    tiny: bool = typer.Option(False, "--tiny", help="Use tiny random-weight checkpoints even when real ones are reachable."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1 ..."),
) -> None:
    """Run the main job end to end on sample images: embed with CLIP and Phi-3-vision, index, search, compare."""
    from phiclip.demo import run_demo

    try:
        run_demo(output, clip_model=clip_model, phi3v_model=phi3v_model, tiny=tiny, device=device, say=_say)
    except (ValueError, RuntimeError, OSError) as e:
        from phiclip.console import escape_control

        typer.echo(f"error: {escape_control(e, keep_newlines=True)}", err=True)
        raise typer.Exit(1) from None


# === serve ===================================================================================
# Defaults come from phiclip.serve.options.ServeOptions (declared once there; importing it loads no web stack).


def _serve_defaults() -> Any:
    from phiclip.serve.options import ServeOptions

    return ServeOptions()


_SERVE = _serve_defaults()


@app.command("serve")
def serve_cmd(
    emb_dirs: Annotated[list[Path], typer.Argument(help="Output folders of `phiclip embed` (each becomes a collection).")],
    host: Annotated[str, typer.Option("--host", help="Address to bind (loopback by default; others need --token).")]
    = _SERVE.host,
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port to bind.")] = _SERVE.port,
    token: Annotated[str | None, typer.Option("--token", envvar="PHICLIP_TOKEN", help=(
        "Require 'Authorization: Bearer TOKEN' on every route but /healthz (the page: open /?token=TOKEN once)."))]
    = _SERVE.token,
    device: _QueryDeviceOpt = _SERVE.device,
    precision: _QueryPrecisionOpt = _QueryPrecision(_SERVE.precision),
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="Most inputs per encoder call.")] = _SERVE.max_batch,
    batch_wait_ms: Annotated[float, typer.Option("--batch-wait-ms", min=0, help=(
        "How long a request may wait for others to join its batch."))] = _SERVE.batch_wait_ms,
    max_queue: Annotated[int, typer.Option("--max-queue", min=1, help="Most inputs waiting; beyond: 503.")]
    = _SERVE.max_queue,
    timeout: Annotated[float, typer.Option("--timeout", min=0.001, help="Seconds a request may wait for the encoder (503 after).")]
    = _SERVE.timeout_s,
    max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", min=0.001, help="Largest uploaded image (413 beyond).")]
    = _SERVE.max_upload_bytes / 2**20,
    max_inputs: Annotated[int, typer.Option("--max-inputs", min=1, help="Most inputs in one /v1/embeddings request (413 beyond).")]
    = _SERVE.max_inputs,
    allowed_host: Annotated[list[str] | None, typer.Option("--allowed-host", help=(
        "A Host name to accept besides loopback ones (e.g. a reverse proxy's); repeatable."))] = None,
    root_path: Annotated[str, typer.Option("--root-path", help="Path prefix behind a reverse proxy, e.g. /phiclip.")]
    = _SERVE.root_path,
    allow_incomplete: Annotated[bool, typer.Option("--allow-incomplete", help=(
        "Serve outputs of unfinished `phiclip embed` runs instead of refusing them."))] = _SERVE.allow_incomplete,
) -> None:
    """Serve a search page and an embeddings API (OpenAI-style /v1/embeddings) over EMB_DIRS."""
    import dataclasses

    options = dataclasses.replace(
        _SERVE, host=host, port=port, token=token, device=device, precision=precision.value, max_batch=max_batch,
        batch_wait_ms=batch_wait_ms, max_queue=max_queue, timeout_s=timeout, max_upload_bytes=int(max_upload_mb * 2**20),
        max_inputs=max_inputs, allowed_hosts=tuple(allowed_host or ()), root_path=root_path,
        allow_incomplete=allow_incomplete,
    )
    try:
        from phiclip.serve import run_server

        run_server(emb_dirs, options, say=_say)
    except (ValueError, RuntimeError, OSError, ImportError) as e:
        _fail_cli(e)


# === finetune / classify =====================================================================
# Defaults come from the options dataclasses in phiclip.finetune (declared once there; importing
# them loads numpy and PIL only).
from phiclip.finetune.adapter import AdapterOptions as _AdapterOptions  # noqa: E402
from phiclip.finetune.clip import ClipFinetuneOptions as _ClipOptions  # noqa: E402
from phiclip.finetune.probe import ProbeOptions as _ProbeOptions  # noqa: E402

_FT_CLIP, _FT_PROBE, _FT_ADAPTER = _ClipOptions(), _ProbeOptions(), _AdapterOptions()

finetune_app = typer.Typer(
    name="finetune", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Fine-tune: contrastive CLIP/SigLIP training, probes on frozen embeddings, a student tower for Phi-3-vision.",
)
app.add_typer(finetune_app, name="finetune")


class _Freeze(str, enum.Enum):
    none = "none"
    vision = "vision"
    text = "text"
    projections = "projections"


class _TrainPrecision(str, enum.Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"


class _ClassWeights(str, enum.Enum):
    balanced = "balanced"
    none = "none"


class _TeacherTokens(str, enum.Enum):
    cache = "cache"
    stream = "stream"


_StepsOpt = Annotated[int | None, typer.Option("--steps", min=1, help="Optimizer steps (or --epochs).")]
_EpochsOpt = Annotated[float | None, typer.Option("--epochs", min=0.0, help="Passes over the training images (default 1).")]
_GradAccumOpt = Annotated[int, typer.Option("--grad-accum", min=1, help="Micro-batches summed per optimizer step.")]
_WarmupOpt = Annotated[float, typer.Option("--warmup", min=0.0, help="Linear warmup: a fraction of the steps (<1) or a step count.")]
_MinLrOpt = Annotated[float, typer.Option("--min-lr-ratio", min=0.0, max=1.0, help="Cosine decay ends at this fraction of --lr.")]
_ClipNormOpt = Annotated[float, typer.Option("--max-grad-norm", min=0.0, help="Gradient clipping by global norm (0: off).")]
_LoraRankOpt = Annotated[int, typer.Option("--lora-rank", min=0, help="LoRA rank (0: off); merged into the weights on save.")]
_LoraAlphaOpt = Annotated[float, typer.Option("--lora-alpha", min=0.0, help="LoRA alpha (scale alpha/rank).")]
_LoraTargetsOpt = Annotated[str, typer.Option("--lora-targets", help="Comma-separated module names that get LoRA adapters.")]
_TrainDeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA when present), cpu, cuda, cuda:1 ...")]
_TrainPrecisionOpt = Annotated[_TrainPrecision, typer.Option("--precision", help="auto: bf16 autocast on CUDA, float32 on the CPU.")]
_SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the initialisation, the data order and the held-out split.")]
_SaveEveryOpt = Annotated[int, typer.Option("--save-every", min=0, help="Write a checkpoint every N steps (0: none).")]
_KeepOpt = Annotated[int, typer.Option("--keep-checkpoints", min=0, help="Newest checkpoints kept while running (0: all).")]
_ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the run in --output from its newest checkpoint.")]
_ThreadsOpt = Annotated[int | None, typer.Option("--num-threads", min=1, help="Threads decoding and preprocessing images.")]
_TbOpt = Annotated[bool | None, typer.Option("--tensorboard/--no-tensorboard", help=(
    "Also log to OUTPUT/tensorboard (default: when tensorboard is installed)."))]
_FtJsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]


def _run_training(fn: Any, *args: Any, **kwargs: Any) -> Any:
    from rich.console import Console

    try:
        return fn(*args, **kwargs)
    except KeyboardInterrupt:
        Console(stderr=True).print("[yellow]interrupted[/]: rerun the same command with --resume to continue from the "
                                   "newest checkpoint (--save-every N writes them)")
        raise typer.Exit(130) from None
    except (ValueError, RuntimeError, OSError) as e:
        _fail_cli(e)


def _print_result(title: str, rows: list[tuple[str, Any]], result: Any, as_json: bool) -> None:
    import json

    from rich.console import Console
    from rich.table import Table

    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2, default=str))
        return
    from phiclip.console import safe_text

    table = Table(title=safe_text(title), show_header=False, title_justify="left")
    table.add_column("what")
    table.add_column("value", overflow="fold")
    for name, value in rows:
        table.add_row(safe_text(name), safe_text("-" if value is None else value))
    Console().print(table)


def _before_after(before: dict[str, Any] | None, after: dict[str, Any] | None, keys: tuple[str, ...]) -> list[tuple[str, str]]:
    if before is None or after is None:
        return [("evaluation", "none (no held-out images)")]
    return [(k, f"{before[k]:.4f} -> {after[k]:.4f}") for k in keys if k in before and k in after]


@finetune_app.command("clip")
def finetune_clip_cmd(
    model: Annotated[str, typer.Option("--model", "-m", help="The checkpoint: clip:DIR_OR_HUB_ID or siglip:...")],
    data: Annotated[str, typer.Option("--data", "-d", help=(
        "(image, caption) data: a CSV/Parquet with image and caption columns (a split column gives the evaluation "
        "split), a folder per class (captions from --template), or hf:DATASET."))],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the fine-tuned checkpoint and metrics.")],
    steps: _StepsOpt = _FT_CLIP.steps,
    epochs: _EpochsOpt = _FT_CLIP.epochs,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=2, help="Pairs per micro-batch (the negatives).")]
    = _FT_CLIP.batch_size,
    grad_accum: _GradAccumOpt = _FT_CLIP.grad_accum,
    lr: Annotated[float, typer.Option("--lr", min=0.0, help="Peak learning rate (AdamW).")] = _FT_CLIP.lr,
    warmup: _WarmupOpt = _FT_CLIP.warmup,
    min_lr_ratio: _MinLrOpt = _FT_CLIP.min_lr_ratio,
    weight_decay: Annotated[float, typer.Option("--weight-decay", min=0.0, help="AdamW weight decay.")] = _FT_CLIP.weight_decay,
    max_grad_norm: _ClipNormOpt = _FT_CLIP.max_grad_norm,
    freeze: Annotated[_Freeze, typer.Option("--freeze", help=(
        "none, vision (freeze the image tower), text, or projections (train only projections and the logit scale)."))]
    = _Freeze(_FT_CLIP.freeze),
    lora_rank: _LoraRankOpt = _FT_CLIP.lora_rank,
    lora_alpha: _LoraAlphaOpt = _FT_CLIP.lora_alpha,
    lora_dropout: Annotated[float, typer.Option("--lora-dropout", min=0.0, max=1.0, help="Dropout on the LoRA input.")]
    = _FT_CLIP.lora_dropout,
    lora_targets: _LoraTargetsOpt = ",".join(_FT_CLIP.lora_targets),
    device: _TrainDeviceOpt = _FT_CLIP.device,
    precision: _TrainPrecisionOpt = _TrainPrecision(_FT_CLIP.precision),
    seed: _SeedOpt = _FT_CLIP.seed,
    eval_split: Annotated[str | None, typer.Option("--eval-split", help=(
        "The evaluation split (default: val/validation/valid/test when the data has splits)."))] = _FT_CLIP.eval_split,
    eval_fraction: Annotated[float, typer.Option("--eval-fraction", min=0.0, max=0.99, help=(
        "Without splits: the share of images held out for recall@1/5/10 (0: none)."))] = _FT_CLIP.eval_fraction,
    max_eval: Annotated[int | None, typer.Option("--max-eval", min=1, help="At most this many evaluation images.")]
    = _FT_CLIP.max_eval,
    eval_every: Annotated[int, typer.Option("--eval-every", min=0, help="Also evaluate every N steps (0: before and after).")]
    = _FT_CLIP.eval_every,
    save_every: _SaveEveryOpt = _FT_CLIP.save_every,
    keep_checkpoints: _KeepOpt = _FT_CLIP.keep_checkpoints,
    resume: _ResumeOpt = _FT_CLIP.resume,
    template: Annotated[list[str] | None, typer.Option("--template", help=(
        "Folder per class: caption template with {c} for the class name; repeatable (default 'a photo of a {c}.')."))]
    = None,
    image_column: Annotated[str | None, typer.Option("--image-column", help="Table/dataset column of the images.")] = None,
    caption_column: Annotated[str | None, typer.Option("--caption-column", help="Table/dataset column of the captions.")] = None,
    label_column: Annotated[str | None, typer.Option("--label-column", help="Table/dataset column of class labels.")] = None,
    num_threads: _ThreadsOpt = _FT_CLIP.num_threads,
    progress: _ProgressOpt = _FT_CLIP.progress,
    tensorboard: _TbOpt = _FT_CLIP.tensorboard,
    as_json: _FtJsonOpt = False,
) -> None:
    """Contrastive fine-tuning of a CLIP (or SigLIP, sigmoid loss) checkpoint on (image, caption) data."""
    from phiclip.finetune.clip import finetune_clip

    opts = _ClipOptions(
        steps=steps, epochs=epochs, batch_size=batch_size, grad_accum=grad_accum, lr=lr, warmup=warmup,
        min_lr_ratio=min_lr_ratio, weight_decay=weight_decay, max_grad_norm=max_grad_norm, freeze=freeze.value,
        lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
        lora_targets=tuple(t.strip() for t in lora_targets.split(",") if t.strip()), device=device,
        precision=precision.value, seed=seed, eval_split=eval_split, eval_fraction=eval_fraction, max_eval=max_eval,
        eval_every=eval_every, save_every=save_every, keep_checkpoints=keep_checkpoints, resume=resume,
        templates=tuple(template) if template else None, image_column=image_column, caption_column=caption_column,
        label_column=label_column, num_threads=num_threads, progress=progress, tensorboard=tensorboard,
    )
    r = _run_training(finetune_clip, model, data, output, opts)
    rows = _before_after(r.before, r.after, ("recall@1", "recall@5", "recall@10"))
    rows += [("steps", r.steps), ("final loss", None if r.final_loss is None else f"{r.final_loss:.4f}"),
             ("seconds per step", r.seconds_per_step), ("images skipped (unreadable)", r.skipped_images.get("count", 0)),
             ("split", r.split), ("saved", r.output)]
    _print_result(f"phiclip finetune clip -> {r.output}", rows, r, as_json)


@finetune_app.command("probe")
def finetune_probe_cmd(
    model: Annotated[str, typer.Option("--model", "-m", help="Encoder spec (any kind: clip:, siglip:, phi3v:...).")],
    data: Annotated[str, typer.Option("--data", "-d", help=(
        "(image, label) data: a folder per class (optionally train/val/test split folders), a CSV/Parquet with "
        "image and label columns, or hf:DATASET."))],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for probe.safetensors and probe.json.")],
    hidden: Annotated[int, typer.Option("--hidden", min=0, help="Hidden width of a small MLP (0: linear).")] = _FT_PROBE.hidden,
    dropout: Annotated[float, typer.Option("--dropout", min=0.0, max=0.99, help="MLP dropout.")] = _FT_PROBE.dropout,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Most epochs (early stopping may end sooner).")]
    = _FT_PROBE.epochs,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Vectors per step.")] = _FT_PROBE.batch_size,
    lr: Annotated[float, typer.Option("--lr", min=0.0, help="Learning rate (AdamW).")] = _FT_PROBE.lr,
    weight_decay: Annotated[float, typer.Option("--weight-decay", min=0.0, help="AdamW weight decay.")]
    = _FT_PROBE.weight_decay,
    patience: Annotated[int, typer.Option("--patience", min=1, help="Epochs without a better validation loss before stopping.")]
    = _FT_PROBE.patience,
    class_weights: Annotated[_ClassWeights, typer.Option("--class-weights", help=(
        "balanced (inverse class frequency, for imbalanced data) or none."))] = _ClassWeights(_FT_PROBE.class_weights),
    val_split: Annotated[str | None, typer.Option("--val-split", help="The validation split by name.")] = _FT_PROBE.val_split,
    val_fraction: Annotated[float, typer.Option("--val-fraction", min=0.0, max=0.99, help=(
        "Without a validation split: the share of training images held out (stratified)."))] = _FT_PROBE.val_fraction,
    seed: _SeedOpt = _FT_PROBE.seed,
    embed_batch_size: Annotated[int, typer.Option("--embed-batch-size", min=1, help="Images per encoder call.")]
    = _FT_PROBE.embed_batch_size,
    device: _TrainDeviceOpt = _FT_PROBE.device,
    precision: _QueryPrecisionOpt = _QueryPrecision(_FT_PROBE.precision),
    cache_dir: Annotated[str | None, typer.Option("--cache-dir", help=(
        "Embedding cache (default $PHICLIP_CACHE/embeddings or ~/.cache/phiclip/embeddings)."))] = _FT_PROBE.cache_dir,
    image_column: Annotated[str | None, typer.Option("--image-column", help="Table/dataset column of the images.")] = None,
    label_column: Annotated[str | None, typer.Option("--label-column", help="Table/dataset column of the labels.")] = None,
    progress: _ProgressOpt = _FT_PROBE.progress,
    as_json: _FtJsonOpt = False,
) -> None:
    """Train a linear (or small MLP) probe on frozen embeddings of any encoder."""
    from phiclip.finetune.probe import train_probe

    opts = _ProbeOptions(
        hidden=hidden, dropout=dropout, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
        patience=patience, class_weights=class_weights.value, val_split=val_split, val_fraction=val_fraction, seed=seed,
        embed_batch_size=embed_batch_size, device=device, precision=precision.value, cache_dir=cache_dir,
        image_column=image_column, label_column=label_column, progress=progress,
    )
    r = _run_training(train_probe, model, data, output, opts)
    rows = [("encoder", r.encoder), ("classes", r.num_classes), ("images train / val / test",
            f"{r.train_images} / {r.val_images} / {r.test_images}"), ("train accuracy", r.train_acc),
            ("validation accuracy", r.val_acc), ("test accuracy", r.test_acc),
            ("best epoch / run", f"{r.best_epoch} / {r.epochs_run}"), ("embeddings from cache", r.embeddings_from_cache),
            ("images skipped (unreadable)", r.skipped_images.get("count", 0)), ("saved", r.output)]
    _print_result(f"phiclip finetune probe -> {r.output}", rows, r, as_json)


@finetune_app.command("phi3v-adapter")
def finetune_adapter_cmd(
    teacher: Annotated[str, typer.Option("--teacher", help="The Phi-3-vision checkpoint: phi3v:DIR_OR_HUB_ID[?num_crops=N].")],
    student: Annotated[str, typer.Option("--student", help="The student tower's checkpoint: clip:... or siglip:...")],
    data: Annotated[str, typer.Option("--data", "-d", help=(
        "Images: a folder, a quoted glob, a .txt list, a Parquet/CSV table or hf:DATASET."))],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the Phi-3-vision-compatible export and metrics.")],
    steps: _StepsOpt = _FT_ADAPTER.steps,
    epochs: _EpochsOpt = _FT_ADAPTER.epochs,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per micro-batch.")]
    = _FT_ADAPTER.batch_size,
    grad_accum: _GradAccumOpt = _FT_ADAPTER.grad_accum,
    lr: Annotated[float, typer.Option("--lr", min=0.0, help="Peak learning rate (AdamW).")] = _FT_ADAPTER.lr,
    warmup: _WarmupOpt = _FT_ADAPTER.warmup,
    weight_decay: Annotated[float, typer.Option("--weight-decay", min=0.0, help="AdamW weight decay.")]
    = _FT_ADAPTER.weight_decay,
    student_layer: Annotated[int, typer.Option("--student-layer", help=(
        "The student hidden state used: -1 last layer, -2 the one before (as Phi-3-vision), ..."))] = _FT_ADAPTER.student_layer,
    train_layers: Annotated[int, typer.Option("--train-layers", min=0, help="Also train the last N student layers.")]
    = _FT_ADAPTER.train_layers,
    lora_rank: _LoraRankOpt = _FT_ADAPTER.lora_rank,
    lora_alpha: _LoraAlphaOpt = _FT_ADAPTER.lora_alpha,
    lora_targets: _LoraTargetsOpt = ",".join(_FT_ADAPTER.lora_targets),
    cos_weight: Annotated[float, typer.Option("--cos-weight", min=0.0, help="Weight of the per-token cosine term.")]
    = _FT_ADAPTER.cos_weight,
    teacher_tokens: Annotated[_TeacherTokens, typer.Option("--teacher-tokens", help=(
        "cache: the teacher's tokens computed once to Parquet and reused; stream: recomputed every batch."))]
    = _TeacherTokens(_FT_ADAPTER.teacher_tokens),
    cache_dir: Annotated[str | None, typer.Option("--cache-dir", help="Where the teacher-token cache goes (default: --output).")]
    = _FT_ADAPTER.cache_dir,
    eval_fraction: Annotated[float, typer.Option("--eval-fraction", min=0.0, max=0.99, help="Share of images held out.")]
    = _FT_ADAPTER.eval_fraction,
    max_eval: Annotated[int, typer.Option("--max-eval", min=1, help="At most this many held-out images.")] = _FT_ADAPTER.max_eval,
    device: _TrainDeviceOpt = _FT_ADAPTER.device,
    precision: _TrainPrecisionOpt = _TrainPrecision(_FT_ADAPTER.precision),
    seed: _SeedOpt = _FT_ADAPTER.seed,
    save_every: _SaveEveryOpt = _FT_ADAPTER.save_every,
    keep_checkpoints: _KeepOpt = _FT_ADAPTER.keep_checkpoints,
    resume: _ResumeOpt = _FT_ADAPTER.resume,
    column: _ColumnOpt = _FT_ADAPTER.column,
    split: _SplitOpt = _FT_ADAPTER.split,
    num_threads: _ThreadsOpt = _FT_ADAPTER.num_threads,
    progress: _ProgressOpt = _FT_ADAPTER.progress,
    tensorboard: _TbOpt = _FT_ADAPTER.tensorboard,
    as_json: _FtJsonOpt = False,
) -> None:
    """Distil a CLIP-like student tower into Phi-3-vision's image path and export it as a Phi-3-vision image embedding."""
    from phiclip.finetune.adapter import distill_phi3v_adapter

    opts = _AdapterOptions(
        steps=steps, epochs=epochs, batch_size=batch_size, grad_accum=grad_accum, lr=lr, warmup=warmup,
        weight_decay=weight_decay, student_layer=student_layer, train_layers=train_layers, lora_rank=lora_rank,
        lora_alpha=lora_alpha, lora_targets=tuple(t.strip() for t in lora_targets.split(",") if t.strip()),
        cos_weight=cos_weight, teacher_tokens=teacher_tokens.value, cache_dir=cache_dir, eval_fraction=eval_fraction,
        max_eval=max_eval, device=device, precision=precision.value, seed=seed, save_every=save_every,
        keep_checkpoints=keep_checkpoints, resume=resume, column=column, split=split, num_threads=num_threads,
        progress=progress, tensorboard=tensorboard,
    )
    r = _run_training(distill_phi3v_adapter, teacher, student, data, output, opts)
    rows = _before_after(r.before, r.after, ("token_cosine", "r2"))
    if r.after is not None:
        rows.append(("mean-token baseline cosine (R^2 0)", f"{r.after['mean_token_cosine']:.4f}"))
    rows += [(k.replace("_", " "), v) for k, v in r.speed.items()]
    rows += [("steps", r.steps), ("final loss", None if r.final_loss is None else f"{r.final_loss:.4f}"),
             ("seconds per step", r.seconds_per_step), ("teacher tokens from cache", r.teacher_tokens_from_cache),
             ("images skipped (unreadable)", r.skipped_images.get("count", 0)), ("exported", r.output)]
    _print_result(f"phiclip finetune phi3v-adapter -> {r.output}", rows, r, as_json)


@app.command("classify")
def classify_cmd(
    probe: Annotated[Path, typer.Option("--probe", "-p", help="A folder written by `phiclip finetune probe`.")],
    input: Annotated[str, typer.Option("--input", "-i", help=(
        "Images: a folder, a quoted glob, a .txt list, a Parquet/CSV table or hf:DATASET."))],
    output: Annotated[Path, typer.Option("--output", "-o", help="The Parquet file: id, source, label, score, top_k, error.")],
    model: Annotated[str | None, typer.Option("--model", "-m", help=(
        "The encoder you expect; refused when the probe was trained on another one."))] = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Labels kept per image in top_k.")] = 5,
    embeddings: Annotated[Path | None, typer.Option("--embeddings", help=(
        "Folder for the embeddings (default: OUTPUT's name + .embeddings); a rerun resumes or reuses it."))] = None,
    batch_size: _BatchOpt = 64,
    num_workers: _WorkersOpt = None,
    device: _QueryDeviceOpt = "auto",
    precision: _QueryPrecisionOpt = _QueryPrecision.auto,
    column: _ColumnOpt = None,
    split: _SplitOpt = "train",
    progress: _ProgressOpt = True,
    as_json: _FtJsonOpt = False,
) -> None:
    """Classify every image of INPUT with a trained probe (embedding through the bulk pipeline)."""
    from phiclip.finetune.probe import classify

    r = _run_training(classify, probe, input, output, model=model, top_k=top_k, embeddings=embeddings, device=device,
                      precision=precision.value, batch_size=batch_size, num_workers=num_workers, column=column,
                      split=split, progress=progress)
    rows = [("rows", r.rows), ("classified", r.classified), ("failed (see the error column)", r.failed),
            ("embeddings", r.embeddings), ("seconds", r.seconds), ("written", r.output)]
    _print_result(f"phiclip classify -> {r.output}", rows, r, as_json)


def _quiet_libraries() -> None:
    """The CLI prints its own progress; keep transformers' warnings and loading bars out of it
    (``TRANSFORMERS_VERBOSITY=info`` brings them back)."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if os.environ["TRANSFORMERS_VERBOSITY"] == "error":
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:  # pragma: no cover - transformers is a dependency
            pass


def main() -> None:
    """Console entry point."""
    _quiet_libraries()
    app()


if __name__ == "__main__":
    main()
