"""The Phi-3-vision tower benchmark with other processes competing for the cores.

    python bench/contention.py                          # every scenario, default variants
    python bench/contention.py --scenarios quiet busy1 --repeats 3 --log-dir bench-logs/contention

Reproduces "tower benchmark with one CPU-bound process beside it": the released-code way
(``bench/baselines.py``: HF CLIPVisionModel on all crops) against phiclip's CPU fast path on the
scaled-down tower of ``bench/cpu.py`` (256 wide x 6 layers, 4 mixed photos, 62 real crops), in a
fresh process per scenario, with competitors started beside it:

* ``quiet``: nothing added;
* ``busy1`` / ``busy2``: one / two single-threaded CPU-bound processes (a Python loop);
* ``torch2``: another torch process running matrix products on as many threads as torch uses.

Each timing process runs the variants in turn (rotating order, median): the baseline, phiclip as
shipped (thread count sized from the cores free), phiclip with the thread count fixed at torch's
default (the behaviour before), and phiclip on one thread. ``--wait-policy PASSIVE`` runs the
timing process with ``OMP_WAIT_POLICY=PASSIVE`` (threads sleep at once instead of spinning at
barriers). The CPU model, its flags and the machine's load average are printed with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

COMPETITORS = {
    "busy": "while True:\n    pass\n",
    "torch": ("import torch\na = torch.randn(1024, 1024)\nb = torch.randn(1024, 1024)\n"
              "while True:\n    a @ b\n"),
}
SCENARIOS = {"quiet": [], "busy1": ["busy"], "busy2": ["busy", "busy"], "torch2": ["torch"]}


def child(ckpt: Path, repeats: int, variants: list[str]) -> dict[str, float]:
    """Time the variants in this process; returns seconds per variant (median)."""
    import torch
    from baselines import ReleasedImageEmbedding
    from common import photo_like_images, time_interleaved
    from cpu import MIXED

    from phiclip.cpu.threads import adaptive_threads_disabled
    from phiclip.phi3v import Phi3VImageEmbedding, Phi3VImageProcessor

    images = photo_like_images(len(MIXED), sizes=MIXED)
    inputs = Phi3VImageProcessor(num_crops=16)(images)
    pv, sizes = inputs.pixel_values, inputs.image_sizes
    model = Phi3VImageEmbedding.from_pretrained(ckpt).eval()
    baseline = ReleasedImageEmbedding.from_phiclip(model).eval()
    default_threads = torch.get_num_threads()

    def fixed(n: int):
        def run() -> None:
            old = torch.get_num_threads()
            torch.set_num_threads(n)
            try:
                with adaptive_threads_disabled():
                    model.image_tokens(pv, sizes)
            finally:
                torch.set_num_threads(old)
        return run

    fns = {"baseline": lambda: baseline.image_tokens(pv, sizes), "phiclip": lambda: model.image_tokens(pv, sizes),
           "phiclip fixed threads": fixed(default_threads), "phiclip 1 thread": fixed(1)}
    with torch.inference_mode():
        ref = baseline.image_tokens(pv, sizes)
        ours = model.image_tokens(pv, sizes)
        err = max(float((a - b).abs().max()) for a, b in zip(ref, ours))
        assert err <= 1e-4, err
        return time_interleaved({k: fns[k] for k in variants}, repeats)


def run_scenario(name: str, ckpt: Path, repeats: int, variants: list[str], wait_policy: str | None) -> dict:
    procs = [subprocess.Popen([sys.executable, "-c", COMPETITORS[c]], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for c in SCENARIOS[name]]
    try:
        time.sleep(1.0 if procs else 0.0)  # let the competitors start (torch imports) before timing
        env = {**os.environ}
        if wait_policy:
            env["OMP_WAIT_POLICY"] = wait_policy
        cmd = [sys.executable, __file__, "--child", str(ckpt), "--repeats", str(repeats), "--variants", *variants]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
        if out.returncode != 0:
            raise RuntimeError(f"timing process failed in scenario {name}:\n{out.stderr[-3000:]}")
        times = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        for p in procs:  # only the competitors this script started
            p.kill()
            p.wait()
    return {"scenario": name, "competitors": SCENARIOS[name], "wait_policy": wait_policy or "default", "times": times,
            "loadavg": Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    ap.add_argument("--variants", nargs="+", default=["baseline", "phiclip", "phiclip fixed threads", "phiclip 1 thread"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--wait-policy", action="append", default=None, help="OMP_WAIT_POLICY values to run (default: unset)")
    ap.add_argument("--ckpt", type=Path, help="reuse this tower checkpoint (else a temporary one is built)")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--log-dir", default=None, help="write results.md/results.json here")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.repeats, args.variants)))
        return

    from common import cpu_description
    from cpu import BENCH_TOWER

    from phiclip.testing import build_tiny_phi3v

    with tempfile.TemporaryDirectory(prefix="phiclip-contention-") as t:
        ckpt = args.ckpt or build_tiny_phi3v(Path(t) / "tower", vision_config=BENCH_TOWER, hidden_size=768)
        results = []
        for policy in args.wait_policy or [None]:
            for name in args.scenarios:
                r = run_scenario(name, ckpt, args.repeats, args.variants, policy)
                print(json.dumps(r), flush=True)
                results.append(r)
    lines = [f"CPU: {cpu_description()}", "",
             "| scenario | OMP_WAIT_POLICY | " + " | ".join(f"{v} (s)" for v in args.variants) + " | "
             + " | ".join(f"baseline / {v}" for v in args.variants if v != "baseline") + " | load avg |",
             "|---|---|" + "---|" * (2 * len(args.variants)) + "---|"]
    for r in results:
        t = r["times"]
        ratios = [f"{t['baseline'] / t[v]:.2f}x" if "baseline" in t else "" for v in args.variants if v != "baseline"]
        lines.append(f"| {r['scenario']} | {r['wait_policy']} | " + " | ".join(f"{t[v]:.2f}" for v in args.variants)
                     + " | " + " | ".join(ratios) + f" | {' '.join(r['loadavg'])} |")
    table = "\n".join(lines)
    print(table)
    if args.log_dir:
        d = Path(args.log_dir)
        d.mkdir(parents=True, exist_ok=True)
        (d / "results.md").write_text(table + "\n")
        (d / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
