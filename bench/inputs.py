"""Inputs benchmark (issue 22): URL input against local files, WebDataset shards against a folder, and the
memory of a long URL list, end to end through ``phiclip.pipeline.embed`` on the CPU.

- ``url``: N photo-like JPEGs served by a local HTTP server (127.0.0.1) that adds ``--latency`` seconds
  (default 0.1) to every response, against the same files read from disk; images/s of each and the ratio
  (target >= 0.8), with a real-size CLIP ViT-B/32 (random weights: ``phiclip.testing.build_tiny_clip`` with
  the ViT-B/32 sizes of transformers' ``CLIPConfig`` defaults, saved with ``save_pretrained``).
- ``wds``: the same images as ``--shards`` x ``--per-shard`` WebDataset shards against a folder (target >= 0.9).
- ``prep`` (not in the default ``--which``): the input side alone (list, read, decode, preprocess; no model),
  folder against shards: a gap there would be the input code's, not the machine's.
- ``overlap`` (not in the default ``--which``): whether fetching overlaps encoding, with a model that sleeps
  ``--sleep-per-batch`` s per batch (no CPU: the machine's load stays out of it); the time the URL run's
  model loop waited beyond the local run's is the fetching that did not overlap.
- ``fetch`` (not in the default ``--which``): ``fetch_many`` of ``--images`` images alone: wall time and
  the CPU this process spends per image (httpx, the event loop).
- ``rss``: a ``--rss-lines`` URL list (default 100,000) of small images through a tiny CLIP, one URL in 100
  answering 404 and one an HTML page: URLs/s, the failures by reason (checked: exactly those), and resident
  memory sampled during the run (flat after warm-up: bounded queues).

Each comparison runs in one process, the two contenders alternated ``--repeats`` times (the order rotated);
the ratio of the best rates and the ratio of each repeat are printed, with each run's details: the
pipeline's timings (``wait``: the model loop waiting for its input), the CPU seconds of the benchmark's
process and of the server. The HTTP server runs in a process of its own (spawned), with a listen backlog
large enough for every connection the fetcher opens at once. ``--smoke`` runs a small version of
everything (a shared machine: a sanity check, not a figure). Results are printed as JSON.

    python bench/inputs.py --smoke
    python bench/inputs.py --which url --images 2000 --repeats 2
    python bench/inputs.py --which wds --shards 100 --per-shard 100 --encoder tiny --repeats 3
    python bench/inputs.py --which rss --rss-lines 100000
    python bench/inputs.py --which overlap,fetch --images 640 --repeats 2
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import tarfile
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from common import environment, photo_like_image

#: The RSS run's faults: ``/tiny.jpg?N`` answers by ``N % FAULT_EVERY`` (else the tiny JPEG).
FAULT_EVERY = 100
FAULTS = {0: (404, "text/plain", b"not found"), 50: (200, "text/html", b"<html>not an image</html>")}


def _serve(root: str, latency: float, port: Any) -> None:
    """The server process: serves the files of ``root`` at ``/NAME`` (and ``/tiny.jpg?N`` for the RSS run:
    :data:`FAULTS`) after ``latency`` s; puts its port on ``port``."""
    buf = io.BytesIO()
    photo_like_image(64, 48, 0).save(buf, format="JPEG")
    tiny = buf.getvalue()
    folder = Path(root)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            if latency:
                time.sleep(latency)
            name, _, query = self.path.partition("?")
            name = name.lstrip("/")
            code, ctype = 200, "image/jpeg"
            if name == "tiny.jpg":
                body = tiny
                fault = FAULTS.get(int(query) % FAULT_EVERY) if query.isdigit() else None
                if fault is not None:
                    code, ctype, body = fault
            else:
                body = (folder / name).read_bytes()
            try:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

        def handle(self) -> None:
            try:
                super().handle()
            except (BrokenPipeError, ConnectionResetError):  # a client that went away (end of a run)
                pass

    class Server(ThreadingHTTPServer):
        # socketserver's default listen backlog is 5: 16+ connections opened at once overflow it, and the
        # kernel drops their handshakes ("possible SYN flooding"), which costs each one a 1 s retransmit.
        request_queue_size = 1024
        daemon_threads = True

    httpd = Server(("127.0.0.1", 0), Handler)
    port.put(httpd.server_address[1])
    httpd.serve_forever()


class LatencyServer:
    """:func:`_serve` in a process of its own (spawned), so that its threads take neither this process's
    GIL nor its time; ``cpu_seconds()`` is the CPU it used (user + system)."""

    def __init__(self, root: Path, latency: float) -> None:
        ctx = mp.get_context("spawn")
        port = ctx.Queue()
        self.proc = ctx.Process(target=_serve, args=(str(root), latency, port), daemon=True)
        self.proc.start()
        self.port = port.get(timeout=60)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.join(10)


def _images(root: Path, n: int, size: tuple[int, int]) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = root / f"{i:06d}.jpg"
        photo_like_image(size[0], size[1], i).save(p, format="JPEG", quality=90)
        out.append(p)
    return out


def _run(encoder: Any, src: Any, out: Path, server: LatencyServer | None = None, **kw: Any) -> dict[str, Any]:
    """One ``embed`` run: images/s, the pipeline's own timings (``wait``: the model loop waiting for input),
    the CPU seconds of this process (every thread) and of the server."""
    from phiclip.pipeline import embed

    cpu0, srv0 = time.process_time(), server.cpu_seconds() if server else 0.0
    res = embed(encoder, src, out, progress=False, **kw)
    assert res.failed == 0, res.failure_reasons
    got = {"images_per_s": round(res.processed / res.seconds, 2), "seconds": round(res.seconds, 1),
           "timings_s": {k: round(v, 2) for k, v in res.timings.items()}, "cpu_s": round(time.process_time() - cpu0, 1)}
    if server is not None:
        got["server_cpu_s"] = round(server.cpu_seconds() - srv0, 1)
    return got


def _encoder(work: Path, which: str) -> Any:
    """``b32``: a real-size CLIP ViT-B/32 (random weights); ``tiny``: the tests' tiny CLIP (hidden 32), with
    which the input side is nearly all the work (the strictest comparison of two inputs)."""
    from phiclip.encoders import load_encoder
    from phiclip.testing import build_tiny_clip

    if which == "tiny":
        return load_encoder(f"clip:{build_tiny_clip(work / 'tiny-cmp')}", device="cpu", dtype="float32")
    ckpt = build_tiny_clip(work / "vit-b-32", hidden_size=768, num_layers=12, num_heads=12, patch_size=32,
                           projection_dim=512)
    return load_encoder(f"clip:{ckpt}", device="cpu", dtype="float32")


def _compare(runs: dict[str, Any], repeats: int) -> tuple[dict[str, list[float]], dict[str, list[dict[str, Any]]]]:
    """Every images/s of each contender (``runs``: name -> a function of the repeat number giving one
    :func:`_run`), alternated and the order rotated each repeat (a slow spell of a shared machine hits both);
    and each run's details."""
    names = list(runs)
    rates: dict[str, list[float]] = {n: [] for n in names}
    details: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for rep in range(repeats):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            got = runs[name](rep)
            rates[name].append(got["images_per_s"])
            details[name].append(got)
    return rates, details


