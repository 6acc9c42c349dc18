"""Interventions: LR scale-down with recovery, re-warm, lasting LR cut, skip step, rollback,
stop, QK-clip; the policy."""

from stabmon.interventions.lr import LRController, scale_lr_for_next_step
from stabmon.interventions.policy import Action, Decision, EscalationPolicy, InterventionConfig
from stabmon.interventions.qk_clip import QKClipOverride, QKClipper
from stabmon.interventions.qk_locate import NotClippable, QKLocation, locate_qk
from stabmon.interventions.snapshot import Snapshotter

__all__ = [
    "Action",
    "Decision",
    "EscalationPolicy",
    "InterventionConfig",
    "LRController",
    "NotClippable",
    "QKClipOverride",
    "QKClipper",
    "QKLocation",
    "Snapshotter",
    "locate_qk",
    "scale_lr_for_next_step",
]
