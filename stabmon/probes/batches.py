"""Rows of a training batch for the probes (a held batch for sharpness, an eager probe forward)."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["batch_rows", "head_of_batch", "sequence_length"]


def _tensors(batch: Any) -> list[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, (list, tuple)):
        return [t for b in batch for t in _tensors(b)]
    if hasattr(batch, "items"):
        return [t for _, b in batch.items() for t in _tensors(b)]
    return []


def batch_rows(batch: Any) -> int | None:
    """Rows of a batch: the first dimension of its tensors (the largest, where they differ)."""
    sizes = [t.shape[0] for t in _tensors(batch) if t.dim() > 0]
    return max(sizes) if sizes else None


def sequence_length(batch: Any) -> int | None:
    """The second dimension its 2-d (and larger) tensors share: the tokens of a row."""
    lengths = {t.shape[1] for t in _tensors(batch) if t.dim() >= 2}
    return lengths.pop() if len(lengths) == 1 else None


def head_of_batch(batch: Any, rows: int, max_len: int | None = None) -> Any:
    """The first ``rows`` rows of every tensor in a batch (tuples, lists, dicts and mappings
    such as Hugging Face's ``BatchEncoding`` recursed), detached copies; with ``max_len``, the
    first ``max_len`` tokens of each row too (of every tensor whose second dimension is the
    batch's sequence length).

    Example:
        >>> head_of_batch({"x": torch.arange(6).view(3, 2), "n": 3}, 2)
        {'x': tensor([[0, 1],
                [2, 3]]), 'n': 3}
        >>> head_of_batch((torch.arange(12).view(2, 6), torch.ones(2)), 1, max_len=3)
        (tensor([[0, 1, 2]]), tensor([1.]))
    """
    length = sequence_length(batch) if max_len is not None else None

    def cut(item: Any) -> Any:
        if isinstance(item, torch.Tensor):
            if item.dim() == 0:
                return item.detach().clone()
            out = item[:rows]
            if length is not None and max_len < length and out.dim() >= 2 and out.shape[1] == length:
                out = out[:, :max_len]
            return out.detach().clone()
        if isinstance(item, (list, tuple)):
            items = [cut(b) for b in item]
            return type(item)(*items) if hasattr(item, "_fields") else type(item)(items)
        if isinstance(item, dict):
            return type(item)({k: cut(v) for k, v in item.items()})
        if hasattr(item, "items") and hasattr(item, "keys"):  # a Mapping that is not a dict
            return {k: cut(v) for k, v in item.items()}
        return item

    return cut(batch)
