import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from stabmon import SharpnessConfig, StabilityMonitor
from stabmon.probes.sharpness import SharpnessProbe
from tests.callbacks.test_stability_monitor import RecordingLogger
from tests.curvature._dense import dense_hessian
from tests.helpers import TinyLM, quiet_trainer, token_loader


def setup_mlp(opt_cls, **opt_kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2)).double()
    x = torch.randn(16, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (16,))
    opt = opt_cls(model.parameters(), **opt_kwargs)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt, x, y


def top(matrix):
    evals = torch.linalg.eigvals(matrix).real
    return evals[evals.abs().argmax()].item()


def test_sgd_sharpness_and_edge_of_stability_ratio():
    model, opt, x, y = setup_mlp(torch.optim.SGD, lr=0.05, momentum=0.9)
    model.eval()  # dense reference and probe on the same (running-stat) BatchNorm
    H = dense_hessian(model, lambda out: F.cross_entropy(out, y), x)
    probe = SharpnessProbe(SharpnessConfig(iters=60, tol=1e-6))
    values = probe.measure(lambda: F.cross_entropy(model(x), y), model, opt)
    assert math.isclose(values["sharpness/top_eigenvalue"], top(H), rel_tol=1e-3)
    assert math.isclose(values["sharpness/x_lr"], 0.05 * top(H), rel_tol=1e-3)
    assert math.isclose(values["sharpness/eos_ratio"], 0.05 * top(H) / 3.8, rel_tol=1e-3)
    assert "sharpness/preconditioned" not in values and values["sharpness/hvps"] <= 60


def test_adam_preconditioned_sharpness_and_ratio():
    model, opt, x, y = setup_mlp(torch.optim.AdamW, lr=0.01)
    model.eval()
    H = dense_hessian(model, lambda out: F.cross_entropy(out, y), x)
    params = list(model.parameters())
    v_hat = [opt.state[p]["exp_avg_sq"] / (1 - 0.999 ** float(opt.state[p]["step"])) for p in params]
    p_inv = torch.cat([(0.01 / (v.sqrt() + 1e-8)).flatten() for v in v_hat])
    values = SharpnessProbe(SharpnessConfig(iters=80, tol=1e-7)).measure(lambda: F.cross_entropy(model(x), y), model, opt)
    truth = top(torch.diag(p_inv) @ H)
    assert math.isclose(values["sharpness/preconditioned"], truth, rel_tol=1e-3)
    assert math.isclose(values["sharpness/eos_ratio"], truth / 38.0, rel_tol=1e-3)


def test_batchnorm_buffers_and_training_mode_survive():
    model, opt, x, y = setup_mlp(torch.optim.SGD, lr=0.1)
    model.train()
    buffers = [b.clone() for b in model.buffers()]
    SharpnessProbe().measure(lambda: F.cross_entropy(model(x), y), model, opt)
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    assert model.training


def test_config_validation():
    with pytest.raises(ValueError, match=r"`method` must be one of .*got 'qr'"):
        SharpnessConfig(method="qr")
    with pytest.raises(ValueError, match="`hvp_mode`"):
        SharpnessConfig(hvp_mode="exact")
    with pytest.raises(ValueError, match="`every_n_steps` must be a positive int, got 0"):
        SharpnessConfig(every_n_steps=0)
    with pytest.raises(ValueError, match="`sharpness_every_n_steps`"):
        StabilityMonitor(sharpness_every_n_steps=-5)
    with pytest.raises(ValueError, match="`sharpness` must be a stabmon.SharpnessConfig"):
        StabilityMonitor(sharpness={"every_n_steps": 3})


def test_callback_logs_sharpness_every_k_steps_on_a_held_batch():
    logger = RecordingLogger()
    seen_rows = []

    class Module(TinyLM):
        def sharpness_loss(self, batch):
            seen_rows.append(batch[0].shape[0])
            x, y = batch
            logits = self.model(x)
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    monitor = StabilityMonitor(sample_every_n_steps=100, log_every_n_steps=100, sharpness_every_n_steps=3,
                               sharpness=SharpnessConfig(batch_size=2, iters=5), verbose=False)
    trainer = quiet_trainer(max_steps=7, callbacks=[monitor], logger=logger)
    trainer.fit(Module(), token_loader())
    steps = sorted(s for s, m in logger.by_step.items() if "stabmon-sharpness/top_eigenvalue" in m)
    assert steps == [0, 3, 6]
    assert seen_rows[0] == 1 and set(seen_rows[1:]) == {2}  # once one row: the activations it saves, measured
    assert all(math.isfinite(logger.by_step[s]["stabmon-sharpness/top_eigenvalue"]) for s in steps)
    assert "stabmon-sharpness/eos_ratio" in logger.by_step[3]  # SGD with momentum in TinyLM


def test_training_step_is_used_with_logging_muted():
    logged = []

    class Module(TinyLM):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.log("train_loss", loss)
            logged.append(self.global_step)
            return {"loss": loss}

    logger = RecordingLogger()
    monitor = StabilityMonitor(sharpness_every_n_steps=2, sharpness=SharpnessConfig(iters=3), verbose=False)
    quiet_trainer(max_steps=3, callbacks=[monitor], logger=logger).fit(Module(), token_loader())
    assert "stabmon-sharpness/top_eigenvalue" in logger.by_step[2]
    assert "train_loss" in logger.by_step[2]  # the real step's own logging still works


def test_sharpness_and_attention_probes_under_bf16_mixed_precision():
    logger = RecordingLogger()
    monitor = StabilityMonitor(sample_every_n_steps=2, sharpness_every_n_steps=2, sharpness=SharpnessConfig(iters=5),
                               verbose=False)
    trainer = quiet_trainer(max_steps=3, callbacks=[monitor], logger=logger, precision="bf16-mixed")
    trainer.fit(TinyLM(), token_loader())
    logged = logger.by_step[2]
    assert math.isfinite(logged["stabmon-sharpness/top_eigenvalue"])
    assert math.isfinite(logged["stabmon-attention/entropy_min"]) and math.isfinite(logged["stabmon-logits/logz_mean"])
