"""Load one encoder, embed the compared images and texts, and measure what that cost.

:func:`measure_model` does the work in the calling process. :func:`measure_in_subprocess` runs
it in a fresh Python process (``python -m phiclip.comparison.measure JOBDIR``) so that each
encoder's peak memory is its own: a process's resident-set high-water mark (``VmHWM``) only
grows, and memory an earlier model freed can stay with the allocator and be reused unseen, so
in one process the second model's peak would be blurred by the first. The subprocess costs one
more import of torch and transformers (a few seconds), which is not counted in any timing.

Timings: ``load_s`` is ``load_encoder`` alone: torch, transformers and the model classes the
encoder uses are imported first (timed apart as ``import_s``, as the first import of that code in
a process costs seconds that are not the model's);
preprocessing (decode + the encoder's own preprocess) and model time (collate + forward, with a
CUDA synchronise) are timed separately per batch; one warm-up batch runs untimed first.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from phiclip.comparison.results import Cost, TokenCount

_MB = float(2**20)


class CompareError(RuntimeError):
    """A model could not be measured; the message names the model and the reason."""


@dataclass
class MeasureJob:
    """What to measure for one encoder. ``sources`` are image file paths in the compared order;
    ``texts`` (unique captions) are embedded when the encoder has a text side, and a zero-shot
    classifier is built from ``classnames`` x ``templates`` likewise."""

    spec: str
    sources: list[str]
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 16
    texts: list[str] | None = None
    classnames: list[str] | None = None
    templates: list[str] = field(default_factory=list)


@dataclass
class Measured:
    """The vectors and costs of one encoder. ``image_embeddings`` ``(n, dim)``; ``text_embeddings``
    ``(len(job.texts), dim)`` or ``None``; ``zero_shot_weights`` ``(len(classnames), dim)`` or
    ``None``; ``skipped`` gives the reason for each of those left out."""

    image_embeddings: np.ndarray
    text_embeddings: np.ndarray | None
    zero_shot_weights: np.ndarray | None
    cost: Cost
    description: dict[str, Any]
    skipped: dict[str, str] = field(default_factory=dict)


# --- memory ------------------------------------------------------------------------------------


def _status_kb(key: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (Linux), or ``None`` where there is none."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def current_rss_mb() -> float | None:
    """This process's resident set now, MiB (``None`` off Linux)."""
    kb = _status_kb("VmRSS")
    return kb / 1024.0 if kb is not None else None


def peak_rss_mb() -> float | None:
    """This process's resident-set high-water mark, MiB (``VmHWM``, else ``getrusage``)."""
    kb = _status_kb("VmHWM")
    if kb is not None:
        return kb / 1024.0
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, OSError):  # pragma: no cover - platforms without resource
        return None
    return peak / _MB if sys.platform == "darwin" else peak / 1024.0  # bytes on macOS, KiB elsewhere


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current resident set (Linux: write 5 to ``/proc/self/clear_refs``).
    Returns whether it could."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


# --- measuring -----------------------------------------------------------------------------------


def _count_parameters(encoder: Any, description: dict[str, Any]) -> int | None:
    """Parameters of the image side (what turns an image into its vector): the count the encoder
    reports in ``describe()`` (``num_image_parameters``, else ``parameters``, else
    ``num_parameters``), else the sum over the torch modules it holds as attributes."""
    for key in ("num_image_parameters", "parameters", "num_parameters"):
        reported = description.get(key)
        if isinstance(reported, (int, float)) and not isinstance(reported, bool):
            return int(reported)
    import torch

    seen: set[int] = set()
    total = 0
    for value in vars(encoder).values():
        if isinstance(value, torch.nn.Module):
            for p in value.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    total += p.numel()
    return total or None


def _image_tokens(encoder: Any, width: int, height: int) -> int | None:
    """Image tokens an image of this size becomes, where the encoder says
    (Phi-3-vision's ``tokens_per_image(width, height)``); ``None`` for others."""
    fn = getattr(encoder, "tokens_per_image", None)
    if callable(fn):
        value = fn(width, height)
        return int(value) if value is not None else None
    return None


#: transformers classes each kind of encoder builds; imported before ``load_s`` starts so that
#: the load time is the model's, not a first import of its code (timed apart as ``import_s``).
_MODEL_CODE: dict[str, tuple[str, ...]] = {
    "clip": ("CLIPModel", "CLIPProcessor", "CLIPTokenizer", "CLIPImageProcessor"),
    "siglip": ("SiglipModel", "SiglipProcessor", "SiglipTokenizer", "SiglipImageProcessor"),
    "phi3v": ("CLIPVisionModel", "CLIPVisionConfig"),
}


