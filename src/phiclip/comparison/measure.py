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
the images are embedded by the bulk pipeline's per-shard step, which times reading, decoding and
preprocessing apart from the model (collate + forward, with a CUDA synchronise). One warm-up batch
runs untimed first, then ``passes`` timed passes over every image: the speed is the median pass,
with the fastest and slowest beside it. An image that cannot be embedded is listed, not fatal.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from phiclip.comparison.results import Cost, TokenCount
from phiclip.images import DEFAULT_MAX_PIXELS

if TYPE_CHECKING:  # annotations only: phiclip.encoders loads when a model is measured
    from phiclip.encoders.base import Encoder

_MB = float(2**20)


class CompareError(RuntimeError):
    """A model could not be measured; the message names the model and the reason."""


@dataclass
class MeasureJob:
    """What to measure for one encoder. ``sources`` are image file paths in the compared order;
    ``texts`` (unique captions) are embedded when the encoder has a text side, and a zero-shot
    classifier is built from ``classnames`` x ``templates`` likewise. ``passes`` timed passes over
    the images give the speed and its spread; ``max_pixels`` leaves out larger images."""

    spec: str
    sources: list[str]
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 16
    texts: list[str] | None = None
    classnames: list[str] | None = None
    templates: list[str] = field(default_factory=list)
    passes: int = 3
    max_pixels: int | None = DEFAULT_MAX_PIXELS


@dataclass
class Measured:
    """The vectors and costs of one encoder. ``image_embeddings`` ``(len(kept), dim)``: row j is image
    ``job.sources[kept[j]]``, of size ``sizes[j]``; ``failed`` ``(position, stage, reason)`` of the
    images it could not embed; ``text_embeddings`` ``(len(job.texts), dim)`` or ``None``;
    ``zero_shot_weights`` ``(len(classnames), dim)`` or ``None``; ``skipped`` gives the reason for
    each of those left out."""

    image_embeddings: np.ndarray
    kept: list[int]
    sizes: list[tuple[int, int]]
    failed: list[tuple[int, str, str]]
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

    # lazy: `phiclip --help` imports this module; phiclip.encoders is loaded on first use
    from phiclip.encoders.registry import KINDS, resolve_spec

    t = time.perf_counter()
    kind = resolve_spec(spec).kind
    importlib.import_module(KINDS[kind].module)  # the kind's module, from the one kind table
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


@dataclass
class Pass:
    """One timed pass over the images: ``kept`` positions with their ``vectors``, ``sizes`` and
    ``crops``; ``failed`` ``(position, stage, reason)``; ``model_s`` the model's time (collate and
    forward), ``prepare_s`` reading, decoding and preprocessing."""

    kept: list[int]
    vectors: np.ndarray
    sizes: list[tuple[int, int]]
    crops: list[int]
    failed: list[tuple[int, str, str]]
    model_s: float
    prepare_s: float


def embed_pass(encoder: Encoder, sources: Sequence[str], *, batch_size: int, max_pixels: int | None) -> Pass:
    """Embed ``sources`` once through the bulk pipeline's step (:func:`phiclip.pipeline.step.embed_payloads`):
    images that fail are values in ``failed``, never exceptions."""
    # lazy: `phiclip --help` imports this module; pipeline.step (-> phiclip.encoders) is loaded on first use
    from phiclip.pipeline.step import embed_payloads

    r = embed_payloads(encoder, list(sources), batch_size=batch_size, max_pixels=max_pixels)
    order = np.argsort(np.asarray(r.positions, dtype=np.int64), kind="stable")
    sizes = [(int(r.sizes[j][0]), int(r.sizes[j][1])) for j in order]
    return Pass(
        kept=[int(r.positions[j]) for j in order],
        vectors=np.asarray(r.embeddings, dtype=np.float32)[order],
        sizes=sizes,
        crops=crops_of_sizes(encoder, sizes),
        failed=sorted((int(i), str(stage), str(reason)) for i, stage, reason in r.errors),
        model_s=float(r.timings.get("encode", 0.0)),
        prepare_s=float(sum(v for k, v in r.timings.items() if k != "encode")),
    )


