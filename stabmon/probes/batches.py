"""Rows of a training batch for the probes (a held batch for sharpness, an eager probe forward)."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["head_of_batch"]


def head_of_batch(batch: Any, rows: int) -> Any:
    """The first ``rows`` rows of every tensor in a batch (tuples, lists, dicts and mappings
    such as Hugging Face's ``BatchEncoding`` recursed), detached copies.

    Example:
        >>> head_of_batch({"x": torch.arange(6).view(3, 2), "n": 3}, 2)
        {'x': tensor([[0, 1],
                [2, 3]]), 'n': 3}
    """
    if isinstance(batch, torch.Tensor):
        return batch[:rows].detach().clone() if batch.dim() > 0 else batch.detach().clone()
    if isinstance(batch, (list, tuple)):
        items = [head_of_batch(b, rows) for b in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)
    if isinstance(batch, dict):
        return type(batch)({k: head_of_batch(v, rows) for k, v in batch.items()})
    if hasattr(batch, "items") and hasattr(batch, "keys"):  # a Mapping that is not a dict
        return {k: head_of_batch(v, rows) for k, v in batch.items()}
    return batch