def _import_model_code(spec: str) -> float:
    """Import the encoder's module and the transformers classes it uses; returns the seconds taken."""
    import importlib

    import transformers

    from phiclip.encoders import parse_spec

    t = time.perf_counter()
    kind = parse_spec(spec).kind
    importlib.import_module("phiclip.encoders.phi3v" if kind == "phi3v" else "phiclip.encoders.clip")
    for name in _MODEL_CODE.get(kind, ()):
        try:
            getattr(transformers, name)
        except (AttributeError, ImportError):  # an optional class this install lacks: timed in load_s
            pass
    return time.perf_counter() - t


def _sync(device: Any) -> None:
    import torch

    if getattr(device, "type", None) == "cuda":
        torch.cuda.synchronize(device)


def measure_model(job: MeasureJob, *, memory_scope: str = "in-process") -> Measured:
    """Load ``job.spec``, embed ``job.sources`` (and texts), and measure load time, throughput,
    crops, tokens per image size and peak memory.

    Raises:
        CompareError: when the encoder cannot be loaded or an image cannot be processed.
    """
    import torch
    import transformers  # noqa: F401 - imported before the clock starts, so load_s is the model alone

    from phiclip.encoders import load_encoder, resolve_device_dtype
    from phiclip.images import load_image

    if not job.sources:
        raise CompareError(f"{job.spec}: no images to embed")
    if job.batch_size < 1:
        raise CompareError(f"batch size must be at least 1, got {job.batch_size}")
    device, _ = resolve_device_dtype(job.device, job.dtype)
    on_cuda = device.type == "cuda"
    gc.collect()
    if on_cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    if memory_scope == "in-process":
        reset_peak_rss()
    import_s = _import_model_code(job.spec)
    baseline_rss = current_rss_mb()

    t0 = time.perf_counter()
    try:
        encoder = load_encoder(job.spec, device=job.device, dtype=job.dtype)
    except Exception as e:  # noqa: BLE001 - every loading failure becomes one message naming the model
        raise CompareError(f"{job.spec}: could not load the encoder ({type(e).__name__}: {e})") from e
    _sync(device)
    load_s = time.perf_counter() - t0
    description = json.loads(json.dumps(encoder.describe(), default=str))

    preprocess_s = 0.0
    encode_s = 0.0
    crops_total = 0
    by_size: dict[tuple[int, int], list[int | None]] = {}
    sizes_count: dict[tuple[int, int], int] = {}
    chunks: list[np.ndarray] = []
    n = len(job.sources)
    warmed = False
    with torch.inference_mode():
        for start in range(0, n, job.batch_size):
            t = time.perf_counter()
            items = []
            for src in job.sources[start : start + job.batch_size]:
                image = load_image(src, keep_alpha=encoder.keeps_alpha)
                try:
                    item = encoder.preprocess(image)
                except Exception as e:  # noqa: BLE001 - name the image and the model
                    raise CompareError(f"{job.spec}: could not preprocess {src} ({type(e).__name__}: {e})") from e
                items.append(item)
                crops = int(encoder.item_cost(item))
                crops_total += crops
                size = image.size
                sizes_count[size] = sizes_count.get(size, 0) + 1
                if size not in by_size:
                    by_size[size] = [crops, _image_tokens(encoder, *size)]
            preprocess_s += time.perf_counter() - t
            try:
                if not warmed:  # one untimed batch: lazy initialisation, kernel selection, caches
                    encoder.encode_batch(encoder.collate(items))
                    _sync(device)
                    warmed = True
                t = time.perf_counter()
                out = encoder.encode_batch(encoder.collate(items))
                _sync(device)
                encode_s += time.perf_counter() - t
            except Exception as e:  # noqa: BLE001 - e.g. out of memory: name the model and the batch
                first = job.sources[start]
                raise CompareError(
                    f"{job.spec}: encoding the batch starting at {first} failed ({type(e).__name__}: {e}); "
                    "a smaller --batch-size may help"
                ) from e
            chunks.append(np.asarray(out.embeddings, dtype=np.float32))
    image_emb = np.concatenate(chunks, axis=0)

    skipped: dict[str, str] = {}
    text_emb = None
    zs_weights = None
    text_s = None
    has_text = "text" in getattr(encoder, "modalities", frozenset())
    if job.texts:
        if has_text:
            t = time.perf_counter()
            with torch.inference_mode():
                text_emb = np.asarray(encoder.encode_texts(list(job.texts)), dtype=np.float32)
            _sync(device)
            text_s = time.perf_counter() - t
        else:
            skipped["retrieval"] = f"{encoder.name} has no text side (it embeds images only)"
    if job.classnames:
        if has_text:
            from phiclip.evaluate import zero_shot_classifier

            with torch.inference_mode():
                zs_weights = np.asarray(zero_shot_classifier(encoder, job.classnames, job.templates), dtype=np.float32)
        else:
            skipped["zero_shot"] = f"{encoder.name} has no text side (it embeds images only)"

    peak = peak_rss_mb()
    gpu_peak = torch.cuda.max_memory_allocated(device) / _MB if on_cuda else None
    tokens = [
        TokenCount(width=w, height=h, images=sizes_count[(w, h)], crops=v[0] or 0, tokens=v[1])
        for (w, h), v in sorted(by_size.items(), key=lambda kv: (kv[0][0] * kv[0][1], kv[0]))
    ]
    cost = Cost(
        dim=int(image_emb.shape[1]),
        parameters=_count_parameters(encoder, description),
        device=str(description.get("device", device)),
        dtype=str(description.get("dtype", job.dtype)),
        batch_size=job.batch_size,
        import_s=import_s,
        load_s=load_s,
        preprocess_s=preprocess_s,
        encode_s=encode_s,
        images=n,
        crops=crops_total,
        images_per_s=n / encode_s if encode_s > 0 else 0.0,
        crops_per_s=crops_total / encode_s if encode_s > 0 else 0.0,
        end_to_end_images_per_s=n / (encode_s + preprocess_s) if encode_s + preprocess_s > 0 else 0.0,
        text_encode_s=text_s,
        peak_rss_mb=peak,
        baseline_rss_mb=baseline_rss,
        gpu_peak_mb=gpu_peak,
        memory_scope=memory_scope,
        tokens_by_size=tokens,
    )
    del encoder
    gc.collect()
    if on_cuda:
        torch.cuda.empty_cache()
    return Measured(image_emb, text_emb, zs_weights, cost, description, skipped)


