"""Triton kernel for ``logit_stats``: one read of each row of logits.

Each program owns one row of ``V`` logits and streams it in ``BLOCK_V`` chunks with the
online log-sum-exp (running max ``m``, ``l = sum exp(x - m)``, ``t = sum exp(x - m)(x - m)``),
so a row is read from global memory exactly once whatever ``V`` is (tested up to 256k).
Three separate torch reductions (max, logsumexp, softmax entropy) read it three or more
times and materialise a ``V``-wide softmax.

The exponentials are ``exp2`` with ``log2(e)`` folded into the shift, as in FlashAttention.

Supported: fp32 / fp16 / bf16, any ``V``, any number of rows (the logits are viewed as
``(rows, V)``; a non-contiguous last dim is copied first). Rows with NaN or +inf give NaN.
Tested on the CPU under ``TRITON_INTERPRET=1`` and on CUDA by the tests marked ``gpu``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from stabmon.kernels.logit_stats import LogitStats

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _logit_stats_kernel(
    x_ptr, out_ptr, stride_row, V, n_rows,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride_row
    cols = tl.arange(0, BLOCK_V)
    m_i = float("-inf")
    l_i = 0.0
    t_i = 0.0
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        x = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m_i, tl.max(x, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        shifted = x - m_safe
        p = tl.exp2(shifted * 1.4426950408889634)  # exp(x - m) as one exp2 (a fused multiply-add in front)
        block_t = tl.sum(p * tl.where(p > 0, shifted, 0.0), axis=0)  # masked: 0, not 0 * -inf
        alpha = tl.exp2((m_i - m_safe) * 1.4426950408889634)
        t_i = alpha * (t_i + tl.where(l_i > 0, m_i - m_safe, 0.0) * l_i) + block_t
        l_i = alpha * l_i + tl.sum(p, axis=0)
        m_i = m_new
    log_l = tl.log(l_i)
    tl.store(out_ptr + row, m_i + log_l)
    tl.store(out_ptr + n_rows + row, m_i)
    tl.store(out_ptr + 2 * n_rows + row, tl.maximum(log_l - t_i / l_i, 0.0))


def launch_config(v: int) -> tuple[int, int]:
    """``(BLOCK_V, num_warps)`` for rows of ``v`` logits (one large block under the interpreter)."""
    block_v = min(triton.next_power_of_2(v), 16384 if _INTERPRET else 4096)
    return block_v, 8 if block_v >= 2048 else 4


def logit_stats_triton(logits: torch.Tensor) -> LogitStats:
    """Launch the kernel; arguments as ``stabmon.kernels.logit_stats`` (already checked)."""
    lead, v = logits.shape[:-1], logits.shape[-1]
    rows = logits.reshape(-1, v)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    n = rows.shape[0]
    out = torch.empty(3, n, dtype=torch.float32, device=logits.device)
    if n:
        block_v, num_warps = launch_config(v)
        _logit_stats_kernel[(n,)](rows, out, rows.stride(0), v, n, BLOCK_V=block_v, num_warps=num_warps)
    return LogitStats(*(o.reshape(lead) for o in out))
