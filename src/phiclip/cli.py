"""The ``phiclip`` command line: thin; parses, calls the Python API, prints.

Each command lives in the section of the capability it belongs to.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

# Light imports only (numpy, PIL): torch, transformers and faiss load inside the commands.
from phiclip.comparison import runner as _compare_runner
from phiclip.pipeline.runner import EmbedOptions as _EmbedOptions

app = typer.Typer(
    name="phiclip",
    help="Image embeddings with CLIP and Phi-3-vision's image encoder, side by side.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Image embeddings with CLIP and Phi-3-vision's image encoder, side by side."""


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


_ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Encoder spec: clip:DIR_OR_HUB_ID, siglip:..., phi3v:...?num_crops=4.")]
_OutputOpt = Annotated[Path, typer.Option("--output", "-o", help="Output folder (rerun the same command to resume).")]
_BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1,
                                        help="Batch budget: images (CLIP/SigLIP) or crops (Phi-3-vision).")]
_WorkersOpt = Annotated[int | None, typer.Option("--num-workers", "-j", min=0,
                                                 help="Decode/preprocess processes; 0 = in-process threads between model calls "
                                                      "(default: min(4, CPUs) with a GPU, 0 on the CPU).")]
_ShardOpt = Annotated[int, typer.Option("--shard-size", min=1, help="Inputs per output shard (the unit of resume).")]
_DtypeOpt = Annotated[_VectorDtype, typer.Option("--dtype", help="dtype of the stored vectors.")]
_DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:1 ...")]
_PrecisionOpt = Annotated[_Precision, typer.Option("--precision", help="Compute dtype (auto: bfloat16 on CUDA, float32 on CPU).")]
_ColumnOpt = Annotated[str | None, typer.Option("--column", help="Table/dataset column holding the inputs (default: guessed from names and types).")]
_SplitOpt = Annotated[str, typer.Option("--split", help="Split of an hf: dataset.")]
_ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")]
_JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON instead of a table.")]


def _embed_settings(**kw: Any) -> dict[str, Any]:
    return {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in kw.items()}


def _run_embed(fn_name: str, model: str, input: str, output: Path, settings: dict[str, Any], as_json: bool) -> None:
    import json

    from rich.console import Console

    from phiclip.pipeline import runner

    err = Console(stderr=True)
    try:
        result = getattr(runner, fn_name)(model, input, output, **settings)
    except KeyboardInterrupt:
        err.print(f"[yellow]interrupted[/]: the shards already written in {output} are kept; rerun the same command to resume")
        raise typer.Exit(130) from None
    except (ValueError, RuntimeError, OSError) as e:
        err.print(f"[red]error:[/] {e}", markup=True, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    _print_embed_summary(result)


def _print_embed_summary(result: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    out = Console()
    if result.status == "already_complete":
        out.print(f"Nothing to do: {result.output} is already complete "
                  f"({result.embedded} embedded, {result.failed} failed of {result.inputs} inputs).", highlight=False)
        return
    table = Table(title=f"phiclip embed -> {result.output}", show_header=False, title_justify="left")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("inputs", str(result.inputs))
    table.add_row("embedded", str(result.embedded))
    table.add_row("failed", f"{result.failed}" + (" (see errors/)" if result.failed else ""))
    table.add_row("skipped (done before)", str(result.skipped))
    if result.duplicates:
        table.add_row("duplicates (listed once)", str(result.duplicates))
    if result.ignored:
        table.add_row("ignored (not inputs)", str(result.ignored))
    table.add_row("time", f"{result.seconds:.1f} s")
    table.add_row("per second", f"{result.items_per_second:.1f}")
    stages = ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items() if k != "loop")
    table.add_row("stages", stages)
    out.print(table)


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
    column: _ColumnOpt = _EMBED_DEFAULTS.column,
    split: _SplitOpt = _EMBED_DEFAULTS.split,
    progress: _ProgressOpt = _EMBED_DEFAULTS.progress,
    as_json: _JsonOpt = False,
) -> None:
    """Embed every image of INPUT into Parquet shards in OUTPUT (resumable; bad inputs go to errors/)."""
    settings = _embed_settings(batch_size=batch_size, num_workers=num_workers, shard_size=shard_size, dtype=dtype,
                               device=device, precision=precision, max_pixels=max_pixels or None, tokens=tokens,
                               column=column, split=split, progress=progress)
    _run_embed("embed", model, input, output, settings, as_json)