def crops_of_sizes(encoder: Encoder, sizes: Sequence[tuple[int, int]]) -> list[int]:
    """The crops (tower passes, ``encoder.item_crops``) of an image of each size: what the encoder's
    preprocessing makes of a blank image of that size (one call per distinct size, untimed; the crop
    count of phiclip's encoders depends on the size alone)."""
    from PIL import Image

    per: dict[tuple[int, int], int] = {}
    for size in sizes:
        if size not in per:
            per[size] = max(1, int(encoder.item_crops(encoder.preprocess(Image.new("RGB", size)))))
    return [per[s] for s in sizes]


def _tokens_by_size(encoder: Encoder, p: Pass) -> list[TokenCount]:
    """Crops and image tokens per image size (Phi-3-vision's ``tokens_per_image``; ``None`` elsewhere)."""
    per: dict[tuple[int, int], list[int]] = {}
    for size, crops in zip(p.sizes, p.crops):
        per.setdefault(size, [0, crops])[0] += 1
    fn = getattr(encoder, "tokens_per_image", None)
    return [
        TokenCount(width=w, height=h, images=count, crops=crops, tokens=int(fn(w, h)) if callable(fn) else None)
        for (w, h), (count, crops) in sorted(per.items(), key=lambda kv: (kv[0][0] * kv[0][1], kv[0]))
    ]


def _text_side(encoder: Encoder, job: MeasureJob, device: Any, skipped: dict[str, str]) -> tuple[Any, Any, float | None]:
    """Text embeddings of ``job.texts`` and zero-shot weights of ``job.classnames`` when the encoder
    has a text side (else the reasons in ``skipped``); returns them with the text encoding time."""
    import torch

    text_emb = zs_weights = text_s = None
    has_text = "text" in getattr(encoder, "modalities", frozenset())
    no_text = f"{encoder.name} has no text side (it embeds images only)"
    if job.texts:
        if has_text:
            t = time.perf_counter()
            with torch.inference_mode():
                text_emb = np.asarray(encoder.encode_texts(list(job.texts)), dtype=np.float32)
            _sync(device)
            text_s = time.perf_counter() - t
        else:
            skipped["retrieval"] = no_text
    if job.classnames:
        if has_text:
            # lazy: `phiclip --help` imports this module; phiclip.evaluate is loaded on first use
            from phiclip.evaluate import zero_shot_classifier

            with torch.inference_mode():
                zs_weights = np.asarray(zero_shot_classifier(encoder, job.classnames, job.templates), dtype=np.float32)
        else:
            skipped["zero_shot"] = no_text
    return text_emb, zs_weights, text_s


