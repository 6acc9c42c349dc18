"""Triton kernel for ``attention_max_logit``: the max-only pass of the attention-stats kernel.

Each program takes a ``BLOCK_M`` block of query rows of one head and streams the key blocks
(stopping at the diagonal when causal), keeping only the running max of the scores: one
``tl.dot`` and one row max per key block, no exponential. The score block, masks and
grouped-query indexing are ``score_block`` of ``_attention_stats_triton`` (base-2 units,
converted back on store). Same support and tests as that kernel; autotuned over the same
configs on CUDA.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from stabmon.kernels._attention_stats_triton import launch, score_block


@triton.jit
def _attention_max_logit_kernel(
    q_ptr, k_ptr, mask_ptr, max_logit_ptr,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    H, Lq, Lk, D, qk_scale, LQ_KEY, LK_KEY,
    GROUPS: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Lq
    q_ptrs = q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    hi = Lk
    if IS_CAUSAL:
        hi = tl.minimum(Lk, (pid_m + 1) * BLOCK_M)
    k_base = k_ptr + b * stride_kb + (h // GROUPS) * stride_kh
    mask_base = mask_ptr + b * stride_mb + h * stride_mh
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        s = score_block(q, k_base, mask_base, offs_m, offs_n, offs_d, row_ok, stride_kn, stride_kd,
                        stride_mm, stride_mn, Lk, D, qk_scale, IS_CAUSAL, MASK_KIND, DOT_FP32)
        m_i = tl.maximum(m_i, tl.max(s, axis=1))
    tl.store(max_logit_ptr + pid_bh * Lq + offs_m, m_i * 0.6931471805599453, mask=row_ok)


def attention_max_logit_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Launch the kernel; arguments as ``stabmon.kernels.attention_max_logit`` (already checked)."""
    b, h, lq, _ = q.shape
    out = torch.empty(b, h, lq, dtype=torch.float32, device=q.device)
    if lq and b * h:
        launch(_attention_max_logit_kernel, lq, b, h, (out,), q, k, attn_mask, is_causal, scale)
    return out
