"""``compare``: embed the same images with two or more encoders and measure cost, quality and structure.

The flow, one function per step: read the data through the one input layer
(:func:`phiclip.inputs.load_data`; :func:`read_data`), plan one measuring job per encoder
(:func:`plan_jobs`), embed and time each (:mod:`phiclip.comparison.measure`, by default in a fresh
subprocess per encoder so peak memory is that encoder's own; images that fail are values, never
fatal), keep the images every encoder embedded (:func:`common_images`: the others are listed as left
out), then compute on the vectors:

- quality per encoder where labels or captions exist (:func:`quality`, :mod:`phiclip.evaluate`): kNN
  and linear probe on a stratified split of the compared images, zero-shot with prompt templates
  (top-5 only with more than 5 classes), and image-text retrieval recall@k, each computed or
  skipped with a reason;
- structure per encoder (similarity histograms, a 2-D PCA) and per pair (k-NN overlap, linear CKA)
  (:mod:`phiclip.comparison.structure`);
- a few query images and their nearest neighbours in every space;
- warnings where a number means little (a timed section too short to compare speeds).

The result is a :class:`~phiclip.comparison.results.CompareReport`; with ``output`` set,
``report.json``, ``report.html`` and the embeddings (``embeddings/<key>.npy``) are written there.
"""

from __future__ import annotations

import base64
import io
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

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
    MIN_TIMED_SECONDS,
    CompareReport,
    Cost,
    DataSummary,
    ImageRecord,
    ModelResult,
    PairResult,
    ProjectionResult,
    Quality,
    SimilarityStats,
    finite_or_none,
)
from phiclip.images import DEFAULT_MAX_PIXELS, load_image
from phiclip.inputs import LabelledData, load_data
from phiclip.version import __version__

#: Defaults of :class:`CompareOptions`, declared once (the CLI reads them from here).
DEFAULT_K = 10
DEFAULT_BATCH_SIZE = 16
DEFAULT_QUERIES = 6
DEFAULT_SHOWN_NEIGHBOURS = 5
DEFAULT_MAX_POINTS = 2000
#: ``phiclip.evaluate.DEFAULT_TEST_FRACTION`` (and ``DEFAULT_K`` its ``DEFAULT_KNN_K``): one protocol for
#: ``eval`` and ``compare``; a test checks they agree (importing evaluate here would load torch for --help).
DEFAULT_TEST_FRACTION = 0.3
DEFAULT_PASSES = 3
RETRIEVAL_KS = (1, 5, 10)
THUMBNAIL_PX = 112
SIMILARITY_BINS = 40
#: Top-5 accuracy is reported only with more classes than this (with 5 or fewer it is always 1).
TOP5_MIN_CLASSES = 6


