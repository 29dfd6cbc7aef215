"""Contrastive image-text fine-tuning of a CLIP or open_clip CLIP (softmax loss) or SigLIP (sigmoid loss)
checkpoint.

:func:`finetune_clip` loads the checkpoint through :func:`phiclip.encoders.load_encoder` (so the
preprocessing is exactly the one ``phiclip embed`` applies, and weights come from safetensors only),
reads (image, caption) data through :mod:`phiclip.finetune.data`, trains, and writes a
``save_pretrained`` folder that ``phiclip embed --model clip:OUT`` and ``CLIPModel.from_pretrained``
load as they are (an ``open_clip:`` model: an open_clip folder again, ``open_clip_model.safetensors`` and
the source's ``open_clip_config.json``, that ``open_clip:OUT`` loads with the same preprocessing and
tokenizer and open_clip's ``create_model_from_pretrained("local-dir:OUT")`` loads too), with ``metrics.json`` (retrieval recall@1/5/10 before and after, loss, steps, time)
and ``metrics.jsonl`` (one line per step).

The loss of a batch of n (image, caption) pairs: CLIP's symmetric cross-entropy over the n x n
similarities times ``exp(logit_scale)``, or SigLIP's pairwise sigmoid loss with ``logit_bias``.
Pairs in a batch whose captions are the same text count as positives of each other: SigLIP's
pairwise loss would otherwise push a text away from an image and pull the identical text towards it
(for CLIP's softmax the spread targets give the same loss as one positive each).
With ``grad_accum`` the loss is computed per micro-batch (negatives come from the micro-batch).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from phiclip.encoders import Encoder, EncoderSpec, load_encoder
from phiclip.encoders.clip import _pooled as _pooled_output
from phiclip.encoders.clip_preprocessing import pil_backend_kwarg
from phiclip.encoders.registry import resolve_spec
from phiclip.evaluate import retrieval_metrics
from phiclip.finetune.common import (
    TrainingError,
    autocast_for,
    batch_positions,
    options_identity,
    prepare_output,
    resolve_device,
    seed_everything,
    torch_runtime,
)
from phiclip.finetune.data import (
    ImageBatchLoader,
    SkippedImages,
    data_fingerprint,
    load_training_data,
    train_eval_split,
)
from phiclip.finetune.loop import LoopSettings, TrainingMode, finish_run, run_training
from phiclip.inputs import LabelledData

FREEZE_CHOICES = ("none", "vision", "text", "projections")
#: The kinds :func:`finetune_clip` trains (``open_clip``: on transformers' CLIPModel, saved as open_clip again).
CONTRASTIVE_KINDS = ("clip", "siglip", "open_clip")
#: The options that do not change the loss curve (left out of the identity compared on resume).
_NOT_IDENTITY = frozenset({"resume", "progress", "tensorboard", "save_every", "keep_checkpoints", "num_threads",
                           "device", "eval_every"})


@dataclass
class ClipFinetuneOptions:
    """Every setting of :func:`finetune_clip`, with its default (declared here only)."""

    #: Optimizer steps (one step = ``batch_size * grad_accum`` pairs); or give ``epochs``.
    steps: int | None = None
    #: Passes over the training images (default 1 when ``steps`` is not given); may be fractional.
    epochs: float | None = None
    #: Pairs per micro-batch (the contrastive negatives of each pair).
    batch_size: int = 32
    #: Micro-batches whose gradients are summed before each optimizer step.
    grad_accum: int = 1
    #: Peak learning rate (AdamW).
    lr: float = 1e-5
    #: Linear warmup: a fraction of the steps (below 1) or a number of steps.
    warmup: float = 0.05
    #: The cosine decay ends at ``min_lr_ratio * lr``.
    min_lr_ratio: float = 0.0
    #: AdamW weight decay (not applied to biases, norms, embeddings' 1-d tensors or the logit scale).
    weight_decay: float = 0.1
    #: Gradient clipping by global norm (0: off).
    max_grad_norm: float = 1.0
    #: ``none``, ``vision`` (freeze the image tower), ``text``, or ``projections`` (train only the
    #: projections/heads and the logit scale).
    freeze: str = "none"
    #: LoRA rank (0: off). LoRA adapters go on ``lora_targets`` of the unfrozen towers and are merged
    #: into the weights on save.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    #: ``auto`` (CUDA when present), ``cpu``, ``cuda``...
    device: str = "auto"
    #: ``auto`` (bf16 autocast on CUDA, float32 on the CPU), ``float32``, ``bfloat16``.
    precision: str = "auto"
    seed: int = 0
    #: The evaluation split by name (default: val/validation/valid/test when the data has splits).
    eval_split: str | None = None
    #: Without splits in the data: the share of images held out for evaluation (0: none).
    eval_fraction: float = 0.1
    #: At most this many evaluation images (a seeded sample).
    max_eval: int | None = 5000
    #: Evaluate every N steps too (0: before and after only).
    eval_every: int = 0
    #: Write a checkpoint every N steps (0: none).
    save_every: int = 0
    #: Checkpoints kept (the newest); they are deleted when the run completes.
    keep_checkpoints: int = 2
    #: Continue the run in ``output`` from its newest checkpoint.
    resume: bool = False
    #: For a folder per class: caption templates with ``{c}`` (default ``a photo of a {c}.``).
    templates: tuple[str, ...] | None = None
    image_column: str | None = None
    label_column: str | None = None
    caption_column: str | None = None
    #: Threads that decode and preprocess images (default: torch's thread count).
    num_threads: int | None = None
    progress: bool = True
    #: Also log to TensorBoard (``None``: when installed).
    tensorboard: bool | None = None

    def validate(self) -> ClipFinetuneOptions:
        """Check ranges and choices; returns self."""
        if self.batch_size < 2:
            raise TrainingError(f"--batch-size must be at least 2 (contrastive loss needs negatives), got {self.batch_size}")
        if self.grad_accum < 1:
            raise TrainingError(f"--grad-accum must be at least 1, got {self.grad_accum}")
        if self.lr <= 0:
            raise TrainingError(f"--lr must be positive, got {self.lr}")
        if self.freeze not in FREEZE_CHOICES:
            raise TrainingError(f"--freeze must be one of {', '.join(FREEZE_CHOICES)}, got {self.freeze!r}")
        if self.lora_rank < 0:
            raise TrainingError(f"--lora-rank must be >= 0, got {self.lora_rank}")
        if self.lora_rank and self.freeze == "projections":
            raise TrainingError("--lora-rank trains adapters in the towers, --freeze projections freezes them; pick one")
        if self.lora_rank and not self.lora_targets:
            raise TrainingError("--lora-targets names no module")
        if self.save_every < 0 or self.eval_every < 0:
            raise TrainingError("--save-every and --eval-every must be >= 0")
        return self

    def identity(self) -> dict[str, Any]:
        """The settings that decide the loss curve (a resumed run must have the same)."""
        return options_identity(self, _NOT_IDENTITY)


@dataclass
class ClipFinetuneResult:
    """What a run did (also written to ``metrics.json``)."""

    output: Path
    model: str
    steps: int
    resumed_from: int | None
    before: dict[str, float] | None
    after: dict[str, float] | None
    final_loss: float | None
    seconds: float
    seconds_per_step: float | None
    train_images: int
    eval_images: int
    split: str
    skipped_images: dict[str, Any] = field(default_factory=dict)
    trainable_parameters: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        d = dataclasses.asdict(self)
        d["output"] = str(self.output)
        return d


# --- model pieces ------------------------------------------------------------------------------
def _towers(model: Any) -> dict[str, list[str]]:
    """Parameter-name prefixes of each part, for CLIP and SigLIP."""
    if hasattr(model, "visual_projection"):  # CLIP
        return {
            "vision": ["vision_model.", "visual_projection."],
            "text": ["text_model.", "text_projection."],
            "projections": ["visual_projection.", "text_projection.", "logit_scale"],
        }
    return {  # SigLIP: the heads are the projections
        "vision": ["vision_model."],
        "text": ["text_model."],
        "projections": ["vision_model.head.", "text_model.head.", "logit_scale", "logit_bias"],
    }


def _strip_peft(name: str) -> str:
    return name[len("base_model.model."):] if name.startswith("base_model.model.") else name


def apply_freeze(model: Any, freeze: str) -> None:
    """Set ``requires_grad`` by the ``freeze`` choice (LoRA-wrapped models: only adapters train)."""
    parts = _towers(model)
    for name, p in model.named_parameters():
        plain = _strip_peft(name)
        if "lora_" in name:
            p.requires_grad = True
            continue
        if freeze == "projections":
            p.requires_grad = any(plain.startswith(x) for x in parts["projections"])
        elif freeze in ("vision", "text"):
            p.requires_grad = not any(plain.startswith(x) for x in parts[freeze])
        else:
            p.requires_grad = True


def add_lora(model: Any, opts: ClipFinetuneOptions) -> Any:
    """Wrap ``model`` with peft LoRA adapters on ``lora_targets`` of the towers not frozen; the
    base weights are frozen (the logit scale still trains)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise TrainingError("--lora-rank needs peft: pip install 'phiclip[train]' (or pip install peft)") from None
    towers = {"vision": "vision_model", "text": "text_model"}
    keep = [t for name, t in towers.items() if opts.freeze != name]
    targets = "|".join(opts.lora_targets)
    pattern = rf".*({'|'.join(keep)})\..*\.({targets})$"
    found = [n for n, _ in model.named_modules() if re.fullmatch(pattern, n)]
    if not found:
        raise TrainingError(f"--lora-targets {', '.join(opts.lora_targets)} matches no module of the {', '.join(keep)} tower(s); "
                            "use module names such as q_proj, k_proj, v_proj, out_proj, fc1, fc2")
    config = LoraConfig(r=opts.lora_rank, lora_alpha=opts.lora_alpha, lora_dropout=opts.lora_dropout,
                        target_modules=pattern, bias="none")
    with warnings.catch_warnings():  # peft calls a transformers method deprecated in transformers 5
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        wrapped = get_peft_model(model, config)
    for name, p in wrapped.named_parameters():
        if _strip_peft(name) in ("logit_scale", "logit_bias"):
            p.requires_grad = True
    return wrapped


