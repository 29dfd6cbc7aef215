"""CPU precision benchmark: phiclip at float32, bfloat16, float16, int8 and auto against transformers,
ONNX Runtime and OpenVINO, on this CPU, with every ratio measured in the same run.

    python bench/cpu_precision.py                       # everything
    python bench/cpu_precision.py --only matmul clip    # parts
    python bench/cpu_precision.py --log-dir bench-logs/cpu-precision

Parts (each table is printed with the CPU model and its instruction sets):

* ``matmul``: GFLOP/s of the tower's matrix products in float32, bfloat16, float16 and int8 (each
  int8 kernel, activation quantisation included), what ``precision=auto`` and ``int8`` decide here.
* ``clip``: CLIP ViT-B/32 (random weights), model only, 64 preprocessed images, batch 32:
  transformers ``get_image_features`` (SDPA), phiclip at each precision, and, when installed
  (``pip install phiclip[bench]``), ONNX Runtime float32 / int8 (dynamic quantisation, per channel)
  and OpenVINO float32 / bfloat16 / int8 (NNCF static quantisation calibrated on 128 other
  photo-like images) on the same weights (exported once to ONNX; OpenVINO with its CACHE_DIR);
  phiclip through those runtimes too (``runtime=openvino`` for float32 and bfloat16,
  ``runtime=onnxruntime`` and ``runtime=openvino&calibration=`` the same 128 images for int8).
  Cosine and max abs of every output against phiclip float32.
* ``embed``: end to end from 128 JPEG files: ``phiclip embed`` at each precision (load included;
  a runtime's conversion is cached before timing), and the contenders loading their model file,
  behind the same decoding and preprocessing threads, writing their vectors to Parquet.
* ``tower``: the Phi-3-vision image tokens of ``bench/cpu.py`` (tower 256 wide x 6 layers, 62 real
  crops) at each precision against the released-code way, in torch and with the tower compiled by
  the runtimes, when installed (``runtime=openvino`` float32 / bfloat16, ``runtime=onnxruntime``
  int8, ``runtime=openvino&calibration=`` 128 other photo-like images for int8), and phiclip's
  default (``precision=auto``, ``runtime=auto``); then every int8 way's error against float32 on
  tokens and pooled vectors at num_crops 1, 4 and 16.
* ``knn``: a tiny CLIP fine-tuned here with ``phiclip.finetune.clip.finetune_clip`` (200 steps on 96
  captioned sample images, about 20 s on 2 cores), then loaded at each precision (and through the
  runtimes above): kNN (k=5) and zero-shot accuracy on 48 held-out images of 12 classes, the share of
  predictions equal to float32's, and cosine to the float32 image and text vectors.

Timings interleave the contenders in a rotating order (``common.time_interleaved``) and take the median.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from phiclip.cpu.runtimes import NEEDS_CALIBRATION, missing_packages
from phiclip.pipeline.step import encode_images

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import cpu_description, environment, photo_like_images, time_interleaved  # noqa: E402

PRECISIONS = ("float32", "bfloat16", "float16", "int8")
#: phiclip through a compiled runtime (runtime=auto's choices at each precision), when installed.
RUNTIME_ROWS = (("float32", "openvino"), ("bfloat16", "openvino"), ("int8", "onnxruntime"), ("int8", "openvino"))

#: Calibration images for static int8 (other photo-like images than the ones timed).
CALIBRATION_IMAGES = 128


def runtime_spec(ckpt: Any, runtime: str, precision: str, calibration: Path | None, kind: str = "clip",
                 options: str = "") -> str:
    """The spec of phiclip through ``runtime`` (``calibration=`` where that runtime needs it; ``options``:
    more ``key=value&...``)."""
    if runtime == "torch":
        return f"{kind}:{ckpt}?runtime=torch" + (f"&{options}" if options else "")
    extra = f"&calibration={calibration}" if (runtime, precision) in NEEDS_CALIBRATION and calibration else ""
    return f"{kind}:{ckpt}?runtime={runtime}{extra}" + (f"&{options}" if options else "")


def runtime_rows(calibration: Path | None) -> list[tuple[str, str]]:
    """The runtime rows whose packages are installed (and calibration images given where needed)."""
    return [(p, rt) for p, rt in RUNTIME_ROWS if not missing_packages(rt, p)
            and (calibration is not None or (rt, p) not in NEEDS_CALIBRATION)]


def write_calibration(folder: Path, n: int = CALIBRATION_IMAGES) -> Path:
    """``n`` photo-like JPEGs (seed 7: none of them is timed) to calibrate static int8 on."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(photo_like_images(n, seed=7)):
        img.save(folder / f"cal_{i:04d}.jpg", quality=90)
    return folder


def _normed(x: Any) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def closeness(ref: Any, out: Any) -> str:
    """``cos mean/min, max abs`` of L2-normalised rows."""
    a, b = _normed(ref), _normed(out)
    cos = (a * b).sum(1)
    return f"cos {cos.mean():.5f} / {cos.min():.5f}, max abs {np.abs(a - b).max():.4f}"


class Table:
    def __init__(self, title: str, columns: list[str]) -> None:
        self.title, self.columns, self.rows = title, columns, []

    def add(self, *cells: Any) -> None:
        self.rows.append([c if isinstance(c, str) else f"{c:.3g}" if isinstance(c, float) else str(c) for c in cells])

    def markdown(self) -> str:
        out = [f"### {self.title}", "", f"CPU: {cpu_description()}", "", "| " + " | ".join(self.columns) + " |",
               "|" + "---|" * len(self.columns)]
        out += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(out)


# --------------------------------------------------------------------------------------------------
def bench_matmul(tables: list[Table]) -> None:
    from phiclip.cpu import int8 as Q
    from phiclip.cpu import precision as P

    rates = P.measure_matmul_rates()
    kernels = Q.available_kernels()
    int8 = Q.measure_kernel_rates(kernels) if kernels else {}
    t = Table("Matrix products of the towers' shapes (GFLOP/s, best of 3 interleaved rounds)",
              ["precision", "GFLOP/s", "vs float32"])
    for k, v in rates.items():
        t.add(k, f"{v:.0f}", f"{v / rates['float32']:.2f}x")
    for k, v in int8.items():
        t.add(f"int8 ({k} kernel, activation quantisation included)", f"{v:.0f}", f"{v / rates['float32']:.2f}x")
    P.clear_memo()
    Q.clear_memo()
    auto = P.decide_cpu_precision("auto")
    t.add("precision=auto decides", auto.dtype, auto.reason)
    with_plan = Q.int8_plan() if kernels else None
    if with_plan:
        t.add("precision=int8 runs", with_plan["kernel"], with_plan["reason"])
    tables.append(t)


