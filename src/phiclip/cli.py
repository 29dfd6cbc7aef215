"""The ``phiclip`` command line: thin; parses, calls the Python API, prints.

Each command lives in the section of the capability it belongs to.
"""

from __future__ import annotations

import typer

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

# === index / search / eval ===================================================================

# === compare =================================================================================

# === demo ====================================================================================


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":
    main()
