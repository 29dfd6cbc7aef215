"""``phiclip embed`` and ``phiclip embed-text``: the bulk pipeline (:func:`phiclip.pipeline.runner.embed`,
:func:`phiclip.pipeline.runner.embed_text`). Defaults come from :class:`~phiclip.pipeline.runner.EmbedOptions`."""

from __future__ import annotations

import enum
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from phiclip import schema
from phiclip.cli.common import (
    LEFT_OUT_SHOWN,
    BatchOpt,
    ColumnOpt,
    FetchRetriesOpt,
    FetchTimeoutOpt,
    JsonOpt,
    ProgressOpt,
    SplitOpt,
    WorkersOpt,
    echo_json,
    enum_values,
    fail_cli,
    left_out_table,
    spec_with_kind,
)
from phiclip.console import safe_text
from phiclip.fetch import FetchOptions
from phiclip.pipeline import runner
from phiclip.pipeline.engine import TooManyFailures
from phiclip.pipeline.runner import EmbedOptions, EmbedResult
from phiclip.store import count_errors, iter_errors

_DEFAULTS = EmbedOptions()
_FETCH = FetchOptions()
#: Exit codes of a run stopped by Ctrl-C (SIGINT) and by SIGTERM: 128 + the signal's number, as shells report.
EXIT_SIGINT = 128 + signal.SIGINT
EXIT_SIGTERM = 128 + signal.SIGTERM
#: Exit code of a run in which no input could be embedded (every one failed).
EXIT_NOTHING_EMBEDDED = 3
#: Exit code of a run stopped by --max-failures.
EXIT_TOO_MANY_FAILURES = 4


class VectorDtype(str, enum.Enum):
    float16 = "float16"
    float32 = "float32"


