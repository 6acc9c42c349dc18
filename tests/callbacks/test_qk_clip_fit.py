"""QK-clip inside real fits: armed on a layer whose logits pass tau, clipped every step, off in
observe-only mode and with qk_clip_tau=None, resumed from a checkpoint, identical under DDP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from stabmon import DetectionConfig, InterventionConfig, StabilityMonitor
from tests.helpers import quiet_trainer, token_loader
from tests.interventions.attention_zoo import Stack, grow_logits


class ClipLM(pl.LightningModule):
    """A two-block LM whose attention logits start large (queries and keys scaled up)."""

    def __init__(self, family: str = "nanogpt_fused_c_attn", lr: float = 3e-3, grow: float = 30.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = Stack(family)
        if grow:
            grow_logits(self.model, grow)
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.model(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def monitor(tau=4.0, **kwargs):
    defaults = dict(sample_every_n_steps=5, log_every_n_steps=5, sharpness_every_n_steps=None, verbose=False,
                    detection=DetectionConfig(spike_warmup=50, spike_window=50),
                    intervention=InterventionConfig(qk_clip_tau=tau))
    defaults.update(kwargs)
    return StabilityMonitor(**defaults)


class Logged(pl.loggers.Logger):
    def __init__(self):
        super().__init__()
        self.by_step = {}

    name, version = "logged", 0

    def log_hyperparams(self, *a, **k):
        pass

    def log_metrics(self, metrics, step=None):
        self.by_step.setdefault(step, {}).update(metrics)


def fit(module, mon, steps=20, ckpt_path=None, **kwargs):
    logger = Logged()
    trainer = quiet_trainer(max_steps=steps, callbacks=[mon], logger=logger, **kwargs)
    trainer.fit(module, token_loader(n=400, seq=8), ckpt_path=ckpt_path)
    return trainer, logger


@pytest.mark.parametrize("family", ["nanogpt_fused_c_attn", "llama_gqa_rotary", "torch_multihead_attention"])
def test_a_layer_past_tau_is_armed_and_its_logits_stay_at_tau(family):
    mon = monitor()
    _, logger = fit(ClipLM(family), mon)
    armed = [a for a in mon.actions_taken if a.name == "qk_clip"]
    assert armed and armed[0].step == 0 and "armed layer" in armed[0].detail
    assert {a.name for a in mon.actions_taken} == {"qk_clip"}  # the LR rungs were not needed
    assert len(armed) == len(mon.core.responder.qk_clip.armed) <= 2  # one action per layer, not one per step
    later = [m["stabmon-attention/max_logit"] for s, m in sorted(logger.by_step.items())
             if s >= 5 and "stabmon-attention/max_logit" in m]
    assert later and max(later) < 4.0 * 1.5  # clipped back every step (the step after a clip moves it a bit)
    counts = [m["stabmon-actions/qk_clip_count"] for m in logger.by_step.values() if "stabmon-actions/qk_clip_count" in m]
    assert sum(counts) > 10  # clips are counted per interval, not listed as actions
    gammas = [m["stabmon-actions/qk_clip_min_gamma"] for m in logger.by_step.values()
              if "stabmon-actions/qk_clip_min_gamma" in m]
    assert gammas and all(0 < g < 1 for g in gammas)


def test_without_clipping_the_same_run_passes_tau():
    _, logger = fit(ClipLM(), monitor(tau=None))
    values = [m["stabmon-attention/max_logit"] for m in logger.by_step.values() if "stabmon-attention/max_logit" in m]
    assert max(values) > 4.0 * 2


@pytest.mark.parametrize("kwargs", [{"observe_only": True}, {"intervention": InterventionConfig(qk_clip_tau=None)}])
def test_observe_only_and_tau_none_never_clip(kwargs):
    mon = monitor(**kwargs)
    fit(ClipLM(), mon, steps=8)
    assert not any(a.name == "qk_clip" for a in mon.actions_taken)
    assert mon.core.responder.qk_clip is None


def test_nothing_fired_means_bit_identical_parameters():
    def run(with_monitor):
        pl.seed_everything(5)
        module = ClipLM(grow=0.0, lr=1e-3)  # healthy: logits far below the default tau
        fit(module, StabilityMonitor(sample_every_n_steps=2, verbose=False) if with_monitor else pl.Callback(),
            steps=10)
        return [p.detach().clone() for p in module.parameters()]

    plain, watched = run(False), run(True)
    assert all(torch.equal(a, b) for a, b in zip(plain, watched))


def test_resume_keeps_the_armed_layers(tmp_path):
    mon = monitor()
    trainer, _ = fit(ClipLM(), mon, steps=6, default_root_dir=tmp_path)
    armed = sorted(mon.core.responder.qk_clip.armed)
    assert armed
    ckpt = tmp_path / "armed.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)["callbacks"][mon.state_key]
    assert sorted(state["qk_clip"]["armed"]) == armed
    resumed = monitor()
    _, logger = fit(ClipLM(), resumed, steps=12, default_root_dir=tmp_path, ckpt_path=ckpt)
    assert sorted(resumed.core.responder.qk_clip.armed) == armed
    assert not any(a.name == "qk_clip" and a.step >= 6 for a in resumed.actions_taken)  # not armed twice
    counts = [m["stabmon-actions/qk_clip_count"] for s, m in logger.by_step.items()
              if s >= 6 and "stabmon-actions/qk_clip_count" in m]
    assert counts and sum(counts) > 0  # clipping right after the resume, before any new sample arms it


@pytest.mark.ddp
def test_ranks_clip_identically_under_ddp(tmp_path):
    env = {**os.environ, "STABMON_STRICT": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("LOCAL_RANK", None)
    script = Path(__file__).with_name("ddp_qk_clip.py")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["clips"] > 0 and ranks[0]["clips"] == ranks[1]["clips"]
    assert ranks[0]["actions"] == ranks[1]["actions"]
    assert ranks[0]["weights"] == ranks[1]["weights"]  # bit-identical replicas after the clips