# --- the subprocess ------------------------------------------------------------------------------


def _cost_from_dict(d: dict[str, Any]) -> Cost:
    d = dict(d)
    d["tokens_by_size"] = [TokenCount(**t) for t in d.get("tokens_by_size", [])]
    return Cost(**d)


def measure_in_subprocess(job: MeasureJob, workdir: str | Path, *, timeout_s: float | None = None) -> Measured:
    """Run :func:`measure_model` for ``job`` in a fresh Python process; files go to ``workdir``.

    Raises:
        CompareError: with the child's message when it failed, or its last output lines when it crashed.
    """
    import subprocess

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    (work / "job.json").write_text(json.dumps(asdict(job)), encoding="utf-8")
    env = dict(os.environ)
    src_root = str(Path(__file__).resolve().parents[2])  # the directory holding the phiclip package
    env["PYTHONPATH"] = src_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "phiclip.comparison.measure", str(work)],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise CompareError(f"{job.spec}: measuring took longer than {timeout_s} s; use fewer images") from None
    error_file = work / "error.json"
    if error_file.exists():
        raise CompareError(json.loads(error_file.read_text(encoding="utf-8"))["error"])
    result_file = work / "result.json"
    if proc.returncode != 0 or not result_file.exists():
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-15:])
        raise CompareError(
            f"{job.spec}: the measuring subprocess ended with exit code {proc.returncode} "
            f"(out of memory or a crash?); its last output:\n{tail}"
        )
    meta = json.loads(result_file.read_text(encoding="utf-8"))
    with np.load(work / "result.npz", allow_pickle=False) as arrays:
        image_emb = arrays["image_embeddings"]
        text_emb = arrays["text_embeddings"] if "text_embeddings" in arrays.files else None
        zs = arrays["zero_shot_weights"] if "zero_shot_weights" in arrays.files else None
    return Measured(image_emb, text_emb, zs, _cost_from_dict(meta["cost"]), meta["description"], meta["skipped"])


def _main(argv: Sequence[str]) -> int:
    """``python -m phiclip.comparison.measure JOBDIR``: job.json in; result.json + result.npz or error.json out."""
    if len(argv) != 1:
        print("usage: python -m phiclip.comparison.measure JOBDIR", file=sys.stderr)
        return 2
    work = Path(argv[0])
    job = MeasureJob(**json.loads((work / "job.json").read_text(encoding="utf-8")))
    try:
        m = measure_model(job, memory_scope="subprocess")
    except CompareError as e:
        (work / "error.json").write_text(json.dumps({"error": str(e)}), encoding="utf-8")
        return 0
    except Exception as e:  # noqa: BLE001 - report any failure as one line naming the model
        traceback.print_exc()
        (work / "error.json").write_text(
            json.dumps({"error": f"{job.spec}: {type(e).__name__}: {e}"}), encoding="utf-8"
        )
        return 0
    arrays = {"image_embeddings": m.image_embeddings}
    if m.text_embeddings is not None:
        arrays["text_embeddings"] = m.text_embeddings
    if m.zero_shot_weights is not None:
        arrays["zero_shot_weights"] = m.zero_shot_weights
    np.savez(work / "result.npz", **arrays)
    meta = {"cost": asdict(m.cost), "description": m.description, "skipped": m.skipped}
    (work / "result.json").write_text(json.dumps(meta, allow_nan=False), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
