"""Fused reductions over attention scores and output logits.

Each op lives in a public module (dispatcher, chunked torch path, reference) with its
Triton kernel in a private sibling that is imported only on CUDA tensors.
"""

from __future__ import annotations

import functools
import importlib.util

from stabmon.kernels.attention_max_logit import attention_max_logit
from stabmon.kernels.attention_stats import AttentionStats, attention_stats
from stabmon.kernels.logit_stats import LogitStats, logit_stats

__all__ = ["AttentionStats", "LogitStats", "attention_max_logit", "attention_stats", "logit_stats",
           "triton_available"]


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when Triton can be imported (the CUDA dispatch needs it)."""
    return importlib.util.find_spec("triton") is not None
