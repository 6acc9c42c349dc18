"""The forensics on real runs: the row that carries a spike, named first; reproducible or not;
where a NaN starts; and never a change to the run they investigate."""

import json
import math

import pytest
import torch

from stabmon import InterventionConfig
from stabmon.forensics import ForensicsConfig
from stabmon.forensics.batch import fingerprint_hex, row_fingerprints
from tests.forensics.loop import POISON_ROW, POISON_STEP, batches, make, train


def test_the_poisoned_row_is_named_first_and_the_spike_reproduces(tmp_path):
    model, opt, core = make(run_dir=tmp_path)
    stream = list(batches(POISON_STEP + 10))
    train(model, opt, core, iter(stream))
    (record,) = core.forensics
    assert record.step == POISON_STEP and record.signal in ("loss/last", "gradients/norm")
    assert record.verdict == "reproducible", record.verdict_reason
    top = record.rows[0]
    poisoned = fingerprint_hex(int(row_fingerprints(stream[POISON_STEP][1])[POISON_ROW]))
    assert (top.position, top.fingerprint) == (POISON_ROW, poisoned)
    assert top.loss_share > 0.95 and top.grad_share > 0.9  # nearly all of the excess loss and of the gradient
    assert all(row.loss < 0.1 for row in record.rows[1:])
    assert record.row_losses == "cross_entropy" and record.seconds > 0
    assert record.replay_loss == pytest.approx(record.loss, rel=1e-6)
    saved = json.loads((tmp_path / "stabmon-forensics" / f"step_{POISON_STEP}.json").read_text())
    assert saved["rows"][0]["fingerprint"] == poisoned and saved["verdict"] == "reproducible"
    skip = json.loads((tmp_path / "stabmon-skip.json").read_text())
    assert [e["fingerprint"] for e in skip["entries"]] == [poisoned]  # the one row that did it, not the batch
    assert "forensics: 1 events (1 reproducible)" in core.summary()
    assert [(a.step, a.name) for a in core.actions_taken] == [(POISON_STEP, "skip_step")]


def test_a_transient_fault_does_not_reproduce():
    """A backward hook multiplies one gradient by 1e4 the first time it runs at one step: the
    replay's gradient is the healthy one."""
    model, opt, core = make()
    armed = {"step": None}

    def once(grad):
        if armed["step"] is not None:
            armed["step"] = None
            return grad * 1e4
        return grad

    model.head.weight.register_hook(once)

    def hooks(step):
        armed["step"] = step if step == POISON_STEP else None

    train(model, opt, core, batches(POISON_STEP + 5, poison_step=None), hooks)
    (record,) = core.forensics
    assert record.step == POISON_STEP and record.signal == "gradients/norm"
    assert record.verdict == "not_reproducible", record.verdict_reason
    assert record.replay_grad_norm < record.grad_norm / 100


def test_the_module_where_a_nan_starts_is_named():
    model, opt, core = make()
    clock = {"step": 0}

    def poison(module, args, output):
        return output * math.nan if clock["step"] == 200 else output

    model.blocks[1]["attn"].out.register_forward_hook(poison)
    train(model, opt, core, batches(205, poison_step=None), hooks=lambda step: clock.update(step=step))
    record = next(r for r in core.forensics if r.step == 200)
    assert record.first_nonfinite_module == "blocks.1.attn.out"
    assert record.nonfinite_input is False  # its input was finite: this module made the NaN
    assert all(p.isfinite().all() for p in model.parameters())  # and the step was skipped


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_the_investigation_never_changes_the_run(dropout):
    """Parameters, optimizer state, gradients and the RNG after every step: bit-identical with the
    forensics on (observing: no action) and off."""
    runs = []
    for forensics in (ForensicsConfig(), None):
        model, opt, core = make(dropout=dropout, observe_only=True, forensics=forensics)
        seen = []

        def after(step, model=model, opt=opt, seen=seen):
            seen.append((torch.get_rng_state().clone(), [p.detach().clone() for p in model.parameters()],
                         [v.clone() for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]))

        train(model, opt, core, batches(POISON_STEP + 3), hooks=after)
        runs.append((seen, core))
    (on, core_on), (off, _) = runs
    assert len(core_on.forensics) == 1
    for (rng_a, params_a, state_a), (rng_b, params_b, state_b) in zip(on, off):
        assert torch.equal(rng_a, rng_b)
        assert all(torch.equal(a, b) for a, b in zip(params_a, params_b))
        assert all(torch.equal(a, b) for a, b in zip(state_a, state_b))


def test_without_forensics_nothing_is_investigated():
    model, opt, core = make(forensics=None)
    train(model, opt, core, batches(POISON_STEP + 3))
    assert core.forensics == [] and core.responder.forensics is None
    assert [(a.step, a.name) for a in core.actions_taken] == [(POISON_STEP, "skip_step")]


def test_a_fault_in_the_forensics_leaves_the_step_skipped(monkeypatch):
    import stabmon.forensics as forensics_module

    def broken(*args, **kwargs):
        raise RuntimeError("forensics bug")

    monkeypatch.setattr(forensics_module, "investigate", broken)
    model, opt, core = make(strict=False)
    with pytest.warns(UserWarning, match="forensics disabled.*forensics bug"):
        train(model, opt, core, batches(POISON_STEP + 3))
    assert set(core.guard.disabled) == {"forensics"}
    assert [(a.step, a.name) for a in core.actions_taken] == [(POISON_STEP, "skip_step")]


def test_max_events_bounds_the_cost():
    model, opt, core = make(forensics=ForensicsConfig(max_events=1), intervention=InterventionConfig(qk_clip_tau=None,
                                                                                                    skip_steps=False))
    stream = [(s, b) for s, b in batches(POISON_STEP + 60)]
    stream[POISON_STEP + 50] = (POISON_STEP + 50, stream[POISON_STEP][1])  # the same poison again
    train(model, opt, core, iter(stream))
    assert len(core.forensics) == 1
