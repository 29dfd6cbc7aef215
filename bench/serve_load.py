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
    # ... and SIGKILL one replica's process 5 s into the run: every request must still get 200 or 503
    python bench/serve_load.py --replicas 2 --clients 32 --seconds 20 --kill-replica-at 5
    # 4x overload for 10 minutes: after the closed-loop run, requests arrive at 4x the rate it achieved
    # (open loop); every answer must be 200 or 503 with Retry-After, none slower than --timeout + 1 s, and
    # the server's RSS (sampled every --rss-every s) flat after the first --warmup-share of the run.
    # (The open loop writes pre-built requests on raw keep-alive connections: on a small machine shared
    # with the server, httpx's own CPU per request made the generator, not the server, the queue.)
    python bench/serve_load.py --mix one-image --clients 64 --seconds 30 --overload 4 --overload-seconds 600

``--model b32-random`` builds a real-size CLIP ViT-B/32 (224 px, patch 32, width 768, 12 layers,
projection 512) with random weights for the collection instead of the tiny one.

Every run also checks ``/metrics``: the requests counted there during each phase must equal the
requests this generator sent in it (``metrics_match``). ``checks`` in the output lists each target
of issue 26 that the run measured, with ``ok`` true or false.

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
    elif model == "b32-random":
        model = "clip:" + str(build_tiny_clip(root / "clip-b32", image_size=224, patch_size=32, hidden_size=768,
                                               num_layers=12, num_heads=12, projection_dim=512))
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


#: One answer: (kind, HTTP status or -1 when none came, latency in s, whether it had ``Retry-After``).
Result = tuple[str, int, float, bool]


