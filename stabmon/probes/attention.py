"""Attention probe: per layer and head, entropy and max logit of sampled forwards."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stabmon.kernels import attention_stats
from stabmon.signals import SignalSet

__all__ = ["AttentionProbe", "HeadStats"]


@dataclass
class HeadStats:
    """Per-head accumulators of one attention layer, device tensors of shape ``(H,)``."""

    module: str
    entropy_sum: torch.Tensor
    row_count: torch.Tensor
    entropy_min: torch.Tensor
    max_logit: torch.Tensor

    @property
    def entropy_mean(self) -> torch.Tensor:
        return self.entropy_sum / self.row_count.clamp_min(1)


class AttentionProbe:
    """Accumulates attention statistics of every attention call in a sampled forward.

    Per head it keeps the sum and count of row entropies (for the head's mean entropy),
    the lowest row entropy and the largest logit. Layers are numbered in call order
    (``layer_00``, ``layer_01``, ...), one per call site (the module that made the call,
    see ``ForwardCapture``), and remember that module. Fully masked rows are left out
    of every statistic.

    Example:
        >>> probe = AttentionProbe()
        >>> q = torch.zeros(1, 2, 4, 8)
        >>> probe.observe(q, q, module="attn")
        >>> signals = SignalSet(); probe.signals(signals, prefix="attention")
        >>> round(signals.reduce()["attention/entropy_min"], 4)  # uniform over 4 keys: log 4
        1.3863
    """

    def __init__(self) -> None:
        self.layers: dict[str, HeadStats] = {}
        self.shapes: dict[str, tuple[int, int, int]] = {}  # per layer (heads, query length, key length), kept
        self._by_module: dict[str, str] = {}

    def reset(self) -> None:
        self.layers.clear()
        self._by_module.clear()

    def observe(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        *,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        scale: float | None = None,
        module: str = "",
    ) -> None:
        stats = attention_stats(q, k, attn_mask=attn_mask, is_causal=is_causal, scale=scale)  # (B, H, Lq)
        live = ~torch.isneginf(stats.max_logit)
        entropy_sum = torch.where(live, stats.entropy, 0).sum(dim=(0, 2))  # (H,)
        row_count = live.sum(dim=(0, 2)).float()
        entropy_min = torch.where(live, stats.entropy, float("inf")).amin(dim=(0, 2))
        max_logit = stats.max_logit.amax(dim=(0, 2))
        layer = self._layer_for(module, entropy_sum.shape[0])
        self.shapes[layer] = (int(q.shape[1]), int(q.shape[-2]), int(k.shape[-2]))
        acc = self.layers.get(layer)
        if acc is None:
            self.layers[layer] = HeadStats(module, entropy_sum, row_count, entropy_min, max_logit)
        else:  # the same module called attention again in this forward
            acc.entropy_sum = acc.entropy_sum + entropy_sum
            acc.row_count = acc.row_count + row_count
            acc.entropy_min = torch.minimum(acc.entropy_min, entropy_min)
            acc.max_logit = torch.maximum(acc.max_logit, max_logit)

    def _layer_for(self, module: str, heads: int) -> str:
        """One layer per call site; a site seen again (another forward) accumulates."""
        key = f"{module}/{heads}"
        layer = self._by_module.get(key)
        if layer is None:
            layer = self._by_module[key] = f"layer_{len(self.layers):02d}"
        return layer

    def signals(self, out: SignalSet, prefix: str = "attention") -> None:
        """Per-layer summaries over heads (never one scalar per head).

        A head's entropy is the mean over its query rows; ``entropy_min`` is the lowest
        head, ``entropy_mean`` the mean over heads and rows, ``max_logit`` the largest score.
        """
        if not self.layers:
            return
        for layer, acc in self.layers.items():
            out.add_min_of_means(f"{prefix}/entropy_min/{layer}", acc.entropy_sum, acc.row_count)
            out.add_mean(f"{prefix}/entropy_mean/{layer}", acc.entropy_sum.sum(), acc.row_count.sum())
            out.add_max(f"{prefix}/max_logit/{layer}", acc.max_logit.max(), defined=acc.row_count.sum())
        layers = list(self.layers.values())
        out.add_min_of_means(
            f"{prefix}/entropy_min",
            torch.cat([a.entropy_sum for a in layers]),
            torch.cat([a.row_count for a in layers]),
        )
        out.add_mean(
            f"{prefix}/entropy_mean",
            torch.stack([a.entropy_sum.sum() for a in layers]).sum(),
            torch.stack([a.row_count.sum() for a in layers]).sum(),
        )
        out.add_max(f"{prefix}/max_logit", torch.stack([a.max_logit.max() for a in layers]).max(),
                    defined=torch.stack([a.row_count.sum() for a in layers]).sum())

    def head_maps(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per layer: per-head ``entropy_mean``, ``entropy_min`` and ``max_logit`` (host tensors)."""
        return {
            layer: {
                "entropy_mean": acc.entropy_mean.cpu(),
                "entropy_min": acc.entropy_min.cpu(),
                "max_logit": acc.max_logit.cpu(),
            }
            for layer, acc in self.layers.items()
        }
