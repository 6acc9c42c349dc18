"""Reusable scratch buffers for the chunked torch paths.

On the CPU a fresh multi-megabyte tensor comes from ``mmap`` and pays a page fault per
4 KiB page on first touch: allocating the score block anew at every call made the
attention statistics about 3x slower than the same work in a reused buffer (8.3 ms vs
2.8 ms for a 16 x 4 x 128 x 128 causal block on 2 cores). The buffers are kept per thread,
device and dtype, grow to the largest block asked for (at most the paths' block budget,
16 MB per buffer) and are reused by every later call.
"""

from __future__ import annotations

import threading

import torch

__all__ = ["scratch"]

_local = threading.local()


def scratch(slot: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor of ``shape`` backed by this thread's buffer number ``slot``.

    Two calls with different ``slot`` never overlap; a later call with the same ``slot``
    reuses (and overwrites) the memory of the earlier one.
    """
    if device.type == "cuda":  # the caching allocator already reuses memory there
        return torch.empty(shape, dtype=dtype, device=device)
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    numel = 1
    for n in shape:
        numel *= n
    key = (slot, dtype, device)
    buf = buffers.get(key)
    if buf is None or buf.numel() < numel:
        buf = buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel].view(shape)
