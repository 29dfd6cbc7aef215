"""report.html rendered by headless Chromium: the page loads offline and its charts draw.

Needs Debian's ``chromium`` (``.ci/run`` installs it); elsewhere the test is skipped with the reason.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from phiclip.comparison.report import MODEL_COLOURS

from .conftest import CompareRun

_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("headless Chromium is not installed (apt-get install chromium); .ci/run installs it")


def _run(args: list[str], profile: Path) -> subprocess.CompletedProcess[str]:
    cmd = [_chromium(), *_FLAGS, f"--user-data-dir={profile}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}"
    return proc


@pytest.fixture(scope="module")
def rendered(compare_run: CompareRun, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    work = tmp_path_factory.mktemp("chromium")
    url = (compare_run.output / "report.html").resolve().as_uri()
    shot = work / "report.png"
    _run([f"--screenshot={shot}", "--window-size=1200,2400", url], work / "profile-shot")
    dom = _run(["--dump-dom", url], work / "profile-dom").stdout
    return {"png": shot, "dom": dom}


def test_screenshot_is_not_blank(rendered: dict[str, object]) -> None:
    png = rendered["png"]
    assert isinstance(png, Path) and png.is_file()
    img = np.asarray(Image.open(png).convert("RGB")).astype(np.float64)
    assert img.shape[:2] == (2400, 1200)
    assert img.std() > 20  # text, charts and thumbnails, not a flat page


def _pixels_near(img: np.ndarray, hex_colour: str, tol: int = 12) -> int:
    target = np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)])
    return int(np.count_nonzero(np.all(np.abs(img - target) <= tol, axis=-1)))


def test_bar_charts_drew_in_the_model_colours(rendered: dict[str, object]) -> None:
    img = np.asarray(Image.open(rendered["png"]).convert("RGB")).astype(np.int64)  # type: ignore[arg-type]
    # The top of the page holds the cost bar charts: solid bars in A's and B's colours.
    for colour in MODEL_COLOURS[:2]:
        assert _pixels_near(img, colour) > 2000, colour


def test_dom_has_drawn_chart_elements(rendered: dict[str, object]) -> None:
    dom = rendered["dom"]
    assert isinstance(dom, str) and "<html" in dom.lower()

    def count(pattern: str) -> int:
        return len(re.findall(pattern, dom))

    assert count(r'<svg id="chart-cost-[a-z_]+"') >= 6
    assert count(r'<rect class="bar"') >= 2 * 6
    assert count(r'<rect class="hist-bar"') > 10
    assert count(r'<circle class="pt"') == 2 * 24
    assert count(r'<svg id="chart-projection-[AB]"') == 2
    assert count(r'<figure class="thumb') >= 6 * (1 + 2 * 5)
    assert 'id="neighbour-grid"' in dom and 'id="summary"' in dom

