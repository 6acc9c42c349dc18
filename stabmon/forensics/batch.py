"""The rows of a training batch: how many, which ones, and a fingerprint of each.

A batch is whatever the loader yields: a tensor, a tuple or list of tensors, a dict (or a
Hugging Face ``BatchEncoding``), nested. Its rows are the first dimension of its tensors. A
row's fingerprint is a 64-bit hash of its tensors' bytes (their values, dtypes and shapes),
computed on the batch's device in a few kernels and read to the host only when it is written
down: the same row gives the same fingerprint in any run, on any device, at any position in
any batch.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["batch_rows", "batch_tensors", "fingerprint_hex", "row_fingerprints", "select_rows"]

_weights: dict[tuple[int, str], torch.Tensor] = {}


def batch_tensors(batch: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a batch (nested tuples, lists and mappings walked; mapping keys in order)."""
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, (list, tuple)):
        for item in batch:
            yield from batch_tensors(item)
    elif hasattr(batch, "items"):
        for _, item in sorted(batch.items(), key=lambda kv: str(kv[0])):
            yield from batch_tensors(item)


def batch_rows(batch: Any) -> int | None:
    """The number of rows: the first dimension its tensors share (None when there is none).

    Example:
        >>> batch_rows({"input_ids": torch.zeros(4, 16), "labels": torch.zeros(4, 16)})
        4
    """
    sizes = {t.shape[0] for t in batch_tensors(batch) if t.dim() > 0}
    return sizes.pop() if len(sizes) == 1 else (max(sizes) if sizes else None)


def select_rows(batch: Any, index: torch.Tensor | list[int]) -> Any:
    """The batch with only the rows at ``index`` (views where possible; tensors without a batch
    dimension, and everything else, as they are)."""
    rows = batch_rows(batch)

    def pick(item: Any) -> Any:
        if isinstance(item, torch.Tensor):
            if item.dim() > 0 and item.shape[0] == rows:
                return item[torch.as_tensor(index, device=item.device)]
            return item
        if isinstance(item, (list, tuple)):
            picked = [pick(x) for x in item]
            return type(item)(*picked) if hasattr(item, "_fields") else type(item)(picked)
        if isinstance(item, dict):
            return type(item)({k: pick(v) for k, v in item.items()})
        if hasattr(item, "items") and hasattr(item, "keys"):
            return {k: pick(v) for k, v in item.items()}
        return item

    return pick(batch)


def _weights_for(size: int, device: torch.device) -> torch.Tensor:
    """Fixed odd 62-bit multipliers (seeded: the same in every run), one per element of a row."""
    key = (size, str(device))
    if key not in _weights:
        gen = torch.Generator().manual_seed(20251202)
        w = torch.randint(1, 1 << 62, [size], generator=gen, dtype=torch.int64) | 1
        _weights[key] = w.to(device)
    return _weights[key]


def _as_int64(rows: torch.Tensor) -> torch.Tensor:
    """The row-major values of ``rows`` (B, ...) as int64, bit for bit where the dtype allows."""
    flat = rows.reshape(rows.shape[0], -1)
    if flat.dtype.is_floating_point:
        width = {2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]
        flat = flat.contiguous().view(width)
    elif flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    return flat.to(torch.int64)


def row_fingerprints(batch: Any) -> torch.Tensor | None:
    """One int64 fingerprint per row, on the batch's device (None without a batch dimension).

    Example:
        >>> x = torch.arange(12).view(3, 4)
        >>> a, b = row_fingerprints({"x": x}), row_fingerprints({"x": x[[2, 0]]})
        >>> bool(a[2] == b[0]) and bool(a[0] == b[1]) and bool(a[0] != a[1])
        True
    """
    rows = batch_rows(batch)
    if rows is None:
        return None
    out = None
    for i, t in enumerate(x for x in batch_tensors(batch) if x.dim() > 0 and x.shape[0] == rows):
        values = _as_int64(t.detach())
        h = (values * _weights_for(values.shape[1], values.device)).sum(dim=1)  # wraps around: a hash
        h = h * (2 * i + 3) + values.shape[1] * 1_000_003 + zlib.crc32(str(t.dtype).encode())
        out = h if out is None else out * 1_000_000_007 + h
    return out


def fingerprint_hex(value: int) -> str:
    """``int64 -> 16 hex digits`` (the form written to records and skip lists)."""
    return f"{value & ((1 << 64) - 1):016x}"
