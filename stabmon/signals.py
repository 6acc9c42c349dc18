"""Signals: named scalars with their cross-rank reduction, read from the device once.

A probe adds device tensors (a scalar, or a vector that names one signal per element);
nothing is synchronised until ``SignalSet.reduce`` packs the pieces by reduction op, runs
at most one all-reduce per op (sum, max, min) when a process group is up, and reads
everything to the host with a single copy. Means travel as (total, count) and norms as
sums of squares, so that ranks combine exactly: never a mean of means, and a norm of
sharded parameters is the norm of the whole.

A value can carry a ``defined`` count: when the count summed over ranks is 0 (no finite
step in the interval, no live row) the signal is left out instead of reported as NaN.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from stabmon._failsoft import FailSoft

__all__ = ["AgreedEmission", "AgreedReduction", "AllReduce", "SignalSet", "active_all_reduce", "torch_distributed_all_reduce"]

# all_reduce(tensor, op) -> reduced tensor, op one of "sum", "max", "min".
AllReduce = Callable[[torch.Tensor, str], torch.Tensor]

_OPS = ("sum", "max", "min")


class SignalSet:
    """Collects signals with a declared reduction.

    Kinds (each ``add_*`` takes a scalar; ``names`` with a vector gives one signal per element):
    ``sum``, ``max``, ``min`` of the values over ranks; ``mean`` = sum(total) / sum(count);
    ``min_of_means`` = the smallest ``sum(total_i) / sum(count_i)`` (e.g. over heads);
    ``norm`` = sqrt(sum(squares)); ``ratio`` = sqrt(sum(a)) / sqrt(sum(b)) (norm ratios);
    ``add_host`` takes a float that is already on the host.

    Example:
        >>> s = SignalSet()
        >>> s.add_max("attention/max_logit", torch.tensor(3.0))
        >>> s.add_mean("loss/mean", torch.tensor(6.0), torch.tensor(3))
        >>> s.add_min_of_means("entropy_min", torch.tensor([2.0, 9.0]), torch.tensor([2, 3]))
        >>> s.add_norm(["norm/a", "norm/b"], torch.tensor([9.0, 16.0]))
        >>> s.add_max("empty", torch.tensor(float("-inf")), defined=torch.tensor(0.0))
        >>> s.reduce()
        {'attention/max_logit': 3.0, 'loss/mean': 2.0, 'entropy_min': 1.0, 'norm/a': 3.0, 'norm/b': 4.0}
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)  # where host values travel when there is no device entry
        # (kind, names, [(op, tensor)], defined tensor or None); names is a str or a list
        self._entries: list[tuple[str, str | Sequence[str], list[tuple[str, torch.Tensor]], torch.Tensor | None]] = []
        self._host: dict[str, tuple[float, str]] = {}

    def __len__(self) -> int:
        return sum(1 if isinstance(names, str) else len(names) for _, names, _, _ in self._entries) + len(self._host)

    def __contains__(self, name: str) -> bool:
        return name in self._host or any(
            name == names if isinstance(names, str) else name in names for _, names, _, _ in self._entries
        )

    def _add(self, kind: str, names: str | Sequence[str], parts: list[tuple[str, torch.Tensor]],
             defined: torch.Tensor | None = None) -> None:
        self._entries.append((kind, names, parts, defined))

    def add_sum(self, name: str | Sequence[str], value: torch.Tensor, defined: torch.Tensor | None = None) -> None:
        self._add("sum", name, [("sum", value)], defined)

    def add_max(self, name: str | Sequence[str], value: torch.Tensor, defined: torch.Tensor | None = None) -> None:
        self._add("max", name, [("max", value)], defined)

    def add_min(self, name: str | Sequence[str], value: torch.Tensor, defined: torch.Tensor | None = None) -> None:
        self._add("min", name, [("min", value)], defined)

    def add_mean(self, name: str | Sequence[str], total: torch.Tensor, count: torch.Tensor) -> None:
        """A mean over ranks computed as sum(total) / sum(count); omitted when the count is 0."""
        self._add("mean", name, [("sum", total), ("sum", count)])

    def add_min_of_means(self, name: str, totals: torch.Tensor, counts: torch.Tensor) -> None:
        """``min_i sum(totals_i) / sum(counts_i)`` over the ``i`` with a count (e.g. heads)."""
        self._add("min_of_means", name, [("sum", totals), ("sum", counts)])

    def add_norm(self, name: str | Sequence[str], squares: torch.Tensor) -> None:
        """``sqrt(sum over ranks of squares)``: the norm of a tensor split (or replicated and
        weighted) across ranks, from each rank's sum of squares."""
        self._add("norm", name, [("sum", squares)])

    def add_ratio(self, name: str | Sequence[str], num_squares: torch.Tensor, den_squares: torch.Tensor) -> None:
        """``sqrt(sum(num)) / sqrt(sum(den))``: a ratio of two norms (e.g. update over weight)."""
        self._add("ratio", name, [("sum", num_squares), ("sum", den_squares)])

    def add_host(self, name: str, value: float, op: str | None = "max") -> None:
        """A value already on the host; ``op`` combines it across ranks (sum, max or min), None
        for a value that is already the same on every rank."""
        self._host[name] = (float(value), op)

    def mark(self) -> int:
        """A point to go back to with ``truncate`` (a stage whose signals failed half-way)."""
        return len(self._entries)

    def truncate(self, mark: int, host_names: Sequence[str] = ()) -> None:
        del self._entries[mark:]
        for name in host_names:
            self._host.pop(name, None)

    def _pack(self, device: torch.device, travelling: list[str], fold_min: bool
              ) -> tuple[dict[str, list[torch.Tensor]], dict[str, int], list[list[tuple[str, int, int, bool]]],
                         dict[str, tuple[str, int, bool]]]:
        """The entries' pieces by reduction op, each piece's place, and the travelling host values'.
        ``fold_min``: min pieces travel negated in the max pack (two collectives instead of three)."""
        packs: dict[str, list[torch.Tensor]] = {op: [] for op in _OPS}
        sizes: dict[str, int] = dict.fromkeys(_OPS, 0)

        def place(op: str, flat: torch.Tensor) -> tuple[str, int, int, bool]:
            negate = fold_min and op == "min"
            op = "max" if negate else op
            packs[op].append(-flat if negate else flat)
            start = sizes[op]
            sizes[op] += flat.numel()
            return op, start, sizes[op], negate

        layout = []  # per entry: [(op, start, stop, negated)] of its parts, then of its defined count
        for _, _, parts, defined in self._entries:
            layout.append([place(op, tensor.detach().reshape(-1))
                           for op, tensor in (parts if defined is None else [*parts, ("sum", defined)])])
        host_where: dict[str, tuple[str, int, bool]] = {}
        for op in _OPS:
            names = [n for n in travelling if self._host[n][1] == op]
            if names:
                values = torch.tensor([self._host[n][0] for n in names], dtype=torch.float64, device=device)
                where = place(op, values)
                host_where.update((n, (where[0], where[1] + i, where[3])) for i, n in enumerate(names))
        for op in _OPS:  # a probe on another device (rare): bring its pieces over
            packs[op] = [p if p.device == device else p.to(device) for p in packs[op]]
        return packs, sizes, layout, host_where

    def _decode(self, flat: dict[str, list[float]], layout: list[list[tuple[str, int, int, bool]]],
                host_where: dict[str, tuple[str, int, bool]]) -> dict[str, float]:
        out: dict[str, float] = {}
        for (kind, names, _, defined), where in zip(self._entries, layout):
            values = [[-x for x in flat[op][a:b]] if negated else flat[op][a:b] for op, a, b, negated in where]
            keep = [c > 0 for c in values.pop()] if defined is not None else None
            results = _combine(kind, values)
            if isinstance(names, str):
                if results and (keep is None or keep[0]) and results[0] is not None:
                    out[names] = results[0]
            else:
                for i, name in enumerate(names):
                    if results[i] is not None and (keep is None or keep[i]):
                        out[name] = results[i]
        for name, (value, _) in self._host.items():
            where = host_where.get(name)
            out[name] = value if where is None else (-1 if where[2] else 1) * flat[where[0]][where[1]]
        return out

    def _device(self) -> torch.device:
        return self._entries[0][2][0][1].device if self._entries else self.device

    def reduce(self, all_reduce: AllReduce | None = None) -> dict[str, float]:
        """Reduce across ranks (when ``all_reduce`` is given) and read to the host: one copy."""
        all_reduce = active_all_reduce(all_reduce)
        travelling = [n for n, (_, op) in self._host.items() if op is not None] if all_reduce is not None else []
        if not self._entries and not travelling:
            return {name: value for name, (value, _) in self._host.items()}
        packs, sizes, layout, host_where = self._pack(self._device(), travelling, fold_min=False)
        present = [op for op in _OPS if packs[op]]
        if all_reduce is None:  # one concatenation, one copy to the host
            flat_host = torch.cat([p for op in present for p in packs[op]]).tolist()
        else:  # float64, so that sums of counts and of losses over ranks stay exact
            reduced = [all_reduce(torch.cat(packs[op]).to(torch.float64), op) for op in present]
            flat_host = (torch.cat(reduced) if len(reduced) > 1 else reduced[0]).tolist()
        flat, offset = {}, 0
        for op in present:
            flat[op] = flat_host[offset:offset + sizes[op]]
            offset += sizes[op]
        return self._decode(flat, layout, host_where)

    def reduce_agreed(self, all_reduce: AllReduce, flags: torch.Tensor, capacity: int) -> AgreedReduction:
        """Reduce over ranks that may not agree on what they hold (a stage that failed on one
        rank adds no signals there), without a collective that could mismatch.

        Two all-reduces (sum; max, with the minima negated), each of exactly ``capacity``
        values plus a header: the fail-soft ``flags`` (summed), and a checksum of this rank's
        layout with its size (max, and the checksum negated). ``values`` is None unless every
        rank had the same layout and it fit; ``needed`` is the largest layout over ranks.
        """
        travelling = [n for n, (_, op) in self._host.items() if op is not None]
        device = self._device()
        packs, sizes, layout, host_where = self._pack(device, travelling, fold_min=True)
        signature = repr([(kind, names, [t.numel() for _, t in parts], defined is not None)
                          for kind, names, parts, defined in self._entries] + sorted(travelling))
        check = float(zlib.crc32(signature.encode()) % (1 << 24))  # exact in float64
        fits = sizes["sum"] <= capacity and sizes["max"] <= capacity
        head_sum = torch.cat([flags.to(device, torch.float64), torch.tensor([0.0 if fits else 1.0], device=device,
                                                                            dtype=torch.float64)])
        head_max = torch.tensor([check, -check, float(max(sizes["sum"], sizes["max"]))], dtype=torch.float64,
                                device=device)
        body = {}
        for op, fill in (("sum", 0.0), ("max", -math.inf)):
            pieces = [p.to(torch.float64) for p in packs[op]] if fits else []
            used = sum(p.numel() for p in pieces)
            body[op] = torch.cat([*pieces, torch.full((capacity - used,), fill, dtype=torch.float64, device=device)])
        summed = all_reduce(torch.cat([head_sum, body["sum"]]), "sum").tolist()
        maxed = all_reduce(torch.cat([head_max, body["max"]]), "max").tolist()
        count = flags.numel()
        overflow, check_max, check_min, needed = summed[count], maxed[0], -maxed[1], int(maxed[2])
        values = None
        if overflow == 0 and check_max == check_min:
            flat = {"sum": summed[count + 1:], "max": maxed[3:], "min": []}
            values = self._decode(flat, layout, host_where)
        return AgreedReduction(values, summed[:count], needed)


