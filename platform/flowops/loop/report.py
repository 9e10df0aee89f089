"""The rollout report: one self-contained HTML page per rollout (`flowops loop report --html FILE`,
and an artifact of the rollout's MLflow run).

It shows the canary's weight over time, each check's estimate with its confidence bounds against
the margin, the requests per version, and the decision with the evidence that made it. The charts
are inline SVG, with no script and nothing fetched, so the page opens anywhere, offline too.
"""

from __future__ import annotations

import html
import time
from collections.abc import Sequence
from typing import Any

COLORS = {"canary": "#d9480f", "stable": "#1c7ed6", "band": "#fab005", "margin": "#c92a2a",
          "zero": "#868e96", "weight": "#2b8a3e"}
CHECK_TITLES = {"accuracy": "Accuracy: share of wrong feedback labels, canary minus stable",
                "error_rate": "Errors: share of failed requests, canary minus stable",
                "latency_tail": "Latency: share of requests slower than stable's p99, canary minus stable"}


def _scale(values: Sequence[float], lo_px: float, hi_px: float, pad: float = 0.05,
           floor: float | None = None):
    finite = [v for v in values if v is not None] + ([] if floor is None else [floor])
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    span = hi - lo
    lo, hi = lo - (0 if floor == lo else pad * span), hi + pad * span
    return lambda v: lo_px + (v - lo) / (hi - lo) * (hi_px - lo_px), lo, hi


