"""Run summary: what the monitor saw over the whole run, as a short readable table."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["RunSummary"]

_UNSEEN = object()


class RunSummary:
    """Folds every emitted metrics dict into run-level extremes.

    Keys are the monitor's own keys without the log prefix (``attention/max_logit/layer_00``).

    Example:
        >>> s = RunSummary()
        >>> s.update(0, {"gradients/norm_max": 2.0, "gradients/norm_min": 1.0})
        >>> s.update(50, {"gradients/norm_max": 5.0, "gradients/norm_min": 0.5})
        >>> s.extremes["gradients/norm_max"], s.extremes["gradients/norm_min"]
        (5.0, 0.5)
    """

    # run-level reduction of each emitted key (matched on the key without its layer suffix)
    _REDUCE = {
        "attention/entropy_min": min,
        "attention/max_logit": max,
        "logits/logz_max": max,
        "logits/max_logit": max,
        "logits/min_logit": min,
        "gradients/norm_max": max,
        "gradients/norm_min": min,
        "update/ratio": max,
        "sharpness/top_eigenvalue": max,
        "sharpness/preconditioned": max,
        "sharpness/eos_ratio": max,
        "actions/qk_clip_min_gamma": min,
        "gradients/loss_scale": min,
    }
    _TOTAL = ("loss/nonfinite_steps", "gradients/nonfinite_steps", "logits/nonfinite", "actions/qk_clip_count",
              "gradients/overflow_steps")

    def __init__(self) -> None:
        self.extremes: dict[str, float] = {}
        self.latest: dict[str, float] = {}
        self.totals: dict[str, float] = {name: 0.0 for name in self._TOTAL}
        self.first_step: int | None = None
        self.last_step: int | None = None
        self.first_loss: float | None = None
        self._reducers: dict[str, Any] = {}  # key -> its run-level reduction (None: kept as latest only)

    def update(self, step: int, metrics: dict[str, float]) -> None:
        if self.first_step is None:
            self.first_step = step
        self.last_step = step
        self.latest.update(metrics)
        for key in self._TOTAL:
            if key in metrics:
                self.totals[key] += metrics[key]
        reducers = self._reducers
        for key, value in metrics.items():
            reduce = reducers.get(key, _UNSEEN)
            if reduce is _UNSEEN:
                base = key.rsplit("/", 1)[0] if key.count("/") >= 2 else key
                reduce = reducers[key] = self._REDUCE.get(key) or self._REDUCE.get(base)
            if reduce is not None and math.isfinite(value):
                self.extremes[key] = reduce(self.extremes.get(key, value), value)
        if self.first_loss is None and math.isfinite(metrics.get("loss/mean", math.nan)):
            self.first_loss = metrics["loss/mean"]

    def state_dict(self) -> dict[str, Any]:
        return {
            "extremes": dict(self.extremes),
            "latest": dict(self.latest),
            "totals": dict(self.totals),
            "first_step": self.first_step,
            "last_step": self.last_step,
            "first_loss": self.first_loss,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.extremes = dict(state["extremes"])
        self.latest = dict(state["latest"])
        self.totals = dict(state["totals"])
        self.first_step = state["first_step"]
        self.last_step = state["last_step"]
        self.first_loss = state["first_loss"]

    def format(self, attention_modules: dict[str, str] | None = None) -> str:
        """The end-of-fit table (plain text, about 10 lines for a 4-layer model)."""
        if self.first_step is None:
            return "stabmon: no step was monitored."
        attention_modules = attention_modules or {}
        lines = [f"stabmon summary, steps {self.first_step}-{self.last_step}"]
        layers = sorted({k.rsplit("/", 1)[1] for k in self.latest if k.startswith("attention/entropy_min/")})
        if layers:
            names = {
                layer: f"{layer} ({attention_modules[layer]})" if attention_modules.get(layer) else layer
                for layer in layers
            }
            width = max(len("attention layer"), *(len(n) for n in names.values()))
            lines.append(
                f"  {'attention layer':<{width}} {'entropy min':>11} {'entropy now':>11} {'max logit':>10} {'logit now':>10}"
            )
            for layer in layers:
                lines.append(
                    f"  {names[layer]:<{width}} {_fmt(self.extremes.get(f'attention/entropy_min/{layer}')):>11}"
                    f" {_fmt(self.latest.get(f'attention/entropy_mean/{layer}')):>11}"
                    f" {_fmt(self.extremes.get(f'attention/max_logit/{layer}')):>10}"
                    f" {_fmt(self.latest.get(f'attention/max_logit/{layer}')):>10}"
                )
            lines.append(
                "  (entropy in nats; 'entropy min': lowest head over the sampled steps, a head's entropy being"
                " its mean over query rows; 'now': mean over heads at the last sample)"
            )
        else:
            lines.append("  attention: no scaled_dot_product_attention call was seen")
        if "logits/logz_mean" in self.latest:
            lines.append(
                f"  output logits: log Z now {_fmt(self.latest['logits/logz_mean'])}"
                f" (max over run {_fmt(self.extremes.get('logits/logz_max'))}),"
                f" max logit {_fmt(self.extremes.get('logits/max_logit'))},"
                f" entropy now {_fmt(self.latest.get('logits/entropy_mean'))}"
            )
        else:
            lines.append("  output logits: no cross_entropy call was seen")
        if "gradients/norm_min" in self.extremes:
            lines.append(
                f"  gradient norm: {_fmt(self.extremes['gradients/norm_min'])} .. {_fmt(self.extremes['gradients/norm_max'])}"
                f", update/weight ratio max {_fmt(self.extremes.get('update/ratio'))}"
            )
        if "sharpness/top_eigenvalue" in self.latest:
            line = (
                f"  sharpness: top Hessian eigenvalue now {_fmt(self.latest['sharpness/top_eigenvalue'])}"
                f" (max {_fmt(self.extremes.get('sharpness/top_eigenvalue'))})"
            )
            if "sharpness/preconditioned" in self.latest:
                line += f", Adam-preconditioned now {_fmt(self.latest['sharpness/preconditioned'])}"
            if "sharpness/eos_ratio" in self.latest:
                line += (f", edge-of-stability ratio now {_fmt(self.latest['sharpness/eos_ratio'])}"
                         f" (max {_fmt(self.extremes.get('sharpness/eos_ratio'))}; 1 = the edge)")
            lines.append(line)
        if "loss/mean" in self.latest:
            lines.append(f"  loss: {_fmt(self.first_loss)} at the first sample -> {_fmt(self.latest['loss/mean'])} now")
        if self.totals.get("actions/qk_clip_count") or "actions/qk_clip_armed" in self.latest:
            lines.append(f"  qk-clip: {int(self.latest.get('actions/qk_clip_armed', 0))} layers armed, "
                         f"{int(self.totals['actions/qk_clip_count'])} head clips, smallest factor "
                         f"{_fmt(self.extremes.get('actions/qk_clip_min_gamma'))}")
        if "gradients/loss_scale" in self.latest:
            lines.append(f"  fp16 loss scale: now {_fmt(self.latest['gradients/loss_scale'])} (min "
                         f"{_fmt(self.extremes.get('gradients/loss_scale'))}); steps the GradScaler skipped on "
                         f"overflow {int(self.totals['gradients/overflow_steps'])}")
        lines.append(
            "  non-finite: "
            + ", ".join(f"{name.replace('/', ' ').replace('_', ' ')} {int(count)}" for name, count in self.totals.items()
                        if "nonfinite" in name)
        )
        return "\n".join(lines)


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
