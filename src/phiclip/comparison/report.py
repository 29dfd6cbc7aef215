"""Render a comparison: ``report.json``, a self-contained ``report.html`` and terminal tables.

The HTML needs no network: the charts are inline SVG (drawn by :mod:`phiclip.comparison.charts`;
this module lays out the page sections around them), the styles are inline, the
thumbnails are ``data:`` URIs, and there is no script. Everything is rendered from the report's
dict (what ``report.json`` holds), so a saved report can be rendered again.

Each number shown in the page is a ``<span class="num" data-key="models.0.cost.images_per_s"
data-value="...">`` whose key is its path in ``report.json`` and whose value is the exact number;
each drawn bar carries the same attributes. Charts are ``<svg class="chart ...">`` with stable ids:
``chart-cost-<metric>``, ``chart-quality``, ``chart-similarity-<key>``, ``chart-overlap-<a>-<b>``,
``chart-projection-<key>``; the neighbour grid is ``table#neighbour-grid``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from phiclip.comparison.charts import (
    bar_chart,
    esc,
    format_number,
    grouped_bar_chart,
    histogram_chart,
    scatter_chart,
)
from phiclip.comparison.results import MIN_TIMED_SECONDS, CompareReport, speeds_differ, write_text_atomic
from phiclip.console import safe_text

#: Colours of the models (A, B, ...) and of the labels in the projections.
MODEL_COLOURS = ("#3465c8", "#e07a1f", "#2b9a6b", "#b24a98", "#6b5ccc", "#c23b3b")
LABEL_COLOURS = (
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
    "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#7f7f7f",
)  # fmt: skip
#: Class names that are colour names are drawn in that colour (the sample data's classes are).
NAMED_COLOURS = {
    "red": "#d63a3a", "green": "#2f9e4f", "blue": "#3b62d6", "yellow": "#e0b81f", "orange": "#ec8a24",
    "purple": "#8e4fc2", "pink": "#e86fa8", "brown": "#8a5a36", "black": "#222222", "grey": "#8c8c8c",
    "gray": "#8c8c8c", "cyan": "#21a8b8", "magenta": "#c2309e",
}  # fmt: skip

#: (metric, title, unit, higher is better) of the cost charts, in order.
COST_METRICS: tuple[tuple[str, str, str, bool], ...] = (
    ("images_per_s", "Throughput", "images/s", True),
    ("crops_per_s", "Crop throughput", "crops/s", True),
    ("end_to_end_images_per_s", "End to end (with decoding)", "images/s", True),
    ("load_s", "Load time", "s", False),
    ("peak_rss_mb", "Peak memory (RSS)", "MiB", False),
    ("gpu_peak_mb", "Peak GPU memory", "MiB", False),
    ("parameters", "Parameters", "", False),
    ("dim", "Embedding dimension", "", False),
)
#: How many images left out the terminal names (the page names 50, report.json all).
LEFT_OUT_SHOWN = 10
#: Quality metrics in display order, with their titles.
QUALITY_TITLES: dict[str, str] = {
    "knn_accuracy": "kNN accuracy",
    "linear_probe_accuracy": "Linear probe accuracy",
    "zero_shot_top1": "Zero-shot top-1",
    "zero_shot_top5": "Zero-shot top-5",
    "text_to_image_recall@1": "Text→image R@1",
    "text_to_image_recall@5": "Text→image R@5",
    "text_to_image_recall@10": "Text→image R@10",
    "image_to_text_recall@1": "Image→text R@1",
    "image_to_text_recall@5": "Image→text R@5",
    "image_to_text_recall@10": "Image→text R@10",
    "clustering_v_measure": "k-means V-measure",
}
#: The alignment scores of a pair (``phiclip align``), in the order shown.
ALIGNMENT_TITLES: dict[str, str] = {
    "mutual_knn": "Mutual k-NN",
    "cknna": "CKNNA",
    "cknna_biased": "CKNNA (biased)",
    "cka": "CKA",
    "cka_unbiased": "CKA (unbiased)",
}


def _num(value: Any, key: str, *, kind: str = "auto", unit: str = "") -> str:
    """A number in the page, tagged with its report.json path and exact value."""
    if value is None:
        return f'<span class="num missing" data-key="{esc(key)}" data-value="null">–</span>'
    shown = format_number(value, kind=kind) + (f" {unit}" if unit else "")
    return f'<span class="num" data-key="{esc(key)}" data-value="{value!r}">{esc(shown)}</span>'


# --- the page ------------------------------------------------------------------------------------


def label_colours(classnames: Sequence[str]) -> dict[str, str]:
    """A colour per class: colour names in their colour when every class is one, else a palette."""
    lower = [c.lower() for c in classnames]
    if classnames and all(c in NAMED_COLOURS for c in lower) and len({NAMED_COLOURS[c] for c in lower}) == len(lower):
        return {c: NAMED_COLOURS[c.lower()] for c in classnames}
    return {c: LABEL_COLOURS[i % len(LABEL_COLOURS)] for i, c in enumerate(classnames)}


def _speed_words(a: dict[str, Any], b: dict[str, Any]) -> str:
    """How A's speed compares to B's, said only as far as the timed passes support it."""
    ca, cb = a["cost"], b["cost"]
    if ca.get("encode_s") is None or cb.get("encode_s") is None:
        return ""
    if min(ca["encode_s"], cb["encode_s"]) < MIN_TIMED_SECONDS:
        return "Their speeds cannot be compared: the timed section is too short (see the warning)."
    if not speeds_differ(ca, cb):
        return "A and B run at about the same speed (within the spread of their timed passes)."
    r = ca["images_per_s"] / cb["images_per_s"]
    return f"A is {r:.1f}× faster than B." if r > 1 else f"A is {1 / r:.1f}× slower than B."


def speed_text(cost: dict[str, Any]) -> str:
    """``12.3 images/s`` with the range over the timed passes: ``12.3 images/s (11.9–12.6 over 3 passes)``."""
    text = f"{format_number(cost['images_per_s'])} images/s"
    lo, hi, n = cost.get("images_per_s_min"), cost.get("images_per_s_max"), cost.get("passes", 1)
    if n > 1 and lo is not None and hi is not None:
        text += f" ({format_number(lo)}–{format_number(hi)} over {n} passes)"
    return text


def summary_sentence(report: dict[str, Any]) -> str:
    """One or two plain sentences with the headline numbers (text, no markup)."""
    models = report["models"]
    data = report["data"]
    classes = f" in {len(data['classnames'])} classes" if data["has_labels"] and data["classnames"] else ""
    lead = f"{len(models)} encoders compared on {data['images']} images{classes}."
    if data.get("skipped"):
        lead += f" {len(data['skipped'])} image(s) left out (listed below)."
    speeds = "; ".join(f"{m['key']} ({m['name']}) {speed_text(m['cost'])}" for m in models)
    parts = [lead, f"Throughput: {speeds}."]
    if len(models) >= 2:
        a, b = models[0], models[1]
        parts += [w for w in [_speed_words(a, b)] if w]
        for metric in ("knn_accuracy", "zero_shot_top1", "text_to_image_recall@1"):
            va, vb = a["quality"]["metrics"].get(metric), b["quality"]["metrics"].get(metric)
            if va is not None and vb is not None:
                parts.append(
                    f"{QUALITY_TITLES[metric]}: A {format_number(va, kind='fraction')}, B {format_number(vb, kind='fraction')}."
                )
                break
    for p in report["pairs"][:1]:
        ka, kb = models[p["a"]]["key"], models[p["b"]]["key"]
        parts.append(
            f"{ka} and {kb} share {format_number(p['knn_overlap_mean'], kind='fraction')} of each image's "
            f"{p['k']} nearest neighbours (chance {format_number(p['knn_overlap_chance'], kind='fraction')}); "
            f"linear CKA {format_number(p['linear_cka'], kind='fraction')}."
        )
    return " ".join(parts)


_CSS = """
:root { --ink:#1f2430; --muted:#5d6575; --line:#dfe3ea; --bg:#f6f7fa; --card:#fff; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
  font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, "Liberation Sans", sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 28px 24px 60px; }
