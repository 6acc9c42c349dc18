"""W&B extras: metric summaries, per-head heatmaps, and a step-indexed events table.

Works on a ``wandb`` run object (``WandbLogger.experiment`` or ``wandb.run``); W&B is
imported lazily, so nothing here runs without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from stabmon.detectors.base import Finding
from stabmon.interventions.policy import Action
from stabmon.keys import logged_key
from stabmon.sinks.heatmap import render_heatmap

__all__ = ["WandbExtras"]

# define_metric summaries: what a run's table shows for each series
_SUMMARIES = {
    "attention/entropy_min*": "min",
    "attention/max_logit*": "max",
    "attention/q_gain_norm*": "max",
    "attention/k_gain_norm*": "max",
    "logits/logz_max": "max",
    "logits/max_logit": "max",
    "logits/min_logit": "min",
    "gradients/norm_max": "max",
    "sharpness/eos_ratio": "max",
    "sharpness/top_eigenvalue": "max",
}


class WandbExtras:
    """Adds to a W&B run what plain scalars cannot show.

    * ``define_metric`` summaries (lowest entropy, highest logits);
    * every per-layer signal as one chart with a line per layer (``wandb.plot.line_series``,
      key ``stabmon-<family>/<name>/by_layer``), refreshed with the heatmaps and at the end
      (``add_series`` collects the points, at most ``max_points`` per line);
    * every ``heatmap_every_n_steps`` steps, per-layer x per-head heatmaps of attention entropy
      and max logit (``stabmon-attention/entropy_heatmap``, ``stabmon-attention/max_logit_heatmap``,
      images) and the same numbers as a ``wandb.Table`` (``stabmon-attention/heads``);
    * findings and actions as a step-indexed table ``stabmon-actions/events`` (step, kind, name,
      severity, signal, value, threshold, message) and an ``stabmon-actions/event`` marker
      series (1 at each step with an action), so interventions show on the charts.

    Example::

        extras = WandbExtras(wandb.run)
        extras.add_series(50, {"attention/max_logit": {"layer_00": 12.0, "layer_01": 9.5}})
        extras.log_series(50)   # one chart, a line per layer
    """

    def __init__(self, run: Any, prefix: str = "stabmon", heatmap_every_n_steps: int = 500,
                 max_points: int = 1000) -> None:
        self.run, self.prefix, self.heatmap_every_n_steps = run, prefix, heatmap_every_n_steps
        self.max_points = max_points
        self.events: list[list[Any]] = []
        self.forensic_rows: list[list[Any]] = []
        self.series: dict[str, dict[str, list[tuple[int, float]]]] = {}  # family/name -> layer -> points
        self._last_heatmap: int | None = None
        self._defined = False

    def key(self, name: str) -> str:
        return logged_key(self.prefix, name)

    def define_metrics(self) -> None:
        if self._defined:
            return
        self._defined = True
        for pattern, summary in _SUMMARIES.items():
            self.run.define_metric(self.key(pattern), summary=summary)

    def heatmaps(self, step: int, head_maps: dict[str, dict[str, Any]], modules: dict[str, str]) -> bool:
        """Log the per-head maps when due; returns True when it logged."""
        if not head_maps:
            return False
        if self._last_heatmap is not None and step - self._last_heatmap < self.heatmap_every_n_steps:
            return False
        import wandb

        self._last_heatmap = step
        layers = sorted(head_maps)
        labels = [layer.replace("layer_", "L") for layer in layers]
        entropy = [head_maps[layer]["entropy_mean"].tolist() for layer in layers]
        max_logit = [head_maps[layer]["max_logit"].tolist() for layer in layers]
        table = wandb.Table(columns=["step", "layer", "module", "head", "entropy_mean", "entropy_min", "max_logit"])
        for layer in layers:
            m = head_maps[layer]
            for h in range(len(m["entropy_mean"])):
                table.add_data(step, layer, modules.get(layer, ""), h, float(m["entropy_mean"][h]),
                               float(m["entropy_min"][h]), float(m["max_logit"][h]))
        self._log({
            self.key("attention/entropy_heatmap"): wandb.Image(
                render_heatmap(entropy, title=f"attention entropy (nats), step {step}", row_labels=labels)),
            self.key("attention/max_logit_heatmap"): wandb.Image(
                render_heatmap(max_logit, title=f"max attention logit, step {step}", row_labels=labels)),
            self.key("attention/heads"): table,
        }, step)
        self.log_series(step)
        return True

    def add_series(self, step: int, series: dict[str, dict[str, float]]) -> None:
        """Keep the per-layer points of one emission (``family/name -> {layer: value}``)."""
        for name, by_layer in series.items():
            lines = self.series.setdefault(name, {})
            for layer, value in by_layer.items():
                points = lines.setdefault(layer, [])
                points.append((step, value))
                if len(points) > self.max_points:
                    del points[1::2]  # thin out evenly: the line keeps its shape and its first point

    def log_series(self, step: int) -> None:
        """One line-series chart per per-layer signal, with everything collected so far."""
        if not self.series:
            return
        import wandb

        charts = {}
        for name, lines in self.series.items():
            layers = sorted(lines)
            charts[self.key(f"{name}/by_layer")] = wandb.plot.line_series(
                xs=[[s for s, _ in lines[layer]] for layer in layers],
                ys=[[v for _, v in lines[layer]] for layer in layers],
                keys=layers, title=f"{name} per layer", xname="step",
            )
        self._log(charts, step)

    def _log(self, data: dict[str, Any], step: int) -> None:
        # Like Lightning's WandbLogger: the step travels as a metric (its define_metric makes it
        # the x-axis), so W&B's own step counter never sees a value out of order.
        self.run.log({**data, "trainer/global_step": step})

    def record(self, findings: Sequence[Finding], actions: Sequence[Action]) -> None:
        for f in findings:
            self.events.append([f.step, "finding", f.detector, f.severity, f.signal, f.value, f.threshold, f.message])
        for a in actions:
            self.events.append([a.step, "action", a.name, "", "", float("nan"), float("nan"), a.detail])
        if actions:
            self._log({self.key("actions/event"): 1.0}, actions[-1].step)

    def forensics(self, records: Sequence[Any]) -> None:
        """The forensic records, one row each, as the table ``stabmon-actions/forensics``."""
        import wandb

        self.forensic_rows += [[r.step, r.signal, r.verdict, r.rows[0].position if r.rows else None,
                                r.rows[0].rank if r.rows else None, r.rows[0].fingerprint if r.rows else None,
                                r.rows[0].loss if r.rows else None, r.rows[0].loss_share if r.rows else None,
                                r.rows[0].grad_share if r.rows else None, r.first_nonfinite_module or "", r.headline()]
                               for r in records]
        columns = ["step", "signal", "verdict", "top row", "rank", "fingerprint", "row loss", "loss share",
                   "gradient share", "first non-finite module", "summary"]
        self._log({self.key("actions/forensics"): wandb.Table(columns=columns, data=list(self.forensic_rows))},
                  records[-1].step)

    def log_events(self, step: int) -> None:
        if not self.events:
            return
        import wandb

        columns = ["step", "kind", "name", "severity", "signal", "value", "threshold", "message"]
        self._log({self.key("actions/events"): wandb.Table(columns=columns, data=list(self.events))}, step)
