"""Spike detection by a robust z-score against a rolling median and MAD."""

from __future__ import annotations

import bisect
import math
from collections import deque
from typing import Any

from stabmon._validation import check_positive_float, check_positive_int
from stabmon.detectors.base import Detector, Finding, finite

__all__ = ["SpikeDetector"]


class SpikeDetector(Detector):
    """Flags a value far above its recent history: ``z = (x - median) / (1.4826 * MAD)``.

    The median and the median absolute deviation (MAD) are taken over the last ``window``
    finite values, so one earlier spike does not inflate the scale the way a standard
    deviation would. The detector arms after ``warmup`` values. A flagged value does not
    enter the history (it would raise the baseline for the next one). With ``log_scale``
    (the default) positive signals are compared as logarithms: loss and gradient-norm noise
    is multiplicative, so a jump from 0.01 to 0.03 and one from 1 to 3 weigh the same.

    Args:
        signal: the signal to watch (e.g. ``"loss/last"``, ``"gradients/norm"``).
        z_warning: z-score of a warning. Default 6.
        z_critical: z-score of a critical finding. Default 12.
        window: values in the rolling history. Default 100.
        warmup: values seen before the detector arms. Default 20.
        min_scale: floor of the scale (relative to the median; in log space, absolute), so
            a flat history (MAD 0) does not turn noise into spikes. Default 0.01.
        log_scale: compare logarithms while the value and its history are positive. Default True.

    Example:
        >>> det = SpikeDetector("loss/last", warmup=5)
        >>> for step, loss in enumerate([2.0, 2.1, 1.9, 2.05, 1.95, 2.0]):
        ...     assert det.update(step, {"loss/last": loss}) == []
        >>> det.update(6, {"loss/last": 9.0})[0].severity
        'critical'
    """

    def __init__(
        self,
        signal: str,
        *,
        z_warning: float = 6.0,
        z_critical: float = 12.0,
        window: int = 100,
        warmup: int = 20,
        min_scale: float = 0.01,
        log_scale: bool = True,
        name: str | None = None,
    ) -> None:
        super().__init__()
        check_positive_float("z_warning", z_warning)
        check_positive_float("z_critical", z_critical)
        check_positive_int("window", window)
        check_positive_int("warmup", warmup)
        check_positive_float("min_scale", min_scale)
        if warmup > window:
            raise ValueError(f"`warmup` ({warmup}) must not exceed `window` ({window})")
        self.signal = signal
        self.z_warning, self.z_critical = z_warning, z_critical
        self.window, self.warmup, self.min_scale, self.log_scale = window, warmup, min_scale, log_scale
        self.name = name or f"{signal.replace('/', '_')}_spike"
        self._history: deque[float] = deque()  # insertion order, at most `window` values
        # The same values kept sorted, and their logarithms (-inf for values <= 0), sorted too:
        # a median is then an index, and a step costs O(window) instead of two sorts.
        self._sorted: list[float] = []
        self._sorted_log: list[float] = []
        self._baseline: tuple[bool, float, float] | None = None  # (log scale, median, scale), refreshed lazily
        self._baseline_age = 0
        self.last_z: float | None = None

    def update(self, step: int, values: dict[str, float]) -> list[Finding]:
        x = values.get(self.signal)
        self.last_z = None
        if not finite(x):
            return []  # non-finite is the NonFiniteDetector's business and never enters state
        if self.quiet(step):
            return []
        if len(self._history) >= self.warmup:
            use_log = self.log_scale and x > 0 and self._sorted[0] > 0
            z, median, scale = self._z(x, use_log, fresh=False)
            if z >= _NEAR * self.z_warning:  # near or past the threshold: decide on exact statistics
                z, median, scale = self._z(x, use_log, fresh=True)
            self.last_z = z
            if z >= self.z_warning:
                severity = "critical" if z >= self.z_critical else "warning"
                limit = median + (self.z_critical if severity == "critical" else self.z_warning) * scale
                threshold = math.exp(limit) if use_log else limit
                center = math.exp(median) if use_log else median
                return [Finding(step, self.signal, severity, x, threshold,
                                f"{self.signal} spike: {x:.4g} is {z:.1f} robust std above its median {center:.4g}"
                                + (" (log scale)" if use_log else ""), self.name)]
        self._append(x)
        return []

    def _z(self, x: float, use_log: bool, fresh: bool) -> tuple[float, float, float]:
        """z-score of ``x`` with the median and scale of the history.

        The baseline of a 100-step window moves slowly: it is recomputed every ``_REFRESH``
        values (or when asked for ``fresh``), so most steps cost one subtraction.
        """
        base = self._baseline
        if fresh or base is None or base[0] != use_log or self._baseline_age >= _REFRESH:
            hist = self._sorted_log if use_log else self._sorted
            median = _median(hist)
            mad = _median(sorted([abs(v - median) for v in hist]))
            floor = self.min_scale if use_log else self.min_scale * abs(median)
            base = self._baseline = (use_log, median, max(1.4826 * mad, floor, 1e-12))
            self._baseline_age = 0
        _, median, scale = base
        return ((math.log(x) if use_log else x) - median) / scale, median, scale

    def _append(self, x: float) -> None:
        self._baseline_age += 1
        if len(self._history) == self.window:
            old = self._history.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, old)]
            del self._sorted_log[bisect.bisect_left(self._sorted_log, _log(old))]
        self._history.append(x)
        bisect.insort(self._sorted, x)
        bisect.insort(self._sorted_log, _log(x))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "history": list(self._history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._history, self._sorted, self._sorted_log = deque(), [], []
        for v in state["history"][-self.window:]:
            self._append(float(v))


# Values between exact baseline recomputations, and the fraction of the warning z-score from
# which a value is judged on exact statistics: every finding is computed exactly.
_REFRESH = 8
_NEAR = 0.75


def _log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf


def _median(values: list[float]) -> float:
    """Median of a sorted list (``statistics.median`` semantics)."""
    n = len(values)
    mid = n // 2
    return values[mid] if n % 2 else (values[mid - 1] + values[mid]) / 2


