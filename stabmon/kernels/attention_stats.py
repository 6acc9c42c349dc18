"""Per-row attention entropy and max logit, without the ``Lq x Lk`` matrix.

For every query row of ``F.scaled_dot_product_attention(q, k, v, ...)`` this computes

* ``max_logit = max_j s_j``, with ``s = scale * q @ k.T + mask`` (the pre-softmax score),
* ``entropy = -sum_j p_j log p_j`` in nats, with ``p = softmax(s)``.

Both use SDPA's exact semantics: ``scale`` defaults to ``1/sqrt(D)``; a boolean
``attn_mask`` marks with ``True`` the keys that take part; a float ``attn_mask`` is added
to the scores; ``is_causal`` keeps key ``j <= i`` (top-left aligned, as SDPA); ``k`` may
have fewer heads than ``q`` (grouped-query attention, query head ``h`` reads key head
``h // (H // Hkv)``).

Fully masked rows (every score ``-inf``) have no distribution: they get ``entropy = 0``
and ``max_logit = -inf``, never NaN. Aggregations use ``max_logit == -inf`` to leave
such rows out.

The entropy is accumulated relative to the running maximum ``m``, streaming over key
blocks with the online log-sum-exp of flash attention::

    l  = sum_j exp(s_j - m)
    t  = sum_j exp(s_j - m) * (s_j - m)          (<= 0)
    entropy = log(l) - t / l

Keeping ``s_j - m`` instead of ``s_j`` avoids the cancellation of ``m + log l - E[s]``
when logits are large (1e4 in float32 would leave only about 1e-3 of precision).

Dispatch: a Triton kernel on CUDA tensors when Triton is installed; elsewhere a chunked
torch path whose working memory is bounded by ``max_block_elements`` score elements.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from typing import NamedTuple

import torch

from stabmon.kernels._workspace import scratch

__all__ = [
    "AttentionStats",
    "attention_stats",
    "attention_stats_chunked",
    "attention_stats_reference",
]

# Score elements (B * H * rows * cols) held at once by the chunked path: 4M floats = 16 MB.
DEFAULT_MAX_BLOCK_ELEMENTS = 1 << 22
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Floor of s - max before exp in the torch paths (see attention_stats_chunked).
_EXP_FLOOR = -80.0


class AttentionStats(NamedTuple):
    """Per query row statistics, each float32 of shape ``(B, H, Lq)``."""

    entropy: torch.Tensor
    max_logit: torch.Tensor


def _check_sdpa_args(q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool) -> None:
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"`q` must be a 4-d tensor (B, H, Lq, D), got {_describe(q)}")
    if not isinstance(k, torch.Tensor) or k.dim() != 4:
        raise ValueError(f"`k` must be a 4-d tensor (B, Hkv, Lk, D), got {_describe(k)}")
    b, h, _, d = q.shape
    bk, hkv, _, dk = k.shape
    if bk != b or dk != d:
        raise ValueError(
            f"`k` must have the batch size and head dim of `q` {tuple(q.shape)}, got {tuple(k.shape)}"
        )
    if hkv < 1 or h % hkv != 0:
        raise ValueError(f"the number of query heads ({h}) must be a multiple of the key heads ({hkv})")
    if attn_mask is not None:
        if is_causal:
            raise ValueError("`attn_mask` and `is_causal=True` cannot be combined (as in SDPA)")
        if not isinstance(attn_mask, torch.Tensor):
            raise ValueError(f"`attn_mask` must be a tensor or None, got {type(attn_mask).__name__}")
        target = (b, h, q.shape[2], k.shape[2])
        try:
            torch.broadcast_shapes(attn_mask.shape, target)
        except RuntimeError:
            raise ValueError(
                f"`attn_mask` of shape {tuple(attn_mask.shape)} does not broadcast to (B, H, Lq, Lk) = {target}"
            ) from None


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def _mask_block_(
    s: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    q0: int,
    q1: int,
    k0: int,
    k1: int,
    hkv: int,
) -> None:
    """Apply the mask to the score block ``s = scores[..., q0:q1, k0:k1]`` in place."""
    if is_causal:
        if k1 - 1 <= q0:
            return  # the whole block lies on or below the diagonal
        s.add_(_causal_bias(q1 - q0, k1 - k0, q0 - k0 + 1, s.device, s.dtype))
        return
    if attn_mask is None:
        return
    lq_lk = attn_mask.shape[-2:] if attn_mask.dim() >= 2 else (1, attn_mask.shape[-1])
    # Broadcast dims stay size 1: slicing copies nothing.
    block = attn_mask.reshape(*attn_mask.shape[:-2], *lq_lk) if attn_mask.dim() < 2 else attn_mask
    block = block[..., q0:q1 if lq_lk[0] > 1 else 1, k0:k1 if lq_lk[1] > 1 else 1]
    block = _as_gqa(block, hkv)
    if block.dtype == torch.bool:
        # An additive 0 / -inf bias the size of the mask: a broadcast add is many times faster
        # on CPU than a broadcast masked_fill_ over the larger score block.
        block = torch.zeros(block.shape, dtype=s.dtype, device=s.device).masked_fill_(~block, float("-inf"))
    s.add_(block.to(s.dtype))


@functools.lru_cache(maxsize=8)
def _causal_bias(rows: int, cols: int, offset: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask: -inf where key ``j`` lies past query ``i`` (``j - i >= offset``), else 0.

    Cached, since a model asks for the same few blocks at every sampled step; added rather
    than ``masked_fill_``-ed because a broadcast add is about 10x faster on CPU.
    """
    above = torch.ones(rows, cols, dtype=torch.bool, device=device).triu_(offset)
    return torch.zeros(rows, cols, dtype=dtype, device=device).masked_fill_(above, float("-inf"))


