"""Attention layers of the model families QK-clip must handle, each with the rows it should find.

Every layer takes ``x (B, T, C)`` and calls SDPA (directly or inside ``nn.MultiheadAttention``).
``expected(layer)`` gives, per parameter name, the dim and the indices of each query head
(role ``q``) and each distinct key head (role ``k``), built from the layout by hand.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

C, HEADS, HEAD_DIM = 16, 4, 4


def _rows(start: int, head: int, size: int = HEAD_DIM) -> list[int]:
    return list(range(start + head * size, start + (head + 1) * size))


class FusedQKV(nn.Module):
    """nanoGPT: one ``c_attn`` for q, k and v, split along the features."""

    def __init__(self, bias: bool = False) -> None:
        super().__init__()
        self.c_attn = nn.Linear(C, 3 * C, bias=bias)
        self.c_proj = nn.Linear(C, C, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (z.view(b, t, HEADS, HEAD_DIM).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, C))

    def expected(self, prefix: str = "") -> dict[tuple[str, str], list[list[int]]]:
        out = {}
        for name in ("weight",) + (("bias",) if self.c_attn.bias is not None else ()):
            out[(f"{prefix}c_attn.{name}", "q")] = [_rows(0, h) for h in range(HEADS)]
            out[(f"{prefix}c_attn.{name}", "k")] = [_rows(C, h) for h in range(HEADS)]
        return out


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class LlamaStyle(nn.Module):
    """Separate projections, grouped-query attention (2 query heads per key head), rotary
    embeddings; the keys reach SDPA either with ``enable_gqa`` or repeated (``repeat_kv``)."""

    def __init__(self, bias: bool = False, kv_heads: int = 2, repeat_kv: bool = False, max_len: int = 16) -> None:
        super().__init__()
        self.kv_heads, self.repeat_kv = kv_heads, repeat_kv
        self.q_proj = nn.Linear(C, HEADS * HEAD_DIM, bias=bias)
        self.k_proj = nn.Linear(C, kv_heads * HEAD_DIM, bias=bias)
        self.v_proj = nn.Linear(C, kv_heads * HEAD_DIM, bias=bias)
        self.o_proj = nn.Linear(C, C, bias=False)
        inv = 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
        freqs = torch.outer(torch.arange(max_len).float(), inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, HEADS, HEAD_DIM).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, HEAD_DIM).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, HEAD_DIM).transpose(1, 2)
        cos, sin = self.cos[:t], self.sin[:t]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        groups = HEADS // self.kv_heads
        if self.repeat_kv:  # as transformers' repeat_kv: expand then reshape
            k = k[:, :, None].expand(b, self.kv_heads, groups, t, HEAD_DIM).reshape(b, HEADS, t, HEAD_DIM)
            v = v[:, :, None].expand(b, self.kv_heads, groups, t, HEAD_DIM).reshape(b, HEADS, t, HEAD_DIM)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=groups > 1)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, C))

    def expected(self, prefix: str = "") -> dict[tuple[str, str], list[list[int]]]:
        out = {}
        for name in ("weight",) + (("bias",) if self.q_proj.bias is not None else ()):
            out[(f"{prefix}q_proj.{name}", "q")] = [_rows(0, h) for h in range(HEADS)]
            out[(f"{prefix}k_proj.{name}", "k")] = [_rows(0, g) for g in range(self.kv_heads)]
        return out


class FusedKV(nn.Module):
    """A separate query projection, one fused ``kv`` projection, keys repeated with
    ``repeat_interleave`` for grouped-query attention."""

    def __init__(self, kv_heads: int = 2) -> None:
        super().__init__()
        self.kv_heads = kv_heads
        self.q = nn.Linear(C, C)
        self.kv = nn.Linear(C, 2 * kv_heads * HEAD_DIM)
        self.out = nn.Linear(C, C)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, HEADS, HEAD_DIM).transpose(1, 2)
        k, v = self.kv(x).view(b, t, 2, self.kv_heads, HEAD_DIM).permute(2, 0, 3, 1, 4)
        groups = HEADS // self.kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, C))

    def expected(self, prefix: str = "") -> dict[tuple[str, str], list[list[int]]]:
        out = {}
        for name in ("weight", "bias"):
            out[(f"{prefix}q.{name}", "q")] = [_rows(0, h) for h in range(HEADS)]
            out[(f"{prefix}kv.{name}", "k")] = [_rows(0, g) for g in range(self.kv_heads)]
        return out


class TorchMHA(nn.Module):
    """``nn.MultiheadAttention`` (packed ``in_proj_weight``), reaching SDPA with ``need_weights=False``."""

    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(C, HEADS, batch_first=True)

    def forward(self, x):
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], dtype=x.dtype)
        return self.mha(x, x, x, attn_mask=mask, need_weights=False, is_causal=True)[0]

    def expected(self, prefix: str = "") -> dict[tuple[str, str], list[list[int]]]:
        out = {}
        for name in ("in_proj_weight", "in_proj_bias"):
            out[(f"{prefix}mha.{name}", "q")] = [_rows(0, h) for h in range(HEADS)]
            out[(f"{prefix}mha.{name}", "k")] = [_rows(C, h) for h in range(HEADS)]
        return out


class TorchEncoderLayer(nn.Module):
    """``nn.TransformerEncoderLayer`` in training mode (its self-attention reaches SDPA)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(C, HEADS, dim_feedforward=32, dropout=0.0, batch_first=True)

    def forward(self, x):
        return self.layer(x, src_mask=nn.Transformer.generate_square_subsequent_mask(x.shape[1]), is_causal=True)

    def expected(self, prefix: str = "") -> dict[tuple[str, str], list[list[int]]]:
        out = {}
        for name in ("in_proj_weight", "in_proj_bias"):
            out[(f"{prefix}layer.self_attn.{name}", "q")] = [_rows(0, h) for h in range(HEADS)]
            out[(f"{prefix}layer.self_attn.{name}", "k")] = [_rows(C, h) for h in range(HEADS)]
        return out


