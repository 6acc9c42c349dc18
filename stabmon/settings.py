"""The monitor's settings as the trainer adapters take them (Lightning, Hugging Face), checked once."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from stabmon._validation import check_bool, check_optional_instance, check_positive_int
from stabmon.alerts import AlertChannel, AlertDispatcher
from stabmon.core import MonitorCore, check_clip_grad_norm
from stabmon.detectors import DetectionConfig, Finding
from stabmon.interventions import Action, InterventionConfig
from stabmon.probes.sharpness import SharpnessConfig

__all__ = ["MonitorOutputs", "MonitorSettings"]


@dataclass(frozen=True)
class MonitorSettings:
    """The arguments shared by ``StabilityMonitor`` and ``StabilityMonitorCallback`` (documented
    there). A wrong value fails here, at construction, with the argument's name.

    Example:
        >>> MonitorSettings(sample_every_n_steps=10).sharpness_config.every_n_steps
        2000
        >>> MonitorSettings(sample_every_n_steps=0)
        Traceback (most recent call last):
        ...
        ValueError: `sample_every_n_steps` must be a positive int, got 0
    """

    sample_every_n_steps: int = 50
    log_every_n_steps: int | None = None
    sharpness_every_n_steps: int | None = 2000
    sharpness: SharpnessConfig | None = None
    observe_only: bool = False
    detection: DetectionConfig | None = DetectionConfig()
    intervention: InterventionConfig | None = InterventionConfig()
    alerts: Sequence[AlertChannel] = ()
    wandb_heatmap_every_n_steps: int = 500
    attention: bool = True
    logits: bool = True
    gradients: bool = True
    per_layer: bool = True
    compiled_probe_rows: int = 4
    clip_grad_norm: float | None = None
    log_key_prefix: str = "stabmon"
    verbose: bool = True
    strict: bool | None = None
    sharpness_config: SharpnessConfig | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        check_positive_int("sample_every_n_steps", self.sample_every_n_steps)
        check_positive_int("log_every_n_steps", self.log_every_n_steps, allow_none=True)
        check_positive_int("sharpness_every_n_steps", self.sharpness_every_n_steps, allow_none=True)
        check_optional_instance("sharpness", self.sharpness, SharpnessConfig)
        check_optional_instance("detection", self.detection, DetectionConfig)
        check_optional_instance("intervention", self.intervention, InterventionConfig)
        for name in ("observe_only", "attention", "logits", "gradients", "per_layer", "verbose"):
            check_bool(name, getattr(self, name))
        if self.strict is not None:
            check_bool("strict", self.strict)
        alerts = list(self.alerts)
        bad = [a for a in alerts if not isinstance(a, AlertChannel)]
        if bad:
            raise ValueError(f"`alerts` must hold stabmon.alerts channels (LogAlert, WandbAlert, WebhookAlert), "
                             f"got {type(bad[0]).__name__}")
        check_positive_int("wandb_heatmap_every_n_steps", self.wandb_heatmap_every_n_steps)
        check_positive_int("compiled_probe_rows", self.compiled_probe_rows)
        check_clip_grad_norm(self.clip_grad_norm, self.gradients)
        if not isinstance(self.log_key_prefix, str):
            raise ValueError(f"`log_key_prefix` must be a str, got {self.log_key_prefix!r}")
        object.__setattr__(self, "alerts", tuple(alerts))
        object.__setattr__(self, "log_key_prefix", self.log_key_prefix.rstrip("/"))
        strict = self.strict if self.strict is not None else os.environ.get("STABMON_STRICT", "") not in ("", "0")
        object.__setattr__(self, "strict", strict)
        if self.sharpness_every_n_steps is not None:
            config = replace(self.sharpness or SharpnessConfig(), every_n_steps=self.sharpness_every_n_steps)
            object.__setattr__(self, "sharpness_config", config)

    def dispatcher(self) -> AlertDispatcher | None:
        return AlertDispatcher(list(self.alerts)) if self.alerts else None

    def make_core(self, model: torch.nn.Module, default_log_every_n_steps: int) -> MonitorCore:
        """The monitor for ``model``; ``log_every_n_steps`` defaults to the trainer's cadence."""
        return MonitorCore(
            model,
            sample_every_n_steps=self.sample_every_n_steps,
            log_every_n_steps=self.log_every_n_steps or max(1, default_log_every_n_steps),
            sharpness=self.sharpness_config,
            detection=self.detection,
            intervention=self.intervention,
            observe_only=self.observe_only,
            strict=self.strict,
            compiled_probe_rows=self.compiled_probe_rows,
            clip_grad_norm=self.clip_grad_norm,
            attention=self.attention,
            logits=self.logits,
            gradients=self.gradients,
            per_layer=self.per_layer,
        )


class MonitorOutputs:
    """What the trainer adapters show of their ``core`` (None until training sets it up)."""

    core: MonitorCore | None

    @property
    def findings(self) -> list[Finding]:
        """What the detectors found so far (``step``, ``signal``, ``severity``, ``value``, ``threshold``, ``message``)."""
        return self.core.findings if self.core is not None else []

    @property
    def actions_taken(self) -> list[Action]:
        """What the monitor did to the run (``step``, ``name``, ``detail``)."""
        return self.core.actions_taken if self.core is not None else []

    def summary(self) -> str:
        """The end-of-training table as text."""
        if self.core is None:
            return "stabmon: the monitor has not been set up by a training run yet."
        return self.core.summary.format(self.core.attention_modules)
