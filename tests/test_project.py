"""Project-level promises that live in configuration, not code."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_skipped_tests_are_listed_with_their_reason():
    opts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["addopts"]
    assert re.search(r"(^|\s)-r\w*s", opts), "pytest's addopts must include -rs (skip reasons in the summary)"


def test_every_importorskip_says_why():
    bare = []
    for p in (ROOT / "tests").rglob("*.py"):
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if "importorskip(" in line and "reason=" not in line and "def " not in line and "line" not in line:
                bare.append(f"{p.relative_to(ROOT)}:{i}")
    assert not bare, "pytest.importorskip without reason= (say which extra installs it): " + ", ".join(bare)
