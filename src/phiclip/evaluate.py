"""Evaluation of embeddings, following the protocol of CLIP_benchmark so numbers are comparable.

The metrics are pure functions on arrays (shapes in each docstring), so they are tested on
constructed embeddings whose answers are known:

- :func:`zero_shot_classifier` / :func:`zero_shot_metrics`: class names times prompt templates;
  each class's vector is the mean of its L2-normalised template embeddings, renormalised; images are
  classified by cosine similarity. ``acc1``, ``acc5`` (top-``min(5, c)``) and the mean per-class
  recall (balanced accuracy over the classes present in the labels).
- :func:`knn_classify`: cosine k-nearest neighbours on frozen embeddings, similarity-weighted vote.
- :func:`linear_probe`: multinomial logistic regression on frozen (standardised) embeddings, the L2
  weight decay chosen on a validation split of the training set.
- :func:`retrieval_metrics`: image->text and text->image recall@k, a hit when any positive is in
  the top k; the keys are CLIP_benchmark's (``image_retrieval_recall@k``: a text query retrieves
  images; ``text_retrieval_recall@k``: an image query retrieves texts).

Ranking ties are broken by index (a stable sort, as ``argmax`` does), never in the candidate's favour
beyond that. :func:`evaluate` runs a whole task in steps (:class:`EvalOptions`, then
:func:`load_eval_data`, the encoder, one ``run_<task>`` function): the data comes from the one input
layer (:func:`phiclip.inputs.load_data`) and the images are embedded by the bulk pipeline's step
(:func:`embed_data`), so an image that cannot be read is left out and listed, never fatal.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from phiclip.encoders import load_encoder
from phiclip.encoders.base import Encoder
from phiclip.images import DEFAULT_MAX_PIXELS
from phiclip.inputs import LabelledData, align_label_spaces, load_data
from phiclip.models.ops import l2_normalize
from phiclip.pipeline.step import StepResult, embed_payloads

#: A small set of generic prompt templates (``{c}`` is replaced by the class name).
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {c}.",
    "a picture of a {c}.",
    "an image of a {c}.",
    "a close-up photo of a {c}.",
    "a photo of the {c}.",
    "a drawing of a {c}.",
)

#: Task names accepted by :func:`evaluate` and ``phiclip eval --task``.
TASKS: tuple[str, ...] = ("zeroshot", "knn", "linear-probe", "retrieval", "clustering")

#: Weight decays searched by :func:`linear_probe` (on standardised features, mean cross-entropy).
DEFAULT_WEIGHT_DECAYS: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)

Template = str | Callable[[str], str]


# --- helpers -----------------------------------------------------------------------------------


def _matrix(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-d (n, d) array, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} holds NaN or infinite values; check the encoder's output")
    return arr


def _int_labels(labels: Any, n: int, name: str, num_classes: int | None = None) -> np.ndarray:
    y = np.asarray(labels)
    if y.shape != (n,):
        raise ValueError(f"{name} must have one entry per row: shape ({n},), got {y.shape}")
    if y.dtype.kind not in "iu":
        raise ValueError(f"{name} must be integer class indices, got dtype {y.dtype}")
    if num_classes is not None and n and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"{name} must lie in [0, {num_classes}); found {int(y.min())}..{int(y.max())}")
    return y.astype(np.int64)


def _rank_of(scores: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Position (0 = first) of column ``target[i]`` in row i of ``scores`` sorted descending, ties by index.

    Args:
        scores: (q, m). target: (q,) column indices.
    Returns:
        (q,) int64 ranks.
    """
    rows = np.arange(scores.shape[0])
    s_t = scores[rows, target][:, None]  # (q, 1)
    before = np.arange(scores.shape[1])[None, :] < target[:, None]  # (q, m)
    return ((scores > s_t) | ((scores == s_t) & before)).sum(axis=1)


