"""One scalar per step (the loss, the gradient norm), summarised over a logging interval."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from stabmon.signals import SignalSet

__all__ = ["StepSeries"]

_STATS = ("last", "mean", "max", "min", "nonfinite_steps")
# Device values kept before they are folded into running accumulators (bounds memory on long intervals).
_FOLD_EVERY = 256


class StepSeries:
    """Last, mean, max, min and count of non-finite values of a per-step scalar.

    Values come in two forms. Host floats (``add_host``): the monitor reads the loss and the
    gradient norm every step when its detectors are on, so the summary costs a few Python
    operations; they are already the same on every rank. Device tensors (``add_device``):
    with detection off nothing is read until the interval is emitted; values then combine
    across ranks (mean of the per-rank sums and counts, max and min over ranks). Non-finite
    values are counted and kept out of the other statistics, which are left out when no
    step was finite.

    Args:
        names: the signal name of each statistic, e.g. ``{"mean": "loss/mean", "max": "loss/max"}``;
            statistics without a name are not emitted.

    Example:
        >>> s = StepSeries({"mean": "loss/mean", "max": "loss/max", "nonfinite_steps": "loss/nonfinite_steps"})
        >>> for v in (2.0, float("nan"), 4.0):
        ...     s.add_host(v)
        >>> out = SignalSet(); s.signals(out); out.reduce()
        {'loss/mean': 3.0, 'loss/max': 4.0, 'loss/nonfinite_steps': 1.0}
    """

    def __init__(self, names: Mapping[str, str]) -> None:
        unknown = set(names) - set(_STATS)
        if unknown:
            raise ValueError(f"`names` keys must be among {_STATS}, got {sorted(unknown)}")
        self.names = dict(names)
        self.reset()

    def reset(self) -> None:
        self._host: list[float] = []
        self._device: list[torch.Tensor] = []
        self._folded: dict[str, torch.Tensor] | None = None

    @property
    def empty(self) -> bool:
        return not self._host and not self._device and self._folded is None

    def add_host(self, value: float) -> None:
        self._host.append(value)

    def add_device(self, value: torch.Tensor) -> None:
        self._device.append(value.detach().reshape(()))
        if len(self._device) >= _FOLD_EVERY:
            self._fold()

    def _fold(self) -> None:
        values = torch.stack([v.float() for v in self._device])
        finite = torch.isfinite(values)
        inf = torch.tensor(math.inf, device=values.device)
        part = {
            "sum": torch.where(finite, values, 0).sum(),
            "count": finite.sum().float(),
            "max": torch.where(finite, values, -inf).max(),
            "min": torch.where(finite, values, inf).min(),
            "nonfinite": (~finite).sum().float(),
            "last": values[-1],
        }
        acc = self._folded
        if acc is not None:
            part["sum"] = part["sum"] + acc["sum"]
            part["count"] = part["count"] + acc["count"]
            part["max"] = torch.maximum(part["max"], acc["max"])
            part["min"] = torch.minimum(part["min"], acc["min"])
            part["nonfinite"] = part["nonfinite"] + acc["nonfinite"]
        self._folded = part
        self._device = []

    def signals(self, out: SignalSet) -> None:
        """Add the interval's statistics to ``out`` (nothing when no value came in)."""
        names = self.names
        if self._host:
            values = self._host
            finite = [v for v in values if math.isfinite(v)]
            stats = {"last": values[-1], "nonfinite_steps": float(len(values) - len(finite))}
            if finite:
                stats.update(mean=sum(finite) / len(finite), max=max(finite), min=min(finite))
            for stat, name in names.items():
                if stat in stats:
                    out.add_host(name, stats[stat], op=None)
            return
        if self._device:
            self._fold()
        acc = self._folded
        if acc is None:
            return
        if "last" in names:
            out.add_mean(names["last"], acc["last"], torch.ones_like(acc["last"]))
        if "mean" in names:
            out.add_mean(names["mean"], acc["sum"], acc["count"])
        if "max" in names:
            out.add_max(names["max"], acc["max"], defined=acc["count"])
        if "min" in names:
            out.add_min(names["min"], acc["min"], defined=acc["count"])
        if "nonfinite_steps" in names:
            out.add_sum(names["nonfinite_steps"], acc["nonfinite"])
