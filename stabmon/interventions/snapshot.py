"""Healthy snapshots of model and optimizer state, and rollback to them.

A snapshot copies each rank's own part of the state: whole tensors on one process or under
DDP, the local shards of DTensor parameters and optimizer state under FSDP2 (``fully_shard``).
Restoring copies the values back into the live tensors in place, so a rollback leaves
every parameter, buffer and optimizer-state shard bit-identical to the snapshot, and
nothing is re-sharded or re-allocated. The learning rates the scheduler set now are kept,
so the schedule goes on where it is.

With ``directory`` the snapshot goes to disk: ``torch.save`` of the copies, or
``torch.distributed.checkpoint`` (each rank writes its shards) when the model is sharded.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch

from stabmon.distributed import is_dtensor, local_tensor

__all__ = ["Snapshotter"]

_FILE = "stabmon-snapshot.pt"
_DCP_DIR = "stabmon-snapshot-dcp"


def _copy(value: Any) -> Any:
    """A CPU copy of this rank's part of ``value`` (tensors recursed into containers)."""
    if isinstance(value, torch.Tensor):
        return local_tensor(value).detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copy(v) for v in value)
    return copy.deepcopy(value)


def _write(live: Any, saved: Any, param: torch.Tensor | None = None) -> Any:
    """Copy ``saved`` into the tensor ``live`` in place; returns what the entry should hold.

    Without a live tensor of that shape (optimizer state that did not exist any more), a new
    tensor is made: a DTensor shard like ``param``'s, or a plain tensor (0-d ones, such as
    Adam's ``step``, stay on the CPU where torch keeps them).
    """
    if isinstance(live, torch.Tensor) and isinstance(saved, torch.Tensor):
        target = local_tensor(live)
        if target.shape == saved.shape:
            with torch.no_grad():
                target.copy_(saved)
            return live
    if not isinstance(saved, torch.Tensor):
        return copy.deepcopy(saved)
    if param is None or saved.dim() == 0:
        return saved.clone()
    value = saved.to(local_tensor(param).device, copy=True)
    if is_dtensor(param) and value.shape == local_tensor(param).shape:
        return type(param).from_local(value, param.device_mesh, param.placements, run_check=False)
    return value


class Snapshotter:
    """Keeps the last healthy (model, optimizer) state, in CPU memory or on disk.

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
        """True once a snapshot was taken."""
        return self.step is not None

    def restorable(self) -> bool:
        """True when the snapshot can still be read (its files, with ``directory``, are there)."""
        if self.step is None:
            return False
        if self.directory is None or self._state is not None:
            return True
        return (self.directory / _FILE).is_file() or (self.directory / _DCP_DIR).is_dir()

    @staticmethod
    def _params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
        return [p for group in optimizer.param_groups for p in group["params"]]

    def take(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        sharded = any(is_dtensor(p) for p in model.parameters())
        if self.directory is not None and sharded:
            self._save_distributed(model, optimizer)
        else:
            state = {
                "model": {name: _copy(t) for name, t in model.state_dict(keep_vars=True).items()},
                "optimizer": None if optimizer is None else
                [_copy(optimizer.state[p]) if p in optimizer.state else None for p in self._params(optimizer)],
            }
            if self.directory is not None:  # written aside, then renamed: a failed write keeps the last snapshot
                self.directory.mkdir(parents=True, exist_ok=True)
                torch.save(state, self.directory / f"{_FILE}.tmp")
                os.replace(self.directory / f"{_FILE}.tmp", self.directory / _FILE)
            else:
                self._state = state
        self.step = step

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
        """Load the snapshot into ``model`` and ``optimizer``; returns the snapshot's step."""
        if self.step is None:
            raise RuntimeError("no snapshot to restore")
        if self.directory is not None and (self.directory / _DCP_DIR).exists():
            self._load_distributed(model, optimizer)
            return self.step
        state = self._state if self._state is not None else torch.load(self.directory / _FILE, weights_only=False)
        live = model.state_dict(keep_vars=True)
        for name, saved in state["model"].items():
            _write(live[name], saved)
        if optimizer is not None and state["optimizer"] is not None:
            for p, saved in zip(self._params(optimizer), state["optimizer"]):
                if saved is None:
                    optimizer.state.pop(p, None)  # no state at the snapshot: the optimizer starts it afresh
                    continue
                current = optimizer.state[p]
                for key in [k for k in current if k not in saved]:
                    del current[key]
                for key, value in saved.items():
                    current[key] = _write(current.get(key), value, p)
        return self.step

    # -- sharded models on disk: torch.distributed.checkpoint ----------------------------------
    def _save_distributed(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        if optimizer is None:
            state = {"model": model.state_dict()}
        else:
            model_state, optim_state = get_state_dict(model, optimizer)
            state = {"model": model_state, "optimizer": optim_state}
        dcp.save(state, checkpoint_id=str(self.directory / _DCP_DIR))

    def _load_distributed(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        if optimizer is None:
            state = {"model": model.state_dict()}
            dcp.load(state, checkpoint_id=str(self.directory / _DCP_DIR))
            model.load_state_dict(state["model"])
            return
        lrs = [g["lr"] for g in optimizer.param_groups]
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        dcp.load(state, checkpoint_id=str(self.directory / _DCP_DIR))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr

