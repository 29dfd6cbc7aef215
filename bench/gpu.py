"""GPU benchmark: the Phi-3-vision tower, the HD path and end-to-end embedding, bfloat16, one command.

    python bench/gpu.py --log-dir bench-logs/gpu          # on an H100/H200, about 8 minutes
    python bench/gpu.py --quick --device cpu               # smoke test of every section on a CPU
    python bench/gpu.py --only tower,hd                    # some sections only

Correctness is checked first (phiclip's image tokens against the released path, an HF
``CLIPVisionModel`` with SDPA attention, in float32 with TF32 off; then the bfloat16 error of both).
Then each section is timed (warm-up, several repeats, median, ``torch.cuda.synchronize()`` around
each run) and rows of ratios are added to a table:

1. environment (GPU, versions, free memory; ``nvidia-smi -q`` saved to the log directory)
2. ceilings: the measured bf16 matrix-product rate and copy bandwidth, and the crops/s they allow
3. correctness on a full-size ViT-L/14-336 tower with random weights (real shapes)
4. tower throughput (crops/s) at several batch sizes: HF SDPA bf16 with ``output_hidden_states``
   (the baseline), HF with 23 layers, phiclip eager, phiclip under a CUDA graph
5. tower + HD path on mixed-size images (4:3, 16:9, portrait, square; num_crops 16)
6. input side: decode + HD transform of 1920x1080 JPEGs (1 process, N DataLoader workers),
   host-to-device copies (pageable, pinned), an HD transform on the GPU (a measured option)
7. end to end with ``phiclip.embed`` (JPEG folder -> Parquet) against the tower-only rate
8. FP8 (e4m3) matrix products on the tower's shapes, a measured option only
9. ``torch.compile`` variants (per layer and whole tower; default, max-autotune(-no-cudagraphs),
   reduce-overhead = CUDA graphs), each in its own process with a time limit, each timed on the
   tower and the HD path; then end to end with the best compiled tower
10. CLIP ViT-B/32 and ViT-L/14-336 (random weights, real size): model only, phiclip's encoder against
    transformers' ``get_image_features`` with SDPA, both bfloat16, and end to end with ``phiclip.embed``
    from 640x480 JPEGs, against the 5000 and 1000 images/s targets
11. a summary against the targets (1500 crops/s; 1.45x on the HD path; end to end >= 70% of the tower;
    Phi-3-vision >= 60 images/s of 1920x1080 JPEGs at num_crops 16; the CLIP rows)

Every section runs under try/except (a failure is logged with its traceback and the next section
runs), has a time budget, and adds its rows to the log directory as it goes (``results.md``,
``results.json``, ``log.txt``), so a run cut short still leaves its results. The log directory is
``--log-dir`` or ``$PHICLIP_BENCH_LOG_DIR``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from baselines import ReleasedImageEmbedding  # noqa: E402
from common import (  # noqa: E402
    Report,
    Row,
    environment,
    photo_like_image,
    photo_like_images,
    time_device,
    vit_flops_per_crop,
    write_photo_jpegs,
)

MIXED = ((1600, 1200), (1920, 1080), (1080, 1920), (1000, 1000))  # 4:3, 16:9, portrait, square
JPEG_SIZE = (1920, 1080)
TARGET_TOWER = 1500.0  # crops/s, ViT-L/14-336 tower (23 layers) on an H200
TARGET_HD = 1.45  # tower + HD path vs the released path with SDPA in bf16
TARGET_E2E = 0.70  # end to end vs the tower-only rate
#: Issue 28's end-to-end targets (bfloat16, from JPEG files): images/s.
TARGET_PHI3V_IMAGES = 60.0  # Phi-3-vision tower + HD path, num_crops 16, 1920x1080 JPEGs
CLIP_TARGETS = {"ViT-B/32": 5000.0, "ViT-L/14-336": 1000.0}
CLIP_JPEG_SIZE = (640, 480)  # a typical photo for the CLIP rows (the Phi-3-vision rows use 1920x1080)
EVENT = "@@phiclip-bench "  # prefix of the lines a child process reports results with
SECTIONS = ("env", "ceilings", "correctness", "tower", "hd", "input", "e2e", "clip", "fp8", "compile", "e2e_compiled",
            "summary")


# ==============================================================================================
# The plan: sizes and time budgets (full run on a GPU, or --quick)
# ==============================================================================================
@dataclass
class Plan:
    """Sizes and time budgets of one run."""

    quick: bool
    batch_sizes: tuple[int, ...]
    repeats: int
    warmup: int
    hd_images: int
    jpegs: int
    e2e_batch: int
    workers: int
    time_limit: float
    budgets: dict[str, float]
    #: (scope, mode, time limit in seconds), in the order they run
    compile_variants: tuple[tuple[str, str, float], ...]
    gemm_size: int
    copy_mib: int

    @classmethod
    def make(cls, quick: bool, cuda: bool, time_limit: float | None) -> Plan:
        cpus = os.cpu_count() or 1
        if quick:
            variants: tuple[tuple[str, str, float], ...] = (("layer", "default", 120), ("full", "default", 150))
            if cuda:
                variants += (("full", "reduce-overhead", 150),)
            return cls(True, (2, 4), 2, 1, 4, 8, 32, min(2, cpus), time_limit or 420,
                       {"env": 20, "ceilings": 20, "correctness": 60, "tower": 60, "hd": 40, "input": 60, "e2e": 120,
                        "clip": 120, "fp8": 20, "compile": 1e6, "e2e_compiled": 150, "summary": 10}, variants, 256, 16)
        variants = (
            ("layer", "default", 75),
            ("layer", "max-autotune-no-cudagraphs", 120),
            ("full", "default", 100),
            ("full", "max-autotune-no-cudagraphs", 130),
            ("full", "reduce-overhead", 100),
            ("full", "max-autotune", 150),
        )
        return cls(False, (64, 128, 256), 5, 2, 32, 768, 64, min(16, cpus), time_limit or 505,
                   {"env": 20, "ceilings": 20, "correctness": 90, "tower": 75, "hd": 45, "input": 60, "e2e": 90,
                    "clip": 120, "fp8": 25, "compile": 1e6, "e2e_compiled": 100, "summary": 10}, variants, 8192, 2048)


# ==============================================================================================
# Report, log and the run's state
# ==============================================================================================
@dataclass
class GpuReport(Report):
    """The CPU benchmark's report plus named metrics and a status line per section."""

    metrics: dict[str, float] = field(default_factory=dict)
    sections: list[dict[str, Any]] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [super().markdown(), "", "Sections:"]
        lines += [f"- {s['name']}: {s['status']} ({s['seconds']:.0f} s)" for s in self.sections]
        return "\n".join(lines)

    def save(self, log_dir: str | Path | None) -> None:
        if not log_dir:
            return
        super().save(log_dir)
        d = Path(log_dir)
        d.joinpath("results.md").write_text(self.markdown() + "\n")
        d.joinpath("results.json").write_text(json.dumps(
            {"title": self.title, "rows": [asdict(r) for r in self.rows], "checks": self.checks, "env": self.env,
             "metrics": self.metrics, "sections": self.sections}, indent=2, default=str))


class _Tee:
    """Writes to a stream and to the log file."""

    def __init__(self, stream: Any, log: Any) -> None:
        self.stream, self.log = stream, log

    def write(self, s: str) -> int:
        self.stream.write(s)
        try:
            self.log.write(s)
            self.log.flush()
        except ValueError:  # log closed at exit
            pass
        return len(s)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


class _Stop(BaseException):
    """Raised by the SIGTERM handler: stop, save what there is, print the table."""


class _Skip(Exception):
    """A section that does not apply here (e.g. FP8 without CUDA): recorded as skipped, not failed."""


