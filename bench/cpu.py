"""CPU benchmark: phiclip's fast paths against faithful baselines, in the same process.

    python bench/cpu.py                     # everything (the loading part writes an 8.3 GB checkpoint)
    python bench/cpu.py --skip-loading      # without the full-size loading benchmark
    python bench/cpu.py --log-dir bench-logs/cpu

Correctness is checked first (same inputs, same weights: outputs equal to 1e-5 in float32), then
each part is timed (warm-up, several repeats, median) and a table of ratios is printed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from baselines import ReleasedImageEmbedding, clip_users_embed, load_clip_users, released_preprocess  # noqa: E402
from common import (  # noqa: E402
    Report,
    Row,
    cpu_description,
    environment,
    peak_rss_of,
    photo_like_images,
    time_interleaved,
    time_it,
)

# A scaled-down tower (ViT-L/14-336 geometry, narrower and shallower) so that a run takes about a minute.
BENCH_TOWER = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 6, "num_attention_heads": 4,
               "image_size": 336, "patch_size": 14, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
MIXED = ((1600, 1200), (1920, 1080), (1080, 1920), (1000, 1000))  # 4:3, 16:9, portrait, square


def max_abs(a, b) -> float:
    if isinstance(a, (list, tuple)):
        return max(max_abs(x, y) for x, y in zip(a, b, strict=True))
    return float((a.float() - b.float()).abs().max())


def bench_preprocessing(report: Report, repeats: int) -> None:
    from phiclip.phi3v import Phi3VImageProcessor

    images = photo_like_images(12)
    proc = Phi3VImageProcessor(num_crops=16)
    ref = released_preprocess(images, 16)
    ours = proc(images)
    err = max_abs(ref["pixel_values"], ours.pixel_values)
    assert err <= 1e-5 and torch.equal(ref["image_sizes"], ours.image_sizes), err
    unpadded = proc(images, padding=False)
    assert all(torch.equal(u, ours.pixel_values[i, : u.shape[0]]) for i, u in enumerate(unpadded.pixel_values))
    report.checks.append(f"preprocessing: padded output equals the released steps (max abs {err:.1e}); unpadded equals padded")
    t = time_interleaved({"base": lambda: released_preprocess(images, 16), "ours": lambda: proc(images),
                          "var": lambda: proc(images, padding=False)}, repeats)
    t_base, t_ours, t_var = t["base"], t["ours"], t["var"]
    n = len(images)
    report.rows.append(Row("Phi-3-vision preprocessing, 12 photo-size images, num_crops 16 (images/s)",
                           f"{n / t_base:.1f}", f"{n / t_ours:.1f}", t_base / t_ours, 3.0, "padded output, same values"))
    report.rows.append(Row("  same, variable-length output (padding=False)", f"{n / t_base:.1f}", f"{n / t_var:.1f}",
                           t_base / t_var, None, "no blank crops materialised"))


def bench_tokens(report: Report, repeats: int, tmp: Path) -> None:
    from phiclip.phi3v import Phi3VImageEmbedding, Phi3VImageProcessor
    from phiclip.testing import build_tiny_phi3v

    ckpt = build_tiny_phi3v(tmp / "phi3v-bench", vision_config=BENCH_TOWER, hidden_size=768)
    images = photo_like_images(len(MIXED), sizes=MIXED)
    inputs = Phi3VImageProcessor(num_crops=16)(images)
    model = Phi3VImageEmbedding.from_pretrained(ckpt).eval()
    baseline = ReleasedImageEmbedding.from_phiclip(model).eval()
    model_bf16 = Phi3VImageEmbedding.from_pretrained(ckpt, torch_dtype=torch.bfloat16).eval()
    pv, sizes = inputs.pixel_values, inputs.image_sizes
    with torch.inference_mode():
        ref = baseline.image_tokens(pv, sizes)
        ours = model.image_tokens(pv, sizes)
        err = max_abs(ref, ours)
        assert err <= 1e-5, err
        bf = model_bf16.image_tokens(pv, sizes)
        bf_err = max_abs(ref, bf)
        scale = max(float(t.abs().max()) for t in ref)
        cos = torch.nn.functional.cosine_similarity(torch.cat(ref), torch.cat(bf).float(), dim=-1).mean().item()
        report.checks.append(f"image tokens float32: equal to the released path (HF CLIPVisionModel, all crops) to {err:.1e}")
        report.checks.append(f"image tokens bfloat16 vs float32 baseline: max abs {bf_err:.3f} (values up to {scale:.1f}), mean cosine {cos:.5f}")
        t = time_interleaved({"base": lambda: baseline.image_tokens(pv, sizes), "ours": lambda: model.image_tokens(pv, sizes),
                              "bf16": lambda: model_bf16.image_tokens(pv, sizes)}, repeats)
        t_base, t_ours, t_bf = t["base"], t["ours"], t["bf16"]
    crops = int(sum(inputs.num_crops_per_image))
    what = f"Phi-3-vision image tokens, {len(images)} mixed images ({crops} real crops), tower 256-wide x 6 layers"
    report.rows.append(Row(what + ", float32 (s)", f"{t_base:.2f}", f"{t_ours:.2f}", t_base / t_ours, 1.5))
    report.rows.append(Row("  same, phiclip in bfloat16 (s)", f"{t_base:.2f}", f"{t_bf:.2f}", t_base / t_bf, 2.5,
                           f"max abs err {bf_err:.3f}, cosine {cos:.4f}"))


def bench_gemm(report: Report) -> None:
    """Why the bfloat16 option cannot be fast here: one of the tower's matrix products in each dtype."""
    a = torch.randn(9232, 1024)  # 16 crops x 577 tokens, width 1024
    w = torch.randn(4096, 1024)  # the MLP's first layer of ViT-L
    rates = {}
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        x, y = a.to(dt), w.to(dt)
        t = time_it(lambda x=x, y=y: torch.nn.functional.linear(x, y), repeats=5)
        rates[dt] = 2 * a.shape[0] * a.shape[1] * w.shape[0] / t / 1e9
    f32 = rates[torch.float32]
    report.rows.append(Row("Matrix product 9232x1024 @ 1024x4096 (GFLOP/s): float32 vs bfloat16", f"{f32:.0f}",
                           f"{rates[torch.bfloat16]:.0f}", rates[torch.bfloat16] / f32, None,
                           f"CPU: {cpu_description()}"))
    report.rows.append(Row("  same, float32 vs float16 (AVX512-FP16)", f"{f32:.0f}", f"{rates[torch.float16]:.0f}",
                           rates[torch.float16] / f32, None, "shown for reference; phiclip does not use float16 on CPU"))


