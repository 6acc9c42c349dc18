"""Logit probe: log-partition, max, mean and min logit and entropy of the logits given to cross-entropy."""

from __future__ import annotations

import torch

from stabmon.kernels import logit_stats
from stabmon.kernels.logit_stats import row_means
from stabmon.signals import SignalSet

__all__ = ["LogitProbe"]


class LogitProbe:
    """Accumulates output-logit statistics over the ``F.cross_entropy`` calls of a sampled forward.

    Tokens whose target is ``ignore_index`` are left out. Rows with NaN or inf logits are
    counted (``nonfinite``) and left out of the other statistics.

    Example:
        >>> probe = LogitProbe()
        >>> probe.observe(torch.zeros(4, 8), torch.zeros(4, dtype=torch.long))
        >>> signals = SignalSet(); probe.signals(signals, prefix="logits")
        >>> round(signals.reduce()["logits/logz_mean"], 4)  # log 8
        2.0794
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._acc: dict[str, torch.Tensor] | None = None

    @property
    def seen(self) -> bool:
        return self._acc is not None

    def observe(self, logits: torch.Tensor, target: torch.Tensor | None = None, *, ignore_index: int = -100) -> None:
        if logits.dim() >= 2:
            logits = logits.movedim(1, -1)  # cross_entropy: (N, C, d1, ...) -> (N, d1, ..., C)
        stats = logit_stats(logits)
        keep = torch.ones_like(stats.lse, dtype=torch.bool)
        if target is not None and not target.is_floating_point() and target.shape == stats.lse.shape:
            keep = target != ignore_index
        finite = torch.isfinite(stats.lse) & torch.isfinite(stats.max_logit)
        use = keep & finite
        # The mean and min over the vocabulary: the drift of the logits of tokens the data never
        # has (OLMo-core logs them too). Two more passes over the logits, on sampled steps only;
        # the mean in float32 over blocks of rows, never a float32 copy of all the logits.
        mean_logit = row_means(logits).float()
        min_logit = logits.amin(dim=-1).float()
        part = {
            "lse_sum": torch.where(use, stats.lse, 0).sum(),
            "lse_max": torch.where(use, stats.lse, float("-inf")).max(),
            "max_logit": torch.where(use, stats.max_logit, float("-inf")).max(),
            "entropy_sum": torch.where(use, stats.entropy, 0).sum(),
            "count": use.sum().float(),
            "nonfinite": (keep & ~finite).sum().float(),
            "mean_logit_sum": torch.where(use, mean_logit, 0).sum(),
            "min_logit": torch.where(use, min_logit, float("inf")).min(),
        }
        if self._acc is None:
            self._acc = part
            return
        acc = self._acc
        for key in ("lse_sum", "entropy_sum", "count", "nonfinite", "mean_logit_sum"):
            acc[key] = acc[key] + part[key]
        acc["lse_max"] = torch.maximum(acc["lse_max"], part["lse_max"])
        acc["max_logit"] = torch.maximum(acc["max_logit"], part["max_logit"])
        acc["min_logit"] = torch.minimum(acc["min_logit"], part["min_logit"])

    def signals(self, out: SignalSet, prefix: str = "logits") -> None:
        if self._acc is None:
            return
        acc = self._acc
        out.add_mean(f"{prefix}/logz_mean", acc["lse_sum"], acc["count"])
        out.add_max(f"{prefix}/logz_max", acc["lse_max"], defined=acc["count"])
        out.add_max(f"{prefix}/max_logit", acc["max_logit"], defined=acc["count"])
        out.add_mean(f"{prefix}/entropy_mean", acc["entropy_sum"], acc["count"])
        out.add_mean(f"{prefix}/mean_logit", acc["mean_logit_sum"], acc["count"])
        out.add_min(f"{prefix}/min_logit", acc["min_logit"], defined=acc["count"])
        out.add_sum(f"{prefix}/nonfinite", acc["nonfinite"])
