"""The monitor acting on real fits: skip, rollback, stop, LR scaling, resume, DDP agreement."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from stabmon import DetectionConfig, InterventionConfig, StabilityMonitor
from tests.helpers import Faulty, TinyLM, quiet_trainer, token_loader

FAST = dict(sample_every_n_steps=10, sharpness_every_n_steps=None, verbose=False,
            detection=DetectionConfig(spike_warmup=10))


def test_critical_spike_skips_exactly_that_step():
    module = Faulty({20: 1000.0})
    monitor = StabilityMonitor(**FAST)
    quiet_trainer(max_steps=25, callbacks=[monitor]).fit(module, token_loader(n=400))
    assert [(a.step, a.name) for a in monitor.actions_taken] == [(20, "skip_step")]
    crit = [f for f in monitor.findings if f.severity == "critical"]
    assert crit[0].step == 20 and crit[0].signal in ("loss/last", "gradients/norm")


def test_repeated_critical_findings_roll_back_and_skip_batches():
    module = Faulty({21: float("nan"), 22: float("nan")})
    snapshots = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 21:  # after step 20: the snapshot of step 20 holds these weights
                snapshots.append([p.detach().clone() for p in pl_module.parameters()])

    cfg = InterventionConfig(snapshot_every_n_steps=10, skip_batches=3)
    monitor = StabilityMonitor(intervention=cfg, **FAST)
    quiet_trainer(max_steps=27, callbacks=[monitor, Spy()]).fit(module, token_loader(n=400))
    names = [(a.step, a.name) for a in monitor.actions_taken]
    assert names == [(21, "skip_step"), (22, "rollback"), (22, "lr_cut")]  # the rollback halves the LR for good
    assert "rollback 1/3" in monitor.actions_taken[1].detail
    assert monitor.core.responder.snapshots.step == 20
    # steps 22 (the rollback) and 23-25 (skipped batches) left the weights at the snapshot
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_stop_saves_a_checkpoint_and_ends_the_fit(tmp_path, capsys):
    module = Faulty({15: float("nan"), 16: float("nan")})
    monitor = StabilityMonitor(intervention=InterventionConfig(max_rollbacks=0, snapshot_every_n_steps=5), **FAST)
    trainer = quiet_trainer(max_steps=40, callbacks=[monitor], default_root_dir=tmp_path)
    trainer.fit(module, token_loader(n=400))
    assert [a.name for a in monitor.actions_taken] == ["skip_step", "stop"]
    assert trainer.global_step == 17
    assert Path(monitor.stop_checkpoint).exists()
    assert "stabmon: stopping the run at step 17" in capsys.readouterr().out


def test_observe_only_detects_but_never_acts():
    module = Faulty({20: 1000.0})
    monitor = StabilityMonitor(observe_only=True, **FAST)
    quiet_trainer(max_steps=22, callbacks=[monitor]).fit(module, token_loader(n=400))
    assert monitor.actions_taken == [] and any(f.step == 20 for f in monitor.findings)


def test_scale_lr_is_applied_around_the_step_and_the_schedule_resumes(tmp_path):
    used, scheduled = [], []

    class RecordingSGD(torch.optim.SGD):
        # Lightning runs the closure (forward, backward, on_before_optimizer_step) inside
        # step(): the LR the update uses is the one in place after the closure.
        def step(self, closure=None):
            loss = closure() if closure is not None else None
            used.append(self.param_groups[0]["lr"])
            super().step()
            return loss

    class Module(TinyLM):
        def configure_optimizers(self):
            opt = RecordingSGD(self.parameters(), lr=0.1)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    class Recorder(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            scheduled.append(trainer.optimizers[0].param_groups[0]["lr"])

    monitor = StabilityMonitor(intervention=InterventionConfig(lr_factor=0.5, lr_hold=2, lr_recover=2), **FAST)

    class Warn(pl.Callback):  # a warning at step 5, as a detector would raise it
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 5:
                from stabmon.detectors import Finding

                monitor.core.respond([Finding(5, "x", "warning", 2.0, 1.0, "forced", "test")], optimizer)

    quiet_trainer(max_steps=10, callbacks=[Warn(), monitor, Recorder()]).fit(Module(), token_loader())
    factors = [u / s for u, s in zip(used, scheduled)]
    assert [round(f, 6) for f in factors] == [1, 1, 1, 1, 1, 0.5, 0.5, 0.5, 0.75, 1]
    assert [round(s, 8) for s in scheduled] == [round(0.1 * 0.9**i, 8) for i in range(10)]  # schedule untouched
    assert [a.name for a in monitor.actions_taken] == ["scale_lr"]


def test_resume_mid_intervention_continues_it(tmp_path):
    monitor = StabilityMonitor(intervention=InterventionConfig(lr_hold=20, lr_recover=20), **FAST)
    trainer = quiet_trainer(max_steps=10, callbacks=[monitor], default_root_dir=tmp_path)
    module = TinyLM()
    trainer.fit(module, token_loader(n=400))
    monitor.core.responder.lr_control.scale(8, 0.5, hold=20, recover=20)
    ckpt = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)["callbacks"][monitor.state_key]
    assert state["lr_control"]["scale"][0] == 0.5
    resumed = StabilityMonitor(intervention=InterventionConfig(lr_hold=20, lr_recover=20), **FAST)
    trainer2 = quiet_trainer(max_steps=14, callbacks=[resumed], default_root_dir=tmp_path)
    trainer2.fit(TinyLM(), token_loader(n=400), ckpt_path=ckpt)
    assert resumed.core.responder.lr_control.factor(13) == 0.5  # still held: 8 + 20 > 13
    assert resumed.core.detectors.per_step[1].state_dict()["history"][:5] == \
        monitor.core.detectors.per_step[1].state_dict()["history"][:5]


@pytest.mark.ddp
@pytest.mark.parametrize("namespace, fp16", [("pytorch_lightning", False), ("lightning.pytorch", False),
                                             ("pytorch_lightning", True)], ids=["pl", "lightning", "pl-fp16"])
def test_every_rank_takes_the_same_action_under_ddp(tmp_path, namespace, fp16):
    pytest.importorskip(namespace)
    env = {**os.environ, "STABMON_STRICT": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("LOCAL_RANK", None)
    script = Path(__file__).with_name("ddp_run.py")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), namespace, *(["fp16"] if fp16 else [])],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    if fp16:  # the scaler's overflow steps: the same on both ranks, none of them a finding
        assert ranks[0]["overflow_steps"] == ranks[1]["overflow_steps"] > 0
        assert ranks[0]["loss_scale"] == ranks[1]["loss_scale"] < 2.0**24
    assert ranks[0]["actions"] == ranks[1]["actions"]
    assert [a["name"] for a in ranks[0]["actions"]] == ["skip_step"] and ranks[0]["actions"][0]["step"] == 25
    assert ranks[0]["findings"] == ranks[1]["findings"]
    assert ranks[0]["weights"] == ranks[1]["weights"]  # replicas stayed identical
    assert ranks[0]["sharpness"] == ranks[1]["sharpness"] and math.isfinite(ranks[0]["sharpness"])


@pytest.mark.ddp
@pytest.mark.slow
def test_a_compiled_model_under_ddp_compiles_no_extra_graph(tmp_path):
    env = {**os.environ, "STABMON_STRICT": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("LOCAL_RANK", None)
    script = Path(__file__).with_name("ddp_compile.py")
    for mode in ("plain", "monitor"):
        proc = subprocess.run([sys.executable, str(script), str(tmp_path), mode], env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    plain = [json.loads((tmp_path / f"plain{r}.json").read_text()) for r in (0, 1)]
    watched = [json.loads((tmp_path / f"monitor{r}.json").read_text()) for r in (0, 1)]
    assert [r["graphs"] for r in watched] == [r["graphs"] for r in plain]
    for r in watched:
        assert {"attention/max_logit", "logits/logz_mean", "gradients/norm", "sharpness/top_eigenvalue"} <= set(
            r["metrics"])
