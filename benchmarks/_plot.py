"""A small line plot to PNG with pillow (the benchmarks need no matplotlib)."""

from __future__ import annotations

import math
from collections.abc import Sequence

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]


def line_plot(
    series: dict[str, Sequence[tuple[float, float]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    log_x: bool = True,
    size: tuple[int, int] = (640, 420),
):
    from PIL import Image, ImageDraw

    width, height = size
    left, right, top, bottom = 70, 20, 40, 60
    points = [(x, y) for s in series.values() for x, y in s if math.isfinite(y)]
    fx = (lambda x: math.log10(x)) if log_x else (lambda x: x)
    xs = [fx(x) for x, _ in points]
    ys = [y for _, y in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    pad = 0.05 * (y1 - y0 or 1)
    y0, y1 = y0 - pad, y1 + pad

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (fx(x) - x0) / (x1 - x0 or 1) * (width - left - right),
                top + (y1 - y) / (y1 - y0) * (height - top - bottom))

    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    draw.text((left, 10), title, fill="black")
    draw.rectangle([left, top, width - right, height - bottom], outline=(120, 120, 120))
    for i in range(5):
        y = y0 + (y1 - y0) * i / 4
        _, py = px(10 ** x0 if log_x else x0, y)
        draw.line([left - 4, py, left, py], fill="black")
        draw.text((8, py - 6), f"{y:.2f}", fill="black")
    for x, _ in sorted({(x, 0) for x, _ in points}):
        pxx, _ = px(x, y0)
        draw.line([pxx, height - bottom, pxx, height - bottom + 4], fill="black")
        draw.text((pxx - 14, height - bottom + 8), f"{x:g}", fill="black")
    draw.text((width // 2 - 20, height - 24), xlabel, fill="black")
    draw.text((8, top - 18), ylabel, fill="black")
    for k, (name, pts) in enumerate(series.items()):
        color = COLORS[k % len(COLORS)]
        coords = [px(x, y) for x, y in pts if math.isfinite(y)]
        if len(coords) > 1:
            draw.line(coords, fill=color, width=2)
        for cx, cy in coords:
            draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=color)
        draw.text((left + 10, top + 8 + 14 * k), f"- {name}", fill=color)
    return img
