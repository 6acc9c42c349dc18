"""Sharded and replicated tensors: local shards and the weights that make norms exact.

Under DDP every rank holds the same gradients; under FSDP2 (``fully_shard``) parameters,
gradients and optimizer state are DTensors and each rank holds a shard (``Shard(0)``) of
each. The monitor reduces norms as sums of squares over ranks. Each rank weights its
local sum of squares by ``shards / ranks holding the tensor``: a tensor replicated on
every rank counts ``1 / world`` per rank, a shard of a tensor split across the whole mesh
counts 1, and a hybrid-sharded one (replicated over one mesh dimension, sharded over the
other) counts ``shards / mesh size``. Summed over ranks that is exactly the norm of the
whole tensor.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["dtensor_class", "global_row_offset", "is_dtensor", "is_rank_zero", "local_tensor", "square_weight"]


def is_rank_zero() -> bool:
    """True on the first process (or without torch.distributed): log lines come from it only."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


@functools.cache
def dtensor_class() -> type | None:
    """``torch.distributed.tensor.DTensor``, or None where torch has no distributed support."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    return DTensor


def is_dtensor(tensor: object) -> bool:
    cls = dtensor_class()
    return cls is not None and isinstance(tensor, cls)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``tensor``: the local shard of a DTensor, the tensor itself otherwise."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def square_weight(tensor: torch.Tensor, world: int) -> float:
    """The weight of this rank's sum of squares of ``tensor`` in a sum over all ``world`` ranks.

    Raises:
        ValueError: a DTensor with a ``Partial`` placement (its local values are addends of
            the tensor, not a part of it: their squares do not add up to its norm).
    """
    if not is_dtensor(tensor):
        return 1.0 / world
    mesh = tensor.device_mesh
    shards = 1
    for dim, placement in enumerate(tensor.placements):
        if placement.is_shard():
            shards *= mesh.size(dim)
        elif placement.is_partial():
            raise ValueError(f"a DTensor with placements {tensor.placements} (Partial) has no per-rank norm; "
                             "stabmon supports Shard and Replicate placements")
    return shards / mesh.size()


def global_row_offset(tensor: torch.Tensor) -> tuple[int, int]:
    """``(first, count)``: the rows (dim 0) of the whole tensor that this rank's shard holds.

    A plain tensor holds all of its rows. A DTensor sharded on another dimension than 0 has no
    row range of its own.

    Raises:
        ValueError: a DTensor sharded along a dimension other than 0.
    """
    if not is_dtensor(tensor):
        return 0, tensor.shape[0]
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    for placement in tensor.placements:
        if placement.is_shard() and placement.dim != 0:
            raise ValueError(f"a DTensor sharded along dim {placement.dim} ({tensor.placements}): only dim-0 "
                             "(row) sharding keeps each row on one rank")
    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return int(offset[0]), int(shape[0])
