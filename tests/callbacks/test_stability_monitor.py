import math
import warnings

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, Logger

import stabmon
from stabmon import StabilityMonitor, StabmonWarning
from tests.helpers import TinyLM, TinyMLP, quiet_trainer, regression_loader, token_loader


class RecordingLogger(Logger):
    """Keeps every log_metrics call: {step: {key: value}}."""

    def __init__(self):
        super().__init__()
        self.by_step: dict[int, dict[str, float]] = {}

    @property
    def name(self):
        return "recording"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.by_step.setdefault(step, {}).update(metrics)


def fit(module, loader, monitor=None, max_steps=8, **trainer_kwargs):
    callbacks = [monitor] if monitor is not None else []
    trainer = quiet_trainer(max_steps=max_steps, callbacks=callbacks + trainer_kwargs.pop("callbacks", []), **trainer_kwargs)
    trainer.fit(module, loader)
    return trainer


def stabmon_keys(metrics):
    return {k for k in metrics if k.startswith("stabmon-")}


def test_fit_logs_signals_at_sampled_and_log_steps(capsys):
    pl.seed_everything(0)
    logger = RecordingLogger()
    monitor = StabilityMonitor(sample_every_n_steps=3, log_every_n_steps=4)
    trainer = fit(TinyLM(layers=2), token_loader(), monitor, logger=logger)
    steps = {s for s, m in logger.by_step.items() if stabmon_keys(m)}
    assert steps == {0, 1, 2, 3, 6, 7}  # sampled: 0, 3, 6 and the early 1, 2; log steps: (s + 1) % 4 == 0
    sampled = logger.by_step[3]
    for layer in ("layer_00", "layer_01"):
        for name in ("entropy_min", "entropy_mean", "max_logit"):
            assert f"stabmon-attention/{name}/{layer}" in sampled
    for key in ("attention/entropy_min", "attention/max_logit", "logits/logz_mean", "logits/logz_max",
                "logits/max_logit", "logits/entropy_mean", "gradients/norm", "gradients/norm/model_blocks_0",
                "params/norm", "update/ratio", "update/ratio/model_blocks_1", "loss/mean"):
        assert f"stabmon-{key}" in sampled, key
    # not sampled: interval statistics only, no attention or logits
    assert not any("attention" in k or "logits" in k for k in logger.by_step[7])
    assert "stabmon-gradients/norm_max" in logger.by_step[7]
    # sane values: entropy of causal attention over 12 keys lies in [0, log 12]
    assert 0 < sampled["stabmon-attention/entropy_min"] <= sampled["stabmon-attention/entropy_mean"] <= math.log(12)
    assert math.isclose(sampled["stabmon-logits/entropy_mean"], sampled["stabmon-logits/entropy_mean"])
    assert sampled["stabmon-logits/logz_max"] >= sampled["stabmon-logits/logz_mean"]
    # values also reach callback_metrics, for ModelCheckpoint / EarlyStopping
    assert "stabmon-gradients/norm" in trainer.callback_metrics
    # end-of-fit summary
    out = capsys.readouterr().out
    assert "stabmon summary, steps 0-7" in out and "layer_01 (model.blocks.1.attn)" in out and "log Z" in out


def test_loss_mean_over_the_interval_matches_the_training_losses():
    losses = []

    class Spy(TinyLM):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            losses.append(loss.item())
            return loss

    logger = RecordingLogger()
    monitor = StabilityMonitor(sample_every_n_steps=100, log_every_n_steps=4, sharpness_every_n_steps=None)
    fit(Spy(), token_loader(), monitor, logger=logger, max_steps=8)
    # emissions: the sampled steps 0, 1, 2, 4 (the early powers of two) and the log steps 3, 7;
    # each reports the steps since the one before
    assert sorted(logger.by_step) == [0, 1, 2, 3, 4, 7]
    assert math.isclose(logger.by_step[0]["stabmon-loss/mean"], losses[0], rel_tol=1e-6)
    assert math.isclose(logger.by_step[3]["stabmon-loss/mean"], losses[3], rel_tol=1e-6)
    assert math.isclose(logger.by_step[7]["stabmon-loss/mean"], sum(losses[5:8]) / 3, rel_tol=1e-6)
    assert math.isclose(logger.by_step[7]["stabmon-loss/max"], max(losses[5:8]), rel_tol=1e-6)
    assert math.isclose(logger.by_step[7]["stabmon-loss/last"], losses[7], rel_tol=1e-6)


def test_observe_only_leaves_training_bit_identical():
    def run(with_monitor):
        pl.seed_everything(7)
        module = TinyLM(layers=2, kv_heads=2)
        monitor = StabilityMonitor(sample_every_n_steps=1, observe_only=True, verbose=False) if with_monitor else None
        fit(module, token_loader(seed=3), monitor, max_steps=6)
        return [p.detach().clone() for p in module.parameters()]

    plain, watched = run(False), run(True)
    assert all(torch.equal(a, b) for a, b in zip(plain, watched))