class Precision(str, enum.Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"
    int8 = "int8"


class Engine(str, enum.Enum):
    local = "local"
    ray = "ray"


ModelOpt = Annotated[str, typer.Option("--model", "-m", callback=spec_with_kind, help=(
    "Encoder spec: clip:DIR_OR_HUB_ID, siglip:..., open_clip:..., phi3v:...?num_crops=4; without KIND:, the kind "
    "is found from the checkpoint's config.json (or open_clip_config.json)."))]
OutputOpt = Annotated[Path, typer.Option("--output", "-o", help="Output folder (rerun the same command to resume).")]
_TextBatchOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Texts per model call.")]
_ShardOpt = Annotated[int, typer.Option("--shard-size", min=1, help="Inputs per output shard (the unit of resume).")]
_DtypeOpt = Annotated[VectorDtype, typer.Option("--dtype", help="dtype of the stored vectors.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:1 ...")]
_PrecisionOpt = Annotated[Precision, typer.Option("--precision", help=(
    "Compute precision (auto: bfloat16 on CUDA; on the CPU bfloat16 where it measured faster than float32, else "
    "float32; int8: CPU, CLIP/SigLIP/Phi-3-vision, int8 weights and activations)."))]
_UpdateOpt = Annotated[bool, typer.Option("--update", help=(
    "Embed only the inputs that are not in OUTPUT yet (a folder that grew) into new shards; inputs that "
    "disappeared are reported and kept."))]
_PruneOpt = Annotated[bool, typer.Option("--prune", help="With --update: also remove the rows of inputs that disappeared.")]
_FlushOpt = Annotated[float, typer.Option("--flush-seconds", min=0, help=(
    "Write partial work at least this often, so a crash loses at most about this much; 0 = whole shards only."))]
_EngineOpt = Annotated[Engine, typer.Option("--engine", help=(
    "local: this machine; ray: Ray Data on a local Ray instance (every GPU) or a cluster (--ray-address)."))]
_RayAddressOpt = Annotated[str | None, typer.Option("--ray-address", help=(
    "--engine ray: the cluster to join (auto, ray://HOST:10001); default: a running local instance, or a new one."))]
_GpusPerActorOpt = Annotated[float | None, typer.Option("--gpus-per-actor", min=0, help=(
    "--engine ray: GPUs per encoding actor (0.5: two actors share a GPU); default 1 with GPUs, else 0."))]
_ActorsOpt = Annotated[int | None, typer.Option("--num-actors", min=1, help=(
    "--engine ray: encoding actors (default: one per GPU, or one without GPUs)."))]
_InputOpt = Annotated[str, typer.Option("--input", "-i", help=(
    "A folder (recursive), a quoted glob ('imgs/**/*.jpg'), a .txt list of paths or URLs, a Parquet/CSV table "
    "with a path, URL or bytes column, WebDataset shards ('shards/{000..099}.tar', shard URLs), or hf:DATASET "
    "(hub id, data folder or save_to_disk folder)."))]
_TextInputOpt = Annotated[str, typer.Option("--input", "-i", help=(
    "A .txt file (one text per line), a Parquet/CSV table with a text column, or hf:DATASET."))]
_MaxPixelsOpt = Annotated[int, typer.Option("--max-pixels", min=0, help=(
    "Refuse images with more pixels (decompression bombs); 0 = no limit."))]
_RetryOpt = Annotated[bool, typer.Option("--retry-failed", help=(
    "Embed again only the failed inputs of OUTPUT (same model, settings and input), replacing their error rows."))]
_MaxFailuresOpt = Annotated[str | None, typer.Option("--max-failures", help=(
    "Stop early (exit 4) when more inputs fail than N, or than P% of those done (judged after 100, or all "
    "when fewer)."))]
_FetchConcurrencyOpt = Annotated[int, typer.Option("--fetch-concurrency", min=1, help="URLs: fetches in flight.")]
_MaxBytesOpt = Annotated[int, typer.Option("--max-image-bytes", min=1, help="URLs: largest body fetched (bytes).")]
_TokensOpt = Annotated[bool, typer.Option("--tokens", help="Phi-3-vision: also write full token sequences to tokens/.")]


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread where Ctrl-C raises KeyboardInterrupt, so that a terminated run
    stops exactly as an interrupted one does (the shards already written are kept)."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM stops it as Ctrl-C does (raising :class:`Terminated`); the handler
    before is restored after. Only in the main thread (the only one signal handlers run in)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _run(fn: Callable[..., EmbedResult], model: str, input: str, output: Path, settings: dict[str, Any],
         as_json: bool) -> None:
    """Call ``fn`` (``embed`` or ``embed_text``), turning Ctrl-C / SIGTERM and bad input into messages."""
    try:
        with sigterm_as_interrupt():
            result = fn(model, input, output, **settings)
    except KeyboardInterrupt as e:
        Console(stderr=True).print(Text.assemble(("interrupted", "yellow"), safe_text(
            f": the shards already written in {output} are kept; rerun the same command to resume")),
            highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_SIGTERM if isinstance(e, Terminated) else EXIT_SIGINT) from None
    except TooManyFailures as e:
        fail_cli(e, EXIT_TOO_MANY_FAILURES)
    except (ValueError, RuntimeError, OSError) as e:
        fail_cli(e)
    if as_json:
        echo_json(result.to_dict())
    else:
        print_embed_summary(result)
    if result.inputs and result.embedded == 0 and result.failed:
        top = "; ".join(f"{n} x {stage}: {reason}" for stage, reason, n in result.failure_reasons[:3])
        fail_cli(f"no input could be embedded ({result.failed} failed; top reasons: {top})", EXIT_NOTHING_EMBEDDED)


def print_embed_summary(result: EmbedResult) -> None:
    """The end-of-run table of ``phiclip embed``: counts, time, stages, then what was left out."""
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
    table.add_row("retried by this run" if result.status == "retried" else "done by this run", str(result.processed))
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
    print_failure_reasons(result, out)
    print_left_out(Path(result.output), out)


def print_failure_reasons(result: EmbedResult, out: Console) -> None:
    """The failed inputs of the output counted by (stage, reason), most frequent first."""
    if not result.failure_reasons:
        return
    table = Table(title=f"Failures by reason ({result.failed} in all)", title_justify="left")
    table.add_column("count", justify="right")
    table.add_column("stage")
    table.add_column("reason")
    for stage, reason, n in result.failure_reasons:
        table.add_row(str(n), safe_text(stage), safe_text(reason))
    out.print(table)


def _print_disappeared(result: EmbedResult, out: Console) -> None:
    """Name the inputs in the output that are no longer listed (`embed --update`), and the pruned count."""
    if result.pruned:
        out.print(safe_text(f"Removed the rows of {result.pruned} inputs that are no longer in the input (--prune)."),
                  highlight=False, soft_wrap=True)
    gone = list(result.disappeared_sources)
    if gone:
        more = f"; and {len(gone) - LEFT_OUT_SHOWN} more" if len(gone) > LEFT_OUT_SHOWN else ""
        out.print(safe_text(f"{len(gone)} inputs in the output are no longer in the input (kept; --update --prune "
                            f"removes them): {'; '.join(gone[:LEFT_OUT_SHOWN])}{more}"), highlight=False, soft_wrap=True)


def print_left_out(output: Path, out: Console) -> None:
    """List the first rows of OUTPUT/errors/ (source, stage, reason), file names escaped."""
    rows = list(islice(iter_errors(output), LEFT_OUT_SHOWN))
    if not rows:
        return
    total = max(count_errors(output), len(rows))
    shown = f"the first {len(rows)} of {total}" if total > len(rows) else f"all {total}"
    out.print(left_out_table(f"Not embedded ({shown}; every one is in {schema.ERRORS_DIR}/)", rows))


def embed(
    model: ModelOpt,
    input: _InputOpt,
    output: OutputOpt,
    batch_size: BatchOpt = _DEFAULTS.batch_size,
    num_workers: WorkersOpt = _DEFAULTS.num_workers,
    shard_size: _ShardOpt = _DEFAULTS.shard_size,
    dtype: _DtypeOpt = VectorDtype(_DEFAULTS.dtype),
    device: DeviceOpt = _DEFAULTS.device,
    precision: _PrecisionOpt = Precision(_DEFAULTS.precision),
    max_pixels: _MaxPixelsOpt = _DEFAULTS.max_pixels or 0,
    tokens: _TokensOpt = _DEFAULTS.tokens,
    update: _UpdateOpt = _DEFAULTS.update,
    prune: _PruneOpt = _DEFAULTS.prune,
    flush_seconds: _FlushOpt = _DEFAULTS.flush_seconds or 0,
    engine: _EngineOpt = Engine(_DEFAULTS.engine),
    ray_address: _RayAddressOpt = _DEFAULTS.ray_address,
    gpus_per_actor: _GpusPerActorOpt = _DEFAULTS.gpus_per_actor,
    num_actors: _ActorsOpt = _DEFAULTS.num_actors,
    column: ColumnOpt = _DEFAULTS.column,
    split: SplitOpt = _DEFAULTS.split,
    progress: ProgressOpt = _DEFAULTS.progress,
    retry_failed: _RetryOpt = False,
    max_failures: _MaxFailuresOpt = None,
    fetch_timeout: FetchTimeoutOpt = _FETCH.read_timeout,
    fetch_concurrency: _FetchConcurrencyOpt = _FETCH.concurrency,
    fetch_retries: FetchRetriesOpt = _FETCH.retries,
    max_image_bytes: _MaxBytesOpt = _FETCH.max_bytes,
    as_json: JsonOpt = False,
) -> None:
    """Embed every image of INPUT into Parquet shards in OUTPUT (resumable; bad inputs go to errors/).

    Exit codes: 0 done; 1 an error; 3 no input could be embedded; 4 stopped by --max-failures; 130/143 interrupted.
    """
    fetch = FetchOptions.for_timeout(fetch_timeout, concurrency=fetch_concurrency, retries=fetch_retries,
                                     max_bytes=max_image_bytes)
    settings = enum_values(batch_size=batch_size, num_workers=num_workers, shard_size=shard_size, dtype=dtype,
                           device=device, precision=precision, max_pixels=max_pixels or None, tokens=tokens,
                           column=column, split=split, progress=progress, update=update, prune=prune,
                           flush_seconds=flush_seconds or None, engine=engine, ray_address=ray_address,
                           gpus_per_actor=gpus_per_actor, num_actors=num_actors, retry_failed=retry_failed,
                           max_failures=max_failures)
    settings["fetch"] = fetch
    _run(runner.embed, model, input, output, settings, as_json)


def embed_text(
    model: ModelOpt,
    input: _TextInputOpt,
    output: OutputOpt,
    batch_size: _TextBatchOpt = _DEFAULTS.batch_size,
    shard_size: _ShardOpt = _DEFAULTS.shard_size,
    dtype: _DtypeOpt = VectorDtype(_DEFAULTS.dtype),
    device: DeviceOpt = _DEFAULTS.device,
    precision: _PrecisionOpt = Precision(_DEFAULTS.precision),
    column: ColumnOpt = _DEFAULTS.column,
    split: SplitOpt = _DEFAULTS.split,
    progress: ProgressOpt = _DEFAULTS.progress,
    as_json: JsonOpt = False,
) -> None:
    """Embed texts with a CLIP-like model into Parquet shards in OUTPUT (same layout as embed)."""
    settings = enum_values(batch_size=batch_size, shard_size=shard_size, dtype=dtype, device=device,
                           precision=precision, column=column, split=split, progress=progress)
    _run(runner.embed_text, model, input, output, settings, as_json)
