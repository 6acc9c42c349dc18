"""The gains of a qk-layernorm: found from the autograd graph of q and k, watched as norms.

qk-layernorm (or RMSNorm) on the queries and keys bounds the attention logits by the norm
gains, and the bound moves: at a learning rate far past the best one the gains grow and the
logits reach the thousands anyway (README "Past lr 0.1"). ``norm_gains(q)`` walks q's graph back
from SDPA through views, rotary products and the like to the normalization, and returns the
learnable gain(s) on the way (the ``weight`` of a fused LayerNorm / RMSNorm node, or a
parameter multiplied in after a hand-written RMSNorm's ``rsqrt``), or nothing when q is not
normalized. ``QKNormGains`` keeps, per attention call site, the names of those parameters and
emits ``attention/q_gain_norm/<layer>`` and ``attention/k_gain_norm/<layer>`` (the 2-norm of the
gain; under FSDP2 summed over the shards).

Example:
    >>> ln = torch.nn.LayerNorm(4)
    >>> q = ln(torch.randn(2, 3, 4)).unsqueeze(1)          # (B, H, L, D)
    >>> norm_gains(q) == [ln.weight]
    True
    >>> norm_gains(torch.nn.Linear(4, 4)(torch.randn(2, 4)))  # a projection, not normalized
    []
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from stabmon.distributed import is_dtensor, local_tensor, square_weight
from stabmon.probes.compiled import canonical_name, get_parameter, names_in_forward
from stabmon.signals import SignalSet

__all__ = ["QKNormGains", "norm_gains"]

_NORM_TAGS = ("LayerNorm", "RmsNorm", "RMSNorm", "GroupNorm", "Rsqrt", "NormBackward", "LinalgVectorNorm")
_FUSED_NORMS = ("NativeLayerNormBackward", "FusedRmsNormBackward", "NativeGroupNormBackward", "RmsNormBackward")
# A projection ends the walk: what lies behind it is the layer's input, not the normalization.
_PROJECTIONS = ("MmBackward", "BmmBackward", "AddmmBackward", "MatmulBackward", "LinearBackward", "MvBackward",
                "BaddbmmBackward", "AddmvBackward", "EmbeddingBackward", "ConvolutionBackward")


def _leaf(node: Any) -> torch.Tensor | None:
    return getattr(node, "variable", None) if node is not None else None


def norm_gains(tensor: torch.Tensor, max_nodes: int = 10_000) -> list[torch.Tensor]:
    """The learnable gains of the normalization ``tensor`` comes out of (empty when none)."""
    stack, seen = [tensor.grad_fn], set()
    gains: dict[int, torch.Tensor] = {}
    normalized = False
    while stack and len(seen) < max_nodes:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        name = type(node).__name__
        children = [child for child, _ in node.next_functions]
        if name.startswith(_PROJECTIONS):
            continue
        if any(tag in name for tag in _NORM_TAGS):
            normalized = True
            weight = _leaf(children[1]) if name.startswith(_FUSED_NORMS) and len(children) > 1 else None
            if weight is not None:
                gains[id(weight)] = weight
            continue
        for child in children:
            leaf = _leaf(child)
            if leaf is None:
                stack.append(child)
            elif name.startswith("MulBackward"):  # a gain multiplied in after a hand-written norm
                gains[id(leaf)] = leaf
    return list(gains.values()) if normalized else []


class QKNormGains:
    """Per attention call site, the parameter names of its q and k norm gains, and their norms.

    Args:
        model: the monitored model (names are resolved in it and read back from it).
        layer_names: the reported layer name of a call site (``layer_00``).
    """

    def __init__(self, model: torch.nn.Module, layer_names: Callable[[str], str]) -> None:
        self.model, self.layer_names = model, layer_names
        self.sites: dict[str, tuple[list[str], list[str]] | None] = {}  # None: looked, not normalized
        self._model_names: dict[int, str] | None = None  # built at the first capture

    def wants(self, site: str) -> bool:
        return site not in self.sites

    def capture(self, q: torch.Tensor, k: torch.Tensor, *, site: str) -> None:
        """At a sampled forward, inside it (FSDP2's unsharded parameters are registered then)."""
        if self._model_names is None:
            self._model_names = {id(p): canonical_name(n) for n, p in self.model.named_parameters()}
        names = names_in_forward(self.model, site, self._model_names)
        found = [[names[id(g)] for g in norm_gains(t) if id(g) in names] for t in (q, k)]
        self.sites[site] = (found[0], found[1]) if found[0] or found[1] else None

    @property
    def watched(self) -> bool:
        return any(v is not None for v in self.sites.values())

    @torch.no_grad()
    def signals(self, out: SignalSet) -> None:
        for site, found in self.sites.items():
            if found is None:
                continue
            layer = self.layer_names(site)
            for role, names in zip(("q", "k"), found):
                if not names:
                    continue
                params = [get_parameter(self.model, n) for n in names]
                key = f"attention/{role}_gain_norm/{layer}"
                if any(is_dtensor(p) for p in params):  # sharded (FSDP2): the shards' squares add up over ranks
                    squares = sum(local_tensor(p).detach().float().square().sum() * square_weight(p, 1)
                                  for p in params)
                    out.add_norm(key, squares)
                else:  # the same on every rank
                    squares = sum(p.detach().float().square().sum() for p in params)
                    out.add_max(key, squares.sqrt())
