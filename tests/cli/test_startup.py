"""``phiclip --help`` stays light: no torch, transformers or faiss at start-up."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "transformers", "faiss")

_PROBE = """
import json, sys
sys.argv = ["phiclip", *sys.argv[1:]]
from phiclip.cli import main
try:
    main()
except SystemExit:
    pass
print("MODULES=" + json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {heavy!r})))
"""


def _loaded_after(*args: str) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", _PROBE.format(heavy=set(HEAVY)), *args], capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("MODULES=")][-1]
    return json.loads(line[len("MODULES="):])


def test_help_imports_no_heavy_library() -> None:
    assert _loaded_after("--help") == []


def test_a_command_help_imports_no_heavy_library() -> None:
    for command in (["search", "--help"], ["finetune", "probe", "--help"], ["info", "--help"]):
        assert _loaded_after(*command) == [], command
