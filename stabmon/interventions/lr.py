"""Learning-rate interventions applied around the optimizer step, so any scheduler keeps working.

``LRController`` computes the factor for each step (a scale-down held then recovered, a
re-warm, the lasting cuts); ``scale_lr_for_next_step`` multiplies every group's learning rate
(the one the user's scheduler set) by it just before the optimizer step and registers a
one-shot step post-hook that writes the original values back right after the step. A
tensor-valued ``lr`` is written in place with ``fill_``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from stabmon._validation import check_positive_float, check_positive_int

__all__ = ["LRController", "scale_lr_for_next_step"]


def _read_lr(group: dict[str, Any]) -> Any:
    lr = group["lr"]
    return lr.clone() if isinstance(lr, torch.Tensor) else lr


def _write_lr(group: dict[str, Any], value: Any) -> None:
    if isinstance(group["lr"], torch.Tensor):
        group["lr"].fill_(value)
    else:
        group["lr"] = value


def scale_lr_for_next_step(optimizer: torch.optim.Optimizer, factor: float) -> Callable[[], None]:
    """Multiply each group's LR by ``factor`` for the coming ``optimizer.step()`` only.

    Returns an idempotent ``restore()``: the step post-hook calls it, and the caller calls
    it again after the step in case no step ran (an AMP grad scaler skips steps with inf).

    Example:
        >>> w = torch.nn.Parameter(torch.ones(1)); opt = torch.optim.SGD([w], lr=0.1)
        >>> w.grad = torch.ones(1)
        >>> restore = scale_lr_for_next_step(opt, 0.5); opt.step(); restore()
        >>> round(w.item(), 6), opt.param_groups[0]["lr"]  # stepped with 0.05, lr back to 0.1
        (0.95, 0.1)
    """
    if factor == 1.0:
        return lambda: None
    saved = [_read_lr(g) for g in optimizer.param_groups]
    for g, lr in zip(optimizer.param_groups, saved):
        _write_lr(g, lr * factor)
    done = False

    def restore(*_: Any) -> None:
        nonlocal done
        if done:
            return
        done = True
        for g, lr in zip(optimizer.param_groups, saved):
            _write_lr(g, lr)
        handle.remove()

    handle = optimizer.register_step_post_hook(restore)
    return restore


class LRController:
    """The LR factor over time: a scale-down held then recovered linearly, times a re-warm
    ramp, times the lasting cuts.

    ``scale(step, factor, hold, recover)``: from ``step`` the LR is multiplied by ``factor``
    (compounding with a scale-down still in force, never below ``min_factor``), held for
    ``hold`` steps, then brought back linearly to 1 over ``recover`` steps.
    ``rewarm(step, start, steps)``: a linear warmup of the factor from ``start`` to 1.
    ``cut(step, factor)``: from ``step`` on, for the rest of the run, the LR is multiplied by
    ``factor`` (cuts compound; the total factor never goes below ``min_factor``).

    Example:
        >>> c = LRController()
        >>> c.scale(10, 0.5, hold=10, recover=10)
        >>> [round(c.factor(s), 2) for s in (9, 10, 19, 20, 25, 30)]
        [1.0, 0.5, 0.5, 0.5, 0.75, 1.0]
        >>> c.cut(40, 0.5); [c.factor(s) for s in (39, 40, 10_000)]
        [1.0, 0.5, 0.5]
    """

    def __init__(self, min_factor: float = 0.01) -> None:
        check_positive_float("min_factor", min_factor)
        self.min_factor = min_factor
        self._scale = (1.0, 0, 0, 0)  # factor, start, hold_end, recover_end
        self._rewarm = (1.0, 0, 0)  # start factor, start step, end step
        self._cuts: list[tuple[int, float]] = []  # (from step, factor) of the lasting cuts
        self.changed = False  # False until a scale-down, re-warm or cut: the factor is 1 on every step

    def scale(self, step: int, factor: float, hold: int, recover: int) -> None:
        check_positive_float("factor", factor)
        check_positive_int("recover", recover)
        current = self._scale_factor(step)
        new = max(self.min_factor, current * factor)
        self._scale = (new, step, step + hold, step + hold + recover)
        self.changed = True

    def rewarm(self, step: int, start: float, steps: int) -> None:
        check_positive_float("start", start)
        check_positive_int("steps", steps)
        self._rewarm = (start, step, step + steps)
        self.changed = True

    def cut(self, step: int, factor: float) -> None:
        check_positive_float("factor", factor)
        self._cuts.append((step, factor))
        self.changed = True

    def _cut_factor(self, step: int) -> float:
        out = 1.0
        for start, factor in self._cuts:
            if step >= start:
                out *= factor
        return out

    def _scale_factor(self, step: int) -> float:
        factor, start, hold_end, recover_end = self._scale
        if step < start or step >= recover_end:
            return 1.0
        if step < hold_end:
            return factor
        return factor + (1 - factor) * (step - hold_end) / (recover_end - hold_end)

    def _rewarm_factor(self, step: int) -> float:
        start_factor, start, end = self._rewarm
        if step < start or step >= end:
            return 1.0
        return start_factor + (1 - start_factor) * (step - start) / (end - start)

    def factor(self, step: int) -> float:
        return max(self.min_factor, self._scale_factor(step) * self._rewarm_factor(step) * self._cut_factor(step))

    def active(self, step: int) -> bool:
        """True while a transient rung (scale-down or re-warm) is in force; a lasting cut is not one."""
        return self._scale_factor(step) * self._rewarm_factor(step) != 1.0

    def state_dict(self) -> dict[str, Any]:
        return {"scale": list(self._scale), "rewarm": list(self._rewarm), "cuts": [list(c) for c in self._cuts]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._scale = tuple(state["scale"])
        self._rewarm = tuple(state["rewarm"])
        self._cuts = [(int(s), float(f)) for s, f in state.get("cuts", [])]
        self.changed = self._scale[0] != 1.0 or self._rewarm[0] != 1.0 or bool(self._cuts)