@dataclass(frozen=True)
class CompareOptions:
    """How :func:`compare` runs.

    ``k``: neighbours for the k-NN overlap and the kNN classifier (needs more than ``k`` images).
    ``device``, ``dtype`` (compute precision): as for :func:`phiclip.load_encoder`. ``batch_size``:
    images per forward pass. ``passes``: timed passes over the images (speed = the median, with
    the spread). ``max_pixels``: larger images are left out (``None``: no limit). ``max_images``:
    compare at most this many images, spread evenly over the data (so over its classes).
    ``templates``: zero-shot prompt templates with ``{c}`` (default:
    :data:`phiclip.evaluate.DEFAULT_TEMPLATES`). ``test_fraction``, ``seed``: the stratified split
    for kNN and linear probe (the data's own train/test splits when it has them, as ``phiclip eval``);
    ``shots``, ``probe_seeds``: the linear probe's k-shot draws (:class:`phiclip.evaluate.LinearProbeProtocol`). ``queries``, ``shown_neighbours``: the neighbour grid. ``max_points``:
    points per 2-D projection. ``isolate``: measure each encoder in its own subprocess (clean peak
    memory; ``False`` runs them in this process). ``split`` and the column options: how the data is
    read (see :func:`phiclip.inputs.load_data`).
    """

    k: int = DEFAULT_K
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = DEFAULT_BATCH_SIZE
    passes: int = DEFAULT_PASSES
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    max_images: int | None = None
    templates: Sequence[str] | None = None
    test_fraction: float = DEFAULT_TEST_FRACTION
    seed: int = 0
    shots: int | None = None
    probe_seeds: int = 1
    queries: int = DEFAULT_QUERIES
    shown_neighbours: int = DEFAULT_SHOWN_NEIGHBOURS
    max_points: int = DEFAULT_MAX_POINTS
    isolate: bool = True
    split: str | None = None
    image_column: str | None = None
    label_column: str | None = None
    caption_column: str | None = None

    def check(self, specs: Sequence[str]) -> None:
        """Refuse bad settings before any work.

        Raises:
            ValueError: naming the setting and the fix.
        """
        # lazy: `phiclip --help` imports this module; phiclip.encoders is loaded on first use
        from phiclip.encoders import parse_spec

        if len(specs) < 2:
            raise ValueError(f"compare needs at least two models (got {len(specs)}); pass --model twice")
        for s in specs:
            parse_spec(s)  # a malformed spec fails here, before any work
        if self.k < 1:
            raise ValueError(f"k must be at least 1, got {self.k}")
        if self.max_images is not None and self.max_images < 2:
            raise ValueError(f"max_images must be at least 2, got {self.max_images}")
        if self.passes < 1:
            raise ValueError(f"passes must be at least 1, got {self.passes}")

    def settings(self) -> dict[str, Any]:
        """The settings recorded in the report."""
        out = asdict(self)
        out["templates"] = self.template_list()
        return out

    def template_list(self) -> list[str]:
        """The zero-shot templates in use."""
        # lazy: `phiclip --help` imports this module; phiclip.evaluate is loaded on first use
        from phiclip.evaluate import DEFAULT_TEMPLATES

        return list(self.templates) if self.templates else list(DEFAULT_TEMPLATES)


def _model_keys(n: int) -> list[str]:
    return [chr(ord("A") + i) if i < 26 else f"M{i}" for i in range(n)]


def short_names(specs: Sequence[str]) -> list[str]:
    """Readable names for specs: the last path part of the location, plus options; made unique.

    >>> short_names(["clip:openai/clip-vit-base-patch32", "phi3v:/m/Phi-3-vision?num_crops=4"])
    ['clip-vit-base-patch32', 'Phi-3-vision num_crops=4']
    """
    # lazy: `phiclip --help` imports this module; phiclip.encoders is loaded on first use
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

    img = load_image(image)
    img.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _as_file(image: Any, index: int, folder: Path) -> str:
    """A path the measuring process can read: the file itself, or the image written to ``folder``
    (encoded bytes as they are, anything else as lossless PNG)."""
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(Path(image).absolute())
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(image, (bytes, bytearray, memoryview)):
        path = folder / f"{index:07d}.bin"
        path.write_bytes(bytes(image))
        return str(path)

    path = folder / f"{index:07d}.png"
    load_image(image, max_pixels=None).save(path, format="PNG")
    return str(path)


# --- step 1: the data ---------------------------------------------------------------------------------
def read_data(data: str | Path | LabelledData, opts: CompareOptions) -> LabelledData:
    """The compared images: the data as read, spread over at most ``max_images``."""

    cols = dict(image_column=opts.image_column, label_column=opts.label_column, caption_column=opts.caption_column)
    ds = data if isinstance(data, LabelledData) else load_data(data, split=opts.split, **cols)
    if ds.sources is None:  # in-memory data: name each image by its place in the data as given
        ds = replace(ds, sources=[ds.name_of(i) for i in range(len(ds))])
    if opts.max_images is not None and len(ds) > opts.max_images:
        ds = ds.subset(spread_indices(len(ds), opts.max_images))
    if opts.k > len(ds) - 1:
        raise ValueError(f"k={opts.k} neighbours needs more than {opts.k} images, and {ds.source} has {len(ds)}; "
                         "lower --k")
    return ds


