"""Distil a student vision tower into Phi-3-vision's image path (``phiclip finetune phi3v-adapter``).

The student (any CLIP-like checkpoint: ``clip:`` or ``siglip:``) is put into the image path as
:class:`~phiclip.phi3v.modeling.StudentImageEmbedding`: crops at the student's input size, its patch
grid resampled to 24 x 24, the released 2 x 2 merge, separators and projection. Only new parts
train by default: the projection (its second layer starts from the teacher's, which has the same
shape) and the two separators; optionally the last N student layers (``train_layers``) or LoRA on
the student (``lora_rank``, merged on export).

The target is the teacher's own image tokens, image by image (every token the language model would
see, separators included): ``loss = MSE / var + cos_weight * (1 - cosine)`` per token, where ``var``
is the teacher tokens' mean per-dimension variance (so the MSE term starts near 1 whatever the
scale). The teacher's tokens are computed once into a Parquet file keyed by the teacher and the
images (``teacher_tokens = "cache"``, under :func:`phiclip.cache.cache_dir` ``("teacher-tokens")``; every later run with
the same teacher and images reuses it) or recomputed every batch (``"stream"``, no disk).

Reported on held-out images, before and after training (``metrics.json``): the mean per-token
cosine to the teacher, and R^2, the share of the teacher tokens' variance around their mean token
that the student reproduces (``1 - sum |s - t|^2 / sum |t - mean|^2``; predicting the mean token
scores 0, though its cosine is high: ``mean_token_cosine`` says how high). Both over the image
tokens (separators left out), with the number of images they are measured on; below
:data:`MIN_EVAL_IMAGES` held-out images the run warns that they mean little. Also the cost of each
tower per crop on this machine.

Export: ``model.safetensors`` with ``model.vision_embed_tokens.*`` tensors, ``config.json`` (the
teacher's, with ``img_processor`` describing the student) and ``preprocessor_config.json``, which
``Phi3VImageEmbedding.from_pretrained`` and ``phiclip embed -m phi3v:OUT`` load.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from phiclip.atomic import atomic_path, atomic_write_json, atomic_write_text
from phiclip.cache import cache_dir
from phiclip.encoders import Encoder, load_encoder, parse_spec
from phiclip.finetune.common import (
    TrainingError,
    autocast_for,
    batch_positions,
    options_identity,
    prepare_output,
    progress_bar,
    resolve_device,
    seed_everything,
    torch_runtime,
)
from phiclip.finetune.data import ImageBatchLoader, SkippedImages
from phiclip.finetune.loop import LoopSettings, TrainingMode, finish_run, run_training
from phiclip.finetune.probe import encoder_identity
from phiclip.hub import resolve_file
from phiclip.inputs.records import Unreadable
from phiclip.phi3v.weights import VISION_PREFIX
from phiclip.pipeline.sources import list_inputs

if TYPE_CHECKING:
    from phiclip.encoders.phi3v import Phi3VEncoder

#: The folder under the cache root (:func:`phiclip.cache.cache_dir`) where teacher tokens are cached by default.
TEACHER_TOKENS_CACHE = "teacher-tokens"
#: Fewer held-out images than this: the before/after R^2 and cosine come with a warning that they mean little.
MIN_EVAL_IMAGES = 8
_NOT_IDENTITY = frozenset({"resume", "progress", "tensorboard", "save_every", "keep_checkpoints", "num_threads",
                           "device", "cache_dir", "teacher_tokens", "speed_images"})


@dataclass
class AdapterOptions:
    """Every setting of :func:`distill_phi3v_adapter`, with its default (declared here only)."""

    #: Optimizer steps (one step = ``batch_size * grad_accum`` images); or give ``epochs``.
    steps: int | None = None
    #: Passes over the training images (default 1 when ``steps`` is not given).
    epochs: float | None = None
    #: Images per micro-batch (each image is 1 + h*w crops).
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-3
    #: Linear warmup: a fraction of the steps (below 1) or a number of steps.
    warmup: float = 0.05
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    #: The student's hidden state used: -1 its last layer, -2 the one before (as Phi-3-vision does), ...
    student_layer: int = -2
    #: Also train the last N student layers run (0: the tower stays frozen).
    train_layers: int = 0
    #: LoRA rank on the student tower (0: off); merged into the weights on export.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    #: Weight of the per-token cosine term next to the normalised MSE.
    cos_weight: float = 1.0
    #: ``cache`` (compute the teacher's tokens once, to Parquet, reused on rerun) or ``stream``.
    teacher_tokens: str = "cache"
    #: Where the teacher-token cache goes (default: ``teacher-tokens/`` under the cache root,
    #: :func:`phiclip.cache.cache_dir`); a file per teacher and image list, reused by any run.
    cache_dir: str | None = None
    #: Share of the images held out for the before/after report, and at most this many of them.
    eval_fraction: float = 0.1
    max_eval: int = 50
    #: Held-out images timed through each tower for the crops/s figures.
    speed_images: int = 4
    device: str = "auto"
    #: ``auto`` (bf16 autocast on CUDA), ``float32``, ``bfloat16``.
    precision: str = "auto"
    seed: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    resume: bool = False
    #: For tables and ``hf:`` datasets: the image column and the split.
    column: str | None = None
    split: str = "train"
    num_threads: int | None = None
    progress: bool = True
    tensorboard: bool | None = None

    def validate(self) -> AdapterOptions:
        """Check ranges and choices; returns self."""
        if self.batch_size < 1 or self.grad_accum < 1:
            raise TrainingError("--batch-size and --grad-accum must be at least 1")
        if self.lr <= 0:
            raise TrainingError(f"--lr must be positive, got {self.lr}")
        if self.teacher_tokens not in ("cache", "stream"):
            raise TrainingError(f"--teacher-tokens must be cache or stream, got {self.teacher_tokens!r}")
        if self.train_layers < 0 or self.lora_rank < 0:
            raise TrainingError("--train-layers and --lora-rank must be >= 0")
        if self.train_layers and self.lora_rank:
            raise TrainingError("--train-layers and --lora-rank both adapt the student tower; pick one")
        if not 0 <= self.eval_fraction < 1:
            raise TrainingError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        return self

    def identity(self) -> dict[str, Any]:
        """The settings that decide the loss curve (a resumed run must have the same)."""
        return options_identity(self, _NOT_IDENTITY)


@dataclass
class AdapterResult:
    """What a run did (also in ``metrics.json``)."""

    output: Path
    teacher: str
    student: str
    steps: int
    resumed_from: int | None
    before: dict[str, float] | None
    after: dict[str, float] | None
    final_loss: float | None
    speed: dict[str, float]
    seconds: float
    seconds_per_step: float | None
    train_images: int
    eval_images: int
    teacher_tokens_from_cache: bool
    #: The Parquet file of the teacher's tokens (None when streamed).
    teacher_tokens_file: str | None = None
    skipped_images: dict[str, Any] = field(default_factory=dict)
    trainable_parameters: int = 0
    #: Ids (as ``phiclip embed`` gives them) of the held-out images the before/after numbers are on.
    eval_ids: list[str] = field(default_factory=list)
    #: What the numbers above should be read with (e.g. too few held-out images).
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        d = dataclasses.asdict(self)
        d["output"] = str(self.output)
        return d


# --- building the student --------------------------------------------------------------------
def _student_description(student_encoder: Encoder, student_layer: int, spec: str) -> dict[str, Any]:
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    # lazy: imports torch
    from phiclip.phi3v.student import student_layers_run

    vcfg = student_encoder.model.config.vision_config
    model_type = "clip_vision_model" if student_encoder.kind == "clip" else "siglip_vision_model"
    known = (CLIPVisionConfig if model_type == "clip_vision_model" else SiglipVisionConfig)().to_dict()
    skip = {"transformers_version", "architectures", "model_type", "torch_dtype", "dtype", "_name_or_path", "vision_use_head"}
    hf = {k: v for k, v in vcfg.to_dict().items() if k in known and k not in skip}
    prep = student_encoder.preprocessor
    settings = getattr(prep, "processor", prep)
    mean = list(getattr(settings, "image_mean", None) or (0.5, 0.5, 0.5))
    std = list(getattr(settings, "image_std", None) or (0.5, 0.5, 0.5))
    return {
        "model_type": model_type, "hf_config": hf,
        "num_layers_run": student_layers_run(int(vcfg.num_hidden_layers), student_layer),
        "source": spec, "source_layer_idx": student_layer, "source_num_hidden_layers": int(vcfg.num_hidden_layers),
        "grid": f"{int(vcfg.image_size) // int(vcfg.patch_size)} -> 24 (bilinear), then the released 2x2 merge",
        "image_mean": [float(x) for x in (mean if len(mean) == 3 else mean * 3)],
        "image_std": [float(x) for x in (std if len(std) == 3 else std * 3)],
    }


def build_student(teacher_config: dict[str, Any], teacher: Any, student_encoder: Encoder, *, student_layer: int,
                  spec: str) -> Any:
    """A :class:`StudentImageEmbedding` from the teacher's ``config.json`` and a loaded CLIP/SigLIP
    encoder: the student's vision weights (its first layers), the teacher's second projection layer
    when shapes match, fresh separators and first projection layer."""
    import torch

    from phiclip.phi3v.modeling import StudentImageEmbedding  # lazy: imports torch
    from phiclip.phi3v.student import STUDENT_TOWER_NAME  # lazy: imports torch

    desc = _student_description(student_encoder, student_layer, spec)
    hf = desc["hf_config"]
    cfg = json.loads(json.dumps(teacher_config))
    cfg["img_processor"] = {
        "name": STUDENT_TOWER_NAME,
        "image_dim_out": int(hf["hidden_size"]),
        "num_img_tokens": 144,
        "layer_idx": -1,  # the exported tower holds exactly the layers run
        "type_feature": "patch",
        "vision_config": {  # the CLIP-style summary other readers of config.json check
            "hidden_size": int(hf["hidden_size"]), "intermediate_size": int(hf["intermediate_size"]),
            "num_hidden_layers": desc["num_layers_run"], "num_attention_heads": int(hf["num_attention_heads"]),
            "image_size": int(hf["image_size"]), "patch_size": int(hf["patch_size"]), "num_channels": int(hf.get("num_channels", 3)),
            "hidden_act": str(hf.get("hidden_act", "gelu")), "layer_norm_eps": float(hf.get("layer_norm_eps", 1e-6)),
        },
        "student": desc,
    }
    student = StudentImageEmbedding(cfg)
    source = student_encoder.model.vision_model
    theirs = source.state_dict()
    ours = student.img_processor.vision_model.state_dict()
    missing = [k for k in ours if k not in theirs]
    if missing:
        raise TrainingError(f"{spec}: its vision tower lacks {missing[:4]}; is it a CLIP/SigLIP checkpoint?")
    student.img_processor.vision_model.load_state_dict({k: theirs[k] for k in ours}, strict=True)
    proj_t, proj_s = teacher.img_projection, student.img_projection
    with torch.no_grad():
        if isinstance(proj_t, torch.nn.Sequential) and isinstance(proj_s, torch.nn.Sequential):
            proj_s[2].weight.copy_(proj_t[2].weight.float())
            proj_s[2].bias.copy_(proj_t[2].bias.float())
        student.glb_GN.normal_(std=0.02)
        student.sub_GN.normal_(std=0.02)
    return student


def set_trainable(student: Any, train_layers: int) -> None:
    """Projection and separators train; the tower is frozen except its last ``train_layers`` layers
    and any LoRA adapters."""
    layers = student.img_processor.vision_model.encoder.layers
    keep = {f"img_processor.vision_model.encoder.layers.{i}." for i in range(len(layers) - train_layers, len(layers))} if train_layers else set()
    if train_layers > len(layers):
        raise TrainingError(f"--train-layers {train_layers} exceeds the {len(layers)} student layers run")
    for name, p in student.named_parameters():
        if name.startswith("wte."):
            p.requires_grad = False
        elif name.startswith("img_processor."):
            p.requires_grad = "lora_" in name or any(name.startswith(k) for k in keep)
        else:
            p.requires_grad = True


def add_student_lora(student: Any, opts: AdapterOptions) -> None:
    """Inject peft LoRA adapters into the student tower (in place)."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise TrainingError("--lora-rank needs peft: pip install 'phiclip[train]' (or pip install peft)") from None
    config = LoraConfig(r=opts.lora_rank, lora_alpha=opts.lora_alpha, target_modules=list(opts.lora_targets), bias="none")
    try:
        inject_adapter_in_model(config, student.img_processor.vision_model)
    except ValueError as e:
        raise TrainingError(f"--lora-targets {', '.join(opts.lora_targets)}: {e}") from None


