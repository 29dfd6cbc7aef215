"""``phiclip index`` and ``phiclip search``: the FAISS index of an output and queries against it
(:func:`phiclip.retrieval.build_index`, :func:`phiclip.retrieval.search`)."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from phiclip import retrieval
from phiclip.cli.common import (
    AllowIncompleteOpt,
    AllowOtherWeightsOpt,
    EmbDirArg,
    ModelOverrideOpt,
    QueryDeviceOpt,
    QueryPrecision,
    QueryPrecisionOpt,
    api_errors,
    echo_json,
    fail_cli,
)
from phiclip.console import safe_text
from phiclip.schema import MANIFEST_FILE


class IndexType(str, enum.Enum):
    auto = "auto"
    flat = "flat"
    hnsw = "hnsw"
    ivf = "ivf"


def index(
    emb_dir: EmbDirArg,
    index_type: Annotated[IndexType, typer.Option("--type", help=(
        "auto: exact (flat) up to 100k vectors, HNSW up to 1M, IVF beyond."))] = IndexType.auto,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even when the index is up to date.")] = False,
    allow_incomplete: AllowIncompleteOpt = False,
    model: ModelOverrideOpt = None,
    allow_other_weights: AllowOtherWeightsOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the index description as JSON.")] = False,
) -> None:
    """Build the FAISS index of EMB_DIR under EMB_DIR/index/ and print its measured recall@10."""
    with api_errors():
        info = retrieval.build_index(emb_dir, index_type=index_type.value, force=force,
                                     allow_incomplete=allow_incomplete, model=model,
                                     allow_other_weights=allow_other_weights)
    if as_json:
        echo_json({**info.to_meta(), "path": info.path, "built_now": info.built_now})
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


def search(
    emb_dir: EmbDirArg,
    text: Annotated[str | None, typer.Option("--text", "-t", help="A text query (needs a CLIP-like encoder).")] = None,
    image: Annotated[Path | None, typer.Option("--image", "-i", help="An image file as the query.")] = None,
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="Number of results.")] = 10,
    device: QueryDeviceOpt = "auto",
    precision: QueryPrecisionOpt = QueryPrecision.auto,
    allow_incomplete: AllowIncompleteOpt = False,
    model: ModelOverrideOpt = None,
    allow_other_weights: AllowOtherWeightsOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the hits as a JSON list.")] = False,
) -> None:
    """Print the K stored items nearest (cosine) to a text or image query, embedded with the index's encoder."""
    if (text is None) == (image is None):
        fail_cli("give exactly one query: --text 'a red car' or --image path.jpg")
    with api_errors():
        if not as_json and (emb_dir / MANIFEST_FILE).is_file() and not retrieval.index_is_fresh(emb_dir):
            Console(stderr=True).print(safe_text(f"building the index of {emb_dir} (once; `phiclip index` does it ahead)",
                                                 "dim"), highlight=False, soft_wrap=True)
        hits = retrieval.search(emb_dir, text=text, image=image, k=k, device=device, dtype=precision.value,
                                allow_incomplete=allow_incomplete, model=model, allow_other_weights=allow_other_weights)
    if as_json:
        echo_json([h.to_dict() for h in hits])
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
