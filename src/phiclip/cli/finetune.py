"""``phiclip finetune clip|probe|phi3v-adapter`` and ``phiclip classify`` (with a trained probe):
:mod:`phiclip.finetune`. Defaults come from the options dataclasses there (importing them loads numpy and PIL only)."""

from __future__ import annotations

import enum
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from phiclip.cache import CACHE_ENV
from phiclip.cli.common import (
    BatchOpt,
    ColumnOpt,
    ProgressOpt,
    QueryDeviceOpt,
    QueryPrecision,
    QueryPrecisionOpt,
    SplitOpt,
    T,
    WorkersOpt,
    api_errors,
    echo_json,
    interrupted,
    print_rows,
    spec_with_kind,
    split_csv,
)
from phiclip.finetune.adapter import TEACHER_TOKENS_CACHE, AdapterOptions, distill_phi3v_adapter
from phiclip.finetune.clip import ClipFinetuneOptions, finetune_clip
from phiclip.finetune.probe import EMBEDDINGS_CACHE, ProbeOptions, classify, train_probe

_FT_CLIP, _FT_PROBE, _FT_ADAPTER = ClipFinetuneOptions(), ProbeOptions(), AdapterOptions()

finetune_app = typer.Typer(
    name="finetune", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Fine-tune: contrastive CLIP/SigLIP training, probes on frozen embeddings, a student tower for Phi-3-vision.",
)


class _Freeze(str, enum.Enum):
    none = "none"
    vision = "vision"
    text = "text"
    projections = "projections"


class _TrainPrecision(str, enum.Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"


class _ClassWeights(str, enum.Enum):
    balanced = "balanced"
    none = "none"


class _TeacherTokens(str, enum.Enum):
    cache = "cache"
    stream = "stream"


_StepsOpt = Annotated[int | None, typer.Option("--steps", min=1, help="Optimizer steps (or --epochs).")]
_EpochsOpt = Annotated[float | None, typer.Option("--epochs", min=0.0, help="Passes over the training images (default 1).")]
_GradAccumOpt = Annotated[int, typer.Option("--grad-accum", min=1, help="Micro-batches summed per optimizer step.")]
_WarmupOpt = Annotated[float, typer.Option("--warmup", min=0.0, help="Linear warmup: a fraction of the steps (<1) or a step count.")]
_MinLrOpt = Annotated[float, typer.Option("--min-lr-ratio", min=0.0, max=1.0, help="Cosine decay ends at this fraction of --lr.")]
_ClipNormOpt = Annotated[float, typer.Option("--max-grad-norm", min=0.0, help="Gradient clipping by global norm (0: off).")]
_LoraRankOpt = Annotated[int, typer.Option("--lora-rank", min=0, help="LoRA rank (0: off); merged into the weights on save.")]
_LoraAlphaOpt = Annotated[float, typer.Option("--lora-alpha", min=0.0, help="LoRA alpha (scale alpha/rank).")]
_LoraTargetsOpt = Annotated[str, typer.Option("--lora-targets", help="Comma-separated module names that get LoRA adapters.")]
_TrainDeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA when present), cpu, cuda, cuda:1 ...")]
_TrainPrecisionOpt = Annotated[_TrainPrecision, typer.Option("--precision", help="auto: bf16 autocast on CUDA, float32 on the CPU.")]
_SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the initialisation, the data order and the held-out split.")]
_SaveEveryOpt = Annotated[int, typer.Option("--save-every", min=0, help="Write a checkpoint every N steps (0: none).")]
_KeepOpt = Annotated[int, typer.Option("--keep-checkpoints", min=0, help="Newest checkpoints kept while running (0: all).")]
_ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the run in --output from its newest checkpoint.")]
_ThreadsOpt = Annotated[int | None, typer.Option("--num-threads", min=1, help="Threads decoding and preprocessing images.")]
_TbOpt = Annotated[bool | None, typer.Option("--tensorboard/--no-tensorboard", help=(
    "Also log to OUTPUT/tensorboard (default: when tensorboard is installed)."))]
_FtJsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]