def svg_chart(title: str, xs: Sequence[float], lines: list[tuple[str, Sequence[float | None], str]],
              band: tuple[Sequence[float | None], Sequence[float | None]] | None = None,
              hlines: Sequence[tuple[float, str, str]] = (), step: bool = False,
              floor: float | None = None, width: int = 760, height: int = 220) -> str:
    """An SVG line chart: time on x (seconds), named lines, an optional band, horizontal rules."""
    left, right, top, bottom = 60, width - 150, 28, height - 30
    ys = [v for _, vals, _ in lines for v in vals if v is not None]
    ys += [y for y, _, _ in hlines]
    if band:
        ys += [v for v in (*band[0], *band[1]) if v is not None]
    fx, x0, x1 = _scale(xs or [0.0, 1.0], left, right, pad=0)
    fy, y0, y1 = _scale(ys or [0.0, 1.0], bottom, top, floor=floor)
    out = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'role="img" aria-label="{html.escape(title)}">',
           f'<text x="{left}" y="16" class="title">{html.escape(title)}</text>',
           f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#adb5bd"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" stroke="#adb5bd"/>',
           f'<text x="{left}" y="{height - 8}" class="tick">{x0:.0f} s</text>',
           f'<text x="{right}" y="{height - 8}" class="tick" text-anchor="end">{x1:.0f} s</text>',
           f'<text x="{left - 6}" y="{top + 4}" class="tick" text-anchor="end">{y1:.3g}</text>',
           f'<text x="{left - 6}" y="{bottom}" class="tick" text-anchor="end">{y0:.3g}</text>']

    def path(vals: Sequence[float | None]) -> str:
        points, last = [], None
        for x, y in zip(xs, vals, strict=False):
            if y is None:
                continue
            if step and last is not None:
                points.append(f"{fx(x):.1f},{fy(last):.1f}")
            points.append(f"{fx(x):.1f},{fy(y):.1f}")
            last = y
        return " ".join(points)

    if band:
        pairs = [(x, lo, hi) for x, lo, hi in zip(xs, *band, strict=False)
                 if lo is not None and hi is not None]
        if pairs:
            upper = " ".join(f"{fx(x):.1f},{fy(hi):.1f}" for x, _, hi in pairs)
            lower = " ".join(f"{fx(x):.1f},{fy(lo):.1f}" for x, lo, _ in reversed(pairs))
            out.append(f'<polygon points="{upper} {lower}" fill="{COLORS["band"]}" fill-opacity="0.3"/>')
    for i, (y, label, color) in enumerate(hlines):
        label_y = fy(y) + (12 if i % 2 == 0 else -4)  # labels alternate below/above their rule
        out.append(f'<line x1="{left}" y1="{fy(y):.1f}" x2="{right}" y2="{fy(y):.1f}" stroke="{color}" '
                   f'stroke-dasharray="5,4"/><text x="{right + 6}" y="{label_y:.1f}" class="tick" '
                   f'fill="{color}">{html.escape(label)}</text>')
    for i, (label, vals, color) in enumerate(lines):
        out.append(f'<polyline points="{path(vals)}" fill="none" stroke="{color}" stroke-width="2"/>')
        out.append(f'<text x="{right + 6}" y="{top + 14 * i + 4}" class="tick" fill="{color}">'
                   f'{html.escape(label)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def render(rollout: dict[str, Any], ticks: list[dict[str, Any]]) -> str:
    """The page for one rollout: `rollout` is a row of `loop.timeline()`, `ticks` its analysis
    ticks (the `analysis_tick` events: ts, weight, action, checks, requests)."""
    rid = html.escape(str(rollout.get("rollout", "?")))
    version = html.escape(str(rollout.get("version") or "?"))
    outcome = html.escape(str(rollout.get("outcome", "in progress")))
    t0 = ticks[0]["ts"] if ticks else 0.0
    xs = [t["ts"] - t0 for t in ticks]
    charts = []
    if ticks:
        charts.append(svg_chart("Canary weight (%)", xs, [("weight", [t["weight"] for t in ticks],
                                                            COLORS["weight"])], step=True,
                                hlines=[(100.0, "promoted", COLORS["zero"])], floor=0.0))
        for name, title in CHECK_TITLES.items():
            rows = [next((c for c in t.get("checks", []) if c["name"] == name), {}) for t in ticks]
            if not any(r.get("estimate") is not None for r in rows):
                continue
            margin = next((r["margin"] for r in rows if r.get("margin") is not None), 0.0)
            charts.append(svg_chart(
                title, xs, [("estimate", [r.get("estimate") for r in rows], COLORS["canary"])],
                band=([r.get("lower") for r in rows], [r.get("upper") for r in rows]),
                hlines=[(0.0, "no difference", COLORS["zero"]), (margin, f"margin {margin:g}",
                                                                  COLORS["margin"])]))
        charts.append(svg_chart("Requests per version", xs, [
            ("stable", [t.get("requests", {}).get("stable") for t in ticks], COLORS["stable"]),
            ("canary", [t.get("requests", {}).get("canary") for t in ticks], COLORS["canary"])],
            floor=0.0))
    stages = "".join(
        f"<tr><td>{html.escape(s['stage'])}</td><td>{time.strftime('%H:%M:%S', time.localtime(s['end']))}"
        f"</td><td>{s['seconds']:.1f}</td></tr>" for s in rollout.get("stages", []))
    last = ticks[-1] if ticks else {}
    evidence = "".join(
        f"<tr><td>{html.escape(c['name'])}</td><td>{html.escape(str(c.get('status')))}</td>"
        f"<td>{_num(c.get('estimate'))}</td><td>[{_num(c.get('lower'))}, {_num(c.get('upper'))}]</td>"
        f"<td>{_num(c.get('margin'))}</td><td>{html.escape(str(c.get('canary', '')))}</td>"
        f"<td>{html.escape(str(c.get('stable', '')))}</td></tr>" for c in last.get("checks", []))
    reasons = "".join(f"<li>{html.escape(str(r))}</li>" for r in rollout.get("reasons") or
                      last.get("reasons") or [])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>FlowOps rollout {rid}: model v{version} {outcome}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px; color: #212529; max-width: 960px; }}
h1 {{ font-size: 22px; }} h2 {{ font-size: 17px; margin-top: 28px; }}
.outcome {{ font-weight: bold; color: {COLORS["canary"] if outcome == "rolled_back" else COLORS["weight"]}; }}
table {{ border-collapse: collapse; margin: 8px 0; }}
td, th {{ border: 1px solid #dee2e6; padding: 4px 8px; font-size: 13px; text-align: left; }}
.chart {{ display: block; margin: 12px 0; }} .title {{ font-size: 13px; font-weight: bold; }}
.tick {{ font-size: 11px; }}
</style></head>
<body>
<h1>Rollout {rid}: model v{version} &rarr; <span class="outcome">{outcome}</span></h1>
<p>Data version {html.escape(str(rollout.get("data_version") or "-"))}; {len(ticks)} analysis looks.
Each check is a sequential test whose confidence bounds hold at every look: the canary is rolled back
when the lower bound is above 0 (worse than stable) and promoted when the upper bound is below the
margin on every required check.</p>
<h2>Decision</h2><ul>{reasons or "<li>none yet</li>"}</ul>
<h2>Evidence at the last look</h2>
<table><tr><th>check</th><th>status</th><th>estimate</th><th>bounds</th><th>margin</th>
<th>canary bad/seen</th><th>stable bad/seen</th></tr>{evidence}</table>
<h2>Over time</h2>
{"".join(charts) or "<p>No analysis ticks were recorded for this rollout.</p>"}
<h2>Stages</h2>
<table><tr><th>stage</th><th>ended</th><th>seconds</th></tr>{stages}</table>
</body></html>
"""


def _num(value: Any) -> str:
    return "-" if value is None else f"{float(value):+.4f}"
