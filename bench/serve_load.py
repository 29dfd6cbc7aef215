"""A bounded load run of ``phiclip serve`` on loopback (a benchmark, not a test).

Builds a tiny random-weight CLIP (hidden 32, 2 layers) and a collection of generated images
(``phiclip embed``), starts ``phiclip serve`` on a free loopback port in its own process, warms it up,
then runs N concurrent clients (asyncio + httpx, one connection each) for a fixed time, each sending
a mix of requests in a loop: text search, image upload search, "more like this" (stored vector, no
model call) and ``/v1/embeddings`` (4 texts + 1 image). Prints requests/s, p50/p99 latency overall and
per kind, errors by status (must be 0 below the queue limit), the server's RSS before and after, and
the batcher's counters (mean batch size, rejected requests).

    python bench/serve_load.py --clients 16 --seconds 20
    python bench/serve_load.py --clients 64 --seconds 20 --max-queue 8   # past the queue limit: 503s
    # the issue-26 target: 64 clients sending one image each, against offline `phiclip embed` (same model,
    # precision, machine, run): prints served images/s / offline images/s
    python bench/serve_load.py --mix one-image --clients 64 --seconds 30 --offline --model clip:openai/clip-vit-base-patch32
    python bench/serve_load.py --replicas 2 --clients 32 --seconds 20   # --engine ray, 2 Ray Serve replicas

Every run also checks ``/metrics``: the requests counted there during the timed run must equal the
requests this generator sent (``metrics_match``).

The load generator shares the machine with the server: on a small machine its CPU use lowers the
server's figures (the run prints the CPU model and count).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

#: The request mixes: kind -> share of requests. ``one-image``: /v1/embeddings with one image per request.
MIXES = {
    "mixed": (("text_search", 4), ("image_search", 2), ("more_like_this", 2), ("embeddings", 2)),
    "one-image": (("one_image", 1),),
}
#: Routes whose requests the timed run sends (for the /metrics check).
ROUTES = ("/api/search", "/v1/embeddings")


def cpu_name() -> str:
    """The CPU model as ``lscpu`` names it (else /proc/cpuinfo, else platform)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or platform.machine()


def rss_mib(pid: int) -> float:
    """Resident memory of a process (Linux /proc), MiB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def build_collection(root: Path, per_class: int, model: str | None, precision: str) -> tuple[Path, list[Path]]:
    """``per_class`` x 12 generated images embedded with ``model`` (default: a tiny random-weight CLIP)."""
    import phiclip
    from phiclip.testing import build_tiny_clip, make_sample_images

    if model is None:
        model = "clip:" + str(build_tiny_clip(root / "tiny-clip", hidden_size=32, num_layers=2, num_heads=2,
                                               projection_dim=16))
    records = make_sample_images(root / "images", per_class=per_class)
    out = root / "collection"
    phiclip.embed(model, root / "images", out, progress=False, precision=precision)
    return out, [Path(r["path"]) for r in records]


def offline_images_per_s(collection: Path, folder: Path, images: list[Path], precision: str,
                         batch_size: int) -> dict[str, Any]:
    """``phiclip embed``'s images/s for the collection's own model and precision, over the same images
    (a second run: the first pays the model's load and warm-up, as the server's warm-up does)."""
    import phiclip
    from phiclip.store import read_manifest

    spec = read_manifest(collection)["encoder"]["spec"]
    runs = []
    for i in range(2):
        out = collection.parent / f"offline-{i}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        phiclip.embed(spec, folder, out, progress=False, precision=precision, batch_size=batch_size)
        runs.append(time.perf_counter() - t0)
    return {"images": len(images), "seconds": round(runs[-1], 3), "images_per_s": round(len(images) / runs[-1], 1)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(collection: Path, port: int, args: argparse.Namespace, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "phiclip.cli", "serve", str(collection), "--port", str(port),
           "--max-queue", str(args.max_queue), "--max-batch", str(args.max_batch), "--precision", args.precision,
           "--batch-wait-ms", str(args.batch_wait_ms), "--timeout", str(args.timeout)]
    if args.replicas:
        cmd += ["--engine", "ray", "--replicas", str(args.replicas)]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    import httpx

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}); see {log}")
        try:  # ready: loaded and warmed up (Ray replicas started)
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the server was not ready within 300 s; see {log}")


def counted_requests(base: str) -> float:
    """Requests to :data:`ROUTES` counted in the server's ``/metrics``."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(base + "/metrics", timeout=30).text
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == "phiclip_requests_total" and s.labels.get("route") in ROUTES)