# --------------------------------------------------------------------------------------------------
class _Contender:
    """A model-only image-feature function of the same weights: pixel_values (n,3,224,224) -> (n, d).
    ``load`` builds the function again from the model file (what an end-to-end run pays)."""

    def __init__(self, name: str, precision: str, fn: Callable[[torch.Tensor], np.ndarray],
                 load: Callable[[], Callable[[torch.Tensor], np.ndarray]] | None = None) -> None:
        self.name, self.precision, self.fn, self.load = name, precision, fn, load


def export_clip_onnx(hf_model: Any, path: Path) -> Path:
    """The image side of a transformers CLIPModel (``get_image_features``) as ONNX, dynamic batch."""

    class ImageSide(torch.nn.Module):
        def __init__(self, m: Any) -> None:
            super().__init__()
            self.m = m

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            out = self.m.get_image_features(pixel_values=pixel_values)
            return getattr(out, "pooler_output", out)

    module = ImageSide(hf_model).eval()
    x = torch.randn(2, 3, 224, 224)
    try:
        torch.onnx.export(module, (x,), str(path), input_names=["pixel_values"], output_names=["features"],
                          dynamic_axes={"pixel_values": {0: "n"}, "features": {0: "n"}}, opset_version=17, dynamo=False)
    except Exception:  # noqa: BLE001 - the TorchScript exporter may be gone; the dynamo one then
        batch = torch.export.Dim("n", min=1, max=1024)
        torch.onnx.export(module, (x,), str(path), input_names=["pixel_values"], output_names=["features"],
                          dynamic_shapes={"pixel_values": {0: batch}}, dynamo=True, external_data=False)
    return path


def onnx_contenders(onnx_path: Path, threads: int, tmp: Path, calibration: np.ndarray | None = None) -> list[_Contender]:
    """ONNX Runtime float32 / int8 and OpenVINO float32 / bfloat16 / int8 (NNCF static, calibrated on
    ``calibration`` pixels, where NNCF is installed), where installed. OpenVINO compiles with its
    CACHE_DIR (a later load reads the compiled model back), as a user of it would."""
    out: list[_Contender] = []
    try:
        import onnxruntime as ort
        from onnxruntime.quantization import QuantType, quantize_dynamic

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = threads
        q_path = tmp / "clip-int8.onnx"
        quantize_dynamic(str(onnx_path), str(q_path), weight_type=QuantType.QInt8, per_channel=True)
        for name, p, prec in (("ONNX Runtime float32 (optimisations ALL)", onnx_path, "float32"),
                              ("ONNX Runtime int8 dynamic quantisation (per channel)", q_path, "int8")):
            def load(p: Path = p) -> Callable[[torch.Tensor], np.ndarray]:
                sess = ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
                return lambda x: sess.run(None, {"pixel_values": x.numpy()})[0]
            out.append(_Contender(name, prec, load(), load))
    except ImportError:
        print("onnxruntime not installed: its rows are left out (pip install phiclip[bench])")
    try:
        import openvino as ov

        core = ov.Core()
        models = [("float32", "f32", onnx_path, "OpenVINO float32"), ("bfloat16", "bf16", onnx_path, "OpenVINO bfloat16")]
        if calibration is not None and not missing_packages("openvino", "int8"):
            import nncf

            q_xml = tmp / "ov-int8" / "model.xml"
            batches = [calibration[i:i + 8] for i in range(0, len(calibration), 8)]
            t0 = time.perf_counter()
            ov.save_model(nncf.quantize(core.read_model(str(onnx_path)), nncf.Dataset(batches), subset_size=len(batches),
                                        model_type=nncf.ModelType.TRANSFORMER), str(q_xml))
            print(f"OpenVINO int8: NNCF quantised in {time.perf_counter() - t0:.1f} s on {len(calibration)} images")
            models.append(("int8", "f32", q_xml, f"OpenVINO int8 (NNCF static, {len(calibration)} calibration images)"))
        for prec, hint, path, name in models:
            def load(hint: str = hint, path: Path = path, prec: str = prec) -> Callable[[torch.Tensor], np.ndarray]:
                compiled = core.compile_model(core.read_model(str(path)), "CPU",
                                              {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": threads,
                                               "CACHE_DIR": str(tmp / f"ov-cache-{prec}")})
                req = compiled.create_infer_request()
                return lambda x: req.infer({0: x.numpy()})[0].copy()
            try:
                fn = load()
            except RuntimeError as e:
                print(f"{name}: {e}")
                continue
            out.append(_Contender(name, prec, fn, load))
    except ImportError:
        print("openvino not installed: its rows are left out (pip install phiclip[bench])")
    return out


def _batched(fn: Callable[[torch.Tensor], Any], pixels: torch.Tensor, batch: int = 32) -> np.ndarray:
    with torch.inference_mode():
        return np.concatenate([np.asarray(fn(pixels[i:i + batch]), dtype=np.float32) for i in range(0, len(pixels), batch)])


