"""Per-row log-sum-exp, max logit and entropy of output logits ``(..., V)``.

For a row ``x`` of ``V`` logits: ``lse = log sum_j exp(x_j)`` (the log-partition log Z
that z-loss penalizes), ``max_logit = max_j x_j`` and the entropy of ``softmax(x)`` in
nats, ``entropy = log l - sum_j e_j (x_j - m) / l`` with ``m`` the max,
``e_j = exp(x_j - m)`` and ``l = sum_j e_j`` (computed relative to the max, so large
logits lose no precision).

Rows holding NaN or +inf give NaN statistics; the monitor counts them as non-finite.
Dispatch: a Triton kernel (one read of the logits) on CUDA tensors when Triton is
installed; elsewhere a torch path over row blocks, in float32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from stabmon.kernels._workspace import scratch

__all__ = ["LogitStats", "logit_stats", "logit_stats_chunked", "logit_stats_reference", "row_means"]

# Logit elements converted to float32 at once by the chunked path (16 MB).
DEFAULT_MAX_BLOCK_ELEMENTS = 1 << 22


class LogitStats(NamedTuple):
    """Per row statistics, each float32 of the logits' shape without the last dim."""

    lse: torch.Tensor
    max_logit: torch.Tensor
    entropy: torch.Tensor


def _check_logits(logits: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() < 1 or logits.shape[-1] < 1:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"`logits` must be a tensor (..., V) with V >= 1, got {shape}")
    if not logits.is_floating_point():
        raise ValueError(f"`logits` must be a floating point tensor, got dtype {logits.dtype}")


def _row_stats(x: torch.Tensor, work_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    m = x.amax(dim=-1, keepdim=True).to(work_dtype)
    # Floor x - m at -80: exp is many times slower on CPU where it underflows, and such a
    # term (below e^-80) is invisible next to the max's e^0. -inf logits count as e^-80.
    # Both block-sized tensors live in reused buffers (see kernels/_workspace.py).
    shifted = torch.sub(x, m.nan_to_num(neginf=0.0), out=scratch(0, x.shape, work_dtype, x.device)).clamp_(min=-80.0)
    e = torch.exp(shifted, out=scratch(1, x.shape, work_dtype, x.device))
    l = e.sum(-1)  # noqa: E741
    log_l = torch.log(l)
    t = shifted.mul_(e).sum(-1)
    m = m.squeeze(-1)
    return m + log_l, m, (log_l - t / l).clamp_min(0)


@torch.no_grad()
def row_means(logits: torch.Tensor, *, max_block_elements: int = DEFAULT_MAX_BLOCK_ELEMENTS) -> torch.Tensor:
    """The mean over the last dim, float32 (float64 stays float64), in blocks of rows: at most
    ``max_block_elements`` are converted at a time (``torch.mean(x, dtype=torch.float32)``
    makes a float32 copy of the whole tensor on the CPU)."""
    _check_logits(logits)
    v = logits.shape[-1]
    rows = logits.reshape(-1, v)
    work_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    out = torch.empty(rows.shape[0], dtype=work_dtype, device=logits.device)
    block = max(1, max_block_elements // v)
    for r0 in range(0, rows.shape[0], block):
        out[r0 : r0 + block] = rows[r0 : r0 + block].to(work_dtype).mean(dim=-1)
    return out.reshape(logits.shape[:-1])


def logit_stats_chunked(logits: torch.Tensor, *, max_block_elements: int = DEFAULT_MAX_BLOCK_ELEMENTS) -> LogitStats:
    """Torch path: blocks of rows converted to float32 (float64 stays float64)."""
    _check_logits(logits)
    lead = logits.shape[:-1]
    v = logits.shape[-1]
    rows = logits.reshape(-1, v)
    work_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    out = torch.empty(3, rows.shape[0], dtype=torch.float32, device=logits.device)
    block = max(1, max_block_elements // v)
    for r0 in range(0, rows.shape[0], block):
        lse, mx, ent = _row_stats(rows[r0 : r0 + block], work_dtype)
        out[0, r0 : r0 + block] = lse
        out[1, r0 : r0 + block] = mx
        out[2, r0 : r0 + block] = ent
    return LogitStats(*(o.reshape(lead) for o in out))


@torch.no_grad()
def logit_stats_reference(logits: torch.Tensor) -> LogitStats:
    """The specification with plain torch reductions in the input dtype. Tests only."""
    _check_logits(logits)
    lse = torch.logsumexp(logits, dim=-1)
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    entropy = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)
    return LogitStats(lse, logits.amax(dim=-1), entropy)


@torch.no_grad()
def logit_stats(logits: torch.Tensor) -> LogitStats:
    """Log-sum-exp, max logit and entropy (nats) of each row of ``(..., V)`` logits.

    Returns:
        ``LogitStats(lse, max_logit, entropy)``, float32 tensors of shape ``logits.shape[:-1]``.

    Raises:
        ValueError: not a floating point tensor with a last dim of at least 1.

    Example:
        >>> stats = logit_stats(torch.zeros(2, 8))
        >>> round(stats.lse[0].item(), 4), round(stats.entropy[0].item(), 4)
        (2.0794, 2.0794)
    """
    logits = logits.detach()
    if logits.is_cuda and logits.dtype in (torch.float16, torch.bfloat16, torch.float32):
        from stabmon.kernels import triton_available

        if triton_available():
            from stabmon.kernels._logit_stats_triton import logit_stats_triton

            _check_logits(logits)
            return logit_stats_triton(logits)
    return logit_stats_chunked(logits)
