"""Triton kernel for ``attention_stats``: one streaming pass over K, no ``Lq x Lk`` matrix.

Supported: fp32 / fp16 / bf16 inputs (fp32 accumulation), head dims 16-256 (any size is
padded to a power of two), any ``Lq`` and ``Lk``, ``is_causal`` (top-left aligned, as
SDPA), boolean and additive float masks broadcastable to ``(B, H, Lq, Lk)``, grouped-query
attention (``H`` a multiple of ``Hkv``), fully masked rows (entropy 0, max logit -inf).

Not supported: dropout (statistics are of the scores, dropout does not change them),
nested / jagged tensors.

Tested: against the float64 reference on the CPU under ``TRITON_INTERPRET=1`` (see
``tests/kernels/test_attention_stats_triton.py``); on CUDA by the tests marked ``gpu``.

Memory traffic: each program reads its ``BLOCK_M x D`` query block once and streams every
key block once (``Lk x D``), plus the mask block when there is one; it writes
``2 * BLOCK_M`` floats. Nothing of size ``Lq x Lk`` touches global memory.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from stabmon.kernels.attention_stats import AttentionStats

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

_MASK_NONE, _MASK_BOOL, _MASK_FLOAT = 0, 1, 2


@triton.jit
def _attention_stats_kernel(
    q_ptr, k_ptr, mask_ptr, entropy_ptr, max_logit_ptr,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    H, Lq, Lk, D, scale,
    GROUPS: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)  # int64 offsets: B * H * L * D can pass 2^31
    b = pid_bh // H
    h = pid_bh % H
    kv_h = h // GROUPS

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Lq
    q_ptrs = q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # sum exp(s - m)
    t_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # sum exp(s - m) * (s - m)

    hi = Lk
    if IS_CAUSAL:
        hi = tl.minimum(Lk, (pid_m + 1) * BLOCK_M)  # rows of this block see no key past their index
    k_base = k_ptr + b * stride_kb + kv_h * stride_kh
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < Lk
        k_ptrs = k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
        k = tl.load(k_ptrs, mask=col_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
        if DOT_FP32:  # full fp32 products (no TF32), as torch's fp32 matmul by default
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # (BLOCK_M, BLOCK_N)
        else:
            s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale

        keep = row_ok[:, None] & col_ok[None, :]
        if IS_CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None])
        if MASK_KIND != 0:
            m_ptrs = (mask_ptr + b * stride_mb + h * stride_mh
                      + offs_m[:, None].to(tl.int64) * stride_mm + offs_n[None, :].to(tl.int64) * stride_mn)
            if MASK_KIND == 1:
                keep = keep & (tl.load(m_ptrs, mask=keep, other=0) != 0)
            else:
                s = s + tl.load(m_ptrs, mask=keep, other=0.0).to(tl.float32)
        s = tl.where(keep, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row without a finite score so far keeps m = -inf: shift by 0 there (no inf - inf).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        shifted = s - m_safe[:, None]
        p = tl.exp(shifted)
        block_t = tl.sum(p * tl.where(p > 0, shifted, 0.0), axis=1)  # masked: 0, not 0 * -inf
        alpha = tl.exp(m_i - m_safe)
        # Re-base the running sums on the new max: t' = alpha * (t + (m_old - m_new) * l).
        t_i = alpha * (t_i + tl.where(l_i > 0, m_i - m_safe, 0.0) * l_i) + block_t
        l_i = alpha * l_i + tl.sum(p, axis=1)
        m_i = m_new

    live = l_i > 0
    l_safe = tl.where(live, l_i, 1.0)
    entropy = tl.where(live, tl.log(l_safe) - t_i / l_safe, 0.0)
    entropy = tl.maximum(entropy, 0.0)
    out = pid_bh * Lq + offs_m
    tl.store(entropy_ptr + out, entropy, mask=row_ok)
    tl.store(max_logit_ptr + out, m_i, mask=row_ok)


def _blocks(lq: int, lk: int, d: int) -> tuple[int, int, int, int]:
    block_d = max(16, triton.next_power_of_2(d))
    if _INTERPRET:
        # The interpreter pays per program and per loop step: few, large blocks.
        return (min(128, max(16, triton.next_power_of_2(lq))), min(256, max(16, triton.next_power_of_2(lk))), block_d, 4)
    # Large head dims hold a bigger q block in registers: shrink the tiles.
    if block_d >= 256:
        return 32, 32, block_d, 4
    if block_d >= 128:
        return 64, 32, block_d, 4
    return 64, 64, block_d, 4


def attention_stats_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> AttentionStats:
    """Launch the kernel; arguments as ``stabmon.kernels.attention_stats`` (already checked)."""
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    entropy = torch.empty(b, h, lq, dtype=torch.float32, device=q.device)
    max_logit = torch.empty_like(entropy)
    if lq == 0 or b * h == 0:
        return AttentionStats(entropy, max_logit)

    mask_kind, mask, mask_strides = _MASK_NONE, q, (0, 0, 0, 0)
    if attn_mask is not None and not is_causal:
        mask = attn_mask
        while mask.dim() < 4:
            mask = mask.unsqueeze(0)
        mask = mask.expand(b, h, lq, lk)  # broadcast dims get stride 0: nothing is copied
        if mask.dtype == torch.bool:
            mask_kind, mask = _MASK_BOOL, mask.view(torch.uint8)
        else:
            mask_kind = _MASK_FLOAT
        mask_strides = mask.stride()

    block_m, block_n, block_d, num_warps = _blocks(lq, lk, d)
    dot_fp32 = _INTERPRET or q.dtype == torch.float32
    grid = (triton.cdiv(lq, block_m), b * h)
    _attention_stats_kernel[grid](
        q, k, mask, entropy, max_logit,
        *q.stride(), *k.stride(), *mask_strides,
        h, lq, lk, d, scale,
        GROUPS=h // hkv, IS_CAUSAL=is_causal, MASK_KIND=mask_kind, DOT_FP32=dot_fp32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps,
    )
    return AttentionStats(entropy, max_logit)