h1 { font-size: 26px; margin: 0 0 4px; } h2 { font-size: 20px; margin: 0 0 10px; }
h3 { font-size: 15px; margin: 0 0 6px; }
.subtitle { color: var(--muted); margin: 0 0 14px; }
.summary { font-size: 16px; background: var(--card); border-left: 4px solid #3465c8; padding: 12px 16px; border-radius: 6px; }
section { background: var(--card); border: 1px solid var(--line); border-radius: 10px; padding: 18px 20px; margin: 18px 0; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(350px, 1fr)); gap: 16px 22px; }
figure { margin: 0; } figcaption { color: var(--muted); font-size: 13px; margin-top: 4px; }
table { border-collapse: collapse; font-size: 14px; }
th, td { text-align: left; padding: 5px 10px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { color: var(--muted); font-weight: 600; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
.key { display:inline-block; min-width: 22px; text-align:center; color:#fff; border-radius: 4px; font-weight: 700; padding: 0 5px; }
.spec { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12.5px; word-break: break-all; }
.note { color: var(--muted); font-size: 13px; }
.headline { font-size: 30px; font-weight: 700; }
.stat { display:inline-block; margin-right: 30px; }
svg.chart { display: block; max-width: 100%; height: auto; }
svg.chart text { font-size: 11.5px; fill: var(--ink); }
svg.chart .tick, svg.chart .small { font-size: 10.5px; fill: var(--muted); }
svg.chart .grid { stroke: #eceff4; } svg.chart .axis { stroke: #9aa3b2; }
svg.chart .frame { fill: #fbfbfd; stroke: var(--line); }
.legend { display:flex; flex-wrap: wrap; gap: 4px 14px; font-size: 13px; margin: 6px 0 0; }
.legend span.sw { display:inline-block; width: 11px; height: 11px; border-radius: 50%; margin-right: 5px; vertical-align: -1px; }
#neighbour-grid td { padding: 8px 8px; }
.strip { display: flex; flex-wrap: nowrap; gap: 6px; }  /* one row of neighbours per model */
#neighbour-grid { width: 100%; }
.thumb { margin: 0; text-align: center; font-size: 11px; color: var(--muted); width: 72px; }
.thumb img { width: 68px; height: 68px; object-fit: contain; background: #f0f1f4; border-radius: 4px; border: 3px solid transparent; display:block; }
.thumb.query img { border-color: #1f2430; }
#neighbour-grid.many .thumb { width: 62px; } #neighbour-grid.many .thumb img { width: 58px; height: 58px; }
.thumb.same img { border-color: #2b9a6b; } .thumb.other img { border-color: #d0d4dc; }
.thumb .shared { color: #1f2430; font-weight: 700; }
.thumb figcaption { display: flex; justify-content: center; margin-top: 2px; font-size: 11px; }
.thumb .lbl { display: block; min-width: 0; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.warnings { background: #fff8e5; border-left: 4px solid #e0a800; padding: 10px 16px; border-radius: 6px; }
footer { color: var(--muted); font-size: 12.5px; margin-top: 20px; }
"""


def _model_chip(m: dict[str, Any], i: int) -> str:
    return f'<span class="key" style="background:{MODEL_COLOURS[i % len(MODEL_COLOURS)]}">{esc(m["key"])}</span>'


def _models_section(report: dict[str, Any]) -> str:
    rows = []
    for i, m in enumerate(report["models"]):
        c = m["cost"]
        d = m["description"]
        extra = ", ".join(f"{k}={d[k]}" for k in ("pooling", "normalize") if k in d)
        rows.append(
            "<tr>"
            f"<td>{_model_chip(m, i)}</td><td>{esc(m['name'])}<div class='spec'>{esc(m['spec'])}</div></td>"
            f"<td class='n'>{_num(c['dim'], f'models.{i}.cost.dim')}</td>"
            f"<td class='n'>{_num(c['parameters'], f'models.{i}.cost.parameters', kind='count')}</td>"
            f"<td>{esc(c['device'])} / {esc(c['dtype'])}</td><td class='note'>{esc(extra)}</td>"
            "</tr>"
        )
    return (
        '<section id="models"><h2>Encoders</h2><table class="models"><tr><th></th><th>Model</th>'
        "<th class='n'>Dim</th><th class='n'>Parameters</th><th>Device / dtype</th><th>Options</th></tr>"
        + "".join(rows)
        + "</table></section>"
    )


def _cost_section(report: dict[str, Any]) -> str:
    models = report["models"]
    figures = []
    for metric, title, unit, higher in COST_METRICS:
        values = [m["cost"].get(metric) for m in models]
        if all(v is None for v in values):
            continue
        kind = "count" if metric == "parameters" else "auto"
        rows = [
            (f"{m['key']}", m["cost"].get(metric), MODEL_COLOURS[i % len(MODEL_COLOURS)], f"models.{i}.cost.{metric}")
            for i, m in enumerate(models)
        ]
        better = "higher is better" if higher else "lower is better"
        if metric in ("parameters", "dim"):
            better = "size of the model / of its vectors"
        figures.append(
            f'<figure class="cost-figure" id="figure-cost-{metric}"><h3>{esc(title)}'
            f'{" (" + esc(unit) + ")" if unit else ""}</h3>'
            + bar_chart(f"chart-cost-{metric}", title, rows, unit=unit, kind=kind)
            + f"<figcaption>{esc(better)}</figcaption></figure>"
        )
    # The numbers behind the charts, with the timings they derive from.
    fields = [
        ("import_s", "Code import (before loading)", "s"), ("load_s", "Load time", "s"), ("preprocess_s", "Decode + preprocess", "s"), ("encode_s", "Model time", "s"),
        ("images_per_s", "Images/s (median pass)", ""), ("images_per_s_min", "Images/s, slowest pass", ""),
        ("images_per_s_max", "Images/s, fastest pass", ""), ("passes", "Timed passes", ""),
        ("crops", "Crops", ""), ("crops_per_s", "Crops/s", ""),
        ("end_to_end_images_per_s", "Images/s end to end", ""), ("text_encode_s", "Text encoding", "s"),
        ("baseline_rss_mb", "RSS before loading", "MiB"), ("peak_rss_mb", "Peak RSS", "MiB"),
        ("gpu_peak_mb", "Peak GPU memory", "MiB"), ("batch_size", "Batch size", ""),
    ]  # fmt: skip
    head = "".join(f"<th class='n'>{_model_chip(m, i)}</th>" for i, m in enumerate(models))
    body = []
    for key, title, unit in fields:
        if all(m["cost"].get(key) is None for m in models):
            continue
        cells = "".join(
            f"<td class='n'>{_num(m['cost'].get(key), f'models.{i}.cost.{key}', unit=unit)}</td>" for i, m in enumerate(models)
        )
        body.append(f"<tr><th>{esc(title)}</th>{cells}</tr>")
    scopes = {m["cost"]["memory_scope"] for m in models}
    mem_note = (
        "Each encoder ran in its own process, so its peak RSS is its own (it includes Python, torch and "
        "transformers: compare with the RSS before loading)."
        if scopes == {"subprocess"}
        else "Encoders ran in one process: peak RSS after the first can be blurred by memory the earlier one freed."
    )
    return (
        '<section id="cost"><h2>Cost</h2>'
        '<p class="note">Throughput is model time only (batching and forward passes after one untimed warm-up batch), '
        "the median of the timed passes over every image, with the slowest and fastest pass in the table; "
        "end to end adds decoding and preprocessing. A crop is one tower pass: Phi-3-vision runs several per image "
        f"(its HD transform), CLIP one. {esc(mem_note)}</p>"
        f'<div class="grid">{"".join(figures)}</div>'
        f'<h3 style="margin-top:16px">All timings</h3><table id="cost-table"><tr><th></th>{head}</tr>{"".join(body)}</table>'
        + _tokens_table(report)
        + "</section>"
    )


def _tokens_table(report: dict[str, Any]) -> str:
    models = report["models"]
    sizes: dict[tuple[int, int], dict[int, dict[str, Any]]] = {}
    for i, m in enumerate(models):
        for j, t in enumerate(m["cost"]["tokens_by_size"]):
            sizes.setdefault((t["width"], t["height"]), {})[i] = {**t, "_j": j}
    if not sizes:
        return ""
    head = "".join(f"<th class='n'>{_model_chip(m, i)} crops</th><th class='n'>{_model_chip(m, i)} tokens</th>" for i, m in enumerate(models))
    rows = []
    for (w, h), per in sorted(sizes.items(), key=lambda kv: (kv[0][0] * kv[0][1], kv[0])):
        count = next(iter(per.values()))["images"]
        cells = []
        for i in range(len(models)):
            t = per.get(i)
            if t is None:
                cells.append("<td class='n'>–</td><td class='n'>–</td>")
                continue
            base = f"models.{i}.cost.tokens_by_size.{t['_j']}"
            cells.append(f"<td class='n'>{_num(t['crops'], base + '.crops')}</td><td class='n'>{_num(t['tokens'], base + '.tokens')}</td>")
        rows.append(f"<tr><td>{w}×{h}</td><td class='n'>{count}</td>{''.join(cells)}</tr>")
    return (
        '<h3 style="margin-top:16px">Crops and image tokens by image size</h3>'
        '<p class="note">Tokens are the image tokens a Phi-3-vision language model would read for an image of that size '
        "(– where the encoder has no such notion).</p>"
        f'<table id="tokens-table"><tr><th>Size (w×h)</th><th class="n">Images</th>{head}</tr>{"".join(rows)}</table>'
    )


def _quality_section(report: dict[str, Any]) -> str:
    models = report["models"]
    names = [name for name in QUALITY_TITLES if any(name in m["quality"]["metrics"] for m in models)]
    names += sorted({n for m in models for n in m["quality"]["metrics"]} - set(names))
    skipped = {}
    for m in models:
        for metric, reason in m["quality"]["skipped"].items():
            skipped.setdefault(metric, []).append(f"{m['key']}: {reason}")
    notes = "".join(f"<li><b>{esc(metric.replace('_', ' '))}</b> skipped: {esc('; '.join(r))}</li>" for metric, r in skipped.items())
    split_note = (
        "Each number comes from the protocol of `phiclip eval` named below (the same code, so the same data and "
        "options give the same number there), with its split and n."
    )
    protocols: dict[str, dict[str, Any]] = {}
    for m in models:
        for metric, rec in (m["quality"].get("protocols") or {}).items():
            protocols.setdefault(rec["description"] + "|" + rec["split"] + "|" + json.dumps(rec["n"], sort_keys=True),
                                 {**rec, "metrics": []})
            entry = protocols[rec["description"] + "|" + rec["split"] + "|" + json.dumps(rec["n"], sort_keys=True)]
            title = QUALITY_TITLES.get(metric, metric)
            if title not in entry["metrics"]:
                entry["metrics"].append(title)
    protocol_items = "".join(
        f"<li data-protocol=\"{esc(rec['name'])}\"><b>{esc(', '.join(rec['metrics']))}</b>: {esc(rec['description'])}; "
        f"split: {esc(rec['split'])}; n: {esc(', '.join(f'{k} {v}' for k, v in rec['n'].items()))}</li>"
        for rec in protocols.values()
    )
    protocol_list = f'<ul class="note" id="quality-protocols">{protocol_items}</ul>' if protocol_items else ""
    if not names:
        return (
            '<section id="quality"><h2>Quality</h2><p class="note">No quality metric could be computed.</p>'
            f"<ul class='note'>{notes}</ul></section>"
        )
    groups = [
        (
            QUALITY_TITLES.get(name, name),
            [
                (m["key"], m["quality"]["metrics"].get(name), MODEL_COLOURS[i % len(MODEL_COLOURS)], f"models.{i}.quality.metrics.{name}")
                for i, m in enumerate(models)
            ],
        )
        for name in names
    ]
    head = "".join(f"<th class='n'>{_model_chip(m, i)}</th>" for i, m in enumerate(models))
    rows = "".join(
        f"<tr><th>{esc(QUALITY_TITLES.get(name, name))}</th>"
        + "".join(
            f"<td class='n'>{_num(m['quality']['metrics'].get(name), f'models.{i}.quality.metrics.{name}', kind='fraction')}</td>"
            for i, m in enumerate(models)
        )
        + "</tr>"
        for name in names
    )
    legend = "".join(
        f'<span><span class="sw" style="background:{MODEL_COLOURS[i % len(MODEL_COLOURS)]}"></span>{esc(m["key"])} {esc(m["name"])}</span>'
        for i, m in enumerate(models)
    )
    return (
        '<section id="quality"><h2>Quality</h2>'
        f'<p class="note">{esc(split_note)}</p>'
        f'<figure id="figure-quality">{grouped_bar_chart("chart-quality", "Quality metrics", groups)}'
        f'<div class="legend">{legend}</div><figcaption>Fractions in [0, 1]; higher is better.</figcaption></figure>'
        f'<table id="quality-table" style="margin-top:12px"><tr><th></th>{head}</tr>{rows}</table>'
        + protocol_list
        + (f"<ul class='note'>{notes}</ul>" if notes else "")
        + "</section>"
    )


def _structure_section(report: dict[str, Any]) -> str:
    models = report["models"]
    pair_blocks = []
    for pi, p in enumerate(report["pairs"]):
        ma, mb = models[p["a"]], models[p["b"]]
        k = p["k"]
        counts = p["knn_overlap_counts"]
        edges = [c - 0.5 for c in range(k + 2)]
        edges = [e / k for e in edges]  # shared fraction per image, centred bins
        chart = histogram_chart(
            f"chart-overlap-{p['a']}-{p['b']}",
            f"k-NN overlap {ma['key']} vs {mb['key']}",
            edges,
            [(f"images ({ma['key']} vs {mb['key']})", counts, "#5a6b8c")],
            xlabel=f"fraction of the {k} nearest neighbours shared",
            density=False,
            markers=[("mean", p["knn_overlap_mean"], "#1f2430"), ("chance", p["knn_overlap_chance"], "#c23b3b")],
        )
        pair_blocks.append(
            f'<div class="pair" id="pair-{p["a"]}-{p["b"]}"><h3>{_model_chip(ma, p["a"])} vs {_model_chip(mb, p["b"])}</h3>'
            f'<div class="stat"><div class="note">Linear CKA</div><div class="headline">{_num(p["linear_cka"], f"pairs.{pi}.linear_cka", kind="fraction")}</div></div>'
            f'<div class="stat"><div class="note">k-NN overlap (k={k})</div><div class="headline">{_num(p["knn_overlap_mean"], f"pairs.{pi}.knn_overlap_mean", kind="fraction")}</div></div>'
            f'<div class="stat"><div class="note">Chance overlap</div><div class="headline">{_num(p["knn_overlap_chance"], f"pairs.{pi}.knn_overlap_chance", kind="fraction")}</div></div>'
            + _alignment_table(p, pi)
            +             f"<figure>{chart}<figcaption>How many images share how much of their {k} nearest neighbours in the two spaces "
            "(dashed: the mean, and the overlap two unrelated spaces would give).</figcaption></figure></div>"
        )
    sims = []
    for i, m in enumerate(models):
        s = m["similarity"]
        if s["same"] is not None:
            series = [("same label", s["same"], "#2b9a6b"), ("different label", s["different"], "#d1603d")]
            markers = [("same-label mean", s["same_mean"], "#2b9a6b"), ("different-label mean", s["different_mean"], "#d1603d")]
        else:
            series = [("all pairs", s["all"], MODEL_COLOURS[i % len(MODEL_COLOURS)])]
            markers = [("mean", s["mean"], "#1f2430")]
        markers = [mk for mk in markers if mk[1] is not None]
        chart = histogram_chart(
            f"chart-similarity-{m['key']}", f"Pairwise similarities, {m['key']}", s["edges"], series,
            xlabel="cosine similarity of a pair of images", markers=markers,
        )  # fmt: skip
        stats = f"mean {_num(s['mean'], f'models.{i}.similarity.mean', kind='fraction')}, std {_num(s['std'], f'models.{i}.similarity.std', kind='fraction')}"
        if s["same_mean"] is not None and s["different_mean"] is not None:
            stats += (
                f"; same label {_num(s['same_mean'], f'models.{i}.similarity.same_mean', kind='fraction')}, "
                f"different label {_num(s['different_mean'], f'models.{i}.similarity.different_mean', kind='fraction')}"
            )
        sims.append(
            f'<figure id="figure-similarity-{esc(m["key"])}"><h3>{_model_chip(m, i)} {esc(m["name"])}</h3>{chart}'
            f"<figcaption>Cosine similarity of every pair of images ({stats}). Well separated same-label and "
            "different-label pairs mean the classes form clusters.</figcaption></figure>"
        )
    return (
        '<section id="structure"><h2>Structure</h2>'
        '<p class="note">Do the spaces agree on which images are alike? k-NN overlap: the fraction of each image\'s '
        "k nearest neighbours (cosine) found in both spaces. Linear CKA: a similarity of the two representations in [0, 1], "
        "unchanged by rotations and uniform scaling.</p>"
        + f'<div class="grid pairs">{"".join(pair_blocks)}</div>'
        + f'<h3 style="margin-top:18px">Similarity distributions</h3><div class="grid">{"".join(sims)}</div></section>'
    )


def _alignment_table(p: dict[str, Any], pi: int) -> str:
    """The alignment scores of pair ``pi`` (``phiclip align``'s), a row each."""
    scores = p.get("alignment") or {}
    if not scores:
        return ""
    rows = "".join(
        f"<tr><th>{esc(title)}</th><td class='n'>{_num(scores.get(key), f'pairs.{pi}.alignment.{key}', kind='fraction')}</td></tr>"
        for key, title in ALIGNMENT_TITLES.items()
        if key in scores
    )
    why = "".join(f"<li>{esc(k)}: {esc(v)}</li>" for k, v in (p.get("alignment_skipped") or {}).items())
    return (
        f'<table class="alignment" id="alignment-{p["a"]}-{p["b"]}"><tr><th colspan="2">Alignment (k={p["k"]}, '
        f"L2-normalised; as <code>phiclip align</code>)</th></tr>{rows}</table>"
        + (f"<ul class='note'>{why}</ul>" if why else "")
    )


def _projection_section(report: dict[str, Any]) -> str:
    models = report["models"]
    images = report["images"]
    classnames = report["data"]["classnames"]
    colours = label_colours(classnames)
    figs = []
    for i, m in enumerate(models):
        p = m["projection"]
        labels = [images[j]["label"] for j in p["indices"]]
        tips = [f"{images[j]['source']} ({images[j]['label'] or 'no label'})" for j in p["indices"]]
        chart = scatter_chart(f"chart-projection-{m['key']}", f"2-D projection of {m['key']}", p["points"], labels, tips, colours)
        ev = p["explained_variance_ratio"]
        aligned = " Rotated/reflected to match A's orientation (distances unchanged)." if p["aligned_to"] is not None else ""
        figs.append(
            f'<figure id="figure-projection-{esc(m["key"])}"><h3>{_model_chip(m, i)} {esc(m["name"])}</h3>{chart}'
            f"<figcaption>PCA of {len(p['indices'])} images; the two axes explain "
            f"{_num(ev[0], f'models.{i}.projection.explained_variance_ratio.0', kind='fraction')} and "
            f"{_num(ev[1], f'models.{i}.projection.explained_variance_ratio.1', kind='fraction')} of the variance.{aligned}</figcaption></figure>"
        )
    legend = ""
    if classnames:
        counts = {c: 0 for c in classnames}
        for im in images:
            if im["label"] in counts:
                counts[im["label"]] += 1
        legend = '<div class="legend" id="projection-legend">' + "".join(
            f'<span data-label="{esc(c)}"><span class="sw" style="background:{colours[c]}"></span>{esc(c)} ({counts[c]})</span>'
            for c in classnames
        ) + "</div>"
    maps = report.get("maps") or {}
    links = "".join(
        f'<li><a href="{esc(info["file"])}" data-map="{esc(key)}">{esc(key)}: interactive map</a> '
        f'<span class="note">({esc(info["description"])}; pan, zoom, hover for the image)</span></li>'
        for key, info in maps.items()
    )
    return (
        '<section id="projection"><h2>Maps of the spaces</h2>'
        '<p class="note">Each point is an image, coloured by its label; images close together are alike to the encoder.</p>'
        + (f'<ul id="map-links">{links}</ul>' if links else "")
        + f'{legend}<div class="grid">{"".join(figs)}</div></section>'
    )


def _thumb(index: int, images: list[dict[str, Any]], thumbnails: dict[int, str], cls: str, extra: str = "") -> str:
    im = images[index]
    label = im["label"] if im["label"] is not None else ""
    tip = f"{im['source']}" + (f" · {im['caption']}" if im.get("caption") else "")
    src = thumbnails.get(index)
    img = f'<img src="{src}" alt="{esc(label)}">' if src else '<img alt="(no thumbnail)">'
    shown = esc(label) or "#" + str(index)
    return (
        f'<figure class="thumb {cls}" data-index="{index}" title="{esc(tip)}">{img}'
        f'<figcaption><span class="lbl" title="{shown}">{shown}</span>{extra}</figcaption></figure>'
    )


def _neighbours_section(report: dict[str, Any], thumbnails: dict[int, str]) -> str:
    models = report["models"]
    images = report["images"]
    if not report["queries"]:
        return ""
    head = "<th>Query</th>" + "".join(f"<th>{_model_chip(m, i)} {esc(m['name'])}</th>" for i, m in enumerate(models))
    rows = []
    for qi, q in enumerate(report["queries"]):
        q_label = images[q]["label"]
        shared = set(models[0]["neighbours"][qi])
        for m in models[1:]:
            shared &= set(m["neighbours"][qi])
        cells = [f"<td>{_thumb(q, images, thumbnails, 'query')}</td>"]
        for m in models:
            strip = []
            for j in m["neighbours"][qi]:
                cls = "same" if q_label is not None and images[j]["label"] == q_label else "other"
                mark = ' <span class="shared" title="a neighbour in every space">●</span>' if j in shared else ""
                strip.append(_thumb(j, images, thumbnails, cls, mark))
            cells.append(f'<td><div class="strip">{"".join(strip)}</div></td>')
        rows.append(f'<tr data-query="{q}">' + "".join(cells) + "</tr>")
    n_show = len(models[0]["neighbours"][0]) if models[0]["neighbours"] else 0
    return (
        '<section id="neighbours"><h2>Nearest neighbours</h2>'
        f'<p class="note">For a few query images, the {n_show} most similar other images in each space, nearest first. '
        "Green frame: same label as the query; ● : a neighbour in every space.</p>"
        f'<table id="neighbour-grid" class="{"many" if len(models) > 2 else "pair"}"><tr>{head}</tr>{"".join(rows)}</table></section>'
    )


def _warnings_block(report: dict[str, Any]) -> str:
    warnings = report.get("warnings") or []
    if not warnings:
        return ""
    items = "".join(f"<li>{esc(w)}</li>" for w in warnings)
    return f'<div class="warnings" id="warnings"><b>Read with care</b><ul>{items}</ul></div>'


def render_html(report: CompareReport | dict[str, Any], thumbnails: dict[int, str] | None = None) -> str:
    """The whole self-contained page. ``thumbnails`` maps image index -> ``data:`` URI for the
    images of the neighbour grid (without them the grid shows labels only)."""
    r = report.to_dict() if isinstance(report, CompareReport) else report
    thumbs = {int(k): v for k, v in (thumbnails or {}).items()}
    models = r["models"]
    title = " vs ".join(f"{m['key']}: {m['name']}" for m in models)
    data = r["data"]
    skipped = ""
    if data["skipped"]:
        items = "".join(f"<li><span class='spec'>{esc(s['source'])}</span>: {esc(s['reason'])}</li>" for s in data["skipped"][:50])
        more = f"<li>and {len(data['skipped']) - 50} more (all in report.json)</li>" if len(data["skipped"]) > 50 else ""
        skipped = (f'<section id="skipped"><h2>Images left out</h2><p class="note">{len(data["skipped"])} image(s) '
                   f'are not in the comparison:</p><ul>{items}{more}</ul></section>')
    body = "".join(
        [
            "<main>",
            f"<h1>Encoder comparison: {esc(title)}</h1>",
            f'<p class="subtitle">{_num(data["images"], "data.images")} images from <span class="spec">{esc(data["source"])}</span>'
            f" · phiclip {esc(r['phiclip_version'])} · {esc(r['created'])}</p>",
            f'<p class="summary" id="summary">{esc(summary_sentence(r))}</p>',
            _warnings_block(r),
            _models_section(r),
            _cost_section(r),
            _quality_section(r),
            _structure_section(r),
            _projection_section(r),
            _neighbours_section(r, thumbs),
            skipped,
            "<footer>Every number on this page is in report.json beside it, under the path in its data-key attribute. "
            "Settings: " + esc(", ".join(f"{k}={v}" for k, v in r["settings"].items() if k != "templates")) + "</footer>",
            "</main>",
        ]
    )
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>phiclip compare: {esc(title)}</title><style>{_CSS}</style></head><body>{body}</body></html>\n"
    )


def write_report(report: CompareReport, output: str | Path, thumbnails: dict[int, str] | None = None) -> dict[str, Path]:
    """Write ``report.json`` and ``report.html`` into ``output``; returns their paths."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    json_path = report.save(out / "report.json")
    html_path = write_text_atomic(out / "report.html", render_html(report, thumbnails))
    return {"report_json": json_path, "report_html": html_path}


# --- the terminal --------------------------------------------------------------------------------


def terminal_tables(report: CompareReport | dict[str, Any]) -> list[Any]:
    """``rich`` tables: cost, quality and structure (models as columns; model names, which come from
    the user's specs, escaped: never read as console markup)."""
    from rich.table import Table


    r = report.to_dict() if isinstance(report, CompareReport) else report
    models = r["models"]

    def table(title: str) -> Table:
        t = Table(title=title, title_justify="left", header_style="bold")
        t.add_column("")
        for m in models:
            t.add_column(safe_text(f"{m['key']} {m['name']}"), justify="right")
        return t

    cost = table("Cost")
    for metric, title, unit, _ in COST_METRICS:
        values = [m["cost"].get(metric) for m in models]
        if all(v is None for v in values):
            continue
        kind = "count" if metric == "parameters" else "auto"
        cost.add_row(f"{title}" + (f" ({unit})" if unit else ""), *[format_number(v, kind=kind) for v in values])
    tables = [cost]
    names = [n for n in QUALITY_TITLES if any(n in m["quality"]["metrics"] for m in models)]
    if names:
        quality = table("Quality")
        for n in names:
            quality.add_row(QUALITY_TITLES[n], *[format_number(m["quality"]["metrics"].get(n), kind="fraction") for m in models])
        seen: dict[str, list[str]] = {}
        for m in models:
            for metric, rec in (m["quality"].get("protocols") or {}).items():
                n_text = ", ".join(f"{k} {v}" for k, v in rec["n"].items())
                line = f"{rec['description']}; split: {rec['split']}; n: {n_text}"
                titles = seen.setdefault(line, [])
                if QUALITY_TITLES.get(metric, metric) not in titles:
                    titles.append(QUALITY_TITLES.get(metric, metric))
        if seen:
            quality.caption = safe_text("\n".join(f"{', '.join(t)}: {line}" for line, t in seen.items()))
            quality.caption_justify = "left"
        tables.append(quality)
    if r["pairs"]:
        s = Table(title="Structure", title_justify="left", header_style="bold")
        for col in ("Pair", "Linear CKA", "k-NN overlap", "Chance", "CKNNA", "CKA (unbiased)"):
            s.add_column(col, justify="right" if col != "Pair" else "left")
        for p in r["pairs"]:
            al = p.get("alignment") or {}
            s.add_row(
                safe_text(f"{models[p['a']]['key']} vs {models[p['b']]['key']} (k={p['k']})"),
                format_number(p["linear_cka"], kind="fraction"),
                format_number(p["knn_overlap_mean"], kind="fraction"),
                format_number(p["knn_overlap_chance"], kind="fraction"),
                format_number(al.get("cknna"), kind="fraction"),
                format_number(al.get("cka_unbiased"), kind="fraction"),
            )
        tables.append(s)
    return tables


def print_report(report: CompareReport | dict[str, Any], console: Any = None) -> None:
    """Print the summary sentence and the tables to the terminal."""
    from rich.console import Console


    con = console or Console()
    r = report.to_dict() if isinstance(report, CompareReport) else report
    for t in terminal_tables(r):
        con.print(t)
    con.print(safe_text(summary_sentence(r)), highlight=False, soft_wrap=True)
    for w in r.get("warnings") or []:
        con.print(safe_text("warning: " + w, "yellow"), highlight=False, soft_wrap=True)
    left = r["data"].get("skipped") or []
    if left:
        con.print(safe_text(f"{len(left)} image(s) left out (all in report.json, data.skipped):", "bold"),
                  highlight=False, soft_wrap=True)
        for item in left[:LEFT_OUT_SHOWN]:
            con.print(safe_text(f"  {item['source']}: {item['reason']}"), highlight=False, soft_wrap=True)
        if len(left) > LEFT_OUT_SHOWN:
            con.print(safe_text(f"  and {len(left) - LEFT_OUT_SHOWN} more"), highlight=False, soft_wrap=True)


__all__ = [
    "MODEL_COLOURS",
    "format_number",
    "label_colours",
    "print_report",
    "render_html",
    "summary_sentence",
    "terminal_tables",
    "write_report",
]
