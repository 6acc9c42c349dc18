"""Gradient probe: gradient, parameter and update norms, globally and per layer.

Every step (before the optimizer step) it computes one norm per gradient tensor with a
single fused ``_foreach_norm`` (float32 results whatever the parameter dtypes), stacks
them and returns the global norm; nothing is read to the host here. Per-layer sums,
parameter norms and the update-to-weight ratio are computed only when the interval is
emitted or the step is sampled. On sampled steps it snapshots the parameters so that
``||theta_after - theta_before|| / ||theta_after||`` can be measured once the optimizer has
stepped (the weight norm is the one after the step, which the emission computes anyway):
one copy of the trainable parameters for the duration of that step.

Sharded parameters (FSDP2 DTensors) and replicated ones (DDP) are handled through
weighted sums of squares (``stabmon.distributed``): every norm is that of the whole model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from stabmon.distributed import is_dtensor, local_tensor, square_weight
from stabmon.signals import SignalSet

__all__ = ["GradientProbe", "default_layer_name", "tensor_norms"]


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

    One fused ``_foreach_norm`` over the list (mixed dtypes are fine); sparse tensors and
    tensors on other devices take a slower path.

    Example:
        >>> tensor_norms([torch.ones(4), torch.full((9,), 2.0, dtype=torch.float64)], torch.device("cpu"))
        tensor([2., 6.])
    """
    if not tensors:
        return torch.zeros(0, device=device)
    if any(t.is_sparse or t.device != device or t.dtype == torch.float64 for t in tensors):
        # float64 norms cannot be asked for in float32 (a narrowing the fused op refuses)
        return torch.stack([(t.coalesce().values() if t.is_sparse else t).norm().float().to(device) for t in tensors])
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32))


def _key(layer: str) -> str:
    """Metric-key form of a module path: dots would nest keys in some loggers."""
    return layer.replace(".", "_")


class GradientProbe:
    """Gradient, parameter and update norms of the trainable parameters.

    Args:
        named_parameters: ``model.named_parameters()``; frozen ones are left out.
        layer_of: maps a parameter name to its layer name (default: ``default_layer_name``).
        world: ranks taking part (weights the per-rank sums of squares; see ``stabmon.distributed``).

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> model(torch.ones(3, 4)).sum().backward()
        >>> probe = GradientProbe(model.named_parameters())
        >>> norm = probe.observe()
        >>> signals = SignalSet(); probe.signals(signals, prefix="gradients")
        >>> values = signals.reduce()
        >>> full = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
        >>> round(values["gradients/norm"], 4) == round(full.item(), 4) == round(norm.item(), 4)
        True
    """

    def __init__(
        self,
        named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
        layer_of: Callable[[str], str] = default_layer_name,
        world: int = 1,
    ) -> None:
        named = [(n, p) for n, p in named_parameters if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.layers: list[str] = list(dict.fromkeys(layer_of(n) for n in self.names))
        index = {layer: i for i, layer in enumerate(self.layers)}
        self._device = local_tensor(self.params[0]).device if self.params else torch.device("cpu")
        self._layer_index = torch.tensor([index[layer_of(n)] for n in self.names], dtype=torch.long,
                                         device=self._device)
        self.sharded = any(is_dtensor(p) for p in self.params)
        weights = [square_weight(p, world) for p in self.params]
        # None when every sum of squares counts fully (one process): the hot path skips the product.
        self._weights = (torch.tensor(weights, dtype=torch.float32, device=self._device)
                         if any(w != 1.0 for w in weights) else None)
        self._last_norms: torch.Tensor | None = None  # (P,) gradient norms of the last observed step
        self._before: list[torch.Tensor] | None = None
        self._update_sq: torch.Tensor | None = None  # per layer: squared norm of the last sampled update

    @property
    def empty(self) -> bool:
        return not self.params


    @property
    def has_observed(self) -> bool:
        """True once a gradient was read since the last reset."""
        return self._last_norms is not None

    def reset(self) -> None:
        """Start a new logging interval."""
        self._last_norms = None
        self._update_sq = None

    def _local(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return [local_tensor(t) for t in tensors] if self.sharded else tensors

    def observe(self) -> torch.Tensor | None:
        """Read the current gradients (call before the optimizer step).

        Returns the gradient norm of the whole model: computed here when every rank holds
        whole gradients (one process, DDP). With sharded gradients (``sharded``) it returns
        this rank's weighted share of its square: sum that over ranks, then take the root.
        None when no parameter has a gradient.
        """
        grads = [p.grad for p in self.params]
        if not grads:
            return None
        if any(g is None for g in grads):
            present = [i for i, g in enumerate(grads) if g is not None]
            if not present:
                return None
            norms = torch.zeros(len(grads), device=self._device)
            norms[torch.tensor(present, device=self._device)] = tensor_norms(
                self._local([grads[i] for i in present]), self._device)
        else:
            norms = tensor_norms(self._local(grads), self._device)
        self._last_norms = norms
        if not self.sharded:
            return torch.linalg.vector_norm(norms)
        return self._weighted_squares(norms).sum()

    def _weighted_squares(self, norms: torch.Tensor) -> torch.Tensor:
        squares = norms.square()
        return squares if self._weights is None else squares * self._weights

    def _per_layer(self, squares: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(self.layers), device=self._device).index_add_(0, self._layer_index, squares)

    def snapshot_parameters(self) -> None:
        """Keep a copy of the parameters to measure the coming update (sampled steps only)."""
        self._before = [p.clone() for p in self._local([p.detach() for p in self.params])]

    def measure_update(self) -> None:
        """After the optimizer step: per-layer squared norms of the update, from the snapshot."""
        if self._before is None:
            return
        deltas, self._before = self._before, None
        torch._foreach_sub_(deltas, self._local([p.detach() for p in self.params]))  # in place: before - after
        self._update_sq = self._per_layer(self._weighted_squares(tensor_norms(deltas, self._device)))

    def signals(self, out: SignalSet, prefix: str = "gradients", per_layer: bool = True,
                parameters: bool = True) -> None:
        """Norms of the last observed step's gradients and, with ``parameters``, of the
        parameters and the update ratio (the monitor asks for those on sampled steps only:
        weights move slowly, and reading them all costs as much as reading the gradients)."""
        if self._last_norms is None:
            return
        grad_layers = self._per_layer(self._weighted_squares(self._last_norms))
        out.add_norm(f"{prefix}/norm", grad_layers.sum())
        keys = [_key(layer) for layer in self.layers] if per_layer else []
        if per_layer:
            out.add_norm([f"{prefix}/norm/{k}" for k in keys], grad_layers)
        if not parameters:
            return
        weights = self._per_layer(self._weighted_squares(
            tensor_norms(self._local([p.detach() for p in self.params]), self._device)))
        out.add_norm("params/norm", weights.sum())
        if self._update_sq is not None:
            out.add_ratio("update/ratio", self._update_sq.sum(), weights.sum())
        if per_layer:
            out.add_norm([f"params/norm/{k}" for k in keys], weights)
            if self._update_sq is not None:
                out.add_ratio([f"update/ratio/{k}" for k in keys], self._update_sq, weights)
