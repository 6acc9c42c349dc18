"""The loss scaler of float16 mixed precision (``torch.amp.GradScaler``), read without a host sync.

Under fp16 AMP the backward runs on ``loss * scale``: the gradients are scaled until the
scaler unscales them, and a step whose scaled gradients overflow (inf or NaN) is skipped by
the scaler itself, which then halves its scale. Such an overflow is routine (the scale starts
high on purpose and probes upwards every ``growth_interval`` steps), not a sign of
divergence; the monitor counts it (``gradients/overflow_steps``) and reports the scale
(``gradients/loss_scale``). A scale that keeps falling is the sign: DeepSpeed and Megatron
stop a run whose scale reaches their ``min_loss_scale`` (1 by default), and so does the
monitor's detector (``DetectionConfig.min_loss_scale``).

Only public behaviour of the scaler is relied on, except two reads kept behind fallbacks:
the scale tensor itself (``get_scale()`` would read it to the host, a sync on a GPU) and the
per-optimizer stage that says whether ``unscale_`` has already run this step.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["gradients_scaled", "loss_scale", "scaler_enabled"]


def scaler_enabled(scaler: Any) -> bool:
    """True for a GradScaler (or a look-alike) that scales this run's losses.

    Example:
        >>> scaler_enabled(torch.amp.GradScaler("cpu")), scaler_enabled(None)
        (True, False)
    """
    if scaler is None or not hasattr(scaler, "get_scale"):
        return False
    is_enabled = getattr(scaler, "is_enabled", None)
    return bool(is_enabled()) if callable(is_enabled) else True


def loss_scale(scaler: Any) -> torch.Tensor | None:
    """The scaler's current scale as a float32 tensor of shape ``(1,)`` on its device (no host
    read), or None when no scaler is enabled. A copy: the scaler's ``update()`` changes its own
    tensor in place.

    Example:
        >>> scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        >>> _ = scaler.scale(torch.ones(()))
        >>> loss_scale(scaler)
        tensor([1024.])
    """
    if not scaler_enabled(scaler):
        return None
    scale = getattr(scaler, "_scale", None)  # the tensor behind get_scale(), updated in place
    if isinstance(scale, torch.Tensor):
        return scale.detach().reshape(1).to(torch.float32, copy=True)
    try:
        value = float(scaler.get_scale())
    except Exception:  # noqa: BLE001 - an unknown scaler: no scale, never a failure
        return None
    return torch.tensor([value]) if value > 0 else None


def gradients_scaled(scaler: Any, optimizer: torch.optim.Optimizer | None) -> bool:
    """True while the gradients of ``optimizer``'s parameters still carry the loss scale: the
    scaler is enabled and ``unscale_`` has not run for this optimizer since the last
    ``update()`` (``optimizer`` None: for any of its optimizers). Without a way to tell (an
    unknown scaler), True.

    Example:
        >>> model = torch.nn.Linear(2, 1); opt = torch.optim.SGD(model.parameters(), 0.1)
        >>> scaler = torch.amp.GradScaler("cpu")
        >>> scaler.scale(model(torch.ones(1, 2)).sum()).backward()
        >>> before = gradients_scaled(scaler, opt); scaler.unscale_(opt)
        >>> before, gradients_scaled(scaler, opt)
        (True, False)
    """
    if not scaler_enabled(scaler):
        return False
    states = getattr(scaler, "_per_optimizer_states", None)
    if not isinstance(states, dict):
        return True
    chosen = [states.get(id(optimizer))] if optimizer is not None else list(states.values())
    stages = [getattr(state.get("stage"), "name", None) for state in chosen if isinstance(state, dict)]
    return not stages or any(stage != "UNSCALED" for stage in stages)
