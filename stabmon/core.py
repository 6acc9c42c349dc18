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
        core.before_optimizer_step()
        opt.step(); opt.zero_grad()
        core.after_optimizer_step()
        metrics = core.end_step()             # dict on emission steps, else None
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from stabmon._failsoft import FailSoft
from stabmon._validation import check_bool, check_positive_int
from stabmon.probes.attention import AttentionProbe
from stabmon.probes.capture import ForwardCapture
from stabmon.probes.gradients import GradientProbe, LossProbe
from stabmon.probes.logits import LogitProbe
from stabmon.probes.sharpness import SharpnessConfig, SharpnessProbe
from stabmon.report import RunSummary
from stabmon.signals import AllReduce, SignalSet, torch_distributed_all_reduce

__all__ = ["MonitorCore"]


class MonitorCore:
    """Drives the probes for one model and turns them into named scalar signals.

    Args:
        model: the module whose forward, gradients and parameters are watched.
        sample_every_n_steps: steps between sampled forwards (attention and logit probes,
            update-to-weight ratio). Step 0 is sampled. Default 50.
        log_every_n_steps: steps between emissions of the per-step statistics (loss and
            gradient norms, summarised over the interval). Sampled steps always emit.
            Default 50.
        attention: capture ``scaled_dot_product_attention`` calls. Default True.
        logits: capture the logits given to ``cross_entropy``. Default True.
        gradients: gradient, parameter and update norms. Default True.
        per_layer: per-layer gradient, parameter and update norms. Default True.
        sharpness: configuration of the sharpness probe, or None (default) for none. The
            estimate runs in ``before_optimizer_step`` when a ``loss_fn`` is given there.
        strict: re-raise errors inside the monitor instead of disabling the failing part.
            Default False (the test suite turns it on).
        all_reduce: cross-rank reduction of signals; default: torch.distributed when a
            process group is initialised, else none.

    Example:
        >>> model = torch.nn.Linear(4, 3)
        >>> core = MonitorCore(model, sample_every_n_steps=1, log_every_n_steps=1)
        >>> core.start_step(0)
        True
        >>> loss = torch.nn.functional.cross_entropy(model(torch.ones(2, 4)), torch.tensor([0, 1]))
        >>> core.end_forward(); core.observe_loss(loss); loss.backward()
        >>> core.before_optimizer_step(); core.after_optimizer_step()
        >>> sorted(core.end_step())[:3]
        ['gradients/nonfinite_steps', 'gradients/norm', 'gradients/norm/bias']
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
        strict: bool = False,
        all_reduce: AllReduce | None = torch_distributed_all_reduce,
    ) -> None:
        check_positive_int("sample_every_n_steps", sample_every_n_steps)
        check_positive_int("log_every_n_steps", log_every_n_steps)
        for name, value in (("attention", attention), ("logits", logits), ("gradients", gradients),
                            ("per_layer", per_layer), ("strict", strict)):
            check_bool(name, value)
        self.model = model
        self.sample_every_n_steps = sample_every_n_steps
        self.log_every_n_steps = log_every_n_steps
        self.per_layer = per_layer
        self.guard = FailSoft(strict=strict)
        self._all_reduce = all_reduce

        self.attention = AttentionProbe() if attention else None
        self.logits = LogitProbe() if logits else None
        self.gradients = GradientProbe(model.named_parameters()) if gradients else None
        self.loss = LossProbe()
        if sharpness is not None and not isinstance(sharpness, SharpnessConfig):
            raise ValueError(f"`sharpness` must be a SharpnessConfig or None, got {sharpness!r}")
        self.sharpness = SharpnessProbe(sharpness) if sharpness is not None else None
        self._sharpness_values: dict[str, float] = {}
        self.capture = ForwardCapture(
            on_attention=self.attention.observe if self.attention else None,
            on_logits=self.logits.observe if self.logits else None,
            guard=self.guard.run,
        )
        self.summary = RunSummary()
        self.attention_modules: dict[str, str] = {}
        self.step: int | None = None
        self.sampled = False
        self._last_started: int | None = None
        self._checked_missing = False
        self.last_head_maps: dict[str, dict[str, torch.Tensor]] = {}

    # -- per-step protocol ----------------------------------------------------------------
    def is_sampled(self, step: int) -> bool:
        return step % self.sample_every_n_steps == 0

    def start_step(self, step: int | None = None) -> bool:
        """Begin a step (or another micro-batch of it). Returns True when it is sampled."""
        step = (self._last_started + 1 if self._last_started is not None else 0) if step is None else step
        first_micro_batch = step != self._last_started
        self._last_started = step
        self.step = step
        if not first_micro_batch:
            return self.sampled
        self.sampled = self.is_sampled(step)
        if self.sampled and (self.attention or self.logits):
            self.guard.run("capture", self.capture.attach, self.model)
        return self.sampled

    def end_forward(self) -> None:
        """Leave the capture (before backward, so recomputed forwards are not counted twice)."""
        if self.capture.attached:
            self.guard.run("capture", self.capture.detach)

    def observe_loss(self, loss: torch.Tensor | None) -> None:
        if isinstance(loss, torch.Tensor):
            self.guard.run("loss probe", self.loss.observe, loss)

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
            values = self.guard.run("sharpness probe", self.sharpness.measure, loss_fn, self.model, optimizer)
            self._sharpness_values = values or {}
        if self.gradients is None or self.gradients.empty:
            return
        self.guard.run("gradient probe", self.gradients.observe)
        if self.sampled:
            self.guard.run("gradient probe", self.gradients.snapshot_parameters)

    def after_optimizer_step(self) -> None:
        if self.gradients is not None and self.sampled:
            self.guard.run("gradient probe", self.gradients.measure_update)

    def should_emit(self, step: int) -> bool:
        return self.is_sampled(step) or (step + 1) % self.log_every_n_steps == 0 or bool(self._sharpness_values)

    def end_step(self) -> dict[str, float] | None:
        """Finish the step. On emission steps returns the reduced signals (one host sync)."""
        self.end_forward()
        step = self.step
        if step is None or not self.should_emit(step):
            return None
        if self.sampled and not self._checked_missing:
            self._checked_missing = True
            self._report_missing()
        metrics = self.guard.run("signals", self._collect) or {}
        self.summary.update(step, metrics)
        return metrics

    def flush(self) -> dict[str, float] | None:
        """Emit what the steps since the last emission accumulated (call at the end of a run)."""
        if self.step is None or self.loss.empty:
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
        self.loss.signals(signals, prefix="loss")
        if self._sharpness_values:
            SharpnessProbe.signals(self._sharpness_values, signals, _device_of(self.model))
            self._sharpness_values = {}
        if self.gradients is not None:
            self.gradients.signals(signals, prefix="gradients", per_layer=self.per_layer)
        metrics = signals.reduce(self._all_reduce)
        self._reset_interval()
        return metrics

    def _reset_interval(self) -> None:
        self.loss.reset()
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

    # -- checkpointing ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "summary": self.summary.state_dict(), "attention_modules": dict(self.attention_modules)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.summary.load_state_dict(state["summary"])
        self.attention_modules = dict(state["attention_modules"])


def _device_of(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
