"""SVG charts for the comparison page, drawn as text: bars, grouped bars, histograms, scatter plots.

Every chart is an ``<svg class="chart ..." id="...">`` with inline attributes only (no script, no
external style), so the page stays self-contained. A drawn bar carries ``data-key`` (its path in
``report.json``) and ``data-value`` (the exact number), as the numbers of the page do.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

# --- numbers -----------------------------------------------------------------------------------


def format_number(value: Any, *, kind: str = "auto") -> str:
    """How a number is shown (``–`` for missing). ``kind``: ``"count"`` (``1.23 M`` above a
    million, else with separators), ``"fraction"`` (three decimals) or ``"auto"``."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if kind == "count" or (kind == "auto" and isinstance(value, int)):
        v = int(value)
        if abs(v) >= 1_000_000_000:
            return f"{v / 1e9:.2f} B"
        if abs(v) >= 1_000_000:
            return f"{v / 1e6:.2f} M"
        return f"{v:,}"
    v = float(value)
    if kind == "fraction":
        return f"{v:.3f}"
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 100:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def esc(text: Any) -> str:
    """Text made safe for HTML and SVG (quotes too)."""
    return html.escape(str(text), quote=True)


# --- SVG helpers -----------------------------------------------------------------------------


def _nice_step(span: float, target: int) -> float:
    if span <= 0:
        return 1.0
    raw = span / max(target, 1)
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if m * mag >= raw:
            return m * mag
    return 10 * mag


def nice_ticks(lo: float, hi: float, target: int = 5, *, integer: bool = False) -> list[float]:
    """Round tick values covering [lo, hi] (about ``target`` of them; whole numbers with ``integer``)."""
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:
        hi = lo + 1.0
    step = _nice_step(hi - lo, target)
    if integer:
        step = max(1.0, float(math.ceil(step)))
    start = math.floor(lo / step + 1e-9) * step
    ticks = []
    t = start
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 10))
        t += step
    if ticks[-1] < hi - 1e-12:
        ticks.append(round(t, 10))
    return ticks


def _tick_label(t: float, step: float) -> str:
    """A tick value with as many decimals as the step needs (0.05 -> 2, 0.25 -> 2, 5 -> 0)."""
    decimals = next((d for d in range(6) if abs(round(step, d) - step) < 1e-9 * max(1.0, abs(step))), 6)
    if decimals == 0:
        return format_number(int(round(t)), kind="count")
    return f"{t:.{decimals}f}"


def _svg_open(chart_id: str, cls: str, width: int, height: int, label: str) -> str:
    return (
        f'<svg id="{esc(chart_id)}" class="chart {cls}" role="img" aria-label="{esc(label)}" '
        f'viewBox="0 0 {width} {height}" width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">'
    )


