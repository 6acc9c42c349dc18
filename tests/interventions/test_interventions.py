import copy
import math

import pytest
import torch
import torch.nn as nn

from stabmon.detectors import Finding
from stabmon.interventions import EscalationPolicy, InterventionConfig, LRController, Snapshotter, scale_lr_for_next_step


def warning(step):
    return Finding(step, "loss/last", "warning", 5.0, 4.0, "spike", "loss_spike")


def critical(step):
    return Finding(step, "loss/last", "critical", float("nan"), float("inf"), "nan", "nonfinite")


def test_scaled_lr_composes_with_any_scheduler():
    # The same run with a StepLR that compounds on group["lr"]: scaling around the step must
    # leave the schedule exactly as without it.
    def run(scale):
        w = nn.Parameter(torch.ones(2))
        opt = torch.optim.SGD([w], lr=1.0)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        lrs = []
        for step in range(4):
            w.grad = torch.ones(2)
            restore = scale_lr_for_next_step(opt, 0.1 if scale and step == 1 else 1.0)
            opt.step()
            restore()
            sched.step()
            lrs.append(opt.param_groups[0]["lr"])
        return lrs, w.detach()

    plain_lrs, plain_w = run(False)
    scaled_lrs, scaled_w = run(True)
    assert plain_lrs == scaled_lrs == [0.5, 0.25, 0.125, 0.0625]
    # step 1 used lr 0.5 * 0.1 instead of 0.5: w differs by 0.45 per entry
    torch.testing.assert_close(scaled_w - plain_w, torch.full((2,), 0.45))


def test_tensor_lr_is_written_in_place():
    w = nn.Parameter(torch.ones(1))
    lr = torch.tensor(0.2)
    opt = torch.optim.Adam([w], lr=lr)
    restore = scale_lr_for_next_step(opt, 0.5)
    assert opt.param_groups[0]["lr"] is lr and lr.item() == pytest.approx(0.1)
    restore()
    restore()  # idempotent, also when no step ran (an AMP scaler skipped it)
    assert lr.item() == pytest.approx(0.2)


def test_lr_controller_scale_hold_recover_and_rewarm():
    c = LRController()
    c.scale(0, 0.5, hold=2, recover=2)
    assert c.factor(0) == 0.5 and c.active(0)
    c.scale(1, 0.5, hold=2, recover=2)  # compounding: 0.25 from step 1, held to 3, back by 5
    assert [c.factor(s) for s in range(1, 7)] == [0.25, 0.25, 0.25, 0.625, 1.0, 1.0]
    c = LRController()
    c.rewarm(10, 0.1, 10)
    assert [round(c.factor(s), 2) for s in (9, 10, 15, 20)] == [1.0, 0.1, 0.55, 1.0]
    d = LRController()
    d.load_state_dict(c.state_dict())
    assert d.factor(15) == c.factor(15)


def test_skip_step_leaves_parameters_and_adam_state_alone():
    model = nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    before_params = copy.deepcopy(model.state_dict())
    before_state = copy.deepcopy(opt.state_dict())
    model(torch.ones(1, 3)).sum().backward()
    for p in model.parameters():
        p.grad = None  # what the skip does
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before_params.values(), model.state_dict().values()))
    after = opt.state_dict()["state"]
    for k, st in before_state["state"].items():
        assert all(torch.equal(st[n], after[k][n]) for n in st)


def test_snapshot_round_trip_keeps_current_lr(tmp_path):
    for directory in (None, tmp_path):
        model = nn.Linear(2, 2)
        opt = torch.optim.Adam(model.parameters(), lr=0.1)
        model(torch.ones(1, 2)).sum().backward()
        opt.step()
        snap = Snapshotter(directory)
        snap.take(7, model, opt)
        saved = copy.deepcopy(model.state_dict())
        saved_state = copy.deepcopy(opt.state_dict()["state"])
        for _ in range(3):
            model(torch.ones(1, 2)).sum().backward()
            opt.step()
        opt.param_groups[0]["lr"] = 0.03  # the scheduler moved on
        assert snap.restore(model, opt) == 7
        assert all(torch.equal(a, b) for a, b in zip(saved.values(), model.state_dict().values()))
        assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], saved_state[0]["exp_avg"])
        assert opt.param_groups[0]["lr"] == 0.03


