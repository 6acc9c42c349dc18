"""The escalation policy: Findings in, Actions out, the same on every rank.

The ladder, in the default configuration:

* a **warning** (a spike below the critical z-score, attention-logit growth, entropy
  collapse, log Z drift, sharpness past the edge of stability) scales the LR down by
  ``lr_factor`` for ``lr_hold`` steps, then recovers it linearly over ``lr_recover`` steps; a
  gradient-norm spike alone (no other warning at that step) acts only when it is the
  ``gradient_warnings_to_act``-th within ``window`` steps (2: a lone one is reported, not acted on);
* a warning again after ``cooldown`` steps while the LR is still reduced escalates to a
  **re-warm**: the LR factor restarts from ``rewarm_start`` and ramps to 1 over
  ``rewarm_steps``; further warnings during the re-warm are recorded but not acted on;
* when the same signal fires again after the scale-down and the re-warm (its
  ``lr_cut_after``-th warning within ``lr_cut_window`` steps), a **lasting LR cut**
  multiplies the LR by ``lr_cut_factor`` for the rest of the run;
* a **critical** finding (non-finite loss or gradient, a spike above the critical z-score)
  **skips the step** (parameters and optimizer state untouched);
* ``rollback_after`` critical findings within ``window`` steps **roll back** to the last
  healthy snapshot, skip the next ``skip_batches`` batches and make a lasting LR cut by
  ``lr_cut_factor`` (``rollback_lr_cut``, on by default: that state blew up at this LR once);
* more than ``max_rollbacks`` rollbacks **stop** the run (with a checkpoint, in Lightning).

At most ``max_actions_per_window`` actions are taken in any ``window`` steps (past the cap a
step whose loss or gradient is NaN or inf is still skipped: letting it through would poison
the weights for good); after a
re-warm or a rollback the loss and gradient spike detectors stay quiet for
``grace_steps`` steps (the rise is expected and must not trigger a new alarm).

Attention-logit findings of a layer whose query and key weights were located go to
**QK-clip** first (``stabmon.interventions.qk_clip``, carried out by the monitor): it acts on
the cause, so those findings never reach the LR rungs.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

from stabmon.detectors.base import Finding
from stabmon.interventions.config import InterventionConfig

__all__ = ["Action", "Decision", "EscalationPolicy", "InterventionConfig"]


@dataclass(frozen=True)
class Action:
    """Something the monitor did: ``name`` is one of scale_lr, rewarm, lr_cut, skip_step, rollback,
    stop, qk_clip (a layer armed for QK-clip; its clips are counted in the metrics)."""

    step: int
    name: str
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Decision:
    """What to do at this step; the monitor carries it out."""

    actions: list[Action]
    skip_step: bool = False
    rollback: bool = False
    stop: bool = False
    scale_lr: float | None = None
    rewarm: bool = False
    lr_cut: float | None = None


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
        self._lr_rungs: dict[str, list[int]] = {}  # signal -> steps of its LR rungs (scale, re-warm) in the window
        self._gradient_warnings: list[int] = []  # steps of the gradient-norm-only warnings in the window

    def skipping(self, step: int) -> bool:
        """True while the batches after a rollback are being skipped."""
        return step < self._skip_until

    def rollback_due(self, step: int) -> bool:
        """True when one more critical finding at ``step`` would roll back."""
        cfg = self.config
        recent = sum(1 for s in self._critical_steps if s > step - cfg.window)
        return cfg.rollback and recent + 1 >= cfg.rollback_after

    def rollback_failed(self) -> None:
        """The rollback just decided could not be carried out: it does not count, and the
        batches after it are not skipped."""
        self.rollbacks = max(0, self.rollbacks - 1)
        self._skip_until = -1

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
        worst = max(findings, key=lambda f: (f.rank, f.value if f.value == f.value else 0))
        why = f"{worst.signal} = {worst.value:.4g} (threshold {worst.threshold:.4g})"
        if len(self._action_steps) >= cfg.max_actions_per_window:
            if cfg.skip_steps and any(f.severity == "critical" and not math.isfinite(f.value) for f in findings):
                # past the cap nothing escalates, but a step with NaN or inf is never let through
                decision.skip_step = True
                decision.actions.append(Action(step, "skip_step", f"{why}; past the action cap, a non-finite step "
                                                                  "is still skipped"))
            return decision
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
                if cfg.rollback_lr_cut:
                    decision.lr_cut = cfg.lr_cut_factor
                    decision.actions.append(Action(step, "lr_cut", f"LR x{cfg.lr_cut_factor:g} for the rest of the "
                                                   "run: the state rolled back to blew up at this LR once"))
                return self._record(step, decision)
            if cfg.skip_steps:
                decision.skip_step = True
                decision.actions.append(Action(step, "skip_step", why))
            if cfg.stop and not cfg.rollback and not cfg.skip_steps:
                decision.stop = True
                decision.actions.append(Action(step, "stop", why))
            return self._record(step, decision)
        warnings = [f for f in findings if f.severity == "warning"]
        if worst.severity == "warning" and all(_signal_family(f.signal) == "gradients/norm" for f in warnings):
            # A lone gradient-norm spike that the loss does not follow is common in healthy runs (README
            # "Past lr 0.1": two in 20 healthy runs); the LR rungs wait for the next one within the window.
            recent = [s for s in self._gradient_warnings if s > step - cfg.window]
            self._gradient_warnings = recent + [step]
            if len(self._gradient_warnings) < cfg.gradient_warnings_to_act:
                return decision
        if worst.severity == "warning" and step - self._last_warning_action >= cfg.cooldown:
            if step < self._rewarm_until:
                return decision  # a re-warm runs its course before anything else is tried
            self._last_warning_action = step
            signal = _signal_family(worst.signal)
            rungs = [s for s in self._lr_rungs.get(signal, []) if s > step - cfg.lr_cut_window]
            self._lr_rungs[signal] = rungs + [step]
            if len(rungs) + 1 >= cfg.lr_cut_after and len(rungs) >= 2:
                self._lr_rungs[signal] = []
                decision.lr_cut = cfg.lr_cut_factor
                decision.actions.append(Action(step, "lr_cut", f"LR x{cfg.lr_cut_factor:g} for the rest of the run: "
                                               f"{signal} fired again after a scale-down and a re-warm; {why}"))
            elif lr_reduced:
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
                "skip_until": self._skip_until, "rewarm_until": self._rewarm_until,
                "lr_rungs": {k: list(v) for k, v in self._lr_rungs.items()},
                "gradient_warnings": list(self._gradient_warnings)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._action_steps = deque(int(s) for s in state["action_steps"])
        self._critical_steps = deque(int(s) for s in state["critical_steps"])
        self._last_warning_action = int(state["last_warning_action"])
        self.rollbacks = int(state["rollbacks"])
        self._skip_until = int(state["skip_until"])
        self._rewarm_until = int(state["rewarm_until"])
        self._lr_rungs = {k: [int(s) for s in v] for k, v in state.get("lr_rungs", {}).items()}
        self._gradient_warnings = [int(s) for s in state.get("gradient_warnings", [])]


def _signal_family(signal: str) -> str:
    """``attention/max_logit/layer_02`` -> ``attention/max_logit``: the layers of a signal count together."""
    return "/".join(signal.split("/")[:2])
