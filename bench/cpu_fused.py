"""The fused bfloat16 CPU tower (phiclip.cpu.fused) against phiclip's plain bfloat16 copy
(``quantize.float_copy``) and float32, model only, interleaved in one process (rotating order).

    python bench/cpu_fused.py                    # both parts
    python bench/cpu_fused.py --only clip --repeats 9

Parts:

* ``clip``: CLIP ViT-B/32 (random weights, ``phiclip.testing.build_tiny_clip`` at 224 px, patch 32,
  width 768, 12 layers, 12 heads, projection 512), ``CLIPImageFeatures`` on 32 images.
* ``tower``: the Phi-3-vision image path's CLIP tower at ViT-L width (1024, MLP 4096, 16 heads,
  336 px / patch 14; ``--tower-layers`` layers built, the last one not run as in the released
  ``layer_idx=-2``), ``Phi3VImageEmbedding.crop_features`` on ``--crops`` crops (chunks of 4).

Every contender's output is compared with float32 (min cosine over vectors / tokens). Times: min,
median and max over the repeats, so that a shared machine's noise shows.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import cpu_description, time_interleaved_all  # noqa: E402


def _min_cosine(ref: torch.Tensor, out: torch.Tensor) -> float:
    a, b = ref.float().reshape(-1, ref.shape[-1]), out.float().reshape(-1, out.shape[-1])
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min())


def _table(title: str, times: dict[str, list[float]], cosines: dict[str, float], base: str) -> None:
    print(f"\n{title}")
    print(f"{'contender':<28} {'min s':>8} {'median s':>9} {'max s':>8} {'vs ' + base:>12} {'min cos vs fp32':>16}")
    ref = statistics.median(times[base])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<28} {min(ts):8.3f} {med:9.3f} {max(ts):8.3f} {ref / med:11.2f}x {cosines[name]:16.6f}")


def bench_clip(repeats: int, images: int) -> None:
    from transformers import CLIPModel

    from phiclip.cpu.fused import fused_cpu_copy
    from phiclip.cpu.int8 import float_copy
    from phiclip.models.clip_vision import CLIPImageFeatures
    from phiclip.testing import build_tiny_clip

    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_clip(Path(tmp) / "vitb32", image_size=224, patch_size=32, hidden_size=768, num_layers=12,
                               num_heads=12, projection_dim=512)
        model = CLIPModel.from_pretrained(path, use_safetensors=True).eval()
    fp32 = CLIPImageFeatures.from_clip_model(model)
    assert fp32 is not None
    contenders = {"phiclip float32": fp32, "phiclip bf16 (float_copy)": float_copy(fp32, torch.bfloat16),
                  "phiclip bf16 fused (oneDNN)": fused_cpu_copy(fp32, torch.bfloat16)}
    if contenders["phiclip bf16 fused (oneDNN)"] is None:
        print("fused path unavailable in this torch build")
        del contenders["phiclip bf16 fused (oneDNN)"]
    x = torch.randn(images, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = fp32(x)
        cos = {n: _min_cosine(ref, m(x)) for n, m in contenders.items()}
        fns = {n: (lambda m=m: m(x)) for n, m in contenders.items()}
        times = time_interleaved_all(fns, repeats)
    _table(f"CLIP ViT-B/32 (random weights), CLIPImageFeatures, {images} images, model only, {repeats} repeats",
           times, cos, "phiclip bf16 (float_copy)")


def bench_tower(repeats: int, crops: int, layers: int) -> None:
    from phiclip.cpu.fused import fuse_phi3v_tower_
    from phiclip.phi3v import Phi3VImageEmbedding
    from phiclip.testing import build_tiny_phi3v

    vision = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": layers, "num_attention_heads": 16,
              "image_size": 336, "patch_size": 14, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_phi3v(Path(tmp) / "phi3v", vision_config=vision, num_crops=4)
        fp32 = Phi3VImageEmbedding.from_pretrained(path, torch_dtype=torch.float32)
        bf16 = Phi3VImageEmbedding.from_pretrained(path, torch_dtype=torch.bfloat16)
        fused = Phi3VImageEmbedding.from_pretrained(path, torch_dtype=torch.bfloat16)
    if not fuse_phi3v_tower_(fused):
        print("fused path unavailable in this torch build")
        return
    contenders = {"phiclip float32": fp32, "phiclip bf16 (torch ops)": bf16, "phiclip bf16 fused (oneDNN)": fused}
    x = torch.randn(crops, 3, 336, 336, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = fp32.crop_features(x)
        cos = {n: _min_cosine(ref, m.crop_features(x)) for n, m in contenders.items()}
        fns = {n: (lambda m=m: m.crop_features(x)) for n, m in contenders.items()}
        times = time_interleaved_all(fns, repeats)
    _table(f"Phi-3-vision tower crop_features: ViT-L width (1024), {fp32.num_layers_run} layers run, {crops} crops "
           f"(chunks of 4), {repeats} repeats", times, cos, "phiclip bf16 (torch ops)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=["clip", "tower"], default=["clip", "tower"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--crops", type=int, default=8)
    ap.add_argument("--tower-layers", type=int, default=5)
    args = ap.parse_args(argv)
    print(f"CPU: {cpu_description()}, {os.cpu_count()} CPUs; torch {torch.__version__}, {torch.get_num_threads()} threads")
    if "clip" in args.only:
        bench_clip(args.repeats, args.images)
    if "tower" in args.only:
        bench_tower(args.repeats, args.crops, args.tower_layers)


if __name__ == "__main__":
    main()