@app.command("embed-text")
def embed_text_cmd(
    model: _ModelOpt,
    input: Annotated[str, typer.Option("--input", "-i", help=(
        "A .txt file (one text per line), a Parquet/CSV table with a text column, or hf:DATASET."))],
    output: _OutputOpt,
    batch_size: _BatchOpt = _EMBED_DEFAULTS.batch_size,
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


def _fail_cli(e: BaseException) -> NoReturn:
    from rich.console import Console

    Console(stderr=True).print(f"[red]error:[/] {e}", markup=True, highlight=False, soft_wrap=True)
    raise typer.Exit(1) from None


@app.command("index")
def index_cmd(
    emb_dir: _EmbDirArg,
    index_type: Annotated[_IndexType, typer.Option("--type", help=(
        "auto: exact (flat) up to 100k vectors, HNSW up to 1M, IVF beyond."))] = _IndexType.auto,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even when the index is up to date.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the index description as JSON.")] = False,
) -> None:
    """Build the FAISS index of EMB_DIR under EMB_DIR/index/ and print its measured recall@10."""
    import json

    from rich.console import Console
    from rich.table import Table

    from phiclip.retrieval import build_index

    try:
        info = build_index(emb_dir, index_type=index_type.value, force=force)
    except (ValueError, RuntimeError, OSError) as e:
        _fail_cli(e)
    if as_json:
        typer.echo(json.dumps({**info.to_meta(), "path": info.path, "built_now": info.built_now}, indent=2))
        return
    recall = "n/a (fewer than 2 vectors)" if info.recall_at_10 is None else f"{info.recall_at_10:.4f}"
    table = Table(title=f"phiclip index -> {info.path}" + ("" if info.built_now else " (up to date, not rebuilt)"),
                  show_header=False, title_justify="left")
    table.add_column("what")
    table.add_column("value")
    table.add_row("type", info.type + (" (exact)" if info.type == "flat" else " (approximate)"))
    table.add_row("vectors", f"{info.n} x {info.dim}")
    table.add_row("recall@10 vs exact", f"{recall} on {info.recall_queries} sample queries")
    if info.params:
        table.add_row("parameters", ", ".join(f"{k}={v}" for k, v in info.params.items()))
    table.add_row("encoder", str(info.encoder_spec))
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
    as_json: Annotated[bool, typer.Option("--json", help="Print the hits as a JSON list.")] = False,
) -> None:
    """Print the K stored items nearest (cosine) to a text or image query, embedded with the index's encoder."""
    import json

    from rich.console import Console
    from rich.table import Table

    from phiclip.retrieval import index_is_fresh, search
    from phiclip.schema import MANIFEST_FILE

    if (text is None) == (image is None):
        _fail_cli(ValueError("give exactly one query: --text 'a red car' or --image path.jpg"))
    try:
        if not as_json and (emb_dir / MANIFEST_FILE).is_file() and not index_is_fresh(emb_dir):
            Console(stderr=True).print(f"[dim]building the index of {emb_dir} (once; `phiclip index` does it ahead)[/]")
        hits = search(emb_dir, text=text, image=image, k=k, device=device, dtype=precision.value)
    except (ValueError, RuntimeError, OSError) as e:
        _fail_cli(e)
    if as_json:
        typer.echo(json.dumps([h.to_dict() for h in hits], indent=2))
        return
    query = f"text {text!r}" if text is not None else f"image {image}"
    table = Table(title=f"{len(hits)} nearest to {query}", title_justify="left")
    table.add_column("rank", justify="right")
    table.add_column("score", justify="right")
    table.add_column("source", overflow="fold")
    table.add_column("id", style="dim", overflow="ellipsis", no_wrap=True, max_width=12)
    for h in hits:
        table.add_row(str(h.rank), f"{h.score:.4f}", h.source, h.id)
    Console().print(table)