class Bench:
    """The run's state: options, plan, report, metrics, shared inputs and the child process."""

    def __init__(self, args: argparse.Namespace, plan: Plan, tmp: Path) -> None:
        self.args, self.plan, self.tmp = args, plan, tmp
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.dtype = torch.bfloat16
        self.t0 = time.monotonic()
        self.log_dir: Path | None = Path(args.log_dir) if args.log_dir else None
        self.report = GpuReport("GPU" if self.cuda else f"GPU benchmark on {self.device} (smoke test)")
        self.metrics = self.report.metrics
        self.lock = threading.Lock()
        self.ckpt: Path | None = None
        self.jpegs: list[Path] | None = None
        self.models: dict[str, Any] = {}
        self.best_batch = plan.batch_sizes[len(plan.batch_sizes) // 2]
        self.section_deadline = math.inf
        self.child: subprocess.Popen[str] | None = None
        self.compiled_variants: list[dict[str, Any]] = []

    # --- time ------------------------------------------------------------------------------------
    def remaining(self) -> float:
        return self.plan.time_limit - (time.monotonic() - self.t0)

    def deadline(self) -> float:
        return min(self.section_deadline, self.t0 + self.plan.time_limit)

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline()

    def time(self, fn: Callable[[], Any], repeats: int | None = None, warmup: int | None = None) -> float:
        """Median seconds of ``fn`` (synchronised), repeats cut short at the section deadline."""
        med, times = time_device(fn, repeats or self.plan.repeats, self.plan.warmup if warmup is None else warmup,
                                 self.cuda, self.deadline())
        print(f"    runs: {', '.join(f'{t * 1e3:.1f}' for t in times)} ms", flush=True)
        return med

    # --- results ---------------------------------------------------------------------------------
    def row(self, row: Row) -> None:
        with self.lock:
            self.report.rows.append(row)
            tgt = f" (target {row.target:g}: {row.met})" if row.target is not None else ""
            print(f"  ROW | {row.what} | {row.baseline} | {row.phiclip} | {row.ratio:.2f}x{tgt} | {row.note}", flush=True)
            self.save()

    def check(self, text: str, ok: bool = True) -> None:
        with self.lock:
            self.report.checks.append(("" if ok else "FAILED: ") + text)
            print(f"  CHECK {'ok' if ok else 'FAILED'}: {text}", flush=True)
            self.save()

    def metric(self, key: str, value: float) -> None:
        with self.lock:
            self.metrics[key] = float(value)
            print(f"  METRIC {key} = {value:.6g}", flush=True)
            self.save()

    def save(self) -> None:
        try:
            self.report.save(self.log_dir)
        except OSError as e:
            print(f"  (could not save the report: {e})", flush=True)

    # --- shared inputs ---------------------------------------------------------------------------
    def vision_config(self) -> dict[str, Any]:
        from phiclip.phi3v.config import CLIP_VIT_L14_336
        from phiclip.testing import TINY_PHI3V_VISION

        return dict(TINY_PHI3V_VISION if self.plan.quick else CLIP_VIT_L14_336)

    def ensure_ckpt(self) -> Path:
        """A random-weight checkpoint with the real tower (quick: the tiny one), LM width 3072 (quick: 64)."""
        if self.ckpt is None:
            from phiclip.testing import build_tiny_phi3v

            t = time.perf_counter()
            self.ckpt = build_tiny_phi3v(self.tmp / "phi3v", vision_config=self.vision_config(),
                                         hidden_size=64 if self.plan.quick else 3072, vocab_size=128,
                                         num_lm_layers=1, dtype="float32")
            print(f"  built the checkpoint {self.ckpt} in {time.perf_counter() - t:.1f} s", flush=True)
        return self.ckpt

    def ensure_jpegs(self) -> list[Path]:
        if self.jpegs is None:
            t = time.perf_counter()
            self.jpegs = write_photo_jpegs(self.tmp / "jpegs", self.plan.jpegs, JPEG_SIZE, seed=100)
            print(f"  wrote {len(self.jpegs)} JPEGs {JPEG_SIZE[0]}x{JPEG_SIZE[1]} in {time.perf_counter() - t:.1f} s", flush=True)
        return self.jpegs

    def phiclip_bf16(self) -> Any:
        from phiclip.phi3v import Phi3VImageEmbedding

        if "phiclip" not in self.models:
            self.models["phiclip"] = Phi3VImageEmbedding.from_pretrained(
                self.ensure_ckpt(), torch_dtype=self.dtype, device=self.device, max_crops_per_batch=max(self.plan.batch_sizes))
        return self.models["phiclip"]

    def released_bf16(self) -> ReleasedImageEmbedding:
        if "released" not in self.models:
            rel = ReleasedImageEmbedding.from_phiclip(self.phiclip_bf16()).eval()
            self.models["released"] = rel.to(self.device)
        return self.models["released"]

    def free(self) -> None:
        self.models.clear()
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    # --- child processes -------------------------------------------------------------------------
    def run_child(self, kind: str, params: dict[str, Any], timeout: float) -> dict[str, float]:
        """Run ``kind`` in a child process (its own CUDA context and compile state) for at most
        ``timeout`` seconds; its rows, checks and metrics are added as they arrive."""
        pfile = self.tmp / f"child-{kind}-{int(time.monotonic() * 1000)}.json"
        pfile.write_text(json.dumps(params))
        cmd = [sys.executable, "-u", str(Path(__file__).resolve()), "--child", kind, "--child-params", str(pfile),
               "--device", self.args.device] + (["--quick"] if self.plan.quick else [])
        got: dict[str, float] = {}
        print(f"  starting child {kind} (limit {timeout:.0f} s): {json.dumps(params)[:300]}", flush=True)
        # Its own process group, so that the child and its DataLoader workers are stopped together.
        group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}, **group)
        self.child = proc

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith(EVENT):
                    try:
                        ev = json.loads(line[len(EVENT):])
                    except json.JSONDecodeError:
                        print(f"    [{kind}] {line}", end="", flush=True)
                        continue
                    if ev["type"] == "row":
                        self.row(Row(**ev["row"]))
                    elif ev["type"] == "check":
                        self.check(f"[{kind}] {ev['text']}", ev["ok"])
                    elif ev["type"] == "metric":
                        got[ev["key"]] = ev["value"]
                        self.metric(ev["key"], ev["value"])
                else:
                    print(f"    [{kind}] {line}", end="", flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
            reader.join(timeout=10)
            if rc != 0:
                raise RuntimeError(f"child {kind} exited with status {rc} (its traceback is in the log above)")
        except subprocess.TimeoutExpired:
            self.kill_child()
            reader.join(timeout=10)
            raise TimeoutError(f"child {kind} ran past its {timeout:.0f} s limit and was stopped; its results so far are kept") from None
        finally:
            self.kill_child()
        return got

    def kill_child(self) -> None:
        """Stop the child started by :meth:`run_child` and whatever is left of its process group."""
        proc, self.child = self.child, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # the group this run created for the child (pgid = its pid)
        with contextlib.suppress(Exception):
            proc.wait(timeout=10)


def _die_with_parent() -> None:
    """In a child: be killed when the benchmark's main process dies (Linux; best effort)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


# ==============================================================================================
# Small numeric helpers
# ==============================================================================================
def _flat(x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    if isinstance(x, (list, tuple)):
        return torch.cat([t.reshape(-1, t.shape[-1]) for t in x]).float()
    return x.reshape(-1, x.shape[-1]).float()


def rel_err(out: Any, ref: Any) -> float:
    """``||out - ref|| / ||ref||`` over all values (lists of tensors are concatenated)."""
    o, r = _flat(out), _flat(ref).to(_flat(out).device)
    return float((o - r).norm() / r.norm().clamp_min(1e-30))


def max_rel(out: Any, ref: Any) -> float:
    """``max |out - ref| / max |ref|``."""
    o, r = _flat(out), _flat(ref).to(_flat(out).device)
    return float((o - r).abs().max() / r.abs().max().clamp_min(1e-30))


def mean_cos(out: Any, ref: Any) -> float:
    o, r = _flat(out), _flat(ref).to(_flat(out).device)
    return float(F.cosine_similarity(o, r, dim=-1).mean())


def finite(x: Any) -> bool:
    return bool(torch.isfinite(_flat(x)).all())


def crops_of(width: int, height: int, num_crops: int = 16) -> int:
    from phiclip.phi3v.processing import hd_size, num_crops_for_hd_size

    return num_crops_for_hd_size(*hd_size(width, height, num_crops))


def mixed_inputs(n: int, seed: int = 2) -> Any:
    """``n`` photo-like images cycling through 4:3, 16:9, portrait, square, preprocessed at num_crops 16 (padded)."""
    from phiclip.phi3v import Phi3VImageProcessor

    return Phi3VImageProcessor(num_crops=16)(photo_like_images(n, seed=seed, sizes=MIXED))


def random_crops(n: int, device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 336, 336, generator=gen).to(device=device, dtype=dtype)


def hf_truncated_tower(model: Any, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """HF ``CLIPVisionModel`` (SDPA) with only the layers phiclip runs (23 of 24), same weights."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    vcfg = model.config.vision_config.to_dict()
    vcfg["num_hidden_layers"] = model.num_layers_run
    keys = CLIPVisionConfig().to_dict()
    cfg = CLIPVisionConfig(**{k: v for k, v in vcfg.items() if k in keys})
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        tower = CLIPVisionModel(cfg)
    tower = tower.to(dtype)
    prefix_ours = "img_processor.vision_model."
    ours = {k[len(prefix_ours):]: v for k, v in model.state_dict().items() if k.startswith(prefix_ours)}
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in tower.state_dict()) else ""
    res = tower.load_state_dict({prefix + k: v for k, v in ours.items()}, strict=False)
    if res.unexpected_keys or any("layers." in k for k in res.missing_keys):
        raise RuntimeError(f"HF tower load: unexpected {res.unexpected_keys[:4]}, missing {res.missing_keys[:4]}")
    return tower.eval()


class FixedBatchTower(torch.nn.Module):
    """Runs a (compiled or graph-captured) tower at one batch size: a smaller chunk is padded with
    blank crops and the padded outputs dropped, so the compiled code sees a single shape.

    It keeps ``vision_model`` so that ``Phi3VImageEmbedding.crop_features`` finds the weights'
    device and dtype when this wrapper replaces ``img_processor``.
    """

    def __init__(self, runner: Callable[[torch.Tensor], torch.Tensor], vision_model: torch.nn.Module, batch: int,
                 cudagraphs: bool = False) -> None:
        super().__init__()
        self.runner = runner
        self.vision_model = vision_model
        self.batch = batch
        self.cudagraphs = cudagraphs

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        n = crops.shape[0]
        if n > self.batch:
            return torch.cat([self(c) for c in crops.split(self.batch)])
        if n < self.batch:
            crops = torch.cat([crops, crops.new_zeros(self.batch - n, *crops.shape[1:])])
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        out = self.runner(crops)  # (batch, 1 + g*g, D)
        # CUDA-graph outputs live in the graph's memory pool and are overwritten by the next replay.
        return out[:n].clone() if (self.cudagraphs or n < self.batch) else out


