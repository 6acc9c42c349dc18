"""Gradient probe: gradient, parameter and update norms, globally and per layer.

Per step (before the optimizer step) it computes one norm per gradient tensor with
torch's fused ``_foreach_norm`` and folds the global norm into running device
accumulators: no host sync. On sampled steps it also snapshots the parameters so that
the update-to-weight ratio ``||theta_after - theta_before|| / ||theta_before||`` can be
measured once the optimizer has stepped; this costs one copy of the trainable
parameters for the duration of the step, on sampled steps only.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable

import torch

from stabmon.signals import SignalSet

__all__ = ["GradientProbe", "LossProbe", "default_layer_name", "tensor_norms"]


def default_layer_name(param_name: str) -> str:
    """Group a parameter into its layer: the prefix up to the first numeric index.

    Example:
        >>> default_layer_name("transformer.h.3.attn.c_attn.weight")
        'transformer.h.3'
        >>> default_layer_name("lm_head.weight")
        'lm_head'
    """
    parts = param_name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) or param_name


def tensor_norms(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """L2 norm of each tensor as one float32 tensor ``(len(tensors),)`` on ``device``.

    Tensors are grouped by device and dtype so each group is one fused ``_foreach_norm``.
    """
    if not tensors:
        return torch.zeros(0, device=device)
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        groups[(t.device, t.dtype)].append(i)
    out = torch.empty(len(tensors), dtype=torch.float32, device=device)
    for idx in groups.values():
        dense = [tensors[i] for i in idx]
        if any(t.is_sparse for t in dense):
            norms = [t.coalesce().values().norm() if t.is_sparse else t.norm() for t in dense]
        else:
            norms = torch._foreach_norm(dense)
        out[torch.tensor(idx, device=device)] = torch.stack([n.float().to(device) for n in norms])
    return out


class GradientProbe:
    """Gradient statistics of the trainable parameters.

    Args:
        named_parameters: ``model.named_parameters()``; frozen ones are left out.
        layer_of: maps a parameter name to its layer name (default: ``default_layer_name``).

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> model(torch.ones(3, 4)).sum().backward()
        >>> probe = GradientProbe(model.named_parameters())
        >>> _ = probe.observe()
        >>> signals = SignalSet(); probe.signals(signals, prefix="gradients")
        >>> values = signals.reduce()
        >>> round(values["gradients/norm"], 4) == round(torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item(), 4)
        True
    """

    def __init__(
        self,
        named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
        layer_of: Callable[[str], str] = default_layer_name,
    ) -> None:
        named = [(n, p) for n, p in named_parameters if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.layers: list[str] = list(dict.fromkeys(layer_of(n) for n in self.names))
        index = {layer: i for i, layer in enumerate(self.layers)}
        self._layer_index = [index[layer_of(n)] for n in self.names]
        self._device = self.params[0].device if self.params else torch.device("cpu")
        self._before: list[torch.Tensor] | None = None
        self._update_sq: torch.Tensor | None = None
        self._weight_sq: torch.Tensor | None = None
        self.reset()

    def reset(self) -> None:
        """Start a new logging interval."""
        inf = torch.tensor(float("inf"), device=self._device)
        self._norm_max = -inf
        self._norm_min = inf
        self._norm_sum = torch.zeros((), device=self._device)
        self._steps = torch.zeros((), device=self._device)
        self._nonfinite_steps = torch.zeros((), device=self._device)
        self._last_norms: torch.Tensor | None = None  # (P,) per-parameter gradient norms
        self._last_present: list[int] = []
        self._update_sq = self._weight_sq = None

    @property
    def empty(self) -> bool:
        return not self.params

    @property
    def has_observed(self) -> bool:
        """True once a gradient was read in the current interval."""
        return self._last_norms is not None

    def observe(self) -> torch.Tensor | None:
        """Read the current gradients (call before the optimizer step). Returns the global norm."""
        present = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not present:
            return None
        norms = tensor_norms([self.params[i].grad for i in present], self._device)
        total = norms.square().sum().sqrt()
        finite = torch.isfinite(total)
        self._norm_max = torch.where(finite, torch.maximum(self._norm_max, total), self._norm_max)
        self._norm_min = torch.where(finite, torch.minimum(self._norm_min, total), self._norm_min)
        self._norm_sum = self._norm_sum + torch.where(finite, total, 0)
        self._steps = self._steps + finite.float()
        self._nonfinite_steps = self._nonfinite_steps + (~finite).float()
        self._last_norms, self._last_present = norms, present
        self._last_total = total
        return total

    def snapshot_parameters(self) -> None:
        """Keep a copy of the parameters to measure the coming update (sampled steps only)."""
        self._before = [p.detach().clone() for p in self.params]

    def measure_update(self) -> None:
        """After the optimizer step: per-layer squared update and weight norms from the snapshot."""
        if self._before is None:
            return
        before, self._before = self._before, None
        deltas = torch._foreach_sub([p.detach() for p in self.params], before)
        self._update_sq = self._per_layer_sq(tensor_norms(deltas, self._device), range(len(self.params)))
        self._weight_sq = self._per_layer_sq(tensor_norms(before, self._device), range(len(self.params)))

    def _per_layer_sq(self, norms: torch.Tensor, which: Iterable[int]) -> torch.Tensor:
        idx = torch.tensor([self._layer_index[i] for i in which], device=self._device, dtype=torch.long)
        return torch.zeros(len(self.layers), device=self._device).index_add_(0, idx, norms.square())

    def signals(self, out: SignalSet, prefix: str = "gradients", per_layer: bool = True) -> None:
        """Interval summary of the gradient norm; per-layer norms of the last observed step."""
        if self._last_norms is None:
            return
        out.add_max(f"{prefix}/norm", self._last_total)
        # NaN, not +-inf, when no step of the interval had a finite norm
        nan = torch.full_like(self._norm_max, float("nan"))
        out.add_max(f"{prefix}/norm_max", torch.where(self._steps > 0, self._norm_max, nan))
        out.add_min(f"{prefix}/norm_min", torch.where(self._steps > 0, self._norm_min, nan))
        out.add_mean(f"{prefix}/norm_mean", self._norm_sum, self._steps)
        out.add_sum(f"{prefix}/nonfinite_steps", self._nonfinite_steps)
        weights = tensor_norms([p.detach() for p in self.params], self._device)
        out.add_max("params/norm", weights.square().sum().sqrt())
        if self._update_sq is not None:
            out.add_max("update/ratio", self._update_sq.sum().sqrt() / self._weight_sq.sum().sqrt().clamp_min(1e-12))
        if not per_layer:
            return
        grad_sq = self._per_layer_sq(self._last_norms, self._last_present)
        weight_sq = self._per_layer_sq(weights, range(len(self.params)))
        for i, layer in enumerate(self.layers):
            key = _key(layer)
            out.add_max(f"{prefix}/norm/{key}", grad_sq[i].sqrt())
            out.add_max(f"params/norm/{key}", weight_sq[i].sqrt())
            if self._update_sq is not None:
                ratio = self._update_sq[i].sqrt() / self._weight_sq[i].sqrt().clamp_min(1e-12)
                out.add_max(f"update/ratio/{key}", ratio)


def _key(layer: str) -> str:
    """Metric-key form of a module path: dots would nest keys in some loggers."""
    return layer.replace(".", "_")


class LossProbe:
    """Per-interval loss statistics on the device: mean, last, max and non-finite count.

    Example:
        >>> probe = LossProbe()
        >>> for v in (2.0, float("nan"), 4.0):
        ...     probe.observe(torch.tensor(v))
        >>> signals = SignalSet(); probe.signals(signals)
        >>> signals.reduce()
        {'loss/mean': 3.0, 'loss/last': 4.0, 'loss/max': 4.0, 'loss/nonfinite_steps': 1.0}
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._sum: torch.Tensor | None = None

    @property
    def empty(self) -> bool:
        """True when no loss was observed since the last reset."""
        return self._sum is None

    def observe(self, loss: torch.Tensor) -> None:
        loss = loss.detach().float().reshape(())
        finite = torch.isfinite(loss)
        clean = torch.where(finite, loss, 0)
        if self._sum is None:
            zero = torch.zeros((), device=loss.device)
            self._sum, self._count, self._nonfinite = zero, zero, zero
            self._max = torch.tensor(float("-inf"), device=loss.device)
        self._sum = self._sum + clean
        self._count = self._count + finite.float()
        self._nonfinite = self._nonfinite + (~finite).float()
        self._max = torch.where(finite, torch.maximum(self._max, loss), self._max)
        self._last = loss

    def signals(self, out: SignalSet, prefix: str = "loss") -> None:
        if self._sum is None:
            return
        out.add_mean(f"{prefix}/mean", self._sum, self._count)
        out.add_max(f"{prefix}/last", self._last)
        out.add_max(f"{prefix}/max", self._max)
        out.add_sum(f"{prefix}/nonfinite_steps", self._nonfinite)
