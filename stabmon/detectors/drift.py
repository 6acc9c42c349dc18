"""Slow divergence: a loss whose trailing mean stays above its best.

A spike detector sees a value far above its recent history; a run that drifts up slowly (a
few hundredths of a nat per hundred steps) never makes one. ``DriftDetector`` keeps the
trailing level of the last ``window`` finite values, their median (one spike inside the window
does not move it: spikes are the spike detector's), and the best (lowest) level so far. The
signal drifts while its level is above the best by ``max(abs_margin, rel_margin * |best|)``;
when that has held for ``patience`` values in a row, it is a finding, once per stretch.
``onset`` is the first step of the stretch in progress (None while the signal is within the
margin); ``drifting`` is True once the stretch has lasted ``patience`` values.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from typing import Any

from stabmon._validation import check_in, check_positive_int
from stabmon.detectors.base import SEVERITIES, Detector, Finding

__all__ = ["DriftDetector"]


class DriftDetector(Detector):
    """Flags a signal whose trailing mean has stayed above its best for a while.

    Args:
        signal: the signal watched. Default ``"loss/last"``.
        window: values in the trailing mean. Default 50.
        patience: values in a row above the margin before it is a finding. Default 50.
        abs_margin, rel_margin: the margin above the best, ``max(abs_margin, rel_margin * |best|)``.
            Defaults 0.05 and 0.05 (for a language model's loss near 2.5 nats: 0.125 nats).
        severity: of the finding. Default ``"warning"``.
        lr_signal: the learning rate the schedule set (``"optimizer/lr"``). When it goes up (a warmup,
            a re-warm on purpose in continual pre-training) the best starts over, so the rise that
            follows is no finding. None: not watched.

    Example:
        >>> det = DriftDetector(window=2, patience=3)
        >>> losses = [3.0, 2.5, 2.0, 2.0, 2.3, 2.6, 2.9, 3.2]
        >>> [f.step for s, x in enumerate(losses) for f in det.update(s, {"loss/last": x})], det.onset, det.drifting
        ([6], 4, True)
    """

    def __init__(self, signal: str = "loss/last", *, window: int = 50, patience: int = 50, abs_margin: float = 0.05,
                 rel_margin: float = 0.05, severity: str = "warning", name: str = "loss_drift",
                 lr_signal: str | None = "optimizer/lr") -> None:
        super().__init__()
        check_positive_int("window", window)
        check_positive_int("patience", patience)
        check_in("severity", severity, SEVERITIES)
        for arg, value in (("abs_margin", abs_margin), ("rel_margin", rel_margin)):
            if not (isinstance(value, (int, float)) and value >= 0):
                raise ValueError(f"`{arg}` must be a non-negative number, got {value!r}")
        self.signal, self.window, self.patience = signal, window, patience
        self.abs_margin, self.rel_margin, self.severity, self.name = abs_margin, rel_margin, severity, name
        self._values: deque[float] = deque(maxlen=window)
        self._sorted: list[float] = []  # the same values, sorted: the median without a sort per step
        self.best = math.inf  # the lowest trailing mean so far
        self.best_step: int | None = None
        self.mean: float | None = None  # the trailing level (a median)
        self.onset: int | None = None  # first step of the stretch above the margin in progress
        self._above = 0
        self._fired = False
        self.lr_signal = lr_signal
        self._lr: float | None = None

    @property
    def drifting(self) -> bool:
        """True while the stretch above the margin has lasted ``patience`` values."""
        return self._above >= self.patience

    def margin(self) -> float:
        return max(self.abs_margin, self.rel_margin * abs(self.best))

    def update(self, step: int, values: dict[str, float]) -> list[Finding]:
        x = values.get(self.signal)
        if x is None or not math.isfinite(x):
            return []
        if self.quiet(step):  # an expected rise (the monitor's re-warm or rollback): the stretch starts over
            self._above, self.onset = 0, None
            return []
        lr = values.get(self.lr_signal) if self.lr_signal is not None else None
        if lr is not None:
            if self._lr is not None and lr > self._lr * 1.001:  # the schedule raised the LR (a warmup, a re-warm
                self.best, self.best_step = math.inf, None  # on purpose): the loss may rise; its best starts over
                self._above, self.onset, self._fired = 0, None, False
            self._lr = lr
        if len(self._values) == self.window:
            del self._sorted[bisect.bisect_left(self._sorted, self._values[0])]
        self._values.append(x)
        bisect.insort(self._sorted, x)
        if len(self._values) < self.window:
            return []
        n = len(self._sorted)
        self.mean = self._sorted[n // 2] if n % 2 else (self._sorted[n // 2 - 1] + self._sorted[n // 2]) / 2
        if self.mean < self.best:
            self.best, self.best_step = self.mean, step
        if self.mean <= self.best + self.margin():
            self._above, self.onset, self._fired = 0, None, False
            return []
        self._above += 1
        if self.onset is None:
            self.onset = step
        if self._above < self.patience or self._fired:
            return []
        self._fired = True
        return [Finding(step, self.signal, self.severity, self.mean, self.best + self.margin(),
                        f"{self.signal} drifts up: its median over the last {self.window} values, {self.mean:.4g}, has "
                        f"stayed above its best {self.best:.4g} (step {self.best_step}) by more than "
                        f"{self.margin():.3g} since step {self.onset}", self.name)]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "values": list(self._values), "best": self.best, "best_step": self.best_step,
                "onset": self.onset, "above": self._above, "fired": self._fired, "lr": self._lr}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._values = deque(map(float, state["values"]), maxlen=self.window)
        self._sorted = sorted(self._values)
        self.best, self.best_step, self.onset = float(state["best"]), state["best_step"], state["onset"]
        self._above, self._fired = int(state["above"]), bool(state["fired"])
        self._lr = state.get("lr")  # absent in a state of an earlier version