@dataclass
class AgreedReduction:
    """What ``SignalSet.reduce_agreed`` gives back: the reduced ``values`` (None when the ranks
    held different signals), the summed fail-soft ``flags``, and the largest layout ``needed``."""

    values: dict[str, float] | None
    flags: list[float]
    needed: int


class AgreedEmission:
    """Reduces an emission over ranks that may not hold the same signals: a stage that failed on
    one rank adds none there. ``SignalSet.reduce_agreed`` says so without a mismatched collective;
    the stages that failed are then switched off on every rank (``FailSoft.settle``) and the
    signals are built and reduced again without them. The capacity of the packs grows to the
    largest layout seen (the same on every rank: the reduction tells each the largest).
    """

    def __init__(self, capacity: int = 256) -> None:
        self.capacity = capacity

    def reduce(self, build: Callable[[], SignalSet], all_reduce: AllReduce, guard: FailSoft,
               step: int | None) -> dict[str, float]:
        for _ in range(4):
            result = build().reduce_agreed(all_reduce, guard.flags(), self.capacity)
            newly = guard.settle(result.flags, step)
            if result.values is not None:
                return result.values
            if result.needed > self.capacity:
                self.capacity = 1 << (result.needed - 1).bit_length()
            elif not newly:
                guard.warn_once("ranks differ", f"stabmon: the ranks held different signals at step {step}; that "
                                                "emission is left out.")
                return {}
        return {}


