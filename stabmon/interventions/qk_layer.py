"""One attention layer armed for QK-clip: its per-step max-logit measurement and its rescale.

The measurement is a ``TorchFunctionMode`` entered by forward hooks on the layer's module
(and left after its forward): it sees the layer's SDPA calls (or ``record_attention``) and
keeps the per-head max logit, computed by ``stabmon.kernels.attention_max_logit``. The
rescale multiplies the query and key entries of each head above ``tau`` in place: the slot
of every entry in a factor vector is computed once, for this rank's rows when sharded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from stabmon.distributed import global_row_offset, local_tensor
from stabmon.interventions.qk_locate import ParamRows, QKLocation
from stabmon.kernels import attention_max_logit
from stabmon.probes.capture import SDPAMode
from stabmon.probes.compiled import get_parameter, get_submodule

__all__ = ["ArmedLayer"]


class _MaxLogitMode(SDPAMode):
    """Inside an armed module's forward: per-head max logit of its SDPA call(s)."""

    def __init__(self, layer: ArmedLayer) -> None:
        super().__init__()
        self.layer = layer

    def on_attention(self, q, k, *, attn_mask, is_causal, scale):  # noqa: ANN001
        layer = self.layer
        occurrence, layer.calls = layer.calls, layer.calls + 1
        if occurrence == layer.occurrence:  # inside the user's forward: a fault must not reach it
            layer.guard("qk-clip", layer.measure, q, k, attn_mask=attn_mask, is_causal=is_causal, scale=scale)


class ArmedLayer:
    """One armed call site: its parameters, the slot of each entry in the factor vector, the measurement."""

    def __init__(self, site: str, location: QKLocation, model: torch.nn.Module, alpha: float,
                 guard: Callable[..., Any]) -> None:
        self.site, self.location, self.alpha, self.guard = site, location, alpha, guard
        module_name, _, occ = site.partition("#")
        self.occurrence = int(occ) if occ else 0
        self.module = get_submodule(model, module_name)
        heads, groups = location.query_heads, location.key_groups
        self.step_max: torch.Tensor | None = None
        self.calls = 0
        self.updates: list[tuple[torch.Tensor, int, torch.Tensor]] = []  # (parameter, dim, slot per local entry)
        by_param: dict[tuple[str, int], list[ParamRows]] = {}
        for rows in location.params:
            by_param.setdefault((rows.name, rows.dim), []).append(rows)
        for (name, dim), entries in by_param.items():
            param = get_parameter(model, name)
            size = param.shape[dim]
            slot = torch.zeros(size, dtype=torch.long)
            for rows in entries:
                base = 1 if rows.role == "q" else 1 + heads
                for h, idx in enumerate(rows.heads):
                    slot[idx] = base + h
            first, count = global_row_offset(param) if dim == 0 else (0, size)
            local = local_tensor(param)
            self.updates.append((param, dim, slot[first:first + count].to(local.device)))
        # MHA: the key group of each query head, for the key's share of gamma
        self.query_of_group = torch.zeros(groups, dtype=torch.long)
        for h, g in enumerate(location.key_of_query):
            self.query_of_group[g] = h
        self.handles: list[Any] = []
        self._mode: _MaxLogitMode | None = None

    def measure(self, q: torch.Tensor, k: torch.Tensor, **kwargs: Any) -> None:
        head_max = attention_max_logit(q, k, **kwargs).amax(dim=(0, 2))
        self.step_max = head_max if self.step_max is None else torch.maximum(self.step_max, head_max)

    def attach(self) -> None:
        if not self.handles:
            self.handles = [self.module.register_forward_pre_hook(self._enter),
                            self.module.register_forward_hook(self._exit, always_call=True)]

    def _enter(self, _module: torch.nn.Module, _args: Any) -> None:
        self.calls = 0
        self._mode = _MaxLogitMode(self)
        self._mode.__enter__()
        self._mode.listen()  # attention computed by hand and reported with record_attention

    def _exit(self, _module: torch.nn.Module, _args: Any, _output: Any) -> None:
        if self._mode is not None:
            mode, self._mode = self._mode, None
            mode.unlisten()
            mode.__exit__(None, None, None)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self._exit(self.module, None, None)

    @torch.no_grad()
    def rescale(self, head_max: torch.Tensor, tau: float) -> torch.Tensor:
        """Scale the entries of the heads above ``tau``; returns the per-head gamma (1 = untouched)."""
        gamma = torch.where(head_max > tau, tau / head_max, torch.ones_like(head_max))
        if self.location.shared_keys:
            f_query, f_key = gamma, torch.ones(self.location.key_groups, device=gamma.device)
        else:
            f_query = gamma.pow(self.alpha)
            f_key = gamma[self.query_of_group.to(gamma.device)].pow(1 - self.alpha)
        factors = torch.cat([torch.ones(1, device=gamma.device), f_query, f_key])
        for param, dim, slot in self.updates:
            local = local_tensor(param)
            scale = factors.to(local.dtype)[slot]
            shape = [1] * local.dim()
            shape[dim] = -1
            local.mul_(scale.view(shape))  # entries outside the clipped heads are multiplied by exactly 1
        return gamma
