"""Threshold, trend and non-finite detectors."""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from stabmon._validation import check_in, check_positive_float, check_positive_int
from stabmon.detectors.base import SEVERITIES, Detector, Finding, finite

__all__ = ["NonFiniteDetector", "ThresholdDetector", "TrendDetector"]


def _layer(signal: str, key: str) -> str | None:
    """The layer part of a per-layer key of ``signal`` (None for the signal itself)."""
    return key[len(signal) + 1:] if key != signal else None


def _matching(signal: str, values: dict[str, float]) -> list[str]:
    """``signal`` and its per-layer keys (``signal/<layer>``); the per-layer ones win."""
    layered = [k for k in values if k.startswith(signal + "/")]
    if layered:
        return layered
    return [signal] if signal in values else []


class ThresholdDetector(Detector):
    """Flags a signal (or any of its per-layer keys) above ``ceiling`` or below ``floor``.

    Hysteresis: once a key has fired, it fires again only when it gets ``rearm`` times
    worse than the value it fired at (above ``rearm * last`` or below ``last / rearm``),
    so a value that stays bad does not raise an alarm at every sample.

    Example:
        >>> det = ThresholdDetector("sharpness/eos_ratio", ceiling=1.0)
        >>> det.update(3, {"sharpness/eos_ratio": 1.7})[0].message
        'sharpness/eos_ratio is 1.7, above 1'
    """

    def __init__(
        self,
        signal: str,
        *,
        ceiling: float | None = None,
        floor: float | None = None,
        severity: str = "warning",
        explain: str = "",
        rearm: float = 1.5,
        name: str | None = None,
    ) -> None:
        super().__init__()
        check_in("severity", severity, SEVERITIES)
        check_positive_float("rearm", rearm)
        if ceiling is None and floor is None:
            raise ValueError("ThresholdDetector needs a `ceiling` or a `floor`")
        self.signal, self.ceiling, self.floor, self.severity, self.explain = signal, ceiling, floor, severity, explain
        self.rearm = rearm
        self.name = name or f"{signal.replace('/', '_')}_threshold"
        self._fired: dict[str, float] = {}  # key -> value it last fired at

    def update(self, step: int, values: dict[str, float]) -> list[Finding]:
        if self.quiet(step):
            return []
        out = []
        for key in _matching(self.signal, values):
            x = values[key]
            if not finite(x):
                continue
            last = self._fired.get(key)
            if self.ceiling is not None and x > self.ceiling:
                if last is None or x > self.rearm * last:
                    self._fired[key] = x
                    out.append(Finding(step, key, self.severity, x, self.ceiling,
                                       f"{key} is {x:.4g}, above {self.ceiling:.4g}{self.explain}", self.name,
                                       _layer(self.signal, key)))
            elif self.floor is not None and x < self.floor:
                if last is None or x < last / self.rearm:
                    self._fired[key] = x
                    out.append(Finding(step, key, self.severity, x, self.floor,
                                       f"{key} is {x:.4g}, below {self.floor:.4g}{self.explain}", self.name,
                                       _layer(self.signal, key)))
            else:
                self._fired.pop(key, None)  # back to normal: the next crossing fires again
        return out

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "fired": dict(self._fired)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._fired = {k: float(v) for k, v in state.get("fired", {}).items()}


class TrendDetector(Detector):
    """Flags geometric growth (or decay) of a signal over its last ``lookback`` samples.

    ``direction="up"``: fires when ``x_now >= factor * x_then`` and ``x_then >= active_above``.
    ``direction="down"``: fires when ``x_now <= x_then / factor`` and ``x_then <= active_below``.
    The activity bound on the starting value keeps the ordinary early-training moves
    (logits growing from 0, entropy falling from log L) from counting. After firing, a key
    needs ``lookback`` new samples before it can fire again.

    Example:
        >>> det = TrendDetector("attention/max_logit", factor=2.0, lookback=2, active_above=10.0)
        >>> [len(det.update(s, {"attention/max_logit": v})) for s, v in enumerate([4.0, 12.0, 17.0, 25.0])]
        [0, 0, 0, 1]
    """

    def __init__(
        self,
        signal: str,
        *,
        factor: float = 2.0,
        lookback: int = 5,
        direction: str = "up",
        active_above: float = -math.inf,
        active_below: float = math.inf,
        severity: str = "warning",
        name: str | None = None,
    ) -> None:
        super().__init__()
        check_positive_float("factor", factor)
        check_positive_int("lookback", lookback)
        check_in("direction", direction, ("up", "down"))
        check_in("severity", severity, SEVERITIES)
        self.signal, self.factor, self.lookback, self.direction = signal, factor, lookback, direction
        self.active_above, self.active_below, self.severity = active_above, active_below, severity
        self.name = name or f"{signal.replace('/', '_')}_trend"
        self._history: dict[str, deque[float]] = {}

    def update(self, step: int, values: dict[str, float]) -> list[Finding]:
        out = []
        for key in _matching(self.signal, values):
            x = values[key]
            if not finite(x):
                continue
            hist = self._history.setdefault(key, deque(maxlen=self.lookback + 1))
            hist.append(x)
            if self.quiet(step) or len(hist) <= self.lookback:
                continue
            then = hist[0]
            found = None
            if self.direction == "up" and then > 0 and x >= self.factor * then and then >= self.active_above:
                found = Finding(step, key, self.severity, x, self.factor * then,
                                f"{key} grew {x / then:.1f}x over the last {self.lookback} samples "
                                f"({then:.4g} -> {x:.4g})", self.name, _layer(self.signal, key))
            elif self.direction == "down" and x > 0 and then >= self.factor * x and then <= self.active_below:
                found = Finding(step, key, self.severity, x, then / self.factor,
                                f"{key} fell {then / x:.1f}x over the last {self.lookback} samples "
                                f"({then:.4g} -> {x:.4g})", self.name, _layer(self.signal, key))
            if found is not None:
                out.append(found)
                hist.clear()
                hist.append(x)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "history": {k: list(v) for k, v in self._history.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._history = {k: deque(map(float, v), maxlen=self.lookback + 1) for k, v in state["history"].items()}


class NonFiniteDetector(Detector):
    """Critical finding for NaN or inf in the loss, the gradient norm or the output logits.

    Example:
        >>> NonFiniteDetector().update(7, {"loss/last": float("nan")})[0].severity
        'critical'
    """

    name = "nonfinite"

    def __init__(
        self,
        signals: tuple[str, ...] = ("loss/last", "gradients/norm"),
        counts: tuple[str, ...] = ("logits/nonfinite",),
    ) -> None:
        super().__init__()
        self.signals, self.counts = signals, counts

    def update(self, step: int, values: dict[str, float]) -> list[Finding]:
        out = []
        for key in self.signals:
            if key in values and not math.isfinite(values[key]):
                out.append(Finding(step, key, "critical", values[key], math.inf, f"{key} is {values[key]}", self.name))
        for key in self.counts:
            if values.get(key, 0) > 0:
                out.append(Finding(step, key, "critical", values[key], 0.0,
                                   f"{int(values[key])} rows of output logits hold NaN or inf", self.name))
        return out