def _combine(kind: str, values: list[list[float]]) -> list[float | None]:
    """Finish one entry from its reduced pieces; None where a signal is undefined."""
    if kind in _OPS:
        return values[0]
    if kind == "mean":
        return [t / c if c > 0 else None for t, c in zip(*values)]
    if kind == "norm":
        return [math.sqrt(max(s, 0.0)) if s == s else s for s in values[0]]
    if kind == "ratio":
        return [math.sqrt(max(a, 0.0)) / max(math.sqrt(max(b, 0.0)), 1e-12) if a == a and b == b else math.nan
                for a, b in zip(*values)]
    means = [t / c for t, c in zip(*values) if c > 0]  # min_of_means
    return [min(means) if means else None]


def active_all_reduce(all_reduce: AllReduce | None) -> AllReduce | None:
    """``all_reduce``, or None when it is the torch.distributed one and there is no second rank."""
    if all_reduce is torch_distributed_all_reduce and world_size() == 1:
        return None
    return all_reduce


def world_size() -> int:
    """Ranks in the default torch.distributed process group (1 without one)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def torch_distributed_all_reduce(tensor: torch.Tensor, op: str) -> torch.Tensor:
    """``AllReduce`` over the default torch.distributed process group (no-op without one)."""
    import torch.distributed as dist

    if world_size() == 1:
        return tensor
    reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
    tensor = tensor.clone()
    dist.all_reduce(tensor, op=reduce_op)
    return tensor
