"""The Lightning adapter: translates Trainer hooks into calls on ``MonitorCore``."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

import torch
from typing_extensions import override

from stabmon.adapter import TrainerAdapter
from stabmon.callbacks._lightning import CALLBACK_BASES, logger_kind, namespace_of
from stabmon.keys import logged_key, logged_metrics, split_layers
from stabmon.probes.amp import loss_scale
from stabmon.probes.batches import head_of_batch

if TYPE_CHECKING:
    import pytorch_lightning as pl

__all__ = ["StabilityMonitor"]


class StabilityMonitor(TrainerAdapter, *CALLBACK_BASES):
    r"""Watches a training run for the signs that come before a divergence.

    With no arguments it samples every 50th step: on those steps every
    ``F.scaled_dot_product_attention`` and ``F.cross_entropy`` call of the training
    forward is captured (no change to the model), and attention entropy, max attention
    logit and output log-partition are computed with fused reductions. Every step, the
    gradient norm and loss are accumulated on the device; they are read and logged every
    ``log_every_n_steps`` steps and on sampled steps. At the end of the fit a short summary
    is printed.

    Args:
        sample_every_n_steps: steps between sampled forwards (attention and logit probes,
            per-layer update-to-weight ratio). Step 0 is sampled. Default 50.
        log_every_n_steps: steps between emissions of the per-step statistics; None uses
            the Trainer's ``log_every_n_steps``. Default None.
        sharpness_every_n_steps: steps between Hessian sharpness estimates on a held batch
            (the first rows of the first training batch), step 0 included; None turns the
            probe off. Default 2000 (about 0.5% of training time on the example model). The
            loss is the module's ``sharpness_loss(batch)`` if it defines one, else its
            ``training_step(batch, 0)`` with logging muted, run outside the training loop.
        sharpness: the other settings of the sharpness probe (method, iterations,
            tolerance, HVP mode, held batch size); its ``every_n_steps`` is replaced by
            ``sharpness_every_n_steps``. Default ``SharpnessConfig()``.
        observe_only: measure, detect and report, but never act on the run. Default False.
        detection: thresholds of the detectors (``stabmon.DetectionConfig``), or None to
            turn detection off. Default ``DetectionConfig()``.
        intervention: the escalation ladder (``stabmon.InterventionConfig``), or None for
            no intervention. Default ``InterventionConfig()``: LR scale-down with recovery on
            a warning, re-warm when that does not help, step skipping on a critical finding,
            rollback to a healthy snapshot on repeated ones, stop after repeated rollbacks.
        attention: capture attention statistics. Default True.
        logits: capture output-logit statistics. Default True.
        gradients: gradient, parameter and update norms. Default True.
        per_layer: per-layer norms in addition to the global ones. Default True.
        alerts: alert channels (``stabmon.alerts.LogAlert()``, ``WandbAlert()``,
            ``WebhookAlert(url)``), told of every warning and critical finding with what the
            monitor did about it; repeats of the same signal and severity within 100 steps
            are not sent again. Sent from rank 0 only. Default: none.
        wandb_heatmap_every_n_steps: with a ``WandbLogger`` (or an active ``wandb.run``),
            steps between per-layer x per-head attention heatmaps. Default 500.
        compiled_probe_rows: with a ``torch.compile``-d model (a compiled submodule, ``m.compile()``,
            or ``Trainer.fit(torch.compile(module))``) the compiled forward is never touched: on
            sampled steps (and on every step while a QK-clip layer is armed) the probes run on
            an eager forward of the original modules over the first ``compiled_probe_rows``
            rows of the batch, without gradients, before the training step. Default 4.
        clip_grad_norm: clip the gradients to this global L2 norm, in place of the Trainer's
            ``gradient_clip_val`` (leave that unset): the same arithmetic as
            ``torch.nn.utils.clip_grad_norm_`` (bit-identical for float32 gradients), done from the
            norms the monitor reads anyway, so each step reads its gradients once instead of
            twice. Clips the unscaled gradients under mixed precision, like the Trainer. Default None.
        log_key_prefix: prefix of every logged key. Default ``"stabmon"``.
        verbose: print the summary at the end of the fit (rank 0). Default True.
        forensics: on a loss or gradient-norm spike, or a non-finite loss or gradient, find the rows
            of the batch that carry it, replay the step (reproducible: the data; not reproducible:
            a transient fault), name the module where a NaN starts, and write the record to
            ``stabmon-forensics/step_<N>.json`` in the ``log_dir`` (``stabmon.ForensicsConfig``);
            None turns them off. Default ``ForensicsConfig()``: at most 20 events, about 2 training
            steps each (benchmarks/forensics.py).
        skip_list: ``stabmon-skip.json`` of an earlier run (or Lightning's ``skip_batches.json``):
            the optimizer step of any batch that holds a listed row is skipped, and its loss is none
            of the run's signals. The batches this run skips or rolls back past are added and written
            to ``stabmon-skip.json`` in the ``log_dir``. Default None.
        run_dir: where the forensic records, the skip list and the event log go. Default: the
            Trainer's ``log_dir`` when it has a logger, else nowhere (kept in memory).
        event_log: append every finding and action, and the per-head attention maps (at most every
            ``wandb_heatmap_every_n_steps`` steps), to ``stabmon-events.jsonl`` in the Trainer's
            ``log_dir`` (when it has a logger), where ``stabmon inspect`` finds them next to the logs.
            Default True.
        strict: re-raise errors inside the monitor instead of disabling the failing part
            and training on. Default: the ``STABMON_STRICT`` environment variable, else False.

    Raises:
        ValueError: an argument outside its allowed values (the message names it).

    Logged metrics: each key is ``<log_key_prefix>-<family>/<name>[/<layer>]``, so W&B and
    TensorBoard give every family a section of its own (``stabmon-attention``,
    ``stabmon-gradients``, ...). ``<layer>`` is ``layer_00``, ``layer_01``, ... in attention call
    order, or a parameter-group name such as ``transformer_h_0`` for norms. A per-layer signal
    is one chart with a line per layer, ``<prefix>-<family>/<name>/by_layer``, on W&B (a line
    series, refreshed every ``wandb_heatmap_every_n_steps`` and at the end) and on TensorBoard
    (``add_scalars``); other loggers and ``trainer.callback_metrics`` get the flat per-layer keys. A value that
    is undefined (no finite step in the interval, no Adam state yet) is left out, never NaN.

    - ``attention/entropy_min[/<layer>]``: smallest attention entropy (nats) of any head in the
      sampled forward (a head's entropy is the mean over its query rows). A collapse towards 0
      means heads attend to one key.
    - ``attention/entropy_mean[/<layer>]``: mean attention entropy (nats) over rows and heads.
    - ``attention/max_logit[/<layer>]``: largest pre-softmax attention score.
    - ``logits/logz_mean``, ``logits/logz_max``: output log-partition log Z over tokens
      (what z-loss pulls to 0); ``logits/max_logit``; ``logits/entropy_mean`` (nats);
      ``logits/nonfinite`` (rows with NaN or inf).
    - ``gradients/norm`` (at the emission step), ``gradients/norm_max``, ``gradients/norm_min``,
      ``gradients/norm_mean`` (over the steps since the last emission),
      ``gradients/nonfinite_steps``, ``gradients/norm/<layer>``.
    - ``params/norm[/<layer>]`` (sampled steps); ``update/ratio[/<layer>]``: ``||delta theta|| / ||theta||``
      of the optimizer step (sampled steps).
    - ``loss/mean``, ``loss/last``, ``loss/max``, ``loss/nonfinite_steps`` over the interval.
    - ``sharpness/top_eigenvalue``, ``sharpness/x_lr``, ``sharpness/preconditioned`` (Adam),
      ``sharpness/eos_ratio`` (1 = edge of stability), ``sharpness/hvps``, ``sharpness/seconds``.
    - ``findings/warning``, ``findings/critical`` (findings in the interval), ``actions/count``,
      ``actions/lr_factor`` (the LR multiplier in force); with W&B also ``actions/event``
      (1 at each action), ``actions/events`` (table) and the attention heatmaps.

    It is a callback of ``pytorch_lightning`` and of ``lightning.pytorch`` alike (whichever is
    installed, or both): ``isinstance(monitor, lightning.pytorch.Callback)`` holds, and loggers
    and rank-zero checks are those of the Trainer it runs in.

    Example::

        trainer = pl.Trainer(callbacks=[StabilityMonitor()], max_steps=1000)  # or lightning.pytorch.Trainer
        trainer.fit(model, datamodule)
        print(trainer.callbacks[0].latest_metrics["attention/entropy_min"])
        trainer.callback_metrics["stabmon-attention/entropy_min"]
    """

    def __init__(self, **settings: Any) -> None:
        super().__init__(**settings)
        self.stop_checkpoint: str | None = None
        self._step_at_start: int | None = None

    @property
    def sample_every_n_steps(self) -> int:
        return self.settings.sample_every_n_steps

    @property
    def log_key_prefix(self) -> str:
        return self.settings.log_key_prefix

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(sample_every_n_steps=self.sample_every_n_steps, prefix=self.log_key_prefix)

    # -- hooks ----------------------------------------------------------------------------
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        # the event log and the forensics go where the first logger writes (log_dir: every rank calls it)
        run_dir = trainer.log_dir if trainer.loggers else None
        # fp16 AMP: Lightning's MixedPrecision (and FSDP's) keep their GradScaler here
        core = self._start(pl_module, trainer.log_every_n_steps, run_dir=run_dir if trainer.is_global_zero else None,
                           grad_scaler=getattr(trainer.precision_plugin, "scaler", None))
        if core.probes.sharpness is not None and not pl_module.automatic_optimization:
            core.guard.disable("sharpness probe", "manual optimization")
            self._say("sharpness manual", "stabmon: the sharpness probe needs automatic optimization; it is off for "
                                          "this run.")
        if self.settings.clip_grad_norm is not None and trainer.gradient_clip_val:
            self._say("clip twice", f"stabmon: both `clip_grad_norm={self.settings.clip_grad_norm}` and the Trainer's "
                      f"`gradient_clip_val={trainer.gradient_clip_val}` clip the gradients; the Trainer's then reads them "
                      "all again for nothing it changes. Set one of them.")
        if trainer.is_global_zero:
            core.guard.run("wandb", self._find_wandb, trainer)

    @override
    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        if self.core is None:
            return
        self._step_at_start = trainer.global_step
        self.core.start_step(trainer.global_step)
        self.core.observe_batch(batch, lambda rows: _replay_loss(trainer, pl_module, rows),
                                epoch=trainer.current_epoch, batch_index=batch_idx)
        if self.core.probe_due():  # a compiled model: the probes see an eager forward of a few rows
            rows = head_of_batch(batch, self.settings.compiled_probe_rows)
            self.core.run_probe(lambda: _quiet_training_step(pl_module, rows))
        self.core.hold_sharpness_batch(batch, lambda held: _quiet_training_step(pl_module, held))

    @override
    def on_before_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", loss: torch.Tensor) -> None:
        if self.core is None:
            return
        self.core.end_forward()
        self.core.observe_loss(_training_step_loss(trainer, pl_module, loss, self.core.grad_scaler))

    @override
    def on_before_optimizer_step(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: torch.optim.Optimizer
    ) -> None:
        if self.core is not None:
            self.core.before_optimizer_step(optimizer=optimizer)

    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.core is None:
            return
        self.core.end_forward()
        if trainer.global_step == self._step_at_start:
            return  # accumulating gradients: the optimizer has not stepped yet
        self.core.after_optimizer_step()
        metrics = self._finish_step(self._step_at_start, trainer.is_global_zero)
        if metrics:
            self.core.guard.run("sinks", self._emit, trainer, self._step_at_start, metrics)
        if self.core.stop_reason is not None and not trainer.should_stop:
            self._stop(trainer)

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.core is None:
            return
        metrics = self._finish_training(trainer.is_global_zero)
        if metrics and self.core.step is not None:
            self.core.guard.run("sinks", self._emit, trainer, self.core.step, metrics)

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        if self.core is not None:
            self.core.close()

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if self.core is not None:
            self.core.close()

    # -- state ------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return self._state()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._load_state(state_dict)

    # -- output -----------------------------------------------------------------------------
    def _stop(self, trainer: "pl.Trainer") -> None:
        """Stop the fit, with a checkpoint to resume from (every rank calls it: the strategy
        gathers what it needs). A checkpoint that cannot be written does not keep the run going."""
        path = os.path.join(trainer.default_root_dir, "stabmon-stop.ckpt")
        saved = self.core.guard.attempt("stop", trainer.save_checkpoint, path, agreed=True)
        trainer.should_stop = True
        self.stop_checkpoint = path if saved else None
        if trainer.is_global_zero:
            print(f"stabmon: stopping the run at step {trainer.global_step}: {self.core.stop_reason}. "
                  f"Checkpoint: {path if saved else 'none (it could not be written)'}", flush=True)

    def _find_wandb(self, trainer: "pl.Trainer") -> None:
        """W&B extras when the trainer logs to W&B (or a wandb run is active); else nothing."""
        ns = namespace_of(trainer)
        run = None
        for logger in trainer.loggers:
            if logger_kind(logger, ns) == "wandb":
                run = logger.experiment
        if run is None and "wandb" in sys.modules:
            run = sys.modules["wandb"].run
        if run is not None:
            self._attach_wandb(run)
        elif trainer.loggers:
            self.reporter.run = f"{trainer.loggers[0].name}/{trainer.loggers[0].version}"

    def _emit(self, trainer: "pl.Trainer", step: int, metrics: dict[str, float]) -> None:
        """To every logger (one chart per per-layer signal where the logger can draw it) and
        into ``callback_metrics``, so that ModelCheckpoint / EarlyStopping can monitor the values."""
        prefix = self.log_key_prefix
        flat = logged_metrics(prefix, metrics)
        # Like LearningRateMonitor: straight to the loggers at our own cadence.
        if trainer.is_global_zero and trainer.loggers:
            ns = namespace_of(trainer)
            split = None
            for logger in trainer.loggers:
                kind = logger_kind(logger, ns)
                if kind == "other":
                    logger.log_metrics(flat, step=step)
                    continue
                plain, series = split = split or split_layers(metrics)
                if kind == "tensorboard":
                    logger.log_metrics(logged_metrics(prefix, plain), step=step)
                    for name, by_layer in series.items():
                        logger.experiment.add_scalars(logged_key(prefix, f"{name}/by_layer"), by_layer, step)
                elif self.wandb is not None:  # the per-layer series go to W&B's line-series charts
                    logger.log_metrics(logged_metrics(prefix, plain), step=step)
                else:
                    logger.log_metrics(flat, step=step)
        # One tensor for all values, viewed per key: no tensor constructor per key.
        values = torch.tensor(list(flat.values()), dtype=torch.float32).unbind()
        _callback_metrics(trainer).update(zip(flat, values))


def _training_step_loss(trainer: "pl.Trainer", pl_module: "pl.LightningModule", loss: torch.Tensor,
                        grad_scaler: Any) -> torch.Tensor:
    """The loss ``training_step`` returned, from the one the backward receives: Lightning divides
    it by ``accumulate_grad_batches`` (automatic optimization) and multiplies it by the fp16
    GradScaler's scale before ``on_before_backward``. Device arithmetic only."""
    if trainer.accumulate_grad_batches != 1 and pl_module.automatic_optimization:
        loss = loss.detach() * trainer.accumulate_grad_batches
    scale = loss_scale(grad_scaler) if grad_scaler is not None else None
    return loss.detach() / scale.reshape(()).to(loss.device) if scale is not None else loss


def _callback_metrics(trainer: "pl.Trainer") -> dict[str, Any]:
    """The dict behind ``trainer.callback_metrics``. The public property first recomputes every
    value the LightningModule logged with ``self.log`` (about 0.1 ms per access on a small
    model, more with many logged keys): paid on every emission of a run that logs every step.
    The dict it returns is the connector's ``_callback_metrics``; its updates are the same."""
    current = getattr(getattr(trainer, "_logger_connector", None), "_callback_metrics", None)
    return current if isinstance(current, dict) else trainer.callback_metrics


def _replay_loss(trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any) -> torch.Tensor:
    """``training_step``'s loss on ``batch`` (or some of its rows) as the step computed it: under
    the precision plugin's autocast, logging muted."""
    with trainer.precision_plugin.forward_context():
        return _quiet_training_step(pl_module, batch)


def _quiet_training_step(pl_module: "pl.LightningModule", batch: Any) -> torch.Tensor:
    """The loss on ``batch``: ``pl_module.sharpness_loss(batch)`` when the module defines it,
    else its ``training_step`` with the ``self.log`` calls muted."""
    if callable(getattr(pl_module, "sharpness_loss", None)):
        return pl_module.sharpness_loss(batch)
    pl_module.log = lambda *args, **kwargs: None  # instance attributes shadow the methods
    pl_module.log_dict = lambda *args, **kwargs: None
    try:
        out = pl_module.training_step(batch, 0)
    finally:
        del pl_module.log, pl_module.log_dict
    if isinstance(out, dict):
        out = out["loss"]
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"training_step returned {type(out).__name__}, the sharpness probe needs the loss tensor")
    return out
