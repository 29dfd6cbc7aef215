"""``compare``: embed the same images with two or more encoders and measure cost, quality and structure.

The flow: read the data (:func:`phiclip.datasets_io.load_data`), decode every image once to learn
its size and set aside the unreadable ones (listed in the report, never silently lost), then for
each encoder load it and embed the images (:mod:`phiclip.comparison.measure`, by default in a fresh
subprocess per encoder so peak memory is that encoder's own), then compute on the vectors:

- quality per encoder where labels or captions exist (:mod:`phiclip.evaluate`): kNN and linear
  probe on a stratified split of the compared images, zero-shot with prompt templates, and
  image-text retrieval recall@k, each metric either computed or skipped with a reason;
- structure per encoder (similarity histograms, a 2-D PCA) and per pair (k-NN overlap, linear CKA)
  (:mod:`phiclip.comparison.structure`);
- a few query images and their nearest neighbours in every space.

The result is a :class:`~phiclip.comparison.results.CompareReport`; with ``output`` set,
``report.json``, ``report.html`` and the embeddings (``embeddings/<key>.npy``) are written there.
"""

from __future__ import annotations

import base64
import io
import os
import tempfile
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from phiclip.comparison import structure
from phiclip.comparison.measure import (
    CompareError,
    Measured,
    MeasureJob,
    measure_in_subprocess,
    measure_model,
)
from phiclip.comparison.results import (
    CompareReport,
    DataSummary,
    ImageRecord,
    ModelResult,
    PairResult,
    ProjectionResult,
    Quality,
    SimilarityStats,
    finite_or_none,
)

if TYPE_CHECKING:  # pragma: no cover
    from phiclip.datasets_io import LabelledData

#: Keyword defaults of :func:`compare`, declared once (the CLI reads them from here).
DEFAULT_K = 10
DEFAULT_BATCH_SIZE = 16
DEFAULT_QUERIES = 6
DEFAULT_SHOWN_NEIGHBOURS = 5
DEFAULT_MAX_POINTS = 2000
DEFAULT_TEST_FRACTION = 0.5
RETRIEVAL_KS = (1, 5, 10)
THUMBNAIL_PX = 112
SIMILARITY_BINS = 40


def _model_keys(n: int) -> list[str]:
    return [chr(ord("A") + i) if i < 26 else f"M{i}" for i in range(n)]


def short_names(specs: Sequence[str]) -> list[str]:
    """Readable names for specs: the last path part of the location, plus options; made unique.

    >>> short_names(["clip:openai/clip-vit-base-patch32", "phi3v:/m/Phi-3-vision?num_crops=4"])
    ['clip-vit-base-patch32', 'Phi-3-vision num_crops=4']
    """
    from phiclip.encoders import parse_spec

    names = []
    for s in specs:
        spec = parse_spec(s)
        base = spec.location.rstrip("/\\").replace("\\", "/").split("/")[-1] or spec.location
        opts = " ".join(f"{k}={v}" for k, v in sorted(spec.options.items()))
        names.append(f"{base} {opts}".strip())
    if len(set(names)) < len(names):  # e.g. the same folder name under two parents
        names = [f"{n} ({spec.split(':', 1)[0]})" for n, spec in zip(names, specs)]
    if len(set(names)) < len(names):
        names = [f"{n} #{i + 1}" for i, n in enumerate(names)]
    return names


def spread_indices(n: int, m: int) -> np.ndarray:
    """``m`` indices spread evenly over ``range(n)`` (all of them when ``m >= n``); deterministic."""
    if m >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, m).round().astype(np.int64))


