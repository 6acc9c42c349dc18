"""Fault isolation: each stage of the monitor fails alone in a real fit, and everything else keeps
measuring, emitting, detecting, acting and alerting (a fault while acting never switches off
measuring, detecting, logging or alerting)."""

import math
import tempfile

import pytest
import pytorch_lightning as pl
import torch
import wandb

import stabmon.alerts.base as alerts_base
import stabmon.detectors as detectors_module
import stabmon.forensics as forensics_module
import stabmon.interventions.lr as lr_module
import stabmon.interventions.policy as policy_module
import stabmon.interventions.qk_clip as qk_clip_module
import stabmon.interventions.responder as responder_module
import stabmon.interventions.snapshot as snapshot_module
import stabmon.probes.attention as attention_module
import stabmon.probes.capture as capture_module
import stabmon.probes.gradients as gradients_module
import stabmon.probes.logits as logits_module
import stabmon.probes.sharpness as sharpness_module
import stabmon.probes.step as step_module
import stabmon.signals as signals_module
import stabmon.sinks.wandb as wandb_module
from stabmon import DetectionConfig, InterventionConfig, MonitorCore, StabilityMonitor, StabmonWarning
from stabmon._failsoft import FailSoft
from stabmon.alerts import AlertChannel
from tests.callbacks.test_stability_monitor import RecordingLogger
from tests.helpers import Faulty, TinyTransformer, monitored_step, quiet_trainer, token_loader

FAULT_FROM = 12  # the injected fault fires on every call from this step on
SPIKE, NAN = 40, (45, 46)  # a critical spike (skip), then NaN losses: the second critical in the window rolls back

# stage -> (module, class or None, function name) that raises once the fault is armed
INJECTIONS = {
    "capture": (capture_module, "ForwardCapture", "attach"),
    "attention probe": (attention_module, "AttentionProbe", "observe"),
    "logit probe": (logits_module, "LogitProbe", "observe"),
    "sharpness probe": (sharpness_module, "SharpnessProbe", "measure"),
    "gradient probe": (gradients_module, "GradientProbe", "observe"),
    "step read": (gradients_module, "GradientProbe", "record_host_squares"),
    "step signals": (step_module, "StepReader", "signals"),
    "signals": (signals_module, "SignalSet", "reduce"),
    "detection": (detectors_module, "DetectorSet", "on_step"),
    "policy": (policy_module, "EscalationPolicy", "decide"),
    "forensics": (forensics_module, "Forensics", "investigate"),
    "qk-clip": (qk_clip_module, "QKClipper", "apply"),
    "lr control": (lr_module, "LRController", "active"),
    "skip step": (responder_module, "Responder", "skip_optimizer_step"),
    "rollback": (snapshot_module, "Snapshotter", "restore"),
    "snapshot": (snapshot_module, "Snapshotter", "take"),
    "sinks": (None, "RecordingLogger", "log_metrics"),
    "alerts": (alerts_base, "AlertDispatcher", "dispatch"),
    "wandb": (wandb_module, "WandbExtras", "record"),
}


class Collect(AlertChannel):
    def __init__(self):
        self.sent = []

    def send(self, alert):
        self.sent.append(alert)


class StubRun:
    """Enough of a wandb run for WandbExtras (offline, nothing leaves the process)."""

    name = "stub"

    def __init__(self):
        self.logged = []

    def define_metric(self, *args, **kwargs):
        pass

    def log(self, data):
        self.logged.append(data)


def inject(monkeypatch, stage, clock):
    module, owner, name = INJECTIONS[stage]
    cls = RecordingLogger if module is None else getattr(module, owner)
    original = getattr(cls, name)

    def faulty(*args, **kwargs):
        if clock["step"] >= FAULT_FROM:
            clock["fired"] += 1
            raise RuntimeError(f"injected fault in {stage}")
        return original(*args, **kwargs)

    monkeypatch.setattr(cls, name, faulty)


