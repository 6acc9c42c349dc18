"""``stabmon inspect``: stabmon's detectors replayed over a run's logs, step by step.

Keys are mapped to stabmon's signals (``KeyMap``): the loss (``loss``, ``train_loss``,
``train/loss``, ... or stabmon's own ``stabmon-loss/last``), the gradient norm (``grad_norm``,
``train/grad_norm``, ... or ``stabmon-gradients/norm``), the fp16 loss scale, and every key
stabmon logged (``<prefix>-<family>/<name>[/<layer>]``, any prefix). The per-step detectors
(non-finite, loss and gradient-norm spikes, the loss-scale floor) see the loss and gradient
norm of every logged step, the sampled detectors (attention logits and entropy, log Z, edge of
stability) every step that holds stabmon's keys: the same detectors, with the same
``DetectionConfig``, as in training. A run that stabmon watched also has its findings and
actions in ``stabmon-events.jsonl``; the replay keeps its spike detectors quiet after that run's
re-warms and rollbacks, as the live monitor did.

The onset of divergence: the first step of the stretch, lasting to the end of the log and at
least ``drift_window`` logged values long, over which the loss's trailing level (the median of
the last ``drift_window`` logged values: one spike does not move it) stays above its best so
far by ``max(0.05, 5% of the best)`` (``stabmon.detectors.drift.DriftDetector``).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stabmon.cli.series import Curves
from stabmon.detectors import DetectionConfig, Finding
from stabmon.detectors.drift import DriftDetector
from stabmon.keys import FAMILIES
from stabmon.sinks.events import EVENTS_FILE, read_events

__all__ = ["ALIASES", "Inspection", "KeyMap", "Replay"]

# stabmon signal -> the log keys it is read from, in order of preference (a key logged every step
# comes before stabmon's own, which is logged at the monitor's cadence); ``*`` matches anything
ALIASES: dict[str, tuple[str, ...]] = {
    "loss/last": ("loss", "train_loss", "train/loss", "training_loss", "train_loss_step", "loss_step",
                  "train/loss_step", "Loss/train", "loss/train", "trainer/loss", "*-loss/last"),
    "gradients/norm": ("grad_norm", "train/grad_norm", "gradient_norm", "grad-norm", "grad_norm/total",
                       "*-gradients/norm"),
    "lr": ("learning_rate", "lr", "train/learning_rate", "lr-*"),
    "gradients/loss_scale": ("loss_scale", "train/loss_scale", "*-gradients/loss_scale"),
}
SHORT = {"loss": "loss/last", "grad_norm": "gradients/norm", "lr": "lr", "loss_scale": "gradients/loss_scale"}
_STABMON_KEY = re.compile(r"^(?:train/|eval/)?([\w.\-]*?)-?(" + "|".join(FAMILIES) + r")/(.+)$")
PER_STEP = ("loss/last", "gradients/norm", "gradients/loss_scale")


class KeyMap:
    """Which log key feeds which stabmon signal.

    Args:
        overrides: ``{"loss": "my/loss"}`` (signal or short name -> log key), from ``--key``.

    Example:
        >>> keys = KeyMap({"loss": "my/loss"})
        >>> keys.signals({"my/loss": 2.0, "grad_norm": 0.5, "stabmon-attention/max_logit/layer_00": 9.0})
        {'loss/last': 2.0, 'gradients/norm': 0.5, 'attention/max_logit/layer_00': 9.0}
    """

    def __init__(self, overrides: Mapping[str, str] | None = None) -> None:
        self.overrides = {}
        for name, key in (overrides or {}).items():
            signal = SHORT.get(name, name)
            if signal not in ALIASES:
                raise ValueError(f"--key {name}={key}: the signal must be one of {', '.join(SHORT)} (or "
                                 f"{', '.join(ALIASES)})")
            self.overrides[signal] = key
        self.used: dict[str, str] = {}  # signal -> the key it was read from (the first time)

    def signals(self, values: Mapping[str, float]) -> dict[str, float]:
        out: dict[str, float] = {}
        for signal, aliases in ALIASES.items():
            key = self.overrides.get(signal) or next((k for a in aliases for k in _matching(a, values)), None)
            if key is not None and key in values:
                out[signal] = values[key]
                self.used.setdefault(signal, key)
        for key, value in values.items():  # stabmon's own keys, under any prefix
            match = _STABMON_KEY.match(key)
            if match and match.group(3) and not key.endswith("/by_layer"):
                name = f"{match.group(2)}/{match.group(3)}"
                if name not in out:
                    out[name] = value
        return out


def _matching(alias: str, values: Mapping[str, float]) -> Iterable[str]:
    if "*" not in alias:
        return (alias,) if alias in values else ()
    return sorted(k for k in values if fnmatch.fnmatchcase(k, alias))


@dataclass
class Inspection:
    """What ``Replay`` found: the findings, the onset of divergence, and the run's own events."""

    findings: list[Finding] = field(default_factory=list)
    steps: int = 0
    first_step: int | None = None
    last_step: int | None = None
    onset: int | None = None
    drift: DriftDetector | None = None
    events: list[dict[str, Any]] = field(default_factory=list)  # the monitored run's findings, actions, head maps

    def worst(self) -> str | None:
        ranks = {"info": 0, "warning": 1, "critical": 2}
        return max((f.severity for f in self.findings), key=ranks.__getitem__, default=None)