def merge_lora(student: Any) -> None:
    """Fold LoRA adapters into their base layers and put the base layers back (in place)."""
    from torch import nn

    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return
    for parent in list(student.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoraLayer):
                child.merge()
                base = child.get_base_layer()
                assert isinstance(base, nn.Module)
                setattr(parent, name, base)


# --- teacher tokens ------------------------------------------------------------------------------
class TeacherTokens:
    """The teacher's tokens per image id, in memory-mapped Parquet (``id, height, width,
    num_tokens, tokens``) with a JSON sidecar (the key and the images that failed)."""

    def __init__(self, path: Path) -> None:
        import pyarrow.parquet as pq

        self.path = path
        table = pq.read_table(path, memory_map=True)
        self.index = {k: i for i, k in enumerate(table.column("id").to_pylist())}
        self.sizes = list(zip(table.column("height").to_pylist(), table.column("width").to_pylist()))
        col = table.column("tokens").combine_chunks()
        self.offsets = np.asarray(col.offsets)
        self.dim = col.type.value_type.list_size
        self.values = np.asarray(col.values.values).reshape(-1, self.dim)  # (all tokens, H)

    def get(self, key: str) -> tuple[np.ndarray, tuple[int, int]] | None:
        """``(tokens (T, H), (H_canvas, W_canvas))`` of an image, or None when it failed."""
        row = self.index.get(key)
        if row is None:
            return None
        return self.values[self.offsets[row] : self.offsets[row + 1]], self.sizes[row]


