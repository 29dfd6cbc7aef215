"""Load time of a real-size open_clip ViT-L/14 (``open_clip:`` kind) against transformers' ``CLIPModel``
of the same weights, first load (no cached digests) and later loads.

    python bench/open_clip_load.py                    # builds the checkpoints under /tmp (about 40 s)
    python bench/open_clip_load.py --work DIR --repeats 5 --encoders

The checkpoint: open_clip's ViT-L/14 config at real size (428M parameters, 1.7 GB float32
``open_clip_model.safetensors``), random weights (:func:`phiclip.testing.build_tiny_open_clip`), and the
transformers ``CLIPModel`` folder ``phiclip.open_clip.export.export_to_hf`` makes of it. Page cache warm
(every file read once before timing).

Contenders, one round each in a rotating order (a slow spell of a shared machine hits all alike):

* ``transformers``: ``CLIPModel.from_pretrained`` of the exported folder (safetensors, float32);
* ``phiclip, hashing as before``: what ``load_open_clip`` did up to ae12e56: the weights read with
  ``load_file``, then every tensor of the file hashed on one thread, then the model built;
* ``phiclip first``: ``load_open_clip`` with an empty digest cache: the time it returns the model (the
  tensors still being hashed on other threads) and the time the fingerprint is ready
  (``checkpoint.fingerprint``);
* ``phiclip later``: ``load_open_clip`` and its fingerprint with the file's digests cached;
* with ``--encoders``: the whole ``open_clip:`` encoder (``load_encoder``, float32, CPU, ``runtime=torch``):
  first, when ``load_encoder`` returns (the fingerprint still hashing in the background) and when its
  fingerprint is read (what ``embed`` waits for before its manifest); later; and the ``clip:`` encoder of
  the exported folder, first (transformers' load, the files hashed in the background).

"First" loads get a fresh, empty ``PHICLIP_CACHE`` each time.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch


def _build(work: Path) -> tuple[Path, Path]:
    from phiclip.open_clip.export import export_to_hf
    from phiclip.testing import OPEN_CLIP_ARCHS, build_tiny_open_clip

    oc, hf = work / "open_clip-L14", work / "hf-L14"
    if not (oc / "open_clip_model.safetensors").is_file():
        build_tiny_open_clip(oc, model_cfg=OPEN_CLIP_ARCHS["ViT-L-14"], seed=0)
    if not (hf / "model.safetensors").is_file():
        with tempfile.TemporaryDirectory() as cache:
            os.environ["PHICLIP_CACHE"] = cache
            export_to_hf(oc, hf)
    return oc, hf


def _fresh_cache() -> None:
    os.environ["PHICLIP_CACHE"] = tempfile.mkdtemp(prefix="phiclip-bench-cache-")


def _timed(fn: Callable[[dict[str, float], float], None]) -> dict[str, float]:
    marks: dict[str, float] = {}
    gc.collect()
    start = time.perf_counter()
    fn(marks, start)
    return marks


def contenders(oc: Path, hf: Path, encoders: bool) -> dict[str, Callable[[], dict[str, float]]]:
    from safetensors.torch import load_file
    from transformers import CLIPModel

    import phiclip.models.checkpoint as C
    from phiclip.encoders.registry import load_encoder
    from phiclip.open_clip.convert import build_clip_model, to_hf_state_dict
    from phiclip.open_clip.loading import load_open_clip, open_open_clip

    def transformers(marks: dict[str, float], start: float) -> None:
        CLIPModel.from_pretrained(str(hf), dtype=torch.float32, use_safetensors=True).eval()
        marks["transformers"] = time.perf_counter() - start

    def before(marks: dict[str, float], start: float) -> None:
        _fresh_cache()
        checkpoint, config = open_open_clip(oc)
        checkpoint.use_weight_file("open_clip_model.safetensors")
        state = load_file(str(oc / "open_clip_model.safetensors"))
        workers = C.hash_workers
        C.hash_workers = lambda: 1  # type: ignore[assignment]
        try:
            fingerprint = checkpoint.hash_weight_files()
        finally:
            C.hash_workers = workers  # type: ignore[assignment]
        build_clip_model(config.hf_config_dict(), to_hf_state_dict(state)[0])
        marks["phiclip, hashing as before (one thread, after the read)"] = time.perf_counter() - start
        marks["_fingerprint"] = fingerprint  # type: ignore[assignment]

    def first(marks: dict[str, float], start: float) -> None:
        _fresh_cache()
        loaded = load_open_clip(oc)
        marks["phiclip first: model back (hashing goes on)"] = time.perf_counter() - start
        fingerprint = loaded.checkpoint.fingerprint
        marks["phiclip first: model and fingerprint"] = time.perf_counter() - start
        marks["_fingerprint"] = fingerprint  # type: ignore[assignment]

    def later(marks: dict[str, float], start: float) -> None:
        loaded = load_open_clip(oc)
        fingerprint = loaded.checkpoint.fingerprint
        marks["phiclip later (digests cached): model and fingerprint"] = time.perf_counter() - start
        marks["_fingerprint"] = fingerprint  # type: ignore[assignment]

    # runtime=torch: the load itself (runtime=auto, the default, would also compile on a first load).
    def encoder_first(marks: dict[str, float], start: float) -> None:
        _fresh_cache()
        enc = load_encoder(f"open_clip:{oc}?runtime=torch", device="cpu", dtype="float32")
        marks["open_clip: encoder, first: encoder back (hashing goes on)"] = time.perf_counter() - start
        marks["_fingerprint"] = enc.weights_fingerprint  # type: ignore[assignment]
        marks["open_clip: encoder, first: encoder and fingerprint"] = time.perf_counter() - start

    def encoder_later(marks: dict[str, float], start: float) -> None:
        enc = load_encoder(f"open_clip:{oc}?runtime=torch", device="cpu", dtype="float32")
        _ = enc.weights_fingerprint
        marks["open_clip: encoder, later: encoder and fingerprint"] = time.perf_counter() - start

    def clip_encoder_first(marks: dict[str, float], start: float) -> None:
        _fresh_cache()
        enc = load_encoder(f"clip:{hf}?runtime=torch", device="cpu", dtype="float32")
        marks["clip: encoder of the exported folder, first: encoder back"] = time.perf_counter() - start
        _ = enc.weights_fingerprint
        marks["clip: encoder of the exported folder, first: encoder and fingerprint"] = time.perf_counter() - start

    fns = {"transformers": transformers, "before": before, "first": first, "later": later}
    if encoders:
        fns.update(encoder_first=encoder_first, encoder_later=encoder_later, clip_encoder_first=clip_encoder_first)
    return {name: (lambda fn=fn: _timed(fn)) for name, fn in fns.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "phiclip-bench-open_clip-load")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--encoders", action="store_true", help="also time the whole open_clip: / clip: encoders")
    args = parser.parse_args()

    from phiclip.cpu.precision import cpu_name
    from phiclip.models.checkpoint import hash_workers

    args.work.mkdir(parents=True, exist_ok=True)
    oc, hf = _build(args.work)
    for path in (oc / "open_clip_model.safetensors", hf / "model.safetensors"):  # page cache warm
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    print(f"CPU: {cpu_name()}; {os.cpu_count()} cores, {hash_workers()} hashing threads, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads; commit {commit}; load average before: {os.getloadavg()}")
    fns = contenders(oc, hf, args.encoders)
    names = list(fns)
    for fn in fns.values():  # warm-up round (imports, first allocations)
        fn()
    times: dict[str, list[float]] = {}
    fingerprints: set[str] = set()
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            for label, value in fns[name]().items():
                if label == "_fingerprint":
                    fingerprints.add(str(value))
                else:
                    times.setdefault(label, []).append(float(value))
    if len(fingerprints) != 1:
        raise SystemExit(f"the contenders' fingerprints differ: {sorted(fingerprints)}")
    base = statistics.median(times["transformers"])
    print(f"{args.repeats} rounds after one warm-up; every phiclip fingerprint equal ({fingerprints.pop()[:23]}...)\n")
    print("| load | median s | runs (s) | / transformers |")
    print("|---|---|---|---|")
    for label, ts in times.items():
        med = statistics.median(ts)
        print(f"| {label} | {med:.2f} | {' '.join(f'{t:.2f}' for t in ts)} | {med / base:.2f}x |")
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
