"""Benchmarks of the collection commands (issue 24): dedup at scale, dedup on planted copies, the map.

Each case runs in a fresh Python process, so its peak resident set (``ru_maxrss``) is its own:

* ``dedup``: :func:`phiclip.collection.dedup.find_duplicates` on ``--n`` random unit vectors of dim
  ``--dim`` with 1% planted near copies (half at cosine ~0.995, half at ~0.96 near the 0.95 threshold),
  normalised in place as ``phiclip dedup`` does. Reports the time, the peak resident set (whole process,
  and during the search alone through VmHWM), the recall of the planted pairs at or above the threshold,
  and the recall on a sample of rows against an exact scan of all rows.
  Target: 1,000,000 x 512 in at most 5 minutes and 4 GB on 2 cores. Run it at 2,000,000 too: 10M is
  estimated from the 1M -> 2M growth (time and memory), not run.
* ``planted``: ``--images`` photo-like JPEGs, each with three planted copies (re-encoded JPEG at quality
  60, resized to half, a 10% crop: 5% off each side) and one exact byte copy; embedded with a **tiny
  random-weight CLIP** (:func:`phiclip.testing.build_tiny_clip`, 64 px: a stand-in with no training; its
  numbers say how the grouping behaves, not what a real CLIP gives) or, with ``--model SPEC``, a real one.
  Precision and recall of the near-duplicate pairs (member, representative) against the planted groups,
  and whether every exact copy is found.
* ``map``: :func:`phiclip.collection.layout.layout_2d` of ``--n`` vectors (UMAP when umap-learn is
  installed, else PCA: the method is printed) and the page. Target: 100,000 points in 3 minutes on 2 cores.

``python bench/collection.py smoke`` runs all three small (a minute on 2 cores); the full runs are

    python bench/collection.py dedup --n 1000000 --dim 512
    python bench/collection.py dedup --n 2000000 --dim 512
    python bench/collection.py planted --images 500
    python bench/collection.py map --n 100000

Each prints one JSON line (and ``--json-out FILE`` appends it there) for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
GB = 1e9


def _rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _unit_vectors(n: int, dim: int, seed: int, block: int = 200_000) -> np.ndarray:
    """``n`` random unit vectors (float32), made in blocks so no float64 (n, dim) matrix exists."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, block):
        stop = min(n, start + block)
        out[start:stop] = rng.standard_normal((stop - start, dim), dtype=np.float32)
        out[start:stop] /= np.linalg.norm(out[start:stop], axis=1, keepdims=True)  # no (n, dim) temporary
    return out


def _reset_peak() -> bool:
    """Reset the kernel's peak resident set of this process (VmHWM), so a later :func:`_peak_since`
    measures one phase; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_since() -> int | None:
    """VmHWM (bytes): the peak resident set since the last :func:`_reset_peak`."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _sample_recall(x: np.ndarray, i: np.ndarray, j: np.ndarray, rows: np.ndarray, threshold: float
                   ) -> dict[str, Any]:
    """Recall of the pairs found against an exact scan (every row) for the sampled ``rows``."""
    from phiclip.collection.dedup import SIM_TOLERANCE

    found = {(int(a), int(b)) for a, b in zip(i, j)}
    truth = 0
    hit = 0
    floor = np.float32(threshold - SIM_TOLERANCE)
    for start in range(0, len(rows), 64):
        q = rows[start:start + 64]
        qa, jb = np.nonzero(x[q] @ x.T >= floor)
        for a, b in zip(q[qa].tolist(), jb.tolist()):
            if a != b:
                truth += 1
                hit += (min(a, b), max(a, b)) in found
    return {"rows": len(rows), "true_pairs": truth, "found": hit, "recall": round(hit / truth, 4) if truth else None}


