"""Shared helpers of the benchmark scripts: timing, peak memory, sample images, the result table."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# Photo-like sizes: 4:3, 16:9, portrait 9:16, square, 3:2 portrait.
PHOTO_SIZES = ((1600, 1200), (1920, 1080), (1080, 1920), (1000, 1000), (800, 1200), (1280, 960))


def photo_like_images(n: int, seed: int = 0, sizes: tuple[tuple[int, int], ...] = PHOTO_SIZES) -> list[Image.Image]:
    """Smooth random images (gradients + blobs, so JPEG and resizing behave like on photos)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        small = rng.integers(0, 256, (max(2, h // 64), max(2, w // 64), 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
        out.append(img)
    return out


def time_it(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after ``warmup`` runs, in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def time_interleaved_all(fns: dict[str, Callable[[], Any]], repeats: int = 3, warmup: int = 1) -> dict[str, list[float]]:
    """Every wall time (seconds) of each function, the functions run in turn so that a slow spell
    of a shared machine hits every one of them alike. The order rotates every round (a b c, b c a,
    c a b, ...): what runs right after a memory-hungry baseline pays for the memory the allocator
    just gave back to the system (measured here: about 10 %), so no function may always sit there.
    ``warmup`` untimed rounds first."""
    names = list(fns)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t)
    return times


def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int = 3, warmup: int = 1) -> dict[str, float]:
    """Median wall time (seconds) of each function, timed by :func:`time_interleaved_all`."""
    return {name: statistics.median(ts) for name, ts in time_interleaved_all(fns, repeats, warmup).items()}


def peak_rss_of(code: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``code`` in a fresh Python process; return its printed JSON plus its peak RSS (MiB)."""
    wrapper = (
        "import json, resource, time\n"
        "t0 = time.perf_counter()\n"
        f"{code}\n"
        # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across fork+exec, so a child would report its
        # parent's peak; the high-water mark of the child's own address space starts afresh.
        "hwm = [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
        "print(json.dumps({'peak_rss_mib': hwm / 1024, "
        "'seconds': time.perf_counter() - t0, **globals().get('RESULT', {})}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"subprocess failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@dataclass
class Row:
    """One line of the result table."""

    what: str
    baseline: str
    phiclip: str
    ratio: float
    target: float | None = None
    note: str = ""
    higher_is_better: bool = True

    @property
    def met(self) -> str:
        if self.target is None:
            return ""
        return "yes" if self.ratio >= self.target else "NO"


@dataclass
class Report:
    title: str
    rows: list[Row] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    env: dict[str, Any] = field(default_factory=dict)

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| what | baseline | phiclip | ratio | target | met | note |", "|---|---|---|---|---|---|---|"]
        for r in self.rows:
            tgt = f">= {r.target:g}x" if r.target is not None else ""
            lines.append(f"| {r.what} | {r.baseline} | {r.phiclip} | {r.ratio:.2f}x | {tgt} | {r.met} | {r.note} |")
        lines += ["", "Correctness checks (run before timing):", *[f"- {c}" for c in self.checks], "",
                  "Environment: " + ", ".join(f"{k} {v}" for k, v in self.env.items())]
        return "\n".join(lines)

    def save(self, log_dir: str | Path | None) -> None:
        if not log_dir:
            return
        d = Path(log_dir)
        d.mkdir(parents=True, exist_ok=True)
        (d / "results.md").write_text(self.markdown() + "\n")
        (d / "results.json").write_text(json.dumps({"title": self.title, "rows": [asdict(r) for r in self.rows],
                                                     "checks": self.checks, "env": self.env}, indent=2))


def cpu_description() -> str:
    """The CPU model and the instruction sets that decide 16-bit and int8 speed (AMX, AVX512-BF16,
    VNNI...), as every benchmark table records them."""
    from phiclip.cpu.precision import cpu_isa_flags, cpu_name

    return f"{cpu_name()}; ISA: {' '.join(cpu_isa_flags()) or 'none of note'}"


def environment() -> dict[str, Any]:
    import torch
    import transformers

    from phiclip.cpu.precision import cpu_isa_flags, cpu_name

    cpu = cpu_name() or platform.processor() or ""
    env = {"cpu": cpu, "isa": " ".join(cpu_isa_flags()), "cores": os.cpu_count(), "torch threads": torch.get_num_threads(),
           "torch": torch.__version__,
           "transformers": transformers.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- GPU benchmark helpers (bench/gpu.py) ----------------------------------------------------------
def photo_like_image(width: int, height: int, seed: int) -> Image.Image:
    """One smooth random image of ``width x height`` (the same recipe as :func:`photo_like_images`)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, height // 64), max(2, width // 64), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)


def structured_photo(width: int, height: int, seed: int) -> Image.Image:
    """A distinct photo-like image with structure (for planted-copy benchmarks): a two-colour gradient at
    a random angle, a multi-octave value-noise texture, then 6-14 random shapes (ellipses, rectangles,
    polygons, thick lines) in random colours and opacities, slightly blurred. Every seed gives a different
    layout and palette, so two images are not near copies of each other."""
    from PIL import ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    t = (np.cos(angle) * xx / width + np.sin(angle) * yy / height)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    img = c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]
    noise = np.zeros((height, width), np.float32)
    for octave in range(4):  # value noise: random grids upsampled, finer grids weaker
        cells = 3 * 2 ** octave
        grid = rng.uniform(-1, 1, (cells + 1, cells + 1)).astype(np.float32)
        up = Image.fromarray(grid).resize((width, height), Image.Resampling.BICUBIC)
        noise += np.asarray(up, np.float32) / 2 ** octave
    img += rng.uniform(10, 45) * noise[..., None] * rng.uniform(0.5, 1.0, 3)[None, None, :]
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).convert("RGBA")
    for _ in range(int(rng.integers(6, 15))):
        layer = Image.new("RGBA", (width, height), (0, 0, 0, 0))
        draw = ImageDraw.Draw(layer)
        colour = (*(int(v) for v in rng.integers(0, 256, 3)), int(rng.integers(120, 256)))
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(0.05, 0.3) * min(width, height)
        kind = int(rng.integers(0, 4))
        if kind == 0:
            draw.ellipse([cx - r, cy - r * rng.uniform(0.4, 1.6), cx + r, cy + r * rng.uniform(0.4, 1.6)], fill=colour)
        elif kind == 1:
            draw.rectangle([cx - r, cy - r * rng.uniform(0.3, 1.5), cx + r * rng.uniform(0.5, 1.5), cy + r], fill=colour)
        elif kind == 2:
            k = int(rng.integers(3, 8))
            angles = np.sort(rng.uniform(0, 2 * np.pi, k))
            radii = r * rng.uniform(0.5, 1.3, k)
            draw.polygon([(float(cx + q * np.cos(a)), float(cy + q * np.sin(a))) for a, q in zip(angles, radii)],
                         fill=colour)
        else:
            draw.line([(cx, cy), (cx + rng.uniform(-2, 2) * r, cy + rng.uniform(-2, 2) * r)], fill=colour,
                      width=int(max(2, r / 4)))
        canvas = Image.alpha_composite(canvas, layer)
    return canvas.convert("RGB").filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))