def _ratio(rates: dict[str, list[float]], over: str, under: str) -> dict[str, Any]:
    best = {k: max(v) for k, v in rates.items()}
    pairs = [a / b for a, b in zip(rates[over], rates[under])]
    return {"images_per_s": rates, "best": best, f"ratio_{over}_over_{under}": round(best[over] / best[under], 3),
            "ratio_per_repeat": [round(x, 3) for x in pairs]}


def _url_against_local(work: Path, name: str, n: int, latency: float, size: tuple[int, int], encoder: Any,
                       repeats: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """``n`` images embedded from local files and as URLs of a server adding ``latency`` s, alternating."""
    folder = work / f"{name}-imgs"
    files = _images(folder, n, size)
    server = LatencyServer(folder, latency)
    try:
        lst = work / f"{name}-urls.txt"
        lst.write_text("\n".join(server.url(p.name) for p in files) + "\n")
        return _compare({"local": lambda rep: _run(encoder, folder, work / f"{name}-o-local-{rep}"),
                         "url": lambda rep: _run(encoder, lst, work / f"{name}-o-url-{rep}", server)}, repeats)
    finally:
        server.close()


def bench_url(work: Path, n: int, latency: float, size: tuple[int, int], encoder: Any, repeats: int) -> dict[str, Any]:
    rates, details = _url_against_local(work, "url", n, latency, size, encoder, repeats)
    return {"images": n, "latency_s": latency, **_ratio(rates, "url", "local"), "runs": details}


def bench_overlap(work: Path, n: int, latency: float, size: tuple[int, int], nap: float,
                  repeats: int) -> dict[str, Any]:
    """Whether fetching overlaps encoding, without the machine's load in the way: the tiny CLIP made to take
    ``nap`` s per batch by sleeping (no CPU), URL against local files. ``fetch_stall_s``: the time the model
    loop waited beyond the local run's (the fetches that did not overlap a batch)."""
    from phiclip.encoders import load_encoder
    from phiclip.testing import build_tiny_clip

    encoder = load_encoder(f"clip:{build_tiny_clip(work / 'tiny-nap')}", device="cpu", dtype="float32")
    encode = encoder.encode_batch

    def slow(batch: Any, **kw: Any) -> Any:
        time.sleep(nap)
        return encode(batch, **kw)

    encoder.encode_batch = slow  # type: ignore[method-assign]
    rates, details = _url_against_local(work, "nap", n, latency, size, encoder, repeats)
    stall = [round(u["timings_s"]["wait"] - loc["timings_s"]["wait"], 2) for u, loc in zip(details["url"], details["local"])]
    return {"images": n, "latency_s": latency, "sleep_per_batch_s": nap, **_ratio(rates, "url", "local"),
            "fetch_stall_s": stall, "runs": details}


def bench_fetch(work: Path, n: int, latency: float, size: tuple[int, int], repeats: int) -> dict[str, Any]:
    """``fetch_many`` alone: ``n`` images in one call (the server in its own process), wall seconds and the CPU
    seconds of this process (httpx and the event loop: what fetching takes from the model's cores)."""
    from phiclip.fetch import FetchOptions, fetch_many

    files = _images(work / "fetch-imgs", n, size)
    server = LatencyServer(work / "fetch-imgs", latency)
    opts = FetchOptions(trust_env=False)
    runs = []
    try:
        fetch_many([server.url(files[0].name)], opts)  # the client and its event loop started
        for rep in range(repeats):
            cpu0, srv0, t0 = time.process_time(), server.cpu_seconds(), time.perf_counter()
            got = fetch_many([server.url(p.name) + f"?{rep}" for p in files], opts)
            assert all(isinstance(g, bytes) for g in got)
            runs.append({"seconds": round(time.perf_counter() - t0, 2), "cpu_s": round(time.process_time() - cpu0, 2),
                         "server_cpu_s": round(server.cpu_seconds() - srv0, 2)})
    finally:
        server.close()
    best = min(runs, key=lambda r: r["cpu_s"])
    return {"images": n, "latency_s": latency, "bytes_per_image": round(sum(p.stat().st_size for p in files) / n),
            "runs": runs, "client_cpu_ms_per_image": round(1000 * best["cpu_s"] / n, 2)}


def bench_wds(work: Path, shards: int, per_shard: int, size: tuple[int, int], encoder: Any,
              repeats: int) -> dict[str, Any]:
    files = _images(work / "wds-imgs", shards * per_shard, size)
    pattern = _shards_of(work, files, shards, per_shard)
    rates, details = _compare({"folder": lambda rep: _run(encoder, work / "wds-imgs", work / f"w-folder-{rep}"),
                               "webdataset": lambda rep: _run(encoder, pattern, work / f"w-wds-{rep}")}, repeats)
    return {"shards": shards, "per_shard": per_shard, **_ratio(rates, "webdataset", "folder"), "runs": details}


def _shards_of(work: Path, files: list[Path], shards: int, per_shard: int) -> str:
    """The files as ``shards`` tar shards of ``per_shard`` (jpg members only); returns the brace pattern."""
    (work / "shards").mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with tarfile.open(work / "shards" / f"{s:05d}.tar", "w") as tf:
            for p in files[s * per_shard : (s + 1) * per_shard]:
                tf.add(p, arcname=p.name)
    return str(work / "shards" / f"{{00000..{shards - 1:05d}}}.tar")


def _prepare_only(src: Any, encoder: Any, n: int) -> dict[str, float]:
    """List, read, decode and preprocess every image of ``src`` as ``embed`` does (no model): seconds."""
    from phiclip.inputs import list_inputs
    from phiclip.pipeline.step import Preparer

    t0 = time.perf_counter()
    listing = list_inputs(src)
    t1 = time.perf_counter()
    prep = Preparer(listing.records, listing.reader, encoder, max_pixels=None, budget=64)
    done = sum(len(p.positions) for p in prep.in_process(prep.chunks([(0, range(len(listing.records)))]), threads=2))
    assert done == n, done
    return {"list_s": round(t1 - t0, 3), "prepare_s": round(time.perf_counter() - t1, 3)}


def bench_prep(work: Path, shards: int, per_shard: int, size: tuple[int, int], encoder: Any,
               repeats: int) -> dict[str, Any]:
    """The input side alone (listing, reading, decoding, preprocessing), a folder against the same images
    as WebDataset shards: where a gap between the two would be ours."""
    n = shards * per_shard
    files = _images(work / "prep-imgs", n, size)
    pattern = _shards_of(work / "prep", files, shards, per_shard)
    runs: dict[str, list[dict[str, float]]] = {"folder": [], "webdataset": []}
    for rep in range(repeats):
        for name in (["folder", "webdataset"] if rep % 2 == 0 else ["webdataset", "folder"]):
            runs[name].append(_prepare_only(work / "prep-imgs" if name == "folder" else pattern, encoder, n))
    best = {k: min(r["list_s"] + r["prepare_s"] for r in v) for k, v in runs.items()}
    return {"shards": shards, "per_shard": per_shard, "runs": runs,
            "ratio_webdataset_over_folder": round(best["folder"] / best["webdataset"], 3)}


def bench_rss(work: Path, lines: int) -> dict[str, Any]:
    from phiclip.encoders import load_encoder
    from phiclip.pipeline import embed
    from phiclip.testing import build_tiny_clip

    server = LatencyServer(work, 0.0)
    samples: list[tuple[float, float]] = []
    stop = threading.Event()

    def sample() -> None:
        t0 = time.perf_counter()
        while not stop.wait(0.25):
            rss = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS"))
            samples.append((time.perf_counter() - t0, rss / 1024))

    try:
        lst = work / "many.txt"
        lst.write_text("".join(server.url(f"tiny.jpg?{i}") + "\n" for i in range(lines)))  # ?N: FAULTS
        enc = load_encoder(f"clip:{build_tiny_clip(work / 'tiny')}", device="cpu", dtype="float32")
        th = threading.Thread(target=sample, daemon=True)
        th.start()
        res = embed(enc, lst, work / "o-rss", progress=False, shard_size=4096)
        stop.set()
        th.join()
    finally:
        server.close()
    mib = [m for _, m in samples]
    k = max(1, len(mib) // 5)
    faults = sum(1 for i in range(lines) if i % FAULT_EVERY in FAULTS)
    assert res.failed == faults and res.embedded == lines - faults, (res.failed, res.failure_reasons)
    return {"lines": lines, "embedded": res.embedded, "failed": res.failed,
            "failure_reasons": [list(r) for r in res.failure_reasons], "seconds": round(res.seconds, 1),
            "urls_per_s": round(lines / res.seconds, 1),
            "rss_mib_after_warmup": round(mib[k] if len(mib) > k else mib[-1], 1), "rss_mib_max": round(max(mib), 1),
            "rss_mib_end": round(mib[-1], 1),
            "rss_mib_by_fifth": [round(mib[min(len(mib) - 1, j * len(mib) // 5)], 1) for j in range(1, 6)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--which", default="url,wds,rss")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--latency", type=float, default=0.1)
    ap.add_argument("--size", default="640x480", help="image size WxH")
    ap.add_argument("--shards", type=int, default=100)
    ap.add_argument("--per-shard", type=int, default=100)
    ap.add_argument("--rss-lines", type=int, default=100_000)
    ap.add_argument("--sleep-per-batch", type=float, default=2.0, help="overlap: seconds the model takes per batch")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each contender (alternated, order rotated)")
    ap.add_argument("--encoder", choices=("b32", "tiny"), default="b32", help="the model of the url and wds runs")
    ap.add_argument("--smoke", action="store_true", help="a small version of everything")
    args = ap.parse_args()
    if args.smoke:
        args.images, args.shards, args.per_shard, args.rss_lines = 64, 4, 16, 3000
    size = tuple(int(v) for v in args.size.split("x"))
    which = set(args.which.split(","))
    out: dict[str, Any] = {"environment": environment(), "smoke": args.smoke}
    with tempfile.TemporaryDirectory(prefix="phiclip-bench-inputs-") as tmp:
        work = Path(tmp)
        encoder = _encoder(work, args.encoder) if which & {"url", "wds", "prep"} else None
        out["encoder"] = args.encoder
        if "url" in which:
            out["url"] = bench_url(work, args.images, args.latency, size, encoder, args.repeats)
        if "wds" in which:
            out["wds"] = bench_wds(work, args.shards, args.per_shard, size, encoder, args.repeats)
        if "prep" in which:
            out["prep"] = bench_prep(work, args.shards, args.per_shard, size, encoder, args.repeats)
        if "overlap" in which:
            out["overlap"] = bench_overlap(work, args.images, args.latency, size, args.sleep_per_batch, args.repeats)
        if "fetch" in which:
            out["fetch"] = bench_fetch(work, args.images, args.latency, size, args.repeats)
        if "rss" in which:
            out["rss"] = bench_rss(work, args.rss_lines)
    print(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
