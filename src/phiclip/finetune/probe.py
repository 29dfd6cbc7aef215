"""Probes: a linear (or small MLP) classifier on frozen embeddings of any encoder, and
classification of new images with it.

:func:`train_probe` reads (image, label) data (:mod:`phiclip.finetune.data`), embeds every image
through the project's one embedding step (:func:`phiclip.pipeline.step.embed_payloads`, what
``Encoder.encode_images`` runs; an image that cannot be read is skipped and counted), cached on disk
(``embeddings/`` under :func:`phiclip.cache.cache_dir`) by the encoder's description, the fingerprint of
its weights and the fingerprint of the data (a rerun reuses the vectors), standardises them, and
trains with AdamW on a class-weighted cross-entropy with early stopping on a validation split (a
progress bar for each phase). It writes ``OUT/probe.safetensors`` (the
layers and the standardisation) and ``OUT/probe.json`` (encoder spec, weights fingerprint, label
names, shapes, metrics).

:func:`classify` embeds an input (anything ``phiclip embed`` reads) through the bulk pipeline
(:func:`phiclip.pipeline.runner.embed`: workers, resume, an errors table) into a folder beside the
output, applies the probe and writes one Parquet row per input: ``id, source, label, score, top_k,
error``. It refuses a probe whose encoder differs from the one asked for, or whose weights changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from phiclip import cache, schema
from phiclip.atomic import atomic_path, atomic_write_json
from phiclip.encoders import Encoder, load_encoder, parse_spec
from phiclip.evaluate import mean_per_class_recall, stratified_split
from phiclip.finetune.common import TrainingError, progress_bar
from phiclip.finetune.data import SkippedImages, _item_digest, load_training_data
from phiclip.images import describe_source
from phiclip.inputs import DataError, LabelledData
from phiclip.pipeline.runner import embed
from phiclip.pipeline.step import embed_payloads
from phiclip.store import open_embeddings

PROBE_WEIGHTS = "probe.safetensors"
PROBE_CONFIG = "probe.json"
PROBE_FORMAT = "phiclip-probe/1"
#: Keys of ``Encoder.describe()`` that may differ between loads without changing the vectors.
_VOLATILE = frozenset({"device", "weights_dtype", "transformers_version", "text_unavailable", "max_batch"})


@dataclass
class ProbeOptions:
    """Every setting of :func:`train_probe`, with its default (declared here only)."""

    #: Hidden width of a one-hidden-layer MLP (0: a linear probe).
    hidden: int = 0
    #: Dropout before the MLP's output layer.
    dropout: float = 0.0
    #: Most epochs (passes over the training vectors).
    epochs: int = 300
    #: Vectors per optimizer step.
    batch_size: int = 256
    lr: float = 3e-3
    weight_decay: float = 1e-4
    #: Stop when the validation loss has not improved for this many epochs (the best weights are kept).
    patience: int = 20
    #: ``balanced`` (weights inversely proportional to class frequency) or ``none``.
    class_weights: str = "balanced"
    #: The validation split by name (default: val/validation/valid when the data has one).
    val_split: str | None = None
    #: Without a validation split: the share of training images held out (stratified).
    val_fraction: float = 0.2
    seed: int = 0
    #: Images per encoder call while embedding.
    embed_batch_size: int = 32
    device: str = "auto"
    #: Compute dtype of the encoder: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16.
    precision: str = "auto"
    #: Where embeddings are cached (default: ``embeddings/`` under the cache root, :func:`phiclip.cache.cache_dir`).
    cache_dir: str | None = None
    image_column: str | None = None
    label_column: str | None = None
    progress: bool = True

    def validate(self) -> ProbeOptions:
        """Check ranges and choices; returns self."""
        if self.hidden < 0:
            raise TrainingError(f"--hidden must be >= 0 (0: linear), got {self.hidden}")
        if self.epochs < 1 or self.batch_size < 1 or self.embed_batch_size < 1:
            raise TrainingError("--epochs, --batch-size and --embed-batch-size must be at least 1")
        if self.class_weights not in ("balanced", "none"):
            raise TrainingError(f"--class-weights must be balanced or none, got {self.class_weights!r}")
        if not 0 <= self.val_fraction < 1:
            raise TrainingError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if not 0 <= self.dropout < 1:
            raise TrainingError(f"--dropout must be in [0, 1), got {self.dropout}")
        return self


# --- the network ---------------------------------------------------------------------------------
def build_probe_net(dim: int, num_classes: int, hidden: int = 0, dropout: float = 0.0) -> Any:
    """``x (n, dim) -> logits (n, classes)``: standardise with the buffers ``feature_mean`` /
    ``feature_std``, then a linear layer, or Linear-GELU-Dropout-Linear when ``hidden > 0``."""
    import torch
    from torch import nn

    class ProbeNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("feature_mean", torch.zeros(dim))
            self.register_buffer("feature_std", torch.ones(dim))
            if hidden:
                self.layers = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes))
            else:
                self.layers = nn.Sequential(nn.Linear(dim, num_classes))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layers((x - self.feature_mean) / self.feature_std)

    return ProbeNet()


# --- embeddings, cached --------------------------------------------------------------------------
#: The folder under the cache root (:func:`phiclip.cache.cache_dir`) of the embedding cache.
EMBEDDINGS_CACHE = "embeddings"


def weights_fingerprint(encoder: Encoder) -> str | None:
    """The encoder's ``describe()["weights_fingerprint"]`` when it reports one."""
    fp = encoder.describe().get("weights_fingerprint")
    return str(fp) if fp else None


