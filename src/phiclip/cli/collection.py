"""``phiclip dedup``, ``cluster``, ``map`` and ``align``: know a collection from its vectors
(:mod:`phiclip.collection.commands`, one API function per command).

IN is the ``--output`` folder of ``phiclip embed`` or a Parquet file with an ``id`` column and a vector
column. The API is imported when a command runs (it loads numpy, PIL and FAISS), so ``phiclip --help``
stays light; the defaults below are the API's (a test checks they agree).
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from phiclip.cli.common import AllowIncompleteOpt, JsonOpt, api_errors, echo_json, say_dim
from phiclip.console import safe_text

#: ``phiclip.collection.dedup.DEFAULT_THRESHOLD`` and ``phiclip.collection.align.DEFAULT_K``.
DEFAULT_THRESHOLD = 0.95
DEFAULT_ALIGN_K = 10

InArg = Annotated[Path, typer.Argument(help=(
    "An output folder of `phiclip embed`, or a Parquet file with an id column and a vector column."))]
OutOpt = Annotated[Path, typer.Option("--output", "-o", help="Folder for the Parquet files, the HTML page and summary.json.")]
VectorColumnOpt = Annotated[str | None, typer.Option("--vector-column", help=(
    "Parquet input: the column holding the vectors (default: the only list column)."))]
IdColumnOpt = Annotated[str, typer.Option("--id-column", help="Parquet input: the column holding the ids.")]
LabelsOpt = Annotated[str | None, typer.Option("--labels", help=(
    "Labels of the items: a Parquet column name, or 'folder' (the folder each image sits in)."))]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Print each step on stderr as it starts.")]


class ColourBy(str, enum.Enum):
    label = "label"
    cluster = "cluster"


class LayoutMethod(str, enum.Enum):
    auto = "auto"
    umap = "umap"
    pca = "pca"


def _progress(progress: bool, as_json: bool) -> Any:
    return say_dim(Console(stderr=True)) if progress and not as_json else None


def _files_table(title: str, rows: list[tuple[str, Any]], paths: dict[str, Path]) -> None:
    table = Table(title=safe_text(title), show_header=False, title_justify="left")
    table.add_column("what")
    table.add_column("value", overflow="fold")
    for name, value in rows:
        table.add_row(safe_text(name), safe_text("-" if value is None else value))
    for name, path in paths.items():
        table.add_row(safe_text(f"file: {name}", "dim"), safe_text(str(path), "dim"))
    Console().print(table)


def dedup(
    input: InArg,
    output: OutOpt,
    threshold: Annotated[float, typer.Option("--threshold", min=-1.0, max=1.0, help=(
        "Cosine at or above which two items are near duplicates (of the group's representative)."))]
    = DEFAULT_THRESHOLD,
    exact: Annotated[bool, typer.Option("--exact/--no-exact", help=(
        "Also find exact duplicates by hashing the bytes of the image files the input records."))] = True,
    vector_column: VectorColumnOpt = None,
    id_column: IdColumnOpt = "id",
    allow_incomplete: AllowIncompleteOpt = False,
    memmap_dir: Annotated[Path | None, typer.Option("--memmap-dir", help=(
        "Read the vectors into a memory-mapped file in this folder (removed when done) instead of into "
        "memory: for collections whose vectors do not fit in RAM (n x dim x 4 bytes of disk)."))] = None,
    progress: ProgressOpt = True,
    as_json: JsonOpt = False,
) -> None:
    """Find exact and near duplicates: duplicates.parquet (groups), keep.parquet (the keep-list) and
    duplicates.html. Never deletes or moves a file."""
    # lazy: `phiclip --help` imports this module; the collection API (numpy, PIL, FAISS) loads on first use
    from phiclip.collection.commands import dedup_collection

    with api_errors():
        r = dedup_collection(input, output, threshold=threshold, exact=exact, vector_column=vector_column,
                             id_column=id_column, allow_incomplete=allow_incomplete, memmap_dir=memmap_dir,
                             progress=_progress(progress, as_json))
    if as_json:
        echo_json({**r.summary, "files": {k: str(v) for k, v in r.paths.items()}})
        return
    s = r.summary
    _files_table(f"phiclip dedup {input}", [
        ("items", f"{s['input']['items']:,} ({s['input']['dim']}-d)"),
        ("near duplicates", f"cosine >= {s['threshold']:g} to the representative; {s['method']}"),
        ("exact duplicates", "checked (same bytes)" if s["exact_checked"] else "not checked (no image paths)"),
        ("groups", f"{s['groups']:,} ({s['exact_groups']:,} exact, {s['near_groups']:,} near)"),
        ("to keep", f"{s['keep']:,}"),
        ("duplicates beyond the representatives", f"{s['drop_candidates']:,} (nothing deleted)"),
        ("unreadable", f"{s['unreadable']:,}" if s["unreadable"] else None),
    ], r.paths)


def cluster(
    input: InArg,
    output: OutOpt,
    k: Annotated[int, typer.Option("--k", min=1, help="Number of clusters.")],
    labels: LabelsOpt = None,
    seed: Annotated[int, typer.Option("--seed", help="k-means seed.")] = 1234,
    niter: Annotated[int, typer.Option("--niter", min=1, help="k-means iterations.")] = 20,
    vector_column: VectorColumnOpt = None,
    id_column: IdColumnOpt = "id",
    allow_incomplete: AllowIncompleteOpt = False,
    progress: ProgressOpt = True,
    as_json: JsonOpt = False,
) -> None:
    """k-means (FAISS) into K clusters: clusters.parquet (cluster and distance per item),
    cluster_summary.parquet, clusters.html; with --labels, V-measure and NMI."""
    # lazy: `phiclip --help` imports this module; the collection API (numpy, PIL, FAISS) loads on first use
    from phiclip.collection.commands import cluster_collection

    with api_errors():
        r = cluster_collection(input, output, k=k, labels=labels, seed=seed, niter=niter,
                               vector_column=vector_column, id_column=id_column,
                               allow_incomplete=allow_incomplete, progress=_progress(progress, as_json))
    if as_json:
        echo_json({**r.summary, "files": {k_: str(v) for k_, v in r.paths.items()}})
        return
    s = r.summary
    sizes = s["sizes"]
    rows: list[tuple[str, Any]] = [
        ("items", f"{s['input']['items']:,} ({s['input']['dim']}-d)"),
        ("protocol", s["protocol"]),
        ("clusters", f"{s['k']} (sizes {min(sizes):,} to {max(sizes):,}; {s['empty_clusters']} empty)"),
    ]
    if "labels" in s:
        lab = s["labels"]
        rows += [
            ("labels", f"{lab['source']}: {lab['classes']} classes, n={lab['n']:,}"),
            ("V-measure", f"{lab['v_measure']:.4f}"),
            ("NMI", f"{lab['nmi']:.4f}"),
            ("homogeneity / completeness", f"{lab['homogeneity']:.4f} / {lab['completeness']:.4f}"),
        ]
    _files_table(f"phiclip cluster {input}", rows, r.paths)


def map_cmd(
    input: InArg,
    output: OutOpt,
    colour_by: Annotated[ColourBy | None, typer.Option("--colour-by", "--color-by", help=(
        "Colour the points by label (--labels, default: the image folders) or by k-means cluster (--k)."))]
    = None,
    labels: LabelsOpt = None,
    k: Annotated[int, typer.Option("--k", min=1, help="Clusters for --colour-by cluster.")] = 10,
    method: Annotated[LayoutMethod, typer.Option("--method", help=(
        "auto: UMAP when umap-learn is installed, else PCA; umap; pca."))] = LayoutMethod.auto,
    seed: Annotated[int, typer.Option("--seed", help="Seed of UMAP / the randomized PCA.")] = 1234,
    max_thumbnails: Annotated[int, typer.Option("--max-thumbnails", min=0, help=(
        "Hover thumbnails for at most this many points (a seeded sample)."))] = 2000,
    vector_column: VectorColumnOpt = None,
    id_column: IdColumnOpt = "id",
    allow_incomplete: AllowIncompleteOpt = False,
    progress: ProgressOpt = True,
    as_json: JsonOpt = False,
) -> None:
    """A 2-D map of the collection: map.parquet (id, x, y) and map.html (pan, zoom, hover for the id and
    thumbnail). The method used (UMAP or PCA) is stated."""
    # lazy: `phiclip --help` imports this module; the collection API (numpy, PIL, FAISS) loads on first use
    from phiclip.collection.commands import map_collection

    with api_errors():
        r = map_collection(input, output, colour_by=colour_by.value if colour_by else None, labels=labels, k=k,
                           method=method.value, seed=seed, max_thumbnails=max_thumbnails,
                           vector_column=vector_column, id_column=id_column, allow_incomplete=allow_incomplete,
                           progress=_progress(progress, as_json))
    if as_json:
        echo_json({**r.summary, "files": {k_: str(v) for k_, v in r.paths.items()}})
        return
    s = r.summary
    _files_table(f"phiclip map {input}", [
        ("items", f"{s['input']['items']:,} ({s['input']['dim']}-d)"),
        ("layout", s["description"]),
        ("coloured by", s["colour_by"] or "nothing (one colour)"),
    ], r.paths)


def align(
    output_a: Annotated[Path, typer.Argument(help="First vectors: an embed output folder or a Parquet file.")],
    output_b: Annotated[Path, typer.Argument(help="Second vectors of the same items (joined by id).")],
    k: Annotated[int, typer.Option("--k", min=2, help="Neighbours for mutual-kNN and CKNNA.")] = DEFAULT_ALIGN_K,
    output: Annotated[Path | None, typer.Option("--output", "-o", help=(
        "Write the scores as JSON to this file (a folder gets alignment.json)."))] = None,
    vector_column: VectorColumnOpt = None,
    id_column: IdColumnOpt = "id",
    allow_incomplete: AllowIncompleteOpt = False,
    progress: ProgressOpt = True,
    as_json: JsonOpt = False,
) -> None:
    """How alike two embeddings of the same items are: mutual-kNN and CKNNA (Huh et al. 2024), linear CKA
    biased and unbiased, on the ids both hold."""
    # lazy: `phiclip --help` imports this module; the collection API (numpy, PIL, FAISS) loads on first use
    from phiclip.collection.commands import SCORE_DEFINITIONS, align_collections

    with api_errors():
        r = align_collections(output_a, output_b, k=k, output=output, vector_column=vector_column,
                              id_column=id_column, allow_incomplete=allow_incomplete,
                              progress=_progress(progress, as_json))
    if as_json:
        echo_json(r.data)
        return
    d = r.data
    join = d["join"]
    table = Table(title=safe_text(f"phiclip align {output_a} {output_b}"), title_justify="left")
    table.add_column("score")
    table.add_column("value", justify="right")
    table.add_column("definition", overflow="fold")
    for name, value in d["scores"].items():
        table.add_row(safe_text(name), f"{value:.4f}", safe_text(SCORE_DEFINITIONS.get(name, ""), "dim"))
    table.caption = safe_text(
        f"k={d['k']}, L2-normalised vectors; joined by id: {join['common']:,} common, {join['only_a']:,} only in "
        f"the first, {join['only_b']:,} only in the second"
    )
    Console().print(table)
    if r.path is not None:
        Console().print(safe_text(f"Written: {r.path}"), highlight=False, soft_wrap=True)
