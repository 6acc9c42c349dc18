"""Render a layer x head matrix as a small labelled PNG heatmap (pillow only, no matplotlib)."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["render_heatmap"]

# viridis at 9 stops; values in between are interpolated
_VIRIDIS = [(68, 1, 84), (72, 40, 120), (62, 73, 137), (49, 104, 142), (38, 130, 142), (31, 158, 137),
            (53, 183, 121), (109, 205, 89), (180, 222, 44), (253, 231, 37)]


def _color(t: float) -> tuple[int, int, int]:
    if not math.isfinite(t):
        return (200, 200, 200)
    t = min(1.0, max(0.0, t)) * (len(_VIRIDIS) - 1)
    i = min(int(t), len(_VIRIDIS) - 2)
    f = t - i
    a, b = _VIRIDIS[i], _VIRIDIS[i + 1]
    return tuple(int(round(x + (y - x) * f)) for x, y in zip(a, b))


def render_heatmap(
    matrix: Sequence[Sequence[float]],
    *,
    title: str,
    row_labels: Sequence[str],
    col_prefix: str = "h",
    cell: int = 28,
):
    """A ``PIL.Image`` of ``matrix`` (rows = layers, columns = heads) with its values printed.

    Example:
        >>> img = render_heatmap([[1.0, 2.0], [3.0, float("nan")]], title="entropy", row_labels=["l0", "l1"])
        >>> img.size[0] > 2 * 28
        True
    """
    from PIL import Image, ImageDraw

    rows = len(matrix)
    cols = max((len(r) for r in matrix), default=0)
    finite = [v for r in matrix for v in r if math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    span = hi - lo or 1.0
    left, top = 8 + 7 * max((len(s) for s in row_labels), default=1), 36
    width, height = left + cols * cell + 10, top + rows * cell + 24
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((6, 4), title, fill="black")
    draw.text((6, 18), f"min {lo:.3g}  max {hi:.3g}", fill=(90, 90, 90))
    for j in range(cols):
        draw.text((left + j * cell + 6, top - 12), f"{col_prefix}{j}", fill="black")
    for i, row in enumerate(matrix):
        draw.text((4, top + i * cell + 8), row_labels[i], fill="black")
        for j, v in enumerate(row):
            t = (v - lo) / span if math.isfinite(v) else float("nan")
            x0, y0 = left + j * cell, top + i * cell
            draw.rectangle([x0, y0, x0 + cell - 2, y0 + cell - 2], fill=_color(t))
            label = f"{v:.2g}" if math.isfinite(v) else "-"
            draw.text((x0 + 2, y0 + 8), label[:5], fill="white" if t < 0.6 else "black")
    return img
