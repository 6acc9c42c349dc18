"""The run directory's event log: what the monitor found and did, for ``stabmon inspect``.

The trainers' loggers get the monitor's signals as scalars, but not its findings and actions
one by one, nor the per-head attention maps. ``EventLog`` appends them to
``<run dir>/stabmon-events.jsonl``, one JSON object per line, from rank 0:

* ``{"kind": "finding", "step", "signal", "severity", "value", "threshold", "message", "detector", "layer"}``
* ``{"kind": "action", "step", "name", "detail"}``
* ``{"kind": "heads", "step", "layers": {"layer_00": {"module", "entropy_mean": [...], "entropy_min": [...],
  "max_logit": [...]}}}``: per head, at most every ``heads_every_n_steps`` steps.

Non-finite values are written as the strings ``"nan"``, ``"inf"``, ``"-inf"`` (strict JSON).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from stabmon.detectors.base import Finding
from stabmon.interventions.policy import Action

__all__ = ["EVENTS_FILE", "EventLog", "json_number", "read_events"]

EVENTS_FILE = "stabmon-events.jsonl"


def json_number(value: float) -> float | str:
    """``value``, or its name when JSON has none for it (``"nan"``, ``"inf"``, ``"-inf"``)."""
    if math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


class EventLog:
    """Appends findings, actions and per-head maps to ``directory / stabmon-events.jsonl``.

    Example:
        >>> import tempfile
        >>> log = EventLog(tempfile.mkdtemp())
        >>> log.write([Finding(3, "loss/last", "critical", float("nan"), float("inf"), "loss/last is nan")], [])
        >>> [(e["kind"], e["step"], e["value"]) for e in read_events(log.path)]
        [('finding', 3, nan)]
    """

    def __init__(self, directory: str | Path, heads_every_n_steps: int = 500) -> None:
        self.path = Path(directory) / EVENTS_FILE
        self.heads_every_n_steps = heads_every_n_steps
        self._last_heads: int | None = None

    def write(self, findings: Sequence[Finding], actions: Sequence[Action]) -> None:
        records = [{"kind": "finding", **{k: json_number(v) if isinstance(v, float) else v
                                          for k, v in f.to_dict().items()}} for f in findings]
        records += [{"kind": "action", **a.to_dict()} for a in actions]
        self._append(records)

    def heads(self, step: int, head_maps: Mapping[str, Mapping[str, Any]], modules: Mapping[str, str]) -> None:
        """The per-head maps of a sample, when ``heads_every_n_steps`` have passed since the last."""
        if not head_maps or (self._last_heads is not None and step - self._last_heads < self.heads_every_n_steps):
            return
        self._last_heads = step
        layers = {layer: {"module": modules.get(layer, ""),
                          **{name: [json_number(float(x)) for x in values.tolist()] for name, values in maps.items()}}
                  for layer, maps in head_maps.items()}
        self._append([{"kind": "heads", "step": step, "layers": layers}])

    def _append(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """The records of an event log, with the named non-finite values back as floats; a last line
    cut off by a writer that was stopped is left out."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        for key in ("value", "threshold"):
            if isinstance(record.get(key), str):
                record[key] = float(record[key])
        out.append(record)
    return out
