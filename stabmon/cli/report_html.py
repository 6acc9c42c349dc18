"""The report of ``stabmon inspect --html``: one self-contained HTML file (inline SVG and CSS, no
script, nothing fetched), readable offline and attachable to a ticket.

A chart per signal (per-layer signals as one chart with a line per layer), grouped by family,
with the findings (red: critical, orange: warning) and the run's own actions (blue, dashed)
marked on every curve; the per-head attention maps of the last sample a monitored run wrote; its
forensic records; the findings table.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from stabmon.cli.inspect import Inspection, KeyMap
from stabmon.cli.series import Curve, Curves
from stabmon.keys import FAMILIES

__all__ = ["write_report"]

WIDTH, HEIGHT, LEFT, RIGHT, TOP, BOTTOM = 860, 200, 64, 16, 12, 28
COLORS = ["#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f", "#ff7f0e", "#d62728"]
SEVERITY_COLOR = {"critical": "#d62728", "warning": "#ff7f0e", "info": "#999999"}
MAX_LINES = 12
STYLE = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:920px;color:#222}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:14px;margin:14px 0 2px;font-family:ui-monospace,monospace}
.meta{color:#555} .ok{color:#2ca02c} .bad{color:#d62728} .warn{color:#c76b00}
table{border-collapse:collapse;width:100%;font-size:12.5px} th,td{border-bottom:1px solid #eee;padding:3px 6px;
text-align:left;vertical-align:top} th{background:#f6f6f6} td.num{text-align:right;font-family:ui-monospace,monospace}
svg{display:block} .legend span{margin-right:12px;font-size:12px} .swatch{display:inline-block;width:10px;
height:10px;margin-right:4px;vertical-align:middle}
"""


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return str(x)
    return f"{x:.4g}" if abs(x) < 1e5 else f"{x:.3e}"


class _Scale:
    def __init__(self, lo: float, hi: float, log: bool, pixels: float, flip: bool) -> None:
        self.log, self.pixels, self.flip = log, pixels, flip
        f = math.log10 if log else (lambda v: v)
        self.lo, self.hi = f(lo), f(hi)
        if self.hi == self.lo:
            self.lo, self.hi = self.lo - 1, self.hi + 1

    def __call__(self, v: float) -> float:
        if self.log:
            v = math.log10(max(v, 1e-300))
        t = (v - self.lo) / (self.hi - self.lo)
        return (1 - t if self.flip else t) * self.pixels

    def ticks(self, count: int = 5) -> list[float]:
        if self.log:
            return [10.0 ** e for e in range(math.floor(self.lo), math.ceil(self.hi) + 1)][: count * 3]
        step = (self.hi - self.lo) / (count - 1)
        return [self.lo + i * step for i in range(count)]


def _chart(title: str, curves: dict[str, Curve], marks: list[tuple[int, str, str]], x_range: tuple[int, int]) -> str:
    """One SVG chart: a line per curve (min-max band where a bucket holds several values), the
    ``marks`` (step, color, tooltip) as vertical lines."""
    points = [b for c in curves.values() for b in c.buckets]
    if not points:
        return ""
    lo, hi = min(b[1] for b in points), max(b[2] for b in points)
    log = lo > 0 and hi / lo > 100
    inner_w, inner_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    xs = _Scale(x_range[0], max(x_range[1], x_range[0] + 1), False, inner_w, False)
    ys = _Scale(lo, hi, log, inner_h, True)
    out = [f'<svg viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img" '
           f'aria-label="{html.escape(title)}"><rect x="{LEFT}" y="{TOP}" width="{inner_w}" height="{inner_h}" '
           'fill="#fbfbfb" stroke="#ddd"/>']
    for value in ys.ticks():
        y = TOP + ys(value)
        if TOP - 1 <= y <= TOP + inner_h + 1:
            out.append(f'<line x1="{LEFT}" x2="{LEFT + inner_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>'
                       f'<text x="{LEFT - 6}" y="{y + 4:.1f}" font-size="10" text-anchor="end">{_fmt(value)}</text>')
    for tick in xs.ticks(6):
        x = LEFT + xs(tick)
        out.append(f'<text x="{x:.1f}" y="{HEIGHT - 10}" font-size="10" text-anchor="middle">{int(round(tick))}</text>')
    for step, color, tip in marks:
        if x_range[0] <= step <= x_range[1]:
            x = LEFT + xs(step)
            dash = ' stroke-dasharray="4 3"' if color == "#1f77b4" else ""
            out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{TOP + inner_h}" stroke="{color}" '
                       f'stroke-width="1.5"{dash}><title>{html.escape(tip)}</title></line>')
    for i, (name, curve) in enumerate(list(curves.items())[:MAX_LINES]):
        color = COLORS[i % len(COLORS)]
        line = " ".join(f"{LEFT + xs(b[0]):.1f},{TOP + ys(b[3]):.1f}" for b in curve.buckets)
        band = [b for b in curve.buckets if b[2] > b[1]]
        for b in band:  # the spread inside a bucket: a spike stays visible however long the log
            x = LEFT + xs(b[0])
            out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{TOP + ys(b[1]):.1f}" y2="{TOP + ys(b[2]):.1f}" '
                       f'stroke="{color}" stroke-opacity="0.35"/>')
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.4" points="{line}">'
                   f'<title>{html.escape(name)}</title></polyline>')
    out.append(f'<text x="{LEFT + 4}" y="{TOP + 12}" font-size="10" fill="#888">{"log scale" if log else ""}</text>')
    out.append("</svg>")
    legend = "".join(f'<span><i class="swatch" style="background:{COLORS[i % len(COLORS)]}"></i>'
                     f'{html.escape(name)}</span>' for i, name in enumerate(list(curves)[:MAX_LINES]))
    more = f"<span>(+{len(curves) - MAX_LINES} more lines not drawn)</span>" if len(curves) > MAX_LINES else ""
    return f"<h3>{html.escape(title)}</h3>" + "".join(out) + f'<div class="legend">{legend}{more}</div>'