@app.command("eval")
def eval_cmd(
    model: Annotated[str, typer.Option("--model", "-m", help="Encoder spec: clip:DIR_OR_HUB_ID, siglip:..., phi3v:...")],
    task: Annotated[_EvalTask, typer.Option("--task", help=(
        "zeroshot (CLIP-like), knn or linear-probe (any encoder), retrieval (image-text, CLIP-like)."))],
    data: Annotated[str, typer.Option("--data", "-d", help=(
        "A folder per class (optionally under train/ and test/), a CSV/Parquet table with image and "
        "label or caption columns, or hf:DATASET[?config=NAME] (hub id, local folder, save_to_disk folder)."))],
    split: Annotated[str | None, typer.Option("--split", help=(
        "Split to evaluate on (default: test/validation when the data has splits; hf: accepts test[:500]).")) ] = None,
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
    device: _QueryDeviceOpt = "auto",
    precision: _QueryPrecisionOpt = _QueryPrecision.auto,
    image_column: Annotated[str | None, typer.Option("--image-column", help="Table/dataset column of the images.")] = None,
    label_column: Annotated[str | None, typer.Option("--label-column", help="Table/dataset column of the labels.")] = None,
    caption_column: Annotated[str | None, typer.Option("--caption-column", help="Table/dataset column of the captions.")]
    = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the result as JSON to this file.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON instead of a table.")] = False,
) -> None:
    """Evaluate an encoder on labelled or captioned images (CLIP_benchmark's protocol) and print the metrics."""
    import json

    from rich.console import Console
    from rich.table import Table

    from phiclip.evaluate import evaluate

    if template and templates_file:
        _fail_cli(ValueError("give --template or --templates, not both"))
    try:
        result = evaluate(
            model, task.value, data, split=split, train_split=train_split,
            templates=template or (str(templates_file) if templates_file else None),
            classnames=str(classnames) if classnames else None, k=k, test_fraction=test_fraction, seed=seed,
            batch_size=batch_size, device=device, dtype=precision.value, image_column=image_column,
            label_column=label_column, caption_column=caption_column,
        )
        if output is not None:
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    except (ValueError, RuntimeError, OSError) as e:
        _fail_cli(e)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    table = Table(title=f"phiclip eval: {result['task']} of {result['model']} on {result['data']}", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in result["metrics"].items():
        table.add_row(name, f"{value:.4f}")
    for name, value in result["details"].items():
        table.add_row(f"[dim]{name}[/]", f"[dim]{value}[/]")
    out = Console()
    out.print(table)
    if output is not None:
        out.print(f"Written: {output}", highlight=False, soft_wrap=True)


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
        "columns; captions enable retrieval), or hf:DATASET."))],
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

    err = Console(stderr=True)
    try:
        report = _compare_runner.compare(
            model,
            data,
            output,
            k=k,
            device=device,
            dtype=precision.value,
            batch_size=batch_size,
            max_images=max_images,
            templates=template or None,
            isolate=not in_process,
            progress=None if as_json else (lambda msg: err.print(f"[dim]{msg}[/]", highlight=False)),
        )
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]")
        raise typer.Exit(130) from None
    except (ValueError, RuntimeError, OSError) as e:
        err.print(f"[red]error:[/] {e}", markup=True, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=1))
        return
    print_report(report)
    Console().print(f"Report: {Path(output) / 'report.html'} (numbers in {Path(output) / 'report.json'})", highlight=False)


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
        run_demo(output, clip_model=clip_model, phi3v_model=phi3v_model, tiny=tiny, device=device, say=typer.echo)
    except (ValueError, RuntimeError, OSError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None



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