def test_a_rollback_cuts_the_lr_for_good_by_default():
    assert InterventionConfig().rollback_lr_cut
    cfg = InterventionConfig(rollback_after=2, lr_cut_factor=0.25)
    policy = EscalationPolicy(cfg)
    policy.decide(30, [critical(30)], lr_reduced=False, snapshot_available=True)
    d = policy.decide(31, [critical(31)], lr_reduced=False, snapshot_available=True)
    assert d.rollback and d.lr_cut == 0.25 and [a.name for a in d.actions] == ["rollback", "lr_cut"]
    plain = EscalationPolicy(InterventionConfig(rollback_after=2, rollback_lr_cut=False))
    plain.decide(30, [critical(30)], lr_reduced=False, snapshot_available=True)
    assert plain.decide(31, [critical(31)], lr_reduced=False, snapshot_available=True).lr_cut is None
    with pytest.raises(ValueError, match="`rollback_lr_cut`"):
        InterventionConfig(rollback_lr_cut="yes")


def test_ladder_escalates_and_does_not_loop():
    cfg = InterventionConfig(cooldown=10, window=100, rollback_after=2, max_rollbacks=1, skip_batches=3)
    policy = EscalationPolicy(cfg)
    assert policy.decide(0, [], lr_reduced=False, snapshot_available=True).actions == []
    d = policy.decide(5, [warning(5)], lr_reduced=False, snapshot_available=True)
    assert d.scale_lr == 0.5 and [a.name for a in d.actions] == ["scale_lr"]
    assert policy.decide(8, [warning(8)], lr_reduced=True, snapshot_available=True).actions == []  # cooldown
    assert policy.decide(20, [warning(20)], lr_reduced=True, snapshot_available=True).rewarm
    assert policy.decide(45, [warning(45)], lr_reduced=True, snapshot_available=True).actions == []  # re-warm runs
    d = policy.decide(30, [critical(30)], lr_reduced=True, snapshot_available=True)
    assert d.skip_step and [a.name for a in d.actions] == ["skip_step"]
    d = policy.decide(31, [critical(31)], lr_reduced=True, snapshot_available=True)
    assert d.rollback and d.skip_step and [a.name for a in d.actions] == ["rollback", "lr_cut"]
    assert all(policy.decide(s, [], lr_reduced=True, snapshot_available=True).skip_step for s in (32, 33, 34))
    assert not policy.decide(35, [], lr_reduced=True, snapshot_available=True).skip_step
    policy.decide(40, [critical(40)], lr_reduced=True, snapshot_available=True)
    d = policy.decide(41, [critical(41)], lr_reduced=True, snapshot_available=True)
    assert d.stop and [a.name for a in d.actions] == ["stop"]


def spike(step):
    return Finding(step, "loss/last", "critical", 900.0, 10.0, "loss spike", "loss_spike")


def test_action_cap_per_window():
    policy = EscalationPolicy(InterventionConfig(max_actions_per_window=2, window=100, rollback=False))
    taken = [policy.decide(s, [spike(s)], lr_reduced=False, snapshot_available=False).actions for s in range(5)]
    assert [len(a) for a in taken] == [1, 1, 0, 0, 0]
    # past the cap a step whose loss is NaN is still skipped (it would poison the weights), and nothing escalates
    d = policy.decide(5, [critical(5)], lr_reduced=False, snapshot_available=False)
    assert d.skip_step and [a.name for a in d.actions] == ["skip_step"] and "past the action cap" in d.actions[0].detail
    assert len(policy.decide(6, [spike(6)], lr_reduced=False, snapshot_available=False).actions) == 0


def test_policy_state_round_trip():
    policy = EscalationPolicy(InterventionConfig())
    policy.decide(5, [critical(5)], lr_reduced=False, snapshot_available=True)
    policy.decide(6, [critical(6)], lr_reduced=False, snapshot_available=True)
    other = EscalationPolicy(InterventionConfig())
    state = policy.state_dict()
    frozen = copy.deepcopy(state)
    other.load_state_dict(state)
    assert other.state_dict() == policy.state_dict() and state == frozen
    assert other.skipping(10) and other.rollbacks == 1


@pytest.mark.parametrize("kwargs,match", [({"lr_factor": 1.5}, r"`lr_factor` must be in \(0, 1\), got 1.5"),
                                          ({"cooldown": -1}, "`cooldown` must be a non-negative int"),
                                          ({"rollback": "yes"}, "`rollback` must be True or False")])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        InterventionConfig(**kwargs)


