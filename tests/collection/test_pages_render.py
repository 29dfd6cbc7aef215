"""The collection pages in headless Chromium, offline from file:// URLs.

* The map with 100,000 points: ``--dump-dom`` shows every point drawn, the screenshot shows them in the
  palette's colours (Debian's ``chromium``).
* The clusters and duplicates pages: a screenshot that is not blank.
* The map driven through Selenium (Debian's ``chromium-driver``): hover shows the id and thumbnail,
  the wheel zooms, a drag pans, a legend click hides a category.

Each part is skipped with the reason where its browser pieces are absent (``.ci/run`` installs them).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from phiclip.collection import find_duplicates, kmeans
from phiclip.collection.pages import MAP_PALETTE, clusters_page, duplicates_page, map_page, write_page

pytestmark = pytest.mark.timeout(240)

_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
]
N_BIG = 100_000


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("headless Chromium is not installed (apt-get install chromium); .ci/run installs it")


def _run(args: list[str], profile: Path) -> subprocess.CompletedProcess[str]:
    cmd = [_chromium(), *_FLAGS, f"--user-data-dir={profile}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}"
    return proc


@pytest.fixture(scope="module")
def big_map(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    _chromium()
    work = tmp_path_factory.mktemp("map-render")
    rng = np.random.default_rng(0)
    centres = rng.uniform(-10, 10, (8, 2))
    clusters = rng.integers(0, 8, N_BIG)
    coords = centres[clusters] + rng.standard_normal((N_BIG, 2))
    page = map_page(
        coords,
        [f"item-{i}" for i in range(N_BIG)],
        method="PCA (test)",
        clusters=clusters,
        colour_by="clusters",
    )
    path = write_page(page, work / "map.html")
    url = path.resolve().as_uri()
    shot = work / "map.png"
    budget = ["--virtual-time-budget=20000"]
    _run([*budget, f"--screenshot={shot}", "--window-size=1200,1000", url], work / "profile-shot")
    dom = _run([*budget, "--dump-dom", url], work / "profile-dom").stdout
    return {"png": shot, "dom": dom}


def test_map_draws_every_point(big_map: dict[str, Any]) -> None:
    dom = big_map["dom"]
    assert f'data-drawn="{N_BIG}"' in dom
    status = re.search(r'id="map-status"[^>]*>([^<]*)<', dom)
    assert status is not None and status.group(1).startswith(f"{N_BIG:,} of {N_BIG:,} points in view")


def _pixels_near(img: np.ndarray, hex_colour: str, tol: int = 10) -> int:
    target = np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)])
    return int(np.count_nonzero(np.all(np.abs(img - target) <= tol, axis=-1)))


def test_map_screenshot_shows_the_clusters_in_their_colours(big_map: dict[str, Any]) -> None:
    img = np.asarray(Image.open(big_map["png"]).convert("RGB")).astype(np.int64)
    assert img.shape[:2] == (1000, 1200) and img.std() > 20
    for colour in MAP_PALETTE[:8]:  # eight clusters, eight colours, each with visible points
        assert _pixels_near(img, colour) > 300, colour


def test_clusters_and_duplicates_pages_render(tmp_path: Path) -> None:
    _chromium()
    rng = np.random.default_rng(2)
    ids, sources = [], []
    for i in range(40):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (40, 30), tuple(int(v) for v in rng.integers(0, 255, 3))).save(p)
        ids.append(f"im{i}")
        sources.append(str(p))
    x = rng.standard_normal((40, 8)).astype(np.float32)
    x[1] = x[0]
    pages = {
        "clusters": clusters_page(kmeans(x, 4), ids, sources=sources, labels=[str(i % 2) for i in range(40)]),
        "duplicates": duplicates_page(find_duplicates(ids, x), dict(zip(ids, sources))),
    }
    for name, page in pages.items():
        url = write_page(page, tmp_path / f"{name}.html").resolve().as_uri()
        shot = tmp_path / f"{name}.png"
        _run([f"--screenshot={shot}", "--window-size=1000,900", url], tmp_path / f"profile-{name}")
        img = np.asarray(Image.open(shot).convert("RGB")).astype(np.float64)
        assert img.std() > 15, name  # text, thumbnails and (clusters) the bar chart


# --- interaction, through Selenium ---------------------------------------------------------------------


def _binaries() -> tuple[str, str]:
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip("selenium is not installed (pip install selenium; it is in the dev extra)")
    browser = next(
        (p for p in ("/usr/bin/chromium", shutil.which("chromium") or "") if p and os.path.exists(p)), None
    )
    driver = next(
        (p for p in ("/usr/bin/chromedriver", shutil.which("chromedriver") or "") if p and os.path.exists(p)),
        None,
    )
    if browser is None or driver is None:
        pytest.skip(
            "Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver); "
            ".ci/run installs them"
        )
    return browser, driver


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    browser_bin, driver_bin = _binaries()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = browser_bin
    for flag in _FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    opts.add_argument("--window-size=1100,1000")
    driver = webdriver.Chrome(service=Service(executable_path=driver_bin), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver: Any, check: Any, what: str, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check(driver)
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def _drawn(driver: Any) -> int:
    return int(driver.find_element("tag name", "body").get_attribute("data-drawn") or -1)


def test_map_interaction(browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions.wheel_input import ScrollOrigin

    rng = np.random.default_rng(5)
    n = 3000
    coords = rng.uniform(0.3, 0.7, (n, 2))
    coords[0], coords[1], coords[2] = (0.0, 0.0), (1.0, 1.0), (0.9, 0.12)  # bounds, and an isolated target
    labels = ["a" if i % 3 else "b" for i in range(n)]
    ids = [f"pt-{i}" for i in range(n)]
    ids[2] = "<b>target</b>"
    img = tmp_path / "target.png"
    Image.new("RGB", (50, 50), (200, 30, 30)).save(img)
    sources = [""] * n
    sources[2] = str(img)
    page = map_page(coords, ids, method="PCA (test)", sources=sources, labels=labels, colour_by="labels")
    browser.get(write_page(page, tmp_path / "map.html").resolve().as_uri())
    _wait(browser, lambda d: _drawn(d) == n, "the first draw")
    canvas = browser.find_element("id", "map")
    view = browser.execute_script("return window.phiclipMap.view();")

    def offset(x: float, y: float) -> tuple[int, int]:
        """Offset from the canvas centre (Selenium's origin) of unit-square point (x, y)."""
        sx = x * view["scale"] + view["tx"]
        sy = (1 - y) * view["scale"] + view["ty"]
        return round(sx - view["width"] / 2), round(sy - view["height"] / 2)

    # hover: the target's id (as text, never markup) and its thumbnail
    ActionChains(browser).move_to_element_with_offset(canvas, *offset(0.9, 0.12)).perform()
    tip = browser.find_element("id", "tip")
    _wait(browser, lambda d: tip.is_displayed(), "the hover card")
    assert "<b>target</b>" in tip.text and tip.find_elements("tag name", "b") == []
    thumb = tip.find_element("tag name", "img").get_attribute("src")
    assert thumb.startswith("data:image/jpeg;base64,")
    # away from every point: no card
    ActionChains(browser).move_to_element_with_offset(canvas, *offset(0.1, 0.9)).perform()
    _wait(browser, lambda d: not tip.is_displayed(), "the card to hide")

    # wheel: zoom in around the centre, fewer points in view
    ActionChains(browser).scroll_from_origin(ScrollOrigin.from_element(canvas), 0, -600).perform()
    _wait(
        browser,
        lambda d: d.execute_script("return window.phiclipMap.view().scale") > view["scale"] * 2,
        "zoom",
    )
    _wait(browser, lambda d: 0 < _drawn(d) < n, "fewer points in view after zooming")

    # drag: the view moves by the drag
    before = browser.execute_script("return window.phiclipMap.view();")
    ActionChains(browser).move_to_element(canvas).click_and_hold().move_by_offset(120, 80).release().perform()
    after = browser.execute_script("return window.phiclipMap.view();")
    assert after["tx"] - before["tx"] == pytest.approx(120, abs=2)
    assert after["ty"] - before["ty"] == pytest.approx(80, abs=2)

    # reset, then hide label "a" from the legend: only the "b" points are drawn
    browser.find_element("id", "reset").click()
    _wait(browser, lambda d: _drawn(d) == n, "the reset view")
    entry = next(
        e for e in browser.find_elements("css selector", "#legend .entry") if e.text.startswith("a ")
    )
    entry.click()
    _wait(browser, lambda d: _drawn(d) == labels.count("b"), "label a hidden")
    assert "off" in entry.get_attribute("class")
