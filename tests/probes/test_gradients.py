import math

import pytest
import torch
import torch.nn as nn

from stabmon.probes.gradients import GradientProbe, LossProbe, default_layer_name, tensor_norms
from stabmon.signals import SignalSet


def reduce(probe, **kwargs):
    out = SignalSet()
    probe.signals(out, **kwargs)
    return out.reduce()


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
    norms = []
    for seed in range(3):
        backward(net, seed)
        probe.observe()
        norms.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]).norm().item())
    got = reduce(probe, prefix="gradients")
    assert math.isclose(got["gradients/norm"], norms[-1], rel_tol=1e-5)
    assert math.isclose(got["gradients/norm_max"], max(norms), rel_tol=1e-5)
    assert math.isclose(got["gradients/norm_min"], min(norms), rel_tol=1e-5)
    assert math.isclose(got["gradients/norm_mean"], sum(norms) / 3, rel_tol=1e-5)
    layer0 = torch.cat([net.blocks[0].weight.grad.flatten(), net.blocks[0].bias.grad.flatten()]).norm().item()
    assert math.isclose(got["gradients/norm/blocks_0"], layer0, rel_tol=1e-5)
    weights = torch.cat([p.flatten() for n, p in net.named_parameters() if p.requires_grad]).norm().item()
    assert math.isclose(got["params/norm"], weights, rel_tol=1e-5)
    assert "update/ratio" not in got  # no snapshot taken


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
    weight = torch.cat([b.flatten() for b in before]).norm()
    assert math.isclose(got["update/ratio/blocks_1"], (delta / weight).item(), rel_tol=1e-5)
    assert got["update/ratio"] > 0


def test_nonfinite_gradients_are_counted_and_kept_out_of_the_range():
    net = Net()
    probe = GradientProbe(net.named_parameters())
    backward(net)
    probe.observe()
    finite_norm = reduce(probe, prefix="g")["g/norm"]
    probe.reset()
    backward(net)
    probe.observe()
    net.head.weight.grad[0, 0] = float("nan")
    probe.observe()
    got = reduce(probe, prefix="g")
    assert got["g/nonfinite_steps"] == 1
    assert math.isclose(got["g/norm_max"], finite_norm, rel_tol=1e-6)
    assert math.isnan(got["g/norm"])  # the last step's norm is reported as it is


def test_no_trainable_parameters():
    probe = GradientProbe(nn.Linear(2, 2).requires_grad_(False).named_parameters())
    assert probe.empty and probe.observe() is None and reduce(probe) == {}


@pytest.mark.parametrize("values,expected_mean", [([1.0, 3.0], 2.0), ([float("inf"), 5.0], 5.0)])
def test_loss_probe(values, expected_mean):
    probe = LossProbe()
    for v in values:
        probe.observe(torch.tensor(v))
    got = reduce(probe)
    assert got["loss/mean"] == expected_mean
    assert got["loss/nonfinite_steps"] == sum(not math.isfinite(v) for v in values)