def test_nothing_is_installed_on_steps_that_are_not_sampled():
    seen = []

    from torch.nn.modules import module as module_state

    class Spy(TinyLM):
        def training_step(self, batch, batch_idx):
            modes = torch.overrides._get_current_function_mode_stack()
            hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in self.modules())
            hooks += len(module_state._global_forward_pre_hooks) + len(module_state._global_forward_hooks)
            seen.append((self.global_step, len(modes), hooks, stabmon.probes.capture.active_capture() is not None))
            return super().training_step(batch, batch_idx)

    monitor = StabilityMonitor(sample_every_n_steps=3, sharpness_every_n_steps=None, verbose=False)
    fit(Spy(), token_loader(), monitor, max_steps=6)
    for step, modes, hooks, active in seen:
        if step % 3 and step not in (1, 2):  # 1 and 2: the early samples before the first period
            assert (modes, hooks, active) == (0, 0, False), step
        else:
            assert modes == 1 and hooks > 0 and active, step


def test_model_without_attention_or_cross_entropy_trains_and_reports_once():
    logger = RecordingLogger()
    with pytest.warns(StabmonWarning) as record:
        fit(TinyMLP(), regression_loader(), StabilityMonitor(sample_every_n_steps=2), logger=logger, max_steps=6)
    messages = [str(w.message) for w in record if issubclass(w.category, StabmonWarning)]
    assert sum("scaled_dot_product_attention" in m for m in messages) == 1
    assert sum("cross_entropy" in m for m in messages) == 1
    logged = set().union(*logger.by_step.values())
    assert "stabmon-gradients/norm" in logged and not any("attention" in k for k in logged)


def test_partly_frozen_model_and_missing_gradients():
    # net[0] frozen; a callback before the monitor drops every gradient: reported once, no crash.
    module = TinyMLP()
    module.net[0].requires_grad_(False)
    monitor = StabilityMonitor(sample_every_n_steps=2, verbose=False, attention=False, logits=False)
    with pytest.warns(StabmonWarning, match="no trainable parameter had a gradient") as record:
        trainer = quiet_trainer(max_steps=4, callbacks=[_DropGrads(), monitor])
        trainer.fit(module, regression_loader())
    assert sum("gradient" in str(w.message) for w in record) == 1
    assert monitor.core.reader.gradients.names == ["net.2.weight", "net.2.bias"]