def _tokens_key(teacher: Phi3VEncoder, ids: Sequence[str]) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(encoder_identity(teacher), sort_keys=True, default=str).encode())
    for i in ids:
        h.update(i.encode())
    return h.hexdigest()


def _teacher_batch(teacher: Phi3VEncoder, items: Sequence[Any], amp: Any) -> list[Any]:
    import torch

    with torch.no_grad(), amp:
        return [t.float() for t in teacher.model.image_tokens([c for c, _ in items], torch.tensor([s for _, s in items]))]


def build_teacher_cache(teacher: Phi3VEncoder, images: Sequence[Any], ids: Sequence[str], directory: Path, *, amp: Any,
                        batch_size: int, threads: int | None, progress: bool) -> tuple[TeacherTokens, SkippedImages, bool]:
    """Compute (or reuse) the teacher's tokens of every image; returns the store, the images that
    failed, and whether the cache was reused."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    key = _tokens_key(teacher, ids)
    path, meta_path = directory / f"{key}.parquet", directory / f"{key}.json"
    if path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("key") == key:
            return TeacherTokens(path), SkippedImages({int(k): v for k, v in meta["skipped"].items()}), True
    skipped = SkippedImages()
    loader = ImageBatchLoader(images, teacher.processor.preprocess_image, threads=threads, skipped=skipped)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, durable=False) as tmp:  # a cache: computed again if lost
        writer = None
        bar = progress_bar(len(images), 0, progress, "teacher tokens")
        try:
            for s in range(0, len(images), batch_size):
                kept, items = loader.load(range(s, min(s + batch_size, len(images))))
                if items:
                    tokens = _teacher_batch(teacher, items, amp)
                    dim = tokens[0].shape[-1]
                    flat = pa.array(torch.cat(tokens).numpy().astype(np.float16).reshape(-1))
                    offsets = pa.array(np.cumsum([0] + [int(t.shape[0]) for t in tokens]).astype(np.int32))
                    token_lists = pa.ListArray.from_arrays(offsets, pa.FixedSizeListArray.from_arrays(flat, dim))
                    rows = pa.table({
                        "id": pa.array([ids[i] for i in kept], pa.string()),
                        "height": pa.array([int(sz[0]) for _, sz in items], pa.int32()),
                        "width": pa.array([int(sz[1]) for _, sz in items], pa.int32()),
                        "num_tokens": pa.array([int(t.shape[0]) for t in tokens], pa.int32()),
                        "tokens": token_lists,
                    })
                    if writer is None:
                        writer = pq.ParquetWriter(tmp, rows.schema)
                    writer.write_table(rows)
                bar.update(min(batch_size, len(images) - s))
        finally:
            bar.close()
            loader.close()
            if writer is not None:
                writer.close()
        if writer is None:
            raise TrainingError("no image could be read for the teacher; check the data")
    atomic_write_json(meta_path, {"key": key, "teacher": teacher.name, "images": len(ids),
                                  "skipped": {str(k): v for k, v in skipped.reasons.items()}}, durable=False)
    return TeacherTokens(path), skipped, False


# --- loss and metrics ------------------------------------------------------------------------------
def distill_loss(student_tokens: Any, teacher_tokens: Any, token_var: float, cos_weight: float) -> Any:
    """``MSE / token_var + cos_weight * mean(1 - cosine)`` over tokens ``(N, H)``."""
    import torch.nn.functional as F

    mse = F.mse_loss(student_tokens, teacher_tokens)
    cos = F.cosine_similarity(student_tokens, teacher_tokens, dim=-1, eps=1e-6)
    return mse / token_var + cos_weight * (1 - cos).mean()


@dataclass
class HeldOut:
    """The held-out images' student inputs and teacher tokens (image tokens only, separators out)."""

    crops: list[Any]
    sizes: list[tuple[int, int]]
    targets: list[Any]  # (T_i', H) float32, separators removed
    masks: list[Any]  # (T_i,) bool, True for image tokens
    mean_token: Any  # (H,)


