"""Triton kernel for ``attention_stats``: one streaming pass over K, no ``Lq x Lk`` matrix.

Supported: fp32 / fp16 / bf16 inputs (fp32 accumulation), head dims 16-256 (any size is
padded to a power of two), any ``Lq`` and ``Lk``, ``is_causal`` (top-left aligned, as
SDPA), boolean and additive float masks broadcastable to ``(B, H, Lq, Lk)``, grouped-query
attention (``H`` a multiple of ``Hkv``), fully masked rows (entropy 0, max logit -inf).

Not supported: dropout (statistics are of the scores, dropout does not change them),
nested / jagged tensors.

Speed, after FlashAttention: scores are kept in base-2 units (``log2(e)`` is folded into the
score scale, so the exponential is a single ``exp2``); causal programs stop at the
diagonal; block sizes depend on the head dim and are autotuned on CUDA over a few configs
per head dim (keyed on the head dim and power-of-two buckets of ``Lq`` and ``Lk``), with a
fixed choice under the interpreter; every config compiles for sm_80 and sm_90 without a
register spill.

Tested: against the float64 reference on the CPU under ``TRITON_INTERPRET=1`` (see
``tests/kernels/test_attention_stats_triton.py``); on CUDA by the tests marked ``gpu``;
every specialization compiled for sm_80 and sm_90 on the CPU by
``tests/kernels/test_triton_compile.py``.

Memory traffic: each program reads its ``BLOCK_M x D`` query block once and streams every
key block once (``Lk x D``), plus the mask block when there is one; it writes
``2 * BLOCK_M`` floats. Nothing of size ``Lq x Lk`` touches global memory.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import triton
import triton.language as tl

from stabmon.kernels.attention_stats import AttentionStats

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

MASK_NONE, MASK_BOOL, MASK_FLOAT = 0, 1, 2
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# (BLOCK_M, BLOCK_N, num_warps, num_stages) tried by the autotuner, by the kind of input and the
# padded head dim. Every one compiles for sm_80 and sm_90 without a register spill
# (tests/kernels/test_triton_compile.py): fp16 / bf16 tensor-core dots take large tiles; a
# mask block (bool or float) costs registers for its pointers, and a full-precision fp32 dot
# (no TF32) runs on the FMA units with its accumulators in registers: both take small tiles.
# The first config of each list is the one the compile test checks in every dtype and mask kind.
CONFIGS: dict[tuple[str, int], list[tuple[int, int, int, int]]] = {
    ("lowp", 64): [(128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2)],
    ("lowp", 128): [(128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3)],
    ("lowp", 256): [(64, 32, 4, 2), (32, 32, 4, 2), (64, 64, 8, 1)],
    ("masked", 64): [(64, 32, 4, 2), (32, 32, 4, 2)],
    ("masked", 128): [(64, 32, 4, 2), (32, 32, 4, 2)],
    ("masked", 256): [(64, 32, 4, 2), (32, 32, 4, 2)],
    ("fp32", 64): [(32, 32, 4, 2), (64, 16, 4, 2)],
    ("fp32", 128): [(16, 16, 4, 2)],
    ("fp32", 256): [(16, 16, 4, 2), (32, 16, 4, 2)],
}


def head_dim_block(d: int) -> int:
    """The padded head dim (a power of two, at least 16)."""
    return max(16, triton.next_power_of_2(d))


def config_kind(dot_fp32: bool, mask_kind: int) -> str:
    return "fp32" if dot_fp32 else "masked" if mask_kind != MASK_NONE else "lowp"


def configs_for(kind: str, block_d: int) -> list[tuple[int, int, int, int]]:
    return CONFIGS[(kind, 64 if block_d <= 64 else 128 if block_d <= 128 else 256)]


@triton.jit
def score_block(
    q, k_base, mask_base, offs_m, offs_n, offs_d, row_ok,
    stride_kn, stride_kd, stride_mm, stride_mn,
    Lk, D, qk_scale,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """Scores of a query block against the key block ``offs_n``, in base-2 units
    (``log2(e) * (scale * q.k + mask)``), ``-inf`` where masked. Shared with the max-logit kernel."""
    col_ok = offs_n < Lk
    k_ptrs = k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    k = tl.load(k_ptrs, mask=col_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    if DOT_FP32:  # full fp32 products (no TF32), as torch's fp32 matmul by default
        s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee") * qk_scale
    else:
        s = tl.dot(q, tl.trans(k)).to(tl.float32) * qk_scale
    keep = row_ok[:, None] & col_ok[None, :]
    if IS_CAUSAL:
        keep = keep & (offs_n[None, :] <= offs_m[:, None])
    if MASK_KIND != 0:
        m_ptrs = mask_base + offs_m[:, None].to(tl.int64) * stride_mm + offs_n[None, :].to(tl.int64) * stride_mn
        if MASK_KIND == 1:
            keep = keep & (tl.load(m_ptrs, mask=keep, other=0) != 0)
        else:
            s = s + tl.load(m_ptrs, mask=keep, other=0.0).to(tl.float32) * 1.4426950408889634
    return tl.where(keep, s, float("-inf"))


@triton.jit
def _attention_stats_kernel(
    q_ptr, k_ptr, mask_ptr, entropy_ptr, max_logit_ptr,
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

    # Base-2 units throughout: s2 = log2(e) * s, so exp(s - m) = exp2(s2 - m2).
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # sum exp2(s2 - m2)
    t_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # sum exp2(s2 - m2) * (s2 - m2)

    hi = Lk
    if IS_CAUSAL:
        hi = tl.minimum(Lk, (pid_m + 1) * BLOCK_M)  # rows of this block see no key past their index
    k_base = k_ptr + b * stride_kb + kv_h * stride_kh
    mask_base = mask_ptr + b * stride_mb + h * stride_mh
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        s = score_block(q, k_base, mask_base, offs_m, offs_n, offs_d, row_ok, stride_kn, stride_kd,
                        stride_mm, stride_mn, Lk, D, qk_scale, IS_CAUSAL, MASK_KIND, DOT_FP32)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row without a finite score so far keeps m = -inf: shift by 0 there (no inf - inf).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        shifted = s - m_safe[:, None]
        p = tl.exp2(shifted)
        block_t = tl.sum(p * tl.where(p > 0, shifted, 0.0), axis=1)  # masked: 0, not 0 * -inf
        alpha = tl.exp2(m_i - m_safe)
        # Re-base the running sums on the new max: t' = alpha * (t + (m_old - m_new) * l).
        t_i = alpha * (t_i + tl.where(l_i > 0, m_i - m_safe, 0.0) * l_i) + block_t
        l_i = alpha * l_i + tl.sum(p, axis=1)
        m_i = m_new

    live = l_i > 0
    l_safe = tl.where(live, l_i, 1.0)
    # entropy in nats = ln(l) - ln(2) * t2 / l
    entropy = tl.where(live, tl.log(l_safe) - 0.6931471805599453 * t_i / l_safe, 0.0)
    entropy = tl.maximum(entropy, 0.0)
    out = pid_bh * Lq + offs_m
    tl.store(entropy_ptr + out, entropy, mask=row_ok)
    tl.store(max_logit_ptr + out, m_i * 0.6931471805599453, mask=row_ok)


def _autotuned(kernel: Any) -> Any:
    """``kernel`` wrapped in Triton's autotuner over ``CONFIGS`` (CUDA only)."""
    unique = dict.fromkeys(cfg for cfgs in CONFIGS.values() for cfg in cfgs)
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in unique]

    def for_head_dim(configs: list, named_args: dict, **kwargs: Any) -> list:
        value = {**named_args, **kwargs}.get
        wanted = set(configs_for(config_kind(value("DOT_FP32"), value("MASK_KIND")), value("BLOCK_D")))
        return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in wanted]

    return triton.autotune(configs=configs, key=["BLOCK_D", "LQ_KEY", "LK_KEY", "GROUPS", "IS_CAUSAL", "MASK_KIND",
                                                 "DOT_FP32"],
                           prune_configs_by={"early_config_prune": for_head_dim})(kernel)


