"""The monitor inside the Hugging Face ``transformers.Trainer``.

    from transformers import Trainer
    from stabmon.integrations.transformers import StabilityMonitorCallback

    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[StabilityMonitorCallback()])
    trainer.train()

Every signal, detector, action and alert of ``stabmon.StabilityMonitor``, driven from the
Trainer's events:

* **signals**: attention through SDPA (load models with ``attn_implementation="sdpa"``; an
  eager-attention model is named once with that fix), output logits through
  ``F.cross_entropy`` (the models' own loss), and the per-step loss from the model's output
  (a forward hook; the capture of a sampled step ends there, before the backward);
* **gradients** are read before they are clipped (``max_grad_norm``), once: the monitor's
  read also gives the Trainer its clip and its ``grad_norm`` (accelerate's arithmetic, without
  its second pass over the gradients; DeepSpeed, FSDP and XLA keep their own clipping, and the
  monitor then reads just before it, or at ``on_pre_optimizer_step``);
  under ``fp16=True`` they are read unscaled, and an overflow step (which the GradScaler
  skips) is counted, not reported (``stabmon.probes.amp``);
* **metrics** go through ``Trainer.log`` at the ``logging_steps`` cadence, under the keys of
  the Lightning callback (``stabmon-attention/entropy_min``, ...): into
  ``trainer.state.log_history`` and every ``report_to`` integration (the W&B integration
  files them under ``train/``); with W&B the heatmaps and per-layer charts go to ``wandb.run``;
* **actions**: the LR scaling around ``optimizer.step()`` (scheduler-safe), step skipping,
  rollback, QK-clip, and a clean stop (``control.should_training_stop``, with a checkpoint);
* **state** is kept in the checkpoint's ``trainer_state.json`` (``stateful_callbacks["stabmon"]``)
  and comes back with ``trainer.train(resume_from_checkpoint=...)``;
* under DDP (``torchrun`` / ``accelerate launch``) signals are reduced across ranks and every
  rank takes the same decision; logs, alerts and W&B come from the main process.

The Trainer hands its callbacks no reference to itself; the callback finds the ``Trainer``
that calls it (the caller's frame, once, at ``on_init_end`` or ``on_train_begin``) to log
through it and to read gradients before clipping. Where that fails, the metrics are merged
into the Trainer's own log entries instead, and the gradients are read after clipping (both
said once).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any

import torch

try:
    import transformers
    from transformers import TrainerCallback
except ImportError as err:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "stabmon.integrations.transformers needs Hugging Face transformers: pip install 'stabmon[transformers]'"
    ) from err

from stabmon.alerts import AlertChannel
from stabmon.core import MonitorCore
from stabmon.detectors import DetectionConfig
from stabmon.interventions import InterventionConfig
from stabmon.keys import logged_metrics
from stabmon.probes.batches import head_of_batch
from stabmon.probes.sharpness import SharpnessConfig
from stabmon.settings import MonitorOutputs, MonitorSettings
from stabmon.sinks.reporter import Reporter

__all__ = ["StabilityMonitorCallback"]

_STATE_KEY = "stabmon"


def _find_trainer() -> transformers.Trainer | None:
    """The ``Trainer`` on the call stack (its ``CallbackHandler`` is calling us)."""
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, transformers.Trainer):
            return candidate
        frame = frame.f_back
    return None


def _plain_gradient_norm(trainer: transformers.Trainer, model: torch.nn.Module) -> bool:
    """True where the Trainer's gradient norm is accelerate's plain ``clip_grad_norm_`` over
    whole gradients (one process or DDP): not DeepSpeed, FSDP, XLA, SageMaker model
    parallelism or tensor-parallel meshes, which clip their own way, nor a Trainer subclass
    with a clip of its own."""
    accelerator = getattr(trainer, "accelerator", None)
    kind = str(getattr(getattr(accelerator, "distributed_type", None), "value", "")).upper()
    if accelerator is None or any(name in kind for name in ("DEEPSPEED", "FSDP", "XLA", "MEGATRON")):
        return False
    if getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False):
        return False
    sagemaker_mp = getattr(transformers.utils, "is_sagemaker_mp_enabled", None)
    if callable(sagemaker_mp) and sagemaker_mp():
        return False
    mixed_mesh = getattr(trainer, "_has_mixed_mesh_grads", None)
    try:
        if callable(mixed_mesh) and mixed_mesh(model):
            return False
    except Exception:  # noqa: BLE001 - an unknown Trainer: keep its own clip
        return False
    for name in ("_clip_grad_norm", "_get_grad_norm"):  # a Trainer subclass that clips its own way keeps it
        own = getattr(type(trainer), name, None)
        if own is not None and own is not getattr(transformers.Trainer, name, None):
            return False
    return callable(getattr(trainer, "_clip_grad_norm", None)) and callable(getattr(accelerator, "unscale_gradients", None))


def _inner_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer behind accelerate's ``AcceleratedOptimizer`` wrapper (its LR, state and
    step hooks are the ones that count)."""
    while type(optimizer).__name__ == "AcceleratedOptimizer" and getattr(optimizer, "optimizer", None) is not None:
        optimizer = optimizer.optimizer
    return optimizer


