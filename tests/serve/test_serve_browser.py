"""The search page in a real browser: headless Chromium from Debian's packages, driven by Selenium with
Debian's chromium-driver, against uvicorn on a loopback port. Types a query, sees thumbnails, clicks
"more like this", uploads an image, filters by label, and checks the page at a phone's width.

Skipped with the reason where selenium, chromium or chromedriver is absent (``.ci/run`` installs them).
Set ``PHICLIP_SERVE_SCREENSHOT=path.png`` to also save the desktop screenshot there (and ``-phone``
beside it), as the README's is made.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from .conftest import Built, live_server, make_app, serve_options

pytestmark = pytest.mark.timeout(240)

_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
          "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
          "--hide-scrollbars", "--force-device-scale-factor=1"]


def _binaries() -> tuple[str, str]:
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip("selenium is not installed (pip install selenium; it is in the dev extra)")
    browser = next((p for p in ("/usr/bin/chromium", shutil.which("chromium") or "") if p and os.path.exists(p)), None)
    driver = next((p for p in ("/usr/bin/chromedriver", shutil.which("chromedriver") or "") if p and os.path.exists(p)), None)
    if browser is None or driver is None:
        pytest.skip("Debian's chromium and chromium-driver are not installed (apt-get install chromium "
                    "chromium-driver); .ci/run installs them")
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
    opts.add_argument("--window-size=1280,1000")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_bin), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def site(clip_collection: Built) -> Iterator[str]:
    app, _ = make_app([clip_collection.path], serve_options())
    with live_server(app) as base:
        yield base


def _wait(driver: Any, what: str, check: Any, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check(driver)
        except Exception as e:  # noqa: BLE001 - the page may be between renders
            last = e
        if last and not isinstance(last, Exception):
            return last
        time.sleep(0.05)
    status = driver.execute_script("const s = document.querySelector('#status'); return s && s.textContent")
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}; status: {status!r}")


def _results(driver: Any) -> list[dict[str, Any]]:
    """What the grid shows: id, the image's natural width (0 until loaded), the score text, label."""
    return driver.execute_script("""
        return [...document.querySelectorAll('#results li.card')].map(li => {
          const img = li.querySelector('img');
          const chip = li.querySelector('.chip');
          return {id: li.dataset.id, loaded: img ? (img.complete && img.naturalWidth) : 0,
                  score: li.querySelector('.num').textContent, label: chip ? chip.textContent : null};
        });""")


def _all_loaded(n: int) -> Any:
    def check(driver: Any) -> Any:
        rs = _results(driver)
        return rs if len(rs) == n and all(r["loaded"] > 0 for r in rs) else None

    return check


def _not_blank(png: Path) -> float:
    img = np.asarray(Image.open(png).convert("RGB")).astype(np.float64)
    return float(img.std())