def token_metrics(student: Any, held: HeldOut, amp: Any, batch_size: int) -> dict[str, float]:
    """Mean per-token cosine and R^2 (around the teacher's mean token) of the student's image tokens."""
    import torch
    import torch.nn.functional as F

    student.eval()
    n = 0
    cos_sum = sse = 0.0
    with torch.no_grad(), amp:
        for s in range(0, len(held.crops), batch_size):
            out = student.image_tokens(held.crops[s : s + batch_size], torch.tensor(held.sizes[s : s + batch_size]))
            for j, tok in enumerate(out):
                pred = tok.float()[held.masks[s + j].to(tok.device)].cpu()
                target = held.targets[s + j]
                cos_sum += float(F.cosine_similarity(pred, target, dim=-1, eps=1e-6).sum())
                sse += float(((pred - target) ** 2).sum())
                n += target.shape[0]
    sst = sum(float(((t - held.mean_token) ** 2).sum()) for t in held.targets)
    return {"token_cosine": round(cos_sum / n, 6), "r2": round(1 - sse / sst, 6) if sst > 0 else float("nan")}


def _mean_token_baseline(held: HeldOut) -> dict[str, float]:
    """What predicting the teacher's mean token for every token scores (R^2 0 by definition)."""
    import torch
    import torch.nn.functional as F

    cos = F.cosine_similarity(torch.cat(held.targets), held.mean_token[None], dim=-1, eps=1e-6)
    return {"mean_token_cosine": round(float(cos.mean()), 6), "mean_token_r2": 0.0}