def _as_gqa(x: torch.Tensor | None, hkv: int) -> torch.Tensor | None:
    """``(B, H, ...)`` -> ``(B, Hkv, H // Hkv, ...)`` for a block that may broadcast over B or H."""
    if x is None:
        return None
    while x.dim() < 4:
        x = x.unsqueeze(0)
    b, h = x.shape[:2]
    if h == 1:
        return x.unsqueeze(2)  # (B, 1, 1, rows, cols) broadcasts over every head
    return x.reshape(b, hkv, h // hkv, *x.shape[2:])


def _score_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
    max_block_elements: int,
) -> Iterator[tuple[int, int, Iterator[torch.Tensor]]]:
    """The scaled, masked scores of SDPA, block by block, in float32 (float64 stays).

    Yields ``(q0, q1, blocks)`` for each block of query rows ``q0:q1``; ``blocks`` yields the
    scores of each key block, ``(B, Hkv, G, q1 - q0, cols)`` with the ``G = H // Hkv`` query
    heads of a key head side by side. Causal rows never look past their own index, so key
    blocks entirely above the diagonal are skipped. A score block is written into a reused
    buffer (``kernels/_workspace.py``): use it up before taking the next. Rows * cols * B * H
    stays within ``max_block_elements``. Arguments are not checked here.
    """
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    groups = h // hkv
    work_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    # Fold the scale into q once; (B, Hkv, G, Lq, D) lets each key head serve its group.
    qg = (q.to(work_dtype) * scale).reshape(b, hkv, groups, lq, d)
    kg = k.to(work_dtype).unsqueeze(2)  # (B, Hkv, 1, Lk, D)
    # Square-ish blocks: rows * cols * B * H <= max_block_elements.
    per_head = max(1, max_block_elements // max(1, b * h))
    block_k = max(1, min(lk, max(256, int(math.sqrt(per_head)))))
    block_q = max(1, min(lq, per_head // block_k))

    def key_blocks(q0: int, q1: int) -> Iterator[torch.Tensor]:
        k_end = min(lk, q1) if is_causal else lk
        for k0 in range(0, k_end, block_k):
            k1 = min(k_end, k0 + block_k)
            s = torch.matmul(qg[:, :, :, q0:q1], kg[:, :, :, k0:k1].transpose(-1, -2),
                             out=scratch(0, (b, hkv, groups, q1 - q0, k1 - k0), work_dtype, q.device))
            _mask_block_(s, attn_mask, is_causal, q0, q1, k0, k1, hkv)
            yield s

    for q0 in range(0, lq, block_q):
        q1 = min(lq, q0 + block_q)
        yield q0, q1, key_blocks(q0, q1)


@torch.no_grad()
def attention_stats_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    max_block_elements: int = DEFAULT_MAX_BLOCK_ELEMENTS,
) -> AttentionStats:
    """Torch path: blocks of queries and keys, online log-sum-exp over key blocks.

    Works on any device; computes in float32 (float64 inputs stay float64). Memory is
    ``O(B * H * Lq)`` plus one score block of at most ``max_block_elements`` elements.
    """
    _check_sdpa_args(q, k, attn_mask, is_causal)
    b, h, lq, _ = q.shape
    hkv = k.shape[1]
    groups = h // hkv
    work_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    entropy = torch.empty(b, hkv, groups, lq, dtype=torch.float32, device=q.device)
    max_logit = torch.empty_like(entropy)
    for q0, q1, blocks in _score_blocks(q, k, attn_mask, is_causal, scale, max_block_elements):
        rows = q1 - q0
        m = l = t = None  # noqa: E741  running max, sum exp(s - m), sum exp(s - m) * (s - m)
        for s in blocks:
            m_new = s.amax(dim=-1) if m is None else torch.maximum(m, s.amax(dim=-1))
            # A row with no finite score yet keeps m = -inf: shift it by 0 (no inf - inf).
            m_safe = m_new.nan_to_num(neginf=0.0)
            s.sub_(m_safe.unsqueeze(-1))  # s - m, in place: the block is the only large buffer
            # Clamp s - m at -80: exp is many times slower on CPU where it underflows, and a
            # term below e^-80 is invisible next to the max's e^0 anyway. Masked -inf entries
            # become e^-80 too; a row counts as live by its max (below), not by l > 0.
            s.clamp_(min=_EXP_FLOOR)
            p = torch.exp(s, out=scratch(1, s.shape, work_dtype, q.device))
            block_l = p.sum(-1)
            block_t = s.mul_(p).sum(-1)  # sum exp(s - m) * (s - m), in place
            if m is None:  # the first key block starts the sums
                l, t = block_l, block_t  # noqa: E741
            else:
                # Re-base the old sums on the new maximum: t' = alpha * (t + (m_old - m_new) * l).
                alpha = torch.exp(m - m_safe)
                t = alpha * (t + (m - m_safe).nan_to_num(neginf=0.0) * l) + block_t
                l = alpha * l + block_l  # noqa: E741
            m = m_new
        if m is None:  # no key at all (Lk == 0): every row is fully masked
            m = torch.full((b, hkv, groups, rows), float("-inf"), dtype=work_dtype, device=q.device)
            l = t = torch.ones_like(m)  # noqa: E741
        live = ~torch.isneginf(m)  # l >= 1 there: the max term contributes e^0
        ent = torch.where(live, torch.log(l) - t / l, 0)
        entropy[..., q0:q1] = ent.clamp_min(0).float()
        max_logit[..., q0:q1] = m.float()
    return AttentionStats(entropy.reshape(b, h, lq), max_logit.reshape(b, h, lq))


@torch.no_grad()
def attention_stats_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> AttentionStats:
    """The specification: builds the full score matrix in the input dtype. Tests only.

    Returns tensors in the input dtype (float64 inputs give the ground truth).
    """
    _check_sdpa_args(q, k, attn_mask, is_causal)
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    k_full = k.repeat_interleave(h // hkv, dim=1)
    s = (q @ k_full.transpose(-1, -2)) * scale  # (B, H, Lq, Lk)
    if is_causal:
        keep = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    elif attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask.to(s.dtype)
    max_logit = s.amax(dim=-1)
    dead = torch.isneginf(max_logit)
    logp = torch.log_softmax(s.masked_fill(dead.unsqueeze(-1), 0), dim=-1)
    p = logp.exp()
    entropy = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)
    return AttentionStats(entropy.masked_fill(dead, 0), max_logit)


@torch.no_grad()
def attention_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> AttentionStats:
    """Entropy (nats) and max logit of every query row of SDPA's attention.

    Args:
        q: queries ``(B, H, Lq, D)``.
        k: keys ``(B, Hkv, Lk, D)``, ``H`` a multiple of ``Hkv``.
        attn_mask: boolean (``True`` = attend) or additive float mask broadcastable to
            ``(B, H, Lq, Lk)``, or None.
        is_causal: causal mask, top-left aligned as in SDPA. Not combined with ``attn_mask``.
        scale: score scale; ``1 / sqrt(D)`` when None.

    Returns:
        ``AttentionStats(entropy, max_logit)``, float32 tensors of shape ``(B, H, Lq)``.
        Fully masked rows give ``entropy = 0`` and ``max_logit = -inf``.

    Raises:
        ValueError: shapes that SDPA would reject, or a mask that does not broadcast.

    Example:
        >>> q = torch.zeros(1, 2, 3, 8); k = torch.zeros(1, 1, 4, 8)
        >>> stats = attention_stats(q, k)
        >>> round(stats.entropy[0, 0, 0].item(), 4) == round(math.log(4), 4)
        True
    """
    q = q.detach()
    k = k.detach()
    if q.is_cuda and q.dtype in _TRITON_DTYPES and k.dtype == q.dtype:
        from stabmon.kernels import triton_available

        if triton_available():
            from stabmon.kernels._attention_stats_triton import attention_stats_triton

            _check_sdpa_args(q, k, attn_mask, is_causal)
            return attention_stats_triton(q, k, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
    return attention_stats_chunked(q, k, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
