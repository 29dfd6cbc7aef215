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
* ``map-page``: that page (PCA layout) in headless Chromium through Selenium: load to first draw, one
  full redraw (a pan or zoom step) with every point in view and zoomed 4x, one hover hit test.

``python bench/collection.py smoke`` runs all three small (a minute on 2 cores); the full runs are

    python bench/collection.py dedup --n 1000000 --dim 512
    python bench/collection.py dedup --n 2000000 --dim 512
    python bench/collection.py planted --images 500
    python bench/collection.py map --n 100000
    python bench/collection.py map-page --n 100000
    python bench/collection.py dedup-disk --n 2000000 --dim 512 --compare

* ``dedup-disk``: the same vectors written to a Parquet file (id, vector), then ``phiclip dedup FILE``
  (:func:`dedup_collection`) with ``--memmap-dir`` (vectors read in chunks into a memory map) and, with
  ``--compare``, with the vectors in memory; each run in its own process: time (reading and search), peak
  resident set, its anonymous part (the process's own arrays) and its file-backed part (the memory map's
  cached pages, which the kernel drops under memory pressure), the planted pairs grouped, and whether the
  two runs' duplicates.parquet and keep.parquet are identical.

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
    x, src, dst, cos = _planted_vectors(n, dim, seed, copies)
    m = len(src)
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