def write_photo_jpegs(out_dir: str | Path, n: int, size: tuple[int, int] = (1920, 1080), seed: int = 0,
                      quality: int = 90, threads: int | None = None) -> list[Path]:
    """Write ``n`` photo-like JPEGs of ``size`` to ``out_dir`` (in parallel threads); returns their paths."""
    from concurrent.futures import ThreadPoolExecutor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def write(i: int) -> Path:
        path = out / f"img_{i:05d}.jpg"
        photo_like_image(size[0], size[1], seed + i).save(path, format="JPEG", quality=quality)
        return path

    with ThreadPoolExecutor(threads or min(16, os.cpu_count() or 1)) as pool:
        return list(pool.map(write, range(n)))


def time_device(fn: Callable[[], Any], repeats: int = 5, warmup: int = 2, cuda: bool = False,
                deadline: float | None = None) -> tuple[float, list[float]]:
    """Median wall time of ``fn`` (seconds) and all timed runs, with ``torch.cuda.synchronize()``
    before and after each run when ``cuda``. Stops repeating early (keeping at least one timed run)
    once ``time.monotonic()`` passes ``deadline``."""
    import torch

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    for _ in range(warmup):
        fn()
        sync()
    times: list[float] = []
    for _ in range(max(1, repeats)):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
        if deadline is not None and time.monotonic() > deadline:
            break
    return statistics.median(times), times


def vit_flops_per_crop(num_layers: int, hidden: int = 1024, intermediate: int = 4096, tokens: int = 577,
                       patch_pixels: int = 3 * 14 * 14) -> float:
    """Floating-point operations of one 336-px crop through ``num_layers`` CLIP layers (matrix
    products and attention; the patch embedding included, element-wise work not)."""
    per_layer = 2 * tokens * (4 * hidden * hidden + 2 * hidden * intermediate) + 4 * tokens * tokens * hidden
    return num_layers * per_layer + 2 * (tokens - 1) * patch_pixels * hidden