class StabilityMonitorCallback(MonitorOutputs, TrainerCallback):
    """``stabmon.StabilityMonitor`` as a ``transformers.TrainerCallback``.

    Takes the arguments of ``StabilityMonitor`` (see its documentation for each default);
    ``log_every_n_steps`` defaults to the Trainer's ``logging_steps``. With no arguments it
    samples attention and logits every 50 steps, reads the gradient norm and the loss every
    step, estimates sharpness every 2000 steps on the first rows of the first batch, detects,
    acts and alerts.

    After or during training, ``findings``, ``actions_taken`` and ``latest_metrics`` are the
    Lightning callback's; ``summary()`` prints the end-of-training table.

    Example::

        from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

        model = LlamaForCausalLM(LlamaConfig(..., attn_implementation="sdpa"))
        monitor = StabilityMonitorCallback(sample_every_n_steps=50)
        trainer = Trainer(model=model, args=TrainingArguments("out", logging_steps=10), train_dataset=data,
                          callbacks=[monitor])
        trainer.train()
        [entry for entry in trainer.state.log_history if "stabmon-attention/max_logit" in entry]
    """

    def __init__(
        self,
        *,
        sample_every_n_steps: int = 50,
        log_every_n_steps: int | None = None,
        sharpness_every_n_steps: int | None = 2000,
        sharpness: SharpnessConfig | None = None,
        observe_only: bool = False,
        detection: DetectionConfig | None = DetectionConfig(),
        intervention: InterventionConfig | None = InterventionConfig(),
        alerts: Sequence[AlertChannel] = (),
        wandb_heatmap_every_n_steps: int = 500,
        attention: bool = True,
        logits: bool = True,
        gradients: bool = True,
        per_layer: bool = True,
        log_key_prefix: str = "stabmon",
        verbose: bool = True,
        strict: bool | None = None,
    ) -> None:
        self.settings = MonitorSettings(
            sample_every_n_steps=sample_every_n_steps, log_every_n_steps=log_every_n_steps,
            sharpness_every_n_steps=sharpness_every_n_steps, sharpness=sharpness, observe_only=observe_only,
            detection=detection, intervention=intervention, alerts=alerts,
            wandb_heatmap_every_n_steps=wandb_heatmap_every_n_steps, attention=attention, logits=logits,
            gradients=gradients, per_layer=per_layer, log_key_prefix=log_key_prefix, verbose=verbose, strict=strict,
        )
        self.core: MonitorCore | None = None
        self.reporter = Reporter(self.settings.dispatcher(), None)
        self.latest_metrics: dict[str, float] = {}
        self._trainer: transformers.Trainer | None = None
        self._handles: list[Any] = []
        self._pending: dict[str, float] = {}
        self._held: dict[str, Any] | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._model: torch.nn.Module | None = None
        self._step_read = False  # gradients of this step already read (before clipping)
        self._probing = False
        self._said: set[str] = set()

    # -- set-up ---------------------------------------------------------------------------------
    def on_init_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        self._trainer = self._trainer or _find_trainer()

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):  # noqa: ANN001, ANN201
        self._trainer = self._trainer or _find_trainer()
        self._model, self._optimizer = model, _inner_optimizer(optimizer)
        self.core = self.settings.make_core(model, args.logging_steps if args.logging_steps >= 1 else 50)
        # fp16 AMP: accelerate's GradScaler. Before the clipping the gradients still carry its scale:
        # the core reads them unscaled (it asks the scaler whether unscale_ has run).
        self.core.grad_scaler = getattr(getattr(self._trainer, "accelerator", None), "scaler", None)
        saved = (state.stateful_callbacks or {}).get(_STATE_KEY)
        if saved and state.global_step > 0:  # resumed from a checkpoint
            self.core.load_state_dict(saved)
        self._handles = [model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
                         model.register_forward_hook(self._after_forward, always_call=True)]
        clips = bool(args.max_grad_norm and args.max_grad_norm > 0)
        if self._trainer is not None and self.core.gradients is not None and _plain_gradient_norm(self._trainer, model):
            self._take_over_gradient_norm(self._trainer, args.max_grad_norm if clips else None)
        elif self._trainer is not None and clips:
            clip = self._trainer._clip_grad_norm

            def read_then_clip(clip_model: torch.nn.Module) -> Any:
                self._before_optimizer_step()  # the gradients as they are before clipping
                return clip(clip_model)

            self._trainer._clip_grad_norm = read_then_clip
        elif clips:
            self._say("clip", "stabmon: the Trainer was not found from the callback: gradient statistics are of the "
                              "gradients after clipping (max_grad_norm).")
        if state.is_world_process_zero:
            self.core.guard.run("wandb", self._find_wandb, args)

    def _take_over_gradient_norm(self, trainer: transformers.Trainer, max_grad_norm: float | None) -> None:
        """The Trainer reads every gradient once per step for its ``grad_norm`` (its clip, or
        ``_get_grad_norm`` when nothing is clipped), right where the monitor reads them: the
        monitor's read serves both. What accelerate's ``clip_grad_norm_`` does is kept: unscale
        under fp16 AMP, then ``clip_grad_norm_``'s arithmetic (bit-identical for float32) from
        the monitor's norms, returning the pre-clip norm."""
        accelerator = trainer.accelerator
        self.core.clip_grad_norm = max_grad_norm

        def read_unscaled() -> torch.Tensor | None:
            accelerator.unscale_gradients()  # a no-op outside fp16 AMP, as in accelerate's own clip
            self._before_optimizer_step()
            return self.core.step_grad_norm()

        if max_grad_norm is not None:
            original_clip = trainer._clip_grad_norm

            def clip_from_the_monitors_norms(clip_model: torch.nn.Module) -> Any:
                if self._step_read:  # read already (not expected): the Trainer's own clip
                    return original_clip(clip_model)
                norm = read_unscaled()
                return norm if norm is not None else torch.tensor(math.nan)

            trainer._clip_grad_norm = clip_from_the_monitors_norms
        elif callable(getattr(trainer, "_get_grad_norm", None)):
            original_norm = trainer._get_grad_norm

            def norm_from_the_monitor(norm_model: torch.nn.Module, grad_norm: Any = None) -> Any:
                if grad_norm is not None or self._step_read:
                    return original_norm(norm_model, grad_norm=grad_norm)
                norm = read_unscaled()
                if norm is None:  # the monitor read nothing (a fault): the Trainer's norm of the gradients
                    # unscaled above; its own _get_grad_norm would unscale them again, which the scaler refuses
                    norm = torch.nn.utils.clip_grad_norm_(norm_model.parameters(), math.inf)
                return norm

            trainer._get_grad_norm = norm_from_the_monitor

    def _find_wandb(self, args: Any) -> None:
        if "wandb" not in (args.report_to or []) or "wandb" not in sys.modules or sys.modules["wandb"].run is None:
            return
        from stabmon.sinks.wandb import WandbExtras

        run = sys.modules["wandb"].run
        self.reporter.run = getattr(run, "name", None) or "wandb run"
        self.reporter.wandb = WandbExtras(run, prefix=self.settings.log_key_prefix,
                                          heatmap_every_n_steps=self.settings.wandb_heatmap_every_n_steps)
        self.reporter.wandb.define_metrics()

    def _say(self, key: str, message: str) -> None:
        if key not in self._said and self.core is not None:
            self._said.add(key)
            self.core.guard.warn_once(key, message)

    # -- the step ---------------------------------------------------------------------------------
    def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        if self.core is not None:
            self._step_read = False
            self.core.start_step(state.global_step)

    def _before_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if self._held is None and self.core is not None and self.core.sharpness is not None and module.training:
            self._held = head_of_batch(dict(kwargs), self.core.sharpness.config.batch_size)

    def _after_forward(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        core = self.core
        if core is None or not module.training or self._probing:
            return
        core.end_forward()  # before the backward: a recomputed forward is not captured twice
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor):
            core.observe_loss(loss)
        else:
            self._say("no loss", "stabmon: the model's output has no `loss` (no labels in the batch?): the loss "
                                 "signals and their spike detector are off.")
        if core.sampled and core.capture.attention_calls == 0:
            impl = getattr(getattr(module, "config", None), "_attn_implementation", None)
            if impl not in (None, "sdpa"):
                self._say("eager", f"stabmon: the model computes attention with attn_implementation={impl!r}, which "
                                   "does not call F.scaled_dot_product_attention: load or build it with "
                                   "attn_implementation=\"sdpa\" for the attention signals.")

    def _held_loss(self) -> torch.Tensor:
        self._probing = True  # the sharpness probe's own forwards are not training steps
        try:
            output = self._model(**self._held)
        finally:
            self._probing = False
        return output["loss"] if isinstance(output, dict) else output.loss

    def _before_optimizer_step(self) -> None:
        if self.core is None or self._step_read:
            return
        self._step_read = True
        loss_fn = self._held_loss if self._held is not None and "labels" in self._held else None
        self.core.before_optimizer_step(loss_fn=loss_fn, optimizer=self._optimizer)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        self._before_optimizer_step()  # no-op when it ran before the clipping

    def on_optimizer_step(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        if self.core is not None:
            self.core.after_optimizer_step()

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        core = self.core
        if core is None:
            return
        step = core.step
        metrics = core.end_step()
        if metrics:
            self.latest_metrics.update(metrics)
            self._pending.update(logged_metrics(self.settings.log_key_prefix, metrics))
        if state.is_world_process_zero:
            core.guard.run("sinks", self.reporter.report, core, step, bool(metrics) and core.sampled)
            if metrics and self.reporter.wandb is not None:
                from stabmon.keys import split_layers

                self.reporter.wandb.add_series(step, split_layers(metrics)[1])
        if core.stop_reason is not None and not control.should_training_stop:
            control.should_training_stop = True
            control.should_save = True  # a checkpoint to resume from, at the step that stopped
            if state.is_world_process_zero:
                print(f"stabmon: stopping the run at step {state.global_step}: {core.stop_reason}", flush=True)
        if control.should_save:  # the checkpoint written after this event carries the monitor's state
            if state.stateful_callbacks is None:
                state.stateful_callbacks = {}
            state.stateful_callbacks[_STATE_KEY] = core.state_dict()
        if self._pending and control.should_log and self._trainer is not None:
            self._log_through_trainer(control)

    def _log_through_trainer(self, control: Any) -> None:
        pending, self._pending = self._pending, {}
        pending = {k: v for k, v in pending.items() if math.isfinite(v)}
        should_log = control.should_log  # Trainer.log resets it: the Trainer's own log entry is still due
        self._trainer.log(pending)
        control.should_log = should_log
        self._trainer.control.should_log = should_log

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001, ANN201
        # Without the Trainer: merge into its own entries (integrations listed before this
        # callback have seen the entry already; log_history gets the keys all the same).
        if self._trainer is None and self._pending and logs is not None and "loss" in logs:
            pending, self._pending = self._pending, {}
            logs.update(pending)
            if state.log_history:
                state.log_history[-1].update(pending)

    def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        core = self.core
        if core is None:
            return
        core.close()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        metrics = core.flush()
        if metrics:
            self.latest_metrics.update(metrics)
        if state.is_world_process_zero:
            core.guard.run("sinks", self.reporter.report, core, core.step, False)
        self.reporter.finish(core)
        if self.settings.verbose and state.is_world_process_zero:
            print(self.summary(), flush=True)
