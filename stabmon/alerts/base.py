"""Alerts: what an alert says, and the dispatcher that de-duplicates and fails soft."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from stabmon.detectors.base import Finding
from stabmon.interventions.policy import Action

__all__ = ["Alert", "AlertChannel", "AlertDispatcher"]

log = logging.getLogger("stabmon.alerts")


@dataclass(frozen=True)
class Alert:
    """One alert: what happened, on which run and step, the value against the threshold, and what was done."""

    title: str
    text: str
    level: str  # "info", "warning" or "critical"
    step: int
    run: str
    signal: str
    value: float
    threshold: float
    action: str

    @classmethod
    def from_finding(cls, finding: Finding, run: str, actions: Sequence[Action], note: str | None = None) -> Alert:
        """``note``: what the forensics found at that step (the verdict and the top row), if anything."""
        done = "; ".join(f"{a.name} ({a.detail})" for a in actions) or "none (observing only or below the action level)"
        title = f"stabmon: {finding.severity} on {run} at step {finding.step}"
        text = (f"{finding.message}\nsignal {finding.signal} = {finding.value:.6g}, threshold {finding.threshold:.6g}\n"
                f"action: {done}" + (f"\nforensics: {note}" if note else ""))
        return cls(title, text, finding.severity, finding.step, run, finding.signal, finding.value, finding.threshold,
                   done)


class AlertChannel:
    """Base of the alert channels: ``send(alert)`` delivers or raises."""

    def send(self, alert: Alert) -> None:
        raise NotImplementedError

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued (channels that send in the background wait up to ``timeout``)."""


class AlertDispatcher:
    """Sends each finding to every channel, once per ``(signal, severity)`` per ``dedupe_steps``.

    A channel that raises is logged once (without the exception's text, which may hold a
    URL or a token) and rested with exponential back-off (``retry_after`` seconds, doubled
    at each failure up to ``max_backoff``); training never sees the error.

    Example:
        >>> sent = []
        >>> class Collect(AlertChannel):
        ...     def send(self, alert): sent.append(alert.step)
        >>> d = AlertDispatcher([Collect()], dedupe_steps=100)
        >>> first = Finding(5, "loss/last", "warning", 9.0, 4.0, "loss spike", "loss_spike")
        >>> again = Finding(50, "loss/last", "warning", 9.5, 4.0, "loss spike again", "loss_spike")
        >>> d.dispatch([first], [], run="demo"); d.dispatch([again], [], run="demo")
        >>> sent  # the repeat within 100 steps is not sent again
        [5]
    """

    def __init__(
        self,
        channels: Sequence[AlertChannel],
        *,
        dedupe_steps: int = 100,
        min_level: str = "warning",
        retry_after: float = 30.0,
        max_backoff: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.channels = list(channels)
        self.dedupe_steps = dedupe_steps
        self.min_rank = ("info", "warning", "critical").index(min_level)
        self.retry_after, self.max_backoff, self.clock = retry_after, max_backoff, clock
        self._last_sent: dict[tuple[str, str], int] = {}
        self._resting: dict[int, tuple[float, float]] = {}  # channel index -> (until, current backoff)

    def dispatch(self, findings: Sequence[Finding], actions: Sequence[Action], run: str,
                 notes: Mapping[int, str] | None = None) -> None:
        """Send ``findings`` (with the ``actions`` and forensic ``notes`` of their steps)."""
        for finding in findings:
            if finding.rank < self.min_rank:
                continue
            key = (finding.signal, finding.severity)
            last = self._last_sent.get(key)
            if last is not None and finding.step - last < self.dedupe_steps:
                continue
            self._last_sent[key] = finding.step
            alert = Alert.from_finding(finding, run, [a for a in actions if a.step == finding.step],
                                       (notes or {}).get(finding.step))
            for i, channel in enumerate(self.channels):
                self._send(i, channel, alert)

    def _send(self, index: int, channel: AlertChannel, alert: Alert) -> None:
        now = self.clock()
        until, backoff = self._resting.get(index, (0.0, 0.0))
        if now < until:
            return
        try:
            channel.send(alert)
            self._resting.pop(index, None)
        except Exception as err:  # noqa: BLE001 - an alert channel must never stop training
            backoff = min(self.max_backoff, backoff * 2 if backoff else self.retry_after)
            if index not in self._resting:
                log.warning("stabmon: alert channel %s failed (%s); retrying with back-off", type(channel).__name__,
                            type(err).__name__)
            self._resting[index] = (now + backoff, backoff)

    def close(self, timeout: float = 5.0) -> None:
        for channel in self.channels:
            try:
                channel.close(timeout)
            except Exception:  # noqa: BLE001
                pass
