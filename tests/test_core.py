"""MonitorCore's per-step path: what it reads back to the host on an ordinary (unsampled) step."""

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from stabmon import MonitorCore
from tests.helpers import TinyTransformer

# Tensor -> Python conversions: each is a host-device synchronization on a GPU.
HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__float__, torch.Tensor.__int__,
              torch.Tensor.__bool__, torch.Tensor.numpy}


class CountHostReads(TorchFunctionMode):
    """Counts Tensor -> Python conversions, and the tensors each reads."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[str, int]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            self.reads.append((func.__name__, args[0].numel()))
        return func(*args, **(kwargs or {}))


def run_steps(core: MonitorCore, model, steps: int, watch: set[int]) -> dict[int, list[tuple[str, int]]]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    reads = {}
    for step in range(steps):
        tokens = torch.randint(32, (4, 9), generator=gen)
        counter = CountHostReads()
        core.start_step(step)
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 32), tokens[:, 1:].reshape(-1))
        with counter if step in watch else torch.no_grad():  # only the monitor's calls are counted
            core.end_forward()
            core.observe_loss(loss)
        loss.backward()
        with counter if step in watch else torch.enable_grad():
            core.before_optimizer_step(optimizer=opt)
        opt.step()
        with counter if step in watch else torch.no_grad():
            core.after_optimizer_step()
            core.end_step()
        opt.zero_grad()
        if step in watch:
            reads[step] = counter.reads
    return reads


def identity_all_reduce(tensor, op):
    """Stands in for a second rank: the monitor then packs what it reads into one tensor."""
    return tensor


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "cpu"])
@pytest.mark.parametrize("detection", [True, False])
def test_an_unsampled_step_reads_at_most_the_loss_and_the_gradient_norms_once(detection, packed):
    torch.manual_seed(0)
    model = TinyTransformer()
    params = sum(1 for p in model.parameters() if p.requires_grad)
    kwargs = {} if detection else {"detection": None, "intervention": None}
    if packed:
        kwargs["all_reduce"] = identity_all_reduce
    core = MonitorCore(model, sample_every_n_steps=16, log_every_n_steps=16, strict=True, **kwargs)
    assert not any(core.is_sampled(s) for s in (11, 13, 15)) and (13 + 1) % 16 and not (15 + 1) % 16
    reads = run_steps(core, model, 16, watch={11, 13, 15})
    # with detection: the loss and the per-parameter gradient norms, in one tensor where a device
    # or another rank is involved (on one CPU process a read waits for nothing: loss and norms apart)
    expected = [("tolist", 1 + params)] if packed else [("tolist", 1), ("tolist", params)]
    for step in (11, 13):
        assert reads[step] == (expected if detection else []), reads[step]
    # an unsampled emission step: with detection its gradient signals came with the step's read already
    assert reads[15] == (expected if detection else [("tolist", reads[15][0][1])]), reads[15]


def test_under_a_grad_scaler_the_scale_comes_with_the_same_single_read():
    torch.manual_seed(0)
    model = TinyTransformer()
    params = sum(1 for p in model.parameters() if p.requires_grad)
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)  # a scale of 1 leaves run_steps' arithmetic alone
    core = MonitorCore(model, sample_every_n_steps=16, log_every_n_steps=16, strict=True,
                       all_reduce=identity_all_reduce, grad_scaler=scaler)
    reads = run_steps(core, model, 16, watch={11, 15})
    assert reads[11] == reads[15] == [("tolist", 1 + params + 1)]


def _monitored(core_kwargs):
    torch.manual_seed(0)
    model = TinyTransformer()
    return model, MonitorCore(model, sample_every_n_steps=4, log_every_n_steps=2, **{"strict": True, **core_kwargs})


def _steps(model, core, steps, clip_in_loop=None, lr=0.5):
    """SGD steps on a fixed stream of batches (a large loss: the clip acts), optionally clipped by the loop."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        tokens = torch.randint(32, (4, 9), generator=gen)
        core.start_step(step)
        loss = F.cross_entropy(model(tokens[:, :-1]).reshape(-1, 32), tokens[:, 1:].reshape(-1)) * 50
        core.end_forward()
        core.observe_loss(loss)
        loss.backward()
        core.before_optimizer_step(optimizer=opt)
        if clip_in_loop is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_in_loop)
        opt.step()
        opt.zero_grad()
        core.after_optimizer_step()
        core.end_step()


