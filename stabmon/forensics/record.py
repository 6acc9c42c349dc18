"""The forensic record of one event, and its file.

``stabmon-forensics/step_<N>.json`` (one per event, in the run directory)::

    {"step": 1200, "signal": "loss/last", "severity": "critical", "findings": ["loss/last spike: ..."],
     "verdict": "reproducible", "verdict_reason": "replayed loss 812.4 vs 812.4, gradient norm ...",
     "loss": 812.4, "grad_norm": 95.1, "replay_loss": 812.4, "replay_grad_norm": 95.1,
     "rows": [{"position": 3, "rank": 1, "fingerprint": "0f3a...", "loss": 6401.2, "loss_share": 0.99,
               "grad_share": 0.97, "index": 48213}, ...],
     "row_losses": "cross_entropy", "first_nonfinite_module": null, "nonfinite_input": null,
     "layers": [["transformer_h_3", 41.2], ...], "epoch": 0, "batch_index": 1200, "world_size": 2,
     "seconds": 0.41, "batch_file": null, "path": ".../stabmon-forensics/step_1200.json"}

``rows`` are ranked, highest loss first: ``loss`` is the row's own loss, ``loss_share`` its share
of the batch's excess loss (the sum, over rows, of each row's loss above the batch median),
``grad_share`` its share of the batch gradient (the projection of the row's gradient on the
step's, over the step's squared norm: the shares of all rows add up to 1).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ForensicRecord", "RowAttribution"]


def _finite(value: float | None) -> float | str | None:
    if value is None or math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


@dataclass
class RowAttribution:
    """One row of the batch, as the forensics see it."""

    position: int
    rank: int
    fingerprint: str | None
    loss: float | None
    loss_share: float | None = None
    grad_share: float | None = None
    index: int | None = None

    def describe(self) -> str:
        parts = [f"row {self.position}" + (f" on rank {self.rank}" if self.rank else "")]
        if self.index is not None:
            parts.append(f"dataset index {self.index}")
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4g}")
        if self.loss_share is not None:
            parts.append(f"{100 * self.loss_share:.0f}% of the excess loss")
        if self.grad_share is not None:
            parts.append(f"{100 * self.grad_share:.0f}% of the gradient")
        if self.fingerprint:
            parts.append(f"fingerprint {self.fingerprint}")
        return ", ".join(parts)


@dataclass
class ForensicRecord:
    """What the forensics found at one step (see the module docstring for each field)."""

    step: int
    signal: str
    severity: str
    findings: list[str]
    verdict: str  # "reproducible", "not_reproducible" or "not_replayed"
    verdict_reason: str
    loss: float | None = None
    grad_norm: float | None = None
    replay_loss: float | None = None
    replay_grad_norm: float | None = None
    rows: list[RowAttribution] = field(default_factory=list)
    row_losses: str | None = None  # how the per-row losses were found: "cross_entropy", "row by row", None
    first_nonfinite_module: str | None = None
    nonfinite_input: bool | None = None  # whether that module's input was non-finite already
    layers: list[tuple[str, float]] = field(default_factory=list)
    epoch: int | None = None
    batch_index: int | None = None
    world_size: int = 1
    seconds: float = 0.0
    batch_file: str | None = None
    path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("loss", "grad_norm", "replay_loss", "replay_grad_norm"):
            out[key] = _finite(out[key])
        for row in out["rows"]:
            row["loss"] = _finite(row["loss"])
        out["layers"] = [[name, _finite(norm)] for name, norm in self.layers]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ForensicRecord:
        data = dict(data)
        for key in ("loss", "grad_norm", "replay_loss", "replay_grad_norm"):
            if isinstance(data.get(key), str):
                data[key] = float(data[key])
        rows = []
        for row in data.pop("rows", []):
            row = dict(row)
            if isinstance(row.get("loss"), str):
                row["loss"] = float(row["loss"])
            rows.append(RowAttribution(**row))
        data["layers"] = [tuple(x) for x in data.get("layers", [])]
        return cls(rows=rows, **data)

    def write(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"step_{self.step}.json"
        self.path = str(path)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    def headline(self) -> str:
        """One line: the verdict and the top row (for alerts and the summary)."""
        verdict = {"reproducible": "reproducible (the data at this state of the weights)",
                   "not_reproducible": "not reproducible (nondeterminism, or a transient or hardware fault)",
                   }.get(self.verdict, f"not replayed ({self.verdict_reason})")
        line = f"step {self.step}, {self.signal}: {verdict}"
        if self.rows:
            line += f"; top row: {self.rows[0].describe()}"
        if self.first_nonfinite_module:
            line += f"; first non-finite output: {self.first_nonfinite_module}"
            if self.nonfinite_input:
                line += " (its input was non-finite already)"
        return line