def choose_queries(labels: np.ndarray | None, n_items: int, n_queries: int) -> list[int]:
    """Query images for the neighbour grid: with labels, the first image of each class in turn
    (then the second of each, ...), so every class is shown; without, indices spread evenly."""
    if n_queries <= 0:
        return []
    if labels is None:
        return [int(i) for i in spread_indices(n_items, n_queries)]
    by_class = [list(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    chosen: list[int] = []
    depth = 0
    while len(chosen) < min(n_queries, n_items):
        for rows in by_class:
            if depth < len(rows) and len(chosen) < n_queries:
                chosen.append(int(rows[depth]))
        depth += 1
    return chosen


def _thumbnail_uri(image: Any) -> str:
    from phiclip.images import load_image

    img = load_image(image)
    img.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _source_name(image: Any, index: int, data_source: str) -> str:
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    return f"{data_source}#{index}"


def _as_file(image: Any, index: int, folder: Path) -> str:
    """A path the measuring process can read: the file itself, or the image written to ``folder``
    (encoded bytes as they are, anything else as lossless PNG)."""
    if isinstance(image, (str, os.PathLike)):
        return str(Path(image).resolve())
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(image, (bytes, bytearray, memoryview)):
        path = folder / f"{index:07d}.bin"
        path.write_bytes(bytes(image))
        return str(path)
    from phiclip.images import load_image

    path = folder / f"{index:07d}.png"
    load_image(image).save(path, format="PNG")
    return str(path)


def _quality(
    measured: Measured,
    labels: np.ndarray | None,
    owners: np.ndarray | None,
    *,
    k: int,
    test_fraction: float,
    seed: int,
) -> Quality:
    """kNN / linear probe / zero-shot / retrieval for one encoder; each computed or skipped with a reason."""
    from phiclip import evaluate

    q = Quality()
    x = measured.image_embeddings
    if labels is None:
        for name in ("knn", "linear_probe", "zero_shot"):
            q.skipped[name] = "the data has no labels"
    else:
        train, test = evaluate.stratified_split(labels, test_fraction, seed)
        if len(test) == 0 or len(np.unique(labels[train])) < 2:
            reason = "too few images per class for a train/test split (need 2+ classes with 2+ images each)"
            q.skipped["knn"] = q.skipped["linear_probe"] = reason
        else:
            knn = evaluate.knn_classify(x[train], labels[train], x[test], labels[test], k=k)
            q.metrics["knn_accuracy"] = knn["acc1"]
            probe = evaluate.linear_probe(x[train], labels[train], x[test], labels[test], seed=seed)
            q.metrics["linear_probe_accuracy"] = probe["acc1"]
        if measured.zero_shot_weights is not None:
            zs = evaluate.zero_shot_metrics(x, measured.zero_shot_weights, labels)
            q.metrics["zero_shot_top1"] = zs["acc1"]
            q.metrics["zero_shot_top5"] = zs["acc5"]
        else:
            q.skipped["zero_shot"] = measured.skipped.get("zero_shot", "the data has no class names")
    if owners is None:
        q.skipped["retrieval"] = "the data has no captions"
    elif measured.text_embeddings is None:
        q.skipped["retrieval"] = measured.skipped.get("retrieval", "no text embeddings")
    else:
        ks = [kk for kk in RETRIEVAL_KS if kk <= len(x)]
        r = evaluate.retrieval_metrics(x, measured.text_embeddings, owners, ks=ks)
        for kk in ks:
            q.metrics[f"text_to_image_recall@{kk}"] = r[f"image_retrieval_recall@{kk}"]
            q.metrics[f"image_to_text_recall@{kk}"] = r[f"text_retrieval_recall@{kk}"]
    q.metrics = {name: float(v) for name, v in q.metrics.items()}
    return q


def histogram_range(embeddings: Sequence[np.ndarray], bins: int = SIMILARITY_BINS) -> tuple[float, float]:
    """One similarity range for every space's histogram, so they share an x axis: the pairs'
    overall min and max, padded by half a bin and kept inside [-1, 1]."""
    lo, hi = 1.0, -1.0
    for x in embeddings:
        a, b = structure.similarity_range(x)
        lo, hi = min(lo, a), max(hi, b)
    pad = max((hi - lo) / bins / 2, 1e-3)
    return max(-1.0, lo - pad), min(1.0, hi + pad)


def _similarity(x: np.ndarray, labels: np.ndarray | None, value_range: tuple[float, float]) -> SimilarityStats:
    h = structure.similarity_histogram(x, labels, bins=SIMILARITY_BINS, value_range=value_range)
    return SimilarityStats(
        edges=[float(e) for e in h.edges],
        all=[int(c) for c in h.all],
        same=None if h.same is None else [int(c) for c in h.same],
        different=None if h.different is None else [int(c) for c in h.different],
        mean=h.mean,
        std=h.std,
        same_mean=finite_or_none(h.same_mean),
        different_mean=finite_or_none(h.different_mean),
    )


def _projections(embeddings: list[np.ndarray], max_points: int) -> list[ProjectionResult]:
    idx = spread_indices(embeddings[0].shape[0], max_points)
    out: list[ProjectionResult] = []
    reference = None
    for x in embeddings:
        proj = structure.pca_2d(x[idx])
        points = proj.points
        if reference is None:
            reference = points - points.mean(axis=0)
            points = reference
        else:
            points = structure.align_2d(reference, points)
        out.append(
            ProjectionResult(
                method="pca",
                indices=[int(i) for i in idx],
                points=[[float(p[0]), float(p[1])] for p in points],
                explained_variance_ratio=[float(v) for v in proj.explained_variance_ratio],
                aligned_to=None if not out else 0,
            )
        )
    return out


def compare(
    models: Sequence[str],
    data: str | Path | LabelledData,
    output: str | Path | None = None,
    *,
    k: int = DEFAULT_K,
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_images: int | None = None,
    templates: Sequence[str] | None = None,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    seed: int = 0,
    queries: int = DEFAULT_QUERIES,
    shown_neighbours: int = DEFAULT_SHOWN_NEIGHBOURS,
    max_points: int = DEFAULT_MAX_POINTS,
    isolate: bool = True,
    progress: Callable[[str], None] | None = None,
) -> CompareReport:
    """Embed the same images with each encoder and compare cost, quality and structure.

    Args:
        models: two or more encoder specs (``clip:...``, ``phi3v:...?num_crops=4``, ...).
        data: a folder per class, a CSV/Parquet table (with captions for retrieval), ``hf:NAME``,
            or a loaded :class:`~phiclip.datasets_io.LabelledData`.
        output: where to write ``report.json``, ``report.html`` and ``embeddings/``; ``None``: nothing written.
        k: neighbours for the k-NN overlap and the kNN classifier (needs more than ``k`` images).
        device, dtype: as for :func:`phiclip.load_encoder`.
        batch_size: images per forward pass.
        max_images: compare at most this many images, spread evenly over the data (so over its classes).
        templates: zero-shot prompt templates with ``{c}`` (default: :data:`phiclip.evaluate.DEFAULT_TEMPLATES`).
        test_fraction, seed: the stratified split for kNN and linear probe.
        queries, shown_neighbours: size of the neighbour grid in the report.
        max_points: at most this many points in each 2-D projection.
        isolate: measure each encoder in its own subprocess (clean peak memory); ``False`` runs
            them in this process (faster to start; peak memory then less exact).
        progress: called with a line of text as each step starts.

    Raises:
        ValueError: bad arguments or data (the message names the input and the fix).
        CompareError: an encoder could not be loaded or run (the message names it).
    """
    from phiclip import __version__
    from phiclip.datasets_io import LabelledData, load_data
    from phiclip.encoders import parse_spec
    from phiclip.evaluate import DEFAULT_TEMPLATES
    from phiclip.images import try_load_image

    say = progress or (lambda _msg: None)
    specs = [str(m) for m in models]
    if len(specs) < 2:
        raise ValueError(f"compare needs at least two models (got {len(specs)}); pass --model twice")
    for s in specs:
        parse_spec(s)  # a malformed spec fails here, before any work
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if max_images is not None and max_images < 2:
        raise ValueError(f"max_images must be at least 2, got {max_images}")

    say(f"reading {data}")
    ds = data if isinstance(data, LabelledData) else load_data(data)
    rows = np.arange(len(ds))  # each compared image's row in the data as read
    if max_images is not None and len(ds) > max_images:
        rows = spread_indices(len(ds), max_images)
        ds = ds.subset(rows)

    # Decode every image once: sizes for the report, and unreadable images set aside (listed).
    keep: list[int] = []
    sizes: list[tuple[int, int]] = []
    skipped_images: list[dict[str, str]] = []
    for i, image in enumerate(ds.images):
        img, err = try_load_image(image)
        if err is not None:
            skipped_images.append({"source": _source_name(image, int(rows[i]), ds.source), "reason": err.reason})
            continue
        keep.append(i)
        sizes.append(img.size)
    if len(keep) < len(ds):
        ds = ds.subset(keep)
        rows = rows[keep]
    n = len(ds)
    if n < 2:
        raise ValueError(f"{ds.source}: {n} readable image(s); compare needs at least two")
    if k > n - 1:
        raise ValueError(f"k={k} neighbours needs more than {k} images, and {ds.source} has {n}; lower --k")

    labels = ds.labels
    classnames = list(ds.classnames) if ds.classnames is not None else None
    label_names = None
    if labels is not None:
        label_names = [classnames[int(y)] if classnames else str(int(y)) for y in labels]
    texts: list[str] | None = None
    owners: np.ndarray | None = None
    if ds.captions is not None and any(ds.captions):
        texts, owners = ds.texts_and_owners()
    prompt_names = [c.replace("_", " ") for c in classnames] if classnames and labels is not None else None
    tmpl = list(templates) if templates else list(DEFAULT_TEMPLATES)

    keys = _model_keys(len(specs))
    names = short_names(specs)
    measured: list[Measured] = []
    with tempfile.TemporaryDirectory(prefix="phiclip-compare-") as tmp:
        tmpdir = Path(tmp)
        sources = [_as_file(im, i, tmpdir / "images") for i, im in enumerate(ds.images)]
        for key, spec in zip(keys, specs):
            say(f"model {key}: loading and embedding {n} images with {spec}")
            job = MeasureJob(
                spec=spec,
                sources=sources,
                device=device,
                dtype=dtype,
                batch_size=batch_size,
                texts=texts,
                classnames=prompt_names,
                templates=tmpl,
            )
            try:
                m = measure_in_subprocess(job, tmpdir / f"model-{key}") if isolate else measure_model(job)
            except CompareError as e:
                raise CompareError(f"model {key}: {e}") from None
            if m.image_embeddings.shape[0] != n:
                raise CompareError(
                    f"model {key} ({spec}) returned {m.image_embeddings.shape[0]} embeddings for {n} images"
                )
            measured.append(m)
            say(
                f"model {key}: dim {m.cost.dim}, {m.cost.images_per_s:.1f} images/s, "
                f"loaded in {m.cost.load_s:.1f} s"
            )

    say("computing quality and structure metrics")
    embeddings = [m.image_embeddings for m in measured]
    query_idx = choose_queries(labels, n, queries)
    n_show = max(1, min(shown_neighbours, n - 1))
    projections = _projections(embeddings, max_points)
    sim_range = histogram_range(embeddings)
    results: list[ModelResult] = []
    for i, (key, spec, name, m) in enumerate(zip(keys, specs, names, measured)):
        nn = structure.knn_indices(m.image_embeddings, n_show)
        results.append(
            ModelResult(
                key=key,
                spec=spec,
                name=name,
                description=m.description,
                cost=m.cost,
                quality=_quality(m, labels, owners, k=k, test_fraction=test_fraction, seed=seed),
                similarity=_similarity(m.image_embeddings, labels, sim_range),
                projection=projections[i],
                neighbours=[[int(j) for j in nn[q]] for q in query_idx],
            )
        )
    pairs: list[PairResult] = []
    for a in range(len(specs)):
        for b in range(a + 1, len(specs)):
            ov = structure.knn_overlap(embeddings[a], embeddings[b], k)
            shared = np.rint(ov.per_image * k).astype(np.int64)
            pairs.append(
                PairResult(
                    a=a,
                    b=b,
                    k=k,
                    linear_cka=structure.linear_cka(embeddings[a], embeddings[b]),
                    knn_overlap_mean=ov.mean,
                    knn_overlap_chance=ov.chance,
                    knn_overlap_per_image=[float(v) for v in ov.per_image],
                    knn_overlap_counts=[int(c) for c in np.bincount(shared, minlength=k + 1)],
                )
            )

    images = [
        ImageRecord(
            index=i,
            source=_source_name(im, int(rows[i]), ds.source),
            width=int(sizes[i][0]),
            height=int(sizes[i][1]),
            label=None if label_names is None else label_names[i],
            caption=(ds.captions[i][0] if ds.captions is not None and ds.captions[i] else None),
        )
        for i, im in enumerate(ds.images)
    ]
    report = CompareReport(
        phiclip_version=__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        data=DataSummary(
            source=str(ds.source or data),
            images=n,
            classnames=classnames or [],
            has_labels=labels is not None,
            has_captions=owners is not None,
            skipped=skipped_images,
        ),
        settings={
            "k": k,
            "device": device,
            "dtype": dtype,
            "batch_size": batch_size,
            "max_images": max_images,
            "templates": tmpl,
            "test_fraction": test_fraction,
            "seed": seed,
            "isolate": isolate,
            "shown_neighbours": n_show,
            "max_points": max_points,
        },
        images=images,
        queries=query_idx,
        models=results,
        pairs=pairs,
    )
    if output is not None:
        say(f"writing the report to {output}")
        write_outputs(report, output, ds.images, embeddings)
    return report


def write_outputs(
    report: CompareReport, output: str | Path, images: Sequence[Any], embeddings: Sequence[np.ndarray]
) -> dict[str, Path]:
    """Write ``report.json``, ``report.html`` (thumbnails of the grid images embedded) and
    ``embeddings/<key>.npy`` (row i = ``report.images[i]``) into ``output``."""
    from phiclip.comparison.report import write_report

    out = Path(output)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory; choose another --output")
    out.mkdir(parents=True, exist_ok=True)
    shown = set(report.queries)
    for m in report.models:
        for row in m.neighbours:
            shown.update(row)
    thumbs = {i: _thumbnail_uri(images[i]) for i in sorted(shown)}
    paths = write_report(report, out, thumbs)
    emb_dir = out / "embeddings"
    emb_dir.mkdir(exist_ok=True)
    for m, x in zip(report.models, embeddings):
        path = emb_dir / f"{m.key}.npy"
        np.save(path, np.asarray(x, dtype=np.float32))
        paths[f"embeddings_{m.key}"] = path
    return paths


__all__ = ["CompareError", "choose_queries", "compare", "short_names", "spread_indices", "write_outputs"]
