"""Lightning callbacks: the only part of stabmon that imports Lightning."""

from stabmon.callbacks.stability_monitor import StabilityMonitor

__all__ = ["StabilityMonitor"]