def compiled_tower(tower: torch.nn.Module, scope: str, mode: str, batch: int) -> FixedBatchTower:
    """``scope``: ``layer`` (each encoder layer compiled; the 23 share one compiled graph) or
    ``full`` (the whole tower as one graph). ``mode``: a ``torch.compile`` mode."""
    kwargs: dict[str, Any] = {"dynamic": False}
    if mode != "default":
        kwargs["mode"] = mode
    if scope == "layer":
        for layer in tower.vision_model.encoder.layers:
            layer.compile(**kwargs)
        runner: Any = tower
    elif scope == "full":
        runner = torch.compile(tower, **kwargs)
    else:
        raise ValueError(f"scope must be 'layer' or 'full', got {scope!r}")
    return FixedBatchTower(runner, tower.vision_model, batch, cudagraphs=mode in ("reduce-overhead", "max-autotune"))


def cuda_graph_tower(tower: torch.nn.Module, batch: int, device: torch.device, dtype: torch.dtype) -> FixedBatchTower:
    """The eager tower captured once in a CUDA graph at ``batch`` crops (input copied into a static buffer)."""
    static_in = torch.zeros(batch, 3, 336, 336, device=device, dtype=dtype)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            tower(static_in)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = tower(static_in)

    def run(x: torch.Tensor) -> torch.Tensor:
        static_in.copy_(x)
        graph.replay()
        return static_out

    wrapped = FixedBatchTower(run, tower.vision_model, batch, cudagraphs=False)
    wrapped.graph = graph  # keep it alive
    return wrapped


def tower_desc(model: Any) -> str:
    """E.g. ``ViT 1024-wide, 23 of 24 layers run``."""
    vc = model.config.vision_config
    return f"tower {vc.hidden_size}-wide, {model.num_layers_run} of {vc.num_hidden_layers} layers run"


def variant_name(scope: str, mode: str) -> str:
    return f"compile_{scope}_{mode}".replace("-", "_")


# ==============================================================================================
# Sections (in the main process)
# ==============================================================================================
def sec_env(b: Bench) -> None:
    env = environment()
    env["device"] = str(b.device)
    if b.cuda:
        props = torch.cuda.get_device_properties(b.device)
        free, total = torch.cuda.mem_get_info(b.device)
        env.update({"gpu": props.name, "capability": f"{props.major}.{props.minor}", "SMs": props.multi_processor_count,
                    "gpu memory": f"{free / 2**30:.1f} GiB free of {total / 2**30:.1f}", "cuda": torch.version.cuda,
                    "cudnn": torch.backends.cudnn.version(),
                    "sdpa": f"flash {torch.backends.cuda.flash_sdp_enabled()}, mem-efficient "
                            f"{torch.backends.cuda.mem_efficient_sdp_enabled()}, cudnn {torch.backends.cuda.cudnn_sdp_enabled()}"})
        with contextlib.suppress(Exception):
            import triton

            env["triton"] = triton.__version__
    b.report.env.update(env)
    print("  " + json.dumps(env, default=str), flush=True)
    for cmd, name in ((["nvidia-smi", "-q"], "nvidia-smi.txt"),
                      (["nvidia-smi", "--query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw,memory.used",
                        "--format=csv"], None)):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired) as e:
            print(f"  {cmd[0]}: {e}", flush=True)
            break
        if name and b.log_dir:
            b.log_dir.mkdir(parents=True, exist_ok=True)
            (b.log_dir / name).write_text(out)
        else:
            print(out, flush=True)
    b.save()