_STATS = ("_max", "_min", "_mean", "_last")


def _groups(curves: Curves) -> dict[str, dict[str, dict[str, Curve]]]:
    """family -> chart -> {line: curve}. The statistics of one signal share its chart (``loss/last``,
    ``loss/mean``, ``loss/max``; ``gradients/norm`` and ``gradients/norm_max``), its per-layer
    keys make a chart of their own with a line per layer, and a curve that is 0 throughout (a
    count of non-finite steps in a healthy run) is left out."""
    out: dict[str, dict[str, dict[str, Curve]]] = {}
    for name, curve in curves.curves.items():
        if all(b[1] == b[2] == 0 for b in curve.buckets):
            continue
        parts = name.split("/")
        if name == "lr":
            family, chart, line = "learning rate", "lr", "lr"
        elif parts[0] not in FAMILIES or len(parts) < 2:
            family, chart, line = "other", name, name
        elif len(parts) > 2:
            family, chart, line = parts[0], f"{parts[0]}/{parts[1]} per layer", "/".join(parts[2:])
        else:
            base = parts[1]
            for suffix in _STATS:
                base = base[: -len(suffix)] if base.endswith(suffix) else base
            if parts[0] == "loss" and base in ("last", "mean", "max", "min"):
                base = "loss"
            family, chart, line = parts[0], f"{parts[0]}/{base}" if base != "loss" else "loss", name
        out.setdefault(family, {}).setdefault(chart, {})[line] = curve
    order = ["loss", "gradients", "learning rate", *[f for f in FAMILIES if f not in ("loss", "gradients")], "other"]
    return {f: dict(sorted(out[f].items(), key=lambda kv: ("per layer" in kv[0], kv[0]))) for f in order if f in out}