def _time_tower(model: Any, items: Sequence[Any], amp: Any) -> float:
    """Crops per second through ``model.image_tokens`` (tower, merge, projection; no preprocessing)."""
    import torch

    crops = [c for c, _ in items]
    sizes = torch.tensor([s for _, s in items])
    total = sum(int(c.shape[0]) for c in crops)
    with torch.no_grad(), amp:
        model.image_tokens(crops[:1], sizes[:1])  # warm-up
        t0 = time.perf_counter()
        model.image_tokens(crops, sizes)
        dt = time.perf_counter() - t0
    return round(total / dt, 2) if dt > 0 else float("inf")


# --- the run -------------------------------------------------------------------------------------
class AdapterTraining(TrainingMode):
    """Distillation as a :class:`~phiclip.finetune.loop.TrainingMode`: micro-batch ``m`` is the training
    images at stream positions ``[m * batch_size, (m + 1) * batch_size)``, its loss :func:`distill_loss`
    against the teacher's tokens (``targets(rows, items)``); evaluation is :func:`token_metrics` on the
    held-out images, with the mean-token baseline."""

    def __init__(self, net: Any, opts: AdapterOptions, loader: ImageBatchLoader,
                 targets: Callable[[Sequence[int], Sequence[Any]], list[Any]], train_rows: np.ndarray,
                 held: HeldOut | None, token_var: float, device: Any, amp: Any, processor: Any,
                 teacher_config: dict[str, Any]) -> None:
        import torch

        self.net, self.opts, self.loader, self.targets, self.train_rows = net, opts, loader, targets, train_rows
        self.held, self.token_var, self.device, self.amp = held, token_var, device, amp
        self.processor, self.teacher_config = processor, teacher_config
        self.trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
        self.optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=opts.lr,
                                           weight_decay=opts.weight_decay)

    def micro_batch_loss(self, index: int) -> tuple[Any, int] | None:
        import torch

        bs = self.opts.batch_size
        pos, _ = batch_positions(len(self.train_rows), self.opts.seed, index * bs, bs)
        kept, items = self.loader.load(self.train_rows[pos])
        if not kept:
            return None
        target = torch.cat(self.targets(kept, items)).to(self.device)
        with self.amp:
            out = self.net.image_tokens([c for c, _, _ in items], torch.tensor([s for _, s, _ in items]))
            loss = distill_loss(torch.cat(out).float(), target, self.token_var, self.opts.cos_weight)
        return loss, len(kept)

    def evaluate(self) -> dict[str, Any] | None:
        if self.held is None:
            return None
        return {**token_metrics(self.net, self.held, self.amp, self.opts.batch_size), **_mean_token_baseline(self.held),
                "images": len(self.held.crops)}

    def checkpoint_state(self) -> dict[str, Any]:
        return {"token_var": self.token_var}

    def export(self, output: Path) -> None:
        export_student(self.net, self.processor, output, self.teacher_config)

    def close(self) -> None:
        self.loader.close()


