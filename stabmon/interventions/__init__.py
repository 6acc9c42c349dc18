"""Interventions: the escalation policy and the responder that carries it out (LR scale-down with
recovery, re-warm, lasting LR cut, skip step, rollback, stop, QK-clip), and gradient clipping."""

from stabmon.interventions.config import InterventionConfig, QKClipOverride
from stabmon.interventions.grad_clip import GradientClipper
from stabmon.interventions.lr import LRController, scale_lr_for_next_step
from stabmon.interventions.policy import Action, Decision, EscalationPolicy
from stabmon.interventions.qk_clip import QKClipper
from stabmon.interventions.qk_locate import NotClippable, QKLocation, locate_qk
from stabmon.interventions.responder import Responder, Response
from stabmon.interventions.snapshot import Snapshotter

__all__ = [
    "Action",
    "Decision",
    "EscalationPolicy",
    "GradientClipper",
    "InterventionConfig",
    "LRController",
    "NotClippable",
    "QKClipOverride",
    "QKClipper",
    "QKLocation",
    "Responder",
    "Response",
    "Snapshotter",
    "locate_qk",
    "scale_lr_for_next_step",
]