_tuned: dict[str, Any] = {}


def launch(kernel: Any, grid_rows: int, b: int, h: int, tensors: tuple, q: torch.Tensor, k: torch.Tensor,
           attn_mask: torch.Tensor | None, is_causal: bool, scale: float | None) -> None:
    """Launch one of the attention kernels (stats or max logit) with SDPA's mask semantics.

    ``tensors`` are the output pointers after ``q, k, mask``; the autotuned variant is
    built once per kernel on CUDA; the interpreter takes one large fixed block.
    """
    lq, d = q.shape[2], q.shape[3]
    hkv, lk = k.shape[1], k.shape[2]
    qk_scale = (1.0 / math.sqrt(d) if scale is None else float(scale)) * LOG2E
    mask_kind, mask, mask_strides = MASK_NONE, q, (0, 0, 0, 0)
    if attn_mask is not None and not is_causal:
        mask = attn_mask
        while mask.dim() < 4:
            mask = mask.unsqueeze(0)
        mask = mask.expand(b, h, lq, lk)  # broadcast dims get stride 0: nothing is copied
        if mask.dtype == torch.bool:
            mask_kind, mask = MASK_BOOL, mask.view(torch.uint8)
        else:
            mask_kind = MASK_FLOAT
        mask_strides = mask.stride()
    block_d = head_dim_block(d)
    dot_fp32 = _INTERPRET or q.dtype == torch.float32
    args = (q, k, mask, *tensors, *q.stride(), *k.stride(), *mask_strides, h, lq, lk, d, qk_scale,
            triton.next_power_of_2(lq), triton.next_power_of_2(lk))
    constexprs = dict(GROUPS=h // hkv, IS_CAUSAL=is_causal, MASK_KIND=mask_kind, DOT_FP32=dot_fp32, BLOCK_D=block_d)
    if _INTERPRET:
        # The interpreter pays per program and per loop step: few, large blocks.
        block_m = min(128, max(16, triton.next_power_of_2(lq)))
        block_n = min(256, max(16, triton.next_power_of_2(lk)))
        kernel[(triton.cdiv(lq, block_m), b * h)](*args, **constexprs, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)
        return
    tuned = _tuned.get(kernel.__name__)
    if tuned is None:
        tuned = _tuned[kernel.__name__] = _autotuned(kernel)
    tuned[lambda meta: (triton.cdiv(lq, meta["BLOCK_M"]), b * h)](*args, **constexprs)


def attention_stats_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> AttentionStats:
    """Launch the kernel; arguments as ``stabmon.kernels.attention_stats`` (already checked)."""
    b, h, lq, _ = q.shape
    entropy = torch.empty(b, h, lq, dtype=torch.float32, device=q.device)
    max_logit = torch.empty_like(entropy)
    if lq == 0 or b * h == 0:
        return AttentionStats(entropy, max_logit)
    launch(_attention_stats_kernel, lq, b, h, (entropy, max_logit), q, k, attn_mask, is_causal, scale)
    return AttentionStats(entropy, max_logit)