def sec_ceilings(b: Bench) -> None:
    n = b.plan.gemm_size

    def gemm_seconds() -> float:
        x = torch.randn(n, n, device=b.device, dtype=b.dtype)
        y = torch.randn(n, n, device=b.device, dtype=b.dtype)
        return b.time(lambda: x @ y, repeats=10, warmup=3)

    def copy_seconds(nbytes: int) -> float:
        src = torch.empty(nbytes, dtype=torch.uint8, device=b.device).random_()
        dst = torch.empty_like(src)
        return b.time(lambda: dst.copy_(src), repeats=10, warmup=3)

    tflops = 2 * n**3 / gemm_seconds() / 1e12
    nbytes = b.plan.copy_mib * 2**20
    gbs = 2 * nbytes / copy_seconds(nbytes) / 1e9
    vc = b.vision_config()
    layers = vc["num_hidden_layers"] - 1
    tokens = (vc["image_size"] // vc["patch_size"]) ** 2 + 1
    fl = vit_flops_per_crop(layers, vc["hidden_size"], vc["intermediate_size"], tokens, 3 * vc["patch_size"] ** 2)
    ceiling = tflops * 1e12 / fl
    b.metric("ceiling.bf16_tflops", tflops)
    b.metric("ceiling.copy_gb_s", gbs)
    b.metric("ceiling.crops_per_s", ceiling)
    b.row(Row(f"ceiling: {layers}-layer tower at the measured bf16 GEMM rate (crops/s)", f"target {TARGET_TOWER:.0f}",
              f"{ceiling:.0f}", ceiling / TARGET_TOWER, None,
              f"GEMM {n}^3 bf16 {tflops:.3g} TFLOP/s; copy {gbs:.3g} GB/s; {fl / 1e9:.3g} GFLOP per crop"))


def sec_correctness(b: Bench) -> None:
    from phiclip.phi3v import Phi3VImageEmbedding, Phi3VImageProcessor

    ckpt = b.ensure_ckpt()
    images = photo_like_images(2, seed=5, sizes=((1920, 1080), (1080, 1920)))
    inputs = Phi3VImageProcessor(num_crops=4)(images)
    pv, sizes = inputs.pixel_values.to(b.device), inputs.image_sizes
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        m32 = Phi3VImageEmbedding.from_pretrained(ckpt, torch_dtype=torch.float32, device=b.device)
        base32 = ReleasedImageEmbedding.from_phiclip(m32).to(b.device).eval()
        impl = getattr(base32.img_processor.config, "_attn_implementation", "?")
        with torch.inference_mode():
            ref = base32.image_tokens(pv, sizes)
            ours = m32.image_tokens(pv, sizes)
        err, merr = rel_err(ours, ref), max_rel(ours, ref)
        ok = finite(ref) and finite(ours) and err <= 1e-4 and [t.shape for t in ours] == [t.shape for t in ref]
        b.metric("correctness.fp32_rel_err", err)
        b.check(f"float32 (TF32 off), {tower_desc(m32)}, 2 images / "
                f"{int(sum(inputs.num_crops_per_image))} crops: phiclip image tokens vs the released path (HF "
                f"CLIPVisionModel attn={impl}): rel err {err:.1e}, max abs / max {merr:.1e} (need <= 1e-4)", ok)
        # The same weights in bf16 (the bf16 checkpoint load casts the same float32 values).
        b.models["released"] = base32.to(b.dtype)
        del m32, base32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    m16, base16 = b.phiclip_bf16(), b.released_bf16()
    with torch.inference_mode():
        ours16 = m16.image_tokens(pv, sizes)
        hf16 = base16.image_tokens(pv, sizes)
    e_ours, e_hf = rel_err(ours16, ref), rel_err(hf16, ref)
    b.metric("correctness.bf16_rel_err_phiclip", e_ours)
    b.metric("correctness.bf16_rel_err_hf", e_hf)
    b.check(f"bfloat16 vs the float32 reference: phiclip rel err {e_ours:.2e} (cosine {mean_cos(ours16, ref):.5f}), "
            f"HF SDPA bf16 {e_hf:.2e} (cosine {mean_cos(hf16, ref):.5f}); phiclip within 2x of HF + 1e-3",
            finite(ours16) and e_ours <= 2 * e_hf + 1e-3)


def sec_tower(b: Bench) -> None:
    m, rel = b.phiclip_bf16(), b.released_bf16()
    hf23 = hf_truncated_tower(m, b.device, b.dtype)
    b.models["hf23"] = hf23
    n_run = m.num_layers_run
    print(f"  {tower_desc(m)}", flush=True)
    x = random_crops(2, b.device, b.dtype, seed=1)
    with torch.inference_mode():
        a = m.crop_features(x)
        r = rel.get_img_features(x)
        h = hf23(pixel_values=x).last_hidden_state[:, 1:]
    b.check(f"tower bf16, 2 crops: phiclip vs HF hidden_states[-2] rel err {rel_err(a, r):.1e}, "
            f"HF {n_run} layers vs HF hidden_states[-2] rel err {rel_err(h, r):.1e}",
            rel_err(a, r) < 3e-2 and rel_err(h, r) < 3e-2)
    for bs in b.plan.batch_sizes:
        if b.out_of_time():
            print(f"  section budget spent: batch {bs} and larger skipped", flush=True)
            break
        x = random_crops(bs, b.device, b.dtype, seed=bs)
        m.max_crops_per_batch = bs
        variants: list[tuple[str, str, Callable[[], Callable[[], Any]]]] = [
            ("hf_hidden", "HF CLIPVisionModel SDPA bf16, output_hidden_states (baseline)",
             lambda x=x: lambda: rel.get_img_features(x)),
            ("hf23", f"HF SDPA bf16, {n_run} layers, last_hidden_state",
             lambda x=x: lambda: hf23(pixel_values=x).last_hidden_state[:, 1:]),
            ("phiclip_eager", f"phiclip eager (fused qkv, SDPA, {n_run} layers)", lambda x=x: lambda: m.crop_features(x)),
        ]
        if b.cuda:
            variants.append(("phiclip_cudagraph", "phiclip eager in one CUDA graph", lambda x=x: graph_runner(b, m, x)))
        for key, label, make in variants:
            try:
                with torch.inference_mode():
                    fn = make()
                    print(f"  batch {bs}: {label}", flush=True)
                    t = b.time(fn)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory, or a capture failure: the others still run
                traceback.print_exc()
                print(f"  batch {bs} {key}: {type(e).__name__}: {str(e)[:200]}; skipped", flush=True)
                fn = None
                gc.collect()
                if b.cuda:
                    torch.cuda.empty_cache()
                continue
            rate = bs / t
            b.metric(f"tower.{key}.b{bs}", rate)
            base = b.metrics.get(f"tower.hf_hidden.b{bs}")
            if key != "hf_hidden" and base:
                b.row(Row(f"tower, batch {bs}: {label} (crops/s)", f"{base:.0f}", f"{rate:.0f}", rate / base, None,
                          f"{rate / TARGET_TOWER:.2f} of the {TARGET_TOWER:.0f} crops/s target"))
    eager = {int(k.rsplit(".b", 1)[1]): v for k, v in b.metrics.items() if k.startswith("tower.phiclip_eager.b")}
    if eager:
        b.best_batch = max(eager, key=eager.__getitem__)
    b.metric("tower.best_batch", b.best_batch)


def graph_runner(b: Bench, m: Any, x: torch.Tensor) -> Callable[[], Any]:
    """Capture phiclip's eager tower in a CUDA graph at ``x``'s batch size; check it against eager."""
    g = cuda_graph_tower(m.img_processor, x.shape[0], b.device, b.dtype)
    out, ref = g(x), m.img_processor(x)
    err = rel_err(out, ref)
    b.check(f"CUDA graph at batch {x.shape[0]}: equal to eager (rel err {err:.1e})", finite(out) and err < 1e-2)
    return lambda: g(x)


def sec_hd(b: Bench) -> None:
    m, rel = b.phiclip_bf16(), b.released_bf16()
    n = b.plan.hd_images
    inputs = mixed_inputs(n)
    pv, sizes = inputs.pixel_values.to(b.device), inputs.image_sizes
    real, padded = int(sum(inputs.num_crops_per_image)), int(pv.shape[0] * pv.shape[1])
    with torch.inference_mode():
        ref = rel.image_tokens(pv, sizes)
        print(f"  baseline: the released path (HF SDPA bf16, all {padded} crops, hidden_states, per-image loops)", flush=True)
        t_base = b.time(lambda: rel.image_tokens(pv, sizes))
        b.metric("hd.baseline_s", t_base)
        b.metric("hd.real_crops", real)
        for mc in sorted({32, b.best_batch}):
            m.max_crops_per_batch = mc
            out = m.image_tokens(pv, sizes)
            cos = mean_cos(out, ref)
            b.check(f"HD path bf16, max_crops_per_batch {mc}: tokens per image equal in number, mean cosine to the "
                    f"released path {cos:.5f}", [t.shape for t in out] == [t.shape for t in ref] and cos > 0.99)
            print(f"  phiclip eager, max_crops_per_batch {mc}", flush=True)
            t = b.time(lambda: m.image_tokens(pv, sizes))
            b.metric(f"hd.phiclip_eager_mc{mc}_s", t)
            b.row(Row(f"tower + HD path, {n} mixed images ({real} real crops of {padded}), phiclip eager, "
                      f"max_crops_per_batch {mc} (s)", f"{t_base:.3f}", f"{t:.3f}", t_base / t, TARGET_HD,
                      f"{real / t:.0f} crops/s vs {padded / t_base:.0f} (baseline, padded crops included)"))


class _PreprocessDataset(Dataset):
    """Path -> the encoder's preprocessing (decode + HD transform + crops), as a pipeline worker does."""

    def __init__(self, paths: list[Path], num_crops: int = 16) -> None:
        self.paths, self.num_crops = paths, num_crops
        self.proc: Any = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        from phiclip.images import load_image
        from phiclip.phi3v import Phi3VImageProcessor

        if self.proc is None:
            self.proc = Phi3VImageProcessor(num_crops=self.num_crops)
        crops, _ = self.proc.preprocess_image(load_image(self.paths[i]))
        return crops


class _DecodeDataset(Dataset):
    """Path -> decoded RGB ``(H, W, 3)`` uint8 (for an HD transform on the GPU)."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        from phiclip.images import load_image

        return torch.from_numpy(np.array(load_image(self.paths[i]), dtype=np.uint8))


def _one_thread(_worker: int) -> None:
    torch.set_num_threads(1)


def _loader_rate(b: Bench, ds: Dataset, workers: int) -> tuple[float, float, int]:
    """(steady images/s after the first item, images/s including start-up, items) through a DataLoader."""
    from torch.utils.data import DataLoader

    ctx = "fork" if sys.platform.startswith("linux") else None
    loader = DataLoader(ds, batch_size=None, shuffle=False, num_workers=workers, worker_init_fn=_one_thread,
                        prefetch_factor=4 if workers else None, multiprocessing_context=ctx if workers else None)
    t0 = time.perf_counter()
    first, count = None, 0
    for _item in loader:
        count += 1
        if first is None:
            first = time.perf_counter()
        if b.out_of_time():
            break
    end = time.perf_counter()
    steady = (count - 1) / (end - first) if first is not None and count > 1 and end > first else float("nan")
    return steady, count / (end - t0), count


def gpu_hd_crops(img: torch.Tensor, num_crops: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """A measured option: the HD transform on the GPU from a decoded ``(H, W, 3)`` uint8 image:
    antialiased bilinear resize (PIL's filter, in float, rounded to uint8 levels), white padding,
    normalisation, bicubic global view, crops. Close to, not equal to, the CPU processor."""
    from phiclip.phi3v.processing import CROP_SIZE, resized_size

    x = img.permute(2, 0, 1)[None].float()  # (1, 3, h, w)
    transposed = x.shape[3] < x.shape[2]
    if transposed:
        x = x.transpose(2, 3)
    w, h = x.shape[3], x.shape[2]
    new_w, new_h = resized_size(w, h, num_crops)
    x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False).round_().clamp_(0, 255)
    target_h = math.ceil(new_h / CROP_SIZE) * CROP_SIZE
    top = int((target_h - new_h) / 2)
    white = ((1.0 - mean) / std).view(1, 3, 1, 1)
    canvas = white.expand(1, 3, target_h, new_w).clone()
    canvas[:, :, top : top + new_h] = (x / 255.0 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    if transposed:
        canvas = canvas.transpose(2, 3)
    canvas = canvas.contiguous()  # (1, 3, H, W)
    H, W = canvas.shape[2:]
    hh, ww = H // CROP_SIZE, W // CROP_SIZE
    glb = F.interpolate(canvas, size=(CROP_SIZE, CROP_SIZE), mode="bicubic", align_corners=False)  # (1, 3, 336, 336)
    # (1, 3, h*336, w*336) -> (h, w, 3, 336, 336) -> (h*w, 3, 336, 336)
    tiles = canvas[0].view(3, hh, CROP_SIZE, ww, CROP_SIZE).permute(1, 3, 0, 2, 4).reshape(hh * ww, 3, CROP_SIZE, CROP_SIZE)
    return torch.cat([glb, tiles])


def sec_input(b: Bench) -> None:
    from phiclip.images import load_image
    from phiclip.phi3v import Phi3VImageProcessor

    paths = b.ensure_jpegs()
    per_image = crops_of(*JPEG_SIZE)
    best_tower = max([v for k, v in b.metrics.items() if k.startswith("tower.phiclip")] or [TARGET_TOWER])
    need = max(TARGET_TOWER, best_tower) / per_image
    b.metric("input.needed_images_per_s", need)
    print(f"  the tower at max({TARGET_TOWER:.0f}, best measured {best_tower:.0f}) crops/s needs {need:.0f} images/s "
          f"({per_image} crops per {JPEG_SIZE[0]}x{JPEG_SIZE[1]} image)", flush=True)
    proc = Phi3VImageProcessor(num_crops=16)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        k = min(len(paths), 8 if b.plan.quick else 40)
        for key, label, fn in (
            ("decode_1p", "decode only (PIL), 1 process", lambda p: load_image(p)),
            ("decode_hd_1p", "decode + HD transform + crops, 1 process, 1 thread", lambda p: proc.preprocess_image(load_image(p))),
        ):
            t = time.perf_counter()
            done = 0
            for p in paths[:k]:
                fn(p)
                done += 1
                if time.perf_counter() - t > 8 or b.out_of_time():
                    break
            rate = done / (time.perf_counter() - t)
            b.metric(f"input.{key}", rate)
            b.row(Row(f"input: {label}, {JPEG_SIZE[0]}x{JPEG_SIZE[1]} JPEG (images/s)", f"need {need:.0f}", f"{rate:.1f}",
                      rate / need, None, f"{rate * per_image:.0f} crops/s"))
    finally:
        torch.set_num_threads(threads)
    w = b.plan.workers
    steady, overall, count = _loader_rate(b, _PreprocessDataset(paths), w)
    b.metric(f"input.decode_hd_{w}w", steady)
    b.row(Row(f"input: decode + HD transform + crops, {w} DataLoader workers (1 thread each), {count} JPEGs (images/s)",
              f"need {need:.0f}", f"{steady:.1f}", steady / need, 1.0,
              f"{overall:.1f} images/s with worker start-up; {steady * per_image:.0f} crops/s"))
    # Host-to-device copies of one batch of crops.
    if b.cuda:
        bs = b.plan.e2e_batch
        crops = torch.randn(bs, 3, 336, 336)
        pinned = crops.pin_memory()
        u8 = torch.randint(0, 256, (bs, 3, 336, 336), dtype=torch.uint8).pin_memory()
        rates = {}
        for key, src in (("pageable_f32", crops), ("pinned_f32", pinned), ("pinned_u8", u8)):
            t = b.time(lambda src=src: src.to(b.device, non_blocking=True), repeats=5, warmup=1)
            rates[key] = (bs / t, src.numel() * src.element_size() / t / 1e9)
            b.metric(f"input.h2d_{key}_crops_per_s", bs / t)
        b.row(Row(f"host-to-device copy of {bs} float32 crops: pageable vs pinned (crops/s)", f"{rates['pageable_f32'][0]:.0f}",
                  f"{rates['pinned_f32'][0]:.0f}", rates["pinned_f32"][0] / rates["pageable_f32"][0], None,
                  f"{rates['pageable_f32'][1]:.1f} vs {rates['pinned_f32'][1]:.1f} GB/s; uint8 pinned "
                  f"{rates['pinned_u8'][0]:.0f} crops/s"))
    # A measured option: decode on the CPU, HD transform on the GPU.
    mean = torch.tensor(proc.image_mean, device=b.device)
    std = torch.tensor(proc.image_std, device=b.device)
    errs = []
    for img in (load_image(paths[0]), photo_like_image(1080, 1920, seed=9)):  # landscape and portrait
        ref, _ = proc.preprocess_image(img)
        out = gpu_hd_crops(torch.from_numpy(np.array(img, dtype=np.uint8)).to(b.device), 16, mean, std)
        if out.shape != ref.shape:
            raise RuntimeError(f"GPU HD transform: shape {tuple(out.shape)} vs the processor's {tuple(ref.shape)}")
        d = (out.float().cpu() - ref).abs()
        errs.append((float(d.max()), float(d.mean())))
    max_d, mean_d = max(e[0] for e in errs), statistics.mean(e[1] for e in errs)
    b.check(f"GPU HD transform (option, not exact): max abs diff {max_d:.3f}, mean {mean_d:.4f} in normalised units "
            f"vs the CPU processor (one uint8 level = {1 / 255 / min(proc.image_std):.4f})", mean_d < 0.05)
    decoded = [torch.from_numpy(np.array(load_image(p), dtype=np.uint8)) for p in paths[: min(len(paths), 16)]]
    it = iter(range(10**9))

    def gpu_one() -> None:
        gpu_hd_crops(decoded[next(it) % len(decoded)].to(b.device, non_blocking=True), 16, mean, std)

    t = b.time(gpu_one, repeats=min(20, 5 * len(decoded)), warmup=2)
    b.metric("input.gpu_hd_images_per_s", 1 / t)
    steady_dec, _, count = _loader_rate(b, _DecodeDataset(paths), w)
    b.metric(f"input.decode_{w}w", steady_dec)
    pipe = min(steady_dec, 1 / t)
    b.row(Row(f"input option: decode on {w} workers ({steady_dec:.0f}/s) + HD transform on the {b.device.type} "
              f"({1 / t:.0f}/s) (images/s)", f"need {need:.0f}", f"{pipe:.0f}", pipe / need, None,
              f"vs {steady:.0f}/s with the HD transform on the CPU workers; not exact (mean diff {mean_d:.4f})"))


def sec_fp8(b: Bench) -> None:
    if not hasattr(torch, "float8_e4m3fn") or not hasattr(torch, "_scaled_mm"):
        raise _Skip(f"torch {torch.__version__} has no float8_e4m3fn / _scaled_mm")
    if b.cuda and torch.cuda.get_device_capability(b.device) < (8, 9):
        raise _Skip(f"FP8 matrix products need compute capability >= 8.9, have {torch.cuda.get_device_capability(b.device)}")
    if not b.cuda and not b.plan.quick:
        raise _Skip("FP8 is measured on CUDA only (--quick runs it on the CPU as a smoke test)")
    vc = b.vision_config()
    d, f = vc["hidden_size"], vc["intermediate_size"]
    bs = b.best_batch
    m = bs * ((vc["image_size"] // vc["patch_size"]) ** 2 + 1)
    e4m3 = torch.float8_e4m3fn
    fmax = torch.finfo(e4m3).max
    saved = 0.0
    for name, k, n in (("q,k,v", d, 3 * d), ("out_proj", d, d), ("fc1", d, f), ("fc2", f, d)):
        if b.out_of_time():
            break
        a = torch.randn(m, k, device=b.device, dtype=b.dtype)
        w = torch.randn(n, k, device=b.device, dtype=b.dtype) * 0.02
        t_bf = b.time(lambda a=a, w=w: F.linear(a, w), repeats=10, warmup=3)
        sa = (a.abs().max().float() / fmax).reshape(())
        sw = (w.abs().max().float() / fmax).reshape(())
        a8, w8 = (a / sa).to(e4m3), (w / sw).to(e4m3)

        def fp8(a8: torch.Tensor = a8, w8: torch.Tensor = w8, sa: torch.Tensor = sa, sw: torch.Tensor = sw) -> torch.Tensor:
            return torch._scaled_mm(a8, w8.t(), scale_a=sa, scale_b=sw, out_dtype=torch.bfloat16, use_fast_accum=True)

        out = fp8()
        ref = F.linear(a.float(), w.float())
        err = rel_err(out, ref)
        t_8 = b.time(fp8, repeats=10, warmup=3)
        t_q = b.time(lambda a=a, sa=sa: (a / sa).to(e4m3), repeats=5, warmup=1)
        flops = 2 * m * k * n
        saved += t_bf - t_8 - t_q
        b.metric(f"fp8.{name}.tflops", flops / t_8 / 1e12)
        b.row(Row(f"FP8 e4m3 GEMM {name} ({m}x{k} @ {k}x{n}), per-tensor scales (TFLOP/s)", f"bf16 {flops / t_bf / 1e12:.0f}",
                  f"{flops / t_8 / 1e12:.0f}", t_bf / t_8, None,
                  f"rel err {err:.1e} (bf16 GEMM alone ~4e-3); quantising the activation {t_q * 1e3:.2f} ms vs GEMM "
                  f"{t_8 * 1e3:.2f} ms"))
        del a, w, a8, w8, out, ref
    eager = b.metrics.get(f"tower.phiclip_eager.b{bs}")
    if eager:
        layers = vc["num_hidden_layers"] - 1
        t_batch = bs / eager
        projected = bs / max(1e-9, t_batch - layers * saved)
        b.row(Row(f"FP8 projection (not measured): eager tower at batch {bs} with its 4 GEMMs per layer in FP8 (crops/s)",
                  f"{eager:.0f}", f"{projected:.0f}", projected / eager, None,
                  "GEMM time saved minus activation quantisation, times the layers; accuracy not checked on the tower"))


def _compile_params(b: Bench, scope: str, mode: str, batch: int) -> dict[str, Any]:
    return {"ckpt": str(b.ensure_ckpt()), "scope": scope, "mode": mode, "batch": batch, "hd_images": b.plan.hd_images,
            "repeats": b.plan.repeats, "warmup": b.plan.warmup, "tmp": str(b.tmp),
            "hf_rate": b.metrics.get(f"tower.hf_hidden.b{batch}"), "hd_baseline_s": b.metrics.get("hd.baseline_s")}


def sec_compile(b: Bench) -> None:
    reserve = b.plan.budgets["e2e_compiled"] + 10 if "e2e_compiled" in b.args.sections else 10
    for scope, mode, limit in b.plan.compile_variants:
        if mode in ("reduce-overhead", "max-autotune") and not b.cuda:
            continue
        left = b.remaining() - reserve
        if left < 30:
            print(f"  {scope}/{mode}: skipped, {left:.0f} s left before the reserve for the last sections", flush=True)
            b.report.sections.append({"name": f"compile {scope} {mode}", "status": "skipped (time)", "seconds": 0.0})
            continue
        name = variant_name(scope, mode)
        t = time.monotonic()
        status = "ok"
        try:
            got = b.run_child("compile", _compile_params(b, scope, mode, b.best_batch), min(limit, left))
            rate = got.get(f"tower.{name}.b{b.best_batch}")
            if rate:
                b.compiled_variants.append({"scope": scope, "mode": mode, "rate": rate,
                                            "compile_s": got.get(f"compile_s.{name}", math.inf)})
        except (TimeoutError, RuntimeError, OSError) as e:
            status = f"failed: {e}"
            print(f"  {scope}/{mode}: {e}", flush=True)
        b.report.sections.append({"name": f"compile {scope} {mode}", "status": status, "seconds": time.monotonic() - t})
        b.save()


def _e2e_params(b: Bench, compiled: dict[str, Any] | None) -> dict[str, Any]:
    paths = b.ensure_jpegs()
    best = max([v for k, v in b.metrics.items() if k.startswith("tower.phiclip") or k.startswith("tower.compile")] or [0.0])
    return {"ckpt": str(b.ensure_ckpt()), "jpeg_dir": str(paths[0].parent), "n": len(paths), "batch": b.plan.e2e_batch,
            "workers": b.plan.workers, "tmp": str(b.tmp), "compile": compiled, "best_tower_rate": best or None,
            "repeats": b.plan.repeats, "warmup": b.plan.warmup, "crops_per_image": crops_of(*JPEG_SIZE)}


def sec_e2e(b: Bench) -> None:
    b.run_child("e2e", _e2e_params(b, None), min(b.plan.budgets["e2e"], max(30.0, b.remaining() - 10)))


def sec_e2e_compiled(b: Bench) -> None:
    eager = b.metrics.get(f"tower.phiclip_eager.b{b.best_batch}", 0.0)
    # Non-CUDA-graph variants that compiled quickly enough to compile again at the end-to-end batch size.
    usable = [v for v in b.compiled_variants if v["mode"] in ("default", "max-autotune-no-cudagraphs") and v["compile_s"] < 90]
    if not usable:
        raise _Skip("no compiled variant ran (or none compiles in under 90 s without CUDA graphs)")
    best = max(usable, key=lambda v: v["rate"])
    if best["rate"] <= eager:
        print(f"  note: the best compiled variant ({best['rate']:.0f} crops/s) is not faster than eager ({eager:.0f})", flush=True)
    b.run_child("e2e", _e2e_params(b, {"scope": best["scope"], "mode": best["mode"]}),
                min(b.plan.budgets["e2e_compiled"], max(30.0, b.remaining() - 5)))


def clip_tag(name: str) -> str:
    """The metric-key form of a CLIP size's name (``ViT-L/14-336`` -> ``vitl14336``)."""
    return name.replace("/", "").replace("-", "").lower()


def clip_configs(quick: bool) -> dict[str, dict[str, Any]]:
    """``build_tiny_clip`` arguments of the two CLIP sizes (random weights): real size, or tiny with --quick."""
    if quick:
        tiny = dict(hidden_size=32, num_layers=2, num_heads=2, projection_dim=16)
        return {"ViT-B/32": dict(image_size=64, patch_size=32, **tiny), "ViT-L/14-336": dict(image_size=56, patch_size=14, **tiny)}
    return {
        "ViT-B/32": dict(image_size=224, patch_size=32, hidden_size=768, num_layers=12, num_heads=12, projection_dim=512,
                         text_overrides=dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8)),
        "ViT-L/14-336": dict(image_size=336, patch_size=14, hidden_size=1024, num_layers=24, num_heads=16,
                             projection_dim=768, text_overrides=dict(hidden_size=768, intermediate_size=3072,
                                                                     num_attention_heads=12, num_hidden_layers=12)),
    }


def sec_clip(b: Bench) -> None:
    """CLIP at both sizes: correctness (phiclip bfloat16 against transformers float32), model-only images/s
    of phiclip's encoder against transformers' SDPA in bfloat16 on the same device batch, and end to end
    with ``phiclip.embed`` from JPEG files against the issue's targets."""
    from transformers import CLIPModel

    from phiclip import embed, load_encoder
    from phiclip.testing import build_tiny_clip

    n = b.plan.jpegs * (1 if b.plan.quick else 4)
    t = time.perf_counter()
    paths = write_photo_jpegs(b.tmp / "clip-jpegs", n, CLIP_JPEG_SIZE, seed=300)
    print(f"  wrote {n} JPEGs {CLIP_JPEG_SIZE[0]}x{CLIP_JPEG_SIZE[1]} in {time.perf_counter() - t:.1f} s", flush=True)
    batch = 8 if b.plan.quick else 256
    for name, cfg in clip_configs(b.plan.quick).items():
        if b.out_of_time():
            raise _Skip(f"out of time before {name}")
        tag = clip_tag(name)
        t = time.perf_counter()
        ckpt = build_tiny_clip(b.tmp / f"clip-{tag}", **cfg)
        print(f"  {name}: random-weight checkpoint built in {time.perf_counter() - t:.1f} s", flush=True)
        enc = load_encoder(f"clip:{ckpt}", device=str(b.device), dtype="bfloat16")
        pre = [enc.preprocess(photo_like_image(*CLIP_JPEG_SIZE, seed=400 + i)) for i in range(batch)]
        pixels = enc.collate(pre)
        hf = CLIPModel.from_pretrained(str(ckpt), dtype=torch.bfloat16, attn_implementation="sdpa").to(b.device).eval()
        with torch.inference_mode():
            ref32 = CLIPModel.from_pretrained(str(ckpt), dtype=torch.float32).eval()
            want = ref32.get_image_features(pixel_values=pixels[:8].float())
            want = getattr(want, "pooler_output", want).float().numpy()
            del ref32
        got = enc.encode_batch(pixels[:8]).embeddings
        cos = mean_cos(torch.as_tensor(np.asarray(got, dtype=np.float32)), torch.as_tensor(want))
        b.check(f"CLIP {name}: phiclip bfloat16 vs transformers float32 image features, mean cosine {cos:.5f}", cos > 0.999)
        x = pixels.to(b.device, dtype=torch.bfloat16)

        def hf_run(hf: Any = hf, x: Any = x) -> Any:
            with torch.inference_mode():
                out = hf.get_image_features(pixel_values=x)
                return getattr(out, "pooler_output", out)

        def ours(enc: Any = enc, pixels: Any = pixels) -> Any:
            return enc.encode_batch(pixels).embeddings

        hf_s, _ = time_device(hf_run, b.plan.repeats, b.plan.warmup, b.cuda, deadline=b.deadline())
        our_s, _ = time_device(ours, b.plan.repeats, b.plan.warmup, b.cuda, deadline=b.deadline())
        hf_rate, our_rate = batch / hf_s, batch / our_s
        b.metric(f"clip.{tag}.model_images_per_s", our_rate)
        b.metric(f"clip.{tag}.hf_model_images_per_s", hf_rate)
        b.row(Row(f"CLIP {name}, model only, batch {batch}, bfloat16: transformers get_image_features (SDPA) vs phiclip "
                  "encode_batch, pixels from the host (images/s)", f"{hf_rate:.0f}", f"{our_rate:.0f}", our_rate / hf_rate))
        del hf
        if b.cuda:
            torch.cuda.empty_cache()
        out = b.tmp / f"clip-{tag}-out"
        warm = b.tmp / f"clip-{tag}-warm.txt"
        warm.write_text("\n".join(str(q) for q in paths[: max(2, batch)]) + "\n")
        embed(enc, warm, out / "warm", batch_size=batch, num_workers=b.plan.workers, progress=False)
        res = embed(enc, paths[0].parent, out / "run", batch_size=batch, num_workers=b.plan.workers, progress=False)
        ok = res.embedded == n and res.failed == 0
        b.check(f"CLIP {name} end to end: {res.embedded} embedded, {res.failed} failed of {n}", ok)
        img_s = res.processed / res.timings.get("loop", res.seconds)
        target = CLIP_TARGETS[name]
        b.metric(f"clip.{tag}.e2e_images_per_s", img_s)
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in res.timings.items())
        b.row(Row(f"CLIP {name} end to end, {n} JPEGs {CLIP_JPEG_SIZE[0]}x{CLIP_JPEG_SIZE[1]} -> Parquet, batch {batch}, "
                  f"{b.plan.workers} workers, bfloat16 (images/s; target {target:.0f})", f"{target:.0f}", f"{img_s:.0f}",
                  img_s / target, 1.0, f"model only {our_rate:.0f} images/s ({img_s / our_rate:.0%} of it); {stages}"))
        if name == "ViT-B/32":
            try:
                clip_inputs(b, enc, f"clip:{ckpt}", paths, batch, img_s)
            except Exception as e:  # noqa: BLE001 - the L/14 rows still run
                traceback.print_exc()
                b.check(f"CLIP ViT-B/32 shards / Ray engine: {type(e).__name__}: {str(e)[:200]}", False)
        del enc
        gc.collect()
        if b.cuda:
            torch.cuda.empty_cache()