def isa_peak(tmp: Path) -> dict[str, float] | None:
    """Per-core GFLOP/s of float32 FMA and AVX512-BF16 dot products, from
    ``native/isa_peak.c`` (built here with the system C compiler); None when it cannot be built or
    run (no compiler, or a CPU without these instructions)."""
    import shutil
    import subprocess

    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    src = Path(__file__).resolve().parent / "native" / "isa_peak.c"
    if cc is None:
        return None
    exe = tmp / "isa_peak"
    flags = ["-O2", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16"]
    try:
        subprocess.run([cc, *flags, str(src), "-o", str(exe)], check=True, capture_output=True, timeout=120)
        out = subprocess.run([str(exe)], check=True, capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {line.split()[0]: float(line.split()[1]) for line in out.splitlines() if line.strip()}


def bench_isa(report: Report, tmp: Path) -> None:
    """What one core can do at best in each format: the ceiling of any bfloat16 path on this CPU."""
    peak = isa_peak(tmp)
    if peak is None:
        report.checks.append("instruction peak: not measured (no C compiler, or no AVX512-BF16 on this CPU)")
        return
    f32 = peak["fp32_fma"]
    report.rows.append(Row("Instruction peak per core (GFLOP/s): float32 FMA vs AVX512-BF16 dot product (vdpbf16ps)",
                           f"{f32:.0f}", f"{peak['bf16_dot']:.0f}", peak["bf16_dot"] / f32, None,
                           "bench/native/isa_peak.c, 12 independent accumulators in registers"))


def bench_loading(report: Report, ckpt_dir: Path | None, tmp: Path) -> None:
    from synthetic import build_full_size_phi3v, parameter_counts

    ckpt = ckpt_dir or tmp / "phi3v-full"
    if not (ckpt / "model.safetensors.index.json").exists():
        print(f"writing a full-size synthetic Phi-3-vision checkpoint to {ckpt} (~8.3 GB) ...", flush=True)
        build_full_size_phi3v(ckpt)
    n_all, n_vis = parameter_counts()
    ours = peak_rss_of(
        "import torch\nfrom phiclip.phi3v import Phi3VImageEmbedding\n"
        f"m = Phi3VImageEmbedding.from_pretrained({str(ckpt)!r}, torch_dtype=torch.bfloat16)\n"
        "touched = sum(float(p.float().sum()) for p in m.parameters())  # make every weight resident\n"
        "RESULT = {'params': sum(p.numel() for p in m.parameters())}"
    )
    base = peak_rss_of(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"
        "from baselines import load_whole_state_dict\n"
        f"sd = load_whole_state_dict({str(ckpt)!r})\n"
        "touched = sum(float(t.float().sum()) for t in sd.values())  # make every tensor resident\n"
        "RESULT = {'params': sum(t.numel() for t in sd.values())}"
    )
    empty = peak_rss_of("import torch\nfrom phiclip.phi3v import Phi3VImageEmbedding\nRESULT = {}")
    report.checks.append(f"loading: phiclip loaded {ours['params'] / 1e6:.1f} M parameters (image path of {n_all / 1e9:.2f} B; "
                         f"expected {n_vis / 1e6:.1f} M minus the unused last layer and post_layernorm); baseline read {base['params'] / 1e9:.2f} B")
    report.rows.append(Row("Vision-only loading of a full-size synthetic checkpoint, bfloat16: peak RSS (MiB)",
                           f"{base['peak_rss_mib']:.0f}", f"{ours['peak_rss_mib']:.0f}", base["peak_rss_mib"] / ours["peak_rss_mib"], 5.0,
                           f"phiclip <= 1536 MiB: {'yes' if ours['peak_rss_mib'] <= 1536 else 'NO'}; python+torch alone {empty['peak_rss_mib']:.0f} MiB"))
    report.rows.append(Row("  same, load time (s)", f"{base['seconds']:.1f}", f"{ours['seconds']:.1f}", base["seconds"] / ours["seconds"]))


def bench_clip(report: Report, repeats: int, tmp: Path, n_images: int) -> None:
    import numpy as np

    from phiclip import load_encoder
    from phiclip.pipeline.step import encode_images
    from phiclip.testing import build_tiny_clip

    ckpt = build_tiny_clip(tmp / "clip-b32", image_size=224, patch_size=32, hidden_size=768, num_layers=12, num_heads=12,
                           projection_dim=512)
    images = photo_like_images(n_images, seed=1)
    enc = load_encoder(f"clip:{ckpt}", device="cpu", dtype="float32")
    hf_model, hf_processor = load_clip_users(ckpt)  # both sides loaded before timing
    ref = clip_users_embed(hf_model, hf_processor, images[:8])
    ours = encode_images(enc, images[:8])
    err = float(np.abs(ref - ours).max())
    assert err <= 1e-5, err
    report.checks.append(f"CLIP ViT-B/32 image embeddings equal to CLIPProcessor + get_image_features (max abs {err:.1e})")
    t = time_interleaved({"base": lambda: clip_users_embed(hf_model, hf_processor, images),
                          "ours": lambda: encode_images(enc, images, batch_size=32)}, repeats)
    t_base, t_ours = t["base"], t["ours"]
    report.rows.append(Row(f"CLIP ViT-B/32 (random weights) image embeddings, {n_images} photo-size PIL images in memory (images/s)",
                           f"{n_images / t_base:.1f}", f"{n_images / t_ours:.1f}", t_base / t_ours, None,
                           "models loaded before timing; baseline: CLIPProcessor + get_image_features, batch 32; "
                           "the 1.5x target is for the phiclip embed path (below)"))


def _write_jpegs(folder: Path, n: int, seed: int = 2) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(photo_like_images(n, seed=seed)):
        p = folder / f"img_{i:04d}.jpg"
        img.save(p, quality=90)
        paths.append(p)
    return paths


def _plain_clip_loop_from_files(ckpt: Path, paths: list[Path], batch_size: int = 32) -> int:
    """What users write: open files with PIL, CLIPProcessor, get_image_features, batch 32."""
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(ckpt).eval()
    processor = CLIPProcessor.from_pretrained(ckpt)
    n = 0
    with torch.no_grad():
        for i in range(0, len(paths), batch_size):
            images = [Image.open(p).convert("RGB") for p in paths[i : i + batch_size]]
            feats = model.get_image_features(**processor(images=images, return_tensors="pt"))
            n += getattr(feats, "pooler_output", feats).shape[0]
    return n


def bench_embed(report: Report, tmp: Path, n_images: int, repeats: int) -> None:
    """``phiclip embed`` from JPEG files on disk (decode, preprocess, model, Parquet write) next to
    a plain transformers loop over the same files, for a tiny CLIP, a real-size ViT-B/32 and a tiny
    Phi-3-vision. Both sides load their model inside the timed call; the libraries are imported
    first (importing transformers takes seconds and would otherwise land on whichever runs first),
    and the two sides run in turn, ``repeats`` times, each into a fresh output folder."""
    import shutil
    import statistics
    import time

    import transformers  # noqa: F401 - imported before timing, see above

    import phiclip.encoders.clip  # noqa: F401
    from phiclip import embed
    from phiclip.testing import build_tiny_clip, build_tiny_phi3v

    paths = _write_jpegs(tmp / "jpegs", n_images)
    models = {
        "tiny CLIP (hidden 32, 2 layers, 224 px)": build_tiny_clip(tmp / "clip-tiny"),
        "CLIP ViT-B/32 (random weights)": build_tiny_clip(tmp / "clip-b32-embed", image_size=224, patch_size=32, hidden_size=768,
                                                           num_layers=12, num_heads=12, projection_dim=512),
    }

    def ours(spec: str, out: Path) -> None:
        shutil.rmtree(out, ignore_errors=True)
        res = embed(spec, tmp / "jpegs", out, device="cpu", progress=False)
        assert res.embedded == n_images, res.to_dict()

    for name, ckpt in models.items():
        out = tmp / f"out-{ckpt.name}"
        t = time_interleaved({"base": lambda ckpt=ckpt: _plain_clip_loop_from_files(ckpt, paths),
                              "ours": lambda ckpt=ckpt, out=out: ours(f"clip:{ckpt}", out)}, repeats, warmup=0)
        t_base, t_ours = t["base"], t["ours"]
        report.rows.append(Row(f"phiclip embed vs plain loop, {name}, {n_images} JPEGs from disk (images/s, load included)",
                               f"{n_images / t_base:.1f}", f"{n_images / t_ours:.1f}", t_base / t_ours,
                               1.5 if "B/32" in name else None,
                               f"median of {repeats} alternating runs; phiclip: decode+preprocess on threads between model calls, Parquet written"))
    ckpt = build_tiny_phi3v(tmp / "phi3v-embed")
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ours(f"phi3v:{ckpt}", tmp / "out-phi3v")
        times.append(time.perf_counter() - t0)
    t_ours = statistics.median(times)
    report.rows.append(Row(f"phiclip embed, tiny Phi-3-vision (hidden 32, 3 layers, num_crops 16), {n_images} JPEGs (images/s)",
                           "-", f"{n_images / t_ours:.1f}", 1.0, None, f"{n_images} embedded"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-loading", action="store_true", help="skip the full-size (8.3 GB) loading benchmark")
    ap.add_argument("--ckpt-dir", type=Path, help="reuse (or write) the full-size synthetic checkpoint here")
    ap.add_argument("--clip-images", type=int, default=64)
    ap.add_argument("--embed-images", type=int, default=128)
    ap.add_argument("--only", choices=["preprocessing", "tokens", "gemm", "loading", "clip", "embed"], action="append")
    ap.add_argument("--log-dir", default=None, help="write results.md/results.json here")
    args = ap.parse_args()
    report = Report("CPU", env=environment())
    parts = args.only or ["preprocessing", "tokens", "gemm", "loading", "clip", "embed"]
    with tempfile.TemporaryDirectory(prefix="phiclip-bench-") as t:
        tmp = Path(t)
        if "preprocessing" in parts:
            bench_preprocessing(report, args.repeats)
        if "tokens" in parts:
            bench_tokens(report, args.repeats, tmp)
        if "gemm" in parts:
            bench_gemm(report)
            bench_isa(report, tmp)
        if "clip" in parts:
            bench_clip(report, args.repeats, tmp, args.clip_images)
        if "embed" in parts:
            bench_embed(report, tmp, args.embed_images, args.repeats)
        if "loading" in parts and not args.skip_loading:
            bench_loading(report, args.ckpt_dir, tmp)
    print(report.markdown())
    report.save(args.log_dir)


if __name__ == "__main__":
    main()
