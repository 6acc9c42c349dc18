"""Spike detection by a robust z-score against a rolling median and MAD."""

from __future__ import annotations

import math
import statistics
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
        self._history: deque[float] = deque(maxlen=window)
        self.last_z: float | None = None

    def update(self, step: int, values: dict[str, float]) -> list[Finding]:
        x = values.get(self.signal)
        self.last_z = None
        if not finite(x):
            return []  # non-finite is the NonFiniteDetector's business and never enters state
        if self.quiet(step):
            return []
        if len(self._history) >= self.warmup:
            use_log = self.log_scale and x > 0 and min(self._history) > 0
            hist = [math.log(v) for v in self._history] if use_log else list(self._history)
            value = math.log(x) if use_log else x
            median = statistics.median(hist)
            mad = statistics.median(abs(v - median) for v in hist)
            floor = self.min_scale if use_log else self.min_scale * abs(median)
            scale = max(1.4826 * mad, floor, 1e-12)
            z = (value - median) / scale
            self.last_z = z
            if z >= self.z_warning:
                severity = "critical" if z >= self.z_critical else "warning"
                limit = median + (self.z_critical if severity == "critical" else self.z_warning) * scale
                threshold = math.exp(limit) if use_log else limit
                center = math.exp(median) if use_log else median
                return [Finding(step, self.signal, severity, x, threshold,
                                f"{self.signal} spike: {x:.4g} is {z:.1f} robust std above its median {center:.4g}"
                                + (" (log scale)" if use_log else ""), self.name)]
        self._history.append(x)
        return []

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "history": list(self._history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._history = deque((float(v) for v in state["history"]), maxlen=self.window)


