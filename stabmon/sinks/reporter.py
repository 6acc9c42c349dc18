"""Hands a monitor's new findings and actions to the alert channels and the W&B extras."""

from __future__ import annotations

from stabmon.alerts import AlertDispatcher
from stabmon.core import MonitorCore
from stabmon.sinks.wandb import WandbExtras

__all__ = ["Reporter"]


class Reporter:
    """Sends what a ``MonitorCore`` found and did since the last call, once, from one process.

    Args:
        alerts: the alert dispatcher, or None.
        wandb: the W&B extras of the run, or None.
        run: the run's name in alert texts.

    Example::

        reporter = Reporter(AlertDispatcher([LogAlert()]), None, run="my-run")
        reporter.report(core, step, sampled=True)    # after each step, on rank 0
        reporter.finish(core)                         # at the end of training
    """

    def __init__(self, alerts: AlertDispatcher | None, wandb: WandbExtras | None, run: str = "run") -> None:
        self.alerts, self.wandb, self.run = alerts, wandb, run
        self._seen = (0, 0)  # findings and actions already sent

    def report(self, core: MonitorCore, step: int, sampled: bool) -> None:
        """New findings and actions to the alert channels and W&B; heatmaps on sampled steps."""
        seen_findings, seen_actions = self._seen
        findings = core.findings[seen_findings:]
        actions = core.actions_taken[seen_actions:]
        self._seen = (len(core.findings), len(core.actions_taken))
        if findings and self.alerts is not None:
            self.alerts.dispatch(findings, actions, run=self.run)
        if self.wandb is not None:
            if findings or actions:
                self.wandb.record(findings, actions)
            if sampled:
                self.wandb.heatmaps(step, core.last_head_maps, core.attention_modules)

    def finish(self, core: MonitorCore) -> None:
        """End of training: the events table and the per-layer charts to W&B, queued alerts out."""
        if self.wandb is not None and core.step is not None:
            core.guard.run("wandb", self.wandb.log_events, core.step)
            core.guard.run("wandb", self.wandb.log_series, core.step)
        if self.alerts is not None:
            self.alerts.close()