def _base(model: Any) -> Any:
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def features(model: Any, pixel_values: Any = None, text: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """L2-normalised ``(image (n, d), text (m, d))`` features (either may be None)."""
    import torch.nn.functional as F

    base = _base(model)
    img = txt = None
    if pixel_values is not None:
        img = F.normalize(_pooled_output(base.get_image_features(pixel_values=pixel_values)).float(), dim=-1)
    if text is not None:
        txt = F.normalize(_pooled_output(base.get_text_features(**text)).float(), dim=-1)
    return img, txt


def contrastive_loss(img: Any, txt: Any, logit_scale: Any, logit_bias: Any | None, same_text: Any) -> Any:
    """The batch loss from normalised features ``(n, d)``; ``same_text`` (n, n) bool marks pairs whose
    captions are identical (the diagonal included). CLIP (``logit_bias`` None): symmetric
    cross-entropy with the targets spread over identical captions. SigLIP: ``-log sigmoid(z * l)``
    summed over each text's row and averaged, with ``z = +1`` for positives and ``-1`` otherwise."""
    import torch
    import torch.nn.functional as F

    logits = txt @ img.T * logit_scale.exp()  # (n texts, n images)
    pos = same_text.to(logits.dtype)
    if logit_bias is None:
        target = pos / pos.sum(dim=1, keepdim=True)
        t2i = -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
        i2t = -(target.T * F.log_softmax(logits.T, dim=1)).sum(dim=1).mean()
        return (t2i + i2t) / 2
    logits = logits + logit_bias
    signs = 2 * pos - 1
    return -torch.nn.functional.logsigmoid(signs * logits).sum(dim=1).mean()


class _Texts:
    """Tokenises captions the way the encoder does for ``encode_texts``."""

    def __init__(self, encoder: Encoder, device: Any) -> None:
        self.tokenizer = encoder.tokenizer
        self.padding = encoder.text_padding
        self.max_length = encoder.text_max_length
        self.device = device

    def __call__(self, texts: Sequence[str]) -> dict[str, Any]:
        enc = self.tokenizer(list(texts), padding=self.padding, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


def evaluate_retrieval(model: Any, loader: ImageBatchLoader, ds: LabelledData, texts: _Texts, device: Any, amp: Any,
                       batch_size: int = 64) -> dict[str, float]:
    """Image-text retrieval recall@1/5/10 (both directions, and their mean) on ``ds``, and ``images``: how
    many of its images were read (the metrics are over those)."""
    import torch

    model.eval()
    imgs, kept_all = [], []
    with torch.no_grad(), amp:
        for s in range(0, len(ds), batch_size):
            kept, items = loader.load(range(s, min(s + batch_size, len(ds))))
            if items:
                img, _ = features(model, torch.stack(items).to(device))
                imgs.append(img.float().cpu())
                kept_all.extend(kept)
        if not kept_all:
            raise TrainingError(f"{ds.source}: no evaluation image could be read")
        captions = [(j, t) for j, i in enumerate(kept_all) for t in ds.captions[i]]  # type: ignore[index]
        txts = []
        for s in range(0, len(captions), batch_size):
            _, txt = features(model, text=texts([t for _, t in captions[s : s + batch_size]]))
            txts.append(txt.float().cpu())
    metrics = retrieval_metrics(torch.cat(imgs).numpy(), torch.cat(txts).numpy(), np.asarray([j for j, _ in captions]))
    for k in (1, 5, 10):
        metrics[f"recall@{k}"] = (metrics[f"image_retrieval_recall@{k}"] + metrics[f"text_retrieval_recall@{k}"]) / 2
    return {**{k: round(float(v), 6) for k, v in metrics.items()}, "images": len(kept_all)}


def _optimizer(model: Any, lr: float, weight_decay: float) -> Any:
    import torch

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "logit_" in name or "norm" in name else decay).append(p)
    if not decay and not no_decay:
        raise TrainingError("nothing to train: every parameter is frozen")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


def _caption_choice(ds: LabelledData, items: np.ndarray, epochs: np.ndarray, seed: int) -> list[str]:
    """One caption per item, drawn from ``(seed, epoch, item)`` (the same on every run)."""
    out = []
    for i, e in zip(items.tolist(), epochs.tolist()):
        caps = ds.captions[i]  # type: ignore[index]
        k = 0 if len(caps) == 1 else int(np.random.default_rng([seed, e, i, 7]).integers(len(caps)))
        out.append(caps[k])
    return out


def save_model(model: Any, encoder_location: str, tokenizer: Any, output: Path) -> None:
    """Merge LoRA (if any) and write ``save_pretrained`` files: model (safetensors), image processor,
    tokenizer."""
    from transformers import AutoImageProcessor

    base = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    base.save_pretrained(str(output))
    AutoImageProcessor.from_pretrained(encoder_location, **pil_backend_kwarg()).save_pretrained(str(output))
    tokenizer.save_pretrained(str(output))


def save_open_clip_model(model: Any, encoder: Encoder, output: Path) -> None:
    """Merge LoRA (if any) and write an ``open_clip:`` checkpoint again: ``open_clip_model.safetensors``
    and the source's ``open_clip_config.json`` unchanged (its ``preprocess_cfg`` and tokenizer settings:
    ``open_clip:OUT`` preprocesses and tokenizes as the source did; open_clip itself loads it too)."""
    from phiclip.open_clip.export import save_finetuned_open_clip  # lazy: loads torch and safetensors

    base = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    save_finetuned_open_clip(base, dict(encoder.checkpoint.config), output)


# --- the run -------------------------------------------------------------------------------------
class ClipTraining(TrainingMode):
    """Contrastive training of a CLIP/SigLIP model as a :class:`~phiclip.finetune.loop.TrainingMode`:
    micro-batch ``m`` is the pairs at stream positions ``[m * batch_size, (m + 1) * batch_size)``
    (:func:`~phiclip.finetune.common.batch_positions`), one caption each; evaluation is retrieval
    recall on the held-out pairs."""

    def __init__(self, encoder: Encoder, opts: ClipFinetuneOptions, train: LabelledData, held: LabelledData | None,
                 spec: EncoderSpec, device: Any, amp: Any, skipped: SkippedImages) -> None:
        self.opts, self.train, self.held, self.spec, self.device, self.amp = opts, train, held, spec, device, amp
        self.location = str(encoder.checkpoint.location)  # the opened checkpoint (a hub id: its pinned snapshot)
        self.tokenizer = encoder.tokenizer
        self.encoder = encoder
        net = encoder.model
        apply_freeze(net, opts.freeze)
        if opts.lora_rank:
            net = add_lora(net, opts)
        net.to(device)
        self.net = net
        self.trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
        self.optimizer = _optimizer(net, opts.lr, opts.weight_decay)
        self.base = _base(net)
        self.is_siglip = not hasattr(self.base, "visual_projection")
        prep = encoder.preprocessor
        self.loader = ImageBatchLoader(train.images, prep, keep_alpha=encoder.keeps_alpha, threads=opts.num_threads,
                                       skipped=skipped)
        self.eval_loader = None if held is None else ImageBatchLoader(held.images, prep, keep_alpha=encoder.keeps_alpha,
                                                                      threads=opts.num_threads)
        self.texts = _Texts(encoder, device)

    def micro_batch_loss(self, index: int) -> tuple[Any, int] | None:
        import torch

        opts = self.opts
        items, epochs = batch_positions(len(self.train), opts.seed, index * opts.batch_size, opts.batch_size)
        kept, pixels = self.loader.load(items)
        if len(kept) < 2:
            return None  # nothing to contrast (the batch's images could not be read)
        keep = np.isin(items, kept)
        caps = _caption_choice(self.train, items[keep], epochs[keep], opts.seed)
        with self.amp:
            img, txt = features(self.net, torch.stack(pixels).to(self.device), self.texts(caps))
            same = torch.tensor([[a == b for b in caps] for a in caps], device=self.device)
            bias = self.base.logit_bias if self.is_siglip else None
            loss = contrastive_loss(img, txt, self.base.logit_scale, bias, same)
        return loss, len(kept)

    def after_step(self) -> None:
        import torch

        with torch.no_grad():
            self.base.logit_scale.clamp_(max=math.log(100.0))

    def evaluate(self) -> dict[str, Any] | None:
        if self.held is None or self.eval_loader is None:
            return None
        return evaluate_retrieval(self.net, self.eval_loader, self.held, self.texts, self.device, self.amp)

    def step_record(self, step: int, images: int) -> dict[str, Any]:
        epoch = step * self.opts.batch_size * self.opts.grad_accum / len(self.train)
        return {"epoch": round(epoch, 4), "images": images}

    def export(self, output: Path) -> None:
        if self.spec.kind == "open_clip":
            save_open_clip_model(self.net, self.encoder, output)
        else:
            save_model(self.net, self.location, self.tokenizer, output)

    def close(self) -> None:
        self.loader.close()
        if self.eval_loader is not None:
            self.eval_loader.close()


def finetune_clip(
    model: str,
    data: str | Path | LabelledData,
    output: str | Path,
    options: ClipFinetuneOptions | None = None,
    *,
    on_step: Callable[[int, float], None] | None = None,
    **settings: Any,
) -> ClipFinetuneResult:
    """Fine-tune a CLIP or SigLIP checkpoint on (image, caption) data.

    Args:
        model: ``clip:HUB_ID_OR_DIR``, ``siglip:...`` or ``open_clip:...`` (without ``KIND:``, the
            kind found from the checkpoint's config file). A ``clip:`` / ``siglip:`` model is saved with
            ``save_pretrained`` (model, image processor, tokenizer); an ``open_clip:`` model as an
            open_clip checkpoint again (``open_clip_model.safetensors`` and the source's
            ``open_clip_config.json``), which ``open_clip:OUTPUT`` loads with the same preprocessing
            and tokenizer.
        data: a CSV/Parquet with image and caption columns (a ``split`` column gives the
            evaluation split), a folder per class (captions from ``templates``), ``hf:NAME``.
        output: the folder for the fine-tuned checkpoint, ``metrics.json``, ``metrics.jsonl`` and
            ``checkpoints/`` while running.
        options: :class:`ClipFinetuneOptions`; ``settings`` override its fields by name.
        on_step: called as ``on_step(step, loss)`` after every optimizer step.

    Raises:
        TrainingError / DataError / ValueError: bad options, data or model, naming the fix.
    """
    opts = dataclasses.replace(options or ClipFinetuneOptions(), **settings).validate()
    t_start = time.perf_counter()
    spec = resolve_spec(model)
    if spec.kind not in CONTRASTIVE_KINDS:
        raise TrainingError(f"{model}: contrastive fine-tuning takes a {', '.join(k + ':' for k in CONTRASTIVE_KINDS)} "
                            f"checkpoint, not {spec.kind}:")
    output = Path(output)
    device = resolve_device(opts.device)
    amp = autocast_for(device, opts.precision)

    ds = load_training_data(data, need="captions", templates=opts.templates, image_column=opts.image_column,
                            label_column=opts.label_column, caption_column=opts.caption_column)
    train, held, how = train_eval_split(ds, eval_split=opts.eval_split, eval_fraction=opts.eval_fraction,
                                        seed=opts.seed, max_eval=opts.max_eval)
    identity = {"model": str(spec), "train_data": data_fingerprint(train),
                "eval_data": None if held is None else data_fingerprint(held), "options": opts.identity()}
    ckpt = prepare_output(output, opts.resume, identity)
    output.mkdir(parents=True, exist_ok=True)

    # Torch runs both towers unless the spec says otherwise: a compiled runtime cannot follow training.
    encoder = load_encoder(str(torch_runtime(spec)), device=str(device), dtype="float32")
    if encoder.tokenizer is None:
        raise TrainingError(f"{model}: no tokenizer could be loaded ({encoder.text_unavailable}); contrastive training needs text")
    if (getattr(encoder, "open_clip_info", None) or {}).get("logit_bias") is not None:
        raise TrainingError(f"{model}: this open_clip checkpoint has a logit_bias (trained with a sigmoid loss); "
                            "phiclip fine-tunes open_clip checkpoints with CLIP's softmax loss only")
    encoder.share_model_weights_()  # the image path follows training (and no packed inference copy is held)
    seed_everything(opts.seed)
    skipped = SkippedImages()
    mode = ClipTraining(encoder, opts, train, held, spec, device, amp, skipped)
    loop = LoopSettings.from_options(opts, len(train), f"finetune {spec.kind}")
    run = run_training(mode, output, loop, identity=identity, checkpoint=ckpt, skipped=skipped, on_step=on_step)
    total = loop.total_steps
    result = ClipFinetuneResult(
        output=output, model=str(spec), steps=total, resumed_from=run.resumed_from,
        before=run.before, after=run.after, final_loss=run.final_loss, seconds=round(time.perf_counter() - t_start, 3),
        seconds_per_step=round(run.train_seconds / total, 4) if total else None, train_images=len(train),
        eval_images=0 if held is None else len(held), split=how, skipped_images=skipped.summary(),
        trainable_parameters=int(mode.trainable),
    )
    finish_run(output, {**result.to_dict(), "options": opts.identity()})
    return result


__all__ = ["CONTRASTIVE_KINDS", "FREEZE_CHOICES", "ClipFinetuneOptions", "ClipFinetuneResult", "ClipTraining",
           "contrastive_loss", "finetune_clip"]