def _heatmap(title: str, layers: dict[str, dict[str, Any]], key: str, low_is_bad: bool) -> str:
    names = sorted(layers)
    rows = [[v if isinstance(v, (int, float)) else float(v) for v in layers[n].get(key, [])] for n in names]
    values = [v for r in rows for v in r if math.isfinite(v)]
    if not values:
        return ""
    lo, hi = min(values), max(values)
    cell = max(10, min(28, 600 // max(len(r) for r in rows)))
    width, height = 120 + cell * max(len(r) for r in rows), 20 + cell * len(rows)
    out = [f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}">']
    for i, (name, row) in enumerate(zip(names, rows)):
        y = 16 + i * cell
        module = layers[name].get("module", "")
        out.append(f'<text x="4" y="{y + cell * 0.7:.1f}" font-size="11">{html.escape(name)}</text>')
        for h, v in enumerate(row):
            t = 0.5 if hi == lo or not math.isfinite(v) else (v - lo) / (hi - lo)
            t = 1 - t if low_is_bad else t  # red where it is bad
            color = f"rgb({int(255 * t)},{int(90 + 110 * (1 - t))},{int(220 * (1 - t))})"
            out.append(f'<rect x="{110 + h * cell}" y="{y}" width="{cell - 1}" height="{cell - 1}" fill="{color}">'
                       f'<title>{html.escape(name)} {html.escape(module)} head {h}: {key} {_fmt(v)}</title></rect>')
    out.append(f'<text x="110" y="11" font-size="10" fill="#555">heads 0..{max(len(r) for r in rows) - 1}; '
               f'{_fmt(lo)} .. {_fmt(hi)}</text></svg>')
    return f"<h3>{html.escape(title)}</h3>" + "".join(out)


def _forensics(run_dir: Path) -> str:
    records = sorted(run_dir.glob("stabmon-forensics/step_*.json"))
    if not records:
        return ("<p class=meta>No forensic records: the run has none (it had no spike or non-finite step while "
                "stabmon watched it, or its forensics were off).</p>")
    from stabmon.forensics.record import ForensicRecord

    rows = []
    for path in records[:200]:
        try:
            record = ForensicRecord.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue
        top = record.rows[0].describe() if record.rows else ""
        rows.append(f"<tr><td class=num>{record.step}</td><td>{html.escape(record.signal)}</td>"
                    f"<td>{html.escape(record.verdict)}</td>"
                    f"<td>{html.escape(record.first_nonfinite_module or '')}</td>"
                    f"<td>{html.escape(top)}</td><td>{html.escape(path.name)}</td></tr>")
    return ("<table><tr><th>step</th><th>signal</th><th>verdict</th><th>first non-finite module</th>"
            "<th>top row</th><th>record</th></tr>" + "".join(rows) + "</table>")


def _findings_table(findings: Iterable[Any], limit: int = 1000) -> str:
    rows = []
    for f in list(findings)[:limit]:
        color = SEVERITY_COLOR.get(f.severity, "#333")
        rows.append(f"<tr><td class=num>{f.step}</td><td style='color:{color}'>{f.severity}</td>"
                    f"<td>{html.escape(f.signal)}</td><td class=num>{_fmt(f.value)}</td>"
                    f"<td class=num>{_fmt(f.threshold)}</td><td>{html.escape(f.message)}</td></tr>")
    return ("<table><tr><th>step</th><th>severity</th><th>signal</th><th>value</th><th>threshold</th>"
            "<th>message</th></tr>" + "".join(rows) + "</table>")


def write_report(path: str | Path, run_dir: Path, description: str, result: Inspection, keys: KeyMap,
                 curves: Curves) -> None:
    """Write the report of one inspection to ``path`` (``run_dir``: where the run's records are)."""
    source = description
    events = result.events
    actions = [e for e in events if e.get("kind") == "action"]
    marks = [(f.step, SEVERITY_COLOR[f.severity], f"step {f.step}: {f.message}") for f in result.findings
             if f.severity != "info"]
    marks += [(a["step"], "#1f77b4", f"step {a['step']}: {a['name']}: {a.get('detail', '')}") for a in actions]
    x_range = (result.first_step or 0, result.last_step or 0)
    counts = {s: sum(f.severity == s for f in result.findings) for s in ("critical", "warning", "info")}
    verdict = ("<span class=bad>critical findings</span>" if counts["critical"] else
               "<span class=warn>warnings</span>" if counts["warning"] else "<span class=ok>no warning</span>")
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>stabmon inspect: "
             f"{html.escape(str(source))}</title><style>{STYLE}</style></head><body>",
             f"<h1>stabmon inspect</h1><p class=meta>{html.escape(description)}<br>steps {x_range[0]}..{x_range[1]} "
             f"({result.steps} logged); signals: "
             f"{html.escape(', '.join(f'{s} from {k}' for s, k in keys.used.items()) or 'none known')}</p>",
             f"<p>{verdict}: {counts['critical']} critical, {counts['warning']} warnings, {counts['info']} info."]
    if result.onset is not None and result.drift is not None:
        d = result.drift
        parts.append(f" <b>Divergence</b> from step {result.onset}: the loss's trailing median stayed above its best "
                     f"({_fmt(d.best)} at step {d.best_step}) by more than {_fmt(d.margin())} to the end "
                     f"({_fmt(d.mean)}).")
    if events:
        names = ", ".join(sorted({a["name"] for a in actions})) or "none"
        parts.append(f" The run's own monitor took {len(actions)} actions ({html.escape(names)}).")
    parts.append("</p><p class=meta>Marks on every chart: <span style='color:#d62728'>critical</span>, "
                 "<span style='color:#ff7f0e'>warning</span>, <span style='color:#1f77b4'>action (dashed)</span>; "
                 "hover a mark for its message.</p>")
    for family, charts in _groups(curves).items():
        parts.append(f"<h2>{html.escape(family)}</h2>")
        for title, lines in charts.items():
            parts.append(_chart(title, lines, marks, x_range))
    heads = [e for e in events if e.get("kind") == "heads"]
    if heads:
        last = heads[-1]
        parts.append(f"<h2>attention heads, step {last['step']}</h2>")
        parts.append(_heatmap("entropy per head (nats; red: low)", last["layers"], "entropy_mean", low_is_bad=True))
        parts.append(_heatmap("max logit per head (red: high)", last["layers"], "max_logit", low_is_bad=False))
    parts.append("<h2>forensic records</h2>" + _forensics(Path(run_dir)))
    parts.append(f"<h2>findings ({len(result.findings)})</h2>")
    parts.append(_findings_table(result.findings) if result.findings else "<p>None.</p>")
    if actions:
        parts.append("<h2>the run's actions</h2><table><tr><th>step</th><th>action</th><th>detail</th></tr>" +
                     "".join(f"<tr><td class=num>{a['step']}</td><td>{html.escape(a['name'])}</td>"
                             f"<td>{html.escape(a.get('detail', ''))}</td></tr>" for a in actions) + "</table>")
    parts.append("<p class=meta>Written by stabmon inspect.</p></body></html>")
    Path(path).write_text("".join(parts))
