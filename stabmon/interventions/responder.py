"""The responder: findings in, actions carried out, the same on every rank.

``Responder`` keeps the findings and actions logs and does what the escalation policy
decides: QK-clip (it gets the attention findings of layers it can clip first), the LR rungs
(scale-down, re-warm, lasting cut, applied around the optimizer step), skipping a step,
rolling back to a healthy snapshot (and taking those snapshots), stopping. Each kind of
action runs under its own fail-soft stage: an action that fails is switched off alone, and
measuring, detecting, logging and alerting go on.

Decisions are made from values that are the same on every rank (reduced signals, and the
fail-soft state once settled), and every action that must happen alike on every rank runs
as ``agreed`` work (see ``stabmon._failsoft``). ``respond`` returns what the pipeline needs
back (``Response``): whether the optimizer step is skipped, and until which step the spike
detectors stay quiet (the monitor's own intervention raises the loss on purpose).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stabmon._failsoft import FailSoft
from stabmon.detectors.base import Finding
from stabmon.distributed import is_rank_zero, local_tensor
from stabmon.forensics import Forensics, ForensicsConfig, SkipList
from stabmon.interventions.config import InterventionConfig
from stabmon.interventions.lr import LRController, scale_lr_for_next_step
from stabmon.interventions.policy import Action, Decision, EscalationPolicy
from stabmon.interventions.qk_clip import QKClipper
from stabmon.interventions.snapshot import Snapshotter
from stabmon.probes.amp import gradients_scaled
from stabmon.signals import AllReduce

__all__ = ["Responder", "Response"]

log = logging.getLogger("stabmon")


@dataclass
class Response:
    """What the pipeline needs back from ``Responder.respond``: skip this optimizer step, and keep
    the spike detectors quiet until ``quiet_until`` (None: no change)."""

    skip_step: bool = False
    quiet_until: int | None = None


_NOTHING = Response()  # the common answer: nothing found, nothing done (never modified)


class Responder:
    """Carries out the escalation ladder for one model.

    Args:
        model: the module acted on (snapshots, rollback, skipped gradients, QK-clip).
        config: the ladder's settings, or None for no intervention (findings are still kept).
        observe_only: keep the findings, never act.
        qk_clip: whether QK-clip may run (it needs the attention probe).
        guard: the monitor's fail-soft guard.
        all_reduce: cross-rank reduction for QK-clip's per-head maxima.
        layer_names: maps an attention call site to its reported layer name.

    Example:
        >>> responder = Responder(torch.nn.Linear(2, 1), InterventionConfig())
        >>> warn = Finding(10, "loss/last", "warning", 5.0, 4.0, "spike", "loss_spike")
        >>> responder.respond(10, [warn])
        Response(skip_step=False, quiet_until=None)
        >>> [a.name for a in responder.actions_taken], responder.lr_control.factor(10)
        (['scale_lr'], 0.5)
    """

    def __init__(self, model: torch.nn.Module, config: InterventionConfig | None, *, observe_only: bool = False,
                 qk_clip: bool = True, guard: FailSoft | None = None, all_reduce: AllReduce | None = None,
                 layer_names: Callable[[str], str] | None = None, forensics: ForensicsConfig | None = None,
                 skip_list: str | Path | None = None, run_dir: str | Path | None = None) -> None:
        self.model = model
        self.guard = guard or FailSoft()
        self.observe_only = observe_only
        self.policy = EscalationPolicy(config) if config is not None else None
        self.lr_control = LRController()
        fallback = Path(run_dir) / "stabmon-snapshots" if run_dir is not None else None
        self.snapshots = (Snapshotter(config.snapshot_dir, asynchronous=True, fallback_dir=fallback)
                          if config is not None else None)
        tau = config.qk_clip_tau if config is not None else None
        self.qk_clip = (QKClipper(model, tau, alpha=config.qk_clip_alpha, overrides=config.qk_clip_overrides,
                                  all_reduce=all_reduce, layer_names=layer_names, guard=self.guard.run)
                        if tau is not None and qk_clip and not observe_only else None)
        self.forensics = (Forensics(model, forensics, skip_list=SkipList(skip_list) if skip_list else None,
                                    run_dir=run_dir, all_reduce=all_reduce, pause_hooks=self._hooks_paused)
                          if forensics is not None or skip_list is not None else None)
        self.grad_scaler: Any = None
        self.optimizer: torch.optim.Optimizer | None = None  # the last one seen
        self.findings: list[Finding] = []
        self.actions_taken: list[Action] = []
        self.stop_reason: str | None = None
        self.step_skipped = False  # this step's decision (every rank's), whether or not the skip itself worked
        self._last_finding_step = -(10**9)
        self._restore_lr: Callable[[], None] | None = None  # puts back the LR scaled for this step
        self._interval_findings = {"warning": 0, "critical": 0}
        self._interval_actions = 0

    @property
    def acting(self) -> bool:
        return self.policy is not None and not self.observe_only

    @contextlib.contextmanager
    def _hooks_paused(self) -> Iterator[None]:
        """The forensics' own forwards are no training step: QK-clip's per-step hooks come off."""
        paused = self.qk_clip is not None and self.qk_clip.hooks_between_probes
        if paused:
            self.qk_clip.remove_hooks()
        try:
            yield
        finally:
            if paused:
                self.qk_clip.attach_hooks()

    # -- before the step's read ----------------------------------------------------------------
    def preflight(self, step: int) -> None:
        """Checks whose outcome must travel with the step's read: a rollback that this rank could
        not carry out (its snapshot files gone) switches rollback off on every rank before any
        rank decides on one. First, the snapshot copy in flight is waited for."""
        snapshots = self.snapshots
        if snapshots is not None and snapshots.busy:  # before anything moves the weights (a probe, a step)
            self.guard.run("snapshot", snapshots.wait, agreed=True)
        if snapshots is None or snapshots.directory is None or snapshots.step is None:
            return  # nothing on disk: a snapshot in memory is always there
        if (self.acting and "rollback" not in self.guard.disabled and self.policy.rollback_due(step)
                and not snapshots.restorable()):
            self.guard.fail("rollback", f"the snapshot of step {self.snapshots.step} can no longer be read from "
                                        f"{self.snapshots.directory}")

    # -- findings -> actions ---------------------------------------------------------------------
    def respond(self, step: int, findings: Sequence[Finding], *, optimizer: torch.optim.Optimizer | None = None,
                before_step: bool = True, site_of_layer: Mapping[str, str] | None = None, values: Any = None,
                layers: Callable[[], Sequence[tuple[str, float]]] = list) -> Response:
        """Keep ``findings`` and act on them as the policy decides. ``before_step``: the optimizer
        step is still to come (a skip can still be done; a spike can still be investigated, with the
        step's read ``values`` and ``layers()``, its per-layer gradient norms)."""
        if before_step:
            self.step_skipped = False
        if not findings and not (self.policy is not None and self.policy.skipping(step)):
            return _NOTHING  # the common case: nothing to record, nothing to decide
        response = Response()
        self._record(step, findings)
        if before_step and self.forensics is not None:
            triggers = self.forensics.triggers(findings)
            if triggers:
                self.guard.run("forensics", self._investigate, step, triggers, values, optimizer, layers, agreed=True)
        if not self.acting:
            return response
        culprit = bool(findings)  # skipped for its own findings, not as a precaution after a rollback
        findings = self._route_to_qk_clip(step, list(findings), site_of_layer or {})
        lr_reduced = bool(self.guard.run("lr control", self.lr_control.active, step, agreed=True))
        decision = self.guard.run("policy", self.policy.decide, step, findings, agreed=True,
                                  lr_reduced=lr_reduced, snapshot_available=self._can_roll_back())
        if decision is None:
            return response
        self._carry_out(step, decision, optimizer or self.optimizer, before_step, response, culprit)
        return response

    def _investigate(self, step: int, findings: Sequence[Finding], values: Any,
                     optimizer: torch.optim.Optimizer | None, layers: Callable[[], Sequence[tuple[str, float]]]) -> None:
        scale = getattr(values, "loss_scale", None)
        still_scaled = scale is not None and gradients_scaled(self.grad_scaler, optimizer or self.optimizer)
        record = self.forensics.investigate(step, findings, step_loss=getattr(values, "loss", None),
                                            step_grad_norm=getattr(values, "grad_norm", None),
                                            grad_scale=scale if still_scaled else 1.0, layers=layers())
        if is_rank_zero():
            log.warning("stabmon step %d: forensics: %s", step, record.headline())

    def skip_listed(self, step: int, optimizer: torch.optim.Optimizer | None) -> Response:
        """The batch holds a row of the skip list: its optimizer step is skipped (not in observe-only mode)."""
        if self.observe_only:
            return _NOTHING
        self.step_skipped = True
        if self._attempt("skip step", self.skip_optimizer_step, optimizer or self.optimizer):
            self.forensics.mark_listed(step)
            self._act(step, "skip_step", "the batch holds a row of the skip list")
        return Response(skip_step=True)

    def _record(self, step: int, findings: Sequence[Finding]) -> None:
        for f in findings:
            self.findings.append(f)
            self._interval_findings[f.severity] = self._interval_findings.get(f.severity, 0) + 1
            if f.severity != "info":  # an info finding (e.g. past the edge of stability) is no sign of ill health
                self._last_finding_step = step
            if is_rank_zero():
                log.log(logging.INFO if f.severity == "info" else logging.WARNING, "stabmon step %d: %s [%s]", step,
                        f.message, f.severity)

    def _route_to_qk_clip(self, step: int, findings: list[Finding], site_of_layer: Mapping[str, str]) -> list[Finding]:
        """Attention findings of a layer QK-clip can act on arm that layer (the cause); only the
        rest reach the LR rungs."""
        if self.qk_clip is None or "qk-clip" in self.guard.disabled:
            return findings
        routed = self.guard.run("qk-clip", self.qk_clip.route, findings, site_of_layer, step, agreed=True)
        if routed is None:
            return findings
        rest, details = routed
        for detail in details:
            self._act(step, "qk_clip", detail)
        return rest

    def _can_roll_back(self) -> bool:
        """The same on every rank: the snapshot stages as settled, and a snapshot taken."""
        disabled = self.guard.disabled
        return bool(self.snapshots and self.snapshots.available and "rollback" not in disabled
                    and "snapshot" not in disabled)

    def _carry_out(self, step: int, decision: Decision, optimizer: torch.optim.Optimizer | None, before_step: bool,
                   response: Response, culprit: bool = True) -> None:
        cfg = self.policy.config
        done = {action.name: action.detail for action in decision.actions}
        if decision.rollback and self.snapshots is not None:
            restored = self.guard.run("rollback", self.snapshots.restore, self.model, optimizer, agreed=True)
            if restored is None:
                self.policy.rollback_failed()
                skip_detail = f"the rollback failed; {done.pop('rollback')}"
                done["skip_step"] = skip_detail.replace(", skipping the next", ", would have skipped the next")
            else:
                response.quiet_until = step + cfg.grace_steps
                if is_rank_zero():
                    log.warning("stabmon step %d: rolled back to the snapshot of step %d", step, restored)
        if decision.scale_lr is not None and not self._attempt("lr control", self.lr_control.scale, step,
                                                                decision.scale_lr, cfg.lr_hold, cfg.lr_recover):
            done.pop("scale_lr", None)
        if decision.rewarm:
            if self._attempt("lr control", self.lr_control.rewarm, step, cfg.rewarm_start, cfg.rewarm_steps):
                response.quiet_until = max(response.quiet_until or -1, step + cfg.grace_steps)
            else:
                done.pop("rewarm", None)
        if decision.lr_cut is not None and not self._attempt("lr control", self.lr_control.cut, step, decision.lr_cut):
            done.pop("lr_cut", None)
        if decision.skip_step and before_step:
            response.skip_step = self.step_skipped = True
            if not self._attempt("skip step", self.skip_optimizer_step, optimizer):
                done.pop("skip_step", None)
        if self.forensics is not None and before_step and (decision.skip_step or decision.rollback):
            why = "; ".join(f"{name}: {detail}" for name, detail in done.items()) or "skipped"
            self.guard.run("forensics", self.forensics.note_skipped, step, why,
                           rolled_back_to=self.snapshots.step if "rollback" in done and self.snapshots else None,
                           culprit=culprit, agreed=True)
        if decision.stop:
            self.stop_reason = done.get("stop", "stop")
        for name, detail in done.items():
            self._act(step, name, detail)

    def _attempt(self, stage: str, fn: Callable[..., Any], *args: Any) -> bool:
        """Run an action every rank carries out alike; True when it was carried out."""
        return self.guard.attempt(stage, fn, *args, agreed=True)

    def skip_optimizer_step(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Make the coming optimizer step leave the parameters and the optimizer state alone."""
        if gradients_scaled(self.grad_scaler, optimizer):
            # The scaler has yet to unscale, and its step raises when it finds no gradient to
            # check: an inf in one gradient instead makes it skip the step itself (halving its
            # scale, as on any overflow).
            local = (local_tensor(p.grad) for p in self.model.parameters() if p.grad is not None)
            grad = next((g for g in local if g.numel() > 0), None)  # a shard of this rank's that holds elements
            if grad is not None:
                grad[(0,) * grad.dim()] = math.inf
                return
        for p in self.model.parameters():
            p.grad = None  # torch optimizers leave parameters and state alone without a grad

    def _act(self, step: int, name: str, detail: str | None) -> None:
        if detail is None:
            return
        self.actions_taken.append(Action(step, name, detail))
        self._interval_actions += 1
        if is_rank_zero():
            log.warning("stabmon step %d: action %s: %s", step, name, detail)

    def arm_above_tau(self, step: int, maxima: Mapping[str, tuple[float, torch.Tensor]]) -> None:
        """At a sample: arm (and clip now) every located layer whose max logit passed tau."""
        if self.qk_clip is None or not maxima:
            return
        for detail in self.guard.run("qk-clip", self.qk_clip.arm_above_tau, step, maxima, agreed=True) or []:
            self._act(step, "qk_clip", detail)

    # -- around the optimizer step ----------------------------------------------------------------
    def before_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer | None) -> None:
        """Multiply the LR the scheduler set by the factor in force, for this step only. (A snapshot
        copy in flight was waited for in ``preflight``, earlier in the same step.)"""
        if optimizer is not None:
            self.optimizer = optimizer
            if not self.observe_only and self.lr_control.changed:  # (no rung yet: the factor is 1)
                self._restore_lr = self.guard.run("lr control", lambda: scale_lr_for_next_step(
                    optimizer, self.lr_control.factor(step)), agreed=True)

    def after_optimizer_step(self) -> None:
        if self._restore_lr is not None:  # normally done by the step post-hook already
            restore, self._restore_lr = self._restore_lr, None
            self.guard.run("lr control", restore, agreed=True)
        if self.qk_clip is not None and self.qk_clip.armed:
            # A skipped (or rolled-back) step leaves the weights alone: so does QK-clip.
            self.guard.run("qk-clip", self.qk_clip.discard if self.step_skipped else self.qk_clip.apply, agreed=True)
        self.step_skipped = False

    def end_step(self, step: int) -> None:
        """Last thing in a step, after the detectors and QK-clip saw it: a snapshot if it is due
        and the run has been healthy."""
        if not self.acting or self.snapshots is None:
            return
        cfg = self.policy.config
        healthy = step - self._last_finding_step > cfg.cooldown and not self.policy.skipping(step)
        if cfg.rollback and healthy and step % cfg.snapshot_every_n_steps == 0:
            self.guard.run("snapshot", self.snapshots.take, step, self.model, self.optimizer, agreed=True)
            for note in self.snapshots.notes:
                self.guard.warn_once(note, note)

    # -- emission -------------------------------------------------------------------------------------
    def metrics(self, step: int | None) -> dict[str, float]:
        """The interval's finding and action counts and the LR factor in force: host values, the
        same on every rank (no reduction needed)."""
        factor = None
        if step is not None and self.lr_control.changed:
            factor = self.guard.run("lr control", self.lr_control.factor, step, agreed=True)
        out = {
            "actions/lr_factor": 1.0 if factor is None else factor,  # none in force when LR control is off
            "actions/count": float(self._interval_actions),
            "findings/warning": float(self._interval_findings.get("warning", 0)),
            "findings/critical": float(self._interval_findings.get("critical", 0)),
        }
        self._interval_actions = 0
        self._interval_findings = {"warning": 0, "critical": 0}
        return out

    # -- checkpointing -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            **({"forensics": self.forensics.state_dict()} if self.forensics is not None else {}),
            "policy": self.policy.state_dict() if self.policy is not None else None,
            "lr_control": self.lr_control.state_dict(),
            "qk_clip": self.qk_clip.state_dict() if self.qk_clip is not None else None,
            "last_finding_step": self._last_finding_step,
            "findings": [f.to_dict() for f in self.findings[-1000:]],
            "actions": [a.to_dict() for a in self.actions_taken[-1000:]],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.forensics is not None and state.get("forensics"):
            self.forensics.load_state_dict(state["forensics"])
        if self.policy is not None and state.get("policy") is not None:
            self.policy.load_state_dict(state["policy"])
        self.lr_control.load_state_dict(state["lr_control"])
        if self.qk_clip is not None and state.get("qk_clip") is not None:
            self.qk_clip.load_state_dict(state["qk_clip"])
        self._last_finding_step = int(state["last_finding_step"])
        self.findings = [Finding(**f) for f in state["findings"]]
        self.actions_taken = [Action(**a) for a in state["actions"]]
