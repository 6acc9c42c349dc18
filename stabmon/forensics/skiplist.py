"""The skip list: the batches stabmon skipped or rolled back past, kept across restarts.

``stabmon-skip.json`` in the run directory::

    {"version": 1, "entries": [
        {"fingerprint": "0f3a...", "step": 1200, "epoch": 0, "batch_index": 1200, "position": 3, "rank": 1,
         "index": 48213, "reason": "skip_step: loss/last = 812 (threshold 9.3)"},
        {"fingerprint": null, "step": 1150, "epoch": 0, "batch_index": 1150, "position": null, "rank": null,
         "index": null, "reason": "rolled back past (rollback at step 1201)"}]}

An entry with a fingerprint names one row (the same row in any batch, at any position, in any
run): a run given the list skips the optimizer step of any batch that holds a listed row, and
``stabmon.data.without_rows`` drops listed rows from a dataset so a new run never loads them.
An entry without one records a batch by its step, epoch and index within the epoch (a batch
rolled back past, skipped as a precaution after a rollback, or whose spike did not reproduce: the
data was not shown to be the cause); it is matched only with ``"match": "batch_index"``, as the
entries read from Lightning's ``SpikeDetection`` ``skip_batches.json`` (a plain list of batch
indices) are.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

__all__ = ["SKIP_FILE", "SkipList"]

SKIP_FILE = "stabmon-skip.json"


class SkipList:
    """Rows (by fingerprint) and batches (by epoch and index) not to train on.

    Args:
        path: a ``stabmon-skip.json``, or Lightning's ``skip_batches.json``, to start from; None
            for an empty list.

    Example:
        >>> skips = SkipList()
        >>> skips.add([{"fingerprint": "00000000000000ff", "step": 7, "reason": "skip_step"}])
        >>> bool(skips.holds(torch.tensor([3, 255]))), bool(skips.holds(torch.tensor([3])))
        (True, False)
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.entries: list[dict[str, Any]] = []
        self._rows: set[int] = set()
        self._batches: set[tuple[int | None, int]] = set()
        self._device_rows: torch.Tensor | None = None
        if path is not None:
            self.add(self.read(path))

    @staticmethod
    def read(path: str | Path) -> list[dict[str, Any]]:
        """The entries of a skip list file (stabmon's, or Lightning's list of batch indices)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as err:
            raise ValueError(f"`skip_list`: no such file {path}") from err
        except json.JSONDecodeError as err:
            raise ValueError(f"`skip_list`: {path} is not JSON ({err.msg} at line {err.lineno})") from err
        if isinstance(data, list) and all(isinstance(i, int) for i in data):  # Lightning's skip_batches.json
            return [{"fingerprint": None, "step": None, "epoch": None, "batch_index": i, "match": "batch_index",
                     "reason": f"listed in {path.name}"} for i in data]
        if isinstance(data, dict) and isinstance(data.get("entries"), list):
            return data["entries"]
        raise ValueError(f"`skip_list`: {path} is neither a stabmon skip list ({{\"entries\": [...]}}) nor a list of "
                         "batch indices (Lightning's skip_batches.json)")

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, entries: Iterable[dict[str, Any]]) -> None:
        for entry in entries:
            fingerprint = entry.get("fingerprint")
            if fingerprint is not None:
                value = int(fingerprint, 16)
                self._rows.add(value - (1 << 64) if value >= 1 << 63 else value)  # as the int64 it was
            elif entry.get("batch_index") is not None and entry.get("match") == "batch_index":
                self._batches.add((entry.get("epoch"), int(entry["batch_index"])))
            self.entries.append(dict(entry))
        self._device_rows = None

    def holds(self, fingerprints: torch.Tensor | None, epoch: int | None = None,
              batch_index: int | None = None) -> torch.Tensor | bool:
        """Whether a batch is listed: any of its rows' ``fingerprints`` (a device tensor: the answer
        is a device bool, read with the step's other values), or its epoch and batch index."""
        listed = batch_index is not None and ((epoch, batch_index) in self._batches
                                              or (None, batch_index) in self._batches)
        if fingerprints is None or not self._rows:
            return listed
        if self._device_rows is None or self._device_rows.device != fingerprints.device:
            self._device_rows = torch.tensor(sorted(self._rows), dtype=torch.int64, device=fingerprints.device)
        found = torch.isin(fingerprints, self._device_rows).any()
        return found | listed if listed else found

    def save(self, path: str | Path) -> None:
        """Write the list (atomically: a reader never sees half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"version": 1, "entries": self.entries}, indent=1))
        os.replace(tmp, path)

    def fingerprints(self) -> set[str]:
        return {e["fingerprint"] for e in self.entries if e.get("fingerprint")}

    def state_dict(self) -> list[dict[str, Any]]:
        return [dict(e) for e in self.entries]

    def load_state_dict(self, entries: list[dict[str, Any]]) -> None:
        known = {json.dumps(e, sort_keys=True) for e in self.entries}
        self.add(e for e in entries if json.dumps(e, sort_keys=True) not in known)
