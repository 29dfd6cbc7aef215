"""Self-contained HTML pages of a collection: its duplicates, its clusters, its map.

Each page is one HTML string that works offline from a ``file://`` URL: CSS and script are inline, the
thumbnails are small JPEG ``data:`` URIs made with PIL from the items' ``source`` paths (a grey
placeholder where a source is missing or unreadable), and a Content-Security-Policy forbids every
request outside the page. Text from the collection (ids, labels, paths) is HTML-escaped; data handed to
the map's script sits in a JSON block with ``<``, ``>`` and ``&`` escaped, so no id can close it.

* :func:`duplicates_page`: the largest groups of a :class:`~phiclip.collection.dedup.DuplicateReport`
  side by side, with counts; nothing is deleted.
* :func:`clusters_page`: cluster sizes (an inline SVG bar chart), the members nearest each centroid, the
  label scores when labels are known.
* :func:`map_page`: an interactive scatter of 2-D coordinates (:func:`~phiclip.collection.layout.layout_2d`)
  on a ``<canvas>``: drag to pan, wheel to zoom, hover for the id (and a thumbnail for a capped sample),
  coloured by label or cluster with a legend. Hit tests go through a uniform grid, so 100,000 points stay
  responsive.
* :func:`write_page` writes a page atomically.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import html
import io
import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageOps

from phiclip import schema
from phiclip.atomic import atomic_write_text
from phiclip.collection.cluster import ClusterResult, label_scores
from phiclip.collection.dedup import DuplicateReport
from phiclip.collection.layout import Layout
from phiclip.images import DEFAULT_MAX_PIXELS, load_image

__all__ = [
    "MAP_PALETTE",
    "MAX_MAP_THUMBNAILS",
    "clusters_page",
    "duplicates_page",
    "map_page",
    "map_page_csp",
    "placeholder_uri",
    "thumbnail_uri",
    "write_page",
]

#: Longest side of a thumbnail on the duplicates and clusters pages, in pixels.
THUMB_PX = 96
#: Longest side of a thumbnail in the map's hover card.
MAP_THUMB_PX = 64
#: The map embeds thumbnails for at most this many points (a seeded sample); the others show their id.
MAX_MAP_THUMBNAILS = 2000
#: Colours of the map's categories, the largest first; categories beyond them share :data:`OTHER_COLOUR`.
MAP_PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
    "#393b79", "#ad494a", "#637939", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354", "#756bb1",
    "#636363", "#8ca252",
)  # fmt: skip
OTHER_COLOUR = "#c7c7c7"
SINGLE_COLOUR = "#3b6ea8"

_CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
    "base-uri 'none'; form-action 'none'"
)

_CSS = """
:root { --fg: #1d2330; --muted: #5d6677; --line: #d9dde5; --bg: #ffffff; --soft: #f4f6f9; }
* { box-sizing: border-box; }
body { margin: 0; padding: 20px 28px; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: var(--fg); background: var(--bg); }
h1 { font-size: 22px; margin: 0 0 6px; }
h2 { font-size: 17px; margin: 26px 0 8px; }
h3 { font-size: 15px; margin: 0 0 6px; }
.muted { color: var(--muted); }
.note { background: #eef6ee; border: 1px solid #b9dcb9; border-radius: 6px; padding: 8px 12px; margin: 10px 0; }
.counts { display: flex; flex-wrap: wrap; gap: 10px; margin: 12px 0; }
.count { background: var(--soft); border: 1px solid var(--line); border-radius: 6px; padding: 6px 12px; }
.count b { display: block; font-size: 19px; }
table.scores { border-collapse: collapse; margin: 6px 0; }
table.scores td, table.scores th { border: 1px solid var(--line); padding: 3px 10px; text-align: right; }
table.scores th { background: var(--soft); }
.group, .cluster { border: 1px solid var(--line); border-radius: 8px; padding: 10px 12px; margin: 10px 0; }
.strip { display: flex; flex-wrap: wrap; gap: 8px; }
figure.thumb { margin: 0; width: 112px; font-size: 11px; text-align: center; }
figure.thumb img { width: 96px; height: 96px; object-fit: contain; background: var(--soft);
                   border: 1px solid var(--line); border-radius: 4px; display: block; margin: 0 auto 3px; }
figure.rep img { border: 2px solid #2a7a2a; }
figure.thumb figcaption { overflow-wrap: anywhere; }
.badge { display: inline-block; font-size: 11px; border-radius: 10px; padding: 1px 8px; margin-left: 6px;
         background: var(--soft); border: 1px solid var(--line); }
.badge.exact { background: #fde8e8; border-color: #e8b4b4; }
.badge.near { background: #e8f0fd; border-color: #b4c8e8; }
svg .bar { fill: #3b6ea8; }
svg .bar:hover { fill: #e6550d; }
svg text { font-size: 11px; fill: var(--muted); }
"""


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _page(title: str, body: str, *, head: str = "", script: str = "", csp: str = _CSP) -> str:
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_esc(title)}</title>\n<style>{_CSS}{head}</style>\n</head>\n<body>\n"
        f"{body}\n" + (f"<script>\n{script}\n</script>\n" if script else "") + "</body>\n</html>\n"
    )


def _json_for_script(data: Any) -> str:
    """JSON that is safe inside ``<script type="application/json">``: no ``<``, ``>`` or ``&`` left raw."""
    text = json.dumps(data, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _jpeg_uri(img: Image.Image, quality: int = 70) -> str:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@functools.lru_cache(maxsize=8)
def placeholder_uri(px: int = THUMB_PX) -> str:
    """A plain grey square JPEG ``data:`` URI, shown where an item has no readable image."""
    return _jpeg_uri(Image.new("RGB", (px, px), (200, 200, 200)))


def thumbnail_uri(source: str | None, px: int = THUMB_PX, *, quality: int = 70) -> str | None:
    """A JPEG ``data:`` URI of the image at ``source`` (a path as :mod:`phiclip.schema` stores it),
    at most ``px`` pixels on its longest side; ``None`` when there is no source, it is not a local file
    (a URL, a table row) or it cannot be read or decoded."""
    if not source or "://" in source:
        return None
    try:
        path = os.fsdecode(schema.source_to_path(source))
        img = _draft_jpeg(path, px)
        if img is None:
            img = load_image(path)
        img.thumbnail((px, px))
        return _jpeg_uri(img.convert("RGB"), quality)
    except Exception:  # noqa: BLE001 - any unreadable image gets the placeholder, never fails the page
        return None


def _draft_jpeg(path: str, px: int) -> Image.Image | None:
    """A JPEG decoded at the smallest of 1/1, 1/2, 1/4, 1/8 scale still at least ``px`` on each side
    (several times faster than a full decode of a photo), EXIF orientation applied; ``None`` for other
    formats. Images over :data:`phiclip.images.DEFAULT_MAX_PIXELS` are refused (ValueError)."""
    with open(path, "rb") as f:
        if f.read(3) != b"\xff\xd8\xff":
            return None
    with Image.open(path) as im:
        if im.format != "JPEG":
            return None
        width, height = im.size
        if width * height > DEFAULT_MAX_PIXELS:
            raise ValueError(f"{width}x{height} is over the pixel limit")
        im.draft("RGB", (px, px))
        img = ImageOps.exif_transpose(im)
        img.load()
    return img


def _thumb_or_placeholder(source: str | None, px: int) -> tuple[str, bool]:
    uri = thumbnail_uri(source, px)
    return (uri, True) if uri is not None else (placeholder_uri(px), False)


def _figure(item_id: str, source: str | None, caption: str, *, rep: bool = False, px: int = THUMB_PX) -> str:
    uri, ok = _thumb_or_placeholder(source, px)
    alt = item_id if ok else f"{item_id} (no image)"
    cls = "thumb rep" if rep else "thumb"
    return (
        f'<figure class="{cls}"><img src="{uri}" alt="{_esc(alt)}" title="{_esc(item_id)}">'
        f'<figcaption><span class="id">{_esc(item_id)}</span><br>{caption}</figcaption></figure>'
    )


def _count(label: str, value: object) -> str:
    return f'<div class="count"><b>{_esc(value)}</b>{_esc(label)}</div>'


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def _aligned_sources(
    ids: Sequence[str], sources: Sequence[str] | None, what: str = "sources"
) -> list[str | None]:
    if sources is None:
        return [None] * len(ids)
    if len(sources) != len(ids):
        raise ValueError(f"{len(ids)} ids but {len(sources)} {what}")
    return [s or None for s in sources]


def duplicates_page(
    report: DuplicateReport,
    sources: Mapping[str, str] | None = None,
    *,
    title: str = "Duplicates",
    max_groups: int = 50,
    max_members: int = 24,
    thumb_px: int = THUMB_PX,
) -> str:
    """A page of the largest duplicate groups of ``report``, members side by side.

    Args:
        report: what :func:`~phiclip.collection.dedup.find_duplicates` found.
        sources: ``{id: source}`` of the items (their image paths), for the thumbnails; without it, or
            for an id missing from it, a grey placeholder.
        title: the page title.
        max_groups: show the this many largest groups (ties: lower group id first); the counts cover all.
        max_members: show at most this many members per group (the representative and the most similar).
        thumb_px: longest side of a thumbnail.

    Returns:
        The HTML page: counts (groups exact and near, items in groups, to keep, to drop, unreadable), a
        note that nothing was deleted, then each group: kind, size, and per member its thumbnail, id and
        cosine similarity to the representative.
    """
    sources = sources or {}
    groups: dict[int, list[tuple[int, str, str, float, str]]] = {}
    for row in report.groups:
        groups.setdefault(row[0], []).append(row)
    kinds = Counter(rows[0][4] for rows in groups.values())
    in_groups = {r[1] for r in report.groups}
    dropped = {r[1] for r in report.groups if r[1] != r[2]}
    total = len(report.keep) + len(dropped)
    order = sorted(groups, key=lambda g: (-len(groups[g]), g))
    shown = order[: max(0, max_groups)]

    parts = [f"<h1>{_esc(title)}</h1>"]
    parts.append(
        f'<p class="muted">Near duplicates: cosine ≥ {report.threshold:g} to the group\'s representative '
        f"({_esc(report.method)}); exact duplicates: identical bytes.</p>"
    )
    parts.append('<div class="counts" id="counts">')
    parts.append(_count("items", _fmt_int(total)))
    parts.append(_count("groups", _fmt_int(len(groups))))
    parts.append(_count("exact groups", _fmt_int(kinds.get("exact", 0))))
    parts.append(_count("near groups", _fmt_int(kinds.get("near", 0))))
    parts.append(_count("items in groups", _fmt_int(len(in_groups))))
    parts.append(_count("to keep", _fmt_int(len(report.keep))))
    parts.append(_count("duplicates beyond the representatives", _fmt_int(len(dropped))))
    if report.unreadable:
        parts.append(_count("unreadable", _fmt_int(len(report.unreadable))))
    parts.append("</div>")
    parts.append(
        '<p class="note" id="nothing-deleted">Nothing was deleted or moved. This page only shows what was '
        "found; the keep-list (keep.parquet) names the items to keep, the representative of each group and "
        "every item in no group.</p>"
    )
    if not groups:
        parts.append('<p id="no-groups">No duplicates were found.</p>')
    else:
        more = len(order) - len(shown)
        parts.append(
            f"<h2>The {_fmt_int(len(shown))} largest groups</h2>"
            + (f'<p class="muted">{_fmt_int(more)} smaller groups are not shown.</p>' if more else "")
        )
    for gid in shown:
        rows = groups[gid]
        kind = rows[0][4]
        rep = rows[0][2]
        figs = []
        for _, item, _, sim, _ in rows[: max(1, max_members)]:
            is_rep = item == rep
            caption = "representative" if is_rep else f"similarity {sim:.4f}"
            figs.append(_figure(item, sources.get(item), caption, rep=is_rep, px=thumb_px))
        hidden = len(rows) - len(figs)
        parts.append(
            f'<section class="group" data-group="{gid}" data-kind="{_esc(kind)}">'
            f'<h3>Group {gid}<span class="badge {_esc(kind)}">{_esc(kind)}</span>'
            f'<span class="badge">{len(rows)} items</span></h3>'
            f'<div class="strip">{"".join(figs)}</div>'
            + (f'<p class="muted">and {hidden} more</p>' if hidden else "")
            + "</section>"
        )
    if report.unreadable:
        parts.append(
            '<h2>Unreadable items</h2><p class="muted">Their bytes could not be read, so they were '
            'not compared for exact duplicates.</p><ul id="unreadable">'
        )
        for item, reason in report.unreadable[:50]:
            parts.append(f"<li><code>{_esc(item)}</code>: {_esc(reason)}</li>")
        if len(report.unreadable) > 50:
            parts.append(f"<li>and {len(report.unreadable) - 50} more</li>")
        parts.append("</ul>")
    return _page(title, "\n".join(parts))


def _size_chart(sizes: np.ndarray, width: int = 900, height: int = 220) -> str:
    """An inline SVG bar chart of cluster sizes, the largest first, each bar titled with its cluster."""
    k = len(sizes)
    order = np.lexsort((np.arange(k), -sizes))
    top = int(sizes.max()) if k else 0
    left, bottom, plot_h = 44, 22, height - 34
    bar_w = (width - left - 6) / max(k, 1)
    gap = 1.0 if bar_w > 4 else 0.0
    out = [
        f'<svg id="cluster-sizes" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        'role="img" aria-label="cluster sizes, largest first">'
    ]
    out.append(f'<text x="{left - 6}" y="{height - bottom - plot_h + 10}" text-anchor="end">{top}</text>')
    out.append(f'<text x="{left - 6}" y="{height - bottom}" text-anchor="end">0</text>')
    out.append(
        f'<line x1="{left}" y1="{height - bottom}" x2="{width - 4}" y2="{height - bottom}" stroke="#999"/>'
    )
    for pos, c in enumerate(order.tolist()):
        h = plot_h * sizes[c] / top if top else 0.0
        x = left + pos * bar_w
        out.append(
            f'<rect class="bar" data-cluster="{c}" x="{x:.2f}" y="{height - bottom - h:.2f}" '
            f'width="{max(bar_w - gap, 0.5):.2f}" height="{h:.2f}"><title>cluster {c}: {int(sizes[c])} '
            "items</title></rect>"
        )
    out.append(f'<text x="{left}" y="{height - 6}">clusters, largest first ({k})</text>')
    out.append("</svg>")
    return "".join(out)


def clusters_page(
    result: ClusterResult,
    ids: Sequence[str],
    *,
    sources: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
    title: str = "Clusters",
    per_cluster: int = 8,
    max_clusters: int = 100,
    thumb_px: int = THUMB_PX,
) -> str:
    """A page of a k-means result: counts, a bar chart of the sizes, the members nearest each centroid.

    Args:
        result: :func:`~phiclip.collection.cluster.kmeans` of the items.
        ids: one id per item, in the order clustered.
        sources: one source (image path) per item, for the thumbnails (grey placeholders without).
        labels: one label per item; when given, the page shows the label scores (homogeneity,
            completeness, V-measure, NMI) and each cluster's most common label and its share.
        title: the page title.
        per_cluster: thumbnails per cluster: the representative, then the members nearest the centroid.
        max_clusters: clusters shown in detail, the largest first (the chart shows all).
        thumb_px: longest side of a thumbnail.
    """
    ids = [str(i) for i in ids]
    n = len(ids)
    if n != len(result.assignment):
        raise ValueError(f"{n} ids but {len(result.assignment)} clustered items")
    srcs = _aligned_sources(ids, sources)
    if labels is not None and len(labels) != n:
        raise ValueError(f"{n} ids but {len(labels)} labels")
    sizes = np.asarray(result.sizes, dtype=np.int64)
    k = result.k
    parts = [f"<h1>{_esc(title)}</h1>"]
    parts.append(
        f'<p class="muted">k-means on L2-normalised vectors (FAISS, seed {result.seed}, {result.niter} '
        f"iterations, best of {result.nredo} starts).</p>"
    )
    parts.append('<div class="counts" id="counts">')
    parts.append(_count("items", _fmt_int(n)))
    parts.append(_count("clusters", _fmt_int(k)))
    parts.append(_count("largest cluster", _fmt_int(int(sizes.max()) if k else 0)))
    parts.append(_count("smallest cluster", _fmt_int(int(sizes.min()) if k else 0)))
    empty = int(np.sum(sizes == 0))
    if empty:
        parts.append(_count("empty clusters", _fmt_int(empty)))
    parts.append(_count("inertia", f"{result.inertia:.4g}"))
    parts.append("</div>")

    majority: dict[int, tuple[str, float]] = {}
    if labels is not None:
        lab = [str(v) for v in labels]
        scores = label_scores(lab, result.assignment)
        parts.append("<h2>Clusters against the labels</h2>")
        parts.append(
            '<table class="scores" id="label-scores"><tr><th>homogeneity</th><th>completeness</th>'
            "<th>V-measure</th><th>NMI</th><th>labels</th></tr>"
            f"<tr><td>{scores.homogeneity:.4f}</td><td>{scores.completeness:.4f}</td>"
            f"<td>{scores.v_measure:.4f}</td><td>{scores.nmi:.4f}</td><td>{len(set(lab))}</td></tr></table>"
        )
        per: dict[int, Counter[str]] = {}
        for c, value in zip(result.assignment.tolist(), lab):
            per.setdefault(int(c), Counter())[value] += 1
        for c, counter in per.items():
            value, count = min(counter.items(), key=lambda kv: (-kv[1], kv[0]))
            majority[c] = (value, count / sum(counter.values()))

    parts.append("<h2>Cluster sizes</h2>")
    parts.append(_size_chart(sizes))
    order = np.lexsort((np.arange(k), -sizes))
    shown = [int(c) for c in order[: max(0, max_clusters)] if sizes[c] > 0]
    parts.append(f"<h2>The {len(shown)} largest clusters</h2>")
    if len(shown) < int(np.sum(sizes > 0)):
        parts.append(
            f'<p class="muted">{int(np.sum(sizes > 0)) - len(shown)} smaller clusters are not shown.</p>'
        )
    by_cluster = np.lexsort((np.arange(n), result.distance, result.assignment))
    starts = np.searchsorted(result.assignment[by_cluster], np.arange(k + 1))
    for c in shown:
        members = by_cluster[starts[c] : starts[c + 1]]
        rep = int(result.representatives[c])
        picked = [rep] + [int(m) for m in members if int(m) != rep][: max(0, per_cluster - 1)]
        figs = []
        for r in picked:
            caption = "representative" if r == rep else f"distance {result.distance[r]:.3f}"
            if labels is not None:
                caption += f"<br>{_esc(labels[r])}"
            figs.append(_figure(ids[r], srcs[r], caption, rep=r == rep, px=thumb_px))
        head = f'Cluster {c}<span class="badge">{int(sizes[c])} items</span>'
        if c in majority:
            value, share = majority[c]
            head += f'<span class="badge">{_esc(value)}: {100 * share:.0f}%</span>'
        parts.append(
            f'<section class="cluster" data-cluster="{c}"><h3>{head}</h3>'
            f'<div class="strip">{"".join(figs)}</div></section>'
        )
    return _page(title, "\n".join(parts))


_MAP_CSS = """
html { height: 100%; }
body { padding: 14px 18px; height: 100%; display: flex; flex-direction: column; }
body > * { flex: 0 0 auto; }
#map-wrap { position: relative; flex: 1 1 auto; min-height: 320px; }
#map { width: 100%; height: 100%; border: 1px solid var(--line); border-radius: 6px; display: block;
       cursor: grab; background: #fff; touch-action: none; }
#map.dragging { cursor: grabbing; }
#tip { position: absolute; pointer-events: none; background: rgba(255,255,255,0.97); border: 1px solid #aab;
       border-radius: 6px; padding: 6px; font-size: 12px; max-width: 260px; display: none;
       box-shadow: 0 2px 8px rgba(0,0,0,0.15); overflow-wrap: anywhere; }
#tip img { display: block; max-width: 96px; max-height: 96px; margin-bottom: 4px; }
#legend { display: flex; flex-wrap: wrap; gap: 6px 14px; margin: 8px 0; font-size: 12px; }
#legend .entry { cursor: pointer; user-select: none; }
#legend .entry.off { opacity: 0.35; }
#legend .sw { display: inline-block; width: 11px; height: 11px; border-radius: 2px; margin-right: 5px;
              vertical-align: -1px; }
#toolbar { margin: 6px 0; font-size: 12px; }
button { font: inherit; }
"""

_MAP_JS = r"""
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("map-data").textContent);
  function decode(b64, Type) {
    var bin = atob(b64), bytes = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    return new Type(bytes.buffer);
  }
  var xy = decode(data.xy, Float32Array);
  var slot = decode(data.slot, Uint8Array);
  var cat = data.cat ? decode(data.cat, Uint32Array) : null;
  var ids = data.ids, n = ids.length, colours = data.colours, names = data.names, thumbs = data.thumbs;
  // served pages: hover thumbnails and a click's target from URL templates ("{id}" replaced)
  var thumbUrl = data.thumb_url || null, link = data.link || null;
  function fill(template, i) { return template.split("{id}").join(encodeURIComponent(ids[i])); }
  var canvas = document.getElementById("map"), ctx = canvas.getContext("2d");
  var tip = document.getElementById("tip"), status = document.getElementById("map-status");
  var hidden = new Uint8Array(colours.length), hover = -1;
  var bySlot = [];
  (function () {
    var counts = new Int32Array(colours.length), i;
    for (i = 0; i < n; i++) counts[slot[i]]++;
    for (var s = 0; s < colours.length; s++) { bySlot.push(new Int32Array(counts[s])); counts[s] = 0; }
    for (i = 0; i < n; i++) { var t = slot[i]; bySlot[t][counts[t]++] = i; }
  })();
  // uniform grid over the unit square for hit tests
  var G = Math.max(1, Math.min(512, Math.ceil(Math.sqrt(n / 4))));
  var cellStart = new Int32Array(G * G + 1), cellItems = new Int32Array(n);
  function cellOf(i) {
    var cx = Math.min(G - 1, Math.max(0, Math.floor(xy[2 * i] * G)));
    var cy = Math.min(G - 1, Math.max(0, Math.floor(xy[2 * i + 1] * G)));
    return cy * G + cx;
  }
  (function () {
    var i, c;
    for (i = 0; i < n; i++) cellStart[cellOf(i) + 1]++;
    for (c = 0; c < G * G; c++) cellStart[c + 1] += cellStart[c];
    var fill = cellStart.slice(0, G * G);
    for (i = 0; i < n; i++) cellItems[fill[cellOf(i)]++] = i;
  })();
  var scale = 1, tx = 0, ty = 0, fitScale = 1, dpr = 1, w = 0, h = 0;
  var r = n > 20000 ? 1.2 : (n > 2000 ? 2 : 3.5);
  function resize() {
    dpr = window.devicePixelRatio || 1;
    w = canvas.clientWidth || 800; h = canvas.clientHeight || 600;
    canvas.width = Math.round(w * dpr); canvas.height = Math.round(h * dpr);
  }
  function fit() {
    fitScale = Math.max(1, Math.min(w, h) * 0.94);
    scale = fitScale; tx = (w - scale) / 2; ty = (h - scale) / 2;
  }
  function sx(i) { return xy[2 * i] * scale + tx; }
  function sy(i) { return (1 - xy[2 * i + 1]) * scale + ty; }
  var pending = false;
  function draw() {
    pending = false;
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    var drawn = 0, d = 2 * r;
    // the largest category first, so that small ones stay visible on top
    for (var s = 0; s < colours.length; s++) {
      if (hidden[s]) continue;
      var list = bySlot[s];
      ctx.fillStyle = colours[s];
      ctx.beginPath();
      for (var k = 0; k < list.length; k++) {
        var i = list[k], x = sx(i), y = sy(i);
        if (x < -d || y < -d || x > w + d || y > h + d) continue;
        ctx.rect(x - r, y - r, d, d);
        drawn++;
      }
      ctx.fill();
    }
    if (hover >= 0) {
      ctx.strokeStyle = "#000"; ctx.lineWidth = 1.5;
      ctx.beginPath(); ctx.arc(sx(hover), sy(hover), r + 4, 0, 2 * Math.PI); ctx.stroke();
    }
    document.body.setAttribute("data-drawn", String(drawn));
    status.textContent = drawn.toLocaleString() + " of " + n.toLocaleString() + " points in view \u00b7 zoom " +
      (scale / fitScale).toFixed(1) + "\u00d7";
  }
  function redraw() { if (!pending) { pending = true; window.requestAnimationFrame(draw); } }
  function nearest(mx, my) {
    var wx = (mx - tx) / scale, wy = 1 - (my - ty) / scale, rad = (r + 5) / scale;
    var x0 = Math.max(0, Math.floor((wx - rad) * G)), x1 = Math.min(G - 1, Math.floor((wx + rad) * G));
    var y0 = Math.max(0, Math.floor((wy - rad) * G)), y1 = Math.min(G - 1, Math.floor((wy + rad) * G));
    var best = -1, bestD = rad * rad;
    for (var cy = y0; cy <= y1; cy++) {
      for (var cx = x0; cx <= x1; cx++) {
        var c = cy * G + cx;
        for (var k = cellStart[c]; k < cellStart[c + 1]; k++) {
          var i = cellItems[k];
          if (hidden[slot[i]]) continue;
          var dx = xy[2 * i] - wx, dy = xy[2 * i + 1] - wy, dd = dx * dx + dy * dy;
          if (dd <= bestD) { bestD = dd; best = i; }
        }
      }
    }
    return best;
  }
  function showTip(i, mx, my) {
    tip.textContent = "";
    if (i < 0) { tip.style.display = "none"; return; }
    var uri = thumbs[String(i)] || (thumbUrl ? fill(thumbUrl, i) : null);
    if (uri) { var img = document.createElement("img"); img.src = uri; img.alt = ""; tip.appendChild(img); }
    var idLine = document.createElement("div"); idLine.textContent = ids[i]; tip.appendChild(idLine);
    if (names) {
      var c = document.createElement("div"); c.className = "muted";
      c.textContent = cat ? names[cat[i]] : names[slot[i]]; tip.appendChild(c);
    }
    if (!uri) { var no = document.createElement("div"); no.className = "muted";
      no.textContent = "(no thumbnail)"; tip.appendChild(no); }
    tip.style.display = "block";
    var left = mx + 14, top = my + 14;
    if (left + 270 > w) left = Math.max(0, mx - 280);
    if (top + tip.offsetHeight > h) top = Math.max(0, my - tip.offsetHeight - 10);
    tip.style.left = left + "px"; tip.style.top = top + "px";
  }
  var drag = null;
  function pos(ev) { var b = canvas.getBoundingClientRect(); return [ev.clientX - b.left, ev.clientY - b.top]; }
  canvas.addEventListener("pointerdown", function (ev) {
    var p = pos(ev); drag = { x: p[0], y: p[1], tx: tx, ty: ty };
    canvas.classList.add("dragging");
    try { canvas.setPointerCapture(ev.pointerId); } catch (err) { /* a synthetic pointer */ }
  });
  canvas.addEventListener("pointerup", function (ev) {
    var p = pos(ev), still = drag && Math.abs(p[0] - drag.x) + Math.abs(p[1] - drag.y) < 4;
    drag = null; canvas.classList.remove("dragging");
    if (still && link) {  // a click (not a drag) on a point opens its link in the whole window
      var i = nearest(p[0], p[1]);
      if (i >= 0) window.top.location.href = fill(link, i);
    }
    try { canvas.releasePointerCapture(ev.pointerId); } catch (err) { /* not captured */ }
  });
  canvas.addEventListener("pointermove", function (ev) {
    var p = pos(ev);
    if (drag) {
      tx = drag.tx + p[0] - drag.x; ty = drag.ty + p[1] - drag.y;
      tip.style.display = "none"; redraw(); return;
    }
    var i = nearest(p[0], p[1]);
    if (i !== hover) { hover = i; redraw(); }
    showTip(i, p[0], p[1]);
  });
  canvas.addEventListener("pointerleave", function () { hover = -1; tip.style.display = "none"; redraw(); });
  canvas.addEventListener("wheel", function (ev) {
    ev.preventDefault();
    var p = pos(ev), f = Math.exp(-ev.deltaY * (ev.deltaMode === 1 ? 0.05 : 0.0015));
    var next = Math.min(fitScale * 5000, Math.max(fitScale / 4, scale * f));
    var wx = (p[0] - tx) / scale, wy = (p[1] - ty) / scale;
    scale = next; tx = p[0] - wx * scale; ty = p[1] - wy * scale;
    redraw();
  }, { passive: false });
  canvas.addEventListener("dblclick", function () { fit(); redraw(); });
  document.getElementById("reset").addEventListener("click", function () { fit(); redraw(); });
  var entries = document.querySelectorAll("#legend .entry");
  for (var e = 0; e < entries.length; e++) {
    entries[e].addEventListener("click", function () {
      var s = Number(this.getAttribute("data-slot"));
      hidden[s] = hidden[s] ? 0 : 1; this.classList.toggle("off", !!hidden[s]); redraw();
    });
  }
  window.addEventListener("resize", function () { resize(); fit(); redraw(); });
  // for scripts and tests: the view (screen = (x * scale + tx, (1 - y) * scale + ty)) and the hit test
  window.phiclipMap = {
    view: function () { return { scale: scale, tx: tx, ty: ty, width: w, height: h, fitScale: fitScale }; },
    nearest: nearest,
    draw: draw,  // synchronous, for timing
    zoom: function (factor) { var cx = w / 2, cy = h / 2; tx = cx - (cx - tx) * factor; ty = cy - (cy - ty) * factor;
      scale *= factor; },
    firstDrawMs: null
  };
  resize(); fit(); draw();
  window.phiclipMap.firstDrawMs = performance.now();  // since the navigation started
})();
"""


def _categories(values: Sequence[str]) -> tuple[list[str], np.ndarray, list[int]]:
    """``(names, codes, counts)``: the distinct values, the largest first (ties by name), each item's code."""
    counts = Counter(values)
    names = sorted(counts, key=lambda v: (-counts[v], v))
    code_of = {v: c for c, v in enumerate(names)}
    codes = np.fromiter((code_of[v] for v in values), dtype=np.uint32, count=len(values))
    return names, codes, [counts[v] for v in names]


def _unit_square(coords: np.ndarray) -> np.ndarray:
    """``coords`` moved and scaled into [0, 1]², one scale for both axes (the shape is kept), centred."""
    lo = coords.min(axis=0)
    hi = coords.max(axis=0)
    span = float(np.max(hi - lo))
    if span <= 0:
        return np.full_like(coords, 0.5, dtype=np.float32)
    out = (coords - lo) / span
    out += (1.0 - (hi - lo) / span) / 2.0
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def map_page(
    coords: np.ndarray | Layout,
    ids: Sequence[str],
    *,
    method: str | None = None,
    sources: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
    clusters: ClusterResult | Sequence[int] | np.ndarray | None = None,
    colour_by: Literal["labels", "clusters"] | None = None,
    max_thumbnails: int = MAX_MAP_THUMBNAILS,
    thumb_px: int = MAP_THUMB_PX,
    seed: int = 0,
    title: str = "Collection map",
    thumbnail_url: str | None = None,
    item_link: str | None = None,
    item_link_hint: str = "click a point to open it",
) -> str:
    """An interactive scatter of 2-D coordinates on a ``<canvas>`` (pan: drag, zoom: wheel, reset: double
    click; hover: id, category and, for a sample, the thumbnail; click a legend entry to hide it).

    Args:
        coords: (n, 2) coordinates, or a :class:`~phiclip.collection.layout.Layout` (its description is
            the method stated on the page).
        ids: one id per point.
        method: how the coordinates were made, stated on the page; required for a plain array.
        sources: one source (image path) per point, for the hover thumbnails.
        labels: one label per point.
        clusters: a :class:`~phiclip.collection.cluster.ClusterResult` or one cluster number per point.
        colour_by: ``"labels"``, ``"clusters"`` or ``None`` (one colour). The 20 largest categories get
            their own colours, the rest share grey ("other").
        max_thumbnails: thumbnails embedded for at most this many points (a seeded sample of those with a
            readable source); the others show their id only.
        thumb_px: longest side of those thumbnails.
        seed: seed of the thumbnail sample.
        title: the page title.
        thumbnail_url: for a page served over HTTP (``phiclip serve``): a URL, relative to the page, of
            any point's thumbnail with ``{id}`` standing for the point's URL-encoded id. Points without an
            embedded thumbnail show that image on hover, and the page's Content-Security-Policy allows
            images from its own origin (``'self'``) besides ``data:``.
        item_link: a URL with ``{id}`` (as ``thumbnail_url``) that a click on a point (not a drag) opens
            in the whole window (the top frame when the page is framed); ``None``: clicks do nothing.
        item_link_hint: what the toolbar says a click does when ``item_link`` is given.

    Returns:
        The HTML page; every point's id and coordinates are embedded (as JSON and base64 float32).
    """
    if isinstance(coords, Layout):
        method = method or coords.description
        xy = np.asarray(coords.coords, dtype=np.float64)
    else:
        if not method:
            raise ValueError("say how the coordinates were made: method= (e.g. Layout.description)")
        xy = np.asarray(coords, dtype=np.float64)
    ids = [str(i) for i in ids]
    n = len(ids)
    if xy.ndim != 2 or xy.shape != (n, 2):
        raise ValueError(f"{n} ids but coordinates of shape {xy.shape}; give (n, 2)")
    if not np.isfinite(xy).all():
        raise ValueError("the coordinates contain NaN or infinite values")
    srcs = _aligned_sources(ids, sources)
    if colour_by not in (None, "labels", "clusters"):
        raise ValueError(f"colour_by={colour_by!r}: use 'labels', 'clusters' or None")

    values: list[str] | None = None
    legend_title = ""
    if colour_by == "labels":
        if labels is None:
            raise ValueError("colour_by='labels' needs labels=")
        if len(labels) != n:
            raise ValueError(f"{n} ids but {len(labels)} labels")
        values = [str(v) for v in labels]
        legend_title = "label"
    elif colour_by == "clusters":
        if clusters is None:
            raise ValueError("colour_by='clusters' needs clusters=")
        assign = clusters.assignment if isinstance(clusters, ClusterResult) else np.asarray(clusters)
        if len(assign) != n:
            raise ValueError(f"{n} ids but {len(assign)} cluster assignments")
        values = [f"cluster {int(c)}" for c in np.asarray(assign).tolist()]
        legend_title = "cluster"

    palette_n = len(MAP_PALETTE)
    if values is None:
        names: list[str] | None = None
        codes = None
        slots = np.zeros(n, dtype=np.uint8)
        colours = [SINGLE_COLOUR]
        legend = [("all items", SINGLE_COLOUR, n)]
    else:
        names, codes, counts = _categories(values)
        if len(names) <= palette_n:
            colours = list(MAP_PALETTE[: len(names)])
            legend = [(names[c], colours[c], counts[c]) for c in range(len(names))]
        else:
            colours = [*MAP_PALETTE[: palette_n - 1], OTHER_COLOUR]
            rest = len(names) - (palette_n - 1)
            legend = [(names[c], colours[c], counts[c]) for c in range(palette_n - 1)]
            legend.append((f"other ({rest} {legend_title}s)", OTHER_COLOUR, sum(counts[palette_n - 1 :])))
        slots = np.minimum(codes, len(colours) - 1).astype(np.uint8)

    # draw order: the largest category first, "other" before everything so the named ones sit on top
    if values is not None and len(colours) == palette_n and colours[-1] == OTHER_COLOUR:
        draw_slots = [palette_n - 1, *range(palette_n - 1)]
    else:
        draw_slots = list(range(len(colours)))
    remap = np.zeros(len(colours), dtype=np.uint8)
    remap[draw_slots] = np.arange(len(draw_slots), dtype=np.uint8)
    slots = remap[slots]
    colours = [colours[s] for s in draw_slots]
    legend_slot = {colours[k]: k for k in range(len(colours))}

    thumbs: dict[str, str] = {}
    if max_thumbnails > 0 and n:
        candidates = np.array([i for i in range(n) if srcs[i]], dtype=np.int64)
        if len(candidates):
            rng = np.random.default_rng(seed)
            take = min(max_thumbnails, len(candidates))
            sample = np.sort(rng.choice(candidates, size=take, replace=False))
            for i in sample.tolist():
                uri = thumbnail_uri(srcs[i], thumb_px)
                if uri is not None:
                    thumbs[str(i)] = uri

    unit = _unit_square(xy) if n else np.zeros((0, 2), np.float32)
    payload: dict[str, Any] = {
        "ids": ids,
        "xy": base64.b64encode(np.ascontiguousarray(unit, dtype="<f4").tobytes()).decode("ascii"),
        "slot": base64.b64encode(slots.astype(np.uint8).tobytes()).decode("ascii"),
        "colours": colours,
        "names": names,
        "thumbs": thumbs,
    }
    if codes is not None:
        payload["cat"] = base64.b64encode(codes.astype("<u4").tobytes()).decode("ascii")
    if thumbnail_url:
        payload["thumb_url"] = thumbnail_url
    if item_link:
        payload["link"] = item_link

    legend_html = "".join(
        f'<span class="entry" data-slot="{legend_slot[colour]}"><span class="sw" style="background:{colour}">'
        f'</span>{_esc(name)} <span class="muted">({_fmt_int(count)})</span></span>'
        for name, colour, count in legend
    )
    body = [
        f"<h1>{_esc(title)}</h1>",
        f'<p id="layout-method">Layout: {_esc(method)}. <span class="muted">{_fmt_int(n)} points'
        + (f", coloured by {legend_title}" if legend_title else "")
        + (
            "; hover a point for its thumbnail.</span></p>"
            if thumbnail_url
            else f"; thumbnails for {_fmt_int(len(thumbs))} of them (hover a point).</span></p>"
        ),
        f'<div id="legend" aria-label="legend">{legend_html}</div>',
        '<div id="toolbar"><button id="reset" type="button">Reset view</button> '
        '<span class="muted">drag to pan, wheel to zoom, double click to reset, click a legend entry to hide '
        f"it{', ' + _esc(item_link_hint) if item_link else ''}</span> · "
        '<span id="map-status" class="muted">drawing…</span></div>',
        f'<div id="map-wrap"><canvas id="map" data-points="{n}"></canvas><div id="tip"></div></div>',
        f'<script type="application/json" id="map-data">{_json_for_script(payload)}</script>',
        "<noscript><p>The map needs JavaScript.</p></noscript>",
    ]
    csp = _CSP.replace("img-src data:", "img-src data: 'self'") if thumbnail_url else _CSP
    return _page(title, "\n".join(body), head=_MAP_CSS, script=_MAP_JS, csp=csp)


def map_page_csp(*, frame_ancestors: str = "'none'") -> str:
    """A Content-Security-Policy for serving a :func:`map_page` over HTTP (as a response header): nothing
    outside the page but images from its own origin, and of scripts only the map's own (by its SHA-256,
    not ``'unsafe-inline'``); ``frame_ancestors`` says who may frame it (``"'self'"``: its own site)."""
    digest = base64.b64encode(hashlib.sha256(f"\n{_MAP_JS}\n".encode()).digest()).decode("ascii")
    return (
        "default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; "
        f"script-src 'sha256-{digest}'; base-uri 'none'; form-action 'none'; frame-ancestors {frame_ancestors}"
    )


def write_page(html_text: str, path: str | os.PathLike[str]) -> Path:
    """Write a page atomically (UTF-8), creating its folder; returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(p, html_text)
