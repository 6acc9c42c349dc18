"""Probes: capture of attention and logits, gradient, parameter and loss statistics."""

from stabmon.probes.attention import AttentionProbe
from stabmon.probes.capture import ForwardCapture, record_attention
from stabmon.probes.gradients import GradientProbe
from stabmon.probes.series import StepSeries
from stabmon.probes.logits import LogitProbe

__all__ = ["AttentionProbe", "ForwardCapture", "GradientProbe", "LogitProbe", "StepSeries", "record_attention"]
