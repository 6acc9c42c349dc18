"""Detectors: turn signal histories into Findings (severity, signal, value, threshold, why)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stabmon._validation import check_in, check_positive_float, check_positive_int
from stabmon.detectors.base import SEVERITIES, Detector, Finding
from stabmon.detectors.drift import DriftDetector
from stabmon.detectors.spike import SpikeDetector
from stabmon.detectors.threshold import NonFiniteDetector, ThresholdDetector, TrendDetector

__all__ = [
    "SEVERITIES",
    "DetectionConfig",
    "Detector",
    "DetectorSet",
    "DriftDetector",
    "Finding",
    "NonFiniteDetector",
    "SpikeDetector",
    "ThresholdDetector",
    "TrendDetector",
]


@dataclass(frozen=True)
class DetectionConfig:
    """Thresholds of the default detectors.

    Args:
        spike_z_warning: robust z-score of a loss or gradient-norm spike that is a warning.
            Default 6.
        spike_z_critical: z-score of a critical spike (the step is skipped). Default 12.
        spike_window: steps of history behind the median and MAD. Default 100.
        spike_warmup: steps before the spike detectors arm. Default 50.
        attention_logit_ceiling: max attention logit that is a warning. Default 100
            (healthy models stay in the tens; divergent ones reach thousands).
        attention_logit_growth: growth factor of the max attention logit over
            ``trend_lookback`` samples that is a warning, once it is above 20. Default 3.
        entropy_floor: per-layer minimum head entropy (nats) below which a layer has
            collapsed. Default 0.1.
        entropy_fall: factor by which a layer's entropy falls over ``trend_lookback``
            samples that is a warning, once it is below 1 nat. Default 2.
        logz_ceiling: output log-partition ``logits/logz_max`` that is a warning. Default 50.
        eos_ratio_ceiling: sharpness edge-of-stability ratio that is reported. Default 1.
        eos_ratio_severity: the severity of that finding. Default ``"info"``: Adam and SGD
            train at or above the edge of stability much of the time (Cohen et al. 2021, 2022;
            the example GPT's healthy run at lr 3e-3 reads 3.2 on its 4-row held batch at
            step 100), so crossing it is reported, not acted on. ``"warning"`` makes it a rung
            of the ladder.
        trend_lookback: samples (sampled steps) looked back over by the trend detectors. Default 5.
        loss_drift_window: steps in the trailing median of the slow-divergence detector, which warns
            when that median has stayed above its best by ``loss_drift_margin`` (absolute, and
            relative to the best: the larger) for as many steps again; a rise that follows an LR
            the schedule raised is not one. Default 50; None turns it off.
        loss_drift_margin: see ``loss_drift_window``. Default 0.05 (0.125 nats at a loss of 2.5).
        min_loss_scale: under fp16 mixed precision, the GradScaler's scale
            (``gradients/loss_scale``) below which the run is diverging: a critical finding.
            The scaler halves its scale at every step whose gradients overflow and skips that
            step, which is routine (not a finding) until the scale collapses; DeepSpeed and
            Megatron stop a run at their ``min_loss_scale`` of 1. Default 1; None turns it off.

    Example:
        >>> DetectionConfig(spike_z_warning=8).spike_z_critical
        12.0
    """

    spike_z_warning: float = 6.0
    spike_z_critical: float = 12.0
    spike_window: int = 100
    spike_warmup: int = 50
    attention_logit_ceiling: float = 100.0
    attention_logit_growth: float = 3.0
    entropy_floor: float = 0.1
    entropy_fall: float = 2.0
    logz_ceiling: float = 50.0
    eos_ratio_ceiling: float = 1.0
    eos_ratio_severity: str = "info"
    trend_lookback: int = 5
    min_loss_scale: float | None = 1.0
    loss_drift_window: int | None = 50
    loss_drift_margin: float = 0.05

    def __post_init__(self) -> None:
        for name in ("spike_z_warning", "spike_z_critical", "attention_logit_ceiling", "attention_logit_growth",
                     "entropy_floor", "entropy_fall", "logz_ceiling", "eos_ratio_ceiling"):
            check_positive_float(name, getattr(self, name))
        for name in ("spike_window", "spike_warmup", "trend_lookback"):
            check_positive_int(name, getattr(self, name))
        check_in("eos_ratio_severity", self.eos_ratio_severity, SEVERITIES)
        if self.min_loss_scale is not None:
            check_positive_float("min_loss_scale", self.min_loss_scale)
        if self.loss_drift_window is not None:
            check_positive_int("loss_drift_window", self.loss_drift_window)
        check_positive_float("loss_drift_margin", self.loss_drift_margin)
        if self.spike_z_critical < self.spike_z_warning:
            raise ValueError(f"`spike_z_critical` ({self.spike_z_critical}) must be >= `spike_z_warning` "
                             f"({self.spike_z_warning})")
        if self.spike_warmup > self.spike_window:
            raise ValueError(f"`spike_warmup` ({self.spike_warmup}) must not exceed `spike_window` ({self.spike_window})")

    def build(self) -> DetectorSet:
        spike = dict(z_warning=self.spike_z_warning, z_critical=self.spike_z_critical, window=self.spike_window,
                     warmup=self.spike_warmup)
        return DetectorSet(
            per_step=[
                NonFiniteDetector(counts=()),
                SpikeDetector("loss/last", name="loss_spike", **spike),
                SpikeDetector("gradients/norm", name="grad_norm_spike", **spike),
                *([ThresholdDetector("gradients/loss_scale", floor=self.min_loss_scale, severity="critical",
                                     explain=" (fp16: the GradScaler keeps finding inf/NaN gradients)",
                                     name="loss_scale_floor")] if self.min_loss_scale is not None else []),
                *([DriftDetector("loss/last", window=self.loss_drift_window, patience=self.loss_drift_window,
                                 abs_margin=self.loss_drift_margin, rel_margin=self.loss_drift_margin,
                                 name="loss_drift")] if self.loss_drift_window is not None else []),
            ],
            sampled=[
                NonFiniteDetector(signals=()),  # loss and gradient norm are checked every step already
                ThresholdDetector("attention/max_logit", ceiling=self.attention_logit_ceiling,
                                  explain=" (attention-logit growth; qk-layernorm prevents it)"),
                TrendDetector("attention/max_logit", factor=self.attention_logit_growth, lookback=self.trend_lookback,
                              active_above=20.0),
                ThresholdDetector("attention/entropy_min", floor=self.entropy_floor,
                                  explain=" nats (attention entropy collapse)"),
                TrendDetector("attention/entropy_min", factor=self.entropy_fall, lookback=self.trend_lookback,
                              direction="down", active_below=1.0),
                ThresholdDetector("logits/logz_max", ceiling=self.logz_ceiling,
                                  explain=" (output-logit divergence; z-loss keeps log Z near 0)"),
                ThresholdDetector("sharpness/eos_ratio", ceiling=self.eos_ratio_ceiling, severity=self.eos_ratio_severity,
                                  explain=" (past the edge of stability: the step is too large for the curvature)"),
            ],
        )


class DetectorSet:
    """The per-step detectors (loss, gradient norm) and the sampled-signal detectors."""

    def __init__(self, per_step: list[Detector], sampled: list[Detector]) -> None:
        self.per_step, self.sampled = per_step, sampled
        # signal families the sampled detectors read: the rest of an emission is not shown to them
        self._families = {name.split("/", 1)[0] for d in sampled
                          for name in (getattr(d, "signal", None), *getattr(d, "signals", ()), *getattr(d, "counts", ()))
                          if name}

    def on_step(self, step: int, values: dict[str, float]) -> list[Finding]:
        return [f for d in self.per_step for f in d.update(step, values)]

    def on_sample(self, step: int, values: dict[str, float]) -> list[Finding]:
        families = self._families
        relevant = {k: v for k, v in values.items() if k.split("/", 1)[0] in families}
        if not relevant:
            return []
        return [f for d in self.sampled for f in d.update(step, relevant)]

    def quiet_until(self, step: int, names: tuple[str, ...] = ("loss_spike", "grad_norm_spike", "loss_drift")) -> None:
        """Expected rise (the monitor's own intervention): those detectors neither alarm nor learn."""
        for d in self.per_step + self.sampled:
            if d.name in names:
                d.quiet_until(step)

    def state_dict(self) -> dict[str, Any]:
        return {
            "per_step": [d.state_dict() for d in self.per_step],
            "sampled": [d.state_dict() for d in self.sampled],
            "per_step_names": [d.name for d in self.per_step],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # By name where the state says (a detector switched on or off since it was saved keeps the rest
        # in place); by position for states of earlier versions.
        names = state.get("per_step_names") or [d.name for d in self.per_step][:len(state["per_step"])]
        saved = dict(zip(names, state["per_step"]))
        for d in self.per_step:
            if d.name in saved:
                d.load_state_dict(saved[d.name])
        for d, s in zip(self.sampled, state["sampled"]):
            d.load_state_dict(s)