class _DropGrads(pl.Callback):
    """Clears gradients before the optimizer step: the monitor must cope with none."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        for p in pl_module.parameters():
            p.grad = None


class NaNAtStep3(TinyMLP):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step == 3 else loss


def test_nan_loss_observed_only_is_counted_and_training_does_not_crash():
    logger = RecordingLogger()
    monitor = StabilityMonitor(sample_every_n_steps=100, log_every_n_steps=4, observe_only=True, verbose=False)
    fit(NaNAtStep3(), regression_loader(), monitor, logger=logger, max_steps=8)
    # the NaN gradient of step 3 makes the weights NaN, so every later step is non-finite too;
    # emissions at 0, 1, 2, 4 (sampled) and 3, 7 (log steps)
    assert logger.by_step[3]["stabmon-loss/nonfinite_steps"] == 1
    assert logger.by_step[3]["stabmon-gradients/nonfinite_steps"] == 1
    assert "stabmon-loss/mean" not in logger.by_step[3]  # no finite step in the interval: left out, not NaN
    assert math.isfinite(logger.by_step[2]["stabmon-loss/mean"])
    assert logger.by_step[7]["stabmon-loss/nonfinite_steps"] == 3  # steps 5-7
    assert [f.step for f in monitor.findings if f.severity == "critical"][:2] == [3, 3]
    assert monitor.actions_taken == []


def test_nan_loss_step_is_skipped_and_training_goes_on():
    module = NaNAtStep3()
    monitor = StabilityMonitor(sample_every_n_steps=100, log_every_n_steps=4, verbose=False)
    logger = RecordingLogger()
    fit(module, regression_loader(), monitor, logger=logger, max_steps=8)
    assert [(a.step, a.name) for a in monitor.actions_taken] == [(3, "skip_step")]
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert logger.by_step[7]["stabmon-loss/nonfinite_steps"] == 0 and math.isfinite(logger.by_step[7]["stabmon-loss/mean"])


def test_gradient_accumulation_samples_once_per_optimizer_step():
    logger = RecordingLogger()
    fit(TinyLM(), token_loader(), StabilityMonitor(sample_every_n_steps=2, log_every_n_steps=2, verbose=False),
        logger=logger, max_steps=4, accumulate_grad_batches=2)
    assert {s for s, m in logger.by_step.items() if stabmon_keys(m)} == {0, 1, 2, 3}
    assert "stabmon-attention/entropy_min" in logger.by_step[2]


class _LossSpyMLP(TinyMLP):
    def __init__(self):
        super().__init__()
        self.step_losses = {}  # optimizer step -> what training_step returned for each micro-batch

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.step_losses.setdefault(self.global_step, []).append(loss.item())
        return loss


class _AmpReference(pl.Callback):
    """What the monitor should see under fp16 AMP, computed from the run itself: the gradient
    norm once Lightning has unscaled the gradients, and the scale before and after the
    scaler's update()."""

    def __init__(self):
        self.norms, self.scales = {}, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step - 1 in self.scales and len(self.scales[trainer.global_step - 1]) == 1:
            self.scales[trainer.global_step - 1].append(trainer.precision_plugin.scaler.get_scale())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad.double() for p in pl_module.parameters() if p.grad is not None]
        self.norms[trainer.global_step] = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()
        self.scales[trainer.global_step] = [trainer.precision_plugin.scaler.get_scale()]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_under_fp16_amp_the_loss_and_gradients_are_unscaled_and_overflows_are_not_findings(device):
    """Lightning multiplies the loss by the GradScaler's scale (and divides it for accumulation)
    before ``on_before_backward``; fp16 overflow steps are the scaler's to skip."""
    from pytorch_lightning.plugins.precision import MixedPrecision

    pl.seed_everything(0)
    reference, logger = _AmpReference(), RecordingLogger()
    monitor = StabilityMonitor(sample_every_n_steps=100, log_every_n_steps=1, sharpness_every_n_steps=None,
                               verbose=False, strict=True)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**24)  # high: fp16 gradients overflow for the first steps
    module = _LossSpyMLP()
    fit(module, regression_loader(n=256), monitor, max_steps=24, logger=logger, accumulate_grad_batches=2,
        plugins=[MixedPrecision("16-mixed", device, scaler=scaler)], callbacks=[reference],
        accelerator="gpu" if device == "cuda" else "cpu")
    overflowed = {step: after < before for step, (before, after) in reference.scales.items()}
    assert 2 <= sum(overflowed.values()) < 20
    assert monitor.findings == [] and monitor.actions_taken == []
    for step, metrics in logger.by_step.items():
        assert metrics["stabmon-loss/last"] == pytest.approx(sum(module.step_losses[step]) / 2, rel=1e-6)
        assert metrics["stabmon-gradients/loss_scale"] == reference.scales[step][0]
        assert metrics["stabmon-gradients/overflow_steps"] == float(overflowed[step])
        if not overflowed[step]:
            assert metrics["stabmon-gradients/norm"] == pytest.approx(reference.norms[step], rel=1e-5)


def test_a_failing_probe_is_disabled_and_training_goes_on(monkeypatch):
    import stabmon.probes.attention as attention_module

    def broken(*args, **kwargs):
        raise RuntimeError("kernel bug")

    monkeypatch.setattr(attention_module, "attention_stats", broken)
    logger = RecordingLogger()
    module = TinyLM()
    with pytest.warns(StabmonWarning, match="attention probe disabled.*kernel bug"):
        fit(module, token_loader(), StabilityMonitor(sample_every_n_steps=1, strict=False, verbose=False),
            logger=logger, max_steps=3)
    logged = set().union(*logger.by_step.values())
    assert "stabmon-logits/logz_mean" in logged and not any("attention" in k for k in logged)


def test_strict_mode_reraises(monkeypatch):
    import stabmon.probes.attention as attention_module

    monkeypatch.setattr(attention_module, "attention_stats", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        fit(TinyLM(), token_loader(), StabilityMonitor(sample_every_n_steps=1, strict=True, verbose=False), max_steps=1)


def test_works_next_to_stock_callbacks_and_csv_logger(tmp_path):
    logger = CSVLogger(tmp_path)
    trainer = fit(
        TinyLM(), token_loader(), StabilityMonitor(sample_every_n_steps=2, verbose=False), logger=logger, max_steps=4,
        callbacks=[ModelCheckpoint(dirpath=tmp_path, monitor="stabmon-gradients/norm", mode="min"),
                   LearningRateMonitor()],
        enable_checkpointing=True,
    )
    header = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "stabmon-attention/entropy_min/layer_00" in header and "lr-SGD" in header
    assert trainer.checkpoint_callback.best_model_path


class LoggingTinyLM(TinyLM):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss)
        return loss


