#!/usr/bin/env bash
# Run the GPU benchmark (bench/gpu.py) on a GPU machine, from a fresh copy of the repository.
#
#   bash bench/run_gpu.sh                        # logs in $OUT/gpu-bench (else bench-logs/gpu-bench)
#   bash bench/run_gpu.sh --only tower,hd        # extra arguments go to bench/gpu.py
#
# 1. Finds a Python that already imports torch (the machine's CUDA build: $PYTHON, python3, python,
#    /opt/torch/.venv/bin/python3); without one, a fresh venv gets `pip install torch` from PyPI.
# 2. Makes a fresh venv in $PHICLIP_BENCH_VENV (default /tmp/phiclip-bench-venv) that sees that
#    Python's packages through a .pth file (--system-site-packages would not, when that Python is
#    itself a venv, as on the GPU image).
# 3. Installs phiclip into it, editable: without dependencies when torch, transformers, pyarrow...
#    are importable (the GPU machine has them and no network); otherwise `pip install -e '.[dev]'`.
# 4. Runs `timeout 540 python bench/gpu.py --log-dir DIR` (DIR: $PHICLIP_BENCH_LOG_DIR, else
#    $OUT/gpu-bench, else bench-logs/gpu-bench). The setup's own log is DIR/setup.txt.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2

LOG_DIR="${PHICLIP_BENCH_LOG_DIR:-${OUT:-bench-logs}/gpu-bench}"
mkdir -p "$LOG_DIR"
SETUP_LOG="$LOG_DIR/setup.txt"
: >"$SETUP_LOG"
say() { echo "[run_gpu] $*" | tee -a "$SETUP_LOG"; }
VENV="${PHICLIP_BENCH_VENV:-/tmp/phiclip-bench-venv}"
t0=$(date +%s)

# --- 1. a Python with torch ---------------------------------------------------------------------
BASE=""
for cand in "${PYTHON:-}" python3 python /opt/torch/.venv/bin/python3; do
  [ -n "$cand" ] || continue
  if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch" >>"$SETUP_LOG" 2>&1; then
    BASE="$(command -v "$cand")"
    break
  fi
done

# --- 2. a fresh venv ----------------------------------------------------------------------------
rm -rf "$VENV"
if [ -n "$BASE" ]; then
  say "torch from $BASE: $("$BASE" -c 'import torch; print(torch.__version__, "| CUDA", torch.version.cuda, "| GPU available:", torch.cuda.is_available())' 2>&1)"
  # Without its own pip/setuptools: the base's (seen through the .pth below) install into this venv,
  # and an older bundled setuptools cannot shadow the base's.
  "$BASE" -m venv --without-pip "$VENV" >>"$SETUP_LOG" 2>&1 || { say "could not create a venv with $BASE"; exit 2; }
  SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  # addsitedir (not a plain path line) so that the base's own .pth files are processed too.
  "$BASE" -c '
import site
dirs = site.getsitepackages() + [site.getusersitepackages()]
print("\n".join(f"import site; site.addsitedir({d!r})" for d in dirs))' >"$SITE/_phiclip_base_site.pth"
else
  say "no Python here imports torch: a fresh venv with torch from PyPI"
  python3 -m venv "$VENV" >>"$SETUP_LOG" 2>&1 || { say "could not create a venv with python3"; exit 2; }
  "$VENV/bin/python" -m pip install torch >>"$SETUP_LOG" 2>&1 || say "pip install torch failed (see $SETUP_LOG)"
fi
PY="$VENV/bin/python"

# --- 3. phiclip, editable ------------------------------------------------------------------------
if "$PY" -c "import torch, transformers, safetensors, huggingface_hub, numpy, PIL, pyarrow, tqdm, typer, rich" >>"$SETUP_LOG" 2>&1; then
  say "dependencies importable: pip install --no-deps -e ."
  "$PY" -m pip install --no-deps --no-build-isolation -e . >>"$SETUP_LOG" 2>&1 || say "editable install failed"
else
  say "some dependencies missing: pip install -e '.[dev]'"
  "$PY" -m pip install -e '.[dev]' >>"$SETUP_LOG" 2>&1 || say "pip install -e '.[dev]' failed (see $SETUP_LOG)"
fi
if ! "$PY" -c "import phiclip" >/dev/null 2>&1; then
  say "phiclip not importable after the install: using PYTHONPATH=src"
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
say "$("$PY" -c 'import phiclip, torch, transformers; print("phiclip", phiclip.__version__, "from", phiclip.__file__, "| torch", torch.__version__, "| transformers", transformers.__version__)' 2>&1)"
say "setup took $(($(date +%s) - t0)) s"

# --- 4. the benchmark ----------------------------------------------------------------------------
export PHICLIP_BENCH_LOG_DIR="$LOG_DIR" PYTHONUNBUFFERED=1
timeout -k 20 "${BENCH_TIMEOUT:-540}" "$PY" bench/gpu.py --log-dir "$LOG_DIR" "$@"
rc=$?
say "bench/gpu.py exit status $rc (124: stopped by the ${BENCH_TIMEOUT:-540} s timeout); total $(($(date +%s) - t0)) s"
exit $rc
