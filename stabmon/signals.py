"""Signals: named scalars with their cross-rank reduction, read from the device once.

A probe adds device tensors; nothing is synchronised until ``SignalSet.reduce`` packs
the values by reduction into at most three tensors, all-reduces them (when a process
group is up) and reads them to the host in one go. Means travel as (total, count) so
that ranks combine exactly: never a mean of means.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["SignalSet", "AllReduce", "torch_distributed_all_reduce"]

# all_reduce(tensor, op) -> reduced tensor, op one of "sum", "max", "min".
AllReduce = Callable[[torch.Tensor, str], torch.Tensor]


class SignalSet:
    """Collects scalar signals with a declared reduction.

    Example:
        >>> s = SignalSet()
        >>> s.add_max("attention/max_logit", torch.tensor(3.0))
        >>> s.add_mean("loss/mean", torch.tensor(6.0), torch.tensor(3))
        >>> s.add_min_of_means("entropy_min", torch.tensor([2.0, 9.0]), torch.tensor([2, 3]))
        >>> s.reduce()
        {'attention/max_logit': 3.0, 'loss/mean': 2.0, 'entropy_min': 1.0}
    """

    def __init__(self) -> None:
        # name -> (kind, tensors); kind in sum / max / min / mean / min_of_means
        self._entries: dict[str, tuple[str, tuple[torch.Tensor, ...]]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def add_sum(self, name: str, value: torch.Tensor) -> None:
        self._entries[name] = ("sum", (value.detach().reshape(1),))

    def add_max(self, name: str, value: torch.Tensor) -> None:
        self._entries[name] = ("max", (value.detach().reshape(1),))

    def add_min(self, name: str, value: torch.Tensor) -> None:
        self._entries[name] = ("min", (value.detach().reshape(1),))

    def add_mean(self, name: str, total: torch.Tensor, count: torch.Tensor) -> None:
        """A mean over ranks computed as sum(total) / sum(count); omitted when the count is 0."""
        self._entries[name] = ("mean", (total.detach().reshape(1), count.detach().reshape(1)))

    def add_min_of_means(self, name: str, totals: torch.Tensor, counts: torch.Tensor) -> None:
        """``min_i sum(totals_i) / sum(counts_i)`` over the ``i`` with a count (e.g. heads)."""
        self._entries[name] = ("min_of_means", (totals.detach().reshape(-1), counts.detach().reshape(-1)))

    def reduce(self, all_reduce: AllReduce | None = None) -> dict[str, float]:
        """Reduce across ranks (when ``all_reduce`` is given) and read to the host: one sync."""
        if not self._entries:
            return {}
        # Pack every piece into one 1-D tensor per reduction op; remember where each went.
        packs: dict[str, list[torch.Tensor]] = {"sum": [], "max": [], "min": []}
        where: dict[str, list[tuple[str, int, int]]] = {}
        offsets = {"sum": 0, "max": 0, "min": 0}
        for name, (kind, parts) in self._entries.items():
            op = kind if kind in packs else "sum"
            where[name] = []
            for part in parts:
                packs[op].append(part)
                where[name].append((op, offsets[op], offsets[op] + part.numel()))
                offsets[op] += part.numel()
        host: dict[str, list[float]] = {}
        for op, parts in packs.items():
            if not parts:
                continue
            device = parts[0].device
            packed = torch.cat([p.to(device=device, dtype=torch.float64) for p in parts])
            if all_reduce is not None:
                packed = all_reduce(packed, op)
            host[op] = packed.tolist()
        out: dict[str, float] = {}
        for name, (kind, _) in self._entries.items():
            values = [host[op][a:b] for op, a, b in where[name]]
            if kind in ("sum", "max", "min"):
                out[name] = values[0][0]
            elif kind == "mean":
                if values[1][0] > 0:
                    out[name] = values[0][0] / values[1][0]
            else:
                means = [t / c for t, c in zip(*values) if c > 0]
                if means:
                    out[name] = min(means)
        return out


def torch_distributed_all_reduce(tensor: torch.Tensor, op: str) -> torch.Tensor:
    """``AllReduce`` over the default torch.distributed process group (no-op without one)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
    tensor = tensor.clone()
    dist.all_reduce(tensor, op=reduce_op)
    return tensor
