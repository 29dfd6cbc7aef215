"""CPU images/s of the SigLIP 2, MetaCLIP 2, AIMv2 and DINO encoders at real size (random weights),
phiclip against transformers' own image features in the same run, same images, same precision.

    python bench/families.py                         # every family, float32 / bfloat16 / int8, 8 images
    python bench/families.py --images 16 --only dinov2 aimv2 --precisions float32 bfloat16

Models (random weights, built in memory from each transformers config's defaults or the released shape):

* ``siglip2-224``: SigLIP 2 base, fixed resolution (released in SigLIP's layout: ``SiglipModel``,
  ViT-B/16 at 224 from ``SiglipVisionConfig``'s defaults);
* ``siglip2-naflex``: SigLIP 2 base NaFlex (``Siglip2Model``, ``Siglip2Config`` defaults: ViT-B/16,
  ``max_num_patches`` 256), images of three aspect ratios;
* ``metaclip2``: MetaCLIP 2 at base size (``MetaClip2Config`` defaults: ViT-B/32 at 224). The released
  worldwide checkpoints are ViT-H/14 (and larger), which would take minutes per image count here;
* ``aimv2``: AIMv2 large LiT (``Aimv2Config`` defaults: ViT-L/14 at 224, the released
  aimv2-large-patch14-224-lit shape);
* ``dinov2``: DINOv2 base (``Dinov2Config`` defaults: ViT-B/14 at 224, crop of the 256 shorter side);
* ``dinov3``: DINOv3 ViT-B/16 (dinov3-vitb16-pretrain-lvd1689m's shape: 768 wide, 12 layers, 4 registers, 224).

Contenders, timed on the same preprocessed batch (model only; preprocessing is the same code for both):

* ``transformers``: ``get_image_features`` (the pooled output for DINO), float32 weights; for bfloat16
  under ``torch.autocast`` (transformers' own way to run a precision on the CPU);
* ``phiclip``: the encoder's ``encode_batch`` (normalisation included) at that precision, as a user gets it
  with no runtime named: ``runtime=auto`` (or ``$PHICLIP_RUNTIME``), i.e. ``phiclip.cpu.accelerate`` measures
  torch (bfloat16: the tower's weights converted once; int8: dynamic int8 products) and every installed
  compiled runtime (OpenVINO, ONNX Runtime) on this batch's shape and keeps the fastest within the
  precision's bound; the ``ran`` column says which. transformers has no CPU int8 of its own: phiclip int8 is
  set against transformers float32.

Timings interleave the two contenders in a rotating order (``common.time_interleaved_all``), median of
``--repeats``; the load average and the CPU are printed with the table (the machine may be shared).
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import photo_like_images, time_interleaved_all  # noqa: E402

FAMILIES = ("siglip2-224", "siglip2-naflex", "metaclip2", "aimv2", "dinov2", "dinov3")
PRECISIONS = ("float32", "bfloat16", "int8")


def _model(name: str) -> tuple[Any, Any, str, str]:
    """(random-weight model, phiclip preprocessor, encoder module, encoder class) for one family."""
    import transformers as t

    from phiclip.encoders.clip_preprocessing import ImagePreprocessor
    from phiclip.encoders.dino_preprocessing import Dinov3Preprocessor
    from phiclip.encoders.siglip2_preprocessing import NaFlexPreprocessor

    torch.manual_seed(0)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    if name == "siglip2-224":
        model = t.SiglipModel(t.SiglipConfig())
        pre = ImagePreprocessor.from_image_processor(t.SiglipImageProcessorPil(size={"height": 224, "width": 224}))
        return model, pre, "phiclip.encoders.siglip2", "Siglip2Encoder"
    if name == "siglip2-naflex":
        model = t.Siglip2Model(t.Siglip2Config())
        pre = NaFlexPreprocessor.from_image_processor(t.Siglip2ImageProcessorPil(patch_size=16, max_num_patches=256))
        return model, pre, "phiclip.encoders.siglip2", "Siglip2Encoder"
    if name == "metaclip2":
        model = t.MetaClip2Model(t.MetaClip2Config())
        pre = ImagePreprocessor.from_image_processor(t.CLIPImageProcessorPil())
        return model, pre, "phiclip.encoders.metaclip2", "MetaClip2Encoder"
    if name == "aimv2":
        model = t.Aimv2Model(t.Aimv2Config())
        pre = ImagePreprocessor.from_image_processor(t.CLIPImageProcessorPil())
        return model, pre, "phiclip.encoders.aimv2", "Aimv2Encoder"
    if name == "dinov2":
        model = t.Dinov2Model(t.Dinov2Config())
        pre = ImagePreprocessor.from_image_processor(t.BitImageProcessorPil(
            size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, resample=3, image_mean=mean,
            image_std=std))
        return model, pre, "phiclip.encoders.dino", "Dinov2Encoder"
    if name == "dinov3":
        model = t.DINOv3ViTModel(t.DINOv3ViTConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                   num_attention_heads=12, patch_size=16, num_register_tokens=4))
        pre = Dinov3Preprocessor.from_config({"size": {"height": 224, "width": 224}, "resample": 2,
                                              "image_mean": mean, "image_std": std})
        return model, pre, "phiclip.encoders.dino", "Dinov3Encoder"
    raise ValueError(f"unknown family {name!r}; one of {FAMILIES}")


def _reference(model: Any, name: str) -> Callable[[Any], torch.Tensor]:
    """transformers' own image features of a collated batch."""
    if name.startswith("dino"):
        return lambda batch: model(pixel_values=batch).pooler_output
    if name == "siglip2-naflex":
        return lambda batch: _pooled(model.get_image_features(**batch))
    return lambda batch: _pooled(model.get_image_features(pixel_values=batch))