def test_checkpoint_and_early_stopping_read_the_values_of_the_step_next_to_the_modules_own(tmp_path):
    """The values go into the dict behind ``trainer.callback_metrics`` at every emission: a
    per-step ModelCheckpoint sees the step's value, EarlyStopping stops on it, and the
    module's own ``self.log`` keys are there as well."""
    seen = []

    class Reader(pl.Callback):  # after the monitor in the callback list, as ModelCheckpoint is
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((monitor.latest_metrics["loss/last"], float(trainer.callback_metrics["stabmon-loss/last"])))

    monitor = StabilityMonitor(sample_every_n_steps=4, log_every_n_steps=1, verbose=False)
    stopper = EarlyStopping(monitor="stabmon-gradients/norm", stopping_threshold=1e9, check_on_train_epoch_end=True)
    trainer = fit(LoggingTinyLM(), token_loader(), monitor, max_steps=6, log_every_n_steps=1,
                  callbacks=[Reader(), stopper,
                             ModelCheckpoint(dirpath=tmp_path, monitor="stabmon-loss/last", every_n_train_steps=1)],
                  enable_checkpointing=True)
    assert len(seen) == 6 and all(a == pytest.approx(b) for a, b in seen)
    assert trainer.checkpoint_callback.best_model_score.item() == pytest.approx(min(a for a, _ in seen))
    assert trainer.should_stop and stopper.stopped_epoch == 0  # every norm is below 1e9: the threshold stops it
    assert "train_loss" in trainer.callback_metrics and "stabmon-gradients/norm" in trainer.callback_metrics


def test_the_monitor_clips_as_the_trainer_would():
    """``clip_grad_norm`` in place of the Trainer's ``gradient_clip_val``: the same parameters to
    the bit, and the Trainer warns nobody; with both set, one warning says to set one."""
    runs = {}
    for name, monitor_clip, trainer_clip in (("trainer", None, 0.05), ("monitor", 0.05, None), ("none", None, None)):
        pl.seed_everything(0)
        module = TinyLM(lr=0.5)
        fit(module, token_loader(), StabilityMonitor(sample_every_n_steps=3, clip_grad_norm=monitor_clip, verbose=False),
            max_steps=5, gradient_clip_val=trainer_clip)
        runs[name] = [p.detach().clone() for p in module.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(runs["trainer"], runs["monitor"]))
    assert not all(torch.equal(a, b) for a, b in zip(runs["trainer"], runs["none"]))  # the clip mattered
    with pytest.warns(UserWarning, match="clip the gradients; the Trainer's then reads them all again"):
        fit(TinyLM(), token_loader(), StabilityMonitor(clip_grad_norm=1.0, verbose=False), max_steps=1,
            gradient_clip_val=1.0)


def test_state_dict_round_trip(tmp_path):
    monitor = StabilityMonitor(sample_every_n_steps=2, verbose=False)
    fit(TinyLM(), token_loader(), monitor, max_steps=4)
    state = monitor.state_dict()
    path = tmp_path / "state.pt"
    torch.save(state, path)
    loaded = torch.load(path, weights_only=True)
    fresh = StabilityMonitor(sample_every_n_steps=2, verbose=False)
    fresh.load_state_dict(loaded)
    assert fresh.state_dict() == state  # before setup: kept until the fit starts
    fit(TinyLM(), token_loader(), fresh, max_steps=2)
    assert fresh.core.run_summary.first_step == 0 and fresh.core.run_summary.extremes.keys() >= state["summary"]["extremes"].keys()


def test_every_hook_is_a_real_callback_hook():
    names = [n for n in vars(StabilityMonitor) if n.startswith("on_") or n in ("setup", "teardown")]
    assert names and all(hasattr(pl.Callback, n) for n in names)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"sample_every_n_steps": 0}, r"`sample_every_n_steps` must be a positive int, got 0"),
        ({"sample_every_n_steps": 2.5}, r"`sample_every_n_steps` must be a positive int, got 2.5"),
        ({"log_every_n_steps": -1}, r"`log_every_n_steps` must be a positive int or None, got -1"),
        ({"observe_only": "yes"}, r"`observe_only` must be True or False, got 'yes'"),
        ({"attention": 1}, r"`attention` must be True or False, got 1"),
        ({"log_key_prefix": 3}, r"`log_key_prefix` must be a str, got 3"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StabilityMonitor(**kwargs)


def test_unknown_argument_is_rejected():
    with pytest.raises(TypeError, match="sample_every"):
        StabilityMonitor(sample_every=3)


def test_no_warning_on_a_transformer():
    with warnings.catch_warnings():
        warnings.simplefilter("error", StabmonWarning)
        fit(TinyLM(), token_loader(), StabilityMonitor(sample_every_n_steps=2, verbose=False), max_steps=3)
