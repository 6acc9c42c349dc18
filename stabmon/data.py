"""Data-side helpers: drop the rows of a skip list from a dataset, so a new run never loads them.

A row's fingerprint (``stabmon.forensics.batch.row_fingerprints``) is a hash of its tensors as
the loader collates them, so an item is fingerprinted as a batch of one through
``torch.utils.data.default_collate`` (pass ``collate_fn`` if the loader uses another).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch  # noqa: F401  (the examples use it)
from torch.utils.data import Dataset, IterableDataset, Subset, default_collate

from stabmon.forensics.batch import fingerprint_hex, row_fingerprints
from stabmon.forensics.skiplist import SkipList

__all__ = ["item_fingerprint", "without_rows"]


def item_fingerprint(item: Any, collate_fn: Callable[[list[Any]], Any] = default_collate) -> str | None:
    """The fingerprint one dataset item gets as a row of a collated batch.

    Example:
        >>> item_fingerprint((torch.arange(4), 3)) == item_fingerprint((torch.arange(4), 3))
        True
    """
    fingerprints = row_fingerprints(collate_fn([item]))
    return fingerprint_hex(int(fingerprints[0])) if fingerprints is not None else None


class _IterableWithout(IterableDataset):
    def __init__(self, dataset: IterableDataset, listed: set[str], collate_fn: Callable[[list[Any]], Any]) -> None:
        self.dataset, self.listed, self.collate_fn = dataset, listed, collate_fn
        self.dropped = 0

    def __iter__(self) -> Iterator[Any]:
        for item in self.dataset:
            if item_fingerprint(item, self.collate_fn) in self.listed:
                self.dropped += 1
                continue
            yield item


def without_rows(dataset: Dataset | IterableDataset, skip_list: SkipList | str | Path,
                 collate_fn: Callable[[list[Any]], Any] = default_collate) -> Dataset:
    """``dataset`` without the rows of ``skip_list`` (a ``SkipList`` or a path to its file).

    A map-style dataset gives a ``torch.utils.data.Subset`` (its items are fingerprinted once,
    here; entries that carry a dataset ``index`` are dropped by index, without a look at the
    item); an iterable one gives a dataset that leaves the listed items out as they come.

    Example:
        >>> data = [torch.full((3,), float(i)) for i in range(5)]
        >>> skips = SkipList(); skips.add([{"fingerprint": item_fingerprint(data[2]), "reason": "spike"}])
        >>> [int(x[0]) for x in without_rows(data, skips)]
        [0, 1, 3, 4]
    """
    skips = skip_list if isinstance(skip_list, SkipList) else SkipList(skip_list)
    listed = skips.fingerprints()
    if isinstance(dataset, IterableDataset):
        return _IterableWithout(dataset, listed, collate_fn)
    indices = {int(e["index"]) for e in skips.entries if e.get("index") is not None}
    keep = [i for i in range(len(dataset))
            if i not in indices and (not listed or item_fingerprint(dataset[i], collate_fn) not in listed)]
    return Subset(dataset, keep)
