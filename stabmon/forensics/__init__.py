"""Spike forensics: which rows, reproducible or not, where a NaN starts, and never the same batch again.

``Forensics`` is the responder's tool on finding steps. It holds each step's batch by reference
(nothing is copied or read on an ordinary step; with a skip list, the batch's fingerprints are
checked on the device and travel with the step's one read). On a loss or gradient-norm spike,
or a non-finite loss or gradient, it investigates the step before its optimizer step
(``stabmon.forensics.investigate``) and writes the record to
``<run dir>/stabmon-forensics/step_<N>.json`` (``stabmon.forensics.record``). Every batch the
monitor skips or rolls back past goes into the skip list, ``<run dir>/stabmon-skip.json``
(``stabmon.forensics.skiplist``), kept in checkpoints too; a run given it skips any batch that
holds a listed row.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from stabmon.distributed import is_rank_zero
from stabmon.forensics.batch import batch_tensors, fingerprint_hex, row_fingerprints
from stabmon.forensics.config import ForensicsConfig
from stabmon.forensics.investigate import Ranks, investigate, rng_states
from stabmon.forensics.record import ForensicRecord, RowAttribution
from stabmon.forensics.skiplist import SKIP_FILE, SkipList
from stabmon.signals import AllReduce

__all__ = ["FORENSICS_DIR", "ForensicRecord", "Forensics", "ForensicsConfig", "RowAttribution", "SkipList"]

FORENSICS_DIR = "stabmon-forensics"
_TRIGGERS = ("loss_spike", "grad_norm_spike")


class Forensics:
    """The forensics of one run.

    Args:
        model: the module trained (investigations run its forward and backward again).
        config: what is done and within what bounds, or None for no investigation (the skip
            list still works).
        skip_list: the rows and batches not to train on (given, and found in this run).
        run_dir: where records and the skip list are written (rank 0); None keeps them in memory.
        all_reduce: the reduction over ranks (every rank takes part in an investigation).
        pause_hooks: a context manager factory that takes the monitor's own hooks off the model.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> forensics = Forensics(model, ForensicsConfig())
        >>> forensics.hold(0, (torch.ones(2, 3), torch.zeros(2, 1)), lambda b: (model(b[0]) - b[1]).square().mean())
        >>> forensics.listed
        False
    """

    def __init__(self, model: torch.nn.Module, config: ForensicsConfig | None, *, skip_list: SkipList | None = None,
                 run_dir: str | Path | None = None, all_reduce: AllReduce | None = None,
                 pause_hooks: Callable[[], Any] = contextlib.nullcontext) -> None:
        self.model, self.config = model, config
        self.skip_list = skip_list or SkipList()
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._all_reduce = all_reduce
        self._pause = pause_hooks
        self.records: list[ForensicRecord] = []
        self.listed: torch.Tensor | bool = False  # this step's batch holds a listed row (a device bool)
        self._held: tuple[Any, ...] | None = None  # (step, batch, loss_of, epoch, batch_index, rng, fingerprints)
        self._recent: deque[tuple[int, int | None, int | None]] = deque(maxlen=4096)  # (step, epoch, batch index)
        self._listed_steps: set[int] = set()

    # -- every step ------------------------------------------------------------------------------
    def hold(self, step: int, batch: Any, loss_of: Callable[[Any], torch.Tensor] | None = None,
             epoch: int | None = None, batch_index: int | None = None) -> None:
        """This step's batch (by reference), the function that gives its loss, and the RNG state its
        forward draws from (a host copy)."""
        rng = None
        if self.config is not None and self.config.replay:
            rng = rng_states([p.device for p in self.model.parameters()][:1])
        fingerprints = None
        self.listed = False
        if len(self.skip_list):
            fingerprints = row_fingerprints(batch)
            self.listed = self.skip_list.holds(fingerprints, epoch, batch_index)
        self._held = (step, batch, loss_of, epoch, batch_index, rng, fingerprints)
        self._recent.append((step, epoch, batch_index))

    def mark_listed(self, step: int) -> None:
        """This step's batch was skipped for the skip list: it is not listed again."""
        self._listed_steps.add(step)

    def held(self, step: int) -> tuple[Any, ...] | None:
        return self._held if self._held is not None and self._held[0] == step else None

    # -- finding steps -----------------------------------------------------------------------------
    def triggers(self, findings: Sequence[Any]) -> list[Any]:
        """The findings that call for an investigation: spikes of the loss or the gradient norm, a
        non-finite loss or gradient norm; none once ``max_events`` investigations were made."""
        cfg = self.config
        if cfg is None or len(self.records) >= cfg.max_events:
            return []
        return [f for f in findings
                if (f.detector in _TRIGGERS and (f.severity == "critical" or (cfg.on_warnings and f.severity == "warning")))
                or (f.detector == "nonfinite" and f.signal in ("loss/last", "gradients/norm"))]

    def investigate(self, step: int, findings: Sequence[Any], *, step_loss: float | None,
                    step_grad_norm: float | None, grad_scale: float = 1.0,
                    layers: Sequence[tuple[str, float]] = ()) -> ForensicRecord:
        held = self.held(step)
        _, batch, loss_of, epoch, batch_index, rng, _ = held if held is not None else (None,) * 7
        from stabmon.probes.sharpness import buffers_preserved

        with self._pause(), buffers_preserved(self.model):
            record = investigate(self.model, self.config, step=step, findings=findings, batch=batch, loss_of=loss_of,
                                 rng=rng, step_loss=step_loss, step_grad_norm=step_grad_norm, grad_scale=grad_scale,
                                 layers=list(layers), all_reduce=self._all_reduce, epoch=epoch,
                                 batch_index=batch_index)
        self.records.append(record)
        if self.run_dir is not None and is_rank_zero():
            directory = self.run_dir / FORENSICS_DIR
            if self.config.save_batches and batch is not None:
                record.batch_file = self._save_batch(directory, step, batch)
            record.write(directory)
        return record

    def _save_batch(self, directory: Path, step: int, batch: Any) -> str | None:
        size = sum(t.numel() * t.element_size() for t in batch_tensors(batch))
        if size > self.config.max_batch_bytes:
            return None
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"step_{step}_rank0.pt"
        torch.save(_to_cpu(batch), path)
        return str(path)

    # -- the skip list ---------------------------------------------------------------------------------
    def note_skipped(self, step: int, reason: str, rolled_back_to: int | None = None, culprit: bool = True) -> None:
        """The step's batch was skipped (or the run rolled back to ``rolled_back_to``). A batch
        skipped for its own findings (``culprit``) whose spike was not shown to come from something
        else (its replay did not fail to reproduce) gives its rows: the one that carried the
        spike, when its record names one that did most of it, else every row, on every rank.
        Other batches (skipped as a precaution after a rollback, rolled back past, not
        reproducible) are recorded by step, epoch and index, without their rows."""
        held = self.held(step)
        if held is None or step in self._listed_steps:
            return
        _, batch, _, epoch, batch_index, _, fingerprints = held
        record = next((r for r in reversed(self.records) if r.step == step), None)
        base = {"step": step, "epoch": epoch, "batch_index": batch_index, "reason": reason}
        if not culprit or (record is not None and record.verdict == "not_reproducible"):
            why = "not reproducible: not shown to be the data" if culprit else reason
            entries = [{**base, "fingerprint": None, "position": None, "rank": None, "index": None, "reason": why}]
        else:
            entries = self._row_entries(base, record, batch, fingerprints)
        if rolled_back_to is not None:
            entries += [{"fingerprint": None, "step": s, "epoch": e, "batch_index": b, "position": None, "rank": None,
                         "index": None, "reason": f"rolled back past (rollback at step {step})"}
                        for s, e, b in self._recent if rolled_back_to < s < step]
        self._listed_steps.add(step)
        self.skip_list.add(entries)
        if self.run_dir is not None and is_rank_zero():
            self.skip_list.save(self.run_dir / SKIP_FILE)

    def _row_entries(self, base: dict[str, Any], record: ForensicRecord | None, batch: Any,
                     fingerprints: torch.Tensor | None) -> list[dict[str, Any]]:
        dominant = [row for row in (record.rows if record else [])
                    if max(row.loss_share or 0.0, row.grad_share or 0.0) >= 0.5 and row.fingerprint]
        if dominant:
            row = dominant[0]
            return [{**base, "fingerprint": row.fingerprint, "position": row.position, "rank": row.rank,
                     "index": row.index}]
        if fingerprints is None and batch is not None:  # no row stands out: every row of the batch, on every rank
            fingerprints = row_fingerprints(batch)
        mine = [fingerprint_hex(int(x)) for x in fingerprints.tolist()] if fingerprints is not None else []
        ranks = Ranks(self._all_reduce)
        gathered = ranks.gather([(ranks.rank, mine)])
        return [{**base, "fingerprint": fp, "position": i, "rank": rank, "index": None}
                for rank, prints in gathered for i, fp in enumerate(prints)]

    def summary(self) -> str | None:
        """One line for the end-of-training summary."""
        if not self.records and not len(self.skip_list):
            return None
        verdicts = [r.verdict for r in self.records]
        counts = ", ".join(f"{verdicts.count(v)} {v.replace('_', ' ')}" for v in dict.fromkeys(verdicts))
        rows = len(self.skip_list.fingerprints())
        line = (f"  forensics: {len(self.records)} events ({counts or 'none'}); skip list: {rows} rows, "
                f"{len(self.skip_list) - rows} batches on record")
        if self.records:
            line += f"; last: {self.records[-1].headline()}"
        return line

    def state_dict(self) -> dict[str, Any]:
        return {"skip_list": self.skip_list.state_dict(), "records": [r.to_dict() for r in self.records[-100:]]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skip_list.load_state_dict(state.get("skip_list", []))
        self.records = [ForensicRecord.from_dict(r) for r in state.get("records", [])]


def _to_cpu(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.detach().cpu()
    if isinstance(batch, (list, tuple)):
        items = [_to_cpu(x) for x in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)
    if hasattr(batch, "items"):
        return {k: _to_cpu(v) for k, v in batch.items()}
    return batch

