"""The monitor inside a real transformers.Trainer on CPU: its keys in log_history and W&B, a
spike acted on at its step, a clean stop on NaN, resume from a checkpoint, and a clear
ImportError without transformers."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from stabmon import DetectionConfig, InterventionConfig  # noqa: E402
from stabmon.integrations.transformers import StabilityMonitorCallback  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FAST = dict(sample_every_n_steps=5, sharpness_every_n_steps=None, verbose=False,
            detection=DetectionConfig(spike_warmup=8, spike_window=50))


class SpikyLlama(transformers.LlamaForCausalLM):
    """Multiplies the training loss at the given optimizer steps (NaN or a large factor)."""

    faults: dict[int, float] = {}
    step = 0

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        if self.training and SpikyLlama.step in self.faults and out.loss is not None:
            out.loss = out.loss * self.faults[SpikyLlama.step]
        return out


class StepCounter(transformers.TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        SpikyLlama.step = state.global_step


def tiny_llama(faults=None, attn="sdpa"):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    config._attn_implementation = attn
    SpikyLlama.faults = dict(faults or {})
    return SpikyLlama(config)


def dataset(n=400, seq=16):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(64, (n, seq), generator=gen)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def train(tmp_path, monitor, steps=20, model=None, resume=None, grad_scaler=None, **args):
    defaults = dict(per_device_train_batch_size=8, max_steps=steps, logging_steps=5, report_to=[],
                    save_strategy="no", learning_rate=1e-3, use_cpu=True, disable_tqdm=True, seed=0,
                    dataloader_num_workers=0, remove_unused_columns=False)
    defaults.update(args)
    trainer = transformers.Trainer(model=model or tiny_llama(), args=transformers.TrainingArguments(
        str(tmp_path / "out"), **defaults), train_dataset=dataset(),
        callbacks=[c for c in (monitor, StepCounter()) if c is not None])
    if grad_scaler is not None:  # fp16 AMP as accelerate runs it on a GPU (on a CPU it makes no scaler)
        trainer.accelerator.native_amp, trainer.accelerator.scaler = True, grad_scaler
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_metrics_reach_log_history_under_the_lightning_keys(tmp_path):
    monitor = StabilityMonitorCallback(**FAST)
    trainer = train(tmp_path, monitor)
    ours = [e for e in trainer.state.log_history if any(k.startswith("stabmon-") for k in e)]
    assert [e["step"] for e in ours] == [5, 10, 15, 20]  # at logging_steps
    keys = set().union(*ours)
    for key in ("stabmon-attention/entropy_min/layer_00", "stabmon-attention/max_logit", "stabmon-logits/logz_mean",
                "stabmon-gradients/norm", "stabmon-gradients/norm/model_layers_1", "stabmon-loss/mean"):
        assert key in keys, key
    hf = [e for e in trainer.state.log_history if "loss" in e and "train_loss" not in e]
    assert [e["step"] for e in hf] == [5, 10, 15, 20]  # the Trainer's own entries are all still there
    # the losses stabmon saw are the model's training losses
    assert abs(ours[-1]["stabmon-loss/mean"] - hf[-1]["loss"]) < 0.05
    # gradients read before the Trainer clipped them (max_grad_norm 1.0): the same pre-clip norm
    assert ours[-1]["stabmon-gradients/norm"] == pytest.approx(hf[-1]["grad_norm"], rel=1e-4)


def test_a_loss_spike_is_found_and_acted_on_at_its_step(tmp_path):
    monitor = StabilityMonitorCallback(**FAST)
    train(tmp_path, monitor, model=tiny_llama({12: 1000.0}))
    assert [(a.step, a.name) for a in monitor.actions_taken] == [(12, "skip_step")]
    assert any(f.step == 12 and f.severity == "critical" and f.signal == "loss/last" for f in monitor.findings)


def _grad_norms_and_weights(trainer):
    norms = {h["step"]: h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h}
    return norms, [p.detach().clone() for p in trainer.model.parameters()]


@pytest.mark.parametrize("max_grad_norm", [0.05, 0.0], ids=["clipping", "not-clipping"])
def test_the_trainers_gradient_norm_comes_from_the_monitors_read(tmp_path, monkeypatch, max_grad_norm):
    """The Trainer's clip (or, with nothing to clip, its ``_get_grad_norm``) reads every gradient
    right where the monitor does: the monitor's one read serves both, and the run is the run
    without the monitor to the bit (float32; observe_only, so that nothing else differs)."""
    import accelerate

    calls = []
    real_clip = accelerate.Accelerator.clip_grad_norm_
    monkeypatch.setattr(accelerate.Accelerator, "clip_grad_norm_",
                        lambda self, *a, **k: calls.append(1) or real_clip(self, *a, **k))
    plain = train(tmp_path / "plain", None, steps=12, logging_steps=1, max_grad_norm=max_grad_norm)
    assert len(calls) == 12
    watched = train(tmp_path / "watched", StabilityMonitorCallback(**{**FAST, "observe_only": True, "strict": True}),
                    steps=12, logging_steps=1, max_grad_norm=max_grad_norm)
    assert len(calls) == 12  # the watched run never called accelerate's clip_grad_norm_
    (plain_norms, plain_weights), (norms, weights) = map(_grad_norms_and_weights, (plain, watched))
    assert plain_norms.keys() == norms.keys() and len(norms) == 12
    for step, norm in plain_norms.items():
        assert norms[step] == pytest.approx(norm, rel=1e-6)
    if max_grad_norm:
        assert max(plain_norms.values()) > 2 * max_grad_norm  # every step was clipped
    assert all(torch.equal(a, b) for a, b in zip(plain_weights, weights))


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0], ids=["clipping", "not-clipping"])
def test_a_failing_gradient_probe_leaves_the_trainers_gradient_norm_and_an_fp16_run_alone(
        tmp_path, monkeypatch, max_grad_norm):
    """With the monitor's read gone (its gradient probe disabled by a fault) the Trainer still
    gets its norm and its clip; under fp16 the gradients must not be unscaled twice."""
    import stabmon.probes.gradients as gradients_module

    fp16 = dict(steps=4, logging_steps=1, fp16=True, max_grad_norm=max_grad_norm)
    plain = train(tmp_path / "plain", None, grad_scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8), **fp16)

    def broken(self, scale=None):
        raise RuntimeError("probe bug")

    monkeypatch.setattr(gradients_module.GradientProbe, "observe", broken)
    monitor = StabilityMonitorCallback(**{**FAST, "strict": False, "observe_only": True})
    with pytest.warns(UserWarning, match="gradient probe disabled"):
        watched = train(tmp_path / "watched", monitor, grad_scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8),
                        **fp16)
    (plain_norms, plain_weights), (norms, weights) = map(_grad_norms_and_weights, (plain, watched))
    assert len(norms) == 4 and all(math.isfinite(v) for v in norms.values())
    assert norms == pytest.approx(plain_norms, rel=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(plain_weights, weights))


def test_a_trainer_subclass_that_clips_its_own_way_keeps_its_clip(tmp_path):
    calls = []

    class OwnClip(transformers.Trainer):
        def _clip_grad_norm(self, model):
            calls.append(self.state.global_step)
            return super()._clip_grad_norm(model)

    monitor = StabilityMonitorCallback(**FAST)
    args = transformers.TrainingArguments(str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=3,
                                          report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                                          remove_unused_columns=False, dataloader_num_workers=0)
    OwnClip(model=tiny_llama(), args=args, train_dataset=dataset(), callbacks=[monitor]).train()
    assert calls == [0, 1, 2] and "gradients/norm" in monitor.latest_metrics


def test_under_fp16_the_gradients_are_read_unscaled_and_overflows_are_not_findings(tmp_path):
    """Under fp16 AMP the monitor unscales before it reads, as accelerate's clip does: its norms
    and the run are those of the run without the monitor; overflow steps are not findings."""
    fp16 = dict(steps=16, logging_steps=1, fp16=True)
    plain = train(tmp_path / "plain", None, grad_scaler=torch.amp.GradScaler("cpu", init_scale=2.0**24), **fp16)
    monitor = StabilityMonitorCallback(**{**FAST, "strict": True, "observe_only": True})
    trainer = train(tmp_path / "watched", monitor, grad_scaler=torch.amp.GradScaler("cpu", init_scale=2.0**24), **fp16)
    (hf, plain_weights), (_, weights) = map(_grad_norms_and_weights, (plain, trainer))
    assert all(torch.equal(a, b) for a, b in zip(plain_weights, weights))
    ours = {h["step"]: h for h in trainer.state.log_history if "stabmon-gradients/loss_scale" in h}
    overflows = [step for step, norm in hf.items() if not math.isfinite(norm)]
    assert 1 <= len(overflows) < 8 and set(ours) == set(hf)
    assert monitor.findings == [] and monitor.actions_taken == []
    assert sum(h["stabmon-gradients/overflow_steps"] for h in ours.values()) == len(overflows)
    for step, norm in hf.items():
        if step not in overflows:
            assert ours[step]["stabmon-gradients/norm"] == pytest.approx(norm, rel=1e-5)


@pytest.mark.gpu
def test_on_cuda_fp16_the_run_is_the_run_without_the_monitor(tmp_path):
    """accelerate's own GradScaler on a GPU: the monitor's take-over of the clip leaves the run
    bit-identical, and the scaler's overflow steps are not findings."""
    fp16 = dict(steps=16, logging_steps=1, fp16=True, use_cpu=False)
    plain = train(tmp_path / "plain", None, **fp16)
    monitor = StabilityMonitorCallback(**{**FAST, "strict": True, "observe_only": True})
    watched = train(tmp_path / "watched", monitor, **fp16)
    assert watched.accelerator.scaler is not None
    (_, plain_weights), (_, weights) = map(_grad_norms_and_weights, (plain, watched))
    assert all(torch.equal(a, b) for a, b in zip(plain_weights, weights))
    assert monitor.findings == [] and "gradients/loss_scale" in monitor.latest_metrics