def prompt_classnames(ds: LabelledData) -> list[str] | None:
    """The class names as words for the zero-shot prompts (``blue_circle`` -> ``blue circle``)."""
    # lazy: `phiclip --help` imports this module; phiclip.evaluate is loaded on first use
    from phiclip.evaluate import prompt_name

    if ds.classnames is None or ds.labels is None:
        return None
    return [prompt_name(c) for c in ds.classnames]


# --- step 2: measure each encoder ------------------------------------------------------------------------
def plan_jobs(specs: Sequence[str], ds: LabelledData, opts: CompareOptions, folder: Path) -> list[MeasureJob]:
    """One measuring job per encoder, on the same image files (in-memory images written to ``folder``)."""
    texts = ds.texts_and_owners()[0] if ds.captions is not None and any(ds.captions) else None
    sources = [_as_file(im, i, folder) for i, im in enumerate(ds.images)]
    return [
        MeasureJob(spec=spec, sources=sources, device=opts.device, dtype=opts.dtype, batch_size=opts.batch_size,
                   texts=texts, classnames=prompt_classnames(ds), templates=opts.template_list(),
                   passes=opts.passes, max_pixels=opts.max_pixels)
        for spec in specs
    ]


def measure_all(jobs: Sequence[MeasureJob], keys: Sequence[str], opts: CompareOptions, folder: Path,
                say: Callable[[str], None]) -> list[Measured]:
    """Measure every job, each in a subprocess unless ``opts.isolate`` is off."""
    measured: list[Measured] = []
    for n, (key, job) in enumerate(zip(keys, jobs), start=1):
        say(f"model {key} ({n}/{len(jobs)}): {len(job.sources)} images with {job.spec} "
            f"({job.passes} timed passes)")

        def stage(msg: str, key: str = key) -> None:
            say(f"model {key}: {msg}")

        try:
            if opts.isolate:
                m = measure_in_subprocess(job, folder / f"model-{key}", say=stage)
            else:
                m = measure_model(job, say=stage)
        except CompareError as e:
            raise CompareError(f"model {key}: {e}") from None
        measured.append(m)
        spread = ""
        if m.cost.passes > 1 and m.cost.images_per_s_min is not None:
            spread = f" (min {m.cost.images_per_s_min:.1f}, max {m.cost.images_per_s_max:.1f})"
        left = f", {len(m.failed)} image(s) left out" if m.failed else ""
        say(f"model {key}: dim {m.cost.dim}, {m.cost.images_per_s:.1f} images/s{spread}, loaded in "
            f"{m.cost.load_s:.1f} s{left}")
    return measured


# --- step 3: the images every encoder embedded ---------------------------------------------------------------
def common_images(ds: LabelledData, measured: Sequence[Measured], keys: Sequence[str]
                  ) -> tuple[list[int], list[tuple[int, int]], list[dict[str, str]]]:
    """The rows of ``ds`` every encoder embedded, their sizes, and each other row with the reason
    (naming the encoders that refused it when not all did)."""
    kept_by = [dict(zip(m.kept, m.sizes)) for m in measured]
    rows = sorted(set.intersection(*[set(k) for k in kept_by]))
    why: dict[int, list[tuple[str, str, str]]] = {}
    for key, m in zip(keys, measured):
        for i, stage, reason in m.failed:
            why.setdefault(int(i), []).append((key, stage, reason))
    left: list[dict[str, str]] = []
    for i in sorted(why):
        key, stage, reason = why[i][0]
        if len(why[i]) < len(measured):
            reason = f"model {', '.join(k for k, _, _ in why[i])}: {reason}"
        left.append({"source": ds.name_of(i), "stage": stage, "reason": reason})
    return rows, [kept_by[0][i] for i in rows], left