def bar_chart(
    chart_id: str, title: str, rows: Sequence[tuple[str, Any, str, str]], *, unit: str = "", kind: str = "auto"
) -> str:
    """Horizontal bars, one per model: ``rows`` are (label, value or None, colour, report key)."""
    width, left, right, bar_h, gap, top = 340, 78, 86, 20, 8, 8
    height = top + len(rows) * (bar_h + gap) + 4
    values = [float(v) for _, v, _, _ in rows if v is not None]
    vmax = max(values) if values and max(values) > 0 else 1.0
    span = width - left - right
    parts = [_svg_open(chart_id, "bar-chart", width, height, title)]
    for i, (label, value, colour, key) in enumerate(rows):
        y = top + i * (bar_h + gap)
        parts.append(
            f'<text class="axis-label" x="{left - 6}" y="{y + bar_h * 0.7:.1f}" text-anchor="end">{esc(label)}</text>'
        )
        if value is None:
            parts.append(f'<text class="value missing" x="{left + 4}" y="{y + bar_h * 0.7:.1f}">n/a</text>')
            continue
        w = max(1.0, span * float(value) / vmax) if float(value) > 0 else 0.0
        parts.append(
            f'<rect class="bar" data-key="{esc(key)}" data-value="{value!r}" x="{left}" y="{y}" '
            f'width="{w:.1f}" height="{bar_h}" rx="3" fill="{colour}"><title>{esc(label)}: '
            f"{esc(format_number(value, kind=kind))} {esc(unit)}</title></rect>"
        )
        shown = format_number(value, kind=kind) + (f" {unit}" if unit else "")
        parts.append(f'<text class="value" x="{left + w + 5:.1f}" y="{y + bar_h * 0.7:.1f}">{esc(shown)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def grouped_bar_chart(
    chart_id: str,
    title: str,
    groups: Sequence[tuple[str, Sequence[tuple[str, Any, str, str]]]],
    *,
    vmax: float = 1.0,
) -> str:
    """Vertical bars grouped by metric: ``groups`` are (metric title, [(model key, value, colour, report key)])."""
    n_series = max((len(s) for _, s in groups), default=1)
    bar_w, inner_gap, group_gap = 18, 3, 26
    group_w = n_series * (bar_w + inner_gap) - inner_gap
    left, top, plot_h, bottom = 40, 12, 180, 64
    width = max(320, left + len(groups) * (group_w + group_gap) + 10)
    height = top + plot_h + bottom
    parts = [_svg_open(chart_id, "grouped-bar-chart", width, height, title)]
    for t in nice_ticks(0.0, vmax, 4):
        y = top + plot_h - plot_h * t / vmax
        parts.append(f'<line class="grid" x1="{left}" x2="{width - 6}" y1="{y:.1f}" y2="{y:.1f}"/>')
        parts.append(f'<text class="tick" x="{left - 5}" y="{y + 4:.1f}" text-anchor="end">{t:g}</text>')
    for gi, (gtitle, series) in enumerate(groups):
        x0 = left + 12 + gi * (group_w + group_gap)
        for si, (skey, value, colour, key) in enumerate(series):
            x = x0 + si * (bar_w + inner_gap)
            if value is None:
                parts.append(f'<text class="tick missing" x="{x + bar_w / 2:.1f}" y="{top + plot_h - 4}" text-anchor="middle">–</text>')
                continue
            h = plot_h * min(float(value), vmax) / vmax
            parts.append(
                f'<rect class="bar" data-key="{esc(key)}" data-value="{value!r}" x="{x}" y="{top + plot_h - h:.1f}" '
                f'width="{bar_w}" height="{max(h, 0.0):.1f}" fill="{colour}"><title>{esc(skey)} · {esc(gtitle)}: '
                f"{esc(format_number(value, kind='fraction'))}</title></rect>"
            )
        cx = x0 + group_w / 2
        words = gtitle.split(" ")
        lines = [" ".join(words[: len(words) // 2 or 1]), " ".join(words[len(words) // 2 or 1 :])]
        for li, line in enumerate(x for x in lines if x):
            parts.append(
                f'<text class="axis-label small" x="{cx:.1f}" y="{top + plot_h + 16 + li * 13}" text-anchor="middle">{esc(line)}</text>'
            )
    parts.append(f'<line class="axis" x1="{left}" x2="{width - 6}" y1="{top + plot_h}" y2="{top + plot_h}"/>')
    parts.append("</svg>")
    return "".join(parts)


def histogram_chart(
    chart_id: str,
    title: str,
    edges: Sequence[float],
    series: Sequence[tuple[str, Sequence[int], str]],
    *,
    xlabel: str,
    density: bool = True,
    markers: Sequence[tuple[str, float, str]] = (),
) -> str:
    """Overlaid histograms on shared bins: ``series`` are (name, counts, colour); with ``density``
    each is scaled to fractions of its own total so different-size groups compare. ``markers``
    draw labelled vertical lines (name, x, colour)."""
    width, height, left, right, top, bottom = 360, 210, 44, 20, 26, 38
    pw, ph = width - left - right, height - top - bottom
    lo, hi = float(edges[0]), float(edges[-1])
    scaled = []
    for name, counts, colour in series:
        total = sum(counts)
        vals = [c / total if density and total else float(c) for c in counts]
        scaled.append((name, counts, vals, colour))
    ymax = max((max(v) for _, _, v, _ in scaled if v), default=1.0) or 1.0
    parts = [_svg_open(chart_id, "histogram", width, height, title)]

    def sx(x: float) -> float:
        return left + pw * (x - lo) / (hi - lo if hi > lo else 1.0)

    yticks = nice_ticks(0.0, ymax, 3, integer=not density)
    ytop = yticks[-1] if yticks[-1] > 0 else 1.0
    for t in yticks:
        y = top + ph - ph * t / ytop
        parts.append(f'<line class="grid" x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}"/>')
        parts.append(f'<text class="tick" x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{_tick_label(t, yticks[1] - yticks[0] if len(yticks) > 1 else 1)}</text>')
    for name, counts, vals, colour in scaled:
        for i, v in enumerate(vals):
            if counts[i] == 0:
                continue
            x0, x1 = sx(float(edges[i])), sx(float(edges[i + 1]))
            h = ph * v / ytop
            parts.append(
                f'<rect class="hist-bar" data-series="{esc(name)}" data-count="{int(counts[i])}" x="{x0:.2f}" '
                f'y="{top + ph - h:.2f}" width="{max(x1 - x0 - 0.5, 0.5):.2f}" height="{h:.2f}" fill="{colour}" '
                f'fill-opacity="0.55"><title>{esc(name)}: {int(counts[i])} in [{edges[i]:.3f}, {edges[i + 1]:.3f})</title></rect>'
            )
    for name, x, colour in markers:
        if lo <= x <= hi:
            parts.append(
                f'<line class="marker" x1="{sx(x):.1f}" x2="{sx(x):.1f}" y1="{top}" y2="{top + ph}" stroke="{colour}" '
                f'stroke-dasharray="4 3"><title>{esc(name)}: {x:.3f}</title></line>'
            )
    xticks = [t for t in nice_ticks(lo, hi, 5) if lo - 1e-9 <= t <= hi + 1e-9]
    xstep = (xticks[1] - xticks[0]) if len(xticks) > 1 else 1.0
    for t in xticks:
        parts.append(f'<text class="tick" x="{sx(t):.1f}" y="{top + ph + 14}" text-anchor="middle">{_tick_label(t, xstep)}</text>')
    parts.append(f'<line class="axis" x1="{left}" x2="{left + pw}" y1="{top + ph}" y2="{top + ph}"/>')
    parts.append(f'<text class="axis-label small" x="{left + pw / 2:.1f}" y="{height - 4}" text-anchor="middle">{esc(xlabel)}</text>')
    lx = left
    for name, _, _, colour in scaled:
        parts.append(f'<rect class="legend-swatch" x="{lx}" y="6" width="10" height="10" fill="{colour}" fill-opacity="0.7"/>')
        parts.append(f'<text class="legend-text" x="{lx + 14}" y="15">{esc(name)}</text>')
        lx += 22 + 7 * len(name)
    parts.append("</svg>")
    return "".join(parts)


def scatter_chart(
    chart_id: str,
    title: str,
    points: Sequence[Sequence[float]],
    point_labels: Sequence[str | None],
    point_titles: Sequence[str],
    colours: dict[str, str],
) -> str:
    """Points coloured by label (``colours`` maps label -> colour; ``None`` labels are grey)."""
    size, pad = 340, 14
    xs = [float(p[0]) for p in points]
    ys = [float(p[1]) for p in points]
    cx, cy = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2
    half = max(max(xs) - min(xs), max(ys) - min(ys)) / 2 or 1.0
    scale = (size / 2 - pad) / half
    radius = 4.0 if len(points) <= 300 else 2.5 if len(points) <= 1000 else 1.8
    parts = [_svg_open(chart_id, "scatter", size, size, title)]
    parts.append(f'<rect class="frame" x="0.5" y="0.5" width="{size - 1}" height="{size - 1}" rx="6"/>')
    for x, y, lab, tip in zip(xs, ys, point_labels, point_titles):
        px = size / 2 + (x - cx) * scale
        py = size / 2 - (y - cy) * scale  # SVG y grows downwards
        colour = colours.get(lab, "#888888") if lab is not None else "#888888"
        parts.append(
            f'<circle class="pt" data-label="{esc(lab if lab is not None else "")}" cx="{px:.1f}" cy="{py:.1f}" '
            f'r="{radius}" fill="{colour}" fill-opacity="0.8"><title>{esc(tip)}</title></circle>'
        )
    parts.append("</svg>")
    return "".join(parts)


__all__ = ["bar_chart", "esc", "format_number", "grouped_bar_chart", "histogram_chart", "nice_ticks", "scatter_chart"]