def _train(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call a training API function, turning Ctrl-C and bad input into messages."""
    try:
        with api_errors():
            return fn(*args, **kwargs)
    except KeyboardInterrupt:
        interrupted("rerun the same command with --resume to continue from the newest checkpoint "
                    "(--save-every N writes them)")


def _print_result(title: str, rows: list[tuple[str, Any]], result: Any, as_json: bool) -> None:
    if as_json:
        echo_json(result.to_dict())
        return
    print_rows(title, rows)


def _before_after(before: dict[str, Any] | None, after: dict[str, Any] | None, keys: tuple[str, ...]) -> list[tuple[str, str]]:
    if before is None or after is None:
        return [("evaluation", "none (no held-out images)")]
    n = after.get("images")
    on = f" (on {n} held-out images)" if n is not None else ""
    return [(f"{k}{on}", f"{before[k]:.4f} -> {after[k]:.4f}") for k in keys if k in before and k in after]


@finetune_app.command("clip")
def clip_cmd(
    model: Annotated[str, typer.Option("--model", "-m", callback=spec_with_kind, help=(
        "The checkpoint: clip:DIR_OR_HUB_ID, siglip:... or open_clip:... (saved as open_clip again); without "
        "KIND:, found from its config file."))],
    data: Annotated[str, typer.Option("--data", "-d", help=(
        "(image, caption) data: a CSV/Parquet with image and caption columns (a split column gives the evaluation "
        "split), a folder per class (captions from --template), or hf:DATASET."))],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the fine-tuned checkpoint and metrics.")],
    steps: _StepsOpt = _FT_CLIP.steps,
    epochs: _EpochsOpt = _FT_CLIP.epochs,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=2, help="Pairs per micro-batch (the negatives).")]
    = _FT_CLIP.batch_size,
    grad_accum: _GradAccumOpt = _FT_CLIP.grad_accum,
    lr: Annotated[float, typer.Option("--lr", min=0.0, help="Peak learning rate (AdamW).")] = _FT_CLIP.lr,
    warmup: _WarmupOpt = _FT_CLIP.warmup,
    min_lr_ratio: _MinLrOpt = _FT_CLIP.min_lr_ratio,
    weight_decay: Annotated[float, typer.Option("--weight-decay", min=0.0, help="AdamW weight decay.")] = _FT_CLIP.weight_decay,
    max_grad_norm: _ClipNormOpt = _FT_CLIP.max_grad_norm,
    freeze: Annotated[_Freeze, typer.Option("--freeze", help=(
        "none, vision (freeze the image tower), text, or projections (train only projections and the logit scale)."))]
    = _Freeze(_FT_CLIP.freeze),
    lora_rank: _LoraRankOpt = _FT_CLIP.lora_rank,
    lora_alpha: _LoraAlphaOpt = _FT_CLIP.lora_alpha,
    lora_dropout: Annotated[float, typer.Option("--lora-dropout", min=0.0, max=1.0, help="Dropout on the LoRA input.")]
    = _FT_CLIP.lora_dropout,
    lora_targets: _LoraTargetsOpt = ",".join(_FT_CLIP.lora_targets),
    device: _TrainDeviceOpt = _FT_CLIP.device,
    precision: _TrainPrecisionOpt = _TrainPrecision(_FT_CLIP.precision),
    seed: _SeedOpt = _FT_CLIP.seed,
    eval_split: Annotated[str | None, typer.Option("--eval-split", help=(
        "The evaluation split (default: val/validation/valid/test when the data has splits)."))] = _FT_CLIP.eval_split,
    eval_fraction: Annotated[float, typer.Option("--eval-fraction", min=0.0, max=0.99, help=(
        "Without splits: the share of images held out for recall@1/5/10 (0: none)."))] = _FT_CLIP.eval_fraction,
    max_eval: Annotated[int | None, typer.Option("--max-eval", min=1, help="At most this many evaluation images.")]
    = _FT_CLIP.max_eval,
    eval_every: Annotated[int, typer.Option("--eval-every", min=0, help="Also evaluate every N steps (0: before and after).")]
    = _FT_CLIP.eval_every,
    save_every: _SaveEveryOpt = _FT_CLIP.save_every,
    keep_checkpoints: _KeepOpt = _FT_CLIP.keep_checkpoints,
    resume: _ResumeOpt = _FT_CLIP.resume,
    template: Annotated[list[str] | None, typer.Option("--template", help=(
        "Folder per class: caption template with {c} for the class name; repeatable (default 'a photo of a {c}.')."))]
    = None,
    image_column: Annotated[str | None, typer.Option("--image-column", help="Table/dataset column of the images.")] = None,
    caption_column: Annotated[str | None, typer.Option("--caption-column", help="Table/dataset column of the captions.")] = None,
    label_column: Annotated[str | None, typer.Option("--label-column", help="Table/dataset column of class labels.")] = None,
    num_threads: _ThreadsOpt = _FT_CLIP.num_threads,
    progress: ProgressOpt = _FT_CLIP.progress,
    tensorboard: _TbOpt = _FT_CLIP.tensorboard,
    as_json: _FtJsonOpt = False,
) -> None:
    """Contrastive fine-tuning of a CLIP, open_clip (saved as open_clip again) or SigLIP (sigmoid loss) checkpoint
    on (image, caption) data."""
    opts = ClipFinetuneOptions(
        steps=steps, epochs=epochs, batch_size=batch_size, grad_accum=grad_accum, lr=lr, warmup=warmup,
        min_lr_ratio=min_lr_ratio, weight_decay=weight_decay, max_grad_norm=max_grad_norm, freeze=freeze.value,
        lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
        lora_targets=split_csv(lora_targets), device=device,
        precision=precision.value, seed=seed, eval_split=eval_split, eval_fraction=eval_fraction, max_eval=max_eval,
        eval_every=eval_every, save_every=save_every, keep_checkpoints=keep_checkpoints, resume=resume,
        templates=tuple(template) if template else None, image_column=image_column, caption_column=caption_column,
        label_column=label_column, num_threads=num_threads, progress=progress, tensorboard=tensorboard,
    )
    r = _train(finetune_clip, model, data, output, opts)
    rows = _before_after(r.before, r.after, ("recall@1", "recall@5", "recall@10"))
    rows += [("steps", r.steps), ("final loss", None if r.final_loss is None else f"{r.final_loss:.4f}"),
             ("seconds per step", r.seconds_per_step), ("images skipped (unreadable)", r.skipped_images.get("count", 0)),
             ("split", r.split), ("saved", r.output)]
    _print_result(f"phiclip finetune clip -> {r.output}", rows, r, as_json)


@finetune_app.command("probe")
def probe_cmd(
    model: Annotated[str, typer.Option("--model", "-m", callback=spec_with_kind, help=(
        "Encoder spec (any kind: clip:, siglip:, phi3v:...; without KIND:, found from the checkpoint's config)."))],
    data: Annotated[str, typer.Option("--data", "-d", help=(
        "(image, label) data: a folder per class (optionally train/val/test split folders), a CSV/Parquet with "
        "image and label columns, or hf:DATASET."))],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for probe.safetensors and probe.json.")],
    hidden: Annotated[int, typer.Option("--hidden", min=0, help="Hidden width of a small MLP (0: linear).")] = _FT_PROBE.hidden,
    dropout: Annotated[float, typer.Option("--dropout", min=0.0, max=0.99, help="MLP dropout.")] = _FT_PROBE.dropout,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Most epochs (early stopping may end sooner).")]
    = _FT_PROBE.epochs,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Vectors per step.")] = _FT_PROBE.batch_size,
    lr: Annotated[float, typer.Option("--lr", min=0.0, help="Learning rate (AdamW).")] = _FT_PROBE.lr,
    weight_decay: Annotated[float, typer.Option("--weight-decay", min=0.0, help="AdamW weight decay.")]
    = _FT_PROBE.weight_decay,
    patience: Annotated[int, typer.Option("--patience", min=1, help="Epochs without a better validation loss before stopping.")]
    = _FT_PROBE.patience,
    class_weights: Annotated[_ClassWeights, typer.Option("--class-weights", help=(
        "balanced (inverse class frequency, for imbalanced data) or none."))] = _ClassWeights(_FT_PROBE.class_weights),
    val_split: Annotated[str | None, typer.Option("--val-split", help="The validation split by name.")] = _FT_PROBE.val_split,
    val_fraction: Annotated[float, typer.Option("--val-fraction", min=0.0, max=0.99, help=(
        "Without a validation split: the share of training images held out (stratified)."))] = _FT_PROBE.val_fraction,
    seed: _SeedOpt = _FT_PROBE.seed,
    embed_batch_size: Annotated[int, typer.Option("--embed-batch-size", min=1, help="Images per encoder call.")]
    = _FT_PROBE.embed_batch_size,
    device: _TrainDeviceOpt = _FT_PROBE.device,
    precision: QueryPrecisionOpt = QueryPrecision(_FT_PROBE.precision),
    cache_dir: Annotated[str | None, typer.Option("--cache-dir", help=(
        f"Embedding cache (default: ${CACHE_ENV}/{EMBEDDINGS_CACHE}, else $XDG_CACHE_HOME/phiclip/{EMBEDDINGS_CACHE} "
        f"or ~/.cache/phiclip/{EMBEDDINGS_CACHE})."))] = _FT_PROBE.cache_dir,
    image_column: Annotated[str | None, typer.Option("--image-column", help="Table/dataset column of the images.")] = None,
    label_column: Annotated[str | None, typer.Option("--label-column", help="Table/dataset column of the labels.")] = None,
    progress: ProgressOpt = _FT_PROBE.progress,
    as_json: _FtJsonOpt = False,
) -> None:
    """Train a linear (or small MLP) probe on frozen embeddings of any encoder."""
    opts = ProbeOptions(
        hidden=hidden, dropout=dropout, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
        patience=patience, class_weights=class_weights.value, val_split=val_split, val_fraction=val_fraction, seed=seed,
        embed_batch_size=embed_batch_size, device=device, precision=precision.value, cache_dir=cache_dir,
        image_column=image_column, label_column=label_column, progress=progress,
    )
    r = _train(train_probe, model, data, output, opts)
    rows = [("encoder", r.encoder), ("classes", r.num_classes), ("images train / val / test",
            f"{r.train_images} / {r.val_images} / {r.test_images}"), ("train accuracy", r.train_acc),
            ("validation accuracy", r.val_acc), ("test accuracy", r.test_acc),
            ("best epoch / run", f"{r.best_epoch} / {r.epochs_run}"), ("embeddings from cache", r.embeddings_from_cache),
            ("images skipped (unreadable)", r.skipped_images.get("count", 0)), ("saved", r.output)]
    _print_result(f"phiclip finetune probe -> {r.output}", rows, r, as_json)


@finetune_app.command("phi3v-adapter")
def phi3v_adapter_cmd(
    teacher: Annotated[str, typer.Option("--teacher", help="The Phi-3-vision checkpoint: phi3v:DIR_OR_HUB_ID[?num_crops=N].")],
    student: Annotated[str, typer.Option("--student", help="The student tower's checkpoint: clip:... or siglip:...")],
    data: Annotated[str, typer.Option("--data", "-d", help=(
        "Images: a folder, a quoted glob, a .txt list, a Parquet/CSV table or hf:DATASET."))],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the Phi-3-vision-compatible export and metrics.")],
    steps: _StepsOpt = _FT_ADAPTER.steps,
    epochs: _EpochsOpt = _FT_ADAPTER.epochs,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per micro-batch.")]
    = _FT_ADAPTER.batch_size,
    grad_accum: _GradAccumOpt = _FT_ADAPTER.grad_accum,
    lr: Annotated[float, typer.Option("--lr", min=0.0, help="Peak learning rate (AdamW).")] = _FT_ADAPTER.lr,
    warmup: _WarmupOpt = _FT_ADAPTER.warmup,
    weight_decay: Annotated[float, typer.Option("--weight-decay", min=0.0, help="AdamW weight decay.")]
    = _FT_ADAPTER.weight_decay,
    student_layer: Annotated[int, typer.Option("--student-layer", help=(
        "The student hidden state used: -1 last layer, -2 the one before (as Phi-3-vision), ..."))] = _FT_ADAPTER.student_layer,
    train_layers: Annotated[int, typer.Option("--train-layers", min=0, help="Also train the last N student layers.")]
    = _FT_ADAPTER.train_layers,
    lora_rank: _LoraRankOpt = _FT_ADAPTER.lora_rank,
    lora_alpha: _LoraAlphaOpt = _FT_ADAPTER.lora_alpha,
    lora_targets: _LoraTargetsOpt = ",".join(_FT_ADAPTER.lora_targets),
    cos_weight: Annotated[float, typer.Option("--cos-weight", min=0.0, help="Weight of the per-token cosine term.")]
    = _FT_ADAPTER.cos_weight,
    teacher_tokens: Annotated[_TeacherTokens, typer.Option("--teacher-tokens", help=(
        "cache: the teacher's tokens computed once to Parquet and reused; stream: recomputed every batch."))]
    = _TeacherTokens(_FT_ADAPTER.teacher_tokens),
    cache_dir: Annotated[str | None, typer.Option("--cache-dir", help=(
        f"Where the teacher-token cache goes (default: ${CACHE_ENV}/{TEACHER_TOKENS_CACHE}, else "
        f"$XDG_CACHE_HOME/phiclip/{TEACHER_TOKENS_CACHE} or ~/.cache/phiclip/{TEACHER_TOKENS_CACHE})."))] = _FT_ADAPTER.cache_dir,
    eval_fraction: Annotated[float, typer.Option("--eval-fraction", min=0.0, max=0.99, help="Share of images held out.")]
    = _FT_ADAPTER.eval_fraction,
    max_eval: Annotated[int, typer.Option("--max-eval", min=1, help="At most this many held-out images.")] = _FT_ADAPTER.max_eval,
    device: _TrainDeviceOpt = _FT_ADAPTER.device,
    precision: _TrainPrecisionOpt = _TrainPrecision(_FT_ADAPTER.precision),
    seed: _SeedOpt = _FT_ADAPTER.seed,
    save_every: _SaveEveryOpt = _FT_ADAPTER.save_every,
    keep_checkpoints: _KeepOpt = _FT_ADAPTER.keep_checkpoints,
    resume: _ResumeOpt = _FT_ADAPTER.resume,
    column: ColumnOpt = _FT_ADAPTER.column,
    split: SplitOpt = _FT_ADAPTER.split,
    num_threads: _ThreadsOpt = _FT_ADAPTER.num_threads,
    progress: ProgressOpt = _FT_ADAPTER.progress,
    tensorboard: _TbOpt = _FT_ADAPTER.tensorboard,
    as_json: _FtJsonOpt = False,
) -> None:
    """Distil a CLIP-like student tower into Phi-3-vision's image path and export it as a Phi-3-vision image embedding."""
    opts = AdapterOptions(
        steps=steps, epochs=epochs, batch_size=batch_size, grad_accum=grad_accum, lr=lr, warmup=warmup,
        weight_decay=weight_decay, student_layer=student_layer, train_layers=train_layers, lora_rank=lora_rank,
        lora_alpha=lora_alpha, lora_targets=split_csv(lora_targets),
        cos_weight=cos_weight, teacher_tokens=teacher_tokens.value, cache_dir=cache_dir, eval_fraction=eval_fraction,
        max_eval=max_eval, device=device, precision=precision.value, seed=seed, save_every=save_every,
        keep_checkpoints=keep_checkpoints, resume=resume, column=column, split=split, num_threads=num_threads,
        progress=progress, tensorboard=tensorboard,
    )
    r = _train(distill_phi3v_adapter, teacher, student, data, output, opts)
    rows = _before_after(r.before, r.after, ("token_cosine", "r2"))
    if r.after is not None:
        rows.append(("mean-token baseline cosine (R^2 0)", f"{r.after['mean_token_cosine']:.4f}"))
    rows += [(k.replace("_", " "), v) for k, v in r.speed.items()]
    rows += [("steps", r.steps), ("final loss", None if r.final_loss is None else f"{r.final_loss:.4f}"),
             ("seconds per step", r.seconds_per_step), ("teacher tokens from cache", r.teacher_tokens_from_cache),
             ("images skipped (unreadable)", r.skipped_images.get("count", 0)), ("exported", r.output)]
    rows += [("warning", w) for w in r.warnings]
    _print_result(f"phiclip finetune phi3v-adapter -> {r.output}", rows, r, as_json)


def classify_cmd(
    probe: Annotated[Path, typer.Option("--probe", "-p", help="A folder written by `phiclip finetune probe`.")],
    input: Annotated[str, typer.Option("--input", "-i", help=(
        "Images: a folder, a quoted glob, a .txt list, a Parquet/CSV table or hf:DATASET."))],
    output: Annotated[Path, typer.Option("--output", "-o", help="The Parquet file: id, source, label, score, top_k, error.")],
    model: Annotated[str | None, typer.Option("--model", "-m", help=(
        "The encoder you expect; refused when the probe was trained on another one."))] = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Labels kept per image in top_k.")] = 5,
    embeddings: Annotated[Path | None, typer.Option("--embeddings", help=(
        "Folder for the embeddings (default: OUTPUT's name + .embeddings); a rerun resumes or reuses it."))] = None,
    batch_size: BatchOpt = 64,
    num_workers: WorkersOpt = None,
    device: QueryDeviceOpt = "auto",
    precision: QueryPrecisionOpt = QueryPrecision.auto,
    column: ColumnOpt = None,
    split: SplitOpt = "train",
    progress: ProgressOpt = True,
    as_json: _FtJsonOpt = False,
) -> None:
    """Classify every image of INPUT with a trained probe (embedding through the bulk pipeline)."""
    r = _train(classify, probe, input, output, model=model, top_k=top_k, embeddings=embeddings, device=device,
                      precision=precision.value, batch_size=batch_size, num_workers=num_workers, column=column,
                      split=split, progress=progress)
    rows = [("rows", r.rows), ("classified", r.classified), ("failed (see the error column)", r.failed),
            ("embeddings", r.embeddings), ("seconds", r.seconds), ("written", r.output)]
    _print_result(f"phiclip classify -> {r.output}", rows, r, as_json)