def few_eval_images_warning(images: int) -> str | None:
    """The warning for before/after numbers measured on ``images`` held-out images (None from
    :data:`MIN_EVAL_IMAGES` on)."""
    if images >= MIN_EVAL_IMAGES:
        return None
    return (f"R^2 and token cosine are measured on {images} held-out image(s), fewer than {MIN_EVAL_IMAGES}: too few "
            "to be meaningful; hold out more images (--eval-fraction, --max-eval) or add images")


def distill_phi3v_adapter(
    teacher: str,
    student: str,
    data: str | os.PathLike,
    output: str | Path,
    options: AdapterOptions | None = None,
    *,
    on_step: Callable[[int, float], None] | None = None,
    **settings: Any,
) -> AdapterResult:
    """Train a student tower to reproduce a Phi-3-vision teacher's image tokens; export it.

    Args:
        teacher: ``phi3v:HUB_ID_OR_DIR[?num_crops=N]``.
        student: ``clip:...`` or ``siglip:...`` (its vision tower is used).
        data: images, as ``phiclip embed`` reads them (folder, glob, list, table, ``hf:``).
        output: the export folder (also ``metrics.json``, ``metrics.jsonl`` and ``checkpoints/``
            while running).
        options: :class:`AdapterOptions`; ``settings`` override its fields by name.
        on_step: called as ``on_step(step, loss)`` after every optimizer step.

    Warns:
        UserWarning: fewer than :data:`MIN_EVAL_IMAGES` held-out images (also in ``result.warnings``).
    """
    import torch

    opts = dataclasses.replace(options or AdapterOptions(), **settings).validate()
    t_start = time.perf_counter()
    t_spec, s_spec = parse_spec(teacher), parse_spec(student)
    if t_spec.kind != "phi3v":
        raise TrainingError(f"--teacher {teacher}: the teacher is a phi3v: checkpoint")
    if s_spec.kind not in ("clip", "siglip"):
        raise TrainingError(f"--student {student}: the student is a clip: or siglip: checkpoint (its vision tower is used)")
    if t_spec.options.get("pooling", "mean") != "mean":
        raise TrainingError(f"--teacher {teacher}: drop the pooling option (the teacher gives every token)")
    output = Path(output)
    device = resolve_device(opts.device)
    amp = autocast_for(device, opts.precision)

    listing = list_inputs(data, column=opts.column, split=opts.split)
    records = [r for r in listing.records if r.error is None]
    if len(records) < 2:
        raise TrainingError(f"{data}: found {len(records)} images; distillation needs at least 2")
    payloads = listing.reader.read(records)  # each record read by its kind's source; unreadable ones left out
    kept = [j for j, p in enumerate(payloads) if not isinstance(p, Unreadable)]
    records, images = [records[j] for j in kept], [payloads[j] for j in kept]
    if len(records) < 2:
        raise TrainingError(f"{data}: {len(records)} images could be read; distillation needs at least 2")
    ids = [r.id for r in records]
    order = np.random.default_rng(opts.seed).permutation(len(records))
    n_eval = 0 if opts.eval_fraction <= 0 else min(opts.max_eval, max(1, round(len(records) * opts.eval_fraction)), len(records) - 1)
    eval_rows, train_rows = np.sort(order[:n_eval]), np.sort(order[n_eval:])
    identity = {"teacher": str(t_spec), "student": str(s_spec), "images": listing.fingerprint(), "options": opts.identity()}
    ckpt = prepare_output(output, opts.resume, identity)
    output.mkdir(parents=True, exist_ok=True)

    # Torch runs both (unless a spec names a runtime): the student is built from their modules.
    t_enc = load_encoder(str(torch_runtime(t_spec)), device=str(device), dtype="float32")
    s_enc = load_encoder(str(torch_runtime(s_spec)), device="cpu", dtype="float32")
    teacher_config = json.loads(Path(resolve_file(t_spec.location, "config.json")).read_text(encoding="utf-8"))  # type: ignore[arg-type]
    seed_everything(opts.seed)
    net = build_student(teacher_config, t_enc.model, s_enc, student_layer=opts.student_layer, spec=str(s_spec))
    del s_enc
    processor = net.processor(t_enc.processor.num_crops)
    if opts.lora_rank:
        add_student_lora(net, opts)
    set_trainable(net, opts.train_layers)
    net.to(device)

    # Teacher tokens: cached (computed once) or streamed.
    skipped = SkippedImages()
    store: TeacherTokens | None = None
    from_cache = False
    if opts.teacher_tokens == "cache":
        store, bad, from_cache = build_teacher_cache(
            t_enc, images, ids, Path(opts.cache_dir) if opts.cache_dir else cache_dir(TEACHER_TOKENS_CACHE), amp=amp,
            batch_size=opts.batch_size, threads=opts.num_threads, progress=opts.progress)
        skipped.reasons.update(bad.reasons)

    def prepare(image: Any) -> Any:
        crops, size = processor.preprocess_image(image)
        teacher_item = t_enc.processor.preprocess_image(image) if store is None else None
        return crops, size, teacher_item

    loader = ImageBatchLoader(images, prepare, threads=opts.num_threads, skipped=skipped)

    def targets_for(rows: Sequence[int], items: Sequence[Any]) -> list[Any]:
        if store is not None:
            out = []
            for r, (_, size, _) in zip(rows, items):
                got = store.get(ids[r])
                if got is None or tuple(got[1]) != tuple(size):
                    raise TrainingError(f"{store.path}: no tokens of the right size for image {ids[r]}; delete this cache file")
                out.append(torch.from_numpy(got[0].astype(np.float32)))
            return out
        return [t.cpu() for t in _teacher_batch(t_enc, [it[2] for it in items], amp)]

    # Held-out images, their teacher tokens, and the speed of both towers on them.
    held: HeldOut | None = None
    speed: dict[str, float] = {}
    eval_ids: list[str] = []
    if len(eval_rows):
        kept, items = loader.load(eval_rows)
        eval_ids = [ids[r] for r in kept]
        if kept:
            tg = targets_for(kept, items)
            masks = [~net.separator_mask(int(h), int(w)) for _, (h, w), _ in items]
            targets = [t[m] for t, m in zip(tg, masks)]
            mean_token = torch.cat(targets).mean(0)
            held = HeldOut([c for c, _, _ in items], [s for _, s, _ in items], targets, masks, mean_token)
            timed = min(opts.speed_images, len(kept))
            _, t_items = ImageBatchLoader(images, t_enc.processor.preprocess_image, threads=1).load(kept[:timed])
            speed = {"teacher_crops_per_s": _time_tower(t_enc.model, t_items, amp),
                     "student_crops_per_s": _time_tower(net, [(c, s) for c, s, _ in items[:timed]], amp)}
            speed["student_speedup"] = round(speed["student_crops_per_s"] / speed["teacher_crops_per_s"], 3)
    notes: list[str] = []
    if held is not None and (note := few_eval_images_warning(len(held.crops))):
        notes.append(note)
        warnings.warn(note, UserWarning, stacklevel=2)
    # The MSE's scale: the teacher tokens' mean per-dimension variance (held-out, else a training batch).
    if ckpt is not None:
        token_var = float(ckpt.state["token_var"])
    elif held is not None:
        token_var = float(torch.cat(held.targets).var(0).mean())
    else:
        kept, items = loader.load(train_rows[: opts.batch_size])
        token_var = float(torch.cat(targets_for(kept, items)).var(0).mean())
    token_var = max(token_var, 1e-12)

    mode = AdapterTraining(net, opts, loader, targets_for, train_rows, held, token_var, device, amp, processor,
                           teacher_config)
    loop = LoopSettings.from_options(opts, len(train_rows), "phi3v-adapter")
    run = run_training(mode, output, loop, identity=identity, checkpoint=ckpt, skipped=skipped, on_step=on_step)
    total = loop.total_steps
    result = AdapterResult(
        output=output, teacher=str(t_spec), student=str(s_spec), steps=total,
        resumed_from=run.resumed_from, before=run.before, after=run.after, final_loss=run.final_loss,
        speed=speed, seconds=round(time.perf_counter() - t_start, 3),
        seconds_per_step=round(run.train_seconds / total, 4) if total else None,
        train_images=len(train_rows), eval_images=0 if held is None else len(held.crops),
        teacher_tokens_from_cache=from_cache, teacher_tokens_file=None if store is None else str(store.path),
        skipped_images=skipped.summary(), trainable_parameters=int(mode.trainable),
        eval_ids=eval_ids, warnings=notes,
    )
    finish_run(output, {**result.to_dict(), "options": opts.identity(), "token_var": token_var})
    return result


