"""What ``phiclip compare`` measures, as plain dataclasses that turn into ``report.json``.

Every field is a JSON type (numbers, strings, lists, dicts, ``None``), so
``json.dumps(report.to_dict())`` needs no special encoder and the HTML renderer can work from
the dict alone (and so from a ``report.json`` read back later). Units are in the field names:
``_s`` seconds, ``_mb`` mebibytes (2**20 bytes), ``_per_s`` per second.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phiclip.pipeline.writer import atomic_write

#: Version of the report.json layout; bump when a field changes meaning.
#: 2: speed from repeated timed passes (``passes``, ``encode_s_passes``, the min/max rates), ``warnings``.
#: 3: ``Quality.protocols`` (each metric's protocol, split and n), the alignment scores of every pair
#: (mutual-kNN, CKNNA, CKA biased and unbiased), ``maps`` (one interactive map page per model).
REPORT_FORMAT = 3
#: A timed pass with less model time than this (seconds) is too short for its speed to mean much.
MIN_TIMED_SECONDS = 1.0


@dataclass
class ImageRecord:
    """One compared image: its place in every embedding matrix (``index``) and what is known of it."""

    index: int
    source: str
    width: int
    height: int
    label: str | None = None
    caption: str | None = None


@dataclass
class TokenCount:
    """Crops and image tokens per image, for the images of one size (Phi-3-vision's HD transform
    depends only on the size). ``tokens`` is ``None`` for encoders that do not report it."""

    width: int
    height: int
    images: int
    crops: int
    tokens: int | None


@dataclass
class Cost:
    """What one encoder cost on the compared images.

    ``parameters`` counts the image side only (for CLIP the vision tower and its projection), the
    part that embeds an image, so CLIP and Phi-3-vision's image encoder compare like for like.

    ``import_s`` is the first import of the encoder's code (transformers model classes), kept out
    of ``load_s`` (reading the weights and building the model). Throughput counts model time only
    (collate + forward, after one untimed warm-up batch), over ``passes`` timed passes:
    ``encode_s_passes`` holds each pass's model time, ``encode_s`` and ``images_per_s`` are the median
    pass, ``images_per_s_min``/``_max`` the slowest and fastest. ``end_to_end_images_per_s`` adds
    reading, decoding and preprocessing (``preprocess_s``, the median pass). ``images`` counts the
    images this encoder embedded. Memory: ``peak_rss_mb`` is the
    high-water mark of the resident set of the process that loaded and ran this encoder, and
    ``baseline_rss_mb`` that process's resident set just before loading (Python, torch and
    transformers imported), so the model's own share is about the difference. ``memory_scope``
    says whether that process ran this encoder alone (``"subprocess"``) or was the caller's
    (``"in-process"``, where memory freed by an earlier encoder can be reused and hide some).
    """

    dim: int
    parameters: int | None
    device: str
    dtype: str
    batch_size: int
    import_s: float
    load_s: float
    preprocess_s: float
    encode_s: float
    images: int
    crops: int
    images_per_s: float
    crops_per_s: float
    end_to_end_images_per_s: float
    text_encode_s: float | None
    peak_rss_mb: float | None
    baseline_rss_mb: float | None
    gpu_peak_mb: float | None
    memory_scope: str
    tokens_by_size: list[TokenCount] = field(default_factory=list)
    passes: int = 1
    encode_s_passes: list[float] = field(default_factory=list)
    images_per_s_min: float | None = None
    images_per_s_max: float | None = None


@dataclass
class Quality:
    """Quality where labels or captions allow it. ``metrics`` holds fractions in [0, 1] under
    stable names (``knn_accuracy``, ``linear_probe_accuracy``, ``zero_shot_top1``, ``zero_shot_top5``,
    ``text_to_image_recall@1``, ``image_to_text_recall@5``, ...); ``skipped`` says, for each metric
    that could not be computed, why (no labels, no text side, too few images, ...). ``protocols[metric]``
    says how each number was made (:func:`phiclip.evaluate.protocol_record`: ``name``, ``description``,
    ``settings``, ``split``, ``n``), the same protocol objects ``phiclip eval`` uses."""

    metrics: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    protocols: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class SimilarityStats:
    """Pairwise cosine similarities of one space (see :func:`~phiclip.comparison.structure.similarity_histogram`)."""

    edges: list[float]
    all: list[int]
    same: list[int] | None
    different: list[int] | None
    mean: float
    std: float
    same_mean: float | None
    different_mean: float | None


@dataclass
class ProjectionResult:
    """A 2-D PCA view of one space: ``points[j]`` is image ``indices[j]`` (a deterministic subset
    when there are many images). Spaces after the first are rotated/reflected onto the first
    (``aligned_to``) so the plots share an orientation."""

    method: str
    indices: list[int]
    points: list[list[float]]
    explained_variance_ratio: list[float]
    aligned_to: int | None


@dataclass
class ModelResult:
    """Everything measured for one encoder. ``key`` is its letter (A, B, ...), ``name`` a short
    readable name, ``neighbours[q]`` the indices of the top neighbours of ``CompareReport.queries[q]``."""

    key: str
    spec: str
    name: str
    description: dict[str, Any]
    cost: Cost
    quality: Quality
    similarity: SimilarityStats
    projection: ProjectionResult
    neighbours: list[list[int]]


@dataclass
class PairResult:
    """How two spaces (models ``a`` and ``b``, indices into ``CompareReport.models``) relate.

    ``knn_overlap_per_image[i]`` is the shared fraction of image i's k nearest neighbours;
    ``knn_overlap_counts[c]`` how many images share exactly c of k; ``knn_overlap_chance`` the
    expected overlap of unrelated spaces, k / (n - 1). ``alignment`` holds the scores of
    :func:`phiclip.collection.align.alignment` on L2-normalised vectors with ``k`` neighbours
    (``mutual_knn``, ``cknna``, ``cknna_biased``, ``cka``, ``cka_unbiased``; ``None`` where too few images,
    the reason in ``alignment_skipped``), as ``phiclip align`` gives them.
    """

    a: int
    b: int
    k: int
    linear_cka: float
    knn_overlap_mean: float
    knn_overlap_chance: float
    knn_overlap_per_image: list[float]
    knn_overlap_counts: list[int]
    alignment: dict[str, float | None] = field(default_factory=dict)
    alignment_skipped: dict[str, str] = field(default_factory=dict)


@dataclass
class DataSummary:
    """What was compared: where the images came from and what is known of them. ``skipped`` lists
    the images left out (``{"source", "stage", "reason"}``): unreadable, or refused by one of the
    encoders (every space must hold the same images)."""

    source: str
    images: int
    classnames: list[str]
    has_labels: bool
    has_captions: bool
    skipped: list[dict[str, str]] = field(default_factory=list)


@dataclass
class CompareReport:
    """The whole comparison; ``to_dict`` / ``save`` give report.json."""

    phiclip_version: str
    created: str
    data: DataSummary
    settings: dict[str, Any]
    images: list[ImageRecord]
    queries: list[int]
    models: list[ModelResult]
    pairs: list[PairResult]
    warnings: list[str] = field(default_factory=list)
    maps: dict[str, dict[str, Any]] = field(default_factory=dict)
    format: int = REPORT_FORMAT

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (nested dataclasses become dicts)."""
        return dataclasses.asdict(self)

    def to_json(self, indent: int | None = 1) -> str:
        """``report.json``'s text. Raises ``ValueError`` on a NaN or infinity (they are not JSON)."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def save(self, path: str | Path) -> Path:
        """Write ``report.json`` (atomically, so a reader never sees half a file)."""
        return write_text_atomic(path, self.to_json())


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a UTF-8 text file atomically (:func:`phiclip.pipeline.writer.atomic_write`)."""

    data = text.encode("utf-8")
    return atomic_write(path, lambda f: f.write(data))