def clip_inputs(b: Bench, enc: Any, spec: str, paths: list[Path], batch: int, folder_rate: float) -> None:
    """The same JPEGs as WebDataset shards (100 per tar), and the folder through the Ray engine with one
    actor on one GPU (when Ray is installed), each against the folder's end-to-end rate."""
    import tarfile

    from phiclip import embed

    shards = b.tmp / "clip-shards"
    shards.mkdir(exist_ok=True)
    per = 100
    for k in range(0, len(paths), per):
        with tarfile.open(shards / f"{k // per:05d}.tar", "w") as tf:
            for q in paths[k:k + per]:
                tf.add(str(q), arcname=f"{q.stem}.jpg")
    last = (len(paths) - 1) // per
    res = embed(enc, str(shards / f"{{00000..{last:05d}}}.tar"), b.tmp / "clip-wds-out", batch_size=batch,
                num_workers=b.plan.workers, progress=False)
    b.check(f"CLIP ViT-B/32 from WebDataset shards: {res.embedded} embedded, {res.failed} failed of {len(paths)}",
            res.embedded == len(paths) and res.failed == 0)
    rate = res.processed / res.timings.get("loop", res.seconds)
    b.metric("clip.vitb32.wds_images_per_s", rate)
    b.row(Row(f"CLIP ViT-B/32 end to end from {last + 1} WebDataset shards of the same JPEGs vs the folder (images/s)",
              f"{folder_rate:.0f}", f"{rate:.0f}", rate / folder_rate, 0.9))
    try:
        import ray
    except ImportError:
        b.check("CLIP ViT-B/32 through the Ray engine: skipped, Ray is not installed (phiclip[ray])")
        return
    t = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), num_gpus=torch.cuda.device_count() if b.cuda else 0, include_dashboard=False,
             logging_level="ERROR")
    try:
        embed(spec, paths[0].parent, b.tmp / "clip-ray-warm", batch_size=batch, engine="ray", num_actors=1,
              gpus_per_actor=1.0 if b.cuda else 0.0, progress=False, precision="bfloat16")
        print(f"  Ray engine warm-up run (Ray start, actor load) {time.perf_counter() - t:.1f} s", flush=True)
        res = embed(spec, paths[0].parent, b.tmp / "clip-ray-out", batch_size=batch, engine="ray", num_actors=1,
                    gpus_per_actor=1.0 if b.cuda else 0.0, progress=False, precision="bfloat16")
    finally:
        ray.shutdown()
    b.check(f"CLIP ViT-B/32 through the Ray engine: {res.embedded} embedded, {res.failed} failed of {len(paths)}",
            res.embedded == len(paths) and res.failed == 0)
    rate = res.embedded / res.seconds
    b.metric("clip.vitb32.ray_images_per_s", rate)
    b.row(Row("CLIP ViT-B/32 end to end through the Ray engine, one actor on one GPU, whole call vs the local folder "
              "loop (images/s)", f"{folder_rate:.0f}", f"{rate:.0f}", rate / folder_rate, None,
              "the Ray figure includes listing, scheduling and the actor's load"))