def _rows_of(m: Measured, rows: Sequence[int]) -> Measured:
    """``m`` restricted to the common rows, in their order."""
    at = {i: j for j, i in enumerate(m.kept)}
    pick = [at[i] for i in rows]
    return replace(m, image_embeddings=m.image_embeddings[pick], kept=list(rows), sizes=[m.sizes[j] for j in pick])


# --- step 4: the numbers ------------------------------------------------------------------------------
def quality(measured: Measured, labels: np.ndarray | None, owners: np.ndarray | None, opts: CompareOptions,
            splits: Sequence[str] | None = None) -> Quality:
    """kNN / linear probe / zero-shot / clustering / retrieval for one encoder, each computed by the protocol
    object ``phiclip eval`` uses (:mod:`phiclip.evaluate`) and recorded with its split and n, or skipped
    with a reason. ``splits``: each image's split, when the data has splits (then kNN and the probe train
    on ``train`` and the other tasks score the test split, as in ``eval``)."""
    # lazy: `phiclip --help` imports this module; phiclip.evaluate is loaded on first use
    from phiclip import evaluate

    q = Quality()
    x = measured.image_embeddings
    rows, where = evaluate.scored_rows(len(x), splits)
    if labels is None:
        for name in ("knn", "linear_probe", "zero_shot", "clustering"):
            q.skipped[name] = "the data has no labels"
    else:
        train, test, how = evaluate.classification_split(labels, evaluate.SplitProtocol(opts.test_fraction, opts.seed),
                                                         splits)
        if len(test) == 0 or len(np.unique(labels[train])) < 2:
            reason = "too few images per class for a train/test split (need 2+ classes with 2+ images each)"
            q.skipped["knn"] = q.skipped["linear_probe"] = reason
        else:
            n_split = {"train": len(train), "test": len(test)}
            knn_p = evaluate.KnnProtocol(k=opts.k)
            q.metrics["knn_accuracy"] = knn_p.run(x[train], labels[train], x[test], labels[test])["acc1"]
            q.protocols["knn_accuracy"] = evaluate.protocol_record(knn_p, how, n_split)
            probe_p = evaluate.LinearProbeProtocol(shots=opts.shots, seeds=opts.probe_seeds, seed=opts.seed)
            probe, _ = probe_p.run(x[train], labels[train], x[test], labels[test])
            q.metrics["linear_probe_accuracy"] = probe["acc1"]
            q.protocols["linear_probe_accuracy"] = evaluate.protocol_record(probe_p, how, n_split)
        weights = measured.zero_shot_weights
        if weights is not None:
            zs_p = evaluate.ZeroShotProtocol(tuple(opts.template_list()))
            zs = zs_p.run(x[rows], weights, labels[rows])
            record = evaluate.protocol_record(zs_p, where, {"test": len(rows)})
            q.metrics["zero_shot_top1"] = zs["acc1"]
            q.protocols["zero_shot_top1"] = record
            if len(weights) >= TOP5_MIN_CLASSES:
                q.metrics["zero_shot_top5"] = zs["acc5"]
                q.protocols["zero_shot_top5"] = record
            else:
                q.skipped["zero_shot_top5"] = (f"only {len(weights)} classes: the true class is always among the "
                                               "top 5, so top-5 accuracy would be 1")
        else:
            q.skipped["zero_shot"] = measured.skipped.get("zero_shot", "the data has no class names")
        n_classes = len(np.unique(labels[rows]))
        if n_classes < 2 or n_classes > len(rows):
            q.skipped["clustering"] = f"{n_classes} class(es) among {len(rows)} images: nothing to cluster"
        else:
            cl_p = evaluate.ClusteringProtocol(seed=opts.seed)
            q.metrics["clustering_v_measure"] = cl_p.run(x[rows], labels[rows])["v_measure"]
            q.protocols["clustering_v_measure"] = evaluate.protocol_record(cl_p, where, {"test": len(rows)})
    if owners is None:
        q.skipped["retrieval"] = "the data has no captions"
    elif measured.text_embeddings is None:
        q.skipped["retrieval"] = measured.skipped.get("retrieval", "no text embeddings")
    else:
        at = np.full(len(x), -1, dtype=np.int64)
        at[rows] = np.arange(len(rows))
        keep = at[owners] >= 0
        ks = tuple(kk for kk in RETRIEVAL_KS if kk <= len(rows))
        ret_p = evaluate.RetrievalProtocol(ks)
        r = ret_p.run(x[rows], measured.text_embeddings[keep], at[owners[keep]])
        record = evaluate.protocol_record(ret_p, where, {"images": len(rows), "texts": int(keep.sum())})
        for kk in ks:
            q.metrics[f"text_to_image_recall@{kk}"] = r[f"image_retrieval_recall@{kk}"]
            q.metrics[f"image_to_text_recall@{kk}"] = r[f"text_retrieval_recall@{kk}"]
            q.protocols[f"text_to_image_recall@{kk}"] = q.protocols[f"image_to_text_recall@{kk}"] = record
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