def encoder_identity(encoder: Encoder) -> dict[str, Any]:
    """What decides an encoder's vectors: its description without volatile keys (device...)."""
    return {k: v for k, v in encoder.describe().items() if k not in _VOLATILE}


def embedding_cache_key(encoder: Encoder, images: Sequence[Any]) -> str:
    """32 hex digits over the encoder's identity (spec, preprocessing, dtype, weights fingerprint)
    and every image (path, size and modification time; or the bytes)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(encoder_identity(encoder), sort_keys=True, default=str).encode())
    for item in images:
        h.update(_item_digest(item).encode("utf-8", "surrogateescape"))
        h.update(b"\n")
    return h.hexdigest()


@dataclass
class CachedEmbeddings:
    """``vectors`` (n, dim) float32 (zeros where ``ok`` is false), ``ok`` (n,) bool, the reasons of
    the failed images, and whether they came from the cache."""

    vectors: np.ndarray
    ok: np.ndarray
    skipped: SkippedImages
    from_cache: bool
    key: str


def embed_images_cached(encoder: Encoder, images: Sequence[Any], *, cache_dir: str | Path | None = None,
                        batch_size: int = 32, progress: bool = False) -> CachedEmbeddings:
    """Embed ``images`` with ``encoder`` through the pipeline's embedding step
    (:func:`~phiclip.pipeline.step.embed_payloads`, about ``batch_size`` images per model call), or read
    them from the cache. Images that cannot be read, decoded or preprocessed are skipped (``source:
    reason`` each, as ``phiclip embed`` words them), not fatal."""
    from safetensors.numpy import load_file, save_file

    root = Path(cache_dir) if cache_dir is not None else cache.cache_dir(EMBEDDINGS_CACHE)
    key = embedding_cache_key(encoder, images)
    path = root / f"{key}.safetensors"
    if path.is_file():
        try:
            arrays = load_file(str(path))
            reasons = json.loads((root / f"{key}.json").read_text(encoding="utf-8"))["skipped"]
            skipped = SkippedImages({int(k): v for k, v in reasons.items()})
            return CachedEmbeddings(arrays["vectors"], arrays["ok"].astype(bool), skipped, True, key)
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache entry is recomputed
    skipped = SkippedImages()
    vectors = np.zeros((len(images), encoder.dim), dtype=np.float32)
    ok = np.zeros(len(images), dtype=bool)
    budget = max(1, batch_size) * max(1, int(encoder.typical_item_cost()))  # the step's budget counts item costs
    bar = progress_bar(len(images), 0, progress, "embed")
    bar.unit = "img"
    try:
        for s in range(0, len(images), batch_size):  # one call per batch, for the progress bar
            part = images[s : s + batch_size]
            res = embed_payloads(encoder, part, batch_size=budget, max_pixels=encoder.max_pixels)
            if res.positions:
                rows = s + np.asarray(res.positions, dtype=np.int64)
                vectors[rows] = res.embeddings
                ok[rows] = True
            for pos, _stage, reason in res.errors:
                skipped.add(s + pos, f"{describe_source(part[pos])}: {reason}")
            bar.update(len(part))
    finally:
        bar.close()
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(root / f"{key}.json", {
        "encoder": encoder_identity(encoder), "num_images": len(images),
        "skipped": {str(k): v for k, v in skipped.reasons.items()}}, durable=False, default=str)
    with atomic_path(path, durable=False) as tmp:  # a cache: computed again if lost
        save_file({"vectors": vectors, "ok": ok.astype(np.uint8)}, str(tmp))
    return CachedEmbeddings(vectors, ok, skipped, False, key)


# --- training --------------------------------------------------------------------------------------
@dataclass
class ProbeResult:
    """What :func:`train_probe` did (also in ``probe.json`` under ``metrics``)."""

    output: Path
    encoder: str
    num_classes: int
    train_images: int
    val_images: int
    test_images: int
    train_acc: float
    val_acc: float | None
    test_acc: float | None
    val_mean_per_class_recall: float | None
    best_epoch: int
    epochs_run: int
    embeddings_from_cache: bool
    skipped_images: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        d = dataclasses.asdict(self)
        d["output"] = str(self.output)
        return d


def _splits(ds: LabelledData, opts: ProbeOptions) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """Row indices of train, validation and test (the data's ``test`` split, if any)."""
    n = len(ds)
    idx = np.arange(n)
    splits = np.asarray(ds.splits) if ds.splits is not None else None
    test = np.flatnonzero(splits == "test") if splits is not None else np.zeros(0, dtype=np.int64)
    names = set(ds.splits or [])
    val_name = opts.val_split or next((v for v in ("val", "validation", "valid") if v in names), None)
    if opts.val_split is not None and opts.val_split not in names:
        raise DataError(f"{ds.source}: no split {opts.val_split!r}" + (f"; splits: {', '.join(sorted(names))}" if names else ""))
    if val_name is not None:
        val = np.flatnonzero(splits == val_name)  # type: ignore[operator]
        train = np.setdiff1d(idx, np.concatenate([val, test]))
        return train, val, test, f"given splits (validation: {val_name})"
    pool = np.setdiff1d(idx, test)
    if opts.val_fraction <= 0:
        return pool, np.zeros(0, dtype=np.int64), test, "no validation split"
    tr, va = stratified_split(ds.labels[pool], opts.val_fraction, opts.seed)  # type: ignore[index]
    return pool[tr], pool[va], test, f"stratified {opts.val_fraction:.0%} validation (seed {opts.seed})"


def _class_weights(y: np.ndarray, num_classes: int, mode: str) -> np.ndarray:
    if mode == "none":
        return np.ones(num_classes, dtype=np.float32)
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    present = counts > 0
    w = np.zeros(num_classes)
    w[present] = len(y) / (present.sum() * counts[present])
    return w.astype(np.float32)


def fit_probe(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray | None, y_val: np.ndarray | None,
              num_classes: int, opts: ProbeOptions) -> tuple[Any, dict[str, Any]]:
    """Train the probe network on vectors; returns ``(net, info)`` with the best epoch by
    validation loss (class-weighted cross-entropy) and the number of epochs run. A progress bar over
    epochs (``opts.progress``) shows the validation loss."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(opts.seed)
    x = torch.from_numpy(np.ascontiguousarray(x_train, dtype=np.float32))
    y = torch.from_numpy(np.asarray(y_train, dtype=np.int64))
    net = build_probe_net(x.shape[1], num_classes, opts.hidden, opts.dropout)
    with torch.no_grad():
        net.feature_mean.copy_(x.mean(0))
        net.feature_std.copy_(x.std(0, unbiased=False).clamp_min(1e-6))
    weight = torch.from_numpy(_class_weights(y_train, num_classes, opts.class_weights))
    optimizer = torch.optim.AdamW(net.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    gen = torch.Generator().manual_seed(opts.seed)
    has_val = x_val is not None and len(x_val) > 0
    xv = torch.from_numpy(np.ascontiguousarray(x_val, dtype=np.float32)) if has_val else None
    yv = torch.from_numpy(np.asarray(y_val, dtype=np.int64)) if has_val else None
    best = (float("inf"), 0, None)
    epoch = 0
    bar = progress_bar(opts.epochs, 0, opts.progress, "train probe")
    bar.unit = "epoch"
    try:
        for epoch in range(1, opts.epochs + 1):
            net.train()
            for b in torch.randperm(len(x), generator=gen).split(opts.batch_size):
                loss = F.cross_entropy(net(x[b]), y[b], weight=weight)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            bar.update(1)
            if not has_val:
                continue
            net.eval()
            with torch.no_grad():
                vloss = float(F.cross_entropy(net(xv), yv, weight=weight))
            improved = vloss < best[0] - 1e-6
            if improved:
                best = (vloss, epoch, {k: v.clone() for k, v in net.state_dict().items()})
            bar.set_postfix(val_loss=f"{vloss:.4f}", best_epoch=best[1])
            if not improved and epoch - best[1] >= opts.patience:
                break  # early stop: the bar ends short of --epochs
    finally:
        bar.close()
    if best[2] is not None:
        net.load_state_dict(best[2])
    net.eval()
    return net, {"best_epoch": best[1] if has_val else epoch, "epochs_run": epoch,
                 "best_val_loss": None if not has_val else round(best[0], 6)}


def predict_proba(net: Any, x: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """(n, classes) softmax probabilities."""
    import torch

    out = []
    with torch.no_grad():
        for s in range(0, len(x), batch_size):
            out.append(torch.softmax(net(torch.from_numpy(np.ascontiguousarray(x[s : s + batch_size], dtype=np.float32))), -1))
    return torch.cat(out).numpy() if out else np.zeros((0, 0), dtype=np.float32)


def train_probe(model: str | Encoder, data: str | Path | LabelledData, output: str | Path,
                options: ProbeOptions | None = None, **settings: Any) -> ProbeResult:
    """Train a probe on frozen embeddings of ``model`` (any encoder spec, or a loaded
    :class:`~phiclip.encoders.Encoder`) and save it to ``output``.

    Raises:
        TrainingError / DataError / ValueError: bad options, data or model, naming the fix.
    """
    opts = dataclasses.replace(options or ProbeOptions(), **settings).validate()
    t0 = time.perf_counter()
    ds = load_training_data(data, need="labels", image_column=opts.image_column, label_column=opts.label_column)
    assert ds.labels is not None
    classnames = ds.classnames or [str(i) for i in range(int(ds.labels.max()) + 1)]
    num_classes = len(classnames)
    train_idx, val_idx, test_idx, how = _splits(ds, opts)
    t_data = time.perf_counter()
    encoder = model if isinstance(model, Encoder) else load_encoder(model, device=opts.device, dtype=opts.precision)
    t_model = time.perf_counter()
    emb = embed_images_cached(encoder, ds.images, cache_dir=opts.cache_dir, batch_size=opts.embed_batch_size,
                              progress=opts.progress)
    t_embed = time.perf_counter()
    ok = emb.ok
    tr, va, te = train_idx[ok[train_idx]], val_idx[ok[val_idx]], test_idx[ok[test_idx]]
    if len(tr) == 0:
        raise DataError(f"{ds.source}: no training image could be read ({len(emb.skipped)} skipped)")
    if len(np.unique(ds.labels[tr])) < 2:
        raise DataError(f"{ds.source}: the training images hold a single class; a probe needs at least two")
    x, y = emb.vectors, ds.labels
    net, info = fit_probe(x[tr], y[tr], x[va] if len(va) else None, y[va] if len(va) else None, num_classes, opts)

    def acc(rows: np.ndarray) -> float | None:
        if len(rows) == 0:
            return None
        return round(float(np.mean(predict_proba(net, x[rows]).argmax(1) == y[rows])), 6)

    val_mpcr = None
    if len(va):
        val_mpcr = round(mean_per_class_recall(y[va], predict_proba(net, x[va]).argmax(1)), 6)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    result = ProbeResult(
        output=out, encoder=encoder.name, num_classes=num_classes, train_images=len(tr), val_images=len(va),
        test_images=len(te), train_acc=acc(tr) or 0.0, val_acc=acc(va), test_acc=acc(te), val_mean_per_class_recall=val_mpcr,
        best_epoch=int(info["best_epoch"]), epochs_run=int(info["epochs_run"]), embeddings_from_cache=emb.from_cache,
        skipped_images=emb.skipped.summary(),
        seconds={"load_data": round(t_data - t0, 3), "load_model": round(t_model - t_data, 3),
                 "embed": round(t_embed - t_model, 3), "train": round(time.perf_counter() - t_embed, 3)},
    )
    save_probe(out, net, {
        "encoder": encoder.name, "weights_fingerprint": weights_fingerprint(encoder), "encoder_identity": encoder_identity(encoder),
        "dim": int(encoder.dim), "classnames": list(classnames), "hidden": opts.hidden, "dropout": opts.dropout,
        "normalization": {"encoder_l2": bool(getattr(encoder, "normalize", False)),
                          "standardize": "(x - feature_mean) / feature_std, from the training vectors"},
        "data": ds.source, "split": how, "options": dataclasses.asdict(opts), "metrics": result.to_dict(),
        "best_val_loss": info["best_val_loss"],
    })
    return result


def save_probe(output: Path, net: Any, meta: dict[str, Any]) -> None:
    """Write ``probe.safetensors`` (state dict) and ``probe.json`` (``meta`` plus the format)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(output / PROBE_WEIGHTS),
              metadata={"format": PROBE_FORMAT})
    atomic_write_json(output / PROBE_CONFIG, {"format": PROBE_FORMAT, **meta}, indent=2, default=str)