def _request_of(requests: dict[str, list[dict[str, Any]]], order: list[str], i: int) -> tuple[str, dict[str, Any]]:
    kind = order[i % len(order)]
    variants = requests[kind]
    return kind, dict(variants[(i // len(order)) % len(variants)])


async def _send(c: Any, kind: str, req: dict[str, Any], results: list[Result]) -> None:
    import httpx

    t0 = time.perf_counter()
    try:
        r = await c.request(req.pop("method"), req.pop("url"), **req)
        status, retry_after = r.status_code, bool(r.headers.get("retry-after"))
    except httpx.HTTPError:
        status, retry_after = -1, False
    results.append((kind, status, time.perf_counter() - t0, retry_after))


async def run_clients(base: str, clients: int, seconds: float, requests: dict[str, list[dict[str, Any]]],
                      mix: str = "mixed", during: Any = None) -> list[Result]:
    """``clients`` concurrent loops (closed loop: each sends its next request when answered) for
    ``seconds``; ``during``: a coroutine run beside them (e.g. killing a replica)."""
    import httpx

    order = [k for k, share in MIXES[mix] for _ in range(share)]
    results: list[Result] = []
    stop = time.monotonic() + seconds

    async def client(n: int) -> None:
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as c:
            i = n
            while time.monotonic() < stop:
                await _send(c, *_request_of(requests, order, i), results)
                i += 1

    await asyncio.gather(*(client(n) for n in range(clients)), *([during] if during is not None else []))
    return results


def raw_request(req: dict[str, Any], port: int) -> bytes:
    """The bytes of one HTTP/1.1 request (keep-alive) for a GET with ``params`` or a POST with ``json``."""
    from urllib.parse import urlencode

    head = f"Host: 127.0.0.1:{port}\r\nUser-Agent: serve_load\r\n"
    if "json" in req:
        body = json.dumps(req["json"]).encode()
        return (f"{req['method']} {req['url']} HTTP/1.1\r\n{head}Content-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    if set(req) <= {"method", "url", "params"}:
        query = ("?" + urlencode(req["params"])) if req.get("params") else ""
        return f"{req['method']} {req['url']}{query} HTTP/1.1\r\n{head}\r\n".encode()
    raise ValueError("the open-loop phase sends GET ?params and JSON requests only (use --mix one-image)")


async def run_open_loop(port: int, rate: float, seconds: float, requests: dict[str, list[dict[str, Any]]],
                        mix: str) -> tuple[list[Result], dict[str, Any]]:
    """Requests sent at ``rate`` per second for ``seconds`` whatever the answers (open loop: what an
    overload is), over raw keep-alive connections (a new one whenever none is idle: no client-side
    queue) with pre-built request bytes, so that this process spends little CPU per request on a
    machine it shares with the server. Latency counts from the request's write; ``lag`` says how late
    the writes were against the schedule (this process starved of CPU)."""
    order = [k for k, share in MIXES[mix] for _ in range(share)]
    payloads = {k: [raw_request(r, port) for r in requests[k]] for k in dict(MIXES[mix])}
    results: list[Result] = []
    failures: Counter[str] = Counter()
    lags: list[float] = []
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def send(kind: str, payload: bytes, due: float) -> None:
        conn = None
        status, retry_after, t0 = -1, False, time.perf_counter()
        try:
            reused = bool(idle)
            conn = idle.pop() if idle else await asyncio.open_connection("127.0.0.1", port)
            reader, writer = conn
            t0 = time.perf_counter()
            lags.append(time.monotonic() - due)
            writer.write(payload)
            await writer.drain()
            try:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
            except (asyncio.IncompleteReadError, ConnectionResetError) as e:
                if not reused or (isinstance(e, asyncio.IncompleteReadError) and e.partial):
                    raise
                # a kept-alive connection the server had closed as idle: the request never reached it;
                # sent again on a new connection, as HTTP clients do
                writer.close()
                failures["stale keep-alive connection (sent again)"] += 1
                conn = reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(payload)
                await writer.drain()
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
            status = int(head.split(" ", 2)[1])
            fields = dict(line.split(":", 1) for line in head.split("\r\n")[1:] if ":" in line)
            await reader.readexactly(int(fields.get("content-length", "0").strip()))
            retry_after = "retry-after" in fields
            if fields.get("connection", "").strip() == "close":
                writer.close()
            else:
                idle.append(conn)
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as e:
            failures[type(e).__name__] += 1
            status = -1
            if conn is not None:
                conn[1].close()
        results.append((kind, status, time.perf_counter() - t0, retry_after))

    tasks = []
    t_start = time.monotonic()
    n = int(rate * seconds)
    for i in range(n):
        due = t_start + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        kind = order[i % len(order)]
        variants = payloads[kind]
        tasks.append(asyncio.create_task(send(kind, variants[(i // len(order)) % len(variants)], due)))
    offered = n / max(1e-9, time.monotonic() - t_start)
    await asyncio.gather(*tasks)
    for _, writer in idle:
        writer.close()
    return results, {"rate_offered": round(offered, 1), "client_failures": dict(failures),
                     "write_lag_p50_ms": round(percentile(lags, 50) * 1000, 1),
                     "write_lag_max_ms": round(max(lags, default=0.0) * 1000, 1)}


class RssSampler:
    """The server's RSS (MiB) every ``every`` seconds on a thread: ``samples`` of (seconds, MiB)."""

    def __init__(self, pid: int, every: float) -> None:
        import threading

        self.pid, self.every = pid, every
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()
        self.t0 = time.monotonic()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            self.samples.append((round(time.monotonic() - self.t0, 1), round(rss_mib(self.pid), 1)))
            self.stop.wait(self.every)

    def finish(self) -> list[tuple[float, float]]:
        self.stop.set()
        self.thread.join()
        self.samples.append((round(time.monotonic() - self.t0, 1), round(rss_mib(self.pid), 1)))
        return self.samples


def rss_trend(samples: list[tuple[float, float]], warmup_share: float) -> dict[str, Any]:
    """RSS after the first ``warmup_share`` of the run: first, last, lowest, highest and the least-squares
    slope (MiB per minute)."""
    start = samples[-1][0] * warmup_share
    after = [(t, m) for t, m in samples if t >= start] or samples[-1:]
    ts, ms = [t for t, _ in after], [m for _, m in after]
    slope = 0.0
    if len(after) > 1 and max(ts) > min(ts):
        mt, mm = statistics.fmean(ts), statistics.fmean(ms)
        slope = sum((t - mt) * (m - mm) for t, m in after) / sum((t - mt) ** 2 for t in ts) * 60
    return {"warmup_s": round(start, 1), "first": ms[0], "last": ms[-1], "min": min(ms), "max": max(ms),
            "slope_mib_per_min": round(slope, 2), "samples": len(after)}


async def kill_a_replica(base: str, at: float, note: dict[str, Any]) -> None:
    """SIGKILL one Ray Serve replica's process ``at`` seconds from now (its pid from ``/api/stats``)."""
    import signal

    import httpx

    await asyncio.sleep(at)
    async with httpx.AsyncClient(base_url=base, timeout=30) as c:
        stats = next(iter((await c.get("/api/stats")).json()["batchers"].values()))
        pids = stats.get("replica_pids") or []
        if not pids:
            note["killed"] = None
            return
        os.kill(pids[0], signal.SIGKILL)
        note.update(killed=pids[0], replicas_before=stats.get("replicas"), in_flight=stats.get("queue_depth"),
                    at_s=at)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def summarize(results: list[Result], seconds: float) -> dict[str, Any]:
    ok = [lat for _, s, lat, _ in results if s == 200]
    by_kind: dict[str, list[float]] = defaultdict(list)
    for kind, s, lat, _ in results:
        if s == 200:
            by_kind[kind].append(lat)
    return {
        "requests": len(results),
        "requests_per_s": round(len(results) / seconds, 1),
        "ok": len(ok),
        "ok_per_s": round(len(ok) / seconds, 1),
        "errors": dict(Counter(s for _, s, _, _ in results if s != 200)),
        # not a 200, and not a 503 with Retry-After: an answer lost or not the contract
        "unexpected": sum(1 for _, s, _, ra in results if s != 200 and not (s == 503 and ra)),
        "max_ms": round(max((lat for _, _, lat, _ in results), default=float("nan")) * 1000, 1),
        "p50_ms": round(percentile(ok, 50) * 1000, 1),
        "p99_ms": round(percentile(ok, 99) * 1000, 1),
        "per_kind": {k: {"n": len(v), "p50_ms": round(percentile(v, 50) * 1000, 1),
                         "p99_ms": round(percentile(v, 99) * 1000, 1)} for k, v in sorted(by_kind.items())},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients")
    ap.add_argument("--seconds", type=float, default=20.0, help="length of the timed (closed-loop) run")
    ap.add_argument("--per-class", type=int, default=8, help="images per colour x shape class (12 classes)")
    ap.add_argument("--max-queue", type=int, default=256)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--batch-wait-ms", type=float, default=5.0)
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--workdir", type=Path, default=None, help="where the model and collection go (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    ap.add_argument("--mix", choices=sorted(MIXES), default="mixed", help="the request mix of the timed run")
    ap.add_argument("--model", default=None, help=(
        "encoder spec of the collection (default: a tiny random CLIP; b32-random: a real-size ViT-B/32, random weights)"))
    ap.add_argument("--precision", default="auto", help="the server's and the offline run's precision")
    ap.add_argument("--offline", action="store_true", help=(
        "also time offline `phiclip embed` on the same images, model and precision; print the served/offline ratio"))
    ap.add_argument("--replicas", type=int, default=0, help="serve with --engine ray --replicas N (0: local engine)")
    ap.add_argument("--kill-replica-at", type=float, default=None, help=(
        "with --replicas: SIGKILL one replica's process this many seconds into the timed run"))
    ap.add_argument("--overload", type=float, default=0.0, help=(
        "after the timed run, send requests at this multiple of the rate it achieved (open loop; 0: no overload phase)"))
    ap.add_argument("--overload-seconds", type=float, default=60.0, help="length of the overload phase")
    ap.add_argument("--rss-every", type=float, default=5.0, help="seconds between samples of the server's RSS")
    ap.add_argument("--warmup-share", type=float, default=0.2, help=(
        "the share of the overload phase left out when judging whether RSS is flat"))
    args = ap.parse_args()
    if args.kill_replica_at is not None and not args.replicas:
        ap.error("--kill-replica-at needs --replicas N")
    if args.overload and args.mix != "one-image":
        ap.error("--overload sends /v1/embeddings requests: use it with --mix one-image")

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
    kill_note: dict[str, Any] = {}
    overload: dict[str, Any] | None = None
    try:
        ids = [h["id"] for h in httpx.get(base + "/api/search", params={"text": "x", "k": 64}, timeout=60).json()["results"]]
        requests = make_requests(images, ids)
        warm = asyncio.run(run_clients(base, 2, 2.0, requests, args.mix))  # every route, first-call costs paid
        assert all(r[1] == 200 for r in warm), Counter(r[1] for r in warm)
        rss_before = rss_mib(server.pid)
        counted_before = counted_requests(base)
        during = kill_a_replica(base, args.kill_replica_at, kill_note) if args.kill_replica_at is not None else None
        t0 = time.monotonic()
        results = asyncio.run(run_clients(base, args.clients, args.seconds, requests, args.mix, during))
        elapsed = time.monotonic() - t0
        counted = counted_requests(base) - counted_before
        rss_after = rss_mib(server.pid)
        stats = httpx.get(base + "/api/stats", timeout=30).json()
        if args.overload:
            rate = args.overload * len(results) / elapsed
            sampler = RssSampler(server.pid, args.rss_every)
            before = counted_requests(base)
            t1 = time.monotonic()
            answers, sending = asyncio.run(run_open_loop(port, rate, args.overload_seconds, requests, args.mix))
            took = time.monotonic() - t1
            samples = sampler.finish()
            overload = {"factor": args.overload, "rate_asked": round(rate, 1), **sending,
                        "seconds": round(took, 1), **summarize(answers, took),
                        "metrics_counted": counted_requests(base) - before,
                        "over_timeout_plus_1s": sum(1 for a in answers if a[2] > args.timeout + 1),
                        "rss_after_warmup": rss_trend(samples, args.warmup_share), "rss_samples": samples}
            overload["metrics_match"] = overload["metrics_counted"] == len(answers)
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
    images_ok = sum(1 for r in results if r[1] == 200 and r[0] == "one_image")
    summary = {
        "cpu": cpu_name(), "cpus": os.cpu_count(), "python": platform.python_version(),
        "model": args.model or "tiny random CLIP", "clients": args.clients, "seconds": round(elapsed, 2),
        "collection_size": len(images), "max_queue": args.max_queue, "max_batch": args.max_batch,
        "batch_wait_ms": args.batch_wait_ms, "timeout": args.timeout,
        "mix": args.mix, "replicas": args.replicas or None, "precision": args.precision,
        **summarize(results, elapsed),
        "metrics_counted": counted, "metrics_match": counted == len(results),
        "server_rss_mib": {"before": round(rss_before, 1), "after": round(rss_after, 1)},
        "batcher": {k: batcher.get(k) for k in ("batches", "items", "mean_batch", "max_batch", "rejected", "cancelled",
                                                 "max_queue_depth", "replicas", "replica_failures")},
    }
    checks: dict[str, bool] = {"metrics count every request sent": summary["metrics_match"]}
    if args.mix == "one-image":
        summary["served_images_per_s"] = round(images_ok / elapsed, 1)
    if offline is not None:
        summary["offline"] = offline
        if args.mix == "one-image":
            summary["served_over_offline"] = round(summary["served_images_per_s"] / offline["images_per_s"], 3)
            checks["served images/s >= 0.8 x offline"] = summary["served_over_offline"] >= 0.8
    if kill_note:
        summary["killed_replica"] = kill_note
        checks["killed replica: every request 200 or 503 + Retry-After"] = (
            kill_note.get("killed") is not None and summary["unexpected"] == 0)
    if overload is not None:
        summary["overload"] = overload
        checks["overload: every answer 200 or 503 + Retry-After"] = overload["unexpected"] == 0
        checks["overload: none slower than --timeout + 1 s"] = overload["over_timeout_plus_1s"] == 0
        checks["overload: metrics count every request sent"] = overload["metrics_match"]
    summary["checks"] = checks
    print(json.dumps({k: v for k, v in summary.items() if k != "overload"}
                     | ({"overload": {k: v for k, v in overload.items() if k != "rss_samples"}} if overload else {}),
                     indent=2))
    print(f"\n{summary['clients']} clients for {summary['seconds']} s on {summary['cpu']} ({summary['cpus']} CPUs): "
          f"{summary['requests_per_s']} requests/s, p50 {summary['p50_ms']} ms, p99 {summary['p99_ms']} ms, "
          f"errors {summary['errors'] or 0}, server RSS {rss_before:.0f} -> {rss_after:.0f} MiB, "
          f"mean batch {batcher['mean_batch']}, /metrics counted {counted:.0f} of {len(results)} requests")
    if "served_over_offline" in summary:
        print(f"served {summary['served_images_per_s']} images/s vs offline `phiclip embed` "
              f"{offline['images_per_s']} images/s: {summary['served_over_offline']}x")
    if overload is not None:
        trend = overload["rss_after_warmup"]
        print(f"overload x{args.overload}: {overload['rate_offered']} requests/s offered for {overload['seconds']} s, "
              f"answers {overload['ok']} x 200, errors {overload['errors'] or 0}, {overload['unexpected']} unexpected, "
              f"slowest {overload['max_ms']} ms (limit {(args.timeout + 1) * 1000:.0f}); RSS after warm-up "
              f"{trend['first']} -> {trend['last']} MiB (min {trend['min']}, max {trend['max']}, "
              f"{trend['slope_mib_per_min']} MiB/min)")
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
