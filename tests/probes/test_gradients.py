import math

import pytest
import torch
import torch.nn as nn

from stabmon.probes.gradients import GradientProbe, default_layer_name, tensor_norms
from stabmon.probes.series import StepSeries
from stabmon.signals import SignalSet


def reduce(probe, **kwargs):
    out = SignalSet()
    probe.signals(out, **kwargs)
    return out.reduce()


NORM = {"max": "g/norm_max", "min": "g/norm_min", "mean": "g/norm_mean", "nonfinite_steps": "g/nonfinite_steps"}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(3, 3), nn.Linear(3, 3)])
        self.head = nn.Linear(3, 1)
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        for b in self.blocks:
            x = torch.tanh(b(x))
        return self.head(self.frozen(x))


def backward(net, seed=0):
    gen = torch.Generator().manual_seed(seed)
    net.zero_grad()
    net(torch.randn(5, 3, generator=gen)).pow(2).sum().backward()


def test_layer_names():
    assert default_layer_name("model.transformer.h.11.mlp.c_fc.weight") == "model.transformer.h.11"
    assert default_layer_name("blocks.0.weight") == "blocks.0"
    assert default_layer_name("head.bias") == "head"
    assert default_layer_name("scale") == "scale"


def test_tensor_norms_handles_mixed_dtypes():
    ts = [torch.ones(4), torch.ones(9, dtype=torch.float64) * 2, torch.ones(1, dtype=torch.bfloat16) * 3]
    torch.testing.assert_close(tensor_norms(ts, torch.device("cpu")), torch.tensor([2.0, 6.0, 3.0]))


def test_norms_match_manual_computation_and_frozen_params_are_left_out():
    net = Net()
    probe = GradientProbe(net.named_parameters())
    assert probe.layers == ["blocks.0", "blocks.1", "head"]
    norms, observed = [], []
    for seed in range(3):
        backward(net, seed)
        probe.observe()
        observed.append(probe.device_norm().item())
        norms.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]).norm().item())
    got = reduce(probe, prefix="gradients")
    assert observed == pytest.approx(norms, rel=1e-5)
    assert math.isclose(got["gradients/norm"], norms[-1], rel_tol=1e-5)
    layer0 = torch.cat([net.blocks[0].weight.grad.flatten(), net.blocks[0].bias.grad.flatten()]).norm().item()
    assert math.isclose(got["gradients/norm/blocks_0"], layer0, rel_tol=1e-5)
    weights = torch.cat([p.flatten() for n, p in net.named_parameters() if p.requires_grad]).norm().item()
    assert math.isclose(got["params/norm"], weights, rel_tol=1e-5)
    assert "update/ratio" not in got  # no snapshot taken


@pytest.mark.parametrize("mode", ["host", "device"])
def test_step_series_summarises_an_interval(mode):
    series = StepSeries(NORM)
    values = [2.0, 5.0, 3.0]
    for v in values:
        series.add_host(v) if mode == "host" else series.add_device(torch.tensor(v))
    out = SignalSet()
    series.signals(out)
    assert out.reduce() == {"g/norm_max": 5.0, "g/norm_min": 2.0, "g/norm_mean": pytest.approx(10 / 3),
                            "g/nonfinite_steps": 0.0}


def test_step_series_folds_long_device_intervals():
    series = StepSeries({"mean": "m", "max": "hi", "last": "last"})
    for v in range(600):  # folded twice on the way
        series.add_device(torch.tensor(float(v)))
    out = SignalSet()
    series.signals(out)
    assert out.reduce() == {"last": 599.0, "m": 299.5, "hi": 599.0}


def test_update_ratio():
    net = Net()
    probe = GradientProbe(net.named_parameters())
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    backward(net)
    probe.observe()
    before = [p.detach().clone() for p in net.blocks[1].parameters()]
    probe.snapshot_parameters()
    opt.step()
    probe.measure_update()
    got = reduce(probe, prefix="gradients")
    delta = torch.cat([(p.detach() - b).flatten() for p, b in zip(net.blocks[1].parameters(), before)]).norm()
    weight = torch.cat([p.detach().flatten() for p in net.blocks[1].parameters()]).norm()  # after the step
    assert math.isclose(got["update/ratio/blocks_1"], (delta / weight).item(), rel_tol=1e-5)
    assert got["update/ratio"] > 0


@pytest.mark.parametrize("mode", ["host", "device"])
def test_nonfinite_values_are_counted_kept_out_of_the_range_and_never_logged_as_nan(mode):
    series = StepSeries(NORM)
    add = series.add_host if mode == "host" else (lambda v: series.add_device(torch.tensor(v)))
    add(float("nan"))
    out = SignalSet()
    series.signals(out)
    assert out.reduce() == {"g/nonfinite_steps": 1.0}  # no finite step: max, min and mean are undefined
    series.reset()
    for v in (1.0, float("inf"), 4.0):
        add(v)
    out = SignalSet()
    series.signals(out)
    assert out.reduce() == {"g/norm_max": 4.0, "g/norm_min": 1.0, "g/norm_mean": 2.5, "g/nonfinite_steps": 1.0}


def test_a_nan_gradient_gives_a_nan_norm():
    net = Net()
    probe = GradientProbe(net.named_parameters())
    backward(net)
    net.head.weight.grad[0, 0] = float("nan")
    probe.observe()
    assert math.isnan(probe.device_norm().item())
    assert math.isnan(reduce(probe, prefix="g")["g/norm"])  # the step's norm is reported as it is
    assert math.isnan(probe.record_host_squares(probe.squares(probe.observe()).tolist()))
    assert math.isnan(reduce(probe, prefix="g")["g/norm"])


def test_no_trainable_parameters():
    probe = GradientProbe(nn.Linear(2, 2).requires_grad_(False).named_parameters())
    assert probe.empty and probe.observe() is None and reduce(probe) == {}


def test_parameters_without_a_gradient_count_as_zero():
    net = Net()
    probe = GradientProbe(net.named_parameters())
    backward(net)
    net.blocks[0].bias.grad = None
    full = torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]).norm().item()
    norms = probe.observe()
    assert norms[1].item() == 0.0
    assert math.isclose(probe.device_norm().item(), full, rel_tol=1e-6)


def test_host_squares_give_the_same_signals_as_the_device_path_without_device_work():
    net = Net()
    probe = GradientProbe(net.named_parameters())
    backward(net, seed=3)
    norms = probe.observe()
    on_device = reduce(probe, prefix="gradients", parameters=False)
    norm = probe.record_host_squares([x * x for x in norms.double().tolist()])
    out = SignalSet()
    probe.signals(out, prefix="gradients", parameters=False)
    assert out._entries == []  # every value is a host float: the emission reads nothing
    on_host = out.reduce()
    assert on_host.keys() == on_device.keys() == {"gradients/norm", "gradients/norm/blocks_0",
                                                  "gradients/norm/blocks_1", "gradients/norm/head"}
    full = torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]).double().norm().item()
    assert norm == pytest.approx(full, rel=1e-6) and on_host["gradients/norm"] == pytest.approx(full, rel=1e-6)
    for key in on_device:
        assert on_host[key] == pytest.approx(on_device[key], rel=1e-6)
    with pytest.raises(ValueError, match="one value per trainable parameter"):
        probe.record_host_squares([1.0])
    probe.observe()  # a new step forgets the host values of the last one
    assert reduce(probe, prefix="gradients", parameters=False) == pytest.approx(on_device, rel=1e-6)