def alignment_scores(a: np.ndarray, b: np.ndarray, k: int) -> tuple[dict[str, float | None], dict[str, str]]:
    """The scores of ``phiclip align`` (:mod:`phiclip.collection.align`) for two spaces of the same images
    (row i the same image), on L2-normalised vectors; each ``None`` with a reason where it cannot be computed."""
    # lazy: `phiclip --help` imports this module; the collection package loads FAISS and PIL
    from phiclip.collection.align import cka, cknna, mutual_knn
    from phiclip.collection.vectors import l2_normalize

    xa, xb = l2_normalize(np.asarray(a, np.float32)), l2_normalize(np.asarray(b, np.float32))
    n = xa.shape[0]
    scores: dict[str, float | None] = {}
    skipped: dict[str, str] = {}
    scores["mutual_knn"] = mutual_knn(xa, xb, k)
    if k >= 2 and n >= 4:
        scores["cknna"] = cknna(xa, xb, k, unbiased=True)
        scores["cknna_biased"] = cknna(xa, xb, k, unbiased=False)
    else:
        scores["cknna"] = scores["cknna_biased"] = None
        skipped["cknna"] = f"CKNNA needs k >= 2 and 4 images (k={k}, {n} images)"
    scores["cka"] = cka(xa, xb)
    if n >= 4:
        scores["cka_unbiased"] = cka(xa, xb, unbiased=True)
    else:
        scores["cka_unbiased"] = None
        skipped["cka_unbiased"] = f"the unbiased HSIC needs 4 images ({n} here)"
    return {key: finite_or_none(v) for key, v in scores.items()}, skipped


def pair_results(embeddings: Sequence[np.ndarray], k: int) -> list[PairResult]:
    """k-NN overlap, linear CKA and the alignment scores (mutual-kNN, CKNNA, CKA) of every pair of spaces."""
    pairs: list[PairResult] = []
    for a in range(len(embeddings)):
        for b in range(a + 1, len(embeddings)):
            ov = structure.knn_overlap(embeddings[a], embeddings[b], k)
            shared = np.rint(ov.per_image * k).astype(np.int64)
            scores, skipped = alignment_scores(embeddings[a], embeddings[b], k)
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
                    alignment=scores,
                    alignment_skipped=skipped,
                )
            )
    return pairs


def timing_warnings(keys: Sequence[str], costs: Sequence[Cost]) -> list[str]:
    """Why speed figures may mean little: a timed pass under :data:`MIN_TIMED_SECONDS`, or two
    encoders whose ranges of speed over the passes overlap (their difference is within the noise)."""
    out: list[str] = []
    short = [f"{k} {c.encode_s:.2f} s" for k, c in zip(keys, costs) if c.encode_s < MIN_TIMED_SECONDS]
    if short:
        out.append(
            f"The timed section is too short to mean much (model time per pass: {', '.join(short)}; under "
            f"{MIN_TIMED_SECONDS:g} s, start-up costs and noise dominate): speed figures and their ratios are not "
            "reliable; compare more images (--max-images) or use more passes (--passes)."
        )
    return out