def test_a_signal_that_keeps_firing_gets_a_lasting_lr_cut():
    cfg = InterventionConfig(cooldown=10, rewarm_steps=50, lr_cut_factor=0.25, lr_cut_after=3, lr_cut_window=500)
    policy = EscalationPolicy(cfg)
    d = policy.decide(5, [warning(5)], lr_reduced=False, snapshot_available=True)
    assert [a.name for a in d.actions] == ["scale_lr"]
    assert policy.decide(20, [warning(20)], lr_reduced=True, snapshot_available=True).rewarm
    assert policy.decide(60, [warning(60)], lr_reduced=True, snapshot_available=True).actions == []  # re-warm runs
    d = policy.decide(80, [warning(80)], lr_reduced=False, snapshot_available=True)
    assert d.lr_cut == 0.25 and [a.name for a in d.actions] == ["lr_cut"]
    assert "rest of the run" in d.actions[0].detail
    # the ladder starts again above the cut; warnings far apart never add up to a cut
    assert [a.name for a in policy.decide(100, [warning(100)], lr_reduced=False, snapshot_available=True).actions] \
        == ["scale_lr"]
    sparse = EscalationPolicy(cfg)
    names = [a.name for s in (0, 600, 1200, 1800) for a in
             sparse.decide(s, [warning(s)], lr_reduced=False, snapshot_available=True).actions]
    assert names == ["scale_lr"] * 4
    other = EscalationPolicy(cfg)
    other.load_state_dict(copy.deepcopy(policy.state_dict()))
    assert other.state_dict() == policy.state_dict()


def test_lasting_cut_is_scheduler_safe_and_survives_a_checkpoint():
    controller = LRController()
    controller.scale(0, 0.5, hold=2, recover=2)
    controller.cut(3, 0.5)
    assert [controller.factor(s) for s in (0, 2, 3, 4, 100)] == [0.5, 0.5, 0.375, 0.5, 0.5]
    assert not controller.active(100)  # a lasting cut is no transient rung: the ladder may start again
    w = torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([w], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for i, step in enumerate(range(3, 6)):
        w.grad = torch.ones(1)
        restore = scale_lr_for_next_step(opt, controller.factor(step))
        before = w.item()
        opt.step()
        restore()
        assert math.isclose(before - w.item(), 0.1 * 0.5 ** i * controller.factor(step), rel_tol=1e-5)
        sched.step()
    assert math.isclose(opt.param_groups[0]["lr"], 0.1 * 0.5 ** 3)  # the schedule itself is untouched
    fresh = LRController()
    fresh.load_state_dict(copy.deepcopy(controller.state_dict()))
    assert fresh.factor(50) == 0.5


def test_a_lone_gradient_norm_spike_is_reported_and_the_second_acts():
    def grad(step):
        return Finding(step, "gradients/norm", "warning", 6.1, 4.6, "spike", "grad_spike")

    policy = EscalationPolicy(InterventionConfig(window=100))
    assert policy.decide(238, [grad(238)], lr_reduced=False, snapshot_available=True).actions == []
    resumed = EscalationPolicy(InterventionConfig(window=100))
    resumed.load_state_dict(copy.deepcopy(policy.state_dict()))  # the pending spike survives a restart
    for p in (policy, resumed):
        d = p.decide(300, [grad(300)], lr_reduced=False, snapshot_available=True)
        assert [a.name for a in d.actions] == ["scale_lr"] and "gradients/norm" in d.actions[0].detail
    far = EscalationPolicy(InterventionConfig(window=100))
    far.decide(10, [grad(10)], lr_reduced=False, snapshot_available=True)
    assert far.decide(200, [grad(200)], lr_reduced=False, snapshot_available=True).actions == []  # 190 steps apart
    with_loss = EscalationPolicy(InterventionConfig())
    assert with_loss.decide(5, [grad(5), warning(5)], lr_reduced=False, snapshot_available=True).scale_lr == 0.5
    eager = EscalationPolicy(InterventionConfig(gradient_warnings_to_act=1))
    assert eager.decide(5, [grad(5)], lr_reduced=False, snapshot_available=True).scale_lr == 0.5
    with pytest.raises(ValueError, match="`gradient_warnings_to_act`"):
        InterventionConfig(gradient_warnings_to_act=0)