def _planted_vectors(n: int, dim: int, seed: int, copies: float = 0.01
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x, src, dst, cos)``: ``n`` random unit vectors, rows ``dst`` planted near copies of rows ``src``
    (half at cosine ~0.995, half near the 0.95 threshold), ``cos`` their exact cosines."""
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
    return x, src, dst, np.einsum("nd,nd->n", x[src], x[dst])


def case_make_parquet(n: int, dim: int, out: str, seed: int = 0, block: int = 100_000) -> dict[str, Any]:
    """The ``dedup`` case's vectors as a Parquet file (id, fixed_size_list<float32> vector), written in
    blocks of rows, and the planted pairs beside it (``.planted.npz``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    x, src, dst, cos = _planted_vectors(n, dim, seed)
    np.savez(out + ".planted.npz", src=src, dst=dst, cos=cos)
    schema = pa.schema([("id", pa.string()), ("vector", pa.list_(pa.float32(), dim))])
    with pq.ParquetWriter(out, schema) as w:
        for start in range(0, n, block):
            stop = min(n, start + block)
            vec = pa.FixedSizeListArray.from_arrays(pa.array(x[start:stop].reshape(-1)), dim)
            w.write_table(pa.table({"id": pa.array([str(i) for i in range(start, stop)]), "vector": vec},
                                   schema=schema))
    return {"case": "make-parquet", "n": n, "dim": dim, "file": out, "bytes": os.path.getsize(out),
            "seconds": round(time.perf_counter() - t0, 1)}


class _RssSampler:
    """Peak anonymous and file-backed resident memory (``RssAnon``, ``RssFile`` of /proc/self/status),
    sampled every ``every`` seconds on a thread: a memory map's cached pages are file-backed (the kernel
    drops them under pressure), the process's own arrays anonymous."""

    def __init__(self, every: float = 0.1) -> None:
        import threading

        self.peak = {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    def _run(self, every: float) -> None:
        while not self._stop.is_set():
            try:
                with open("/proc/self/status") as f:
                    for line in f:
                        key = line.split(":")[0]
                        if key in self.peak:
                            self.peak[key] = max(self.peak[key], int(line.split()[1]) * 1024)
            except OSError:
                return
            self._stop.wait(every)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return {k: round(v / GB, 3) for k, v in self.peak.items()}


def case_dedup_file(parquet: str, out: str, memmap_dir: str | None, threshold: float) -> dict[str, Any]:
    """``phiclip dedup PARQUET -o OUT`` (:func:`dedup_collection`), vectors in memory or memory-mapped
    (``--memmap-dir``): the time, peak memory (whole, anonymous, file-backed) and the planted recall."""
    import pyarrow.parquet as pq

    from phiclip.collection.commands import dedup_collection

    sampler = _RssSampler()
    t0 = time.perf_counter()
    r = dedup_collection(parquet, out, threshold=threshold, exact=False, memmap_dir=memmap_dir)
    seconds = time.perf_counter() - t0
    peaks = sampler.stop()
    planted = np.load(parquet + ".planted.npz")
    groups = pq.read_table(Path(out) / "duplicates.parquet", columns=["group_id", "id"]).to_pydict()
    members: dict[int, set[int]] = {}
    for g, item in zip(groups["group_id"], groups["id"]):
        members.setdefault(g, set()).add(int(item))
    group_of = {item: g for g, items in members.items() for item in items}
    truth = [(int(a), int(b)) for a, b, c in zip(planted["src"], planted["dst"], planted["cos"]) if c >= threshold]
    together = sum(1 for a, b in truth if a in group_of and group_of[a] == group_of.get(b))
    return {
        "case": "dedup-file", "input": parquet, "vectors": r.summary["vectors"], "items": r.summary["input"]["items"],
        "dim": r.summary["input"]["dim"], "threshold": threshold, "method": r.summary["method"],
        "seconds_total": round(seconds, 1), "seconds_search": r.summary["seconds"],
        "seconds_read": round(seconds - r.summary["seconds"], 1), "groups": r.summary["groups"],
        "peak_rss_gb": round(_rss_bytes() / GB, 3), "peak_rss_anon_gb": peaks["RssAnon"],
        "peak_rss_file_gb": peaks["RssFile"],
        "planted_pairs_at_or_above_threshold": len(truth), "planted_pairs_in_one_group": together,
        "loadavg_1_5_15": [round(v, 2) for v in os.getloadavg()],
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


#: The features the planted case can embed with, and what each one is (printed with its numbers).
PLANTED_FEATURES = {
    "tiny-clip": "random-weight CLIP, tiny (build_tiny_clip: 64 px, patch 16, hidden 32, 2 layers): untrained",
    "vit-b32-random": "random-weight CLIP at ViT-B/32 size (224 px, patch 32, hidden 768, 12 layers): untrained",
    "thumb-hist": ("non-learned descriptor, given to phiclip dedup as vectors made elsewhere (a Parquet "
                   "id + vector column): 16x16 grey thumbnail (area average, zero mean, unit norm) and "
                   "4x4x4 RGB histogram (square root, unit norm), concatenated (320 values)"),
}
COPY_KINDS = ("jpeg60", "half", "crop10", "bytes")


def thumb_hist(path: str | Path) -> np.ndarray:
    """The ``thumb-hist`` descriptor of one image (:data:`PLANTED_FEATURES`): float32 (320,)."""
    from PIL import Image

    with Image.open(path) as im:
        rgb = im.convert("RGB")
    grey = np.asarray(rgb.convert("L").resize((16, 16), Image.Resampling.BOX), np.float32).reshape(-1)
    grey -= grey.mean()
    grey /= max(float(np.linalg.norm(grey)), 1e-6)
    q = (np.asarray(rgb.resize((128, 128), Image.Resampling.BOX), np.int64) // 64).reshape(-1, 3)
    hist = np.sqrt(np.bincount(q[:, 0] * 16 + q[:, 1] * 4 + q[:, 2], minlength=64).astype(np.float32))
    hist /= max(float(np.linalg.norm(hist)), 1e-6)
    return np.concatenate([grey, hist]).astype(np.float32)


def _planted_scores(report: Any, truth: dict[str, str]) -> dict[str, Any]:
    """Precision and recall of a dedup report against the planted families (an original and its copies).

    The report's groups that share an item (an exact group's representative can also stand in a near
    group) are joined into one predicted family; a pair is two items of one family. Precision: the share
    of the predicted pairs that are planted pairs; recall: the share of the planted pairs predicted.
    Per copy kind, the share of those copies put in one family with their original."""
    parent: dict[str, str] = {}

    def find(a: str) -> str:
        while parent.setdefault(a, a) != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    groups: dict[int, list[str]] = {}
    for g in report.groups:
        groups.setdefault(g[0], []).append(g[1])
    for members in groups.values():
        for m in members[1:]:
            parent[find(m)] = find(members[0])
    family: dict[str, list[str]] = {}
    for item in parent:
        family.setdefault(find(item), []).append(item)
    predicted = {(a, b) for members in family.values() for a in members for b in members if a < b}
    planted: dict[str, list[str]] = {}
    for item, orig in truth.items():
        planted.setdefault(orig, []).append(item)
    true_pairs = {(a, b) for members in planted.values() for a in members for b in members if a < b}
    tp = len(predicted & true_pairs)
    per_kind = {}
    for kind in COPY_KINDS:
        copies = [i for i in truth if i.endswith(f"_{kind}.jpg")]
        per_kind[kind] = round(sum(1 for c in copies if c in parent and truth[c] in parent
                                   and find(c) == find(truth[c])) / len(copies), 4) if copies else None
    mixed = sum(1 for members in family.values() if len({truth[m] for m in members}) > 1)
    return {
        "precision": round(tp / len(predicted), 4) if predicted else None,
        "recall": round(tp / len(true_pairs), 4), "predicted_pairs": len(predicted), "planted_pairs": len(true_pairs),
        "recall_by_copy_kind": per_kind, "families_mixing_originals": mixed,
        "exact_copies_all_found": all(any(g[4] == "exact" and g[1] == c for g in report.groups)
                                      for c in truth if c.endswith("_bytes.jpg")),
    }


def case_planted(images: int, features: list[str], thresholds: list[float], model: str | None = None,
                 seed: int = 0) -> dict[str, Any]:
    """``phiclip dedup`` (:func:`dedup_collection` on a Parquet of id, source, vector) on ``images``
    distinct structured photos (:func:`common.structured_photo`, 640x480 JPEG q90), each with four planted
    copies (:data:`COPY_KINDS`: re-encoded at quality 60, resized to half, a 10% crop (5% off each side),
    a byte copy), at each threshold, for each feature (:data:`PLANTED_FEATURES`, or ``model``: a spec)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sys.path.insert(0, str(HERE))
    from common import structured_photo

    from phiclip import schema
    from phiclip.collection.commands import dedup_collection
    from phiclip.encoders import load_encoder
    from phiclip.pipeline.step import encode_images
    from phiclip.testing import build_tiny_clip

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="phiclip-bench-planted-") as tmp:
        root = Path(tmp)
        (root / "orig").mkdir()
        truth: dict[str, str] = {}
        paths: list[Path] = []
        for i in range(images):
            p = root / "orig" / f"img{i:05d}.jpg"
            structured_photo(640, 480, seed * 100_003 + i).save(p, quality=90)
            paths.append(p)
            truth[p.name] = p.name
            for kind, c in _copies(p, root / "copies").items():
                c = c.rename(c.with_name(f"{p.stem}_{kind}.jpg"))
                paths.append(c)
                truth[c.name] = p.name
        ids = [p.name for p in paths]
        specs = {
            "tiny-clip": lambda: f"clip:{build_tiny_clip(root / 'tiny', image_size=64, patch_size=16, seed=0)}",
            "vit-b32-random": lambda: "clip:" + str(build_tiny_clip(
                root / "b32", image_size=224, patch_size=32, hidden_size=768, num_layers=12, num_heads=12,
                projection_dim=512, seed=0)),
        }
        for feature in ([model] if model else features):
            t0 = time.perf_counter()
            if feature == "thumb-hist":
                vectors = np.stack([thumb_hist(p) for p in paths])
            else:
                spec = feature if model else specs[feature]()
                vectors = encode_images(load_encoder(spec, device="cpu"), [str(p) for p in paths], batch_size=32)
            vectors_s = time.perf_counter() - t0
            table = root / f"{feature.replace(':', '_').replace('/', '_')}.parquet"
            pq.write_table(pa.table({"id": ids, "source": [schema.path_to_source(p) for p in paths],
                                     "vector": pa.array(list(np.asarray(vectors, np.float32)),
                                                        pa.list_(pa.float32()))}), table)
            unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
            originals = unit[[k for k, i in enumerate(ids) if truth[i] == i]]
            between = originals @ originals.T
            off = between[~np.eye(len(originals), dtype=bool)]
            row: dict[str, Any] = {
                "what": PLANTED_FEATURES.get(feature, f"encoder {feature}"), "vectors_s": round(vectors_s, 1),
                "cosine_between_distinct_originals": {"median": round(float(np.median(off)), 4),
                                                      "p99": round(float(np.quantile(off, 0.99)), 4),
                                                      "max": round(float(off.max()), 4)},
                "cosine_copy_to_original": {}, "by_threshold": {},
            }
            index = {i: k for k, i in enumerate(ids)}
            for kind in COPY_KINDS:
                sims = [float(unit[index[i]] @ unit[index[truth[i]]]) for i in ids if i.endswith(f"_{kind}.jpg")]
                row["cosine_copy_to_original"][kind] = {"median": round(float(np.median(sims)), 4),
                                                        "min": round(float(np.min(sims)), 4)}
            for t in thresholds:
                r = dedup_collection(table, root / f"out-{feature}-{t}", threshold=t)
                row["by_threshold"][str(t)] = _planted_scores(r.report, truth)
            results[feature] = row
    return {"case": "planted", "images": images, "items": len(ids), "copies_per_image": len(COPY_KINDS),
            "image_recipe": "common.structured_photo 640x480, JPEG q90", "features": results,
            "loadavg_1_5_15": [round(v, 2) for v in os.getloadavg()]}


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


_PAGE_TIMINGS = """
    const m = window.phiclipMap, v = m.view(), out = {first_draw_ms: m.firstDrawMs};
    function per(fn, times) { const t = performance.now(); for (let k = 0; k < times; k++) fn(k);
                              return (performance.now() - t) / times; }
    out.draw_ms_whole_view = per(() => m.draw(), 20);
    out.drawn_whole_view = Number(document.body.getAttribute('data-drawn'));
    m.zoom(4);
    out.draw_ms_zoom_4x = per(() => m.draw(), 20);
    out.drawn_zoom_4x = Number(document.body.getAttribute('data-drawn'));
    m.zoom(0.25);
    let seed = 1;
    function rnd() { seed = (seed * 16807) % 2147483647; return seed / 2147483647; }
    out.hover_hit_test_ms = per(() => m.nearest(rnd() * v.width, rnd() * v.height), 2000);
    return out;"""


def case_map_page(n: int, dim: int, seed: int = 0) -> dict[str, Any]:
    """The map page of ``n`` points (20 labelled clusters, PCA layout) in headless Chromium through
    Selenium: load to first draw, one full redraw (what a pan or zoom step costs) with every point in
    view and zoomed 4x, and one hover hit test, timed in the page (``performance.now()``)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    from phiclip.collection.layout import layout_2d
    from phiclip.collection.pages import map_page, write_page

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, dim)).astype(np.float32)
    labels = rng.integers(0, 20, n)
    x = centres[labels] + 0.7 * rng.standard_normal((n, dim), dtype=np.float32)
    layout = layout_2d(x, method="pca", seed=seed)
    with tempfile.TemporaryDirectory(prefix="phiclip-bench-mappage-") as tmp:
        page = write_page(map_page(layout, [f"item{i}" for i in range(n)], labels=[f"c{v}" for v in labels],
                                   colour_by="labels"), Path(tmp) / "map.html")
        opts = webdriver.ChromeOptions()
        opts.binary_location = "/usr/bin/chromium"
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,1000", "--force-device-scale-factor=1", f"--user-data-dir={tmp}/profile"):
            opts.add_argument(flag)
        driver = webdriver.Chrome(service=Service(executable_path="/usr/bin/chromedriver"), options=opts)
        try:
            driver.set_page_load_timeout(120)
            t0 = time.perf_counter()
            driver.get(page.resolve().as_uri())
            load_s = time.perf_counter() - t0
            timings = driver.execute_script(_PAGE_TIMINGS)
            version = driver.capabilities.get("browserVersion")
        finally:
            driver.quit()
        size = page.stat().st_size
    return {"case": "map-page", "n": n, "page_mb": round(size / 1e6, 2),
            "browser": f"headless Chromium {version} (software rendering, --disable-gpu)",
            "selenium_get_s": round(load_s, 2), **{k: (round(v, 4) if isinstance(v, float) else v)
                                                    for k, v in timings.items()},
            "loadavg_1_5_15": [round(v, 2) for v in os.getloadavg()]}


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


def _dedup_disk(a: argparse.Namespace, extra: list[str]) -> None:
    """``phiclip dedup`` of a Parquet file with ``--memmap-dir`` (and, with ``--compare``, in memory too:
    the two outputs must be equal), each in a fresh process."""
    import pyarrow.parquet as pq

    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="phiclip-bench-disk-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        parquet = str(work / "vectors.parquet")
        _run_child(["make-parquet", "--n", str(a.n), "--dim", str(a.dim), "--file", parquet], a.json_out)
        _run_child(["dedup-file", "--file", parquet, "--out", str(work / "mapped"), "--memmap-dir", str(work),
                    *extra], a.json_out)
        if a.compare:
            _run_child(["dedup-file", "--file", parquet, "--out", str(work / "in-memory"), *extra], a.json_out)
            same = {name: pq.read_table(work / "mapped" / name).equals(pq.read_table(work / "in-memory" / name))
                    for name in ("duplicates.parquet", "keep.parquet")}
            line = json.dumps({"case": "dedup-disk-compare", "n": a.n, "dim": a.dim, "identical_outputs": same})
            print(line, flush=True)
            if a.json_out:
                with open(a.json_out, "a", encoding="utf-8") as f:
                    f.write(line + "\n")
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("case", choices=("dedup", "dedup-disk", "make-parquet", "dedup-file", "planted", "map", "map-page",
                                     "smoke"))
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--model", default=None, help="planted: an encoder spec instead of the --features")
    ap.add_argument("--features", default="tiny-clip,vit-b32-random,thumb-hist",
                    help=f"planted: comma-separated, of {', '.join(PLANTED_FEATURES)}")
    ap.add_argument("--thresholds", default="0.8,0.9,0.95,0.98", help="planted: comma-separated cosines")
    ap.add_argument("--threshold", type=float, default=0.95)
    ap.add_argument("--exact-limit", type=int, default=None,
                    help="dedup: items searched exactly (else inverted lists)")
    ap.add_argument("--nprobe", type=int, default=None, help="dedup: lists each item is compared with")
    ap.add_argument("--file", default=None, help="make-parquet / dedup-file: the Parquet file of vectors")
    ap.add_argument("--out", default=None, help="dedup-file: the output folder")
    ap.add_argument("--memmap-dir", default=None, help="dedup-file: memory-map the vectors in this folder")
    ap.add_argument("--work", default=None, help="dedup-disk: folder for the Parquet file and outputs (kept)")
    ap.add_argument("--compare", action="store_true",
                    help="dedup-disk: also run with the vectors in memory and compare the two outputs")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        if a.case == "dedup":
            result = case_dedup(a.n, a.dim, threshold=a.threshold, exact_limit=a.exact_limit, nprobe=a.nprobe)
        elif a.case == "planted":
            result = case_planted(a.images, a.features.split(","), [float(t) for t in a.thresholds.split(",")],
                                  a.model)
        elif a.case == "make-parquet":
            result = case_make_parquet(a.n, a.dim, a.file)
        elif a.case == "dedup-file":
            result = case_dedup_file(a.file, a.out, a.memmap_dir, a.threshold)
        elif a.case == "map-page":
            result = case_map_page(a.n, a.dim)
        else:
            result = case_map(a.n, a.dim)
        print(json.dumps(result), flush=True)
        return
    if a.case == "smoke":
        _run_child(["dedup", "--n", "20000", "--dim", "64"], a.json_out)
        _run_child(["dedup", "--n", "30000", "--dim", "64", "--exact-limit", "10000"], a.json_out)  # inverted lists
        _run_child(["planted", "--images", "20", "--features", "tiny-clip,thumb-hist"], a.json_out)
        _run_child(["map", "--n", "5000", "--dim", "64"], a.json_out)
        return
    extra = ["--threshold", str(a.threshold)]
    if a.case == "dedup-disk":
        _dedup_disk(a, extra)
        return
    if a.case == "dedup":
        limit = ["--exact-limit", str(a.exact_limit)] if a.exact_limit is not None else []
        limit += ["--nprobe", str(a.nprobe)] if a.nprobe is not None else []
        _run_child(["dedup", "--n", str(a.n), "--dim", str(a.dim), *extra, *limit], a.json_out)
    elif a.case == "planted":
        _run_child(["planted", "--images", str(a.images), "--features", a.features, "--thresholds", a.thresholds]
                   + (["--model", a.model] if a.model else []), a.json_out)
    else:
        _run_child([a.case, "--n", str(a.n), "--dim", str(a.dim)], a.json_out)


if __name__ == "__main__":
    main()
