"""The two Lightning namespaces, ``pytorch_lightning`` and ``lightning.pytorch``.

They ship the same classes twice: ``lightning.pytorch.Callback is pytorch_lightning.Callback``
is False, and so are the Trainers, the loggers and the rank-zero helpers. The monitor
derives from the ``Callback`` of every namespace that is installed (either one alone, or
both), and asks the Trainer it runs in which namespace to use for everything else.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

__all__ = ["CALLBACK_BASES", "NAMESPACES", "logger_kind", "namespace_of"]


def _import(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


NAMESPACES: tuple[ModuleType, ...] = tuple(
    ns for ns in (_import("pytorch_lightning"), _import("lightning.pytorch")) if ns is not None
)
if not NAMESPACES:
    raise ImportError(
        "stabmon.StabilityMonitor is a Lightning callback: install `pytorch-lightning` or `lightning` "
        "(pip install pytorch-lightning)"
    )

CALLBACK_BASES: tuple[type, ...] = tuple(ns.Callback for ns in NAMESPACES)


def namespace_of(trainer: Any) -> ModuleType:
    """The namespace whose ``Trainer`` class ``trainer`` is (the first installed one otherwise)."""
    for ns in NAMESPACES:
        if isinstance(trainer, ns.Trainer):
            return ns
    return NAMESPACES[0]


def logger_kind(logger: Any, ns: ModuleType) -> str:
    """``"wandb"``, ``"tensorboard"`` or ``"other"`` for a logger of namespace ``ns``.

    Loggers are imported lazily by Lightning itself, so the classes are looked up by name.
    """
    loggers = ns.loggers
    if isinstance(logger, getattr(loggers, "WandbLogger", ())):
        return "wandb"
    if isinstance(logger, getattr(loggers, "TensorBoardLogger", ())):
        return "tensorboard"
    return "other"