def _check_enough(ds: LabelledData, opts: CompareOptions, left_out: Sequence[dict[str, str]]) -> None:
    """Refuse a comparison on fewer than two images, or with more neighbours than images."""
    n = len(ds)
    if n < 2:
        first = f", e.g. {left_out[0]['source']}: {left_out[0]['reason']}" if left_out else ""
        raise ValueError(f"{ds.source}: {n} image(s) embedded by every model; compare needs at least two "
                         f"({len(left_out)} left out{first})")
    if opts.k > n - 1:
        raise ValueError(f"k={opts.k} neighbours needs more than {opts.k} images, and {ds.source} has {n} that every "
                         "model embedded; lower --k")


def build_report(specs: Sequence[str], keys: Sequence[str], ds: LabelledData, measured: Sequence[Measured],
                 sizes: Sequence[tuple[int, int]], opts: CompareOptions) -> CompareReport:
    """Step 4: every number of the report from the vectors of the compared images (``ds``'s rows)."""

    n = len(ds)
    labels = ds.labels
    owners = ds.texts_and_owners()[1] if ds.captions is not None and any(ds.captions) else None
    embeddings = [m.image_embeddings for m in measured]
    query_idx = choose_queries(labels, n, opts.queries)
    n_show = max(1, min(opts.shown_neighbours, n - 1))
    projections = _projections(embeddings, opts.max_points)
    sim_range = histogram_range(embeddings)
    results = []
    for i, (key, spec, name, m) in enumerate(zip(keys, specs, short_names(specs), measured)):
        nn = structure.knn_indices(m.image_embeddings, n_show)
        results.append(ModelResult(
            key=key, spec=spec, name=name, description=m.description, cost=m.cost,
            quality=quality(m, labels, owners, opts, ds.splits),
            similarity=_similarity(m.image_embeddings, labels, sim_range),
            projection=projections[i],
            neighbours=[[int(j) for j in nn[q]] for q in query_idx],
        ))  # fmt: skip
    names = ds.classnames
    images = [
        ImageRecord(
            index=i, source=ds.name_of(i), width=int(sizes[i][0]), height=int(sizes[i][1]),
            label=None if labels is None else (names[int(labels[i])] if names else str(int(labels[i]))),
            caption=(ds.captions[i][0] if ds.captions is not None and ds.captions[i] else None),
        )
        for i in range(n)
    ]  # fmt: skip
    return CompareReport(
        phiclip_version=__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        data=DataSummary(source=str(ds.source), images=n, classnames=list(names or []), has_labels=labels is not None,
                         has_captions=owners is not None),
        settings={**opts.settings(), "shown_neighbours": n_show},
        images=images,
        queries=query_idx,
        models=results,
        pairs=pair_results(embeddings, opts.k),
        warnings=timing_warnings(keys, [m.cost for m in measured]),
    )


