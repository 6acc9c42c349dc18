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

import contextlib
import math
import sys
from typing import Any, ClassVar

import torch

try:
    import transformers
    from transformers import TrainerCallback
except ImportError as err:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "stabmon.integrations.transformers needs Hugging Face transformers: pip install 'stabmon[transformers]'"
    ) from err

from stabmon.adapter import TrainerAdapter
from stabmon.keys import logged_metrics

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


class StabilityMonitorCallback(TrainerAdapter, TrainerCallback):
    """``stabmon.StabilityMonitor`` as a ``transformers.TrainerCallback``.

    Takes the arguments of ``StabilityMonitor`` (see its documentation for each default),
    except ``clip_grad_norm`` (the Trainer's ``max_grad_norm`` is clipped from the monitor's
    read already) and ``compiled_probe_rows``; ``log_every_n_steps`` defaults to the Trainer's
    ``logging_steps``. With no arguments it samples attention and logits every 50 steps, reads
    the gradient norm and the loss every step, estimates sharpness every 2000 steps on the first
    rows of the first batch, detects, acts and alerts.

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

    refused: ClassVar[dict[str, str]] = {
        "clip_grad_norm": "set TrainingArguments.max_grad_norm: the Trainer's clip is done from the monitor's "
                          "read of the gradients already",
        "compiled_probe_rows": "the Hugging Face adapter does not probe torch.compile-d models eagerly",
    }

    def __init__(self, **settings: Any) -> None:
        super().__init__(**settings)
        self._trainer: transformers.Trainer | None = None
        self._handles: list[Any] = []
        self._unlogged: dict[str, float] = {}  # logged keys of the last emissions, for the Trainer's next log
        self._optimizer: torch.optim.Optimizer | None = None
        self._model: torch.nn.Module | None = None
        self._step_read = False  # gradients of this step already read (before clipping)
        self._epoch = 0
        self._probing = False

    # -- set-up ---------------------------------------------------------------------------------
    def on_init_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        self._trainer = self._trainer or _find_trainer()

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):  # noqa: ANN001, ANN201
        self._trainer = self._trainer or _find_trainer()
        self._model, self._optimizer = model, _inner_optimizer(optimizer)
        saved = (state.stateful_callbacks or {}).get(_STATE_KEY) if state.global_step > 0 else None  # resumed
        # fp16 AMP: accelerate's GradScaler. Before the clipping the gradients still carry its scale:
        # the core reads them unscaled (it asks the scaler whether unscale_ has run).
        core = self._start(model, args.logging_steps if args.logging_steps >= 1 else 50, saved_state=saved,
                           run_dir=args.output_dir if state.is_world_process_zero else None,
                           grad_scaler=getattr(getattr(self._trainer, "accelerator", None), "scaler", None))
        self._handles = [model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
                         model.register_forward_hook(self._after_forward, always_call=True)]
        clips = bool(args.max_grad_norm and args.max_grad_norm > 0)
        if self._trainer is not None and core.reader.gradients is not None and _plain_gradient_norm(self._trainer,
                                                                                                    model):
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
            core.guard.run("wandb", self._find_wandb, args)

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
        if "wandb" in (args.report_to or []) and "wandb" in sys.modules and sys.modules["wandb"].run is not None:
            self._attach_wandb(sys.modules["wandb"].run)

    # -- the step ---------------------------------------------------------------------------------
    def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        if self.core is not None:
            self._step_read = False
            self._epoch = int(state.epoch or 0)
            self.core.start_step(state.global_step)

    def _before_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if self.core is not None and module.training and not self._probing:
            batch = dict(kwargs)  # the batch, captured without a change to the user's code (by reference)
            if "labels" in batch:  # the sharpness probe needs the model's loss
                self.core.hold_sharpness_batch(batch, self._held_loss)
            self.core.observe_batch(batch, self._replay_loss, epoch=self._epoch)

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
        if core.sampled and core.probes.attention_calls == 0:
            impl = getattr(getattr(module, "config", None), "_attn_implementation", None)
            if impl not in (None, "sdpa"):
                self._say("eager", f"stabmon: the model computes attention with attn_implementation={impl!r}, which "
                                   "does not call F.scaled_dot_product_attention: load or build it with "
                                   "attn_implementation=\"sdpa\" for the attention signals.")

    def _replay_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """The model's loss on ``batch`` (or some of its rows), under the Trainer's autocast."""
        manager = getattr(self._trainer, "compute_loss_context_manager", None)
        with manager() if callable(manager) else contextlib.nullcontext():
            return self._held_loss(batch)

    def _held_loss(self, held: dict[str, Any]) -> torch.Tensor:
        self._probing = True  # the sharpness probe's own forwards are not training steps
        try:
            output = self._model(**held)
        finally:
            self._probing = False
        return output["loss"] if isinstance(output, dict) else output.loss

    def _before_optimizer_step(self) -> None:
        if self.core is None or self._step_read:
            return
        self._step_read = True
        self.core.before_optimizer_step(optimizer=self._optimizer)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        self._before_optimizer_step()  # no-op when it ran before the clipping

    def on_optimizer_step(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        if self.core is not None:
            self.core.after_optimizer_step()

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        core = self.core
        if core is None:
            return
        metrics = self._finish_step(core.step, state.is_world_process_zero)
        if metrics:
            self._unlogged.update(logged_metrics(self.settings.log_key_prefix, metrics))
        if core.stop_reason is not None and not control.should_training_stop:
            control.should_training_stop = True
            control.should_save = True  # a checkpoint to resume from, at the step that stopped
            if state.is_world_process_zero:
                print(f"stabmon: stopping the run at step {state.global_step}: {core.stop_reason}", flush=True)
        if control.should_save:  # the checkpoint written after this event carries the monitor's state
            if state.stateful_callbacks is None:
                state.stateful_callbacks = {}
            state.stateful_callbacks[_STATE_KEY] = self._state()
        if self._unlogged and control.should_log and self._trainer is not None:
            self._log_through_trainer(control)

    def _log_through_trainer(self, control: Any) -> None:
        pending, self._unlogged = self._unlogged, {}
        pending = {k: v for k, v in pending.items() if math.isfinite(v)}
        should_log = control.should_log  # Trainer.log resets it: the Trainer's own log entry is still due
        self._trainer.log(pending)
        control.should_log = should_log
        self._trainer.control.should_log = should_log

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001, ANN201
        # Without the Trainer: merge into its own entries (integrations listed before this
        # callback have seen the entry already; log_history gets the keys all the same).
        if self._trainer is None and self._unlogged and logs is not None and "loss" in logs:
            pending, self._unlogged = self._unlogged, {}
            logs.update(pending)
            if state.log_history:
                state.log_history[-1].update(pending)

    def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        if self.core is None:
            return
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._finish_training(state.is_world_process_zero)
