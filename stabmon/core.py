"""The monitor without a trainer: one pipeline, driven step by step.

``MonitorCore`` is what the Lightning and Hugging Face adapters drive from their hooks, and it
works the same from a hand-written loop (``examples/plain_loop.py``). Each step flows one way
through small objects, each under its own fail-soft stage::

    ForwardProbes  (forward)      capture, attention / logit probes, sharpness, the schedule
    StepReader     (before step)  loss, gradient norms, loss scale: one read, one reduction
    DetectorSet    (detection)    values -> findings
    Responder      (acting)       findings -> actions: QK-clip, LR rungs, skip, rollback, stop
    Emission       (end of step)  every stage's signals in one reduction; then the sampled findings

The one edge back: an action that raises the loss on purpose (a re-warm, a rollback) keeps the
spike detectors quiet for a while (``Response.quiet_until``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from stabmon._failsoft import FailSoft
from stabmon.detectors import Finding
from stabmon.interventions.grad_clip import GradientClipper
from stabmon.interventions.responder import Responder, Response
from stabmon.memory import MemoryPlan
from stabmon.probes.forward import ForwardProbes
from stabmon.probes.step import StepReader
from stabmon.report import RunSummary
from stabmon.settings import MonitorOptions, build_options
from stabmon.emission import Emission
from stabmon.signals import AllReduce, active_all_reduce, torch_distributed_all_reduce, world_size

__all__ = ["MonitorCore"]


class MonitorCore:
    """Measures, detects and acts on one model's training, step by step.

    Args:
        model: the module whose forward, gradients and parameters are watched.
        all_reduce: cross-rank reduction of the signals; default: torch.distributed when a
            process group is initialised, else none.
        grad_scaler: the ``torch.amp.GradScaler`` of fp16 mixed precision, if any (the
            Lightning and Hugging Face adapters find theirs). Gradients that still carry the
            loss scale are read unscaled; a step whose scaled gradients overflow is the
            scaler's to skip, counted in ``gradients/overflow_steps`` and not a finding.
        options: a ``stabmon.settings.MonitorOptions``, or the same as keywords:
            ``sample_every_n_steps``, ``log_every_n_steps``, ``sharpness``, ``detection``,
            ``intervention``, ``observe_only``, ``clip_grad_norm``, ... (each documented there).

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

    def __init__(self, model: torch.nn.Module, *, all_reduce: AllReduce | None = torch_distributed_all_reduce,
                 grad_scaler: Any = None, options: MonitorOptions | None = None, **keywords: Any) -> None:
        if options is not None and keywords:
            raise TypeError("MonitorCore takes `options` or the options as keywords, not both")
        self.options = opts = options or build_options(MonitorOptions, "MonitorCore", keywords)
        self.model = model
        self.log_every_n_steps = opts.log_every_n_steps or 50
        self._all_reduce = all_reduce
        # ranks agree on what failed where only when they reduce together
        self.guard = FailSoft(strict=opts.strict, synced=lambda: active_all_reduce(all_reduce) is not None
                              and world_size() > 1)
        self.probes = ForwardProbes(model, sample_every_n_steps=opts.sample_every_n_steps, attention=opts.attention,
                                    logits=opts.logits, sharpness=opts.sharpness,
                                    compiled_probe_rows=opts.compiled_probe_rows, guard=self.guard,
                                    memory_budget=opts.memory_budget)
        self.reader = StepReader(model, gradients=opts.gradients, all_reduce=all_reduce, guard=self.guard)
        self.detectors = opts.detection.build() if opts.detection is not None else None
        self.responder = Responder(model, opts.intervention, observe_only=opts.observe_only, qk_clip=opts.attention,
                                   guard=self.guard, all_reduce=all_reduce, layer_names=self.probes.layer_of_site,
                                   forensics=opts.forensics, skip_list=opts.skip_list, run_dir=opts.run_dir)
        self.probes.listener = self.responder.qk_clip
        self.clipper = GradientClipper(opts.clip_grad_norm) if opts.clip_grad_norm is not None else None
        self.grad_scaler = grad_scaler
        self.run_summary = RunSummary()
        self.latest_metrics: dict[str, float] = {}  # the values of the last emission, key by key
        self.emission = Emission(self.probes, self.reader, self.responder, guard=self.guard, all_reduce=all_reduce,
                                 per_layer=opts.per_layer)

    # -- what the stages hold, under one name each ----------------------------------------------------
    findings = property(lambda self: self.responder.findings, doc="What the detectors found (``Finding``s).")
    actions_taken = property(lambda self: self.responder.actions_taken, doc="What the monitor did (``Action``s).")
    stop_reason = property(lambda self: self.responder.stop_reason, doc="Why the run should stop, or None.")
    step = property(lambda self: self.probes.step, doc="The step in progress (None before the first).")
    sampled = property(lambda self: self.probes.sampled, doc="True when the step in progress is sampled.")
    attention_modules = property(lambda self: self.probes.attention_modules,
                                 doc="Reported attention layer (``layer_00``) -> the module that calls attention.")
    last_head_maps = property(lambda self: self.probes.last_head_maps, doc="Per-head maps of the last sample.")

    @property
    def grad_scaler(self) -> Any:
        return self.reader.grad_scaler

    @grad_scaler.setter
    def grad_scaler(self, scaler: Any) -> None:
        self.reader.grad_scaler = self.responder.grad_scaler = scaler

    @property
    def clip_grad_norm(self) -> float | None:
        return self.clipper.max_norm if self.clipper is not None else None

    @clip_grad_norm.setter
    def clip_grad_norm(self, max_norm: float | None) -> None:
        self.clipper = GradientClipper(max_norm) if max_norm is not None else None

    def summary(self) -> str:
        """The end-of-training table as text."""
        forensics = self.responder.forensics.summary() if self.responder.forensics is not None else None
        return self.run_summary.format(self.attention_modules) + (f"\n{forensics}" if forensics else "")

    @property
    def forensics(self) -> list[Any]:
        """The forensic records of this run (``stabmon.forensics.ForensicRecord``), oldest first."""
        return self.responder.forensics.records if self.responder.forensics is not None else []

    # -- the step --------------------------------------------------------------------------------------
    def start_step(self, step: int | None = None) -> bool:
        """Begin a step (or another micro-batch of it). Returns True when it is sampled."""
        return self.probes.start_step(step)

    def end_forward(self) -> None:
        """Leave the capture: call before the backward, so recomputed forwards are not counted twice."""
        self.probes.end_forward()

    def observe_loss(self, loss: torch.Tensor | None) -> None:
        """The loss of this micro-batch (kept by reference: no work on the device here)."""
        self.reader.observe_loss(loss)

    def observe_batch(self, batch: Any, loss_of: Callable[[Any], torch.Tensor] | None = None, *,
                      epoch: int | None = None, batch_index: int | None = None) -> None:
        """This step's batch (held by reference, for the forensics of a spike and the skip list) and
        ``loss_of(batch) -> loss``, the training loss of a batch (or of some of its rows), for a
        replay. Call it each step, before the forward."""
        if self.responder.forensics is not None:
            self.responder.forensics.hold(self.probes.step, batch, loss_of, epoch=epoch, batch_index=batch_index)

    def before_optimizer_step(self, loss_fn: Callable[[], torch.Tensor] | None = None,
                              optimizer: torch.optim.Optimizer | None = None) -> None:
        """Read the step, detect, respond. ``optimizer`` lets the monitor act (LR, skip, rollback);
        ``loss_fn`` (no arguments: the loss on a held batch) feeds the sharpness probe when it is due."""
        probes, responder = self.probes, self.responder
        step, sampled = probes.step, probes.sampled
        probes.prepare_sharpness(loss_fn)
        responder.preflight(step)
        forensics = responder.forensics
        listed = forensics.listed if forensics is not None and len(forensics.skip_list) else None
        values = self.reader.read(optimizer=optimizer or responder.optimizer, sampled=sampled, step=step,
                                  to_host=self.detectors is not None, listed=listed)
        probes.measure_sharpness(loss_fn, optimizer)
        findings = []
        if values is not None and values.listed:  # a batch of the skip list: skipped, and none of the run's signals
            response = responder.skip_listed(step, optimizer)
        else:
            if values is not None and self.detectors is not None:
                findings = self.guard.run("detection", self.detectors.on_step, step, values.for_detectors(),
                                          agreed=True)
            response = responder.respond(step, findings or [], optimizer=optimizer, values=values,
                                         site_of_layer=probes.attention_modules, layers=self.reader.layer_norms)
        if response.quiet_until is not None:
            self._quiet(response)
        if self.clipper is not None and not response.skip_step:
            self._clip()
        if sampled:
            self.reader.snapshot_parameters()
        responder.before_optimizer_step(step, optimizer)

    def after_optimizer_step(self) -> None:
        self.responder.after_optimizer_step()
        if self.probes.sampled:
            self.reader.measure_update()

    def end_step(self) -> dict[str, float] | None:
        """Finish the step. On emission steps returns the reduced signals (one host read)."""
        probes = self.probes
        probes.end_forward()
        self.reader.end_step(host=self.detectors is not None)
        step = probes.step
        if step is None or not self.should_emit(step):
            if step is not None:
                self.responder.end_step(step)
            return None
        if probes.sampled:  # said once, after the first sample
            gradients = self.reader.gradients is not None and not self.guard.off("gradient probe")
            probes.report_missing(self.reader.has_observed if gradients else None)
        metrics = self.emission.emit(step)
        if metrics and self.detectors is not None:
            findings = self.guard.run("detection", self.detectors.on_sample, step, metrics, agreed=True)
            if findings or self.responder.policy is not None and self.responder.policy.skipping(step):
                self._quiet(self.responder.respond(step, findings or [], before_step=False,
                                                   site_of_layer=probes.attention_modules))
        metrics.update(self.responder.metrics(step))
        self._record(step, metrics)
        self.responder.end_step(step)
        return metrics

    def respond(self, findings: Sequence[Finding], optimizer: torch.optim.Optimizer | None = None) -> None:
        """Act on findings of your own (a detector of yours) at the current step, before its
        optimizer step, as the monitor acts on its own findings."""
        self._quiet(self.responder.respond(self.step, list(findings), optimizer=optimizer,
                                           site_of_layer=self.attention_modules))

    def should_emit(self, step: int) -> bool:
        return (self.probes.is_sampled(step) or (step + 1) % self.log_every_n_steps == 0
                or self.probes.has_sharpness_values)

    def flush(self) -> dict[str, float] | None:
        """Emit what the steps since the last emission accumulated (call at the end of a run)."""
        if self.step is None or self.reader.empty:
            return None
        metrics = self.emission.emit(self.step, arm=False)
        self._record(self.step, metrics)
        return metrics

    def step_grad_norm(self) -> torch.Tensor | None:
        """This step's gradient norm of the whole model, before any clip, as a 0-dim tensor (what
        ``clip_grad_norm_`` returns), once ``before_optimizer_step`` has read it; else None."""
        if self.clipper is not None and self.clipper.clipped_from is not None:
            return self.clipper.clipped_from
        return self.reader.step_grad_norm()

    # -- the stages' glue --------------------------------------------------------------------------------
    def _quiet(self, response: Response) -> None:
        """The feedback edge: a rise the monitor caused is expected, not a new alarm."""
        if response.quiet_until is not None and self.detectors is not None:
            self.detectors.quiet_until(response.quiet_until)

    def _clip(self) -> None:
        reader, norms = self.reader, self.reader.norms
        total = None
        if norms is not None:  # the whole model's norm: this step's read, or the norm of the norms
            total = reader.step_grad_norm() if reader.gradients.sharded else torch.linalg.vector_norm(norms)
        self.clipper.reset()
        self.clipper.clip(reader.local_gradients(), total, self.model.parameters(), strict=self.guard.strict,
                          on_fallback=lambda message: self.guard.warn_once("clip fallback", message))

    def _record(self, step: int, metrics: dict[str, float]) -> None:
        self.run_summary.update(step, metrics)
        self.latest_metrics.update(metrics)

    # -- the rest of the public surface -------------------------------------------------------------------
    def is_sampled(self, step: int) -> bool:
        return self.probes.is_sampled(step)

    def sharpness_due(self) -> bool:
        return self.probes.sharpness_due()

    def hold_sharpness_batch(self, batch: Any, loss_of: Callable[[Any], torch.Tensor]) -> None:
        """The sharpness probe's held batch: the first rows of ``batch`` (copied) and ``loss_of(batch)
        -> loss``; the probe cuts it to its memory budget. Once; later calls are ignored."""
        self.probes.hold_sharpness_batch(batch, loss_of)

    def memory_plan(self, seq_len: int | None = None, world_size: int | None = None) -> MemoryPlan:
        """The monitor's memory, part by part, for this model (``stabmon.memory_plan``)."""
        return self.probes.memory_plan(self.options.memory_budget, seq_len=seq_len, world_size=world_size)

    def probe_due(self, step: int | None = None) -> bool:
        return self.probes.probe_due(step)

    def run_probe(self, forward: Callable[[], Any]) -> None:
        self.probes.run_probe(forward)

    @property
    def compiled(self) -> bool:
        return self.probes.compiled

    def close(self) -> None:
        """Remove anything installed on the model (safe at any time)."""
        self.probes.close()

    def state_dict(self) -> dict[str, Any]:
        """Primitives only (a checkpoint can be read with ``weights_only=True``); no secrets."""
        return {"version": 1, "summary": self.run_summary.state_dict(), "attention_modules": dict(self.attention_modules),
                "detectors": self.detectors.state_dict() if self.detectors is not None else None,
                **self.responder.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load what ``state_dict`` wrote (this version's or an earlier one's); the argument is not modified."""
        self.run_summary.load_state_dict(state["summary"])
        self.probes.attention_modules = dict(state["attention_modules"])
        if self.detectors is not None and state.get("detectors") is not None:
            self.detectors.load_state_dict(state["detectors"])
        self.responder.load_state_dict(state)
