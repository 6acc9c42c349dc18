"""Healthy snapshots of model and optimizer state, and rollback to them."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

__all__ = ["Snapshotter"]


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return copy.deepcopy(obj)


class Snapshotter:
    """Keeps the last healthy (model, optimizer) state, in CPU memory or in a file.

    The snapshot covers the whole model as ``model.state_dict()`` sees it (under FSDP use
    a full state dict; see the README) and the optimizer's state. Restoring keeps the
    learning rates that the scheduler set now, so the schedule goes on where it is.

    Example:
        >>> m = torch.nn.Linear(2, 1); opt = torch.optim.SGD(m.parameters(), lr=0.1)
        >>> snap = Snapshotter(); snap.take(5, m, opt)
        >>> _ = m.weight.data.fill_(7.0)
        >>> snap.restore(m, opt), bool((m.weight != 7.0).all())
        (5, True)
    """

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.step: int | None = None
        self._state: dict[str, Any] | None = None

    @property
    def available(self) -> bool:
        return self.step is not None

    def take(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        state = {"model": _to_cpu(model.state_dict()),
                 "optimizer": _to_cpu(optimizer.state_dict()) if optimizer is not None else None}
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            torch.save(state, self.directory / "stabmon-snapshot.pt")
        else:
            self._state = state
        self.step = step

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
        """Load the snapshot into ``model`` and ``optimizer``; returns the snapshot's step."""
        if self.step is None:
            raise RuntimeError("no snapshot to restore")
        state = self._state
        if state is None:
            state = torch.load(self.directory / "stabmon-snapshot.pt", weights_only=False)
        model.load_state_dict(state["model"])
        if optimizer is not None and state["optimizer"] is not None:
            lrs = [g["lr"] for g in optimizer.param_groups]
            optimizer.load_state_dict(state["optimizer"])
            for g, lr in zip(optimizer.param_groups, lrs):
                g["lr"] = lr
        return self.step