def bench_clip(tables: list[Table], tmp: Path, n_images: int, repeats: int, timed: bool = True) -> dict[str, Any]:
    from baselines import load_clip_users

    from phiclip import load_encoder
    from phiclip.images import load_image
    from phiclip.testing import build_tiny_clip

    ckpt = build_tiny_clip(tmp / "clip-b32", image_size=224, patch_size=32, hidden_size=768, num_layers=12, num_heads=12,
                           projection_dim=512)
    encs = {p: load_encoder(f"clip:{ckpt}", device="cpu", dtype=p) for p in PRECISIONS}
    images = photo_like_images(n_images, seed=1)
    pixels = torch.stack([encs["float32"].preprocess(im) for im in images])
    calibration = write_calibration(tmp / "calibration")
    cal_pixels = torch.stack([encs["float32"].preprocess(load_image(q)) for q in sorted(calibration.iterdir())]).numpy()
    hf_model, _ = load_clip_users(ckpt)
    fns: dict[str, Callable[[], Any]] = {}
    outs: dict[str, np.ndarray] = {}

    def hf(x: torch.Tensor) -> np.ndarray:
        out = hf_model.get_image_features(pixel_values=x)
        return getattr(out, "pooler_output", out).numpy()

    contenders = [_Contender("transformers get_image_features (SDPA)", "float32", hf)]
    for p, enc in encs.items():
        contenders.append(_Contender(f"phiclip {p}", p, lambda x, e=enc: e.encode_batch(x).embeddings))
    # phiclip through a compiled runtime (phiclip[cpu-runtimes]); the first load converts and caches.
    for p, runtime in runtime_rows(calibration):
        t0 = time.perf_counter()
        enc = load_encoder(runtime_spec(ckpt, runtime, p, calibration), device="cpu", dtype=p)
        info = enc.describe()["precision"]["runtime"]
        print(f"phiclip {p} runtime={runtime}: loaded in {time.perf_counter() - t0:.1f} s "
              f"({'converted now' if info['converted_now'] else 'read from the cache'})")
        contenders.append(_Contender(f"phiclip {p} (runtime={runtime})", p, lambda x, e=enc: e.encode_batch(x).embeddings))
    onnx_path = export_clip_onnx(hf_model, tmp / "clip.onnx")
    contenders += onnx_contenders(onnx_path, torch.get_num_threads(), tmp, cal_pixels)
    if not timed:  # only the contenders, for the end-to-end part
        return {"ckpt": ckpt, "onnx": onnx_path, "contenders": contenders, "calibration": calibration}
    for c in contenders:
        outs[c.name] = _batched(c.fn, pixels)
        fns[c.name] = lambda c=c: _batched(c.fn, pixels)
    times = time_interleaved(fns, repeats)
    ref = outs["phiclip float32"]
    t_f32 = times["phiclip float32"]
    t = Table(f"CLIP ViT-B/32 (random weights), model only, {n_images} images, batch 32",
              ["contender", "precision", "s", "images/s", "vs phiclip float32", "phiclip vs best contender, same precision",
               "vs phiclip float32 output"])
    best_other = {p: min((times[c.name] for c in contenders if c.precision == p and not c.name.startswith(("phiclip", "transformers"))),
                         default=None) for p in PRECISIONS}
    for c in contenders:
        s = times[c.name]
        vs_best = ""
        if c.name.startswith("phiclip") and best_other.get(c.precision):
            vs_best = f"{best_other[c.precision] / s:.2f}x"
        t.add(c.name, c.precision, f"{s:.2f}", f"{n_images / s:.1f}", f"{t_f32 / s:.2f}x", vs_best, closeness(ref, outs[c.name]))
    tables.append(t)
    return {"ckpt": ckpt, "onnx": onnx_path, "contenders": contenders, "calibration": calibration}


# --------------------------------------------------------------------------------------------------
def bench_embed(tables: list[Table], tmp: Path, n_images: int, repeats: int, clip: dict[str, Any] | None,
                precisions: tuple[str, ...] = ("float32", "bfloat16", "int8", "auto")) -> None:
    import shutil

    import transformers  # noqa: F401 - imported before timing

    from phiclip import embed, load_encoder
    from phiclip.images import load_image
    from phiclip.testing import build_tiny_clip

    folder = tmp / "jpegs"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(photo_like_images(n_images, seed=2)):
        p = folder / f"img_{i:04d}.jpg"
        img.save(p, quality=90)
        paths.append(p)
    ckpt = clip["ckpt"] if clip else build_tiny_clip(tmp / "clip-b32", image_size=224, patch_size=32, hidden_size=768,
                                                     num_layers=12, num_heads=12, projection_dim=512)
    fns: dict[str, Callable[[], Any]] = {}
    wanted = set(precisions) | {"float32"}  # phiclip float32 is every row's baseline
    runs = [(p, "torch") for p in ("float32", "bfloat16", "int8", "auto") if p in wanted]
    calibration = clip.get("calibration") if clip else None
    runs += [(p, rt) for p, rt in runtime_rows(calibration) if p in wanted and p in precisions]
    for p, rt in runs:
        if rt != "torch":  # the conversion cached before timing
            load_encoder(runtime_spec(ckpt, rt, p, calibration), device="cpu", dtype=p)

        def ours(p: str = p, rt: str = rt) -> None:
            out = tmp / f"out-{p}-{rt}"
            shutil.rmtree(out, ignore_errors=True)
            res = embed(runtime_spec(ckpt, rt, p, calibration), folder, out, device="cpu", precision=p, progress=False)
            assert res.embedded == n_images, res.to_dict()
        fns[f"phiclip embed {p}" + ("" if rt == "torch" else f" (runtime={rt})")] = ours
    if "default" in precisions:  # what a user gets with no flags: precision auto, runtime auto
        default_spec = f"clip:{ckpt}"
        chosen = load_encoder(default_spec, device="cpu").describe()["precision"]  # decided (and cached) before timing
        label = f"phiclip embed default ({chosen.get('dtype')}, {(chosen.get('runtime') or {}).get('runtime', 'torch')})"

        def default() -> None:
            out = tmp / "out-default"
            shutil.rmtree(out, ignore_errors=True)
            res = embed(default_spec, folder, out, device="cpu", progress=False)
            assert res.embedded == n_images, res.to_dict()
        fns[label] = default
    prep = load_encoder(f"clip:{ckpt}", device="cpu", dtype="float32").preprocess
    threads = torch.get_num_threads()
    for c in (clip or {}).get("contenders", []):
        if c.name.startswith(("phiclip", "transformers")) or c.precision not in precisions:
            continue

        def theirs(c: _Contender = c) -> None:
            # Load the model from its file, decode and preprocess on the same threads as phiclip's CPU
            # path, write the vectors to Parquet: what phiclip embed does, without its bookkeeping.
            fn = c.load() if c.load is not None else c.fn
            rows = []
            with ThreadPoolExecutor(threads) as pool:
                for i in range(0, len(paths), 32):
                    batch = torch.stack(list(pool.map(lambda q: prep(load_image(q)), paths[i:i + 32])))
                    rows.append(np.asarray(fn(batch), dtype=np.float32))
            vectors = np.concatenate(rows)
            pq.write_table(pa.table({"source": [str(q) for q in paths],
                                     "embedding": pa.FixedSizeListArray.from_arrays(vectors.ravel(), vectors.shape[1])}),
                           tmp / "contender.parquet")
        fns[c.name] = theirs
    times = time_interleaved(fns, repeats, warmup=0)
    t = Table(f"End to end from {n_images} JPEG files, CLIP ViT-B/32 (random weights), load included",
              ["what", "s", "images/s", "vs phiclip float32"])
    for name, s in times.items():
        t.add(name, f"{s:.2f}", f"{n_images / s:.1f}", f"{times['phiclip embed float32'] / s:.2f}x")
    tables.append(t)