def measure_model(job: MeasureJob, *, memory_scope: str = "in-process",
                  say: Callable[[str], None] | None = None) -> Measured:
    """Load ``job.spec``, embed ``job.sources`` (and texts), and measure load time, the throughput of
    ``job.passes`` timed passes (after an untimed warm-up batch), crops, tokens per image size and
    peak memory. Images that cannot be embedded are listed in ``Measured.failed``. ``say`` is called with
    a line as each stage starts (loading, warm-up, each timed pass, the text side).

    Raises:
        CompareError: when the encoder cannot be loaded or run.
    """
    import torch
    import transformers  # noqa: F401 - imported before the clock starts, so load_s is the model alone

    # lazy: `phiclip --help` imports this module; phiclip.encoders is loaded on first use
    from phiclip.encoders import load_encoder

    # lazy: `phiclip --help` imports this module; phiclip.encoders is loaded on first use
    from phiclip.encoders.device import resolve_device_dtype

    if not job.sources:
        raise CompareError(f"{job.spec}: no images to embed")
    if job.batch_size < 1 or job.passes < 1:
        raise CompareError(f"batch size and passes must be at least 1, got {job.batch_size} and {job.passes}")
    device, _ = resolve_device_dtype(job.device, job.dtype)
    on_cuda = device.type == "cuda"
    gc.collect()
    if on_cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    if memory_scope == "in-process":
        reset_peak_rss()
    stage = say or (lambda _msg: None)
    stage("importing the model code")
    import_s = _import_model_code(job.spec)
    baseline_rss = current_rss_mb()
    stage("loading the encoder")

    t0 = time.perf_counter()
    try:
        encoder = load_encoder(job.spec, device=job.device, dtype=job.dtype)
    except Exception as e:  # noqa: BLE001 - every loading failure becomes one message naming the model
        raise CompareError(f"{job.spec}: could not load the encoder ({type(e).__name__}: {e})") from e
    _sync(device)
    load_s = time.perf_counter() - t0
    encoder.set_max_pixels(job.max_pixels)  # also bounds what preprocessing builds (Phi-3-vision's HD canvas)
    description = json.loads(json.dumps(encoder.describe(), default=str))

    def one_pass(enc: Encoder, sources: Sequence[str]) -> Pass:
        try:
            with torch.inference_mode():
                got = embed_pass(enc, sources, batch_size=job.batch_size, max_pixels=job.max_pixels)
            _sync(device)
            return got
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: name the model
            raise CompareError(f"{job.spec}: embedding failed ({type(e).__name__}: {e}); a smaller --batch-size "
                               "may help") from e

    stage(f"loaded in {load_s:.1f} s; warm-up batch")
    one_pass(encoder, job.sources[: job.batch_size])  # untimed warm-up: lazy initialisation, kernel selection, caches
    passes = []
    for i in range(job.passes):
        stage(f"timed pass {i + 1}/{job.passes} over {len(job.sources)} images")
        passes.append(one_pass(encoder, job.sources))
    first = passes[0]
    skipped: dict[str, str] = {}
    if job.texts or job.classnames:
        stage("text side (captions, class prompts)")
    text_emb, zs_weights, text_s = _text_side(encoder, job, device, skipped)
    n = len(first.kept)
    model_s = [p.model_s for p in passes]
    encode_s = float(np.median(model_s))
    preprocess_s = float(np.median([p.prepare_s for p in passes]))
    crops_total = int(sum(first.crops))

    def rate(count: float, seconds: float) -> float:
        return count / seconds if seconds > 0 else 0.0

    cost = Cost(
        dim=int(description.get("dim") or first.vectors.shape[1]),
        parameters=description.get("parameters"),
        device=str(description.get("device", device)),
        dtype=str(description.get("dtype", job.dtype)),
        batch_size=job.batch_size,
        import_s=import_s,
        load_s=load_s,
        preprocess_s=preprocess_s,
        encode_s=encode_s,
        images=n,
        crops=crops_total,
        images_per_s=rate(n, encode_s),
        crops_per_s=rate(crops_total, encode_s),
        end_to_end_images_per_s=rate(n, encode_s + preprocess_s),
        text_encode_s=text_s,
        peak_rss_mb=peak_rss_mb(),
        baseline_rss_mb=baseline_rss,
        gpu_peak_mb=torch.cuda.max_memory_allocated(device) / _MB if on_cuda else None,
        memory_scope=memory_scope,
        tokens_by_size=_tokens_by_size(encoder, first),
        passes=len(passes),
        encode_s_passes=model_s,
        images_per_s_min=rate(n, max(model_s)),
        images_per_s_max=rate(n, min(model_s)),
    )
    del encoder
    gc.collect()
    if on_cuda:
        torch.cuda.empty_cache()
    return Measured(first.vectors, first.kept, first.sizes, first.failed, text_emb, zs_weights, cost, description,
                    skipped)


# --- the subprocess ------------------------------------------------------------------------------