def sec_summary(b: Bench) -> None:
    mt = b.metrics
    towers = {k: v for k, v in mt.items() if k.startswith(("tower.phiclip", "tower.compile"))}
    if towers:
        key = max(towers, key=towers.__getitem__)
        rate = towers[key]
        bs = key.rsplit(".b", 1)[1]
        hf = mt.get(f"tower.hf_hidden.b{bs}")
        ceiling = mt.get("ceiling.crops_per_s")
        b.row(Row(f"SUMMARY tower: best phiclip variant {key.split('.')[1]} at batch {bs} vs the {TARGET_TOWER:.0f} "
                  "crops/s target (crops/s)", f"{TARGET_TOWER:.0f}", f"{rate:.0f}", rate / TARGET_TOWER, 1.0,
                  (f"{rate / hf:.2f}x HF SDPA bf16 hidden_states ({hf:.0f}) at the same batch; " if hf else "")
                  + (f"{rate / ceiling:.0%} of the measured ceiling {ceiling:.0f}" if ceiling else "")))
    hd = {k: v for k, v in mt.items() if k.startswith("hd.") and k.endswith("_s") and k != "hd.baseline_s"}
    if hd and mt.get("hd.baseline_s"):
        key = min(hd, key=hd.__getitem__)
        b.row(Row(f"SUMMARY tower + HD path, mixed images: best phiclip variant {key[3:-2]} vs the released path (s)",
                  f"{mt['hd.baseline_s']:.3f}", f"{hd[key]:.3f}", mt["hd.baseline_s"] / hd[key], TARGET_HD))
    e2e = {k[: -len(".ratio")]: v for k, v in mt.items() if k.startswith("e2e.") and k.endswith(".ratio")}
    if e2e:
        key = max(e2e, key=e2e.__getitem__)
        b.row(Row(f"SUMMARY end to end: best ({key[4:]}) vs its tower-only rate (crops/s)",
                  f"{mt.get(key + '.tower_crops_per_s', 0):.0f}", f"{mt.get(key + '.crops_per_s', 0):.0f}", e2e[key], TARGET_E2E))
        images = mt.get(key + ".images_per_s", 0.0)
        b.row(Row(f"SUMMARY Phi-3-vision end to end, {JPEG_SIZE[0]}x{JPEG_SIZE[1]} JPEGs, num_crops 16 ({key[4:]}) vs "
                  f"{TARGET_PHI3V_IMAGES:.0f} images/s", f"{TARGET_PHI3V_IMAGES:.0f}", f"{images:.1f}",
                  images / TARGET_PHI3V_IMAGES, 1.0))
    for name, target in CLIP_TARGETS.items():
        tag = clip_tag(name)
        rate = mt.get(f"clip.{tag}.e2e_images_per_s")
        if rate is not None:
            model = mt.get(f"clip.{tag}.model_images_per_s", 0.0)
            hf = mt.get(f"clip.{tag}.hf_model_images_per_s", 0.0)
            b.row(Row(f"SUMMARY CLIP {name} end to end vs {target:.0f} images/s", f"{target:.0f}", f"{rate:.0f}",
                      rate / target, 1.0, f"model only {model:.0f} images/s, {model / hf:.2f}x transformers SDPA bf16"
                      if hf else ""))