class Replay:
    """Feeds a run's records to stabmon's detectors, a step at a time (records of one step are
    merged first). ``feed`` returns the findings of the steps completed by it.

    Args:
        config: the detectors' thresholds. Default ``DetectionConfig()``.
        keys: the key map. Default ``KeyMap()``.
        events: the monitored run's event log records (its actions quiet the spike detectors).
        drift_window: logged values in the trailing mean of the onset of divergence. Default 20.
        grace_steps: steps the spike detectors stay quiet after the run's own re-warm or rollback.
    """

    def __init__(self, config: DetectionConfig | None = None, keys: KeyMap | None = None,
                 events: Iterable[dict[str, Any]] = (), drift_window: int = 20, grace_steps: int = 50) -> None:
        self.detectors = (config or DetectionConfig()).build()
        self.keys = keys or KeyMap()
        self.drift = DriftDetector(window=drift_window, patience=drift_window)
        self.result = Inspection(drift=self.drift, events=list(events))
        self._quiet_after = sorted(e["step"] for e in self.result.events
                                   if e.get("kind") == "action" and e.get("name") in ("rewarm", "rollback"))
        self._grace = grace_steps
        self._step: int | None = None
        self._values: dict[str, float] = {}
        self.series = Curves()  # every signal's curve, decimated, for the report

    def feed(self, records: Iterable[tuple[int, dict[str, float]]]) -> list[Finding]:
        new: list[Finding] = []
        for step, values in records:
            if step != self._step and self._step is not None:
                new += self._detect(self._step, self._values)
                self._values = {}
            self._step = step
            self._values.update(values)
        return new

    def finish(self) -> list[Finding]:
        new = self._detect(self._step, self._values) if self._step is not None else []
        self._step, self._values = None, {}
        result = self.result
        result.onset = self.drift.onset if self.drift.drifting else None  # a stretch that lasts to the end
        return new

    def _detect(self, step: int, values: dict[str, float]) -> list[Finding]:
        result = self.result
        result.steps += 1
        result.first_step = step if result.first_step is None else result.first_step
        result.last_step = step
        while self._quiet_after and self._quiet_after[0] <= step:
            self.detectors.quiet_until(self._quiet_after.pop(0) + self._grace)
        signals = self.keys.signals(values)
        self.series.add(step, signals)
        per_step = {k: signals[k] for k in PER_STEP if k in signals}
        found = self.detectors.on_step(step, per_step) if per_step else []
        found += self.detectors.on_sample(step, signals)
        self.drift.update(step, per_step)
        result.findings += found
        return found


def load_events(run_dir: Path) -> list[dict[str, Any]]:
    """The monitored run's event log, if it has one (in the run directory or one above it)."""
    for directory in (run_dir, *run_dir.parents[:2]):
        path = directory / EVENTS_FILE
        if path.is_file():
            return read_events(path)
    return []
