"""The Ray engine against the local engine on the same folder and model (``phiclip embed``'s two engines).

    python bench/ray_engine.py                       # 2000 photo-like images, a tiny CLIP, a local Ray instance
    python bench/ray_engine.py --images 20000 --model clip:openai/clip-vit-base-patch32 --gpus-per-actor 1

Each engine embeds the folder into a new output; the Ray run starts its own local Ray instance (or joins
``--ray-address``). Printed per engine: wall time, images/s, and the per-stage seconds of the run
(``wait`` on the driver, summed ``read_decode_preprocess`` and ``encode`` of the tasks and actors), plus
the Ray start-up cost measured apart (``ray.init``; model probe + actor start are in the run's
``setup``/``wait``). The outputs are checked to hold the same ids and vectors to 1e-5.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _folder(root: Path, n: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = int(rng.integers(200, 400)), int(rng.integers(150, 300))
        base = rng.integers(0, 255, size=(h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((w, h), Image.BILINEAR)
        img.save(root / f"{i:06d}.jpg", quality=90)
    return root


def _vectors(out: Path) -> tuple[list[str], np.ndarray]:
    import pandas as pd

    df = pd.concat([pd.read_parquet(f) for f in sorted((out / "embeddings").glob("*.parquet"))])
    return list(df.id), np.stack(df.embedding).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--model", default=None, help="encoder spec (default: a tiny random CLIP built here)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--ray-address", default=None)
    ap.add_argument("--gpus-per-actor", type=float, default=None)
    ap.add_argument("--num-actors", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="float32")
    ap.add_argument("--work", default=None, help="folder for inputs and outputs (default: a temporary one)")
    args = ap.parse_args()

    from phiclip.pipeline import embed

    work = Path(args.work or tempfile.mkdtemp(prefix="phiclip-ray-bench-"))
    images = work / "images"
    if not images.is_dir():
        _folder(images, args.images)
    model = args.model
    if model is None:
        from phiclip.testing import build_tiny_clip

        model = f"clip:{build_tiny_clip(work / 'tiny_clip', image_size=32, patch_size=16)}"
    for old in ("out-local", "out-ray"):
        shutil.rmtree(work / old, ignore_errors=True)
    common = dict(batch_size=args.batch_size, device=args.device, precision=args.precision, dtype="float32",
                  progress=False)
    report = {}
    t0 = time.perf_counter()
    res = embed(model, images, work / "out-local", engine="local", **common)
    report["local"] = {"seconds": time.perf_counter() - t0, "images_per_s": res.processed / (time.perf_counter() - t0),
                       "timings": res.timings}

    import ray

    t0 = time.perf_counter()
    ray.init(address=args.ray_address, include_dashboard=False, logging_level="ERROR")
    init = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = embed(model, images, work / "out-ray", engine="ray", gpus_per_actor=args.gpus_per_actor,
                num_actors=args.num_actors, **common)
    wall = time.perf_counter() - t0
    report["ray"] = {"ray_init_seconds": init, "seconds": wall, "images_per_s": res.processed / wall, "timings": res.timings,
                     "resources": ray.cluster_resources()}
    ids_l, v_l = _vectors(work / "out-local")
    ids_r, v_r = _vectors(work / "out-ray")
    assert ids_l == ids_r and float(np.abs(v_l - v_r).max()) <= 1e-5, "the two engines disagree"
    json.dump(report, sys.stdout, indent=2, default=str)
    print()


if __name__ == "__main__":
    main()
