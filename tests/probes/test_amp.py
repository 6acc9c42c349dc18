"""fp16 mixed precision: the GradScaler's scale and stage, and the monitor under a scaler in a
plain loop (gradients read unscaled, overflow steps counted and not found, a collapsing scale
found). The scaler runs on CPU with float32 gradients; an fp16 overflow reaches the parameters'
gradients as inf elements, so the tests put an inf into one gradient on the steps that overflow
(the scaler's reaction to it is its own)."""

import math

import pytest
import torch

from stabmon import DetectionConfig, MonitorCore
from stabmon.probes.amp import gradients_scaled, loss_scale, scaler_enabled


def _scaled_backward(scaler, model):
    loss = model(torch.ones(3, 4)).square().sum()
    scaler.scale(loss).backward()
    return loss


def test_scaler_enabled_names_only_a_scaler_that_scales():
    assert scaler_enabled(torch.amp.GradScaler("cpu"))
    assert not scaler_enabled(torch.amp.GradScaler("cpu", enabled=False))
    assert not scaler_enabled(None) and not scaler_enabled(object())


def test_loss_scale_is_the_scale_as_a_copy_that_later_updates_leave_alone():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    assert loss_scale(scaler).tolist() == [1024.0]  # before the first scale(): the initial one
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _scaled_backward(scaler, model)
    at_step = loss_scale(scaler)
    model.weight.grad[0, 0] = math.inf  # an overflow: update() halves the scale in place
    scaler.step(opt)
    scaler.update()
    assert at_step.tolist() == [1024.0] and loss_scale(scaler).tolist() == [512.0] == [scaler.get_scale()]
    assert loss_scale(torch.amp.GradScaler("cpu", enabled=False)) is None and loss_scale(None) is None


def test_gradients_scaled_until_unscale_and_again_after_update():
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    for _ in range(2):
        _scaled_backward(scaler, model)
        assert gradients_scaled(scaler, opt) and gradients_scaled(scaler, None)
        scaler.unscale_(opt)
        assert not gradients_scaled(scaler, opt) and not gradients_scaled(scaler, None)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert not gradients_scaled(torch.amp.GradScaler("cpu", enabled=False), opt)
    assert not gradients_scaled(None, opt)


DEFAULT_DETECTION = DetectionConfig()


def _fp16_like_loop(scaler, steps, *, overflow_at=(), unscale_first=False, detection=DEFAULT_DETECTION,
                    log_every=1, loss_factor_at=None):
    """A plain loop under ``scaler``; returns per step the monitor's metrics, the unscaled global
    gradient norm computed from the gradients themselves, and the scale before and after update()."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    core = MonitorCore(model, sample_every_n_steps=1000, log_every_n_steps=log_every, detection=detection,
                       strict=True, grad_scaler=scaler)
    gen = torch.Generator().manual_seed(1)
    rows = []
    for step in range(steps):
        x = torch.randn(32, 8, generator=gen)
        core.start_step(step)
        loss = model(x).square().mean() * (loss_factor_at or {}).get(step, 1.0)
        core.end_forward()
        core.observe_loss(loss)
        scaler.scale(loss).backward()
        if step in overflow_at:
            model[0].weight.grad[0, 0] = math.inf
        scale = scaler.get_scale()
        if unscale_first:
            scaler.unscale_(opt)
        divisor = 1.0 if unscale_first else scale
        reference = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.double() / divisor)
                                                          for p in model.parameters()])).item()
        core.before_optimizer_step(optimizer=opt)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        core.after_optimizer_step()
        rows.append({"metrics": core.end_step(), "reference": reference, "scale": scale,
                     "scale_after": scaler.get_scale(), "weights": [p.detach().clone() for p in model.parameters()]})
    return core, rows


@pytest.mark.parametrize("unscale_first", [False, True], ids=["read-scaled", "read-after-unscale"])
def test_overflow_steps_are_the_scalers_to_skip_counted_not_found(unscale_first):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=4)
    core, rows = _fp16_like_loop(scaler, 20, overflow_at={0, 1, 7, 15}, unscale_first=unscale_first)
    skipped = [r["scale_after"] < r["scale"] for r in rows]  # the scaler's own record of its skipped steps
    assert sum(skipped) == 4 and max(r["scale"] for r in rows[2:]) > rows[2]["scale"]  # and it grew in between
    assert core.findings == [] and core.actions_taken == []
    assert [r["metrics"]["gradients/overflow_steps"] for r in rows] == [float(s) for s in skipped]
    assert [r["metrics"]["gradients/loss_scale"] for r in rows] == [r["scale"] for r in rows]
    for r, overflow in zip(rows, skipped):
        m = r["metrics"]
        if overflow:
            assert "gradients/norm_max" not in m and m.get("gradients/nonfinite_steps", 0.0) == 0.0
        else:  # the norm of the unscaled gradients, whether they were read scaled or not
            assert m["gradients/norm"] == pytest.approx(r["reference"], rel=1e-6)
            assert m["gradients/norm_max"] == pytest.approx(r["reference"], rel=1e-6)
    assert f"skipped on overflow {sum(skipped)}" in core.summary()


def test_a_collapsing_loss_scale_is_critical_and_acted_on():
    """inf in one gradient on every step from step 2: the scaler skips each step and halves its
    scale; below ``min_loss_scale`` (1) the monitor finds it (critical) and acts."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    core, rows = _fp16_like_loop(scaler, 12, overflow_at=range(2, 12))
    first_below = next(i for i, r in enumerate(rows) if r["scale"] < 1.0)
    assert first_below == 2 + 5  # 16 -> 0.5 in five halvings
    found = [(f.step, f.signal, f.severity) for f in core.findings]
    assert found[0] == (first_below, "gradients/loss_scale", "critical")
    assert all(signal == "gradients/loss_scale" for _, signal, _ in found)  # never the overflow itself
    assert core.actions_taken and core.actions_taken[0].step == first_below


def test_min_loss_scale_none_turns_the_floor_off_and_a_bad_value_is_named():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    core, _ = _fp16_like_loop(scaler, 10, overflow_at=range(2, 10), detection=DetectionConfig(min_loss_scale=None))
    assert core.findings == []
    with pytest.raises(ValueError, match="min_loss_scale"):
        DetectionConfig(min_loss_scale=0.0)


def test_with_detection_off_the_scale_is_logged_from_the_device():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    _, rows = _fp16_like_loop(scaler, 8, overflow_at={3}, detection=None, log_every=4)
    emitted = [(i, r) for i, r in enumerate(rows) if r["metrics"]]
    assert {3, 7} <= {i for i, _ in emitted}
    for _, r in emitted:  # the scale of the interval's last step, not the one after its update()
        assert r["metrics"]["gradients/loss_scale"] == r["scale"]


def test_a_skipped_step_under_a_scaler_that_has_not_unscaled_is_skipped_by_the_scaler():
    """The monitor skips a critical loss spike at step 14. Gradients set to None there would make
    the scaler's step raise (it finds no inf check to go by); the monitor lets the scaler skip."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    detection = DetectionConfig(spike_warmup=8, spike_window=12)
    core, rows = _fp16_like_loop(scaler, 16, detection=detection, loss_factor_at={14: 1e4})
    assert [(a.step, a.name) for a in core.actions_taken][:1] == [(14, "skip_step")]
    assert all(torch.equal(a, b) for a, b in zip(rows[13]["weights"], rows[14]["weights"]))
    assert not all(torch.equal(a, b) for a, b in zip(rows[14]["weights"], rows[15]["weights"]))
