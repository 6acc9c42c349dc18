"""Healthy snapshots of model and optimizer state, and rollback to them.

A snapshot copies each rank's own part of the state: whole tensors on one process, the local
shards of DTensor parameters and optimizer state under FSDP2 (``fully_shard``). Under DDP the
ranks hold the same state, so one copy serves the job: the first snapshot checks that the
ranks' states are identical (one all-reduce of fingerprints), and from then on only rank 0
copies; a rollback broadcasts its copy to every rank. Restoring copies the values back into
the live tensors in place, so a rollback leaves every parameter, buffer and optimizer-state
shard bit-identical to the snapshot, and nothing is re-sharded or re-allocated. The learning
rates the scheduler set now are kept, so the schedule goes on where it is.

In memory, with ``asynchronous=True`` (as the monitor runs it), the step that names the snapshot
returns at once while a thread (on CUDA: a side stream into pinned host memory) copies; the copy
is waited for before the next optimizer step changes the weights (``wait``), and before a restore. The host buffers
are reused from one snapshot to the next, so a job holds one copy, not two.

Before the first copy the host's free memory is checked: a copy that would take more than
half of it goes to ``fallback_dir`` on disk (said once), or, without one, snapshots stop with a
message. With ``directory`` the snapshot goes to disk: ``torch.save`` of the copies, or
``torch.distributed.checkpoint`` (each rank writes its shards) when the model is sharded.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from stabmon.distributed import is_dtensor, local_tensor
from stabmon.interventions._snapshot_copy import INLINE, HostCopy, Meta, describe, fingerprint
from stabmon.interventions._snapshot_copy import tensors as all_tensors

__all__ = ["Snapshotter"]

_FILE = "stabmon-snapshot.pt"
_DCP_DIR = "stabmon-snapshot-dcp"
_HOST_SHARE = 0.5  # a snapshot may take at most this share of the host's available memory


def _dist() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


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
    """Keeps the last healthy (model, optimizer) state, in host memory or on disk.

    Args:
        directory: where snapshots go on disk; None keeps them in host memory.
        asynchronous: copy in the background in memory; the caller must ``wait`` before the
            weights change (the monitor does, before each optimizer step). Default False: the copy
            is made within ``take``.
        fallback_dir: where snapshots go when one would not fit in host memory; None stops them.

    Example:
        >>> m = torch.nn.Linear(2, 1); opt = torch.optim.SGD(m.parameters(), lr=0.1)
        >>> snap = Snapshotter(asynchronous=True); snap.take(5, m, opt)
        >>> snap.wait()  # the copy runs in the background until the weights are to change
        >>> _ = m.weight.data.fill_(7.0)
        >>> snap.restore(m, opt), bool((m.weight != 7.0).all())
        (5, True)
    """

    def __init__(self, directory: str | Path | None = None, *, asynchronous: bool = False,
                 fallback_dir: str | Path | None = None) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.asynchronous = asynchronous
        self.fallback_dir = Path(fallback_dir) if fallback_dir is not None else None
        self.step: int | None = None
        self.replicated: bool | None = None  # settled at the first snapshot
        self.notes: list[str] = []
        self._state: dict[str, Any] | None = None
        self._copier = HostCopy()

    @property
    def available(self) -> bool:
        """True once a snapshot was taken."""
        return self.step is not None

    @property
    def busy(self) -> bool:
        """True while a copy is in flight (``wait`` for it before the weights change)."""
        return self._copier.busy

    @property
    def keeps_copy(self) -> bool:
        """Whether this rank holds a copy (under DDP only rank 0 does)."""
        dist = _dist()
        return not (self.replicated and dist is not None and dist.get_rank() != 0)

    def restorable(self) -> bool:
        """True when the snapshot can still be read (its files, with ``directory``, are there)."""
        if self.step is None:
            return False
        if self.directory is None or self._state is not None or not self.keeps_copy:
            return True
        return (self.directory / _FILE).is_file() or (self.directory / _DCP_DIR).is_dir()

    @staticmethod
    def _params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
        return [p for group in optimizer.param_groups for p in group["params"]]

    def _live(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
        return {"model": dict(model.state_dict(keep_vars=True)),
                "optimizer": None if optimizer is None else
                [optimizer.state[p] if p in optimizer.state else None for p in self._params(optimizer)]}

    def wait(self) -> None:
        """Block until the copy in flight (if any) is complete; its errors are raised here."""
        try:
            self._copier.wait()
        except RuntimeError:
            self.step, self._state = None, None  # a half-made copy is no snapshot
            raise

    # -- taking -------------------------------------------------------------------------------
    def take(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        self.wait()
        sharded = any(is_dtensor(p) for p in model.parameters())
        if self.replicated is None:
            self._settle(model, optimizer, sharded)
        if self.directory is not None and sharded:
            self._save_distributed(model, optimizer)
        elif self.keeps_copy:
            live = self._live(model, optimizer)
            if self.directory is not None:  # written aside, then renamed: a failed write keeps the last snapshot
                state = self._copier.start(live, asynchronous=False)
                self.directory.mkdir(parents=True, exist_ok=True)
                torch.save(state, self.directory / f"{_FILE}.tmp")
                os.replace(self.directory / f"{_FILE}.tmp", self.directory / _FILE)
                self._copier = HostCopy()  # the file holds it: no host buffers kept
            else:
                # Buffers (BatchNorm statistics) change in the next forward: copied now. Parameters and
                # optimizer state change only in the next optimizer step: copied in the background.
                params = {id(p) for p in model.parameters()}
                moving = {k: v for k, v in live["model"].items() if id(v) not in params}
                live["model"] = {k: v for k, v in live["model"].items() if id(v) in params}
                buffers = HostCopy().start(moving, asynchronous=False)  # a failure here leaves the last snapshot
                try:
                    state = self._copier.start(live, asynchronous=self.asynchronous)
                except BaseException:
                    self.step, self._state = None, None  # its host buffers are partly overwritten
                    raise
                state["model"].update(buffers)
                self._state = state
        self.step = step

    def _settle(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, sharded: bool) -> None:
        """At the first snapshot, on every rank: are the states replicated (DDP), and does a copy fit
        in host memory? One all-reduce of fingerprints and flags; the same answer on every rank."""
        from stabmon.memory import free_memory

        dist = _dist()
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        failure = None
        device = next(iter(model.parameters()), torch.empty(0)).device  # where the collective's backend wants it
        mine, flags = torch.zeros(3, dtype=torch.float64), [0.0, 0.0]
        try:  # a rank that fails here must still join the all-reduce: its failure travels in it
            live = self._live(model, optimizer)
            tensors = [local_tensor(t) for t in all_tensors(live)]
            need = sum(t.numel() * t.element_size() for t in tensors)
            free = free_memory("cpu")
            flags = [float(need > _HOST_SHARE * free), float(need * local_ranks > _HOST_SHARE * free)]
            if dist is not None and not sharded:
                mine = fingerprint(tensors)
        except Exception as err:  # noqa: BLE001 - raised below, on every rank alike
            if dist is None:
                raise
            failure = err
        if dist is None:
            self.replicated, too_big = False, bool(flags[0])
        else:
            stats = torch.cat([mine, -mine, torch.tensor([*flags, float(failure is not None)],
                                                         dtype=torch.float64)]).to(device)
            dist.all_reduce(stats, op=dist.ReduceOp.MAX)
            if stats[8] > 0:
                raise RuntimeError("the first snapshot could not be prepared on some rank" +
                                   (f": {failure!r}" if failure is not None else " (this one was fine)"))
            self.replicated = not sharded and bool(torch.equal(stats[:3], -stats[3:6]))
            too_big = bool(stats[6] if self.replicated else stats[7])
        if too_big and self.directory is None:
            copies = 1 if self.replicated or dist is None else local_ranks
            what = (f"a snapshot needs {need * copies / 2**30:.1f} GiB of host memory ({copies} "
                    f"cop{'y' if copies == 1 else 'ies'} per host) and {free / 2**30:.1f} GiB are available")
            if self.fallback_dir is None:
                raise RuntimeError(f"{what}; set InterventionConfig.snapshot_dir to keep snapshots on disk")
            self.directory = self.fallback_dir
            self.notes.append(f"stabmon: {what}: snapshots go to {self.directory} instead.")

    # -- restoring ----------------------------------------------------------------------------
    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
        """Load the snapshot into ``model`` and ``optimizer``; returns the snapshot's step."""
        self.wait()
        if self.step is None:
            raise RuntimeError("no snapshot to restore")
        if self.directory is not None and (self.directory / _DCP_DIR).exists():
            self._load_distributed(model, optimizer)
            return self.step
        dist = _dist()
        if self.replicated and dist is not None:
            self._restore_broadcast(dist, model, optimizer)
            return self.step
        self._write_state(self._read(), model, optimizer)
        return self.step

    def _read(self) -> dict[str, Any]:
        return self._state if self._state is not None else torch.load(self.directory / _FILE, weights_only=False)

    def _write_state(self, state: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                     fill: Callable[[torch.Tensor], None] | None = None) -> None:
        """Write ``state`` into the live tensors. ``fill(target)``: where a rank has no copy, the
        values arrive into each target (a broadcast) instead of being copied from ``state``."""
        live = model.state_dict(keep_vars=True)
        for name, saved in state["model"].items():
            self._put(live[name], saved, None, fill)
        if optimizer is not None and state["optimizer"] is not None:
            for p, saved in zip(self._params(optimizer), state["optimizer"]):
                if saved is None:
                    optimizer.state.pop(p, None)  # no state at the snapshot: the optimizer starts it afresh
                    continue
                current = optimizer.state[p]
                for key in [k for k in current if k not in saved]:
                    del current[key]
                for key, value in saved.items():
                    current[key] = self._put(current.get(key), value, p, fill)

    @staticmethod
    def _put(live: Any, saved: Any, param: torch.Tensor | None, fill: Callable[[torch.Tensor], None] | None) -> Any:
        if fill is None or not isinstance(saved, Meta):
            return _write(live, saved, param)
        target = live if isinstance(live, torch.Tensor) and local_tensor(live).shape == saved.shape else None
        if target is None:
            device = local_tensor(param).device if param is not None and saved.shape else torch.device("cpu")
            target = torch.empty(saved.shape, dtype=saved.dtype, device=device)
        fill(local_tensor(target))
        return target

    def _restore_broadcast(self, dist: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        """Rank 0 describes its copy (shapes; small tensors and plain values inline) in one object
        broadcast, then every large tensor follows into the live tensors of every rank. A rank 0
        that cannot read its copy says so in the description: every rank raises, none waits."""
        described: list[Any] = [None]
        state = None
        if dist.get_rank() == 0:
            try:
                state = self._read()
                described[0] = describe(state)
            except Exception as err:  # noqa: BLE001 - travels to every rank, raised there
                described[0] = RuntimeError(f"rank 0 could not read its snapshot: {err!r}")
        dist.broadcast_object_list(described, src=0)
        if isinstance(described[0], BaseException):
            raise described[0]
        source = iter([t for t in all_tensors(state) if t.numel() > INLINE] if state is not None else [])

        def fill(target: torch.Tensor) -> None:
            if state is not None:
                target.copy_(next(source))
            dist.broadcast(target, src=0)

        with torch.no_grad():
            self._write_state(described[0], model, optimizer, fill)

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
