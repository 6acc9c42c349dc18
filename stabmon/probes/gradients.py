"""Gradient probe: gradient, parameter and update norms, globally and per layer.

Every step (before the optimizer step) it computes one norm per gradient tensor with a
single fused ``_foreach_norm`` (float32 results whatever the parameter dtypes); nothing is
read to the host here. The monitor reads that vector together with the loss in the one host
read of the step when its detectors are on (``record_host_squares``): the global norm, the
per-layer norms and their emission are then host arithmetic, with no further device work.
Parameter norms and the update-to-weight ratio are computed only on sampled steps. On
sampled steps it snapshots the parameters so that
``||theta_after - theta_before|| / ||theta_after||`` can be measured once the optimizer has
stepped (the weight norm is the one after the step, which the emission computes anyway):
one copy of the trainable parameters for the duration of that step.

Sharded parameters (FSDP2 DTensors) and replicated ones (DDP) are handled through
weighted sums of squares (``stabmon.distributed``): every norm is that of the whole model.
"""

from __future__ import annotations

import math
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
    try:  # the common case, tried first: checking each tensor's kind costs more than the norm of a small model
        norms = torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32))
        if norms.device == device:
            return norms
    except (RuntimeError, NotImplementedError):
        pass  # float64 (a narrowing the fused op refuses), sparse, or tensors on several devices
    return torch.stack([(t.coalesce().values() if t.is_sparse else t).norm().float().to(device) for t in tensors])


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
        >>> norms = probe.observe()  # (2,): the weight's and the bias's gradient norms
        >>> signals = SignalSet(); probe.signals(signals, prefix="gradients")
        >>> values = signals.reduce()
        >>> full = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
        >>> round(values["gradients/norm"], 4) == round(full.item(), 4) == round(probe.device_norm().item(), 4)
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
        self._layer_of_param = [index[layer_of(n)] for n in self.names]
        self._layer_keys = [_key(layer) for layer in self.layers]
        self._device = local_tensor(self.params[0]).device if self.params else torch.device("cpu")
        self._layer_index = torch.tensor(self._layer_of_param, dtype=torch.long, device=self._device)
        self.sharded = any(is_dtensor(p) for p in self.params)
        weights = [square_weight(p, world) for p in self.params]
        # None when every sum of squares counts fully (one process): the hot path skips the product.
        self._weights = (torch.tensor(weights, dtype=torch.float32, device=self._device)
                         if any(w != 1.0 for w in weights) else None)
        self._last_norms: torch.Tensor | None = None  # (P,) gradient norms of the last observed step
        # The same step's squared norms of the whole model, on the host (summed over ranks), once read
        self._host_squares: list[float] | None = None
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
        self._host_squares = None
        self._update_sq = None

    def _local(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return [local_tensor(t) for t in tensors] if self.sharded else tensors

    def observe(self, scale: torch.Tensor | None = None) -> torch.Tensor | None:
        """Read the current gradients (call before the optimizer step).

        Returns this rank's gradient norm of each trainable parameter, ``(P,)`` float32 on the
        parameters' device (0 for a parameter without a gradient); nothing is read to the host.
        None when no parameter has a gradient. ``scale``: the loss scale the gradients still
        carry (fp16 AMP before ``unscale_``; see ``stabmon.probes.amp``): the norms are divided
        by it, so they are those of the unscaled gradients.
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
        if scale is not None:
            norms = norms / scale.to(norms.device)
        self._last_norms = norms
        self._host_squares = None
        return norms

    def local_gradients(self) -> list[torch.Tensor]:
        """The gradients this rank holds (its shards when sharded), of the parameters that have one."""
        return self._local([p.grad for p in self.params if p.grad is not None])

    def squares(self, norms: torch.Tensor) -> torch.Tensor:
        """This rank's weighted squares of ``norms`` (from ``observe``), in float64: their sum
        over the ranks is each parameter's squared gradient norm over the whole model."""
        return self._weighted_squares(norms.double())

    def device_norm(self) -> torch.Tensor:
        """The last observed step's gradient norm of the whole model, on the device.

        With sharded gradients this is this rank's weighted share of the square instead: sum
        it over the ranks, then take the root.
        """
        if self._last_norms is None:
            raise RuntimeError("GradientProbe.device_norm() needs an observe() first")
        if not self.sharded:
            return torch.linalg.vector_norm(self._last_norms)
        return self._weighted_squares(self._last_norms).sum()

    def record_host_squares(self, squares: list[float]) -> float:
        """The last observed step's per-parameter squared norms of the whole model, read to the
        host (summed over ranks when there are several): the emission then needs no device
        work. Returns the global gradient norm."""
        if len(squares) != len(self.params):
            raise ValueError(f"`squares` must hold one value per trainable parameter ({len(self.params)}), "
                             f"got {len(squares)}")
        self._host_squares = squares
        return math.sqrt(sum(squares))

    def layer_norms(self) -> list[tuple[str, float]]:
        """The last read step's gradient norm of each layer (of the whole model), largest first;
        empty unless the step's norms were read to the host (``record_host_squares``)."""
        if self._host_squares is None:
            return []
        layer_squares = [0.0] * len(self.layers)
        for layer, square in zip(self._layer_of_param, self._host_squares):
            layer_squares[layer] += square
        norms = [(key, math.sqrt(max(sq, 0.0)) if sq == sq else sq) for key, sq in zip(self._layer_keys, layer_squares)]
        return sorted(norms, key=lambda kv: -kv[1] if kv[1] == kv[1] else -math.inf)

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
        keys = [f"{prefix}/norm/{k}" for k in self._layer_keys] if per_layer else []
        if self._host_squares is not None:  # already read (and reduced over ranks): host arithmetic only
            layer_squares = [0.0] * len(self.layers)
            for layer, square in zip(self._layer_of_param, self._host_squares):
                layer_squares[layer] += square
            out.add_host(f"{prefix}/norm", math.sqrt(sum(layer_squares)), op=None)
            for key, square in zip(keys, layer_squares):
                out.add_host(key, math.sqrt(square), op=None)
        else:
            grad_layers = self._per_layer(self._weighted_squares(self._last_norms))
            out.add_norm(f"{prefix}/norm", grad_layers.sum())
            if per_layer:
                out.add_norm(keys, grad_layers)
        if not parameters:
            return
        weights = self._per_layer(self._weighted_squares(
            tensor_norms(self._local([p.detach() for p in self.params]), self._device)))
        out.add_norm("params/norm", weights.sum())
        if self._update_sq is not None:
            out.add_ratio("update/ratio", self._update_sq.sum(), weights.sum())
        if per_layer:
            out.add_norm([f"params/norm/{k}" for k in self._layer_keys], weights)
            if self._update_sq is not None:
                out.add_ratio([f"update/ratio/{k}" for k in self._layer_keys], self._update_sq, weights)
