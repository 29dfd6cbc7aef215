"""Work lost by ``kill -9`` of ``phiclip embed`` with its default settings (``--flush-seconds 30``,
``--shard-size 4096``): what the run had embedded (its progress bar) minus what the output holds after
the kill (committed shards and flushed fragments).

    python bench/kill_loss.py                          # a tiny Phi-3-vision (num_crops=4), 1500 images
    python bench/kill_loss.py --kills 20 45 70 --flush-seconds 0   # the same without partial flushes

Each kill starts a new output; ``--kills`` are seconds after the run's first progress update.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def _rows(out: Path) -> int:
    import pyarrow.parquet as pq

    files = list((out / "embeddings").glob("part-*.parquet")) + list((out / "errors").glob("part-*.parquet"))
    files += list((out / ".partial").rglob("*.embeddings.parquet")) + list((out / ".partial").rglob("*.errors.parquet"))
    return sum(pq.read_metadata(f).num_rows for f in files)


def _kill_after(cmd: list[str], seconds: float) -> tuple[int, float]:
    """Run ``cmd``, kill its process group ``seconds`` after its first progress update; returns (records
    the progress bar had counted, records per second over the run)."""
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    state = {"count": 0, "first": None}

    def read() -> None:
        buf = b""
        assert proc.stderr is not None
        while chunk := proc.stderr.read1(4096):
            buf = (buf + chunk)[-4096:]
            found = re.findall(rb"(\d+)/(\d+) \[", buf)
            if found:
                state["count"] = int(found[-1][0])
                if state["first"] is None:
                    state["first"] = (time.monotonic(), state["count"])

    threading.Thread(target=read, daemon=True).start()
    while state["first"] is None:
        if proc.poll() is not None:
            raise SystemExit(f"the run ended before it could be killed: {cmd}")
        time.sleep(0.05)
    t_first, c_first = state["first"]
    time.sleep(max(0.0, seconds - (time.monotonic() - t_first)))
    count = state["count"]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return count, (count - c_first) / max(1e-9, time.monotonic() - t_first)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="encoder spec (default: a tiny random Phi-3-vision, num_crops=4)")
    ap.add_argument("--images", type=int, default=1500)
    ap.add_argument("--kills", type=float, nargs="+", default=[20.0, 33.0, 41.0])
    ap.add_argument("--flush-seconds", default=None, help="passed to phiclip embed (default: its default)")
    ap.add_argument("--work", default=None)
    args = ap.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from ray_engine import _folder

    work = Path(args.work or tempfile.mkdtemp(prefix="phiclip-kill-loss-"))
    images = work / "images"
    if not images.is_dir():
        _folder(images, args.images)
    model = args.model
    if model is None:
        from phiclip.testing import build_tiny_phi3v

        model = f"phi3v:{build_tiny_phi3v(work / 'phi3v')}?num_crops=4"
    for k, seconds in enumerate(args.kills):
        out = work / f"out-{k}"
        cmd = [sys.executable, "-m", "phiclip.cli", "embed", "-m", model, "-i", str(images), "-o", str(out),
               "--device", "cpu"]
        if args.flush_seconds is not None:
            cmd += ["--flush-seconds", str(args.flush_seconds)]
        count, rate = _kill_after(cmd, seconds)
        kept = _rows(out)
        lost = count - kept
        print(f"kill at {seconds:5.1f} s: embedded {count}, kept {kept}, lost {lost} "
              f"(= {lost / rate if rate else 0:.1f} s of work at {rate:.1f} inputs/s)", flush=True)


if __name__ == "__main__":
    main()