def test_search_page_end_to_end(browser: Any, site: str, clip_collection: Built, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    d = browser
    d.get(site + "/")
    meta = _wait(d, "the collection line", lambda d: d.find_element(By.ID, "collection-meta").text)
    assert "24 images" in meta and clip_collection.spec in meta and "flat index" in meta
    assert d.find_element(By.ID, "label-filter").is_displayed()  # the collection has labels

    # 1. type a query: a grid of thumbnails with scores
    box = d.find_element(By.ID, "q")
    box.send_keys("a red circle", Keys.ENTER)
    results = _wait(d, "24 loaded thumbnails", _all_loaded(24))
    assert "a+red+circle" in d.current_url or "a%20red%20circle" in d.current_url
    scores = [float(r["score"].split("·")[1]) for r in results]
    assert scores == sorted(scores, reverse=True)
    assert "24 results" in d.find_element(By.ID, "status").text
    shot = tmp_path / "text-query.png"
    d.save_screenshot(str(shot))
    assert _not_blank(shot) > 20

    # 2. click the third result: "more like this" puts that item first, with a cosine of 1
    third = results[2]["id"]
    d.find_elements(By.CSS_SELECTOR, "#results li.card button.hit")[2].click()
    _wait(d, "results like the clicked item", lambda d: (rs := _results(d)) and rs[0]["id"] == third and rs)
    _wait(d, "thumbnails", _all_loaded(24))
    assert _results(d)[0]["score"].endswith("1.000")
    assert d.find_element(By.ID, "query-text").text.startswith("More like")
    assert d.find_element(By.ID, "query-image").get_attribute("src").endswith("/thumbnail")

    # 3. upload an image: its own item comes first
    rec = clip_collection.records[13]
    own_id = next(r for r in _ids_by_source(site).items() if r[0] == rec["path"])[1]
    d.find_element(By.ID, "file").send_keys(rec["path"])
    _wait(d, "results of the upload", lambda d: (rs := _results(d)) and rs[0]["id"] == own_id and rs)
    assert d.find_element(By.ID, "query-text").text == f"Similar to {Path(rec['path']).name}"
    assert d.find_element(By.ID, "query-image").get_attribute("src").startswith("blob:")

    # 4. the label filter: only that label's items
    from selenium.webdriver.support.ui import Select

    Select(d.find_element(By.ID, "label-filter")).select_by_value("blue")
    d.find_element(By.ID, "q").send_keys("anything", Keys.ENTER)
    blue = _wait(d, "blue results", lambda d: (rs := _results(d)) and all(r["label"] == "blue" for r in rs) and rs)
    assert len(blue) == 6

    # 5. keyboard: "/" focuses the search box; Enter on a focused result runs "more like this"
    d.find_element(By.TAG_NAME, "body").click()
    d.find_element(By.TAG_NAME, "body").send_keys("/")
    assert d.switch_to.active_element.get_attribute("id") == "q"
    buttons = d.find_elements(By.CSS_SELECTOR, "#results li.card button.hit")
    target = _results(d)[1]["id"]
    d.execute_script("arguments[0].focus()", buttons[1])
    d.switch_to.active_element.send_keys(Keys.ENTER)
    _wait(d, "keyboard 'more like this'", lambda d: (rs := _results(d)) and rs[0]["id"] == target and rs)

    # 6. no script errors, no blocked resources (the page's CSP allows this server only)
    severe = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe

    screenshot = os.environ.get("PHICLIP_SERVE_SCREENSHOT")
    if screenshot:
        _docs_screenshots(d, site, Path(screenshot))


_POINT_ON_SCREEN = """
    const d = JSON.parse(document.getElementById('map-data').textContent);
    const bin = atob(d.xy), bytes = new Uint8Array(bin.length);
    for (let k = 0; k < bin.length; k++) bytes[k] = bin.charCodeAt(k);
    const xy = new Float32Array(bytes.buffer), v = window.phiclipMap.view();
    for (let i = 0; i < d.ids.length; i++) {
      const sx = xy[2 * i] * v.scale + v.tx, sy = (1 - xy[2 * i + 1]) * v.scale + v.ty;
      if (window.phiclipMap.nearest(sx, sy) === i) return {id: d.ids[i], x: sx - v.width / 2, y: sy - v.height / 2};
    }
    return null;"""


def test_map_panel(browser: Any, site: str) -> None:
    """The Map button frames GET /map: every item drawn, hover shows the server's thumbnail, a click on a
    point runs "more like this" for it in the search page."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    d = browser
    d.get(site + "/")
    _wait(d, "the page", lambda d: "ready" in d.find_element(By.TAG_NAME, "body").get_attribute("class"))
    assert not d.find_element(By.ID, "map-panel").is_displayed()
    d.find_element(By.ID, "map-toggle").click()
    frame = _wait(d, "the map frame", lambda d: (f := d.find_element(By.ID, "map-frame")).is_displayed() and f)
    assert frame.get_attribute("src").endswith("/map?collection=shapes")
    d.execute_script("arguments[0].scrollIntoView()", frame)  # the whole map on the screen
    d.switch_to.frame(frame)
    try:
        _wait(d, "24 points drawn", lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-drawn") == "24")
        assert "computed by the server" in d.find_element(By.ID, "layout-method").text
        point = d.execute_script(_POINT_ON_SCREEN)
        assert point is not None
        canvas = d.find_element(By.ID, "map")
        ActionChains(d).move_to_element_with_offset(canvas, round(point["x"]), round(point["y"])).perform()
        tip = d.find_element(By.ID, "tip")
        _wait(d, "the hover card", lambda d: tip.is_displayed() and point["id"] in tip.text)
        img = tip.find_element(By.TAG_NAME, "img")
        assert "/thumbnail?size=128" in img.get_attribute("src")
        _wait(d, "the thumbnail from the server", lambda d: d.execute_script(
            "const i = document.querySelector('#tip img'); return i && i.complete && i.naturalWidth > 0"))
        ActionChains(d).click().perform()
    finally:
        d.switch_to.default_content()
    _wait(d, "more like the clicked point", lambda d: (rs := _results(d)) and rs[0]["id"] == point["id"] and rs)
    assert f"like={point['id']}" in d.current_url
    severe = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe


def test_phone_width(browser: Any, site: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    d = browser
    d.set_window_size(400, 900)
    try:
        d.get(site + "/?q=a+green+square")
        _wait(d, "thumbnails", _all_loaded(24))
        columns = d.execute_script(
            "return getComputedStyle(document.querySelector('#results')).gridTemplateColumns.split(' ').length")
        assert columns == 2
        overflow = d.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"the page is {overflow}px wider than the phone's screen"
        assert d.find_element(By.ID, "q").get_attribute("value") == "a green square"  # from the URL
        d.find_element(By.ID, "q").send_keys(Keys.ESCAPE)
        assert d.find_element(By.ID, "q").get_attribute("value") == ""
    finally:
        d.set_window_size(1280, 1000)


def _ids_by_source(site: str) -> dict[str, str]:
    import httpx

    hits = httpx.get(site + "/api/search", params={"text": "x", "k": 24}).json()["results"]
    return {h["source"]: h["id"] for h in hits}


def _docs_screenshots(d: Any, site: str, path: Path) -> None:
    """The README's screenshot: "more like this" on a red circle (desktop), and the phone width beside it."""
    ids = _ids_by_source(site)
    red = next(i for s, i in ids.items() if s.endswith("red_circle_0.png"))
    path.parent.mkdir(parents=True, exist_ok=True)
    for width, height, out in ((1100, 900, path), (400, 860, path.with_name(path.stem + "-phone" + path.suffix))):
        d.set_window_size(width, height)
        d.get(f"{site}/?like={red}")
        _wait(d, "thumbnails", _all_loaded(24))
        d.execute_script("document.activeElement.blur()")
        d.save_screenshot(str(out))
    d.set_window_size(1280, 1000)
