"""The curves of a long log in bounded memory, for the report's charts.

``Curve`` keeps at most ``max_points`` buckets of (first step, min, max, last value): when it is
full, neighbouring buckets merge (a bucket then covers twice the steps). A spike survives the
merging as its bucket's max; a million logged steps cost what two thousand do.
"""

from __future__ import annotations

import math

__all__ = ["Curve", "Curves"]


class Curve:
    """One signal's decimated curve.

    Example:
        >>> c = Curve(max_points=4)
        >>> for s in range(10):
        ...     c.add(s, 100.0 if s == 7 else 1.0)
        >>> len(c.buckets) <= 4, max(b[2] for b in c.buckets)
        (True, 100.0)
    """

    def __init__(self, max_points: int = 1500) -> None:
        self.max_points = max_points
        self.buckets: list[list[float]] = []  # [first step, min, max, last]
        self.width = 1  # logged values per bucket
        self._count = 0  # values in the last bucket

    def add(self, step: int, value: float) -> None:
        if not math.isfinite(value):
            return
        if self.buckets and self._count < self.width:
            b = self.buckets[-1]
            b[1], b[2], b[3] = min(b[1], value), max(b[2], value), value
            self._count += 1
            return
        self.buckets.append([step, value, value, value])
        self._count = 1
        if len(self.buckets) > self.max_points:
            merged = []
            for i in range(0, len(self.buckets) - 1, 2):
                a, b = self.buckets[i], self.buckets[i + 1]
                merged.append([a[0], min(a[1], b[1]), max(a[2], b[2]), b[3]])
            if len(self.buckets) % 2:
                merged.append(self.buckets[-1])
            self.buckets, self.width = merged, self.width * 2
            self._count = self.width  # the last bucket counts as full: the next value starts one


class Curves:
    """The curves of every signal of a log, up to ``max_curves`` of them."""

    def __init__(self, max_points: int = 1500, max_curves: int = 200) -> None:
        self.max_points, self.max_curves = max_points, max_curves
        self.curves: dict[str, Curve] = {}

    def add(self, step: int, signals: dict[str, float]) -> None:
        for name, value in signals.items():
            curve = self.curves.get(name)
            if curve is None:
                if len(self.curves) >= self.max_curves:
                    continue
                curve = self.curves[name] = Curve(self.max_points)
            curve.add(step, value)