# ==============================================================================================
# Child processes: compiled variants and end to end
# ==============================================================================================
class Emitter:
    """Reports results from a child process as tagged JSON lines on stdout."""

    def _send(self, event: dict[str, Any]) -> None:
        print(EVENT + json.dumps(event, default=float), flush=True)

    def row(self, row: Row) -> None:
        self._send({"type": "row", "row": asdict(row)})

    def check(self, text: str, ok: bool = True) -> None:
        self._send({"type": "check", "text": text, "ok": bool(ok)})

    def metric(self, key: str, value: float) -> None:
        self._send({"type": "metric", "key": key, "value": float(value)})


def child_compile(em: Emitter, p: dict[str, Any], device: torch.device) -> None:
    """One ``torch.compile`` variant: compile time, agreement with eager, tower rate, HD path time."""
    from phiclip.phi3v import Phi3VImageEmbedding

    cuda = device.type == "cuda"
    bs, scope, mode = p["batch"], p["scope"], p["mode"]
    name = variant_name(scope, mode)
    label = f"torch.compile {scope if scope == 'full' else 'per layer'}, mode {mode}"
    model = Phi3VImageEmbedding.from_pretrained(p["ckpt"], torch_dtype=torch.bfloat16, device=device, max_crops_per_batch=bs)
    tower = model.img_processor
    x = random_crops(bs, device, torch.bfloat16, seed=bs)
    inputs = mixed_inputs(p["hd_images"])
    pv, sizes = inputs.pixel_values.to(device), inputs.image_sizes
    real = int(sum(inputs.num_crops_per_image))

    def timed(fn: Callable[[], Any]) -> float:
        med, times = time_device(fn, p["repeats"], p["warmup"], cuda)
        print(f"runs: {', '.join(f'{t * 1e3:.1f}' for t in times)} ms", flush=True)
        return med

    with torch.no_grad():
        ref = tower(x).clone()
        ref_tokens = model.image_tokens(pv, sizes)
        eager = bs / timed(lambda: tower(x))
        print(f"eager in this process: {eager:.0f} crops/s; compiling {label} at batch {bs} ...", flush=True)
        fixed = compiled_tower(tower, scope, mode, bs)
        t = time.perf_counter()
        out = fixed(x)
        if cuda:
            torch.cuda.synchronize()
        first = time.perf_counter() - t
        em.metric(f"compile_s.{name}", first)
        err = rel_err(out, ref)
        em.check(f"{label}: compile + first call {first:.1f} s; output vs eager rel err {err:.1e}", finite(out) and err < 2e-2)
        rate = bs / timed(lambda: fixed(x))
        em.metric(f"tower.{name}.b{bs}", rate)
        hf = p.get("hf_rate")
        em.row(Row(f"tower, batch {bs}: phiclip {label} (crops/s)", f"{hf:.0f}" if hf else f"eager {eager:.0f}", f"{rate:.0f}",
                   rate / (hf or eager), None, f"{rate / TARGET_TOWER:.2f} of target; {rate / eager:.2f}x eager in the same "
                   f"process; compile {first:.0f} s"))
        model.img_processor = fixed
        toks = model.image_tokens(pv, sizes)
        cos = mean_cos(toks, ref_tokens)
        em.check(f"{label}: HD-path tokens vs eager mean cosine {cos:.5f}", cos > 0.99)
        t_hd = timed(lambda: model.image_tokens(pv, sizes))
        em.metric(f"hd.{name}_s", t_hd)
        base = p.get("hd_baseline_s")
        if base:
            em.row(Row(f"tower + HD path, {p['hd_images']} mixed images ({real} real crops): phiclip {label} (s)",
                       f"{base:.3f}", f"{t_hd:.3f}", base / t_hd, TARGET_HD, f"{real / t_hd:.0f} crops/s"))