def test_under_fp16_a_skipped_step_is_left_to_the_scaler(tmp_path):
    """Gradients set to None before accelerate's unscale would make the scaler's step raise."""
    monitor = StabilityMonitorCallback(**FAST)
    train(tmp_path, monitor, model=tiny_llama({12: 1000.0}), fp16=True,
          grad_scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8))
    assert [(a.step, a.name) for a in monitor.actions_taken] == [(12, "skip_step")]


def test_nan_loss_stops_cleanly_with_a_nonfinite_finding_and_a_checkpoint(tmp_path, capsys):
    monitor = StabilityMonitorCallback(intervention=InterventionConfig(max_rollbacks=0, snapshot_every_n_steps=5),
                                       **FAST)
    trainer = train(tmp_path, monitor, steps=40, model=tiny_llama({s: float("nan") for s in range(10, 40)}),
                    save_strategy="steps", save_steps=1000)
    assert [a.name for a in monitor.actions_taken] == ["skip_step", "stop"]
    assert trainer.state.global_step == 12  # step 11 made the stop
    assert any(f.detector == "nonfinite" for f in monitor.findings)
    ckpt = tmp_path / "out" / "checkpoint-12"
    assert ckpt.is_dir()  # the checkpoint of the stop
    assert "stabmon" in json.loads((ckpt / "trainer_state.json").read_text())["stateful_callbacks"]
    assert "stabmon: stopping the run at step 12" in capsys.readouterr().out


