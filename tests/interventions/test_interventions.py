import copy

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
    assert d.rollback and d.skip_step and [a.name for a in d.actions] == ["rollback"]
    assert all(policy.decide(s, [], lr_reduced=True, snapshot_available=True).skip_step for s in (32, 33, 34))
    assert not policy.decide(35, [], lr_reduced=True, snapshot_available=True).skip_step
    policy.decide(40, [critical(40)], lr_reduced=True, snapshot_available=True)
    d = policy.decide(41, [critical(41)], lr_reduced=True, snapshot_available=True)
    assert d.stop and [a.name for a in d.actions] == ["stop"]


def test_action_cap_per_window():
    policy = EscalationPolicy(InterventionConfig(max_actions_per_window=2, window=100, rollback=False))
    taken = [policy.decide(s, [critical(s)], lr_reduced=False, snapshot_available=False).actions for s in range(5)]
    assert [len(a) for a in taken] == [1, 1, 0, 0, 0]


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
