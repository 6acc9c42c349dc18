"""Hands a monitor's new findings and actions to the alert channels and the W&B extras."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from stabmon._failsoft import FailSoft
from stabmon.alerts import AlertDispatcher
from stabmon.detectors.base import Finding
from stabmon.interventions.policy import Action
from stabmon.sinks.events import EventLog
from stabmon.sinks.wandb import WandbExtras

__all__ = ["Reporter"]


class Reporter:
    """Sends the findings and actions that are new since the last call, once, from one process.

    Alerts, W&B and the run directory's event log run under stages of their own (``alerts``,
    ``wandb``, ``event log``): a fault in one switches it off and leaves the others, and
    training, alone.

    Args:
        alerts: the alert dispatcher, or None.
        wandb: the W&B extras of the run, or None.
        run: the run's name in alert texts.
        guard: the monitor's fail-soft guard.
        events: the event log in the run directory, or None.

    Example::

        reporter = Reporter(AlertDispatcher([LogAlert()]), None, run="my-run")
        reporter.report(step, core.findings, core.actions_taken)       # after each step, on rank 0
        reporter.finish(step)                                           # at the end of training
    """

    def __init__(self, alerts: AlertDispatcher | None, wandb: WandbExtras | None, run: str = "run",
                 guard: FailSoft | None = None, events: EventLog | None = None) -> None:
        self.alerts, self.wandb, self.run, self.events = alerts, wandb, run, events
        self.guard = guard or FailSoft()
        self._seen = (0, 0, 0)  # findings, actions and forensic records already sent

    def skip_to(self, findings: Sequence[Finding], actions: Sequence[Action], records: Sequence[Any] = ()) -> None:
        """Count what is there as sent (a run resumed from a checkpoint: its old findings)."""
        self._seen = (len(findings), len(actions), len(records))

    def behind(self, findings: Sequence[Finding], actions: Sequence[Action], records: Sequence[Any] = ()) -> bool:
        """True when ``findings``, ``actions`` or the forensic ``records`` hold something not sent yet."""
        return (len(findings), len(actions), len(records)) != self._seen

    def report(self, step: int, findings: Sequence[Finding], actions: Sequence[Action], *,
               head_maps: Mapping[str, Mapping[str, Any]] | None = None,
               attention_modules: Mapping[str, str] | None = None, records: Sequence[Any] = ()) -> None:
        """The new ``findings``, ``actions`` and forensic ``records`` (the monitor's whole lists) to
        the alert channels and W&B; ``head_maps`` (a sample's per-head maps) to W&B when given."""
        seen_findings, seen_actions, seen_records = self._seen
        new_findings, new_actions = findings[seen_findings:], actions[seen_actions:]
        new_records = records[seen_records:]
        self._seen = (len(findings), len(actions), len(records))
        if new_findings and self.alerts is not None:
            notes = {r.step: r.headline() for r in new_records}
            self.guard.run("alerts", self.alerts.dispatch, new_findings, new_actions, run=self.run, notes=notes)
        if new_records and self.wandb is not None:
            self.guard.run("wandb", self.wandb.forensics, new_records)
        if self.events is not None:
            if new_findings or new_actions:
                self.guard.run("event log", self.events.write, new_findings, new_actions)
            if head_maps:
                self.guard.run("event log", self.events.heads, step, head_maps, dict(attention_modules or {}))
        if self.wandb is not None:
            if new_findings or new_actions:
                self.guard.run("wandb", self.wandb.record, new_findings, new_actions)
            if head_maps:
                self.guard.run("wandb", self.wandb.heatmaps, step, head_maps, dict(attention_modules or {}))

    def add_series(self, step: int, series: dict[str, dict[str, float]]) -> None:
        """The per-layer points of one emission, for W&B's line-series charts."""
        if self.wandb is not None and series:
            self.guard.run("wandb", self.wandb.add_series, step, series)

    def finish(self, step: int | None) -> None:
        """End of training: the events table and the per-layer charts to W&B, queued alerts out."""
        if self.wandb is not None and step is not None:
            self.guard.run("wandb", self.wandb.log_events, step)
            self.guard.run("wandb", self.wandb.log_series, step)
        if self.alerts is not None:
            self.guard.run("alerts", self.alerts.close)
