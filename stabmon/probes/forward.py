"""Everything the monitor measures in the forward: capture, the attention, logit and sharpness
probes, the sampling schedule, the eager probe forward of compiled models, and the map between
reported attention layers (``layer_00``) and the modules that call attention.

``ForwardProbes`` knows nothing of interventions: QK-clip hears the sampled forward's attention
calls through the small ``AttentionListener`` protocol it implements.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Protocol

import torch

from stabmon._failsoft import FailSoft
from stabmon.curvature.hessian_vector import isolated_rng
from stabmon.memory import MemoryBudget, MemoryPlan, memory_plan
from stabmon.probes.attention import AttentionProbe
from stabmon.probes.capture import ForwardCapture
from stabmon.probes.compiled import eager_view, is_compiled
from stabmon.probes.logits import LogitProbe
from stabmon.probes.qk_norm import QKNormGains
from stabmon.probes.sharpness import SharpnessConfig, SharpnessProbe, buffers_preserved
from stabmon.signals import SignalSet

__all__ = ["AttentionListener", "ForwardProbes"]


class AttentionListener(Protocol):
    """What a listener to the sampled forward's attention calls provides (``QKClipper`` does)."""

    armed: Any  # the layers measured on every step (truthy when there are any)
    hooks_between_probes: bool

    def wants(self, site: str) -> bool: ...

    def capture(self, q: torch.Tensor, k: torch.Tensor, *, site: str) -> None: ...

    def locate_pending(self) -> list[str]: ...

    def attach_hooks(self) -> None: ...

    def remove_hooks(self) -> None: ...