@dataclass
class LoadedProbe:
    """A probe read back: the network (eval mode) and its ``probe.json``."""

    net: Any
    meta: dict[str, Any]

    @property
    def classnames(self) -> list[str]:
        """Label names, in the order of the network's outputs."""
        return list(self.meta["classnames"])

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """(n, classes) probabilities for (n, dim) vectors of the probe's encoder."""
        if x.ndim != 2 or x.shape[1] != self.meta["dim"]:
            raise ValueError(f"the probe takes (n, {self.meta['dim']}) vectors of {self.meta['encoder']}, got {x.shape}")
        return predict_proba(self.net, x)


def load_probe(path: str | Path) -> LoadedProbe:
    """Read a probe folder written by :func:`train_probe` (safetensors and JSON only)."""
    from safetensors.torch import load_file

    root = Path(path)
    cfg_path, w_path = root / PROBE_CONFIG, root / PROBE_WEIGHTS
    if not cfg_path.is_file() or not w_path.is_file():
        raise TrainingError(f"{root}: not a probe folder (needs {PROBE_CONFIG} and {PROBE_WEIGHTS}); train one with "
                            "`phiclip finetune probe`")
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
        state = load_file(str(w_path))
    except (OSError, ValueError) as e:
        raise TrainingError(f"{root}: the probe files cannot be read ({e})") from None
    if meta.get("format") != PROBE_FORMAT:
        raise TrainingError(f"{cfg_path}: format {meta.get('format')!r} is not {PROBE_FORMAT!r}")
    net = build_probe_net(int(meta["dim"]), len(meta["classnames"]), int(meta.get("hidden", 0)), float(meta.get("dropout", 0.0)))
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise TrainingError(f"{w_path}: does not match {PROBE_CONFIG} ({' '.join(str(e).split())[:300]})") from None
    return LoadedProbe(net.eval(), meta)