def run(monkeypatch, stage):
    pl.seed_everything(0)
    faults = {SPIKE: 1000.0, NAN[0]: math.nan, NAN[1]: math.nan}
    module = Faulty(faults, lr=0.05)
    clock = {"step": 0, "fired": 0}
    if stage is not None:
        inject(monkeypatch, stage, clock)
    alerts = Collect()
    monitor = StabilityMonitor(
        sample_every_n_steps=5, log_every_n_steps=5, sharpness_every_n_steps=10, strict=False, verbose=False,
        alerts=[alerts], detection=DetectionConfig(spike_warmup=10, spike_window=30),
        intervention=InterventionConfig(qk_clip_tau=1.0, snapshot_every_n_steps=5, cooldown=3, skip_batches=2,
                                        grace_steps=3, lr_hold=5, lr_recover=5))
    logger = RecordingLogger()

    class StepClock(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            clock["step"] = trainer.global_step

    monkeypatch.setattr(wandb, "run", StubRun())  # an active run: the monitor adds its W&B extras to it
    trainer = quiet_trainer(max_steps=60, callbacks=[StepClock(), monitor], logger=logger, log_every_n_steps=5,
                            default_root_dir=tempfile.mkdtemp())  # a stop writes its checkpoint there
    trainer.fit(module, token_loader(n=1000))
    return monitor, logger, alerts, clock


@pytest.fixture(scope="module")
def healthy():
    mp = pytest.MonkeyPatch()
    try:
        return run(mp, None)
    finally:
        mp.undo()


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(INJECTIONS))
def test_a_stage_that_fails_alone_leaves_the_others_working(monkeypatch, stage, healthy):
    with pytest.warns(StabmonWarning, match=f"{stage} disabled after an error.*injected fault"):
        monitor, logger, alerts, clock = run(monkeypatch, stage)
    assert clock["fired"] >= 1, "the injected fault never fired"
    assert set(monitor.core.guard.disabled) == {stage}

    # every emission after the fault (but those whose interval held only a NaN loss: no mean is defined)
    after = {step: keys for step, keys in logger.by_step.items() if step > FAULT_FROM + 5 and step not in NAN}
    if stage != "sinks":
        assert after, "nothing was emitted after the fault"
        for step, keys in after.items():  # (where nothing skipped the NaN steps, the losses after are NaN)
            if stage not in ("signals", "step signals"):
                assert "stabmon-loss/nonfinite_steps" in keys, (step, sorted(keys))
            if stage not in ("signals", "step signals", "gradient probe"):
                assert "stabmon-gradients/nonfinite_steps" in keys, (step, sorted(keys))
            assert "stabmon-findings/critical" in keys and "stabmon-actions/lr_factor" in keys
        sampled = [keys for step, keys in after.items() if step % 5 == 0]
        if stage not in ("capture", "attention probe", "signals"):
            assert all("stabmon-attention/max_logit" in keys for keys in sampled)
        if stage not in ("capture", "logit probe", "signals"):
            assert all("stabmon-logits/nonfinite" in keys for keys in sampled)

    detected = stage not in ("detection", "step read")  # the per-step detectors see the step's read
    found = {(f.step, f.severity) for f in monitor.findings}
    assert ((SPIKE, "critical") in found) == detected
    assert ((NAN[0], "critical") in found) == detected
    alerted = {a.step for a in alerts.sent}
    assert (SPIKE in alerted) == (detected and stage != "alerts")

    acted = {(a.step, a.name) for a in monitor.actions_taken}
    if detected and stage not in ("policy", "skip step"):
        assert (SPIKE, "skip_step") in acted
    if detected and stage not in ("policy", "rollback", "snapshot", "skip step"):
        assert (NAN[0], "rollback") in acted
    if stage == "rollback":  # the rollback failed: the step is still skipped, and said so
        assert any(a.step == NAN[0] and a.name == "skip_step" and "rollback failed" in a.detail
                   for a in monitor.actions_taken)
    if stage == "snapshot":  # no snapshot is trusted any more: skips instead of a rollback
        assert (NAN[0], "skip_step") in acted
    if stage != "qk-clip":
        assert monitor.core.responder.qk_clip.armed  # tau = 1: armed in the first steps


def test_the_healthy_run_finds_acts_and_alerts(healthy):
    monitor, logger, alerts, _ = healthy
    assert not monitor.core.guard.disabled
    acted = {(a.step, a.name) for a in monitor.actions_taken}
    assert {(SPIKE, "skip_step"), (NAN[0], "rollback")} <= acted
    assert SPIKE in {a.step for a in alerts.sent}  # (the NaN at 45 is the same signal and severity: not sent again)


def test_a_rollback_whose_snapshot_files_are_gone_leaves_detection_on(tmp_path):
    """The plain loop of the issue: NaN losses at steps 200-215 and the snapshot files removed
    from ``snapshot_dir`` before the rollback. The rollback is switched off before any rank
    decides on it; the bad steps are skipped; findings and every emission go on."""
    torch.manual_seed(0)
    model = TinyTransformer()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    core = MonitorCore(model, sample_every_n_steps=50, log_every_n_steps=10, strict=False,
                       intervention=InterventionConfig(snapshot_dir=str(tmp_path / "snap"), qk_clip_tau=None))
    gen = torch.Generator().manual_seed(0)
    emitted = {}
    with pytest.warns(StabmonWarning, match="rollback disabled.*can no longer be read"):
        for step in range(400):
            if step == 199:
                for file in (tmp_path / "snap").iterdir():
                    file.unlink()
            tokens = torch.randint(32, (4, 9), generator=gen)
            poisoned = 200 <= step <= 215 or step == 330

            def loss_of_batch():
                loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).reshape(-1, 32),
                                                         tokens[:, 1:].reshape(-1))
                return loss * math.nan if poisoned else loss

            metrics = monitored_step(core, step, loss_of_batch, opt)
            if metrics:
                emitted[step] = metrics
    assert set(core.guard.disabled) == {"rollback"}
    assert all(p.isfinite().all() for p in model.parameters())  # every NaN step was skipped
    skipped = {a.step for a in core.actions_taken if a.name == "skip_step"}
    assert set(range(200, 216)) <= skipped and 330 in skipped
    assert any(f.step == 330 and f.severity == "critical" for f in core.findings)  # detection still on
    for step in range(229, 400, 10):
        assert {"loss/mean", "gradients/norm_max"} <= set(emitted[step]), step


def test_a_failure_on_one_rank_waits_for_the_reduction():
    synced = FailSoft(synced=lambda: True)
    synced.run("sharpness probe", lambda: 1 / 0)
    assert synced.off("sharpness probe") and "sharpness probe" not in synced.disabled
    assert synced.run("sharpness probe", lambda: 1, agreed=True) == 1  # agreed work goes on until settled
    flags = synced.flags()
    assert flags.tolist().count(1.0) == 1
    other_rank = FailSoft(synced=lambda: True)
    assert other_rank.settle(flags.tolist(), step=5) == ["sharpness probe"]  # the same list on every rank
    assert synced.settle(flags.tolist(), step=5) == ["sharpness probe"]
    assert other_rank.disabled.keys() == synced.disabled.keys() == {"sharpness probe"}
    with pytest.raises(ValueError, match="unknown stage"):
        synced.fail("no such stage", "why")