def speeds_differ(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two encoders' speeds (``Cost`` as dicts) differ beyond the noise: both timed passes
    at least :data:`MIN_TIMED_SECONDS` long, and the ranges of their passes' images/s disjoint."""
    if min(a["encode_s"], b["encode_s"]) < MIN_TIMED_SECONDS:
        return False
    a_lo, a_hi = a.get("images_per_s_min") or a["images_per_s"], a.get("images_per_s_max") or a["images_per_s"]
    b_lo, b_hi = b.get("images_per_s_min") or b["images_per_s"], b.get("images_per_s_max") or b["images_per_s"]
    return bool(a_hi < b_lo or b_hi < a_lo)


def finite_or_none(value: float | None) -> float | None:
    """``value`` as a float, or ``None`` when it is missing, NaN or infinite (JSON has neither)."""
    if value is None:
        return None
    v = float(value)
    return v if math.isfinite(v) else None


def load_report(path: str | Path) -> dict[str, Any]:
    """Read a ``report.json`` (or the directory holding it) back as a dict."""
    p = Path(path)
    if p.is_dir():
        p = p / "report.json"
    if not p.exists():
        raise FileNotFoundError(f"{p}: no report.json here; run `phiclip compare ... --output DIR` first")
    data = json.loads(p.read_text(encoding="utf-8"))
    if data.get("format") != REPORT_FORMAT:
        raise ValueError(f"{p}: report format {data.get('format')!r}, this phiclip reads format {REPORT_FORMAT}; "
                         "run `phiclip compare` again to write it")
    return data
