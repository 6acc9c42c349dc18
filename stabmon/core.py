"""The monitor without Lightning: probes -> signals -> summary, driven step by step.

``MonitorCore`` is what ``StabilityMonitor`` drives from Lightning's hooks. It works the
same from a hand-written loop::

    core = MonitorCore(model, sample_every_n_steps=50, log_every_n_steps=10)
    for step, (x, y) in enumerate(loader):
        core.start_step(step)                 # installs the capture on sampled steps
        loss = F.cross_entropy(model(x), y)
        core.end_forward()
        core.observe_loss(loss)
        loss.backward()
        core.before_optimizer_step(optimizer=opt)
        opt.step(); opt.zero_grad()
        core.after_optimizer_step()
        metrics = core.end_step()             # dict on emission steps, else None
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch

from stabmon._failsoft import FailSoft
from stabmon._validation import check_bool, check_optional_instance, check_positive_float, check_positive_int
from stabmon.detectors import DetectionConfig, Finding
from stabmon.distributed import local_tensor
from stabmon.interventions import Action, EscalationPolicy, InterventionConfig, LRController, QKClipper, Snapshotter
from stabmon.interventions.lr import scale_lr_for_next_step
from stabmon.probes.amp import gradients_scaled, loss_scale
from stabmon.probes.attention import AttentionProbe
from stabmon.curvature.hessian_vector import _isolated_rng
from stabmon.probes.capture import ForwardCapture
from stabmon.probes.compiled import canonical_name, eager_view, is_compiled
from stabmon.probes.gradients import GradientProbe
from stabmon.probes.logits import LogitProbe
from stabmon.probes.series import StepSeries
from stabmon.probes.sharpness import SharpnessConfig, SharpnessProbe, _buffers_preserved
from stabmon.report import RunSummary
from stabmon.signals import AllReduce, SignalSet, active_all_reduce, torch_distributed_all_reduce, world_size

__all__ = ["MonitorCore", "check_clip_grad_norm"]

log = logging.getLogger("stabmon")


def check_clip_grad_norm(clip_grad_norm: float | None, gradients: bool) -> None:
    """Raise ``ValueError`` unless ``clip_grad_norm`` is None or a positive number with the
    gradient probe on (the clip uses the norms it reads)."""
    if clip_grad_norm is None:
        return
    check_positive_float("clip_grad_norm", clip_grad_norm)
    if not gradients:
        raise ValueError("`clip_grad_norm` clips from the gradient norms the monitor reads: it needs `gradients=True`")


class MonitorCore:
    """Drives the probes for one model and turns them into named scalar signals.

    Args:
        model: the module whose forward, gradients and parameters are watched.
        sample_every_n_steps: steps between sampled forwards (attention and logit probes,
            update-to-weight ratio). Step 0 is sampled, and so are the powers of two below
            the first period (1, 2, 4, ...), to catch an early blow-up. Default 50.
        log_every_n_steps: steps between emissions of the per-step statistics (loss and
            gradient norms, summarised over the interval). Sampled steps always emit.
            Default 50.
        attention: capture ``scaled_dot_product_attention`` calls. Default True.
        logits: capture the logits given to ``cross_entropy``. Default True.
        gradients: gradient, parameter and update norms. Default True.
        per_layer: per-layer gradient, parameter and update norms. Default True.
        sharpness: configuration of the sharpness probe, or None (default) for none. The
            estimate runs in ``before_optimizer_step`` when a ``loss_fn`` is given there.
        detection: thresholds of the detectors, or None for no detection. Default
            ``DetectionConfig()``.
        intervention: the escalation ladder, or None for no intervention. Default
            ``InterventionConfig()``. Actions need the optimizer in ``before_optimizer_step``.
        observe_only: detect and report, but never act. Default False.
        strict: re-raise errors inside the monitor instead of disabling the failing part.
            Default False (the test suite turns it on).
        all_reduce: cross-rank reduction of signals; default: torch.distributed when a
            process group is initialised, else none.
        compiled_probe_rows: on a ``torch.compile``-d model, the rows of the current batch the
            eager probe forward (``run_probe``) sees. Default 4.
        clip_grad_norm: clip the gradients to this global L2 norm in ``before_optimizer_step``,
            as ``torch.nn.utils.clip_grad_norm_`` does (bit-identical for float32 gradients),
            from the norms the monitor has just read: one pass over the gradients per step
            for the statistics and the clip, where a trainer's own clipping would read them
            all again. Use it instead of the trainer's clipping. Default None (no clipping).
        grad_scaler: the ``torch.amp.GradScaler`` of fp16 mixed precision, if any (the
            Lightning and Hugging Face adapters find theirs). Gradients that still carry the
            loss scale are read unscaled; a step whose scaled gradients overflow is the
            scaler's to skip, counted in ``gradients/overflow_steps`` and not a finding; the
            scale is logged as ``gradients/loss_scale`` and watched by
            ``DetectionConfig.min_loss_scale``. Default None.

    Example:
        >>> model = torch.nn.Linear(4, 3)
        >>> core = MonitorCore(model, sample_every_n_steps=1, log_every_n_steps=1)
        >>> core.start_step(0)
        True
        >>> loss = torch.nn.functional.cross_entropy(model(torch.ones(2, 4)), torch.tensor([0, 1]))
        >>> core.end_forward(); core.observe_loss(loss); loss.backward()
        >>> core.before_optimizer_step(); core.after_optimizer_step()
        >>> metrics = core.end_step()
        >>> "gradients/norm/bias" in metrics, metrics["findings/critical"], core.actions_taken
        (True, 0.0, [])
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        sample_every_n_steps: int = 50,
        log_every_n_steps: int = 50,
        attention: bool = True,
        logits: bool = True,
        gradients: bool = True,
        per_layer: bool = True,
        sharpness: SharpnessConfig | None = None,
        detection: DetectionConfig | None = DetectionConfig(),
        intervention: InterventionConfig | None = InterventionConfig(),
        observe_only: bool = False,
        strict: bool = False,
        all_reduce: AllReduce | None = torch_distributed_all_reduce,
        compiled_probe_rows: int = 4,
        clip_grad_norm: float | None = None,
        grad_scaler: Any = None,
    ) -> None:
        check_positive_int("sample_every_n_steps", sample_every_n_steps)
        check_clip_grad_norm(clip_grad_norm, gradients)
        self.clip_grad_norm = float(clip_grad_norm) if clip_grad_norm is not None else None
        check_positive_int("log_every_n_steps", log_every_n_steps)
        check_positive_int("compiled_probe_rows", compiled_probe_rows)
        self.compiled_probe_rows = compiled_probe_rows
        for name, value in (("attention", attention), ("logits", logits), ("gradients", gradients),
                            ("per_layer", per_layer), ("strict", strict), ("observe_only", observe_only)):
            check_bool(name, value)
        self.model = model
        self.sample_every_n_steps = sample_every_n_steps
        self.log_every_n_steps = log_every_n_steps
        self.per_layer = per_layer
        self.guard = FailSoft(strict=strict)
        self._all_reduce = all_reduce

        self.attention = AttentionProbe() if attention else None
        self.logits = LogitProbe() if logits else None
        self._gradients_wanted = gradients
        self.gradients = self._gradient_probe() if gradients else None
        self.loss = StepSeries({"mean": "loss/mean", "last": "loss/last", "max": "loss/max",
                                "nonfinite_steps": "loss/nonfinite_steps"})
        self.grad_norm = StepSeries({"max": "gradients/norm_max", "min": "gradients/norm_min",
                                     "mean": "gradients/norm_mean", "nonfinite_steps": "gradients/nonfinite_steps"})
        check_optional_instance("sharpness", sharpness, SharpnessConfig)
        check_optional_instance("detection", detection, DetectionConfig)
        check_optional_instance("intervention", intervention, InterventionConfig)
        self.sharpness = SharpnessProbe(sharpness) if sharpness is not None else None
        self._sharpness_values: dict[str, float] = {}
        self.observe_only = observe_only
        self.detectors = detection.build() if detection is not None else None
        self.policy = EscalationPolicy(intervention) if intervention is not None else None
        self.lr_control = LRController()
        self.snapshots = Snapshotter(intervention.snapshot_dir) if intervention is not None else None
        self.findings: list[Finding] = []
        self.actions_taken: list[Action] = []
        self.stop_reason: str | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._step_losses: list[torch.Tensor] = []  # the micro-batches' losses of the current step
        self._step_skipped = False
        self._step_grad_norm: float | torch.Tensor | None = None  # the whole model's, this step (None: not read)
        self._clipped_from: torch.Tensor | None = None  # the pre-clip norm of this step's clip (None: no clip)
        self._compiled: bool | None = None  # found out at the first step (the model may be compiled late)
        self._last_finding_step = -(10**9)
        self._restore_lr = lambda: None
        self._interval_findings = {"warning": 0, "critical": 0}
        self._interval_actions = 0
        # QK-clip: needs the attention probe (its per-layer max logit arms a layer) and may act.
        tau = intervention.qk_clip_tau if intervention is not None else None
        self.qk_clip = (
            QKClipper(model, tau, alpha=intervention.qk_clip_alpha, overrides=intervention.qk_clip_overrides,
                      all_reduce=all_reduce, layer_names=self._layer_of_site)
            if tau is not None and self.attention is not None and not observe_only else None
        )
        self.capture = ForwardCapture(
            on_attention=self._on_attention if self.attention else None,
            on_logits=self.logits.observe if self.logits else None,
            guard=self.guard.run,
        )
        self.grad_scaler = grad_scaler
        self._loss_scale: float | torch.Tensor | None = None  # the scaler's scale at the last step read
        self._interval_overflows = 0  # steps of this interval whose scaled gradients overflowed
        self.summary = RunSummary()
        self.attention_modules: dict[str, str] = {}
        self.step: int | None = None
        self.sampled = False
        self._last_started: int | None = None
        self._checked_missing = False
        self.last_head_maps: dict[str, dict[str, torch.Tensor]] = {}

    def _gradient_probe(self) -> GradientProbe:
        named = ((canonical_name(n), p) for n, p in self.model.named_parameters())
        return GradientProbe(named, world=world_size())

    def _refresh_parameters(self) -> bool:
        """Parameters made or replaced after the monitor (``configure_model``, ``fully_shard``):
        follow them. One identity check; True when the probe was rebuilt."""
        first = next((p for p in self.model.parameters() if p.requires_grad), None)
        current = self.gradients.params[0] if self.gradients.params else None
        if first is current:
            return False
        self.gradients = self._gradient_probe()
        return True

    def _observe_gradients(self, optimizer: torch.optim.Optimizer | None,
                           scale: torch.Tensor | None) -> torch.Tensor | None:
        """The gradient probe's per-parameter norms (of the unscaled gradients under fp16 AMP:
        ``scale`` is the step's loss scale, divided out while ``optimizer``'s gradients carry it).
        The parameters are checked against the model on sampled steps (step 0 is one) and
        whenever none of the known ones has a gradient (they were replaced): the model's
        parameter walk stays off ordinary steps."""
        if self.sampled:
            self._refresh_parameters()
        if scale is not None and not gradients_scaled(self.grad_scaler, optimizer):
            scale = None
        norms = self.gradients.observe(scale) if not self.gradients.empty else None
        if norms is None and not self.sampled and self._refresh_parameters() and not self.gradients.empty:
            norms = self.gradients.observe(scale)
        return norms

    # -- torch.compile ---------------------------------------------------------------------
    @property
    def compiled(self) -> bool:
        """True when the model (or a part of it) runs compiled: the probes then run on an eager
        forward of the original modules (``run_probe``) and never touch the compiled one."""
        if self._compiled is None:
            self._compiled = is_compiled(self.model)
            if self._compiled and self.qk_clip is not None:
                self.qk_clip.hooks_between_probes = False
                self.qk_clip.remove_hooks()
        return self._compiled

    def probe_due(self, step: int | None = None) -> bool:
        """On a compiled model: True when this step needs the eager probe forward (a sampled step,
        or any step while a QK-clip layer is armed)."""
        step = self.step if step is None else step
        if not self.compiled or step is None:
            return False
        return self.is_sampled(step) or bool(self.qk_clip is not None and self.qk_clip.armed)

    def run_probe(self, forward: Callable[[], Any]) -> None:
        """Run ``forward`` (the model and its loss on a few rows of the batch) eagerly under the probes.

        For compiled models, on the steps ``probe_due`` names, before the training forward. The
        original modules stand in for the compiled ones (``stabmon.probes.compiled.eager_view``):
        no graph is compiled or invalidated. It runs without gradients (with them only while an
        attention layer still has to be located for QK-clip), under a forked RNG, and puts
        BatchNorm statistics back, so the run itself is not changed.
        """
        sampled = self.is_sampled(self.step) if self.step is not None else False
        locate = sampled and self.qk_clip is not None
        devices = [p.device for p in self.model.parameters()][:1]
        with eager_view(self.model), _buffers_preserved(self.model), _isolated_rng(devices, 0), \
                torch.set_grad_enabled(locate):
            if self.qk_clip is not None:
                self.qk_clip.attach_hooks()
            try:
                if sampled and (self.attention or self.logits):
                    self.guard.run("capture", self.capture.attach, self.model)
                self.guard.run("probe forward", forward)
            finally:
                self.end_forward()
                if self.qk_clip is not None:
                    self.qk_clip.remove_hooks()

    # -- per-step protocol ----------------------------------------------------------------
    def is_sampled(self, step: int) -> bool:
        """Every ``sample_every_n_steps``-th step, and the powers of two before the first of them:
        attention logits can run away within the first tens of steps at a too-high LR (the
        example GPT at lr 0.03 passes 80 at step 15), so the first period is sampled at steps
        1, 2, 4, 8, ... as well (``log2(sample_every_n_steps)`` extra samples in a run)."""
        n = self.sample_every_n_steps
        return step % n == 0 or (step < n and step & (step - 1) == 0)

    def start_step(self, step: int | None = None) -> bool:
        """Begin a step (or another micro-batch of it). Returns True when it is sampled."""
        step = (self._last_started + 1 if self._last_started is not None else 0) if step is None else step
        first_micro_batch = step != self._last_started
        self._last_started = step
        self.step = step
        if not first_micro_batch:
            return self.sampled
        self.sampled = self.is_sampled(step)
        if self.sampled and (self.attention or self.logits) and not self.compiled:
            self.guard.run("capture", self.capture.attach, self.model)
        return self.sampled

    def end_forward(self) -> None:
        """Leave the capture (before backward, so recomputed forwards are not counted twice);
        locate the query and key weights of attention layers seen for the first time."""
        if self.capture.attached:
            self.guard.run("capture", self.capture.detach)
            if self.qk_clip is not None:
                for message in self.guard.run("qk-clip", self.qk_clip.locate_pending) or []:
                    self.guard.warn_once(message, message)

    def _on_attention(self, q: torch.Tensor, k: torch.Tensor, *, module: str, **kwargs: Any) -> None:
        self.attention.observe(q, k, module=module, **kwargs)
        if self.qk_clip is not None and self.qk_clip.wants(module):
            self.qk_clip.capture(q, k, site=module)

    def _layer_of_site(self, site: str) -> str:
        """The reported layer name (``layer_00``) of an attention call site."""
        layers = self.attention.layers.items() if self.attention is not None else ()
        for layer, acc in layers:
            if acc.module == site:
                return layer
        for layer, module in self.attention_modules.items():
            if module == site:
                return layer
        return site

    def observe_loss(self, loss: torch.Tensor | None) -> None:
        """The loss of this micro-batch (kept by reference: no work on the device here)."""
        if isinstance(loss, torch.Tensor):
            self._step_losses.append(loss.detach())

    def sharpness_due(self) -> bool:
        """True when the sharpness probe wants an estimate at the current step."""
        return (self.sharpness is not None and self.step is not None and "sharpness probe" not in self.guard.disabled
                and self.sharpness.should_run(self.step))

    def before_optimizer_step(
        self,
        loss_fn: Callable[[], torch.Tensor] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        """Read gradients; on sampled steps snapshot parameters for the update ratio.

        On sharpness steps, ``loss_fn`` (no arguments, the loss on a held batch) and the
        optimizer feed the sharpness probe.
        """
        if loss_fn is not None and self.sharpness_due():
            if self.compiled:  # no double backward through a compiled graph: the eager original
                compiled_loss = loss_fn

                def loss_fn() -> torch.Tensor:
                    with eager_view(self.model):
                        return compiled_loss()

            values = self.guard.run("sharpness probe", self.sharpness.measure, loss_fn, self.model, optimizer)
            self._sharpness_values = values or {}
            for note in self.sharpness.notes:
                self.guard.warn_once(note, note)
        scale = loss_scale(self.grad_scaler) if self.grad_scaler is not None else None  # this step's, one copy
        grad_norms = (self.guard.run("gradient probe", self._observe_gradients, optimizer or self._optimizer, scale)
                      if self.gradients is not None else None)
        if optimizer is not None:
            self._optimizer = optimizer
        loss, self._step_losses = self._step_loss(), []
        self._step_grad_norm = None  # set by the step's read below; never a norm left from an earlier step
        self._clipped_from = None
        if self.detectors is not None:
            self.guard.run("detection", self._detect_step, loss, grad_norms, optimizer, scale)
        else:
            self.guard.run("signals", self._record_step, loss, grad_norms, scale)
        if self.clip_grad_norm is not None and not self._step_skipped:
            self._clip_gradients(grad_norms)
        if self.sampled and self.gradients is not None and not self.gradients.empty:
            self.guard.run("gradient probe", self.gradients.snapshot_parameters)
        if optimizer is not None and not self.observe_only and self.step is not None:
            self._restore_lr = scale_lr_for_next_step(optimizer, self.lr_control.factor(self.step))

    def _clip_gradients(self, grad_norms: torch.Tensor | None) -> None:
        """``clip_grad_norm_`` from the norms already read: coefficient ``min(1, max / (norm + 1e-6))``
        on the device, one in-place multiply per (device, dtype) group. Outside the fail-soft
        guard: clipping is part of the run's arithmetic, so on any error the gradients are clipped
        by ``torch.nn.utils.clip_grad_norm_`` itself rather than left unclipped."""
        probe = self.gradients
        try:
            if grad_norms is None:  # the probe read nothing (no gradient, or it was disabled by a fault)
                raise RuntimeError("no gradient norms were read this step")
            if probe.sharded:  # the whole model's norm: the host value of this step's read, or its all-reduce
                total = self._step_grad_norm
                if total is None:
                    raise RuntimeError("the whole model's gradient norm was not read this step")
                total = total if isinstance(total, torch.Tensor) else torch.tensor(total, device=grad_norms.device)
            else:
                total = torch.linalg.vector_norm(grad_norms)  # what clip_grad_norm_ computes, to the bit
            self._clipped_from = total
            coef = torch.clamp(self.clip_grad_norm / (total + 1e-6), max=1.0)
            groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
            for grad in probe.local_gradients():
                groups.setdefault((grad.device, grad.dtype), []).append(grad)
            for (device, _), grads in groups.items():
                torch._foreach_mul_(grads, coef.to(device))
        except Exception as err:
            if self.guard.strict and grad_norms is not None:
                raise
            if any(p.grad is not None for p in self.model.parameters()):
                self.guard.warn_once("clip fallback", f"stabmon: clipping from the monitor's norms failed ({err}); "
                                                      "torch.nn.utils.clip_grad_norm_ clips instead")
                self._clipped_from = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm)

    def step_grad_norm(self) -> torch.Tensor | None:
        """This step's gradient norm of the whole model, before any clip, as a 0-dim tensor (what
        ``clip_grad_norm_`` returns), once ``before_optimizer_step`` has read it; else None."""
        if self._clipped_from is not None:
            return self._clipped_from
        value = self._step_grad_norm
        if value is None:
            return None
        return value if isinstance(value, torch.Tensor) else torch.tensor(value)

    def _step_loss(self) -> torch.Tensor | None:
        """The step's loss: the one micro-batch loss, or their mean under gradient accumulation."""
        losses = self._step_losses
        if not losses:
            return None
        return losses[0] if len(losses) == 1 else torch.stack([x.float() for x in losses]).mean()

    # -- detection and intervention ---------------------------------------------------------
    def _detect_step(self, loss: torch.Tensor | None, grad_norms: torch.Tensor | None,
                     optimizer: torch.optim.Optimizer | None, scale: torch.Tensor | None) -> None:
        """Per-step detectors on the loss and gradient norm: one host read (and one small
        all-reduce when there are several ranks)."""
        values = self._read_step(loss, grad_norms, scale)
        if "loss/last" in values:
            self.loss.add_host(values["loss/last"])
        if "gradients/loss_scale" in values:
            self._loss_scale = values["gradients/loss_scale"]
        if "gradients/norm" in values:
            norm = self._step_grad_norm = values["gradients/norm"]
            if "gradients/loss_scale" in values and not math.isfinite(norm):
                # fp16 overflow: the GradScaler skips this step and lowers its scale. Routine, not
                # a finding; a scale that keeps falling is (DetectionConfig.min_loss_scale).
                self._interval_overflows += 1
                del values["gradients/norm"]
            else:
                self.grad_norm.add_host(norm)
        findings = self.detectors.on_step(self.step, values)
        self._handle(findings, optimizer, before_step=True)

    def _read_step(self, loss: torch.Tensor | None, grad_norms: torch.Tensor | None,
                   scale: torch.Tensor | None) -> dict[str, float]:
        """``{"loss/last": mean loss over ranks, "gradients/norm": global norm}`` on the host,
        and ``"gradients/loss_scale"`` under fp16 AMP (``scale``, the step's loss scale).

        The per-parameter gradient norms come along in the same read: the gradient probe
        keeps them (summed over ranks) and the emission needs no device work for them.
        """
        all_reduce = active_all_reduce(self._all_reduce)
        parts = []
        if all_reduce is None:  # one process: the norms themselves, squared on the host in float64
            if loss is not None:
                parts.append(loss.reshape(1))
            if grad_norms is not None:
                parts.append(grad_norms)
            if scale is not None:
                parts.append(scale)
        else:  # one sum over ranks: the loss averages, the weighted squares add up to the whole model's
            if loss is not None:
                parts.append(loss.double().reshape(1) / world_size())
            if grad_norms is not None:
                parts.append(self.gradients.squares(grad_norms))
            if scale is not None:  # the same on every rank: its mean
                parts.append(scale.double() / world_size())
        if not parts:
            return {}
        if all_reduce is None and parts[0].device.type == "cpu":
            host = [x for part in parts for x in part.tolist()]  # no device to wait for: no concatenation
        else:
            packed = torch.cat(parts) if len(parts) > 1 else parts[0]
            if all_reduce is not None:
                packed = all_reduce(packed, "sum")
            host = packed.tolist()
        values = {}
        if loss is not None:
            values["loss/last"] = host.pop(0)
        if scale is not None:
            values["gradients/loss_scale"] = host.pop()
        if grad_norms is not None:
            squares = host if all_reduce is not None else [x * x for x in host]
            values["gradients/norm"] = self.gradients.record_host_squares(squares)
        return values

    def _record_step(self, loss: torch.Tensor | None, grad_norms: torch.Tensor | None,
                     scale: torch.Tensor | None) -> None:
        """Detection off: keep the step's values on the device; nothing is read before emission."""
        if loss is not None:
            self.loss.add_device(loss)
        if grad_norms is not None:
            grad = self.gradients.device_norm()
            if self.gradients.sharded:  # the shares of the square must meet every step
                grad = torch_distributed_all_reduce(grad.detach().double(), "sum").sqrt()
            self.grad_norm.add_device(grad)  # fp16 overflows count in gradients/nonfinite_steps here
            self._step_grad_norm = grad
        if scale is not None:
            self._loss_scale = scale

    def _handle(self, findings: list[Finding], optimizer: torch.optim.Optimizer | None, before_step: bool) -> None:
        step = self.step
        if not findings and not (self.policy is not None and self.policy.skipping(step)):
            return  # the common case: nothing to record, nothing to decide
        for f in findings:
            self.findings.append(f)
            self._interval_findings[f.severity] = self._interval_findings.get(f.severity, 0) + 1
            if f.severity != "info":  # an info finding (e.g. past the edge of stability) is no sign of ill health
                self._last_finding_step = step
            if _rank_zero():
                log.log(logging.INFO if f.severity == "info" else logging.WARNING, "stabmon step %d: %s [%s]", step,
                        f.message, f.severity)
        if self.policy is None or self.observe_only:
            return
        findings = self._route_to_qk_clip(findings)
        decision = self.policy.decide(step, findings, lr_reduced=self.lr_control.active(step),
                                      snapshot_available=bool(self.snapshots and self.snapshots.available))
        cfg = self.policy.config
        if decision.rollback and self.snapshots is not None:
            restored = self.snapshots.restore(self.model, optimizer or self._optimizer)
            self.detectors.quiet_until(step + cfg.grace_steps)
            if _rank_zero():
                log.warning("stabmon step %d: rolled back to the snapshot of step %d", step, restored)
        if decision.scale_lr is not None:
            self.lr_control.scale(step, decision.scale_lr, cfg.lr_hold, cfg.lr_recover)
        if decision.rewarm:
            self.lr_control.rewarm(step, cfg.rewarm_start, cfg.rewarm_steps)
            self.detectors.quiet_until(step + cfg.grace_steps)
        if decision.lr_cut is not None:
            self.lr_control.cut(step, decision.lr_cut)
        if decision.skip_step and before_step:
            self._step_skipped = True
            self._skip_optimizer_step(optimizer or self._optimizer)
        if decision.stop:
            self.stop_reason = decision.actions[-1].detail if decision.actions else "stop"
        for action in decision.actions:
            self._record_action(action.name, action.detail)

    def _skip_optimizer_step(self, optimizer: torch.optim.Optimizer | None) -> None:
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

    def _record_action(self, name: str, detail: str | None) -> None:
        if detail is None:
            return
        self.actions_taken.append(Action(self.step, name, detail))
        self._interval_actions += 1
        if _rank_zero():
            log.warning("stabmon step %d: action %s: %s", self.step, name, detail)

    def _route_to_qk_clip(self, findings: list[Finding]) -> list[Finding]:
        """Attention findings of a layer QK-clip can act on go to QK-clip (which targets the
        cause: it arms the layer); only the rest reach the LR rungs."""
        if self.qk_clip is None:
            return findings
        rest = []
        for f in findings:
            parts = f.signal.split("/")
            site = self.attention_modules.get(parts[2]) if parts[0] == "attention" and len(parts) == 3 else None
            if site is None or not (site in self.qk_clip.armed or self.qk_clip.can_arm(site)):
                rest.append(f)
                continue
            if site not in self.qk_clip.armed:
                self._record_action("qk_clip", self.qk_clip.arm(site, self.step, why=f.message))
        return rest

    def _maybe_snapshot(self) -> None:
        cfg = self.policy.config
        step = self.step
        healthy = step - self._last_finding_step > cfg.cooldown and not self.policy.skipping(step)
        if cfg.rollback and healthy and step % cfg.snapshot_every_n_steps == 0:
            self.snapshots.take(step, self.model, self._optimizer)

    def after_optimizer_step(self) -> None:
        self._restore_lr()  # normally done by the step post-hook already
        self._restore_lr = lambda: None
        if self.qk_clip is not None and self.qk_clip.armed:
            # A skipped (or rolled-back) step leaves the weights alone: so does QK-clip.
            self.guard.run("qk-clip", self.qk_clip.discard if self._step_skipped else self.qk_clip.apply)
        self._step_skipped = False
        if self.gradients is not None and self.sampled:
            self.guard.run("gradient probe", self.gradients.measure_update)

    def should_emit(self, step: int) -> bool:
        return self.is_sampled(step) or (step + 1) % self.log_every_n_steps == 0 or bool(self._sharpness_values)

    def end_step(self) -> dict[str, float] | None:
        """Finish the step. On emission steps returns the reduced signals (one host sync)."""
        self.end_forward()
        if self._step_losses:  # a step without before_optimizer_step: keep its loss all the same
            loss, self._step_losses = self._step_loss(), []
            if self.detectors is not None:
                self.loss.add_host(float(loss))
            else:
                self.loss.add_device(loss)
        step = self.step
        if step is None or not self.should_emit(step):
            self._snapshot_if_healthy()
            return None
        if self.sampled and not self._checked_missing:
            self._checked_missing = True
            self._report_missing()
        metrics = self.guard.run("signals", self._collect) or {}
        if self.detectors is not None and metrics:
            self.guard.run("detection", lambda: self._handle(self.detectors.on_sample(step, metrics), None, False))
        metrics.update(self._action_metrics())
        self.summary.update(step, metrics)
        self._snapshot_if_healthy()
        return metrics

    def _snapshot_if_healthy(self) -> None:
        # Last thing in a step: after the detectors and any QK-clip arming saw it.
        if self.policy is not None and not self.observe_only and self.step is not None:
            self.guard.run("snapshot", self._maybe_snapshot)

    def _action_metrics(self) -> dict[str, float]:
        """Host values, the same on every rank: no reduction needed."""
        out = {
            "actions/lr_factor": self.lr_control.factor(self.step) if self.step is not None else 1.0,
            "actions/count": float(self._interval_actions),
            "findings/warning": float(self._interval_findings.get("warning", 0)),
            "findings/critical": float(self._interval_findings.get("critical", 0)),
        }
        self._interval_actions = 0
        self._interval_findings = {"warning": 0, "critical": 0}
        return out

    def flush(self) -> dict[str, float] | None:
        """Emit what the steps since the last emission accumulated (call at the end of a run)."""
        if self.step is None or (self.loss.empty and self.grad_norm.empty):
            return None
        metrics = self.guard.run("signals", self._collect) or {}
        self.summary.update(self.step, metrics)
        return metrics

    def _collect(self) -> dict[str, float]:
        signals = SignalSet()
        if self.sampled and self.attention is not None:
            self.attention.signals(signals, prefix="attention")
            self.attention_modules.update({layer: acc.module for layer, acc in self.attention.layers.items()})
        if self.sampled and self.logits is not None:
            self.logits.signals(signals, prefix="logits")
        self.loss.signals(signals)
        if self._sharpness_values:
            SharpnessProbe.signals(self._sharpness_values, signals, _device_of(self.model))
            self._sharpness_values = {}
        if self.gradients is not None:
            self.gradients.signals(signals, prefix="gradients", per_layer=self.per_layer, parameters=self.sampled)
            self.grad_norm.signals(signals)
        if self.qk_clip is not None:
            self.qk_clip.signals(signals)
            self.qk_clip.reset_interval()
        if isinstance(self._loss_scale, torch.Tensor):
            signals.add_max("gradients/loss_scale", self._loss_scale.reshape(()))
        elif self._loss_scale is not None:  # read this step with the loss: the same on every rank
            signals.add_host("gradients/loss_scale", self._loss_scale, op=None)
            signals.add_host("gradients/overflow_steps", float(self._interval_overflows), op=None)
        metrics = signals.reduce(self._all_reduce)
        if self.sampled and self.qk_clip is not None:
            self.guard.run("qk-clip", self._arm_qk_clip, metrics)
        self._reset_interval()
        return metrics

    def _arm_qk_clip(self, metrics: dict[str, float]) -> None:
        """Arm (and clip now) every located layer whose max logit passed tau at this sample."""
        tau = self.qk_clip.tau
        for layer, acc in self.attention.layers.items():
            value = metrics.get(f"attention/max_logit/{layer}")
            if value is not None and value > tau and self.qk_clip.can_arm(acc.module):
                self._record_action("qk_clip", self.qk_clip.arm(acc.module, self.step, head_max=acc.max_logit,
                                                              why=f"its max logit is {value:.4g}"))

    def _reset_interval(self) -> None:
        self._interval_overflows = 0
        self.loss.reset()
        self.grad_norm.reset()
        if self.gradients is not None:
            self.gradients.reset()
        if self.sampled:
            # Per-head maps of the last sample stay readable until the next sample starts.
            self.last_head_maps = self.attention.head_maps() if self.attention else {}
            if self.attention:
                self.attention.reset()
            if self.logits:
                self.logits.reset()

    def _report_missing(self) -> None:
        if self.attention is not None and self.capture.attention_calls == 0:
            self.guard.warn_once(
                "no attention",
                "stabmon: no F.scaled_dot_product_attention call was seen in the sampled forward; attention "
                "signals are skipped. A model that computes attention by hand can call stabmon.record_attention(q, k).",
            )
        if self.logits is not None and self.capture.logit_calls == 0:
            self.guard.warn_once(
                "no logits",
                "stabmon: no F.cross_entropy call was seen in the sampled forward; output-logit signals are skipped.",
            )
        if self.gradients is not None and not self.gradients.has_observed:
            self.guard.warn_once(
                "no gradients",
                "stabmon: no trainable parameter had a gradient before the optimizer step; gradient signals are skipped.",
            )

    def close(self) -> None:
        """Remove anything installed on the model (safe at any time)."""
        self.capture.detach()
        if self.qk_clip is not None:
            self.qk_clip.remove_hooks()

    # -- checkpointing ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Primitives only (a checkpoint can be read with ``weights_only=True``); no secrets."""
        return {
            "version": 1,
            "summary": self.summary.state_dict(),
            "attention_modules": dict(self.attention_modules),
            "detectors": self.detectors.state_dict() if self.detectors is not None else None,
            "policy": self.policy.state_dict() if self.policy is not None else None,
            "lr_control": self.lr_control.state_dict(),
            "qk_clip": self.qk_clip.state_dict() if self.qk_clip is not None else None,
            "last_finding_step": self._last_finding_step,
            "findings": [f.to_dict() for f in self.findings[-1000:]],
            "actions": [a.to_dict() for a in self.actions_taken[-1000:]],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load what ``state_dict`` wrote; the argument is not modified."""
        self.summary.load_state_dict(state["summary"])
        self.attention_modules = dict(state["attention_modules"])
        if self.detectors is not None and state.get("detectors") is not None:
            self.detectors.load_state_dict(state["detectors"])
        if self.policy is not None and state.get("policy") is not None:
            self.policy.load_state_dict(state["policy"])
        self.lr_control.load_state_dict(state["lr_control"])
        if self.qk_clip is not None and state.get("qk_clip") is not None:
            self.qk_clip.load_state_dict(state["qk_clip"])
        self._last_finding_step = int(state["last_finding_step"])
        self.findings = [Finding(**f) for f in state["findings"]]
        self.actions_taken = [Action(**a) for a in state["actions"]]


def _rank_zero() -> bool:
    """True on the first process (or without torch.distributed): log lines come from it only."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _device_of(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
