"""The escalation policy: Findings in, Actions out, the same on every rank.

The ladder, in the default configuration:

* a **warning** (a spike below the critical z-score, attention-logit growth, entropy
  collapse, log Z drift, sharpness past the edge of stability) scales the LR down by
  ``lr_factor`` for ``lr_hold`` steps, then recovers it linearly over ``lr_recover`` steps;
* a warning again after ``cooldown`` steps while the LR is still reduced escalates to a
  **re-warm**: the LR factor restarts from ``rewarm_start`` and ramps to 1 over
  ``rewarm_steps``; further warnings during the re-warm are recorded but not acted on;
* a **critical** finding (non-finite loss or gradient, a spike above the critical z-score)
  **skips the step** (parameters and optimizer state untouched);
* ``rollback_after`` critical findings within ``window`` steps **roll back** to the last
  healthy snapshot and skip the next ``skip_batches`` batches;
* more than ``max_rollbacks`` rollbacks **stop** the run (with a checkpoint, in Lightning).

At most ``max_actions_per_window`` actions are taken in any ``window`` steps; after a
re-warm or a rollback the loss and gradient spike detectors stay quiet for
``grace_steps`` steps (the rise is expected and must not trigger a new alarm).
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from stabmon._validation import check_bool, check_positive_float, check_positive_int
from stabmon.detectors.base import Finding

__all__ = ["Action", "Decision", "EscalationPolicy", "InterventionConfig"]


@dataclass(frozen=True)
class Action:
    """Something the monitor did: ``name`` is one of scale_lr, rewarm, skip_step, rollback, stop."""

    step: int
    name: str
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class InterventionConfig:
    """The escalation ladder's settings (see the module docstring for how they combine).

    Args:
        lr_factor: LR multiplier of a scale-down. Default 0.5.
        lr_hold: steps the reduced LR is held. Default 100.
        lr_recover: steps over which it recovers linearly. Default 100.
        rewarm_start: LR fraction a re-warm starts from. Default 0.1.
        rewarm_steps: length of the re-warm ramp. Default 200.
        skip_steps: skip the optimizer step on a critical finding. Default True.
        rollback: keep healthy snapshots and roll back on repeated critical findings. Default True.
        snapshot_every_n_steps: steps between snapshots (taken only when the last
            ``cooldown`` steps had no finding). Default 100.
        snapshot_dir: where snapshots go; None keeps them in CPU memory. Default None.
        rollback_after: critical findings within ``window`` steps that trigger a rollback. Default 2.
        skip_batches: batches skipped after a rollback. Default 20.
        max_rollbacks: rollbacks allowed before the run is stopped. Default 3.
        stop: allow stopping the run. Default True.
        cooldown: steps after an action before a finding of the same severity acts again. Default 20.
        window: steps of the action cap and of the rollback count. Default 100.
        max_actions_per_window: most actions in any ``window`` steps. Default 10.
        grace_steps: steps the spike detectors stay quiet after a re-warm or rollback. Default 50.
    """

    lr_factor: float = 0.5
    lr_hold: int = 100
    lr_recover: int = 100
    rewarm_start: float = 0.1
    rewarm_steps: int = 200
    skip_steps: bool = True
    rollback: bool = True
    snapshot_every_n_steps: int = 100
    snapshot_dir: str | None = None
    rollback_after: int = 2
    skip_batches: int = 20
    max_rollbacks: int = 3
    stop: bool = True
    cooldown: int = 20
    window: int = 100
    max_actions_per_window: int = 10
    grace_steps: int = 50

    def __post_init__(self) -> None:
        if not 0 < self.lr_factor < 1:
            raise ValueError(f"`lr_factor` must be in (0, 1), got {self.lr_factor!r}")
        if not 0 < self.rewarm_start <= 1:
            raise ValueError(f"`rewarm_start` must be in (0, 1], got {self.rewarm_start!r}")
        for name in ("lr_recover", "rewarm_steps", "snapshot_every_n_steps", "rollback_after", "window",
                     "max_actions_per_window"):
            check_positive_int(name, getattr(self, name))
        for name in ("lr_hold", "skip_batches", "max_rollbacks", "cooldown", "grace_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"`{name}` must be a non-negative int, got {value!r}")
        for name in ("skip_steps", "rollback", "stop"):
            check_bool(name, getattr(self, name))
        if self.snapshot_dir is not None and not isinstance(self.snapshot_dir, (str, Path)):
            raise ValueError(f"`snapshot_dir` must be a path or None, got {self.snapshot_dir!r}")
        check_positive_float("lr_factor", self.lr_factor)


@dataclass
class Decision:
    """What to do at this step; the monitor carries it out."""

    actions: list[Action]
    skip_step: bool = False
    rollback: bool = False
    stop: bool = False
    scale_lr: float | None = None
    rewarm: bool = False


class EscalationPolicy:
    """Turns findings into actions with cool-downs, a cap, and escalation.

    Example:
        >>> policy = EscalationPolicy(InterventionConfig())
        >>> warn = Finding(10, "loss/last", "warning", 5.0, 4.0, "spike", "loss_spike")
        >>> policy.decide(10, [warn], lr_reduced=False, snapshot_available=True).actions[0].name
        'scale_lr'
        >>> policy.decide(12, [warn], lr_reduced=True, snapshot_available=True).actions  # cooling down
        []
        >>> policy.decide(40, [warn], lr_reduced=True, snapshot_available=True).actions[0].name
        'rewarm'
    """

    def __init__(self, config: InterventionConfig) -> None:
        self.config = config
        self._action_steps: deque[int] = deque()
        self._critical_steps: deque[int] = deque()
        self._last_warning_action = -(10**9)
        self.rollbacks = 0
        self._skip_until = -1
        self._rewarm_until = -1

    def skipping(self, step: int) -> bool:
        """True while the batches after a rollback are being skipped."""
        return step < self._skip_until

    def decide(self, step: int, findings: list[Finding], *, lr_reduced: bool, snapshot_available: bool) -> Decision:
        cfg = self.config
        decision = Decision(actions=[])
        if self.skipping(step):
            decision.skip_step = True
        if not findings:
            return decision
        while self._action_steps and self._action_steps[0] <= step - cfg.window:
            self._action_steps.popleft()
        while self._critical_steps and self._critical_steps[0] <= step - cfg.window:
            self._critical_steps.popleft()
        if len(self._action_steps) >= cfg.max_actions_per_window:
            return decision
        worst = max(findings, key=lambda f: (f.rank, f.value if f.value == f.value else 0))
        why = f"{worst.signal} = {worst.value:.4g} (threshold {worst.threshold:.4g})"
        if worst.severity == "critical":
            self._critical_steps.append(step)
            if cfg.rollback and len(self._critical_steps) >= cfg.rollback_after and snapshot_available:
                if self.rollbacks >= cfg.max_rollbacks:
                    if cfg.stop:
                        decision.stop = True
                        decision.actions.append(Action(step, "stop", f"{self.rollbacks} rollbacks did not help; {why}"))
                    return self._record(step, decision)
                self.rollbacks += 1
                self._critical_steps.clear()
                self._skip_until = step + 1 + cfg.skip_batches
                decision.rollback = decision.skip_step = True
                decision.actions.append(Action(step, "rollback",
                                               f"rollback {self.rollbacks}/{cfg.max_rollbacks}, skipping the next "
                                               f"{cfg.skip_batches} batches; {why}"))
                return self._record(step, decision)
            if cfg.skip_steps:
                decision.skip_step = True
                decision.actions.append(Action(step, "skip_step", why))
            if cfg.stop and not cfg.rollback and not cfg.skip_steps:
                decision.stop = True
                decision.actions.append(Action(step, "stop", why))
            return self._record(step, decision)
        if worst.severity == "warning" and step - self._last_warning_action >= cfg.cooldown:
            if step < self._rewarm_until:
                return decision  # a re-warm is the last rung for warnings: let it run its course
            self._last_warning_action = step
            if lr_reduced:
                self._rewarm_until = step + cfg.rewarm_steps
                decision.rewarm = True
                decision.actions.append(Action(step, "rewarm", f"LR re-warm from {cfg.rewarm_start:g} of the LR over "
                                               f"{cfg.rewarm_steps} steps; the scale-down did not help; {why}"))
            else:
                decision.scale_lr = cfg.lr_factor
                decision.actions.append(Action(step, "scale_lr", f"LR x{cfg.lr_factor:g} for {cfg.lr_hold} steps, "
                                               f"recovering over {cfg.lr_recover}; {why}"))
            return self._record(step, decision)
        return decision

    def _record(self, step: int, decision: Decision) -> Decision:
        if decision.actions:
            self._action_steps.append(step)
        return decision

    def state_dict(self) -> dict[str, Any]:
        return {"action_steps": list(self._action_steps), "critical_steps": list(self._critical_steps),
                "last_warning_action": self._last_warning_action, "rollbacks": self.rollbacks,
                "skip_until": self._skip_until, "rewarm_until": self._rewarm_until}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._action_steps = deque(int(s) for s in state["action_steps"])
        self._critical_steps = deque(int(s) for s in state["critical_steps"])
        self._last_warning_action = int(state["last_warning_action"])
        self.rollbacks = int(state["rollbacks"])
        self._skip_until = int(state["skip_until"])
        self._rewarm_until = int(state["rewarm_until"])
