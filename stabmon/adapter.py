"""What every trainer adapter does the same way, whatever the framework.

``TrainerAdapter`` is the base of ``stabmon.StabilityMonitor`` (Lightning) and
``stabmon.integrations.transformers.StabilityMonitorCallback`` (Hugging Face): the settings,
checked once; the run's ``MonitorCore`` and ``Reporter``; the held batch of the sharpness
probe; the end of a step and of training; W&B; the state kept in checkpoints; and what users
read back (``findings``, ``actions_taken``, ``latest_metrics``, ``summary()``). An adapter
adds only what is its framework's: its event names, where it finds the optimizer, the
scaler and the loggers, how it logs and how it stops a run.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, ClassVar

import torch

from stabmon.alerts import AlertDispatcher
from stabmon.core import MonitorCore
from stabmon.detectors import Finding
from stabmon.interventions.policy import Action
from stabmon.keys import split_layers
from stabmon.settings import MonitorSettings, build_options
from stabmon.sinks.events import EventLog
from stabmon.sinks.reporter import Reporter

__all__ = ["TrainerAdapter"]


class TrainerAdapter:
    """The trainer-independent half of a trainer adapter (see the module docstring).

    Subclasses call ``_start`` when training starts, ``_hold_batch`` with the first batch,
    ``_finish_step`` after each optimizer step and ``_finish_training`` at the end; ``refused``
    names the settings a framework does not take, with what to use instead.
    """

    refused: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # help() and inspect.signature show the keyword arguments, with their defaults
        params = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
                  for f in dataclasses.fields(MonitorSettings) if f.init and f.name not in cls.refused]
        cls.__signature__ = inspect.Signature(params)

    def __init__(self, **settings: Any) -> None:
        self.settings = build_options(MonitorSettings, type(self).__name__, settings, self.refused)
        self.core: MonitorCore | None = None
        self.reporter = Reporter(None, None)
        self._pending_state: dict[str, Any] | None = None  # a checkpoint's state, loaded when the core exists

    # -- what users read back --------------------------------------------------------------------
    @property
    def findings(self) -> list[Finding]:
        """What the detectors found so far (``step``, ``signal``, ``severity``, ``value``, ``threshold``, ``message``)."""
        return self.core.findings if self.core is not None else []

    @property
    def actions_taken(self) -> list[Action]:
        """What the monitor did to the run (``step``, ``name``, ``detail``)."""
        return self.core.actions_taken if self.core is not None else []

    @property
    def forensics(self) -> list[Any]:
        """The forensic records of the run (``step``, ``signal``, ``verdict``, ``rows``,
        ``first_nonfinite_module``, ``path``, ...; see ``stabmon.forensics.record``)."""
        return self.core.forensics if self.core is not None else []

    @property
    def latest_metrics(self) -> dict[str, float]:
        """The last emitted value of every signal (keys without the log prefix)."""
        return self.core.latest_metrics if self.core is not None else {}

    def summary(self) -> str:
        """The end-of-training table as text."""
        if self.core is None:
            return "stabmon: the monitor has not been set up by a training run yet."
        return self.core.summary()

    # -- the run ---------------------------------------------------------------------------------
    def _start(self, model: torch.nn.Module, default_log_every_n_steps: int, *, grad_scaler: Any = None,
               saved_state: dict[str, Any] | None = None, run_dir: str | None = None) -> MonitorCore:
        """The run's core and reporter; a checkpoint's state (given, or loaded before) goes in.
        ``run_dir``: where the event log goes (the trainer's log or output directory)."""
        settings = self.settings
        self.core = core = MonitorCore(model, grad_scaler=grad_scaler,
                                       options=settings.core_options(default_log_every_n_steps, run_dir))
        alerts = AlertDispatcher(list(settings.alerts)) if settings.alerts else None
        events = (EventLog(settings.run_dir or run_dir, heads_every_n_steps=settings.wandb_heatmap_every_n_steps)
                  if settings.event_log and (settings.run_dir or run_dir) else None)
        self.reporter = Reporter(alerts, None, guard=core.guard, events=events)
        state = saved_state or self._pending_state
        self._pending_state = None
        if state:
            self._load_state(state)
        return core

    def _attach_wandb(self, run: Any) -> None:
        """W&B extras (heatmaps, per-layer charts, events table, alerts' run name) on ``run``."""
        from stabmon.sinks.wandb import WandbExtras

        self.reporter.run = getattr(run, "name", None) or "wandb run"
        self.reporter.wandb = WandbExtras(run, prefix=self.settings.log_key_prefix,
                                          heatmap_every_n_steps=self.settings.wandb_heatmap_every_n_steps)
        self.reporter.wandb.define_metrics()

    @property
    def wandb(self) -> Any:
        """The W&B extras of this run, or None."""
        return self.reporter.wandb

    def _finish_step(self, step: int, is_global_zero: bool) -> dict[str, float] | None:
        """After the optimizer step: the core's emission, and what is new to the alerts and W&B."""
        core = self.core
        metrics = core.end_step()
        if is_global_zero:
            sample = bool(metrics) and core.probes.sampled
            findings, actions, records = core.responder.findings, core.responder.actions_taken, core.forensics
            if sample or self.reporter.behind(findings, actions, records):  # alerts, W&B: each guarded
                self.reporter.report(step, findings, actions, head_maps=core.last_head_maps if sample else None,
                                     attention_modules=core.attention_modules, records=records)
            if metrics and self.reporter.wandb is not None:
                self.reporter.add_series(step, split_layers(metrics)[1])
        return metrics

    def _finish_training(self, is_global_zero: bool) -> dict[str, float] | None:
        """End of training: the hooks come off, the last interval is emitted, the sinks finish,
        and the summary is printed (rank 0, ``verbose``)."""
        core = self.core
        core.close()
        metrics = core.flush()
        if is_global_zero and core.step is not None:
            self.reporter.report(core.step, core.findings, core.actions_taken)
        self.reporter.finish(core.step)
        if self.settings.verbose and is_global_zero:
            print(self.summary(), flush=True)
        return metrics

    def _say(self, key: str, message: str) -> None:
        """A warning, once per run."""
        if self.core is not None:
            self.core.guard.warn_once(key, message)

    # -- checkpoints -----------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return self.core.state_dict() if self.core is not None else (self._pending_state or {})

    def _load_state(self, state: dict[str, Any]) -> None:
        """Into the core when there is one (its old findings count as reported), else kept for it."""
        if not state:
            return
        if self.core is None:
            self._pending_state = dict(state)
            return
        self.core.load_state_dict(state)
        self.reporter.skip_to(self.core.findings, self.core.actions_taken, self.core.forensics)
