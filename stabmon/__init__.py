"""stabmon: a training-stability monitor. It measures the signs that come before a divergence
(attention entropy and logits, output logits, gradient norms, Hessian sharpness), detects
instability and acts on it (QK-clip, LR rungs, skip, rollback, stop), in a PyTorch Lightning
callback (``StabilityMonitor``), a Hugging Face ``TrainerCallback``
(``stabmon.integrations.transformers``) or a plain loop (``MonitorCore``).

``import stabmon`` is light: Lightning is imported only when ``StabilityMonitor`` is
first touched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from stabmon._failsoft import StabmonWarning
from stabmon.core import MonitorCore
from stabmon.detectors import DetectionConfig, Finding
from stabmon.forensics import ForensicsConfig
from stabmon.interventions import Action, InterventionConfig
from stabmon.memory import MemoryBudget, memory_plan
from stabmon.probes.capture import record_attention
from stabmon.probes.sharpness import SharpnessConfig
from stabmon.settings import MonitorOptions

if TYPE_CHECKING:
    from stabmon.callbacks.stability_monitor import StabilityMonitor

__version__ = "0.1.0"
__all__ = [
    "Action",
    "DetectionConfig",
    "Finding",
    "ForensicsConfig",
    "InterventionConfig",
    "MemoryBudget",
    "MonitorCore",
    "MonitorOptions",
    "SharpnessConfig",
    "StabilityMonitor",
    "StabmonWarning",
    "memory_plan",
    "record_attention",
]


def __getattr__(name: str) -> Any:
    if name == "StabilityMonitor":
        from stabmon.callbacks.stability_monitor import StabilityMonitor

        return StabilityMonitor
    raise AttributeError(f"module 'stabmon' has no attribute {name!r}")