# --- classification ----------------------------------------------------------------------------------
@dataclass
class ClassifyResult:
    """What :func:`classify` wrote."""

    output: Path
    embeddings: Path
    rows: int
    classified: int
    failed: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {**dataclasses.asdict(self), "output": str(self.output), "embeddings": str(self.embeddings)}


def _same_spec(a: str, b: str) -> bool:
    try:
        return str(parse_spec(a)) == str(parse_spec(b))
    except ValueError:  # a name that is not a spec (an encoder built in code)
        return a == b


def check_probe_encoder(probe: LoadedProbe, model: str | None, encoder: Encoder | None = None) -> None:
    """Refuse a probe trained on another encoder than ``model`` (spec), or on other weights than
    ``encoder`` has now (its weights fingerprint)."""
    trained = probe.meta["encoder"]
    if model is not None and not _same_spec(model, trained):
        raise TrainingError(f"the probe was trained on {trained} embeddings, not {model}; classify with that encoder "
                            "(leave out --model) or train a probe for this one")
    if encoder is not None:
        then, now = probe.meta.get("weights_fingerprint"), weights_fingerprint(encoder)
        if then and now and then != now:
            raise TrainingError(f"the weights of {trained} changed since the probe was trained (fingerprint {then} then, "
                                f"{now} now); retrain the probe on the current weights")
        if int(encoder.dim) != int(probe.meta["dim"]):
            raise TrainingError(f"{trained} now gives {encoder.dim}-d vectors but the probe takes {probe.meta['dim']}-d")