# --------------------------------------------------------------------------------------------------
#: CLIP ViT-B/32's real text tower (the image tower is 768 wide): 12 layers of 512, 8 heads.
B32_TEXT = dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8)


def build_b32(folder: Path) -> Path:
    """A real-size CLIP ViT-B/32 (random weights): 12 x 768 image tower, 12 x 512 text tower."""
    from phiclip.testing import build_tiny_clip

    if (folder / "config.json").exists():
        return folder
    return build_tiny_clip(folder, image_size=224, patch_size=32, hidden_size=768, num_layers=12, num_heads=12,
                           projection_dim=512, text_overrides=B32_TEXT)


def caption_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` caption-like sentences of 3 to 20 words."""
    rng = np.random.default_rng(seed)
    words = ("a photo of the dog cat red blue small large running sitting on in with near beach city street park "
             "two people woman man child car tree house mountain river at night sunset morning close-up old new").split()
    return [" ".join(rng.choice(words, size=int(rng.integers(3, 21)))) for _ in range(n)]


class _TextSide(torch.nn.Module):
    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return getattr(out, "pooler_output", out)


def openvino_text_contender(ckpt: Path, precision: str, tmp: Path) -> Callable[[list[str]], np.ndarray] | None:
    """The CLIP text tower converted by OpenVINO itself (``convert_model`` of transformers' model, batch and
    length dynamic), compiled at ``precision`` with its CACHE_DIR, behind the checkpoint's tokenizer."""
    if missing_packages("openvino") or precision not in ("float32", "bfloat16"):
        return None
    import openvino as ov
    from transformers import CLIPModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(ckpt)
    xml = tmp / "ov-text" / "model.xml"
    if not xml.exists():
        model = CLIPModel.from_pretrained(ckpt).eval()
        ex = tok(["a photo of a dog", "a cat"], padding="longest", return_tensors="pt")
        with torch.no_grad():
            converted = ov.convert_model(_TextSide(model), example_input=(ex["input_ids"], ex["attention_mask"]),
                                         input=[ov.PartialShape([-1, -1]), ov.PartialShape([-1, -1])])
        ov.save_model(converted, str(xml), compress_to_fp16=False)
    core = ov.Core()
    compiled = core.compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": {"float32": "f32", "bfloat16": "bf16"}[precision],
                                                    "INFERENCE_NUM_THREADS": torch.get_num_threads(),
                                                    "CACHE_DIR": str(tmp / f"ov-text-cache-{precision}")})
    req = compiled.create_infer_request()

    def run(texts: list[str]) -> np.ndarray:
        out = []
        for i in range(0, len(texts), 256):
            enc = tok(texts[i:i + 256], padding="longest", truncation=True, max_length=77, return_tensors="np")
            out.append(req.infer({0: enc["input_ids"].astype(np.int64), 1: enc["attention_mask"].astype(np.int64)})[0].copy())
        return np.concatenate(out)
    return run


TEXT_CONTENDER_SCRIPT = """
import sys, time, numpy as np, pyarrow as pa, pyarrow.parquet as pq
sys.path.insert(0, {bench!r})
from pathlib import Path
from cpu_precision import openvino_text_contender
texts = [t for t in Path(sys.argv[1]).read_text().splitlines() if t.strip()]
run = openvino_text_contender(Path({ckpt!r}), {precision!r}, Path({tmp!r}))
v = run(texts)
v = v / np.linalg.norm(v, axis=1, keepdims=True)
pq.write_table(pa.table({{"text": texts, "embedding": pa.FixedSizeListArray.from_arrays(v.astype(np.float32).ravel(), v.shape[1])}}),
               sys.argv[2])
"""


def bench_text(tables: list[Table], tmp: Path, n_texts: int, repeats: int) -> None:
    """CLIP ViT-B/32's text tower: the default ``encode_texts`` / ``phiclip embed-text`` (no flags) against
    OpenVINO's own conversion at the precision the default runs, in process and as fresh processes."""
    import os
    import shutil
    import subprocess

    from phiclip import load_encoder

    ckpt = build_b32(tmp / "clip-b32")
    texts = caption_texts(n_texts)
    default = load_encoder(f"clip:{ckpt}", device="cpu")
    precision = default.describe()["precision"]["dtype"]
    t0 = time.perf_counter()
    default.prepare_texts()
    text_record = default.describe()["precision"]["text"]
    print(f"default text side: {text_record['runtime']} at {precision} ({text_record['reason']}); decided in "
          f"{time.perf_counter() - t0:.1f} s")
    torch_only = load_encoder(f"clip:{ckpt}?runtime=torch", device="cpu", dtype=precision)
    ref = load_encoder(f"clip:{ckpt}?runtime=torch", device="cpu", dtype="float32").encode_texts(texts)
    fns: dict[str, Callable[[], Any]] = {"phiclip default encode_texts (no flags)": lambda: default.encode_texts(texts),
                                         f"phiclip runtime=torch {precision}": lambda: torch_only.encode_texts(texts)}
    contender = openvino_text_contender(ckpt, precision, tmp)
    if contender is not None:
        fns[f"OpenVINO text tower {precision} (own conversion)"] = lambda: contender(texts)
    outs = {k: np.asarray(f()) for k, f in fns.items()}
    times = time_interleaved(fns, repeats)
    best = times.get(f"OpenVINO text tower {precision} (own conversion)")
    t = Table(f"CLIP ViT-B/32 text tower (12 x 512), {n_texts} caption-like texts, tokenizer included, in process",
              ["what", "s", "texts/s", "phiclip default vs this", "vs float32 output"])
    for name, sec in times.items():
        t.add(name, f"{sec:.2f}", f"{n_texts / sec:.0f}", f"{sec / times['phiclip default encode_texts (no flags)']:.2f}x",
              closeness(ref, outs[name]))
    tables.append(t)
    if best is None:
        return
    # Fresh processes, as a user runs them: `phiclip embed-text` against a script that tokenizes, runs
    # OpenVINO's compiled text tower and writes Parquet (both with their compiled models cached).
    (tmp / "texts.txt").write_text("\n".join(texts) + "\n")
    script = tmp / "ov_text.py"
    script.write_text(TEXT_CONTENDER_SCRIPT.format(bench=str(Path(__file__).resolve().parent), ckpt=str(ckpt),
                                                   precision=precision, tmp=str(tmp)))
    phiclip_bin = str(Path(sys.executable).with_name("phiclip"))
    env = {**os.environ}

    def ours() -> None:
        shutil.rmtree(tmp / "text-out", ignore_errors=True)
        subprocess.run([phiclip_bin, "embed-text", "-m", f"clip:{ckpt}", "-i", str(tmp / "texts.txt"), "-o",
                        str(tmp / "text-out"), "--no-progress"], check=True, env=env, capture_output=True)

    def theirs() -> None:
        subprocess.run([sys.executable, str(script), str(tmp / "texts.txt"), str(tmp / "ov.parquet")], check=True, env=env,
                       capture_output=True)

    e2e = time_interleaved({"phiclip embed-text (no flags), fresh process": ours,
                            f"OpenVINO text tower {precision} script, fresh process": theirs}, repeats, warmup=1)
    t = Table(f"embed-text end to end, {n_texts} texts, fresh processes (load, tokenizer, model, Parquet)",
              ["what", "s", "texts/s", "phiclip vs this"])
    mine = e2e["phiclip embed-text (no flags), fresh process"]
    for name, sec in e2e.items():
        t.add(name, f"{sec:.2f}", f"{n_texts / sec:.0f}", f"{sec / mine:.2f}x")
    tables.append(t)


def bench_default(tables: list[Table], tmp: Path, n_images: int, repeats: int) -> None:
    """The default image path (no runtime or precision flags) against the best of OpenVINO's and ONNX
    Runtime's own conversions at the precision the default runs, model only, for CLIP ViT-B/32 and a
    real-size SigLIP base; and the second load's start-up against runtime=torch's load."""
    from phiclip.testing import build_tiny_siglip

    models = {"CLIP ViT-B/32": ("clip", build_b32(tmp / "clip-b32"))}
    sig = tmp / "siglip-b16"
    if not (sig / "config.json").exists():
        build_tiny_siglip(sig, image_size=224, patch_size=16, hidden_size=768, num_layers=12, num_heads=12)
    models["SigLIP base/16 (224)"] = ("siglip", sig)
    images = photo_like_images(n_images, seed=1)
    for title, (kind, ckpt) in models.items():
        _bench_default_model(tables, tmp, title, kind, ckpt, images, repeats)


def _bench_default_model(tables: list[Table], tmp: Path, title: str, kind: str, ckpt: Path, images: list[Any],
                         repeats: int) -> None:
    import subprocess

    from baselines import load_clip_users

    from phiclip import load_encoder

    n_images = len(images)
    default = load_encoder(f"{kind}:{ckpt}", device="cpu")
    record = default.describe()["precision"]
    precision = record["dtype"]
    print(f"{title}: default runs {record['runtime']['runtime']} at {precision} ({record['runtime']['reason']})")
    pixels = torch.stack([default.preprocess(im) for im in images])
    torch_only = load_encoder(f"{kind}:{ckpt}?runtime=torch", device="cpu", dtype=precision)
    f32 = load_encoder(f"{kind}:{ckpt}?runtime=torch", device="cpu", dtype="float32")
    ref = _batched(lambda x: f32.encode_batch(x).embeddings, pixels)
    if kind == "clip":
        hf_model, _ = load_clip_users(ckpt)
    else:
        from transformers import SiglipModel
        hf_model = SiglipModel.from_pretrained(ckpt).eval()
    work = tmp / f"{kind}-contenders"
    work.mkdir(exist_ok=True)
    onnx_path = export_clip_onnx(hf_model, work / "model.onnx")
    contenders = [c for c in onnx_contenders(onnx_path, torch.get_num_threads(), work) if c.precision == precision]
    fns = {"phiclip default (no flags)": lambda d=default: _batched(lambda x: d.encode_batch(x).embeddings, pixels),
           f"phiclip runtime=torch {precision}": lambda: _batched(lambda x: torch_only.encode_batch(x).embeddings, pixels)}
    for c in contenders:
        fns[c.name] = lambda c=c: _batched(c.fn, pixels)
    outs = {k: f() for k, f in fns.items()}
    times = time_interleaved(fns, repeats)
    best = min((times[c.name] for c in contenders), default=None)
    t = Table(f"{title} (random weights), model only, {n_images} images, batch 32, at the default's precision ({precision})",
              ["what", "s", "images/s", "phiclip default vs this", "vs float32 output"])
    for name, sec in times.items():
        t.add(name, f"{sec:.2f}", f"{n_images / sec:.1f}", f"{sec / times['phiclip default (no flags)']:.2f}x",
              closeness(ref, outs[name]))
    if best is not None:
        t.add("phiclip default vs the best runtime", "", "", f"{best / times['phiclip default (no flags)']:.2f}x", "")
    tables.append(t)
    # Start-up of a second run, fresh processes: load (and for the default, read the choice and the
    # compiled model back) against runtime=torch's load.
    code = ("import time, sys; t=time.perf_counter(); from phiclip import load_encoder; "
            "e=load_encoder(sys.argv[1], device='cpu'); print(time.perf_counter()-t)")
    start = {}
    for spec in (f"{kind}:{ckpt}", f"{kind}:{ckpt}?runtime=torch"):
        runs = [float(subprocess.run([sys.executable, "-c", code, spec], check=True, capture_output=True,
                                     text=True).stdout.split()[-1]) for _ in range(max(3, repeats))]
        start[spec] = float(np.median(runs))
    t = Table(f"{title}: start-up of a second run (fresh process, import + load, median)", ["what", "s", "vs runtime=torch"])
    base = start[f"{kind}:{ckpt}?runtime=torch"]
    for spec, sec in start.items():
        t.add("default (auto, cached)" if "runtime=torch" not in spec else "runtime=torch", f"{sec:.2f}", f"{sec / base:.2f}x")
    tables.append(t)


#: Phi-3-vision's real CLIP ViT-L/14-336 tower (24 layers of 1024; the image path reads layer -2).
PHI3V_TOWER = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
               "image_size": 336, "patch_size": 14, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
               "projection_dim": 768}


def bench_phi3v_default(tables: list[Table], tmp: Path, n_crops: int, repeats: int) -> None:
    """The real-size Phi-3-vision tower, model only (``n_crops`` crops of 336 px through ``crop_features``): the
    default encoder (no flags) against OpenVINO's own conversion of the same tower at the default's precision."""
    from phiclip import load_encoder
    from phiclip.testing import build_tiny_phi3v

    ckpt = tmp / "phi3v-real-tower"
    if not (ckpt / "config.json").exists():
        build_tiny_phi3v(ckpt, vision_config=PHI3V_TOWER, hidden_size=3072)
    t0 = time.perf_counter()
    default = load_encoder(f"phi3v:{ckpt}", device="cpu")
    record = default.describe()["precision"]
    precision = record["dtype"]
    print(f"Phi-3-vision tower: default loaded in {time.perf_counter() - t0:.1f} s, runs "
          f"{record.get('runtime', {}).get('runtime')} at {precision} ({record.get('runtime', {}).get('reason')})")
    ref_enc = load_encoder(f"phi3v:{ckpt}?runtime=torch", device="cpu", dtype="float32")
    crops = torch.randn(n_crops, 3, 336, 336, generator=torch.Generator().manual_seed(0))
    fns: dict[str, Callable[[], Any]] = {"phiclip default crop_features (no flags)": lambda: default.model.crop_features(crops)}
    if not missing_packages("openvino") and precision in ("float32", "bfloat16"):
        import openvino as ov

        xml = tmp / "ov-phi3v-tower" / "model.xml"
        if not xml.exists():
            with torch.no_grad():
                converted = ov.convert_model(ref_enc.model.img_processor.eval(), example_input=crops[:2],
                                             input=[ov.PartialShape([-1, 3, 336, 336])])
            ov.save_model(converted, str(xml), compress_to_fp16=False)
        compiled = ov.Core().compile_model(str(xml), "CPU", {
            "INFERENCE_PRECISION_HINT": {"float32": "f32", "bfloat16": "bf16"}[precision],
            "INFERENCE_NUM_THREADS": torch.get_num_threads(), "CACHE_DIR": str(tmp / "ov-phi3v-cache")})
        req = compiled.create_infer_request()
        step = default.model.crops_per_call(torch.device("cpu"))
        fns[f"OpenVINO tower {precision} (own conversion, {step} crops per call)"] = lambda: np.concatenate(
            [req.infer({0: crops[i:i + step].numpy()})[0][:, 1:].copy() for i in range(0, n_crops, step)])
    with torch.inference_mode():
        ref = ref_enc.model.crop_features(crops).float().numpy()
        outs = {k: np.asarray(torch.as_tensor(f()).float()) for k, f in fns.items()}
        times = time_interleaved(fns, repeats)
    t = Table(f"Phi-3-vision tower (ViT-L/14-336, random weights), model only, {n_crops} crops, at the default's precision "
              f"({precision})", ["what", "s", "crops/s", "phiclip default vs this", "vs float32 tokens"])
    mine = times["phiclip default crop_features (no flags)"]
    for name, sec in times.items():
        t.add(name, f"{sec:.2f}", f"{n_crops / sec:.2f}", f"{sec / mine:.2f}x",
              closeness(ref.reshape(-1, ref.shape[-1]), outs[name].reshape(-1, ref.shape[-1])))
    tables.append(t)


# --------------------------------------------------------------------------------------------------
def _within(precision: str, ref: Any, out: Any) -> str:
    """``yes`` when ``out`` is within ``precision``'s stated bound of ``ref``, else ``no`` and why."""
    from phiclip.cpu.precision import ERROR_BOUNDS

    try:
        ERROR_BOUNDS[precision].check(np.asarray(ref, dtype=np.float32), np.asarray(out, dtype=np.float32))
    except AssertionError as e:
        return f"no ({e})"
    return "yes"


def bench_tower(tables: list[Table], tmp: Path, repeats: int, calibration_images: int = CALIBRATION_IMAGES) -> None:
    from baselines import ReleasedImageEmbedding
    from cpu import BENCH_TOWER, MIXED

    from phiclip import load_encoder
    from phiclip.cpu.int8 import int8_plan, quantize_phi3v_
    from phiclip.phi3v import Phi3VImageEmbedding, Phi3VImageProcessor
    from phiclip.testing import build_tiny_phi3v

    ckpt = build_tiny_phi3v(tmp / "phi3v-bench", vision_config=BENCH_TOWER, hidden_size=768)
    images = photo_like_images(len(MIXED), sizes=MIXED)
    inputs = Phi3VImageProcessor(num_crops=16)(images)
    pv, sizes = inputs.pixel_values, inputs.image_sizes
    models = {p: Phi3VImageEmbedding.from_pretrained(ckpt, torch_dtype=getattr(torch, p)).eval() for p in ("float32", "bfloat16", "float16")}
    models["int8"] = Phi3VImageEmbedding.from_pretrained(ckpt).eval()
    quantize_phi3v_(models["int8"], int8_plan())
    rows = {f"phiclip {p}": (p, m) for p, m in models.items()}
    # The tower compiled by each installed runtime (the HD merge and projection stay torch); the first
    # load converts and caches (static int8: calibrated on the crops of other photo-like images).
    calibration = write_calibration(tmp / "phi3v-calibration", calibration_images)
    compiled: dict[tuple[str, str], Any] = {}
    for p, rt in runtime_rows(calibration):
        t0 = time.perf_counter()
        enc = load_encoder(runtime_spec(ckpt, rt, p, calibration, kind="phi3v", options="num_crops=16"), device="cpu",
                           dtype=p)
        info = enc.describe()["precision"]["runtime"]
        print(f"phi3v tower {p} runtime={rt}: loaded in {time.perf_counter() - t0:.1f} s "
              f"({'converted now' if info['converted_now'] else 'read from the cache'})", flush=True)
        compiled[(p, rt)] = enc.model
        rows[f"phiclip {p} (runtime={rt})"] = (p, enc.model)
    # phiclip's default: precision auto, runtime auto (measured once on this CPU, then cached).
    default = load_encoder(f"phi3v:{ckpt}?num_crops=16", device="cpu")
    record = default.describe()["precision"]
    chosen = f"{record['dtype']}, {record.get('runtime', {}).get('runtime', 'torch')}"
    rows[f"phiclip default (auto: {chosen})"] = (record["dtype"], default.model)
    baseline = ReleasedImageEmbedding.from_phiclip(models["float32"]).eval()
    with torch.inference_mode():
        ref = torch.cat(baseline.image_tokens(pv, sizes))
        outs = {name: torch.cat(m.image_tokens(pv, sizes)).float() for name, (_, m) in rows.items()}
        fns = {"released way (float32)": lambda: baseline.image_tokens(pv, sizes)}
        fns.update({name: (lambda m=m: m.image_tokens(pv, sizes)) for name, (_, m) in rows.items()})
        times = time_interleaved(fns, repeats)
    t = Table(f"Phi-3-vision image tokens, {len(MIXED)} mixed images ({int(sum(inputs.num_crops_per_image))} real crops), "
              "tower 256 wide x 6 layers", ["what", "precision", "s", "vs released way", "vs best runtime, same precision",
                                            "vs released-way output"])
    base = times["released way (float32)"]
    t.add("released way (float32)", "float32", f"{base:.2f}", "1.00x", "", "")
    best = {p: min((times[f"phiclip {p} (runtime={rt})"] for q, rt in compiled if q == p), default=None) for p in models}
    for name, (p, _) in rows.items():
        s = times[name]
        vs_best = f"{best[p] / s:.2f}x" if best.get(p) else ""
        t.add(name, p, f"{s:.2f}", f"{base / s:.2f}x", vs_best, closeness(ref, outs[name]))
    tables.append(t)

    # int8's error per crop count: every int8 way against phiclip float32 on the same crops.
    e = Table("Phi-3-vision int8 against float32 per crop count (the mixed images above), tokens and pooled vectors",
              ["num_crops", "real crops", "int8 way", "tokens vs float32", "pooled vs float32", "within the int8 bound"])
    per_count = {n: Phi3VImageProcessor(num_crops=n)(images) for n in (1, 4, 16)}  # outside inference mode
    with torch.inference_mode():
        for n, inp in per_count.items():
            args = (inp.pixel_values, inp.image_sizes)
            ref_tokens = torch.cat(models["float32"].image_tokens(*args)).numpy()
            ref_pooled = models["float32"].pooled(*args).numpy()
            ways = {"torch (dynamic)": models["int8"]}
            if ("int8", "onnxruntime") in compiled:
                ways["onnxruntime (dynamic)"] = compiled[("int8", "onnxruntime")]
            if ("int8", "openvino") in compiled:  # calibrated on the crops this num_crops cuts
                spec = runtime_spec(ckpt, "openvino", "int8", calibration, kind="phi3v", options=f"num_crops={n}")
                ways[f"openvino (static, calibrated at num_crops={n})"] = load_encoder(spec, device="cpu", dtype="int8").model
            for way, m in ways.items():
                tokens = torch.cat(m.image_tokens(*args)).float().numpy()
                pooled = m.pooled(*args).float().numpy()
                e.add(str(n), str(int(sum(inp.num_crops_per_image))), way, closeness(ref_tokens, tokens),
                      closeness(ref_pooled, pooled),
                      f"tokens {_within('int8', ref_tokens, tokens)}, pooled {_within('int8', ref_pooled, pooled)}")
    tables.append(e)


# --------------------------------------------------------------------------------------------------
def bench_knn(tables: list[Table], tmp: Path, steps: int = 200) -> None:
    """kNN and zero-shot accuracy of a tiny CLIP fine-tuned here (phiclip's own ``finetune_clip``) at
    each precision, on held-out sample images the training never saw."""
    from PIL import Image

    from phiclip import load_encoder
    from phiclip.evaluate import knn_classify, knn_predict, stratified_split
    from phiclip.finetune.clip import finetune_clip
    from phiclip.testing import build_tiny_clip, make_sample_images

    # 12 classes (colour x shape), 12 images each; a stratified third is held out from the training.
    recs = make_sample_images(tmp / "labelled", per_class=12)
    labels = [r["caption"].removeprefix("a ") for r in recs]  # "red circle"
    classes = sorted(set(labels))
    y = np.array([classes.index(lb) for lb in labels])
    tr, te = stratified_split(labels, 1 / 3, seed=0)
    csv = tmp / "labelled" / "captions.csv"
    rows = [f"{recs[i]['path']},{recs[i]['caption']},{split}" for idx, split in ((tr, "train"), (te, "val")) for i in idx]
    csv.write_text("image,caption,split\n" + "\n".join(rows) + "\n", encoding="utf-8")
    base = build_tiny_clip(tmp / "clip-knn-random", image_size=32, patch_size=8, hidden_size=64, num_layers=4,
                           num_heads=4, projection_dim=32)
    threads = torch.get_num_threads()
    res = finetune_clip(f"clip:{base}", csv, tmp / "clip-knn-trained", steps=steps, batch_size=32, lr=2e-3,
                        warmup=0.1, weight_decay=0.0, seed=0, device="cpu", progress=False, num_threads=threads,
                        tensorboard=False)
    torch.set_num_threads(threads)

    def fmt(m: dict[str, float] | None) -> str:
        return "?" if m is None else ", ".join(f"{k} {v:.3f}" for k, v in sorted(m.items()))

    print(f"knn: fine-tuned the tiny CLIP ({res.train_images} train images, {steps} steps, batch 32) in "
          f"{res.seconds:.1f} s ({res.seconds_per_step:.3f} s/step, final loss {res.final_loss:.3f}); held-out "
          f"retrieval on {res.eval_images} images before: {fmt(res.before)}; after: {fmt(res.after)}", flush=True)

    images = [Image.open(r["path"]).convert("RGB") for r in recs]
    prompts = [f"a {c}" for c in classes]  # the captions' own wording
    rows_to_run = [(p, "torch") for p in PRECISIONS]
    calibration = tmp / "labelled" / "calibration.txt"  # static int8 calibrates on the training images
    calibration.write_text("\n".join(str(recs[i]["path"]) for i in tr) + "\n", encoding="utf-8")
    rows_to_run += runtime_rows(calibration)
    skipped = sorted({f"{rt} ({p})" for p, rt in RUNTIME_ROWS if missing_packages(rt, p)})
    if skipped:
        print(f"knn: {', '.join(skipped)} not installed: those rows are left out (pip install phiclip[cpu-runtimes])")
    t = Table(f"kNN (k=5) and zero-shot accuracy of a TRAINED tiny CLIP (hidden 64, 4 layers, 32 px; fine-tuned here "
              f"with phiclip's finetune_clip for {steps} steps, batch 32, seed 0, on {len(tr)} captioned sample images "
              f"'a {{colour}} {{shape}}') at each precision, on {len(te)} held-out images of {len(classes)} classes "
              f"(colour x shape; chance {1 / len(classes):.3f}); zero-shot prompts 'a {{colour}} {{shape}}'",
              ["precision", "kNN acc@1", "zero-shot acc@1", "kNN predictions = float32's",
               "zero-shot predictions = float32's", "vs float32 image vectors", "vs float32 text vectors"])
    ref: dict[str, np.ndarray] = {}
    for p, rt in rows_to_run:
        enc = load_encoder(runtime_spec(res.output, rt, p, calibration), device="cpu", dtype=p)
        x, txt = encode_images(enc, images), enc.encode_texts(prompts)
        knn = knn_classify(x[tr], y[tr], x[te], y[te], k=5)
        knn_pred = knn_predict(x[tr], y[tr], x[te], k=5, num_classes=len(classes))
        zs_pred = (_normed(x[te]) @ _normed(txt).T).argmax(1)
        if not ref:
            ref = {"x": x, "txt": txt, "knn": knn_pred, "zs": zs_pred}
        t.add(p if rt == "torch" else f"{p} (runtime={rt})", f"{knn['acc1']:.3f}", f"{np.mean(zs_pred == y[te]):.3f}",
              f"{np.mean(knn_pred == ref['knn']):.3f}", f"{np.mean(zs_pred == ref['zs']):.3f}",
              closeness(ref["x"], x), closeness(ref["txt"], txt))
    tables.append(t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=["matmul", "clip", "embed", "tower", "knn", "text", "default",
                                                  "phi3v-default"])
    ap.add_argument("--phi3v-crops", type=int, default=8, help="crops of the phi3v-default part")
    ap.add_argument("--texts", type=int, default=512, help="texts of the text part")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--clip-images", type=int, default=64)
    ap.add_argument("--embed-images", type=int, default=128)
    ap.add_argument("--calibration-images", type=int, default=CALIBRATION_IMAGES,
                    help="photo-like images static int8 is calibrated on (tower part)")
    ap.add_argument("--embed-precisions", nargs="+", default=["float32", "bfloat16", "int8", "auto", "default"],
                    choices=["float32", "bfloat16", "int8", "auto", "default"],
                    help="end-to-end rows (phiclip and contenders) for these precisions only; phiclip float32 always runs")
    ap.add_argument("--log-dir", default=None, help="write results.md/results.json here")
    args = ap.parse_args()
    parts = args.only or ["matmul", "clip", "embed", "tower", "knn", "text", "default", "phi3v-default"]
    tables: list[Table] = []

    class Printing(list):  # each table is printed as soon as it is complete (a long run shows progress)
        def append(self, t: Table) -> None:
            print(t.markdown() + "\n", flush=True)
            super().append(t)

    tables = Printing()
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="phiclip-precision-") as t:
        tmp = Path(t)
        clip = None
        if "matmul" in parts:
            bench_matmul(tables)
        if "clip" in parts or "embed" in parts:
            clip = bench_clip(tables, tmp, args.clip_images, args.repeats, timed="clip" in parts)
        if "embed" in parts:
            bench_embed(tables, tmp, args.embed_images, args.repeats, clip, tuple(args.embed_precisions))
        if "tower" in parts:
            bench_tower(tables, tmp, args.repeats, args.calibration_images)
        if "text" in parts:
            bench_text(tables, tmp, args.texts, args.repeats)
        if "default" in parts:
            bench_default(tables, tmp, args.clip_images, args.repeats)
        if "phi3v-default" in parts:
            bench_phi3v_default(tables, tmp, args.phi3v_crops, args.repeats)
        if "knn" in parts:
            bench_knn(tables, tmp)
    env = environment()
    text = "\n\n".join(tb.markdown() for tb in tables) + "\n\nEnvironment: " + ", ".join(f"{k} {v}" for k, v in env.items())
    text += f"; load average at the end {Path('/proc/loadavg').read_text().split()[:3] if Path('/proc/loadavg').exists() else '?'}"
    text += f"; {time.time() - t0:.0f} s in all"
    print(text)
    if args.log_dir:
        d = Path(args.log_dir)
        d.mkdir(parents=True, exist_ok=True)
        (d / "results.md").write_text(text + "\n")
        (d / "results.json").write_text(json.dumps({"tables": [{"title": tb.title, "columns": tb.columns, "rows": tb.rows}
                                                               for tb in tables], "env": env}, indent=2))


if __name__ == "__main__":
    main()