def child_e2e(em: Emitter, p: dict[str, Any], device: torch.device) -> None:
    """``phiclip.embed`` on the JPEG folder (timed after a warm-up run), against the tower-only rate
    of the same encoder in the same process."""
    import pyarrow.parquet as pq

    from phiclip import embed, load_encoder

    cuda = device.type == "cuda"
    bs, workers, n = p["batch"], p["workers"], p["n"]
    enc = load_encoder(f"phi3v:{p['ckpt']}?max_crops={bs}", device=str(device), dtype="bfloat16")
    label = "eager"
    if p.get("compile"):
        c = p["compile"]
        enc.model.img_processor = compiled_tower(enc.model.img_processor, c["scope"], c["mode"], bs)
        label = variant_name(c["scope"], c["mode"])
    # The runner encodes under inference_mode (+ bf16 autocast on CUDA): time the tower-only rate the same way.
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    x = random_crops(bs, device, torch.bfloat16, seed=7)
    with torch.inference_mode(), amp:
        t = time.perf_counter()
        enc.model.crop_features(x)
        if cuda:
            torch.cuda.synchronize()
        print(f"first tower call ({label}): {time.perf_counter() - t:.1f} s", flush=True)
        med, times = time_device(lambda: enc.model.crop_features(x), p["repeats"], p["warmup"], cuda)
    tower_rate = bs / med
    print(f"tower-only {tower_rate:.0f} crops/s (runs {', '.join(f'{s * 1e3:.1f}' for s in times)} ms)", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"e2e-{label}-", dir=p["tmp"]))
    paths = sorted(Path(p["jpeg_dir"]).glob("*.jpg"))
    warm = tmp / "warm.txt"
    warm.write_text("\n".join(str(q) for q in paths[: max(2, 2 * bs // p["crops_per_image"])]) + "\n")
    t = time.perf_counter()
    embed(enc, warm, tmp / "out-warm", batch_size=bs, num_workers=min(2, workers), progress=False)
    print(f"warm-up run: {time.perf_counter() - t:.1f} s", flush=True)
    res = embed(enc, p["jpeg_dir"], tmp / "out", batch_size=bs, num_workers=workers, progress=False, shard_size=max(1, n))
    from phiclip import schema

    table = pq.read_table(str(tmp / "out" / schema.EMBEDDINGS_DIR))
    col = table.column(schema.COL_EMBEDDING).combine_chunks()
    vecs = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(col), -1)
    ok = res.embedded == n and res.failed == 0 and vecs.shape == (n, enc.dim) and bool(np.isfinite(vecs).all())
    em.check(f"end to end ({label}): {res.embedded} embedded, {res.failed} failed of {n}; vectors {vecs.shape}, finite", ok)
    loop = res.timings.get("loop", res.seconds)
    img_s = res.processed / loop
    crops_s = img_s * p["crops_per_image"]
    key = f"e2e.{label}"
    em.metric(f"{key}.images_per_s", img_s)
    em.metric(f"{key}.crops_per_s", crops_s)
    em.metric(f"{key}.tower_crops_per_s", tower_rate)
    em.metric(f"{key}.ratio", crops_s / tower_rate)
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in res.timings.items())
    nw = min(workers, math.ceil(n / bs))
    em.row(Row(f"end to end, {n} JPEGs {JPEG_SIZE[0]}x{JPEG_SIZE[1]} -> Parquet with phiclip.embed ({label}, batch {bs} crops, "
               f"{nw} busy workers of {workers}) vs tower-only at the same batch (crops/s)", f"{tower_rate:.0f}", f"{crops_s:.0f}",
               crops_s / tower_rate, TARGET_E2E, f"{img_s:.1f} images/s; whole call {res.seconds:.1f} s; {stages}; main process "
               f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs"))
    best = p.get("best_tower_rate")
    if best:
        em.row(Row("  same, vs the best tower-only rate measured in this run (any batch, any variant) (crops/s)",
                   f"{best:.0f}", f"{crops_s:.0f}", crops_s / best, TARGET_E2E))


def child_main(args: argparse.Namespace) -> None:
    _die_with_parent()
    params = json.loads(Path(args.child_params).read_text())
    device = torch.device(args.device)
    em = Emitter()
    try:
        {"compile": child_compile, "e2e": child_e2e}[args.child](em, params, device)
    except Exception:
        traceback.print_exc()
        sys.stdout.flush()
        raise SystemExit(1) from None


# ==============================================================================================
# Main
# ==============================================================================================
def run_section(b: Bench, name: str, fn: Callable[[Bench], None]) -> None:
    budget = b.plan.budgets.get(name, 60.0)
    left = b.remaining()
    if left < 5:
        b.report.sections.append({"name": name, "status": "skipped (time)", "seconds": 0.0})
        print(f"\n=== {name}: skipped, {left:.0f} s left", flush=True)
        b.save()
        return
    b.section_deadline = time.monotonic() + min(budget, left)
    print(f"\n=== {name} (budget {min(budget, left):.0f} s; {left:.0f} s left in the run) ===", flush=True)
    t = time.monotonic()
    status = "ok"
    try:
        fn(b)
    except _Skip as e:
        status = f"skipped: {e}"
    except Exception as e:  # noqa: BLE001 - one section's failure must not lose the rest
        traceback.print_exc()
        sys.stdout.flush()
        status = f"failed: {type(e).__name__}: {str(e)[:200]}"
    finally:
        b.section_deadline = math.inf
        later = b.args.sections[b.args.sections.index(name) + 1:]
        if not {"correctness", "tower", "hd"} & set(later):
            b.free()  # the bf16 models are shared by correctness, tower and hd; children load their own
        gc.collect()
        if b.cuda:
            torch.cuda.empty_cache()
    seconds = time.monotonic() - t
    if name != "compile" or status != "ok":  # compile adds a line per variant
        b.report.sections.append({"name": name, "status": status, "seconds": seconds})
    print(f"=== {name}: {status} in {seconds:.0f} s", flush=True)
    b.save()


@contextlib.contextmanager
def _logging_to(log_dir: Path | None) -> Iterator[None]:
    if log_dir is None:
        yield
        return
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "log.txt", "a", encoding="utf-8") as log:
        out, err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(out, log), _Tee(err, log)
        try:
            yield
        finally:
            sys.stdout, sys.stderr = out, err


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--log-dir", default=os.environ.get("PHICLIP_BENCH_LOG_DIR"),
                    help="write log.txt, results.md, results.json, nvidia-smi.txt here (default: $PHICLIP_BENCH_LOG_DIR)")
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:1, or cpu (with --quick)")
    ap.add_argument("--quick", action="store_true", help="tiny tower and sizes: a smoke test of every section (CPU is fine)")
    ap.add_argument("--only", default=None, help=f"comma-separated sections, in run order: {','.join(SECTIONS)}")
    ap.add_argument("--time-limit", type=float, default=None, help="seconds for the whole run (default 505; quick 420)")
    ap.add_argument("--child", choices=["compile", "e2e"], help=argparse.SUPPRESS)
    ap.add_argument("--child-params", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_main(args)
        return
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available here (torch {torch.__version__}); "
                         "run on a GPU machine, or use --quick --device cpu for a smoke test")
    if not args.quick and torch.device(args.device).type != "cuda":
        raise SystemExit("the full benchmark needs a GPU (--device cuda); use --quick --device cpu for a smoke test")
    args.sections = [s.strip() for s in args.only.split(",")] if args.only else list(SECTIONS)
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"--only: unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    plan = Plan.make(args.quick, torch.device(args.device).type == "cuda", args.time_limit)
    log_dir = Path(args.log_dir) if args.log_dir else None
    fns = {"env": sec_env, "ceilings": sec_ceilings, "correctness": sec_correctness, "tower": sec_tower, "hd": sec_hd,
           "input": sec_input, "e2e": sec_e2e, "clip": sec_clip, "fp8": sec_fp8, "compile": sec_compile, "e2e_compiled": sec_e2e_compiled,
           "summary": sec_summary}
    with _logging_to(log_dir), tempfile.TemporaryDirectory(prefix="phiclip-gpu-bench-") as tmp:
        b = Bench(args, plan, Path(tmp))

        def on_term(signum: int, _frame: Any) -> None:
            raise _Stop(f"signal {signum}")

        signal.signal(signal.SIGTERM, on_term)
        print(f"phiclip GPU benchmark: device {b.device}, quick={plan.quick}, time limit {plan.time_limit:.0f} s, "
              f"sections {','.join(args.sections)}, log dir {log_dir}", flush=True)
        try:
            for name in args.sections:
                run_section(b, name, fns[name])
        except (_Stop, KeyboardInterrupt) as e:
            print(f"\nstopped ({e!r}); saving what was measured", flush=True)
            b.report.sections.append({"name": "stopped", "status": repr(e), "seconds": time.monotonic() - b.t0})
        finally:
            b.kill_child()
            b.free()
            b.save()
            print("\n" + b.report.markdown(), flush=True)
            print(f"\ntotal {time.monotonic() - b.t0:.0f} s; results in {log_dir or '(no --log-dir)'}", flush=True)


if __name__ == "__main__":
    main()