def export_student(student: Any, processor: Any, output: Path, teacher_config: dict[str, Any]) -> None:
    """Write ``model.safetensors`` (``model.vision_embed_tokens.*``), ``config.json`` (the teacher's,
    with ``img_processor`` describing the student) and ``preprocessor_config.json`` (LoRA merged first)."""
    from safetensors.torch import save_file

    merge_lora(student)
    state = {VISION_PREFIX + k: v.detach().cpu().contiguous() for k, v in student.state_dict().items() if not k.startswith("wte.")}
    save_file(state, str(output / "model.safetensors"), metadata={"format": "pt"})
    # The teacher's config.json (language-model fields included) with the student's img_processor;
    # auto_map is dropped: the released remote code cannot build this tower.
    config = {k: v for k, v in teacher_config.items() if k not in ("auto_map", "_name_or_path")}
    config.update({"model_type": "phi3_v", "img_processor": student.config.img_processor,
                   "phiclip_note": "image path only (model.vision_embed_tokens.*) with a distilled student tower; "
                                   "the language model never saw this tower in training"})
    atomic_write_text(output / "config.json", json.dumps(config, indent=2) + "\n")
    processor.save_pretrained(output)


__all__ = ["MIN_EVAL_IMAGES", "TEACHER_TOKENS_CACHE", "AdapterOptions", "AdapterResult", "AdapterTraining", "TeacherTokens",
           "build_student", "distill_loss", "distill_phi3v_adapter", "export_student", "few_eval_images_warning",
           "token_metrics"]
