"""Interventions: LR scale-down with recovery, re-warm, skip step, rollback, stop; the policy."""

from stabmon.interventions.lr import LRController, scale_lr_for_next_step
from stabmon.interventions.policy import Action, Decision, EscalationPolicy, InterventionConfig
from stabmon.interventions.snapshot import Snapshotter

__all__ = [
    "Action",
    "Decision",
    "EscalationPolicy",
    "InterventionConfig",
    "LRController",
    "Snapshotter",
    "scale_lr_for_next_step",
]
