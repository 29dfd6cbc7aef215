"""The ``phiclip`` command line: thin; parses, calls the Python API, prints.

One module per command group, each command calling its API function directly:

- :mod:`.embed`: ``embed``, ``embed-text`` (:mod:`phiclip.pipeline.runner`);
- :mod:`.search`: ``index``, ``search`` (:mod:`phiclip.retrieval`);
- :mod:`.info`: ``info`` (:mod:`phiclip.output_summary`);
- :mod:`.evaluate`: ``eval`` (:mod:`phiclip.evaluate`);
- :mod:`.compare`: ``compare`` (:mod:`phiclip.comparison.runner`);
- :mod:`.collection`: ``dedup``, ``cluster``, ``map``, ``align`` (:mod:`phiclip.collection.commands`);
- :mod:`.serve`: ``serve`` (:mod:`phiclip.serve`);
- :mod:`.finetune`: ``finetune clip|probe|phi3v-adapter``, ``classify`` (:mod:`phiclip.finetune`);
- :mod:`.export`: ``export`` (:mod:`phiclip.open_clip.export`);
- :mod:`.demo`: ``demo`` (:mod:`phiclip.demo`), ``tiny-model`` (:mod:`phiclip.testing`);
- :mod:`.common`: shared option types, error printing, summary tables.

Start-up stays light: importing this package (``phiclip --help``) loads neither torch, transformers nor faiss;
the API modules load them when a command runs.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperGroup

from phiclip.cli import collection, compare, demo, embed, evaluate, export, finetune, info, search, serve
from phiclip.console import safe_text
from phiclip.version import __version__

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
    typer.echo(__version__)


# The commands, in the order `phiclip --help` lists them.
app.command("embed")(embed.embed)
app.command("embed-text")(embed.embed_text)
app.command("index")(search.index)
app.command("search")(search.search)
app.command("info")(info.info)
app.command("eval")(evaluate.evaluate)
app.command("compare")(compare.compare)
app.command("dedup")(collection.dedup)
app.command("cluster")(collection.cluster)
app.command("map")(collection.map_cmd)
app.command("align")(collection.align)
app.command("demo")(demo.demo)
app.command("tiny-model")(demo.tiny_model)
app.command("serve")(serve.serve)
app.add_typer(finetune.finetune_app, name="finetune")
app.command("classify")(finetune.classify_cmd)
app.command("export")(export.export)


def _quiet_libraries() -> None:
    """The CLI prints its own progress; keep transformers' warnings and loading bars out of it
    (``TRANSFORMERS_VERBOSITY=info`` brings them back). Through the environment, which transformers and
    huggingface_hub read when they are imported (by a command that needs them, never by ``--help``)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if os.environ["TRANSFORMERS_VERBOSITY"] == "error":
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if "transformers" in sys.modules:  # imported already: it has read the environment
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()


def main() -> None:
    """Console entry point."""
    _quiet_libraries()
    app()


__all__ = ["app", "main"]