class ForwardProbes:
    """The sampled forward's probes and their schedule.

    Args:
        model: the module whose forward is watched.
        sample_every_n_steps: steps between sampled forwards (see ``is_sampled``).
        attention: the attention probe (entropy and max logit of every SDPA call).
        logits: the output-logit probe (every ``cross_entropy`` call).
        sharpness: the sharpness probe's settings, or None for none.
        compiled_probe_rows: rows of the batch the eager probe forward of a compiled model sees.
        guard: the monitor's fail-soft guard.

    Example:
        >>> probes = ForwardProbes(torch.nn.Linear(4, 3), sample_every_n_steps=10, attention=True, logits=True)
        >>> [s for s in range(12) if probes.is_sampled(s)]   # 0, the powers of two before 10, then every 10th
        [0, 1, 2, 4, 8, 10]
    """

    def __init__(self, model: torch.nn.Module, *, sample_every_n_steps: int = 50, attention: bool = True,
                 logits: bool = True, sharpness: SharpnessConfig | None = None, compiled_probe_rows: int = 4,
                 guard: FailSoft | None = None, memory_budget: MemoryBudget | None = None) -> None:
        self.model = model
        self.sample_every_n_steps = sample_every_n_steps
        self.compiled_probe_rows = compiled_probe_rows
        self.guard = guard or FailSoft()
        self.attention = AttentionProbe() if attention else None
        self.qk_gains = QKNormGains(model, self.layer_of_site) if attention else None
        self.logits = LogitProbe() if logits else None
        self.sharpness = SharpnessProbe(sharpness, memory_budget) if sharpness is not None else None
        self.listener: AttentionListener | None = None
        self.capture = ForwardCapture(on_attention=self._on_attention if self.attention else None,
                                      on_logits=self.logits.observe if self.logits else None, guard=self.guard.run)
        self.attention_modules: dict[str, str] = {}  # reported layer -> the module that calls attention
        self.last_head_maps: dict[str, dict[str, torch.Tensor]] = {}  # per-head maps of the last sample
        self.step: int | None = None
        self.sampled = False
        self._sharpness_values: dict[str, float] = {}
        self._compiled: bool | None = None  # found out at the first step (the model may be compiled late)
        self._last_started: int | None = None
        self._reported_missing = False

    # -- the schedule --------------------------------------------------------------------------
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
        self._last_started = self.step = step
        if first_micro_batch:
            self.sampled = self.is_sampled(step)
            if self.sampled and (self.attention or self.logits) and not self.compiled:
                self.guard.run("capture", self.capture.attach, self.model)
        return self.sampled

    def end_forward(self) -> None:
        """Leave the capture (before backward, so recomputed forwards are not counted twice);
        the listener then locates the attention layers it saw for the first time."""
        if self.capture.attached:
            self.guard.run("capture", self.capture.detach)
            if self.listener is not None:
                for message in self.guard.run("qk-clip", self.listener.locate_pending) or []:
                    self.guard.warn_once(message, message)

    def _on_attention(self, q: torch.Tensor, k: torch.Tensor, *, module: str, **kwargs: Any) -> None:
        self.attention.observe(q, k, module=module, **kwargs)
        if self.qk_gains is not None and self.qk_gains.wants(module):
            self.guard.run("attention probe", self.qk_gains.capture, q, k, site=module)
        if self.listener is not None and not self.guard.off("qk-clip") and self.listener.wants(module):
            self.guard.run("qk-clip", self.listener.capture, q, k, site=module)

    @property
    def attention_calls(self) -> int:
        """Attention calls seen by the capture so far (0 after a sampled forward: none found)."""
        return self.capture.attention_calls

    def layer_of_site(self, site: str) -> str:
        """The reported layer name (``layer_00``) of an attention call site."""
        for layer, acc in (self.attention.layers.items() if self.attention is not None else ()):
            if acc.module == site:
                return layer
        for layer, module in self.attention_modules.items():
            if module == site:
                return layer
        return site

    # -- torch.compile -------------------------------------------------------------------------
    @property
    def compiled(self) -> bool:
        """True when the model (or a part of it) runs compiled: the probes then run on an eager
        forward of the original modules (``run_probe``) and never touch the compiled one."""
        if self._compiled is None:
            self._compiled = is_compiled(self.model)
            if self._compiled and self.listener is not None:
                self.listener.hooks_between_probes = False
                self.listener.remove_hooks()
        return self._compiled

    def probe_due(self, step: int | None = None) -> bool:
        """On a compiled model: True when this step needs the eager probe forward (a sampled step,
        or any step while the listener measures a layer on every step)."""
        step = self.step if step is None else step
        if not self.compiled or step is None:
            return False
        return self.is_sampled(step) or bool(self.listener is not None and self.listener.armed)

    def run_probe(self, forward: Callable[[], Any]) -> None:
        """Run ``forward`` (the model and its loss on a few rows of the batch) eagerly under the probes.

        For compiled models, on the steps ``probe_due`` names, before the training forward. The
        original modules stand in for the compiled ones (``stabmon.probes.compiled.eager_view``):
        no graph is compiled or invalidated. It runs without gradients (with them only while an
        attention layer still has to be located for QK-clip), under a forked RNG, and puts
        BatchNorm statistics back, so the run itself is not changed.
        """
        sampled = self.is_sampled(self.step) if self.step is not None else False
        locate = sampled and self.listener is not None
        devices = [p.device for p in self.model.parameters()][:1]
        with eager_view(self.model), buffers_preserved(self.model), isolated_rng(devices, 0), \
                torch.set_grad_enabled(locate):
            if self.listener is not None:
                self.listener.attach_hooks()
            try:
                if sampled and (self.attention or self.logits):
                    self.guard.run("capture", self.capture.attach, self.model)
                self.guard.run("probe forward", forward)
            finally:
                self.end_forward()
                if self.listener is not None:
                    self.listener.remove_hooks()

    # -- sharpness -----------------------------------------------------------------------------
    @property
    def attention_shapes(self) -> dict[str, tuple[int, int, int]]:
        """Per attention layer seen so far: ``(heads, query length, key length)`` (the memory plan's input)."""
        return dict(self.attention.shapes) if self.attention is not None else {}

    def hold_sharpness_batch(self, batch: Any, loss_of: Callable[[Any], torch.Tensor]) -> None:
        """The first training batch (its first rows, copied) and ``loss_of(batch) -> loss``: the
        sharpness probe's held batch, cut to its memory budget at each estimate."""
        if self.sharpness is not None and "sharpness probe" not in self.guard.disabled and not self.sharpness.holding:
            self.guard.run("sharpness probe", self.sharpness.hold, batch, loss_of)

    def sharpness_due(self, loss_fn: Callable[[], torch.Tensor] | None = None) -> bool:
        """True when the sharpness probe wants an estimate at the current step (and has a loss:
        ``loss_fn`` or a held batch)."""
        return (self.sharpness is not None and self.step is not None and self.sharpness.should_run(self.step)
                and (loss_fn is not None or self.sharpness.holding) and not self.guard.off("sharpness probe"))

    def prepare_sharpness(self, loss_fn: Callable[[], torch.Tensor] | None = None) -> None:
        """Before the step's read: the probe's own checks (memory), so that a rank that cannot
        run it says so with the read, and no rank starts an estimate the others skip."""
        if self.sharpness_due(loss_fn):
            self.guard.run("sharpness probe", self.sharpness.preflight, self.model, self.attention_shapes)

    def measure_sharpness(self, loss_fn: Callable[[], torch.Tensor] | None,
                          optimizer: torch.optim.Optimizer | None) -> None:
        """One estimate on the held batch (``loss_fn``, or the batch given to ``hold_sharpness_batch``);
        its values join the step's emission."""
        if not self.sharpness_due(loss_fn):
            return
        wrap = eager_view(self.model) if self.compiled else None  # no double backward through a compiled graph

        # The held batch's forwards (on weights moved along the HVP's direction) are no training
        # step: the listener's per-step measurement must not see them.
        paused = self.listener is not None and self.listener.hooks_between_probes
        if paused:
            self.listener.remove_hooks()
        try:
            with wrap if wrap is not None else contextlib.nullcontext():
                values = self.guard.run("sharpness probe", self.sharpness.measure, loss_fn, self.model, optimizer,
                                        self.attention_shapes)
        finally:
            if paused:
                self.listener.attach_hooks()
        self._sharpness_values = values or {}
        for note in self.sharpness.notes:
            self.guard.warn_once(note, note)
        plan = self.sharpness.plan
        if plan is not None and (plan.why or not plan.fits):  # once: the whole table, so the user sees why
            self.guard.warn_once("memory plan", "stabmon: the monitor's memory on this rank, part by part "
                                 f"(stabmon.memory_plan):\n{self.memory_plan(self.sharpness.budget).table()}")

    def memory_plan(self, budget: MemoryBudget | None = None, seq_len: int | None = None,
                    world_size: int | None = None) -> MemoryPlan:
        """The monitor's memory for this model (``stabmon.memory_plan``): the attention layers and the
        sequence length as the sampled forwards saw them, the sharpness probe's settings."""
        from stabmon.signals import world_size as ranks

        shapes, sharp = self.attention_shapes, (self.sharpness.config if self.sharpness else SharpnessConfig())
        if seq_len is None:
            seq_len = max((s[1] for s in shapes.values()), default=1)
        return memory_plan(self.model, seq_len=seq_len, world_size=world_size or ranks(), held_rows=sharp.batch_size,
                           iters=sharp.iters, method=sharp.method, hvp_mode=sharp.hvp_mode, budget=budget,
                           attention=shapes, activation_bytes_per_token=(
                               self.sharpness.activation_bytes_per_token if self.sharpness else None))

    @property
    def has_sharpness_values(self) -> bool:
        return bool(self._sharpness_values)

    # -- emission ------------------------------------------------------------------------------
    def signals(self, out: SignalSet, add: Callable[..., Any]) -> None:
        """The sample's attention and logit signals and any sharpness estimate, each stage's
        through ``add(stage, fn, out)`` (the emission's guard: a stage that fails adds nothing)."""
        if self.sampled and self.attention is not None and not self.guard.off("attention probe"):
            add("attention probe", self.attention.signals, out, prefix="attention")
            if self.qk_gains is not None and self.qk_gains.watched:
                add("attention probe", self.qk_gains.signals, out)
        if self.sampled and self.logits is not None and not self.guard.off("logit probe"):
            add("logit probe", self.logits.signals, out, prefix="logits")
        if self._sharpness_values and not self.guard.off("sharpness probe"):
            device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
            add("sharpness probe", SharpnessProbe.signals, self._sharpness_values, out, device)

    def layer_maxima(self, metrics: dict[str, float]) -> dict[str, tuple[float, torch.Tensor]]:
        """Per attention call site: its reduced max logit at this sample and its per-head maxima."""
        if not self.sampled or self.attention is None:
            return {}
        out = {}
        for layer, acc in self.attention.layers.items():
            value = metrics.get(f"attention/max_logit/{layer}")
            if value is not None:
                out[acc.module] = (value, acc.max_logit)
        return out

    def after_emission(self) -> None:
        """The sample was emitted: keep its layer map and head maps, start afresh."""
        self._sharpness_values = {}
        if not self.sampled:
            return
        if self.attention is not None:
            self.attention_modules.update({layer: acc.module for layer, acc in self.attention.layers.items()})
            # Per-head maps of the last sample stay readable until the next sample starts.
            self.last_head_maps = self.attention.head_maps()
            self.attention.reset()
        else:
            self.last_head_maps = {}
        if self.logits is not None:
            self.logits.reset()

    def report_missing(self, gradients_observed: bool | None) -> None:
        """Once, after the first sample: the signals this model does not give, and why."""
        if self._reported_missing:
            return
        self._reported_missing = True
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
        if gradients_observed is False:
            self.guard.warn_once(
                "no gradients",
                "stabmon: no trainable parameter had a gradient before the optimizer step; gradient signals are skipped.",
            )

    def close(self) -> None:
        self.capture.detach()
        if self.listener is not None:
            self.listener.remove_hooks()