# --- the whole comparison -------------------------------------------------------------------------------
def compare(
    models: Sequence[str],
    data: str | Path | LabelledData,
    output: str | Path | None = None,
    options: CompareOptions | None = None,
    *,
    progress: Callable[[str], None] | None = None,
    **settings: Any,
) -> CompareReport:
    """Embed the same images with each encoder and compare cost, quality and structure.

    Args:
        models: two or more encoder specs (``clip:...``, ``phi3v:...?num_crops=4``, ...).
        data: anything :func:`phiclip.inputs.load_data` reads (a folder per class, a CSV/Parquet
            table (captions enable retrieval), ``hf:NAME``, a glob...), or a loaded
            :class:`~phiclip.inputs.LabelledData`.
        output: where to write ``report.json``, ``report.html`` and ``embeddings/``; ``None``: nothing written.
        options: a :class:`CompareOptions`; ``settings`` (its field names) override its fields.
        progress: called with a line of text as each step starts.

    Raises:
        ValueError: bad arguments or data (the message names the input and the fix).
        CompareError: an encoder could not be loaded or run (the message names it).
    """
    opts = replace(options or CompareOptions(), **settings)
    say = progress or (lambda _msg: None)
    if len(models) < 2:
        opts.check([str(m) for m in models])  # the clear "at least two models" error
    # lazy: `phiclip --help` imports this module; phiclip.encoders is loaded on first use
    from phiclip.encoders.registry import resolve_spec

    specs = [str(resolve_spec(str(m))) for m in models]  # a spec without kind: the kind from config.json
    opts.check(specs)
    say(f"reading {data}")
    ds = read_data(data, opts)
    keys = _model_keys(len(specs))
    with tempfile.TemporaryDirectory(prefix="phiclip-compare-") as tmp:
        jobs = plan_jobs(specs, ds, opts, Path(tmp) / "images")
        measured = measure_all(jobs, keys, opts, Path(tmp), say)
    rows, sizes, left_out = common_images(ds, measured, keys)
    if len(rows) < len(ds):
        ds = ds.subset(rows)
        measured = [_rows_of(m, rows) for m in measured]
    _check_enough(ds, opts, left_out)
    say("computing quality and structure metrics")
    report = build_report(specs, keys, ds, measured, sizes, opts)
    report.data.skipped = list(ds.left_out) + left_out
    if output is not None:
        say(f"writing the report to {output}")
        write_outputs(report, output, ds.images, [m.image_embeddings for m in measured])
    return report


def write_maps(
    report: CompareReport, output: Path, images: Sequence[Any], embeddings: Sequence[np.ndarray]
) -> dict[str, Path]:
    """``map-<key>.html`` per model: the interactive map of ``phiclip map`` (UMAP when umap-learn is
    installed, else PCA, coloured by label), recorded in ``report.maps`` (file and method)."""
    # lazy: `phiclip --help` imports this module; the collection package loads PIL and FAISS
    from phiclip.collection.layout import layout_2d
    from phiclip.collection.pages import map_page, write_page

    sources = [os.fspath(im) if isinstance(im, (str, os.PathLike)) else "" for im in images]
    ids = [im.source for im in report.images]
    labels = [im.label or "" for im in report.images] if report.data.has_labels else None
    paths: dict[str, Path] = {}
    for m, x in zip(report.models, embeddings):
        layout = layout_2d(np.asarray(x, dtype=np.float32), seed=report.settings.get("seed", 0))
        page = map_page(layout, ids, sources=sources, labels=labels, colour_by="labels" if labels else None,
                        title=f"Map of {m.key}: {m.name}")
        name = f"map-{m.key}.html"
        paths[f"map_{m.key}"] = write_page(page, output / name)
        report.maps[m.key] = {"file": name, "method": layout.method, "description": layout.description}
    return paths


def write_outputs(
    report: CompareReport, output: str | Path, images: Sequence[Any], embeddings: Sequence[np.ndarray]
) -> dict[str, Path]:
    """Write ``report.json``, ``report.html`` (thumbnails of the grid images embedded) and
    ``embeddings/<key>.npy`` (row i = ``report.images[i]``) into ``output``."""
    # lazy: `phiclip --help` imports this module; the report writer is loaded on first use
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
    paths = write_maps(report, out, images, embeddings)
    paths.update(write_report(report, out, thumbs))
    emb_dir = out / "embeddings"
    emb_dir.mkdir(exist_ok=True)
    for m, x in zip(report.models, embeddings):
        path = emb_dir / f"{m.key}.npy"
        np.save(path, np.asarray(x, dtype=np.float32))
        paths[f"embeddings_{m.key}"] = path
    return paths


__all__ = [
    "CompareError",
    "CompareOptions",
    "choose_queries",
    "common_images",
    "build_report",
    "compare",
    "plan_jobs",
    "quality",
    "read_data",
    "short_names",
    "spread_indices",
    "timing_warnings",
    "write_maps",
    "write_outputs",
]