class NonlinearQ(FusedQKV):
    """q goes through a tanh: not linear in its weight."""

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = torch.tanh(q)
        q, k, v = (z.view(b, t, HEADS, HEAD_DIM).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, C))


class QKNorm(FusedQKV):
    """qk-layernorm: q and k are normalized per head before SDPA."""

    def __init__(self) -> None:
        super().__init__()
        self.q_ln, self.k_ln = nn.LayerNorm(HEAD_DIM), nn.LayerNorm(HEAD_DIM)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (z.view(b, t, HEADS, HEAD_DIM).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(self.q_ln(q), self.k_ln(k), v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, C))


FAMILIES = {
    "nanogpt_fused_c_attn": lambda: FusedQKV(),
    "nanogpt_fused_with_bias": lambda: FusedQKV(bias=True),
    "llama_gqa_rotary": lambda: LlamaStyle(),
    "qwen_gqa_rotary_bias": lambda: LlamaStyle(bias=True),
    "llama_repeat_kv": lambda: LlamaStyle(repeat_kv=True),
    "llama_mha_rotary": lambda: LlamaStyle(kv_heads=HEADS),
    "fused_kv_repeat_interleave": lambda: FusedKV(),
    "torch_multihead_attention": lambda: TorchMHA(),
    "torch_encoder_layer": lambda: TorchEncoderLayer(),
}


class Stack(nn.Module):
    """A small language model around one attention family: embeddings, two blocks, a head."""

    def __init__(self, family: str, vocab: int = 32, layers: int = 2, shared: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, C)
        first = FAMILIES[family]()
        self.blocks = nn.ModuleList([first] + [first if shared else FAMILIES[family]() for _ in range(layers - 1)])
        self.head = nn.Linear(C, vocab)

    def forward(self, idx):
        x = self.embed(idx)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def grow_logits(model: nn.Module, factor: float = 6.0) -> None:
    """Scale every query and key weight up so attention logits are large (a run gone wrong)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(tag in name for tag in ("c_attn", "q_proj", "k_proj", ".q.", ".kv.", "in_proj")):
                if name.endswith("bias"):  # some are initialised to zero; make every entry count
                    p.add_(0.1 * torch.randn(p.shape, generator=gen))
                p.mul_(math.sqrt(factor))
