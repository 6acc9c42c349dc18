"""The logged form of the monitor's keys: one dashboard section per signal family.

Inside stabmon a signal is named ``<family>/<name>[/<layer>]`` (``attention/max_logit/layer_00``).
Loggers receive ``<prefix>-<family>/<name>[/<layer>]`` (``stabmon-attention/max_logit/layer_00``):
W&B and TensorBoard group charts into sections by the part before the first ``/``, so each
family (attention, logits, gradients, params, update, sharpness, loss, findings, actions)
gets a section of its own instead of one crowded ``stabmon`` section.
"""

from __future__ import annotations

__all__ = ["FAMILIES", "logged_key", "logged_metrics", "split_layers"]

FAMILIES = ("attention", "logits", "gradients", "params", "update", "sharpness", "loss", "findings", "actions")


def logged_key(prefix: str, key: str) -> str:
    """``logged_key("stabmon", "attention/max_logit") == "stabmon-attention/max_logit"``."""
    return f"{prefix}-{key}" if prefix else key


def logged_metrics(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    """Every key of ``metrics`` in its logged form.

    Example:
        >>> logged_metrics("stabmon", {"loss/mean": 2.5, "gradients/norm/layer_0": 0.1})
        {'stabmon-loss/mean': 2.5, 'stabmon-gradients/norm/layer_0': 0.1}
    """
    return {logged_key(prefix, key): value for key, value in metrics.items()}


def split_layers(metrics: dict[str, float]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Separate per-layer keys (``family/name/layer``) from the rest.

    Returns ``(plain, series)`` where ``series`` maps ``family/name`` to ``{layer: value}``:
    the form a logger needs to draw one chart with a line per layer.

    Example:
        >>> split_layers({"loss/mean": 1.0, "params/norm/a": 2.0, "params/norm/b": 3.0})
        ({'loss/mean': 1.0}, {'params/norm': {'a': 2.0, 'b': 3.0}})
    """
    plain: dict[str, float] = {}
    series: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        parts = key.split("/", 2)
        if len(parts) == 3:
            series.setdefault(f"{parts[0]}/{parts[1]}", {})[parts[2]] = value
        else:
            plain[key] = value
    return plain, series