def test_resume_from_a_checkpoint_keeps_the_detector_state(tmp_path):
    first = StabilityMonitorCallback(**FAST)
    train(tmp_path, first, steps=10, save_strategy="steps", save_steps=10)
    saved = first.core.detectors.per_step[1].state_dict()["history"]
    assert len(saved) == 10
    resumed = StabilityMonitorCallback(**FAST)
    train(tmp_path, resumed, steps=14, save_strategy="no", resume=str(tmp_path / "out" / "checkpoint-10"))
    history = resumed.core.detectors.per_step[1].state_dict()["history"]
    assert history[:10] == saved and len(history) == 14
    assert resumed.core.run_summary.first_step == 0  # the run's summary goes on from the first part


def test_eager_attention_is_named_with_the_fix(tmp_path):
    monitor = StabilityMonitorCallback(**FAST, strict=False)
    with pytest.warns(UserWarning, match='attn_implementation="sdpa"'):
        train(tmp_path, monitor, steps=2, model=tiny_llama(attn="eager"))


def test_the_keys_reach_weights_and_biases(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
        (tmp_path / var.lower()).mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    import wandb

    from tests.sinks.test_wandb import read_records

    monitor = StabilityMonitorCallback(**FAST, wandb_heatmap_every_n_steps=5)
    train(tmp_path, monitor, steps=10, report_to=["wandb"])
    run_dir = Path(wandb.run.dir).parent if wandb.run is not None else None
    wandb.finish()
    run_dir = run_dir or next((tmp_path / "wandb_dir").rglob("offline-run-*"))
    history = [r["history"]["item"] for r in read_records(run_dir) if r["type"] == "history"]
    keys = {k.split(".")[0] for k in set().union(*history)}
    assert "train/stabmon-attention/max_logit" in keys and "train/stabmon-gradients/norm" in keys
    assert "stabmon-attention/entropy_heatmap" in keys  # the extras go straight to the run


def test_without_transformers_the_import_names_the_extra():
    code = ("import sys; sys.modules['transformers'] = None\n"
            "try:\n    import stabmon.integrations.transformers\nexcept ImportError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120).stdout
    assert "pip install 'stabmon[transformers]'" in out
    lean = subprocess.run([sys.executable, "-c", "import sys, stabmon, stabmon.integrations; "
                           "assert 'transformers' not in sys.modules"], cwd=ROOT, timeout=120)
    assert lean.returncode == 0


@pytest.mark.ddp
@pytest.mark.slow
def test_every_rank_takes_the_same_decision_under_torchrun(tmp_path):
    if shutil.which("torchrun") is None and not Path(sys.executable).exists():
        pytest.skip("no torchrun")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "STABMON_STRICT": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(Path(__file__).with_name("hf_ddp.py")), str(tmp_path)], capture_output=True,
                          text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["actions"] == ranks[1]["actions"] == [[12, "skip_step"]]
    assert ranks[0]["weights"] == ranks[1]["weights"]