def mean_per_class_recall(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Balanced accuracy: the recall of each class present in ``y_true``, averaged.

    Args:
        y_true, y_pred: (n,) labels of any comparable kind.
    """
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    if y_true.shape != y_pred.shape or y_true.ndim != 1 or len(y_true) == 0:
        raise ValueError(f"need two equal, non-empty 1-d label arrays; got {y_true.shape} and {y_pred.shape}")
    recalls = [float(np.mean(y_pred[y_true == c] == c)) for c in np.unique(y_true)]
    return float(np.mean(recalls))


def stratified_split(labels: Sequence[Any], test_fraction: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split row indices into train and test, keeping each class's proportion.

    Each class with ``m`` rows sends ``round(m * test_fraction)`` of them (at least 1 and at most
    ``m - 1`` when ``m >= 2``) to test, chosen with a generator seeded by ``seed``; a class with a
    single row stays in train.

    Args:
        labels: (n,) labels of any kind.
    Returns:
        ``(train_idx, test_idx)``: sorted int64 arrays that partition ``range(n)``.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-d, got shape {y.shape}")
    rng = np.random.default_rng(seed)
    test: list[np.ndarray] = []
    _, inverse = np.unique(y, return_inverse=True)
    for c in range(int(inverse.max()) + 1 if len(y) else 0):
        rows = np.flatnonzero(inverse == c)
        m = len(rows)
        if m < 2:
            continue
        n_test = min(m - 1, max(1, int(round(m * test_fraction))))
        test.append(rng.permutation(rows)[:n_test])
    test_idx = np.sort(np.concatenate(test)) if test else np.zeros(0, dtype=np.int64)
    mask = np.ones(len(y), dtype=bool)
    mask[test_idx] = False
    return np.flatnonzero(mask).astype(np.int64), test_idx.astype(np.int64)


# --- zero-shot classification ------------------------------------------------------------------


def fill_template(template: Template, classname: str) -> str:
    """``"a photo of a {c}."`` (or ``{}``, or a callable) + a class name -> the prompt."""
    if callable(template):
        return str(template(classname))
    if "{c}" in template:
        return template.replace("{c}", classname)
    if "{}" in template:
        return template.replace("{}", classname)
    raise ValueError(f"template {template!r} has no '{{c}}' placeholder for the class name")


def zero_shot_classifier(
    encoder: Encoder, classnames: Sequence[str], templates: Sequence[Template] = DEFAULT_TEMPLATES, batch_size: int = 256
) -> np.ndarray:
    """One vector per class: the mean of the normalised embeddings of its prompts, renormalised.

    Args:
        encoder: an encoder with a text side (CLIP, SigLIP).
        classnames: c class names. templates: t prompt templates with ``{c}``.
    Returns:
        (c, d) float32 with unit rows.
    """
    if "text" not in encoder.modalities:
        raise ValueError(
            f"{encoder.name!r} embeds images only, so zero-shot classification (which embeds class prompts) "
            "cannot run; use --task knn or --task linear-probe for it"
        )
    if not classnames:
        raise ValueError("zero-shot classification needs at least one class name")
    if not templates:
        raise ValueError("zero-shot classification needs at least one prompt template")
    c, t = len(classnames), len(templates)
    prompts = [fill_template(tpl, name) for name in classnames for tpl in templates]  # class-major
    emb = _matrix(encoder.encode_texts(prompts, batch_size=batch_size), "text embeddings")
    per_prompt = l2_normalize(emb).reshape(c, t, -1)  # (c * t, d) -> (c, t, d)
    return l2_normalize(per_prompt.mean(axis=1)).astype(np.float32)  # (c, d)


def zero_shot_metrics(image_emb: np.ndarray, classifier: np.ndarray, labels: Sequence[int]) -> dict[str, float]:
    """Classify images by cosine similarity to the class vectors.

    Args:
        image_emb: (n, d) image embeddings. classifier: (c, d) from :func:`zero_shot_classifier`.
        labels: (n,) true class indices in ``[0, c)``.
    Returns:
        ``acc1``, ``acc5`` (top-``min(5, c)`` accuracy) and ``mean_per_class_recall``.
    """
    x = _matrix(image_emb, "image_emb")
    w = _matrix(classifier, "classifier")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"image_emb has {x.shape[1]} dims but the classifier {w.shape[1]}; use one encoder for both")
    if len(x) == 0:
        raise ValueError("no images to classify")
    y = _int_labels(labels, len(x), "labels", num_classes=len(w))
    logits = l2_normalize(x) @ l2_normalize(w).T  # (n, c)
    rank = _rank_of(logits, y)
    pred = logits.argmax(axis=1)
    return {
        "acc1": float(np.mean(rank < 1)),
        "acc5": float(np.mean(rank < min(5, len(w)))),
        "mean_per_class_recall": mean_per_class_recall(y, pred),
    }


# --- kNN classification ------------------------------------------------------------------------


def _label_space(train_y: Any, test_y: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels of any kind -> (classes, train indices, test indices) over their union."""
    a, b = np.asarray(train_y), np.asarray(test_y)
    if a.ndim != 1 or b.ndim != 1:
        raise ValueError(f"labels must be 1-d; got shapes {a.shape} and {b.shape}")
    classes, inv = np.unique(np.concatenate([a, b]), return_inverse=True)
    return classes, inv[: len(a)].astype(np.int64), inv[len(a) :].astype(np.int64)


def _check_pair(train_x: Any, train_y: Any, test_x: Any, test_y: Any) -> tuple[np.ndarray, np.ndarray]:
    tr = _matrix(train_x, "train_x")
    te = _matrix(test_x, "test_x")
    if tr.shape[1] != te.shape[1]:
        raise ValueError(f"train_x has {tr.shape[1]} dims but test_x {te.shape[1]}")
    if len(tr) == 0 or len(te) == 0:
        raise ValueError(f"need training and test rows; got {len(tr)} and {len(te)}")
    if len(np.asarray(train_y)) != len(tr) or len(np.asarray(test_y)) != len(te):
        raise ValueError(
            f"one label per row: train {len(tr)} rows / {len(np.asarray(train_y))} labels, "
            f"test {len(te)} rows / {len(np.asarray(test_y))} labels"
        )
    return tr, te


def knn_predict(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    k: int = 20,
    *,
    weighting: str = "similarity",
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> np.ndarray:
    """Cosine kNN predictions.

    Args:
        train_x: (n, d). train_y: (n,) class indices. test_x: (m, d).
        weighting: ``"similarity"``: each of the k neighbours votes ``exp(cos / temperature)`` (the
            weighted kNN of DINO and later self-supervised benchmarks); ``"majority"``: one vote
            each, ties broken by the larger summed similarity.
    Returns:
        (m,) predicted class indices (remaining ties: the lower index).
    """
    if weighting not in ("similarity", "majority"):
        raise ValueError(f"weighting {weighting!r} is not 'similarity' or 'majority'")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    tr = l2_normalize(train_x)
    te = l2_normalize(test_x)
    y = np.asarray(train_y, dtype=np.int64)
    c = int(num_classes if num_classes is not None else y.max() + 1)
    k = min(k, len(tr))
    preds = np.empty(len(te), dtype=np.int64)
    for start in range(0, len(te), chunk_size):
        sims = te[start : start + chunk_size] @ tr.T  # (b, n)
        b = sims.shape[0]
        nn = np.argpartition(-sims, k - 1, axis=1)[:, :k]  # (b, k) the k most similar, unordered
        nn_sims = np.take_along_axis(sims, nn, axis=1)  # (b, k)
        nn_y = y[nn]  # (b, k)
        votes = np.zeros((b, c), dtype=np.float64)
        if weighting == "similarity":
            # exp((s - 1) / T): the same ranking as exp(s / T) without overflow for small T.
            np.add.at(votes, (np.repeat(np.arange(b), k), nn_y.ravel()), np.exp((nn_sims.ravel() - 1.0) / temperature))
        else:
            sim_sum = np.zeros((b, c), dtype=np.float64)
            rows = np.repeat(np.arange(b), k)
            np.add.at(votes, (rows, nn_y.ravel()), 1.0)
            np.add.at(sim_sum, (rows, nn_y.ravel()), nn_sims.ravel())
            votes += sim_sum / (2.0 * k + 2.0)  # |sim_sum| <= k: never outweighs one vote
        preds[start : start + b] = votes.argmax(axis=1)
    return preds


def knn_classify(
    train_x: np.ndarray,
    train_y: Sequence[Any],
    test_x: np.ndarray,
    test_y: Sequence[Any],
    k: int = 20,
    *,
    weighting: str = "similarity",
    temperature: float = 0.07,
) -> dict[str, float]:
    """kNN classification on frozen embeddings (cosine; see :func:`knn_predict` for the vote).

    Args:
        train_x: (n, d), train_y: (n,) labels of any kind; test_x: (m, d), test_y: (m,).
        k: neighbours (capped at n). weighting: ``"similarity"`` (default) or ``"majority"``.
    Returns:
        ``acc1`` and ``mean_per_class_recall`` on the test rows.
    """
    tr, te = _check_pair(train_x, train_y, test_x, test_y)
    classes, ytr, yte = _label_space(train_y, test_y)
    pred = knn_predict(tr, ytr, te, k, weighting=weighting, temperature=temperature, num_classes=len(classes))
    return {"acc1": float(np.mean(pred == yte)), "mean_per_class_recall": mean_per_class_recall(yte, pred)}


# --- linear probe ------------------------------------------------------------------------------


@dataclass
class LinearProbeModel:
    """A fitted probe: ``predict`` standardises with the training statistics, then ``x @ weight + bias``.

    Shapes: ``mean``/``std`` (d,), ``weight`` (d, c), ``bias`` (c,).
    """

    mean: np.ndarray
    std: np.ndarray
    weight: np.ndarray
    bias: np.ndarray
    weight_decay: float
    val_acc1: float | None

    def logits(self, x: np.ndarray) -> np.ndarray:
        """(m, d) -> (m, c) class scores."""
        return ((np.asarray(x, dtype=np.float32) - self.mean) / self.std) @ self.weight + self.bias

    def predict(self, x: np.ndarray) -> np.ndarray:
        """(m, d) -> (m,) class indices."""
        return self.logits(x).argmax(axis=1)


def _fit_logistic(
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    weight_decay: float,
    max_iter: int,
    init: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression by full-batch L-BFGS: mean cross-entropy + wd/2 * ||W||^2.

    The problem is strictly convex for wd > 0; it starts from zeros (or ``init``), so the result
    is deterministic. Args: x (n, d) standardised, y (n,) class indices. Returns weight (d, c), bias (c,).
    """
    import torch

    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(y.astype(np.int64))
    w0, b0 = init if init is not None else (np.zeros((x.shape[1], num_classes)), np.zeros(num_classes))
    w = torch.tensor(w0, dtype=torch.float32, requires_grad=True)
    b = torch.tensor(b0, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=max_iter, history_size=10, tolerance_grad=1e-5, tolerance_change=1e-7,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ w + b, yt) + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        return loss

    # Small problems run far faster on one thread (no thread start-up and spinning per tiny op).
    previous = torch.get_num_threads()
    small = x.shape[0] * x.shape[1] * num_classes < 5_000_000
    try:
        if small:
            torch.set_num_threads(1)
        opt.step(closure)
    finally:
        if small:
            torch.set_num_threads(previous)
    return w.detach().numpy().copy(), b.detach().numpy().copy()


def fit_linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    num_classes: int,
    *,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    val_fraction: float = 0.2,
    seed: int = 0,
    max_iter: int = 100,
) -> LinearProbeModel:
    """Fit a logistic-regression probe, choosing the weight decay on a validation split.

    Features are standardised with the training mean and standard deviation. A stratified
    ``val_fraction`` of the training rows (seeded) scores each weight decay by accuracy; the best
    (ties: the larger decay) is refitted on all training rows. With no validation rows possible
    (every class a single row) or a single decay given, no search is made.

    Args:
        train_x: (n, d). train_y: (n,) class indices in ``[0, num_classes)``.
    """
    x = _matrix(train_x, "train_x")
    y = _int_labels(train_y, len(x), "train_y", num_classes=num_classes)
    if not weight_decays:
        raise ValueError("give at least one weight decay")
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    std = np.where(std > 1e-6, std, 1.0).astype(np.float32)
    z = (x - mean) / std
    decays = sorted({float(v) for v in weight_decays})
    best, val_acc = decays[len(decays) // 2], None
    fit_idx, val_idx = stratified_split(y, val_fraction, seed) if len(decays) > 1 else (None, np.zeros(0))
    if len(decays) == 1:
        best = decays[0]
    elif len(val_idx):
        scores: dict[float, float] = {}
        init = None
        for wd in reversed(decays):  # strongest decay first, each fit warm-started from the previous one
            init = _fit_logistic(z[fit_idx], y[fit_idx], num_classes, wd, max_iter, init)
            w, b = init
            scores[wd] = float(np.mean((z[val_idx] @ w + b).argmax(axis=1) == y[val_idx]))
        val_acc = max(scores.values())
        best = max(wd for wd, s in scores.items() if s == val_acc)
    w, b = _fit_logistic(z, y, num_classes, best, max_iter)
    return LinearProbeModel(mean=mean, std=std, weight=w, bias=b, weight_decay=best, val_acc1=val_acc)


def linear_probe(
    train_x: np.ndarray,
    train_y: Sequence[Any],
    test_x: np.ndarray,
    test_y: Sequence[Any],
    *,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    val_fraction: float = 0.2,
    seed: int = 0,
    max_iter: int = 100,
) -> dict[str, float]:
    """Linear probe on frozen embeddings (see :func:`fit_linear_probe`).

    Args:
        train_x: (n, d), train_y: (n,) labels of any kind; test_x: (m, d), test_y: (m,).
    Returns:
        ``acc1`` and ``mean_per_class_recall`` on the test rows.
    """
    tr, te = _check_pair(train_x, train_y, test_x, test_y)
    classes, ytr, yte = _label_space(train_y, test_y)
    model = fit_linear_probe(
        tr, ytr, len(classes), weight_decays=weight_decays, val_fraction=val_fraction, seed=seed, max_iter=max_iter
    )
    pred = model.predict(te)
    return {"acc1": float(np.mean(pred == yte)), "mean_per_class_recall": mean_per_class_recall(yte, pred)}


# --- retrieval ---------------------------------------------------------------------------------


def retrieval_metrics(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    text_to_image: Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Image-text retrieval recall@k (cosine), CLIP_benchmark's definition and names.

    ``image_retrieval_recall@k``: the fraction of texts whose image is among the k images most
    similar to the text. ``text_retrieval_recall@k``: the fraction of images with at least one of
    their texts among the k texts most similar to the image (images without any text are left out).

    Args:
        image_emb: (I, d). text_emb: (T, d). text_to_image: (T,) index of each text's image in [0, I).
        ks: the cut-offs.
    """
    img = l2_normalize(_matrix(image_emb, "image_emb"))
    txt = l2_normalize(_matrix(text_emb, "text_emb"))
    if img.shape[1] != txt.shape[1]:
        raise ValueError(f"image_emb has {img.shape[1]} dims but text_emb {txt.shape[1]}; use one encoder for both")
    if len(img) == 0 or len(txt) == 0:
        raise ValueError(f"need images and texts; got {len(img)} and {len(txt)}")
    owner = _int_labels(text_to_image, len(txt), "text_to_image", num_classes=len(img))
    if any(k < 1 for k in ks):
        raise ValueError(f"every k must be >= 1, got {list(ks)}")

    # text -> image: rank of each text's image among all images.
    t2i_rank = np.concatenate(
        [_rank_of(txt[s : s + chunk_size] @ img.T, owner[s : s + chunk_size]) for s in range(0, len(txt), chunk_size)]
    )  # (T,)

    # image -> text: rank of each image's best-scoring positive text (the first positive in sorted order).
    has_text = np.zeros(len(img), dtype=bool)
    has_text[owner] = True
    queries = np.flatnonzero(has_text)
    i2t_rank = []
    for s in range(0, len(queries), chunk_size):
        q = queries[s : s + chunk_size]
        scores = img[q] @ txt.T  # (b, T)
        positive = owner[None, :] == q[:, None]  # (b, T)
        masked = np.where(positive, scores, -np.inf)
        best = masked.argmax(axis=1)  # highest-scoring positive, lowest index on ties
        i2t_rank.append(_rank_of(scores, best))
    i2t = np.concatenate(i2t_rank)  # (I with texts,)

    out: dict[str, float] = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = float(np.mean(t2i_rank < k))
        out[f"text_retrieval_recall@{k}"] = float(np.mean(i2t < k))
    return out


# --- protocols: one implementation per task, shared by `eval` and `compare` -------------------

#: Neighbours of the kNN classifier by default (``eval --k`` and ``compare --k``).
DEFAULT_KNN_K = 10
#: Share of the images held out for testing when the data has no train/test splits (both commands).
DEFAULT_TEST_FRACTION = 0.3


def _protocol_dict(p: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return {"name": p.name, "description": p.describe(), "settings": json_ready(asdict(p))}


def json_ready(value: Any) -> Any:
    """Tuples as lists, recursively (what JSON gives back)."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


@dataclass(frozen=True)
class SplitProtocol:
    """Where kNN, linear probe and (with splits) the other tasks get their train and test images.

    The data's own splits when it has a ``train`` split and a ``test`` / ``validation`` one; otherwise a
    stratified split (:func:`stratified_split`) holding out ``test_fraction`` of each class, seeded.
    """

    test_fraction: float = DEFAULT_TEST_FRACTION
    seed: int = 0
    name: str = "split"

    def describe(self) -> str:
        return f"stratified {1 - self.test_fraction:.0%}/{self.test_fraction:.0%}, seed {self.seed}"


def classification_split(
    labels: Sequence[Any] | np.ndarray, protocol: SplitProtocol, splits: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray, str]:
    """``(train_rows, test_rows, how)`` by :class:`SplitProtocol`: the given splits (``splits[i]`` the split of
    row i) when they hold ``train`` and a test split, else the stratified split."""
    if splits is not None:
        names = set(splits)
        test_name = _pick_test_split(names)
        if "train" in names and test_name:
            sp = np.asarray(splits, dtype=object)
            return (np.flatnonzero(sp == "train").astype(np.int64), np.flatnonzero(sp == test_name).astype(np.int64),
                    f"given (train / {test_name})")
    tr, te = stratified_split(labels, protocol.test_fraction, protocol.seed)
    return tr, te, protocol.describe()


def scored_rows(n: int, splits: Sequence[str] | None) -> tuple[np.ndarray, str]:
    """The rows zero-shot, retrieval and clustering are scored on: the test split when the data has one,
    else every row."""
    if splits is not None:
        name = _pick_test_split(set(splits))
        if name is not None:
            return np.flatnonzero(np.asarray(splits, dtype=object) == name).astype(np.int64), f"the {name} split"
    return np.arange(n, dtype=np.int64), "every image"


@dataclass(frozen=True)
class KnnProtocol:
    """kNN classification on frozen embeddings: cosine, ``k`` neighbours, each voting ``exp(cos / T)``
    (``weighting="similarity"``, DINO's weighted kNN) or once (``"majority"``); accuracy and balanced
    accuracy on the test images."""

    k: int = DEFAULT_KNN_K
    weighting: str = "similarity"
    temperature: float = 0.07
    name: str = "knn"

    def describe(self) -> str:
        vote = f"votes weighted exp(cos/{self.temperature:g})" if self.weighting == "similarity" else "one vote each"
        return f"kNN: cosine, k={self.k}, {vote}"

    def run(self, train_x: np.ndarray, train_y: Sequence[Any], test_x: np.ndarray, test_y: Sequence[Any]
            ) -> dict[str, float]:
        return knn_classify(train_x, train_y, test_x, test_y, k=self.k, weighting=self.weighting,
                            temperature=self.temperature)


@dataclass(frozen=True)
class LinearProbeProtocol:
    """A linear probe: multinomial logistic regression (L-BFGS) on standardised frozen embeddings, its L2
    weight decay chosen from ``weight_decays`` on a stratified ``val_fraction`` of the training images.

    ``shots``: ``None`` trains on every training image; a number trains on that many per class, drawn
    ``seeds`` times (seeds ``seed``, ``seed + 1``, ...), scoring the mean (MIEB's k-shot protocol:
    :meth:`mieb` gives 16 per class x 5 draws).
    """

    weight_decays: tuple[float, ...] = DEFAULT_WEIGHT_DECAYS
    val_fraction: float = 0.2
    max_iter: int = 100
    shots: int | None = None
    seeds: int = 1
    seed: int = 0
    name: str = "linear-probe"

    @classmethod
    def mieb(cls, seed: int = 0) -> LinearProbeProtocol:
        """16 training images per class, drawn 5 times (MIEB's linear-probe setting)."""
        return cls(shots=16, seeds=5, seed=seed)

    def describe(self) -> str:
        wd = ", ".join(f"{v:g}" for v in self.weight_decays)
        draw = ("every training image" if self.shots is None
                else f"{self.shots} per class x {self.seeds} seeded draws, mean")
        return (f"linear probe: logistic regression (L-BFGS, {self.max_iter} iterations) on standardised vectors, "
                f"L2 weight decay from {{{wd}}} chosen on {self.val_fraction:.0%} of the training images; {draw}")

    def run(self, train_x: np.ndarray, train_y: Sequence[Any], test_x: np.ndarray, test_y: Sequence[Any]
            ) -> tuple[dict[str, float], dict[str, Any]]:
        tr, te = _check_pair(train_x, train_y, test_x, test_y)
        classes, ytr, yte = _label_space(train_y, test_y)
        draws = [None] if self.shots is None else [self.seed + i for i in range(max(1, self.seeds))]
        accs, recalls, decays, val = [], [], [], []
        for draw in draws:
            rows = np.arange(len(tr)) if draw is None else _k_shot(ytr, self.shots or 1, draw)
            model = fit_linear_probe(tr[rows], ytr[rows], len(classes), weight_decays=self.weight_decays,
                                     val_fraction=self.val_fraction, seed=self.seed if draw is None else draw,
                                     max_iter=self.max_iter)
            pred = model.predict(te)
            accs.append(float(np.mean(pred == yte)))
            recalls.append(mean_per_class_recall(yte, pred))
            decays.append(model.weight_decay)
            val.append(model.val_acc1)
        metrics = {"acc1": float(np.mean(accs)), "mean_per_class_recall": float(np.mean(recalls))}
        details: dict[str, Any] = {"weight_decay": decays[0] if len(decays) == 1 else decays,
                                   "val_acc1": val[0] if len(val) == 1 else val}
        if len(accs) > 1:
            metrics["acc1_std"] = float(np.std(accs))
            details["acc1_per_draw"] = accs
        return metrics, details


def _k_shot(y: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """``shots`` rows of each class (all of a smaller class), drawn with ``seed``; sorted."""
    rng = np.random.default_rng(seed)
    out = [rng.permutation(np.flatnonzero(y == c))[:shots] for c in np.unique(y)]
    return np.sort(np.concatenate(out)).astype(np.int64)


@dataclass(frozen=True)
class ClusteringProtocol:
    """k-means clustering scored against the labels (MIEB / MTEB's clustering task): FAISS k-means with k =
    the number of classes on L2-normalised vectors (seeded), V-measure and NMI as scikit-learn defines them."""

    seed: int = 0
    niter: int = 20
    nredo: int = 1
    name: str = "clustering"

    def describe(self) -> str:
        return (f"clustering: k-means (FAISS, k = number of classes, seed {self.seed}, {self.niter} iterations) on "
                "L2-normalised vectors; V-measure and NMI against the labels")

    def run(self, x: np.ndarray, labels: Sequence[Any]) -> dict[str, float]:
        # lazy: the collection package loads FAISS; only the clustering task needs it
        from phiclip.collection.cluster import kmeans, label_scores

        arr = _matrix(x, "embeddings")
        lab = np.asarray(labels)
        k = len(np.unique(lab))
        if k > len(arr):
            raise ValueError(f"{k} classes but {len(arr)} images; clustering needs at least one image per cluster")
        result = kmeans(arr, k, seed=self.seed, niter=self.niter, nredo=self.nredo)
        scores = label_scores(lab, result.assignment)
        return {"v_measure": scores.v_measure, "nmi": scores.nmi}


@dataclass(frozen=True)
class ZeroShotProtocol:
    """Zero-shot classification: each class's vector is the mean of its L2-normalised prompt embeddings
    (``templates`` with the class name), renormalised; images go to the most cosine-similar class."""

    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    name: str = "zeroshot"

    def describe(self) -> str:
        shown = "; ".join(self.templates[:3]) + ("; ..." if len(self.templates) > 3 else "")
        return f"zero-shot: {len(self.templates)} prompt templates per class ({shown}), cosine"

    def run(self, image_emb: np.ndarray, classifier: np.ndarray, labels: Sequence[int]) -> dict[str, float]:
        return zero_shot_metrics(image_emb, classifier, labels)


@dataclass(frozen=True)
class RetrievalProtocol:
    """Image-text retrieval recall@k (cosine; a hit when any positive is in the top k), CLIP_benchmark's."""

    ks: tuple[int, ...] = (1, 5, 10)
    name: str = "retrieval"

    def describe(self) -> str:
        return f"retrieval: recall@{{{', '.join(str(k) for k in self.ks)}}}, cosine, any positive caption counts"

    def run(self, image_emb: np.ndarray, text_emb: np.ndarray, owners: Sequence[int]) -> dict[str, float]:
        return retrieval_metrics(image_emb, text_emb, owners, ks=self.ks)


def protocol_record(protocol: Any, split: str, n: dict[str, int]) -> dict[str, Any]:
    """What every reported number carries: ``{"name", "description", "settings", "split", "n"}``."""
    return {**_protocol_dict(protocol), "split": split, "n": dict(n)}


# --- the runner: options, then one function per step and per task ------------------------------


@dataclass
class EvalOptions:
    """How :func:`evaluate` runs a task (every field has the command line's default).

    ``split``: the split to evaluate on (default: ``test``/``validation`` when the data has splits).
    ``train_data`` / ``train_split``: where kNN and linear-probe training rows come from (default: the
    data's own ``train`` split, else a stratified split by ``test_fraction`` and ``seed``).
    ``templates``: zero-shot prompt templates with ``{c}`` (a list, or a file with one per line).
    ``classnames``: names for the prompts in label order (a list or a file; default: the data's
    class names with ``_`` read as spaces). ``dtype`` is the compute precision of the encoder.
    ``max_pixels``: images with more pixels are left out (decompression bombs); ``None``: no limit. It is
    also the encoder's preprocessing budget (:meth:`~phiclip.encoders.base.Encoder.set_max_pixels`).
    ``progress``: a bar (on stderr) over the images being embedded, then a line per step of the task.
    ``k``, ``test_fraction``, ``seed``, ``shots``, ``probe_seeds`` and ``templates`` make the task's
    protocol (:meth:`protocol`), the same objects ``phiclip compare`` uses.
    """

    split: str | None = None
    train_data: str | Path | LabelledData | None = None
    train_split: str | None = None
    templates: Sequence[str] | str | None = None
    classnames: Sequence[str] | str | None = None
    k: int = DEFAULT_KNN_K
    test_fraction: float = DEFAULT_TEST_FRACTION
    seed: int = 0
    shots: int | None = None
    probe_seeds: int = 1
    batch_size: int = 32
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    device: str = "auto"
    dtype: str = "auto"
    image_column: str | None = None
    label_column: str | None = None
    caption_column: str | None = None
    progress: bool = False

    def split_protocol(self) -> SplitProtocol:
        """Where kNN and linear-probe training and test images come from."""
        return SplitProtocol(test_fraction=self.test_fraction, seed=self.seed)

    def protocol(self, task: str) -> Any:
        """The named protocol object of ``task``."""
        if task == "knn":
            return KnnProtocol(k=self.k)
        if task == "linear-probe":
            return LinearProbeProtocol(shots=self.shots, seeds=self.probe_seeds, seed=self.seed)
        if task == "clustering":
            return ClusteringProtocol(seed=self.seed)
        if task == "retrieval":
            return RetrievalProtocol()
        if task == "zeroshot":
            return ZeroShotProtocol(tuple(_read_lines(self.templates) or DEFAULT_TEMPLATES))
        raise ValueError(f"task {task!r} is not one of {', '.join(TASKS)}")


@dataclass
class EmbeddedImages:
    """What :func:`embed_data` gives: ``vectors`` (m, d) for the images that embedded, their
    positions ``kept`` (m,) in the data, and ``left_out`` (``{"source", "stage", "reason"}``)."""

    vectors: np.ndarray
    kept: np.ndarray
    left_out: list[dict[str, str]]


#: With a progress bar, images go through the pipeline's step this many batches at a time (the bar moves
#: after each such chunk).
PROGRESS_CHUNK_BATCHES = 4


def embed_data(encoder: Encoder, data: LabelledData, *, batch_size: int = 32,
               max_pixels: int | None = DEFAULT_MAX_PIXELS, progress: bool = False) -> EmbeddedImages:
    """Embed every image of ``data`` through the bulk pipeline's per-shard step
    (:func:`phiclip.pipeline.step.embed_payloads`): an image that cannot be read, decoded or
    preprocessed is left out and named, never fatal. ``progress``: a bar over the images (on stderr)."""
    from tqdm.auto import tqdm

    images = list(data.images)
    chunk = batch_size * PROGRESS_CHUNK_BATCHES if progress else max(1, len(images))
    result = StepResult(dim=int(encoder.dim))
    with tqdm(total=len(images), unit="image", desc="embedding", disable=not progress, dynamic_ncols=True,
              file=sys.stderr) as bar:
        for start in range(0, len(images), chunk):
            part = embed_payloads(encoder, images[start:start + chunk], batch_size=batch_size, max_pixels=max_pixels)
            part.positions = [start + i for i in part.positions]
            part.errors = [(start + i, stage, reason) for i, stage, reason in part.errors]
            result.add(part)
            bar.update(min(chunk, len(images) - start))
    order = np.argsort(np.asarray(result.positions, dtype=np.int64), kind="stable")
    kept = np.asarray(result.positions, dtype=np.int64)[order]
    left = [{"source": data.name_of(int(i)), "stage": stage, "reason": reason} for i, stage, reason in sorted(result.errors)]
    vectors = _matrix(result.embeddings[order], "image embeddings") if len(kept) else np.zeros((0, encoder.dim), np.float32)
    return EmbeddedImages(vectors=vectors, kept=kept, left_out=left)


def _pick_test_split(splits: set[str]) -> str | None:
    for name in ("test", "validation", "val", "valid"):
        if name in splits:
            return name
    return None


def _read_lines(value: Sequence[str] | str | None) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        path = Path(value)
        if not path.is_file():
            raise ValueError(f"{value}: no such file (expected one entry per line)")
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        lines = [ln for ln in lines if ln and not ln.startswith("#")]
        if not lines:
            raise ValueError(f"{value}: no entries (one per line expected)")
        return lines
    return [str(v) for v in value]


def prompt_name(classname: str) -> str:
    """A class or folder name as words for a prompt: ``blue_circle`` -> ``blue circle``
    (underscores and hyphens read as spaces, runs of spaces collapsed)."""
    return " ".join(classname.replace("_", " ").replace("-", " ").split()) or classname


@dataclass
class _Run:
    """One evaluation in progress: its options, the data, the encoder, and the images left out."""

    task: str
    opts: EvalOptions
    data: LabelledData
    train: LabelledData | None
    split: str | None
    encoder: Encoder | None = None
    left_out: list[dict[str, str]] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)

    def step(self, message: str) -> None:
        """Say which step of the task runs now (on stderr, with ``progress``)."""
        if self.opts.progress:
            print(f"eval {self.task}: {message}", file=sys.stderr, flush=True)

    def embed(self, ds: LabelledData, what: str = "images") -> tuple[np.ndarray, LabelledData]:
        """Embed ``ds``; returns the vectors and the rows of ``ds`` they belong to."""
        self.step(f"embedding {len(ds)} {what}")
        got = embed_data(self.encoder, ds, batch_size=self.opts.batch_size, max_pixels=self.opts.max_pixels,
                         progress=self.opts.progress)
        self.left_out += got.left_out
        if not len(got.kept):
            first = got.left_out[0] if got.left_out else {"source": ds.source, "reason": "no images"}
            raise ValueError(f"{ds.source}: no image could be embedded ({len(got.left_out)} left out; the first: "
                             f"{first['source']}: {first['reason']})")
        return got.vectors, ds.subset(got.kept)


def load_eval_data(task: str, data: str | Path | LabelledData, opts: EvalOptions) -> _Run:
    """Step 1: read the data (and the training data), and pick the split to evaluate on."""
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not one of {', '.join(TASKS)}")
    cols = dict(image_column=opts.image_column, label_column=opts.label_column, caption_column=opts.caption_column)
    ds = data if isinstance(data, LabelledData) else load_data(data, split=opts.split, **cols)
    train = None
    if opts.train_data is not None or opts.train_split is not None:
        if task not in ("knn", "linear-probe"):
            raise ValueError(f"train_data/train_split only apply to knn and linear-probe, not {task}")
        src = opts.train_data if opts.train_data is not None else data
        train = src if isinstance(src, LabelledData) else load_data(src, split=opts.train_split, **cols)
    used_split = opts.split
    if task in ("zeroshot", "retrieval", "clustering") and opts.split is None and ds.splits is not None:
        used_split = _pick_test_split(set(ds.splits))
        if used_split is not None:
            ds = ds.select_split(used_split)
    run = _Run(task=task, opts=opts, data=ds, train=train, split=used_split)
    run.left_out += ds.left_out + ([] if train is None else train.left_out)
    return run


def _train_test(run: _Run) -> tuple[LabelledData, LabelledData, str]:
    """The train and test sets for kNN / linear probe, and how they were obtained."""
    data, train, opts = run.data, run.train, run.opts
    if train is not None:
        train, data = align_label_spaces(train, data)
        return train, data, "given (separate train data)"
    if data.labels is None:
        raise ValueError(f"{data.source}: has no labels; kNN and linear probe need (image, label) data")
    tr, te, how = classification_split(data.labels, opts.split_protocol(), data.splits)
    if len(te) == 0:
        raise ValueError(
            f"{data.source}: every class has a single image, so no test images can be held out; "
            "add images or give separate train data"
        )
    return data.subset(tr), data.subset(te), how


def run_zeroshot(run: _Run) -> tuple[dict[str, float], dict[str, Any]]:
    """Zero-shot classification: class prompts against every image."""
    ds = run.data
    if ds.labels is None:
        raise ValueError(f"{ds.source}: has no labels; zero-shot classification needs (image, label) data")
    names = _read_lines(run.opts.classnames) or (None if ds.classnames is None else [prompt_name(n) for n in ds.classnames])
    if names is None:
        raise ValueError(
            f"{ds.source}: the labels are numbers without class names; pass the names (one per line, "
            "in label order) with --classnames FILE"
        )
    if ds.classnames is not None and len(names) != len(ds.classnames):
        raise ValueError(f"{len(names)} class names given but {ds.source} has {len(ds.classnames)} classes")
    if len(names) <= int(ds.labels.max()):
        raise ValueError(f"{len(names)} class names given but the labels go up to {int(ds.labels.max())}")
    protocol: ZeroShotProtocol = run.opts.protocol("zeroshot")
    templates = list(protocol.templates)
    run.step(f"class prompts: {len(names)} classes x {len(templates)} templates")
    classifier = zero_shot_classifier(run.encoder, names, templates)
    img, kept = run.embed(ds)
    assert kept.labels is not None
    run.step("scoring")
    metrics = protocol.run(img, classifier, kept.labels)
    run.record = protocol_record(protocol, _scored_on(run), {"test": len(img)})
    return metrics, {"num_classes": len(names), "num_images": len(img), "num_templates": len(templates)}


def _scored_on(run: _Run) -> str:
    return f"the {run.split} split" if run.split else "every image"


def run_clustering(run: _Run) -> tuple[dict[str, float], dict[str, Any]]:
    """k-means with k = the number of classes, scored by V-measure and NMI."""
    ds = run.data
    if ds.labels is None:
        raise ValueError(f"{ds.source}: has no labels; clustering is scored against (image, label) data")
    protocol: ClusteringProtocol = run.opts.protocol("clustering")
    img, kept = run.embed(ds)
    assert kept.labels is not None
    run.step("k-means")
    metrics = protocol.run(img, kept.labels)
    run.record = protocol_record(protocol, _scored_on(run), {"test": len(img)})
    return metrics, {"num_classes": int(len(np.unique(kept.labels))), "num_images": len(img)}


def run_retrieval(run: _Run) -> tuple[dict[str, float], dict[str, Any]]:
    """Image-text retrieval over the captions of the images."""
    if "text" not in run.encoder.modalities:
        raise ValueError(f"{run.encoder.name!r} embeds images only, so image-text retrieval cannot run")
    run.data.texts_and_owners()  # no captions: refused before any image is embedded
    img, kept = run.embed(run.data)
    texts, owner = kept.texts_and_owners()
    run.step(f"embedding {len(texts)} captions, then ranking")
    txt = _matrix(run.encoder.encode_texts(texts), "text embeddings")
    protocol: RetrievalProtocol = run.opts.protocol("retrieval")
    run.record = protocol_record(protocol, _scored_on(run), {"images": len(img), "texts": len(texts)})
    return protocol.run(img, txt, owner), {"num_images": len(img), "num_texts": len(texts)}


def _classify_frozen(run: _Run, fit: Callable[..., tuple[dict[str, float], dict[str, Any]]]) -> tuple[dict[str, float], dict[str, Any]]:
    tr, te, how = _train_test(run)
    if tr.labels is None or te.labels is None:
        raise ValueError(f"{run.data.source}: has no labels; {run.task} needs (image, label) data")
    xtr, tr = run.embed(tr, "training images")
    xte, te = run.embed(te, "test images")
    assert tr.labels is not None and te.labels is not None
    run.step("kNN vote" if run.task == "knn" else "fitting the linear probe (weight decay chosen on validation)")
    metrics, details = fit(xtr, tr.labels, xte, te.labels)
    details.update(split=how, num_train=len(xtr), num_test=len(xte), num_classes=int(len(np.unique(tr.labels))))
    run.record = protocol_record(run.opts.protocol(run.task), how, {"train": len(xtr), "test": len(xte)})
    return metrics, details


def run_knn(run: _Run) -> tuple[dict[str, float], dict[str, Any]]:
    """kNN on frozen embeddings (:class:`KnnProtocol`)."""
    protocol: KnnProtocol = run.opts.protocol("knn")

    def fit(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray) -> tuple[dict[str, float], dict[str, Any]]:
        details = {"k": protocol.k, "weighting": protocol.weighting, "temperature": protocol.temperature}
        return protocol.run(xtr, ytr, xte, yte), details

    return _classify_frozen(run, fit)


def run_linear_probe(run: _Run) -> tuple[dict[str, float], dict[str, Any]]:
    """A logistic-regression probe on frozen embeddings (:class:`LinearProbeProtocol`)."""
    protocol: LinearProbeProtocol = run.opts.protocol("linear-probe")
    return _classify_frozen(run, protocol.run)


#: The function of each task.
TASK_RUNNERS: dict[str, Callable[[_Run], tuple[dict[str, float], dict[str, Any]]]] = {
    "zeroshot": run_zeroshot,
    "knn": run_knn,
    "linear-probe": run_linear_probe,
    "retrieval": run_retrieval,
    "clustering": run_clustering,
}


def evaluate(
    model: str | Encoder,
    task: str,
    data: str | Path | LabelledData,
    options: EvalOptions | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Run one evaluation task end to end: read the data, load the encoder, embed (images that cannot
    be embedded are left out and listed), compute the metrics.

    Args:
        model: an encoder spec (``clip:...``, ``phi3v:...``) or a loaded :class:`Encoder`.
        task: ``zeroshot`` | ``knn`` | ``linear-probe`` | ``retrieval``.
        data: a folder per class, a CSV/Parquet file, ``hf:NAME`` (see :func:`phiclip.inputs.load_data`),
            or a loaded :class:`LabelledData`.
        options: an :class:`EvalOptions`; ``settings`` (its field names) override its fields.

    Returns:
        ``{"task", "model", "encoder", "data", "split", "protocol", "metrics", "details", "left_out", "seconds"}``
        (JSON-ready); ``protocol`` is ``{"name", "description", "settings", "split", "n"}`` (what the metrics
        were computed by, on what, on how many); ``left_out`` is ``{"count", "items": [{"source", "stage",
        "reason"}]}``.
    """
    opts = replace(options or EvalOptions(), **settings)
    t0 = time.perf_counter()
    run = load_eval_data(task, data, opts)
    t_load = time.perf_counter()
    if isinstance(model, str):

        run.encoder = load_encoder(model, device=opts.device, dtype=opts.dtype)
    else:
        run.encoder = model
    run.encoder.set_max_pixels(opts.max_pixels)  # also bounds what preprocessing builds (Phi-3-vision's HD canvas)
    t_model = time.perf_counter()
    metrics, details = TASK_RUNNERS[task](run)
    t_end = time.perf_counter()
    describe = run.encoder.describe()
    return {
        "task": task,
        "model": str(describe.get("spec") or getattr(run.encoder, "name", model)),
        "encoder": describe,
        "data": run.data.source,
        "split": run.split,
        "protocol": run.record,
        "metrics": {k_: round(float(v), 6) for k_, v in metrics.items()},
        "details": details,
        "left_out": {"count": len(run.left_out), "items": run.left_out},
        "seconds": {
            "load_data": round(t_load - t0, 3),
            "load_model": round(t_model - t_load, 3),
            "embed_and_score": round(t_end - t_model, 3),
        },
    }


__all__ = [
    "DEFAULT_KNN_K",
    "DEFAULT_TEMPLATES",
    "DEFAULT_TEST_FRACTION",
    "ClusteringProtocol",
    "KnnProtocol",
    "LinearProbeProtocol",
    "RetrievalProtocol",
    "SplitProtocol",
    "ZeroShotProtocol",
    "classification_split",
    "protocol_record",
    "scored_rows",
    "DEFAULT_WEIGHT_DECAYS",
    "TASKS",
    "EmbeddedImages",
    "EvalOptions",
    "LinearProbeModel",
    "embed_data",
    "evaluate",
    "fill_template",
    "fit_linear_probe",
    "knn_classify",
    "knn_predict",
    "l2_normalize",
    "linear_probe",
    "load_eval_data",
    "mean_per_class_recall",
    "prompt_name",
    "retrieval_metrics",
    "stratified_split",
    "zero_shot_classifier",
    "zero_shot_metrics",
]