def _pooled(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _encoder(model: Any, pre: Any, module: str, cls_name: str, kind: str, precision: str) -> Any:
    import importlib

    from phiclip.encoders.device import resolve_placement
    from phiclip.encoders.family_options import DinoOptions, FamilyOptions, Siglip2Options
    from phiclip.encoders.spec import EncoderSpec
    from phiclip.models.checkpoint import fingerprint_module

    options = {"siglip2": Siglip2Options(), "dinov2": DinoOptions(), "dinov3": DinoOptions()}.get(kind, FamilyOptions())
    cls = getattr(importlib.import_module(module), cls_name)
    # A fingerprint as a loaded checkpoint has one: runtime=auto may then compile (and cache) the image path.
    return cls(EncoderSpec(kind, f"/bench/{kind}", {}), model, pre, None, placement=resolve_placement("cpu", precision),
               options=options, weights_fingerprint=fingerprint_module(model))


def _cosine(a: Any, b: Any) -> float:
    a = torch.as_tensor(a).float()
    b = torch.as_tensor(b).float()
    a = a / a.norm(dim=-1, keepdim=True)
    b = b / b.norm(dim=-1, keepdim=True)
    return float((a * b).sum(-1).min())


def run_family(name: str, precisions: tuple[str, ...], n_images: int, repeats: int) -> list[dict[str, Any]]:
    base, pre, module, cls_name = _model(name)
    base.eval()
    kind = {"siglip2-224": "siglip2", "siglip2-naflex": "siglip2"}.get(name, name)
    sizes = ((640, 480), (480, 640), (500, 500)) if name == "siglip2-naflex" else ((640, 480), (500, 500))
    images = photo_like_images(n_images, seed=1, sizes=sizes)
    items = [pre(im) for im in images]
    rows = []
    ref_f32 = None
    for precision in precisions:
        enc = _encoder(copy.deepcopy(base), pre, module, cls_name, kind, precision)
        batch = enc.collate(items)
        ref = _reference(base, name)
        ref_dtype = torch.bfloat16 if precision == "bfloat16" else None

        def transformers_run(batch: Any = batch, ref: Any = ref, ref_dtype: Any = ref_dtype) -> torch.Tensor:
            with torch.inference_mode(), torch.autocast("cpu", dtype=ref_dtype, enabled=ref_dtype is not None):
                return ref(batch).float()

        def phiclip_run(batch: Any = batch, enc: Any = enc) -> Any:
            return enc.encode_batch(batch).embeddings

        times = time_interleaved_all({"transformers": transformers_run, "phiclip": phiclip_run}, repeats=repeats)
        t_ref, t_phi = statistics.median(times["transformers"]), statistics.median(times["phiclip"])
        if ref_f32 is None:
            ref_f32 = transformers_run() if precision == "float32" else None
        out = phiclip_run()
        record = enc.describe()["precision"]
        rows.append({"family": name, "precision": precision, "images": n_images,
                     "transformers_ips": n_images / t_ref, "phiclip_ips": n_images / t_phi, "ratio": t_ref / t_phi,
                     "vs": "transformers float32" if precision == "int8" else f"transformers {precision}",
                     "min_cos_vs_f32": None if ref_f32 is None else _cosine(ref_f32, out),
                     "image_weights": record.get("image_weights", "as loaded (float32)"),
                     "ran": _ran(record.get("runtime"))})
        print(_row(rows[-1]), flush=True)
        del enc
        gc.collect()
    del base
    gc.collect()
    return rows


def _ran(runtime: Any) -> str:
    """What ran phiclip's image side, from its precision record's ``runtime`` entry."""
    if not isinstance(runtime, dict):
        return "torch"
    return f"{runtime.get('runtime', 'torch')} ({runtime.get('requested', '?')})"


def _row(r: dict[str, Any]) -> str:
    cos = "" if r["min_cos_vs_f32"] is None else f"{r['min_cos_vs_f32']:.5f}"
    return (f"| {r['family']} | {r['precision']} | {r['transformers_ips']:.2f} | {r['phiclip_ips']:.2f} | "
            f"{r['ratio']:.2f}x (vs {r['vs']}) | {cos} | {r['ran']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", nargs="*", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--precisions", nargs="*", choices=PRECISIONS, default=list(PRECISIONS))
    args = parser.parse_args()

    from phiclip.cpu.precision import decide_cpu_precision

    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "?")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    auto = decide_cpu_precision("auto")
    print(f"CPU: {model_name}; {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"commit {commit}; load average before: {os.getloadavg()}")
    print(f"precision auto here: {auto.dtype} ({auto.reason})")
    print(f"{args.images} images, batch = all, median of {args.repeats} interleaved runs after one warm-up\n")
    print("| family | precision | transformers img/s | phiclip img/s | phiclip / transformers | min cos vs float32 | ran |")
    print("|---|---|---|---|---|---|---|")
    start = time.time()
    for name in args.only:
        run_family(name, tuple(args.precisions), args.images, args.repeats)
    print(f"\nload average after: {os.getloadavg()}; {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