def make_requests(images: list[Path], ids: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Request variants per kind (the clients cycle through them)."""
    from PIL import Image

    words = ["red", "green", "blue", "yellow", "circle", "square", "triangle", "a photo of", "something", "shape"]
    pngs = []
    for p in images[:8]:
        buf = io.BytesIO()
        Image.open(p).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    uri = "data:image/png;base64," + base64.b64encode(pngs[0]).decode()
    uris = ["data:image/png;base64," + base64.b64encode(d).decode() for d in pngs]
    return {
        "one_image": [{"method": "POST", "url": "/v1/embeddings", "json": {"input": [u]}} for u in uris],
        "text_search": [{"method": "GET", "url": "/api/search", "params": {"text": f"{a} {b}", "k": 10}}
                        for a in words for b in words[4:]],
        "image_search": [{"method": "POST", "url": "/api/search", "files": {"image": ("q.png", d, "image/png")},
                          "data": {"k": "10"}} for d in pngs],
        "more_like_this": [{"method": "POST", "url": "/api/search", "json": {"id": i, "k": 10}} for i in ids[:16]],
        "embeddings": [{"method": "POST", "url": "/v1/embeddings",
                        "json": {"input": [f"{w} one", f"{w} two", f"{w} three", f"{w} four", uri]}} for w in words],
    }


async def run_clients(base: str, clients: int, seconds: float, requests: dict[str, list[dict[str, Any]]],
                      mix: str = "mixed") -> list[tuple[str, int, float]]:
    """``clients`` concurrent loops for ``seconds``; returns (kind, status, latency s) per request."""
    import httpx

    order = [k for k, share in MIXES[mix] for _ in range(share)]
    results: list[tuple[str, int, float]] = []
    stop = time.monotonic() + seconds

    async def client(n: int) -> None:
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as c:
            i = n
            while time.monotonic() < stop:
                kind = order[i % len(order)]
                variants = requests[kind]
                req = dict(variants[(i // len(order)) % len(variants)])
                t0 = time.perf_counter()
                try:
                    r = await c.request(req.pop("method"), req.pop("url"), **req)
                    status = r.status_code
                except httpx.HTTPError:
                    status = -1
                results.append((kind, status, time.perf_counter() - t0))
                i += 1

    await asyncio.gather(*(client(n) for n in range(clients)))
    return results


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def summarize(results: list[tuple[str, int, float]], seconds: float) -> dict[str, Any]:
    ok = [lat for _, s, lat in results if s == 200]
    by_kind: dict[str, list[float]] = defaultdict(list)
    for kind, s, lat in results:
        if s == 200:
            by_kind[kind].append(lat)
    return {
        "requests": len(results),
        "requests_per_s": round(len(results) / seconds, 1),
        "ok": len(ok),
        "errors": dict(Counter(s for _, s, _ in results if s != 200)),
        "p50_ms": round(percentile(ok, 50) * 1000, 1),
        "p99_ms": round(percentile(ok, 99) * 1000, 1),
        "per_kind": {k: {"n": len(v), "p50_ms": round(percentile(v, 50) * 1000, 1),
                         "p99_ms": round(percentile(v, 99) * 1000, 1)} for k, v in sorted(by_kind.items())},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients")
    ap.add_argument("--seconds", type=float, default=20.0, help="length of the timed run")
    ap.add_argument("--per-class", type=int, default=8, help="images per colour x shape class (12 classes)")
    ap.add_argument("--max-queue", type=int, default=256)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--batch-wait-ms", type=float, default=5.0)
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--workdir", type=Path, default=None, help="where the model and collection go (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    ap.add_argument("--mix", choices=sorted(MIXES), default="mixed", help="the request mix of the timed run")
    ap.add_argument("--model", default=None, help="encoder spec of the collection (default: a tiny random CLIP)")
    ap.add_argument("--precision", default="auto", help="the server's and the offline run's precision")
    ap.add_argument("--offline", action="store_true", help=(
        "also time offline `phiclip embed` on the same images, model and precision; print the served/offline ratio"))
    ap.add_argument("--replicas", type=int, default=0, help="serve with --engine ray --replicas N (0: local engine)")
    args = ap.parse_args()

    import httpx

    work = args.workdir or Path(tempfile.mkdtemp(prefix="phiclip-serve-load-"))
    work.mkdir(parents=True, exist_ok=True)
    collection = work / "collection"
    if (collection / "manifest.json").is_file():
        images = sorted((work / "images").rglob("*.png"))
    else:
        collection, images = build_collection(work, args.per_class, args.model, args.precision)
    offline = offline_images_per_s(collection, work / "images", images, args.precision, args.max_batch) if args.offline else None
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start_server(collection, port, args, work / "server.log")
    try:
        ids = [h["id"] for h in httpx.get(base + "/api/search", params={"text": "x", "k": 64}, timeout=60).json()["results"]]
        requests = make_requests(images, ids)
        warm = asyncio.run(run_clients(base, 2, 2.0, requests, args.mix))  # every route, first-call costs paid
        assert all(s == 200 for _, s, _ in warm), Counter(s for _, s, _ in warm)
        rss_before = rss_mib(server.pid)
        counted_before = counted_requests(base)
        t0 = time.monotonic()
        results = asyncio.run(run_clients(base, args.clients, args.seconds, requests, args.mix))
        elapsed = time.monotonic() - t0
        counted = counted_requests(base) - counted_before
        rss_after = rss_mib(server.pid)
        stats = httpx.get(base + "/api/stats", timeout=30).json()
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
    batcher = next(iter(stats["batchers"].values()))
    batcher.setdefault("batches", None)
    batcher.setdefault("mean_batch", None)
    images_ok = sum(1 for k, st, _ in results if st == 200 and k == "one_image")
    summary = {
        "cpu": cpu_name(), "cpus": os.cpu_count(), "python": platform.python_version(),
        "clients": args.clients, "seconds": round(elapsed, 2), "collection_size": len(images),
        "max_queue": args.max_queue, "max_batch": args.max_batch, "batch_wait_ms": args.batch_wait_ms,
        "mix": args.mix, "replicas": args.replicas or None, "precision": args.precision,
        **summarize(results, elapsed),
        "metrics_counted": counted, "metrics_match": counted == len(results),
        "server_rss_mib": {"before": round(rss_before, 1), "after": round(rss_after, 1)},
        "batcher": {k: batcher.get(k) for k in ("batches", "items", "mean_batch", "max_batch", "rejected", "cancelled",
                                                 "max_queue_depth", "replicas", "replica_failures")},
    }
    if args.mix == "one-image":
        summary["served_images_per_s"] = round(images_ok / elapsed, 1)
    if offline is not None:
        summary["offline"] = offline
        if args.mix == "one-image":
            summary["served_over_offline"] = round(summary["served_images_per_s"] / offline["images_per_s"], 3)
    print(json.dumps(summary, indent=2))
    print(f"\n{summary['clients']} clients for {summary['seconds']} s on {summary['cpu']} ({summary['cpus']} CPUs): "
          f"{summary['requests_per_s']} requests/s, p50 {summary['p50_ms']} ms, p99 {summary['p99_ms']} ms, "
          f"errors {summary['errors'] or 0}, server RSS {rss_before:.0f} -> {rss_after:.0f} MiB, "
          f"mean batch {batcher['mean_batch']}, /metrics counted {counted:.0f} of {len(results)} requests")
    if "served_over_offline" in summary:
        print(f"served {summary['served_images_per_s']} images/s vs offline `phiclip embed` "
              f"{offline['images_per_s']} images/s: {summary['served_over_offline']}x")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
