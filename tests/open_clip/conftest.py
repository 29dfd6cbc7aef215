"""The exactness reference for tests/open_clip: open_clip itself, kept out of phiclip's environment.

**Why apart.** ``open_clip_torch`` depends on torchvision, and the torchvision wheels the package
index offers beside this project's CPU torch 2.13.0 are built for another torch/CUDA: their
compiled operators do not register (``operator torchvision::nms does not exist``), and since
transformers imports torchvision whenever it is importable, even ``from transformers import
CLIPModel`` would then fail. So open_clip must never be on the path of the process phiclip's tests
run in.

**How.** The ``open_clip_reference`` fixture pip-installs, once, with ``--no-deps --target
tests/.reference`` (gitignored): ``open_clip_torch`` (pinned), ``torchvision`` (the release made for
torch 2.13; only its pure-Python transforms are used), ``ftfy`` and ``wcwidth`` (open_clip's
tokenizer). ``reference_worker.py`` runs in a subprocess with ``PYTHONPATH=tests/.reference``:
where torchvision's compiled operators cannot load, it declares the two operator schemas its meta
registrations need, after which torchvision's real transforms (Resize, CenterCrop, ToTensor,
Normalize on PIL images) import and run unchanged; so the preprocessing reference is torchvision
itself, not a reimplementation. The worker builds open_clip's own ``CLIP`` from open_clip's model
configs (shrunk), saves each as open_clip's hub layout, and stores ``encode_image`` /
``encode_text``, its tokens and its transform's pixels as ``.npz``; the tests compare phiclip with
those. One worker run per session (about 10-20 s).

Without the network (pip fails) the tests that need the reference are skipped with the reason;
``make test`` on a fresh machine installs it by itself through this fixture.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REFERENCE_DIR = HERE.parent / ".reference"
#: What the reference is: pinned, so that a result is reproducible.
REFERENCE_PACKAGES = ("open_clip_torch==3.3.0", "torchvision==0.28.0", "ftfy==6.3.1", "wcwidth")
_MARKER = REFERENCE_DIR / "INSTALLED.json"


def _install_reference() -> str | None:
    """Install the reference into tests/.reference once; None when ready, else why not."""
    if _MARKER.is_file() and json.loads(_MARKER.read_text()).get("packages") == list(REFERENCE_PACKAGES):
        return None
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", "--upgrade",
           "--target", str(REFERENCE_DIR), *REFERENCE_PACKAGES]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"pip could not run: {e}"
    if proc.returncode != 0:
        return "pip install of the reference failed (no network?): " + " ".join(proc.stderr.split())[-300:]
    _MARKER.write_text(json.dumps({"packages": list(REFERENCE_PACKAGES)}))
    return None


def run_reference(job: dict, work: Path) -> Path:
    """Run reference_worker.py on ``job`` (its ``out`` folder is returned)."""
    job_file = work / "job.json"
    job_file.write_text(json.dumps(job))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(REFERENCE_DIR)
    env["TRANSFORMERS_NO_TF"] = "1"
    proc = subprocess.run([sys.executable, str(HERE / "reference_worker.py"), str(job_file)], env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"the open_clip reference failed:\n{proc.stderr[-3000:]}")
    return Path(job["out"])


@pytest.fixture(scope="session")
def open_clip_reference():
    """:func:`run_reference`, with open_clip installed in tests/.reference (skips, saying why,
    when it cannot be)."""
    why = _install_reference()
    if why is not None:
        pytest.skip(f"open_clip reference unavailable: {why}")
    return run_reference
