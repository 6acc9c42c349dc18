"""Per-row max attention logit, without the ``Lq x Lk`` matrix and without the softmax.

``attention_max_logit(q, k, ...)`` is the max-only part of ``attention_stats``: for every
query row of ``F.scaled_dot_product_attention(q, k, v, ...)``, ``max_j s_j`` with
``s = scale * q @ k.T + mask``, under SDPA's scale, mask, causal and grouped-query
semantics (see ``stabmon.kernels.attention_stats``). Fully masked rows give ``-inf``.

It is what QK-clip reads on every step of an armed layer: one matmul and a max per key
block, no exponential, no entropy. Dispatch: a Triton kernel on CUDA tensors when Triton
is installed; elsewhere a chunked torch path whose working memory is bounded by
``max_block_elements`` score elements.
"""

from __future__ import annotations

import torch

from stabmon.kernels.attention_stats import (
    DEFAULT_MAX_BLOCK_ELEMENTS,
    _check_sdpa_args,
    _score_blocks,
    attention_stats_reference,
)

__all__ = ["attention_max_logit", "attention_max_logit_chunked", "attention_max_logit_reference"]

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@torch.no_grad()
def attention_max_logit_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    max_block_elements: int = DEFAULT_MAX_BLOCK_ELEMENTS,
) -> torch.Tensor:
    """Torch path: blocks of queries and keys, a running max over key blocks (float32; float64 stays)."""
    _check_sdpa_args(q, k, attn_mask, is_causal)
    b, h, lq, _ = q.shape
    hkv = k.shape[1]
    out = torch.full((b, hkv, h // hkv, lq), float("-inf"), dtype=torch.float32, device=q.device)
    for q0, q1, blocks in _score_blocks(q, k, attn_mask, is_causal, scale, max_block_elements):
        for s in blocks:
            torch.maximum(out[..., q0:q1], s.amax(dim=-1).float(), out=out[..., q0:q1])
    return out.reshape(b, h, lq)


@torch.no_grad()
def attention_max_logit_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """The specification (the full score matrix, in the input dtype). Tests only."""
    return attention_stats_reference(q, k, attn_mask=attn_mask, is_causal=is_causal, scale=scale).max_logit


@torch.no_grad()
def attention_max_logit(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Largest pre-softmax logit of every query row of SDPA's attention.

    Args:
        q: queries ``(B, H, Lq, D)``.
        k: keys ``(B, Hkv, Lk, D)``, ``H`` a multiple of ``Hkv``.
        attn_mask: boolean (``True`` = attend) or additive float mask broadcastable to
            ``(B, H, Lq, Lk)``, or None.
        is_causal: causal mask, top-left aligned as in SDPA. Not combined with ``attn_mask``.
        scale: score scale; ``1 / sqrt(D)`` when None.

    Returns:
        float32 tensor ``(B, H, Lq)``; ``-inf`` for fully masked rows.

    Raises:
        ValueError: shapes that SDPA would reject, or a mask that does not broadcast.

    Example:
        >>> q = torch.ones(1, 1, 2, 4); k = torch.ones(1, 1, 3, 4)
        >>> attention_max_logit(q, k)  # every logit is 4 / sqrt(4) = 2
        tensor([[[2., 2.]]])
    """
    q = q.detach()
    k = k.detach()
    if q.is_cuda and q.dtype in _TRITON_DTYPES and k.dtype == q.dtype:
        from stabmon.kernels import triton_available

        if triton_available():
            from stabmon.kernels._attention_max_logit_triton import attention_max_logit_triton

            _check_sdpa_args(q, k, attn_mask, is_causal)
            return attention_max_logit_triton(q, k, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
    return attention_max_logit_chunked(q, k, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