def case_dedup(n: int, dim: int, copies: float = 0.01, threshold: float = 0.95, seed: int = 0,
               exact_limit: int | None = None, nprobe: int | None = None, sample: int = 600) -> dict[str, Any]:
    from phiclip.collection import dedup
    from phiclip.collection.dedup import EXACT_LIMIT, find_duplicates

    exact_limit = EXACT_LIMIT if exact_limit is None else exact_limit
    nprobe = dedup.DEFAULT_NPROBE if nprobe is None else nprobe
    t0 = time.perf_counter()
    x = _unit_vectors(n, dim, seed)
    rng = np.random.default_rng(seed + 1)
    m = int(n * copies)
    src = rng.choice(n, size=m, replace=False)
    dst = rng.choice(np.setdiff1d(np.arange(n), src), size=m, replace=False)
    # half the copies close (noise 0.1: cosine ~0.995), half near the threshold (noise 0.3: cosine ~0.958,
    # some of them below 0.95: the truth is the exact cosine, not the planting)
    scale = np.where(np.arange(m) < m // 2, 0.1, 0.3).astype(np.float32)[:, None]
    x[dst] = x[src] + (scale / np.sqrt(dim)) * rng.standard_normal((m, dim), dtype=np.float32)
    x[dst] /= np.linalg.norm(x[dst], axis=1, keepdims=True)
    cos = np.einsum("nd,nd->n", x[src], x[dst])
    ids = [str(i) for i in range(n)]
    made_s = time.perf_counter() - t0
    rss_data = _rss_bytes()
    # the pairs (for the sample recall) are caught on their way from the search to the grouping
    caught: dict[str, np.ndarray] = {}
    inner = dedup.near_duplicate_pairs

    def catch(*args: Any, **kwargs: Any):
        i, j, s = inner(*args, **kwargs)
        caught["i"], caught["j"] = i, j
        return i, j, s

    dedup.near_duplicate_pairs = catch
    reset = _reset_peak()
    t1 = time.perf_counter()
    report = find_duplicates(ids, x, threshold=threshold, normalized=True, exact_limit=exact_limit, nprobe=nprobe)
    seconds = time.perf_counter() - t1
    peak = _rss_bytes()
    dedup_peak = _peak_since() if reset else None
    pairs = {(int(g[1]), int(g[2])) for g in report.groups if g[1] != g[2]}
    found_pairs = set(zip(caught["i"].tolist(), caught["j"].tolist()))
    planted = [(int(s), int(d)) for s, d, c in zip(src, dst, cos) if c >= threshold]
    found = sum(1 for s, d in planted if (min(s, d), max(s, d)) in found_pairs)
    grouped = sum(1 for s, d in planted if (d, s) in pairs or (s, d) in pairs)
    srng = np.random.default_rng(seed + 2)
    rows = np.unique(np.concatenate([srng.choice(dst, sample // 2, replace=False), srng.choice(n, sample // 2)]))
    t2 = time.perf_counter()
    sample_recall = _sample_recall(x, caught["i"], caught["j"], rows, threshold)
    return {
        "case": "dedup", "n": n, "dim": dim, "threshold": threshold, "planted_pairs": m,
        "planted_at_or_above_threshold": len(planted), "planted_cosine_min_max": [round(float(cos.min()), 4),
                                                                                  round(float(cos.max()), 4)],
        "method": report.method, "exact_limit": exact_limit, "nprobe": nprobe, "seconds": round(seconds, 2),
        "make_data_s": round(made_s, 2), "peak_rss_gb": round(peak / GB, 3),
        "rss_after_data_gb": round(rss_data / GB, 3),
        "peak_rss_during_dedup_gb": round(dedup_peak / GB, 3) if dedup_peak else None,
        "groups": report.n_groups,
        "planted_pairs_found": found, "planted_recall": round(found / len(planted), 4) if planted else None,
        "planted_grouped_with_their_original": grouped,
        "sample_recall_vs_exact_scan": sample_recall, "sample_scan_s": round(time.perf_counter() - t2, 2),
        "loadavg_1_5_15": [round(v, 2) for v in os.getloadavg()],
        "targets": {"seconds": 300, "peak_rss_gb": 4.0} if n == 1_000_000 and dim == 512 else None,
    }


def _copies(path: Path, out: Path) -> dict[str, Path]:
    from PIL import Image

    img = Image.open(path).convert("RGB")
    w, h = img.size
    out.mkdir(parents=True, exist_ok=True)
    made = {}
    made["jpeg60"] = out / f"{path.stem}_jpeg60.jpg"
    img.save(made["jpeg60"], quality=60)
    made["half"] = out / f"{path.stem}_half.jpg"
    img.resize((max(1, w // 2), max(1, h // 2)), Image.Resampling.BICUBIC).save(made["half"], quality=90)
    made["crop10"] = out / f"{path.stem}_crop10.jpg"
    img.crop((w // 20, h // 20, w - w // 20, h - h // 20)).save(made["crop10"], quality=90)
    made["bytes"] = out / f"{path.stem}_bytecopy.jpg"
    shutil.copyfile(path, made["bytes"])
    return made


def case_planted(images: int, model: str | None, threshold: float, seed: int = 0) -> dict[str, Any]:
    sys.path.insert(0, str(HERE))
    from common import write_photo_jpegs

    from phiclip import schema
    from phiclip.collection.dedup import find_duplicates, source_reader
    from phiclip.encoders import load_encoder
    from phiclip.pipeline.step import encode_images
    from phiclip.testing import build_tiny_clip

    with tempfile.TemporaryDirectory(prefix="phiclip-bench-planted-") as tmp:
        root = Path(tmp)
        originals = sorted(Path(p) for p in write_photo_jpegs(root / "orig", images, size=(640, 480), seed=seed))
        truth: dict[str, str] = {}
        paths: list[Path] = []
        for p in originals:
            paths.append(p)
            truth[str(p)] = str(p)
            for c in _copies(p, root / "copies").values():
                paths.append(c)
                truth[str(c)] = str(p)
        what = model or "tiny random-weight CLIP (build_tiny_clip, 64 px, seed 0): untrained"
        spec = model or f"clip:{build_tiny_clip(root / 'tiny', image_size=64, patch_size=16, seed=0)}"
        encoder = load_encoder(spec, device="cpu")
        t0 = time.perf_counter()
        vectors = encode_images(encoder, [str(p) for p in paths], batch_size=32)
        embed_s = time.perf_counter() - t0
        ids = [str(p) for p in paths]
        t1 = time.perf_counter()
        report = find_duplicates(ids, vectors, threshold=threshold,
                                 read_bytes=source_reader(ids, [schema.path_to_source(p) for p in paths]))
        dedup_s = time.perf_counter() - t1
    groups: dict[int, list[str]] = {}
    for g in report.groups:
        groups.setdefault(g[0], []).append(g[1])
    groups_of: dict[str, set[int]] = {}
    for gid, members in groups.items():
        for item in members:
            groups_of.setdefault(item, set()).add(gid)
    # near-duplicate pairs: every two members of one group (exact groups included: a byte copy is a copy)
    predicted = {(a, b) for members in groups.values() for a in members for b in members if a < b}
    true_pairs = set()
    by_orig: dict[str, list[str]] = {}
    for item, orig in truth.items():
        by_orig.setdefault(orig, []).append(item)
    for members in by_orig.values():
        true_pairs |= {(a, b) for a in members for b in members if a < b}
    tp = len(predicted & true_pairs)
    per_kind = {}
    for kind in ("jpeg60", "half", "crop10", "bytes"):
        copies = [i for i in ids if i.endswith(f"_{kind}.jpg") or (kind == "bytes" and i.endswith("_bytecopy.jpg"))]
        hit = sum(1 for c in copies if groups_of.get(c, set()) & groups_of.get(truth[c], set()))
        per_kind[kind] = round(hit / len(copies), 4) if copies else None
    exact_found = all(
        any(g[4] == "exact" and g[1] == c for g in report.groups) for c in ids if c.endswith("_bytecopy.jpg")
    )
    return {
        "case": "planted", "model": what, "images": images, "items": len(ids), "threshold": threshold,
        "precision": round(tp / len(predicted), 4) if predicted else None,
        "recall": round(tp / len(true_pairs), 4) if true_pairs else None,
        "recall_by_copy_kind": per_kind, "exact_copies_all_found": exact_found,
        "embed_s": round(embed_s, 2), "dedup_s": round(dedup_s, 3), "method": report.method,
    }


def case_map(n: int, dim: int, seed: int = 0) -> dict[str, Any]:
    from phiclip.collection.layout import layout_2d
    from phiclip.collection.pages import map_page

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, dim)).astype(np.float32)
    labels = rng.integers(0, 20, n)
    x = centres[labels] + 0.7 * rng.standard_normal((n, dim), dtype=np.float32)
    t0 = time.perf_counter()
    layout = layout_2d(x, seed=seed)
    layout_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    page = map_page(layout, [f"item{i}" for i in range(n)], labels=[f"c{v}" for v in labels], colour_by="labels")
    page_s = time.perf_counter() - t1
    return {
        "case": "map", "n": n, "dim": dim, "method": layout.description, "layout_s": round(layout_s, 2),
        "page_s": round(page_s, 2), "page_mb": round(len(page.encode()) / 1e6, 2),
        "peak_rss_gb": round(_rss_bytes() / GB, 3), "targets": {"seconds": 180} if n == 100_000 else None,
    }


def _run_child(args: list[str], json_out: str | None) -> dict[str, Any]:
    """Run one case in a fresh process (its own peak memory); print and return its JSON line."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    out = subprocess.run([sys.executable, __file__, "--child", *args], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    line = out.stdout.strip().splitlines()[-1]
    print(line, flush=True)
    if json_out:
        with open(json_out, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    return json.loads(line)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("case", choices=("dedup", "planted", "map", "smoke"))
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--model", default=None, help="planted: an encoder spec instead of the tiny random CLIP")
    ap.add_argument("--threshold", type=float, default=0.95)
    ap.add_argument("--exact-limit", type=int, default=None,
                    help="dedup: items searched exactly (else inverted lists)")
    ap.add_argument("--nprobe", type=int, default=None, help="dedup: lists each item is compared with")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        if a.case == "dedup":
            result = case_dedup(a.n, a.dim, threshold=a.threshold, exact_limit=a.exact_limit, nprobe=a.nprobe)
        elif a.case == "planted":
            result = case_planted(a.images, a.model, a.threshold)
        else:
            result = case_map(a.n, a.dim)
        print(json.dumps(result), flush=True)
        return
    if a.case == "smoke":
        _run_child(["dedup", "--n", "20000", "--dim", "64"], a.json_out)
        _run_child(["dedup", "--n", "30000", "--dim", "64", "--exact-limit", "10000"], a.json_out)  # inverted lists
        _run_child(["planted", "--images", "20"], a.json_out)
        _run_child(["map", "--n", "5000", "--dim", "64"], a.json_out)
        return
    extra = ["--threshold", str(a.threshold)]
    if a.case == "dedup":
        limit = ["--exact-limit", str(a.exact_limit)] if a.exact_limit is not None else []
        limit += ["--nprobe", str(a.nprobe)] if a.nprobe is not None else []
        _run_child(["dedup", "--n", str(a.n), "--dim", str(a.dim), *extra, *limit], a.json_out)
    elif a.case == "planted":
        _run_child(["planted", "--images", str(a.images), *extra] + (["--model", a.model] if a.model else []),
                   a.json_out)
    else:
        _run_child(["map", "--n", str(a.n), "--dim", str(a.dim)], a.json_out)


if __name__ == "__main__":
    main()