def _train(core_kwargs, clip_in_loop, steps=6):
    model, core = _monitored(core_kwargs)
    _steps(model, core, steps, clip_in_loop)
    return model, core


@pytest.mark.parametrize("detection", [True, False])
def test_clipping_from_the_monitors_norms_is_clip_grad_norm_to_the_bit(detection):
    kwargs = {} if detection else {"detection": None, "intervention": None}
    reference, _ = _train(kwargs, clip_in_loop=0.3)
    clipped, core = _train({**kwargs, "clip_grad_norm": 0.3}, clip_in_loop=None)
    unclipped, _ = _train(kwargs, clip_in_loop=None)
    for a, b, c in zip(reference.parameters(), clipped.parameters(), unclipped.parameters()):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, c) for a, c in zip(reference.parameters(), unclipped.parameters()))  # it did clip
    assert core.run_summary.extremes["gradients/norm_max"] > 0.3  # the statistics are those before the clip


def test_clipping_falls_back_to_clip_grad_norm_when_the_probe_read_nothing():
    reference, _ = _train({}, clip_in_loop=0.3, steps=3)
    model, core = _monitored({"clip_grad_norm": 0.3, "strict": False})
    core.guard.disabled["gradient probe"] = "a fault"  # the probe is off: its norms never come
    with pytest.warns(UserWarning, match="clip_grad_norm_ clips instead"):
        _steps(model, core, 3)
    for a, b in zip(reference.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_a_sharded_clip_never_uses_a_norm_left_from_an_earlier_step():
    """Sharded gradients clip by the whole model's norm from the step's own read; when that read
    did not happen (its stages disabled by a fault), clip_grad_norm_ clips, not a stale value."""
    reference, _ = _train({}, clip_in_loop=0.3, steps=3)
    model, core = _monitored({"clip_grad_norm": 0.3, "strict": False})
    core.reader.gradients.sharded = True  # one process stands in for a shard of the whole model
    core.guard.disabled["step read"] = core.guard.disabled["signals"] = "a fault"  # no host read, no device record
    with pytest.warns(UserWarning, match="was not read this step"):
        _steps(model, core, 3)
    for a, b in zip(reference.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_clip_grad_norm_is_checked():
    with pytest.raises(ValueError, match="`clip_grad_norm` must be a positive finite number"):
        MonitorCore(TinyTransformer(), clip_grad_norm=0.0)
    with pytest.raises(ValueError, match="needs `gradients=True`"):
        MonitorCore(TinyTransformer(), clip_grad_norm=1.0, gradients=False)


def test_a_checkpoint_written_before_the_pipeline_loads():
    """``fixtures/monitor_state_v1.json``: ``MonitorCore.state_dict()`` written by stabmon 0.1.0 at
    commit 7400a2c (before MonitorCore became a pipeline of stages), after a run with findings, a
    skip, a rollback and an armed QK-clip layer. It loads into today's core, which writes it back
    with the same keys and values."""
    import json
    import math
    from pathlib import Path

    from stabmon import DetectionConfig, InterventionConfig

    saved = json.loads((Path(__file__).parent / "fixtures" / "monitor_state_v1.json").read_text())
    core = MonitorCore(TinyTransformer(), sample_every_n_steps=4, log_every_n_steps=4, strict=True,
                       detection=DetectionConfig(spike_warmup=10, spike_window=20),
                       intervention=InterventionConfig(qk_clip_tau=5.0, snapshot_every_n_steps=5, cooldown=3))
    core.load_state_dict(saved)
    assert sorted(core.responder.qk_clip.armed) == ["blocks.0.attn"]
    assert [a.name for a in core.actions_taken] == ["qk_clip", "skip_step", "rollback", "skip_step"]
    assert core.responder.policy.rollbacks == 1 and len(core.findings) == 8

    def normal(value):  # NaN != NaN: compare through their text
        return json.loads(json.dumps(value, sort_keys=True).replace("NaN", '"nan"'))

    written = core.state_dict()
    for finding in written["findings"]:
        assert finding.pop("layer") in (None, "layer_00")  # the one field added since
    assert written.pop("forensics") == {"skip_list": [], "records": []}  # and the one key
    detectors = written["detectors"]  # and the slow-divergence detector, new since: fresh, and named
    assert detectors.pop("per_step_names")[-1] == "loss_drift"
    assert detectors["per_step"].pop()["values"] == []
    assert written["policy"].pop("gradient_warnings") == []  # and the pending lone gradient spikes
    assert normal(written) == normal(saved)
    assert math.isnan(core.findings[-1].value)