def _cost_from_dict(d: dict[str, Any]) -> Cost:
    d = dict(d)
    d["tokens_by_size"] = [TokenCount(**t) for t in d.get("tokens_by_size", [])]
    return Cost(**d)


#: The prefix of the lines in which the measuring subprocess reports the stage it starts (on stdout).
STAGE_PREFIX = "phiclip-stage: "


def _run_streaming(cmd: list[str], env: dict[str, str], timeout_s: float | None,
                   say: Callable[[str], None]) -> tuple[int, str]:
    """Run ``cmd``, passing each stage line it prints to ``say`` as it comes; returns the exit code and the
    last lines of its other output (stdout and stderr together).

    Raises:
        subprocess.TimeoutExpired: it ran longer than ``timeout_s`` (it is killed).
    """
    import subprocess
    import threading

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        proc.kill()

    timer = threading.Timer(timeout_s, kill) if timeout_s is not None else None
    if timer is not None:
        timer.start()
    tail: deque[str] = deque(maxlen=200)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(STAGE_PREFIX):
                say(line[len(STAGE_PREFIX):].rstrip("\n"))
            else:
                tail.append(line)
        code = proc.wait()
    finally:
        if timer is not None:
            timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if timed_out.is_set():
        raise subprocess.TimeoutExpired(cmd, timeout_s or 0)
    return code, "".join(tail)


def measure_in_subprocess(job: MeasureJob, workdir: str | Path, *, timeout_s: float | None = None,
                          say: Callable[[str], None] | None = None) -> Measured:
    """Run :func:`measure_model` for ``job`` in a fresh Python process; files go to ``workdir``; ``say`` gets
    the stages the process starts, as it starts them.

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
        returncode, output = _run_streaming([sys.executable, "-m", "phiclip.comparison.measure", str(work)], env,
                                            timeout_s, say or (lambda _msg: None))
    except subprocess.TimeoutExpired:
        raise CompareError(f"{job.spec}: measuring took longer than {timeout_s} s; use fewer images") from None
    error_file = work / "error.json"
    if error_file.exists():
        raise CompareError(json.loads(error_file.read_text(encoding="utf-8"))["error"])
    result_file = work / "result.json"
    if returncode != 0 or not result_file.exists():
        tail = "\n".join(output.strip().splitlines()[-15:])
        raise CompareError(
            f"{job.spec}: the measuring subprocess ended with exit code {returncode} "
            f"(out of memory or a crash?); its last output:\n{tail}"
        )
    meta = json.loads(result_file.read_text(encoding="utf-8"))
    with np.load(work / "result.npz", allow_pickle=False) as arrays:
        image_emb = arrays["image_embeddings"]
        text_emb = arrays["text_embeddings"] if "text_embeddings" in arrays.files else None
        zs = arrays["zero_shot_weights"] if "zero_shot_weights" in arrays.files else None
    return Measured(image_emb, meta["kept"], [tuple(s) for s in meta["sizes"]], [tuple(f) for f in meta["failed"]],
                    text_emb, zs, _cost_from_dict(meta["cost"]), meta["description"], meta["skipped"])


def _main(argv: Sequence[str]) -> int:
    """``python -m phiclip.comparison.measure JOBDIR``: job.json in; result.json + result.npz or error.json out."""
    if len(argv) != 1:
        print("usage: python -m phiclip.comparison.measure JOBDIR", file=sys.stderr)
        return 2
    work = Path(argv[0])
    job = MeasureJob(**json.loads((work / "job.json").read_text(encoding="utf-8")))
    try:
        m = measure_model(job, memory_scope="subprocess",
                          say=lambda msg: print(STAGE_PREFIX + msg.replace("\n", " "), flush=True))
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
    meta = {"cost": asdict(m.cost), "description": m.description, "skipped": m.skipped, "kept": m.kept,
            "sizes": m.sizes, "failed": m.failed}
    (work / "result.json").write_text(json.dumps(meta, allow_nan=False), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
