"""Findings and the detector interface."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Finding", "SEVERITIES", "Detector", "finite"]

SEVERITIES = ("info", "warning", "critical")


@dataclass(frozen=True)
class Finding:
    """Something a detector saw: which signal, how bad, its value against the threshold.

    ``layer`` names the layer of a per-layer signal (``layer_02`` for
    ``attention/max_logit/layer_02``), None for a global one.

    Example:
        >>> f = Finding(step=120, signal="loss/last", severity="warning", value=9.1, threshold=4.2,
        ...             message="loss spike: robust z-score 8.3 > 6", detector="loss_spike")
        >>> f.rank
        1
    """

    step: int
    signal: str
    severity: str
    value: float
    threshold: float
    message: str
    detector: str = ""
    layer: str | None = None

    @property
    def rank(self) -> int:
        """0 info, 1 warning, 2 critical."""
        return SEVERITIES.index(self.severity)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


class Detector:
    """A stateful detector: ``update(step, values)`` returns the findings of this step.

    ``values`` maps signal names (without the log prefix) to host floats; a detector reads
    the ones it knows and ignores missing ones. Non-finite values never enter its state.
    ``quiet_until(step)`` tells it that a rise before ``step`` is expected (the monitor's own
    intervention): it neither alarms nor learns from those values.
    """

    name = "detector"

    def __init__(self) -> None:
        self._quiet_until = -1

    def quiet_until(self, step: int) -> None:
        self._quiet_until = max(self._quiet_until, step)

    def quiet(self, step: int) -> bool:
        return step < self._quiet_until

    def update(self, step: int, values: dict[str, float]) -> list[Finding]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {"quiet_until": self._quiet_until}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._quiet_until = int(state["quiet_until"])