def classify(probe: str | Path, input: str | os.PathLike, output: str | Path, *, model: str | Encoder | None = None,
             top_k: int = 5, embeddings: str | Path | None = None, device: str = "auto", precision: str = "auto",
             batch_size: int = 64, num_workers: int | None = None, column: str | None = None, split: str = "train",
             progress: bool = True) -> ClassifyResult:
    """Classify every image of ``input`` with a probe; write ``output`` (Parquet).

    Args:
        probe: a folder written by :func:`train_probe`.
        input: anything ``phiclip embed`` reads (folder, glob, list, table, ``hf:``).
        output: the Parquet file: ``id, source, label, score, top_k (list of {label, score}), error``.
        model: the encoder spec the caller expects (refused when the probe's differs), or a loaded
            :class:`~phiclip.encoders.Encoder` to embed with (its name must be the probe's).
        embeddings: the folder for the embeddings (default: beside ``output``, named
            ``<output stem>.embeddings``); a rerun resumes or reuses it.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    loaded = load_probe(probe)
    given = model if isinstance(model, Encoder) else None
    check_probe_encoder(loaded, given.name if given is not None else model)
    if top_k < 1:
        raise TrainingError(f"--top-k must be at least 1, got {top_k}")
    encoder = given or load_encoder(loaded.meta["encoder"], device=device, dtype=precision)
    check_probe_encoder(loaded, None, encoder)
    out = Path(output)
    if out.suffix.lower() != ".parquet":
        raise TrainingError(f"{out}: the output is a Parquet file; name it like predictions.parquet")
    emb_dir = Path(embeddings) if embeddings is not None else out.with_name(out.stem + ".embeddings")
    embed(encoder, input, emb_dir, dtype="float32", batch_size=batch_size, num_workers=num_workers, column=column,
          split=split, progress=progress)
    stored = open_embeddings(emb_dir)
    probs = loaded.predict_proba(stored.embeddings) if len(stored.ids) else np.zeros((0, len(loaded.classnames)))
    names = loaded.classnames
    k = min(top_k, len(names))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k] if len(probs) else np.zeros((0, k), dtype=np.int64)
    ids, sources = list(stored.ids), list(stored.sources)
    labels: list[str | None] = [names[int(o[0])] for o in order]
    scores: list[float | None] = [float(probs[i, o[0]]) for i, o in enumerate(order)]
    tops: list[list[dict[str, Any]] | None] = [[{"label": names[int(c)], "score": float(probs[i, c])} for c in o]
                                                for i, o in enumerate(order)]
    errors: list[str | None] = [None] * len(ids)
    failed = 0
    for shard in sorted((emb_dir / schema.ERRORS_DIR).glob("part-*.parquet")):  # not skipped.parquet (non-inputs)
        t = pq.read_table(shard)
        if t.num_rows == 0 or schema.COL_ID not in t.column_names:
            continue
        cols = t.to_pydict()
        for i in range(t.num_rows):
            ids.append(cols[schema.COL_ID][i])
            sources.append(cols[schema.COL_SOURCE][i])
            labels.append(None)
            scores.append(None)
            tops.append(None)
            reason = cols.get(schema.COL_REASON, [None] * t.num_rows)[i]
            stage = cols.get(schema.COL_STAGE, [None] * t.num_rows)[i]
            errors.append(f"{stage}: {reason}" if stage else str(reason))
            failed += 1
    top_type = pa.list_(pa.struct([("label", pa.string()), ("score", pa.float32())]))
    table = pa.table({
        "id": pa.array(ids, pa.string()), "source": pa.array(sources, pa.string()),
        "label": pa.array(labels, pa.string()), "score": pa.array(scores, pa.float32()),
        "top_k": pa.array(tops, top_type), "error": pa.array(errors, pa.string()),
    })
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp)
    return ClassifyResult(output=out, embeddings=emb_dir, rows=len(ids), classified=len(stored.ids), failed=failed,
                          seconds=round(time.perf_counter() - t0, 3))


__all__ = [
    "ClassifyResult",
    "LoadedProbe",
    "ProbeOptions",
    "ProbeResult",
    "check_probe_encoder",
    "classify",
    "embed_images_cached",
    "fit_probe",
    "load_probe",
    "train_probe",
]
