import math

import torch

from stabmon.kernels.logit_stats import logit_stats_reference
from stabmon.probes.logits import LogitProbe
from stabmon.signals import SignalSet


def reduce(probe):
    out = SignalSet()
    probe.signals(out, prefix="logits")
    return out.reduce()


def test_signals_match_reference_over_several_calls_and_ignored_tokens():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(6, 11, generator=gen, dtype=torch.float64) * 4
    b = torch.randn(3, 11, generator=gen, dtype=torch.float64) * 4
    target_a = torch.tensor([1, -100, 2, 3, -100, 0])
    probe = LogitProbe()
    probe.observe(a.float(), target_a)
    probe.observe(b.float(), torch.tensor([0, 1, 2]))
    kept = torch.cat([a[target_a != -100], b])
    ref = logit_stats_reference(kept)
    got = reduce(probe)
    assert math.isclose(got["logits/logz_mean"], ref.lse.mean().item(), rel_tol=1e-6)
    assert math.isclose(got["logits/logz_max"], ref.lse.max().item(), rel_tol=1e-6)
    assert math.isclose(got["logits/max_logit"], ref.max_logit.max().item(), rel_tol=1e-6)
    assert math.isclose(got["logits/entropy_mean"], ref.entropy.mean().item(), rel_tol=1e-5)
    assert got["logits/nonfinite"] == 0


def test_class_dim_is_dim_one_as_in_cross_entropy():
    x = torch.randn(2, 5, 3)  # (N, C, d1): 5 classes, 6 tokens
    probe = LogitProbe()
    probe.observe(x, torch.zeros(2, 3, dtype=torch.long))
    ref = logit_stats_reference(x.movedim(1, -1).double())
    assert math.isclose(reduce(probe)["logits/logz_mean"], ref.lse.mean().item(), rel_tol=1e-6)


def test_nonfinite_rows_are_counted_and_left_out():
    x = torch.zeros(4, 3)
    x[2, 0] = float("inf")
    x[3, 1] = float("nan")
    probe = LogitProbe()
    probe.observe(x, torch.zeros(4, dtype=torch.long))
    got = reduce(probe)
    assert got["logits/nonfinite"] == 2
    assert math.isclose(got["logits/logz_mean"], math.log(3), rel_tol=1e-6)


def test_probability_targets_keep_every_row():
    x = torch.zeros(3, 4)
    probe = LogitProbe()
    probe.observe(x, torch.full((3, 4), 0.25))
    assert math.isclose(reduce(probe)["logits/entropy_mean"], math.log(4), rel_tol=1e-6)


def test_reset_forgets_and_no_call_gives_no_signal():
    probe = LogitProbe()
    probe.observe(torch.zeros(2, 3), None)
    probe.reset()
    assert not probe.seen and reduce(probe) == {}


def test_mean_and_min_logit_over_the_vocabulary_in_bf16_without_a_float32_copy():
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(5, 7, 300, generator=gen) * 3 - 20).to(torch.bfloat16)  # drifted down, as unseen tokens
    target = torch.randint(0, 300, (5, 7), generator=gen)
    target[0, :3] = -100
    probe = LogitProbe()
    probe.observe(logits.transpose(1, 2), target)  # cross_entropy's (N, C, d) layout
    values = reduce(probe)
    keep = (target != -100).reshape(-1)
    exact = logits.double().reshape(-1, 300)[keep]
    assert math.isclose(values["logits/mean_logit"], exact.mean(dim=-1).mean().item(), rel_tol=1e-5)
    assert values["logits/min_logit"] == exact.min().item()
    nan_row = torch.zeros(2, 4)
    nan_row[1, 0] = float("nan")
    probe = LogitProbe()
    probe.observe(nan_row)
    assert reduce(probe)["logits/min_logit"] == 0.0 and reduce(probe)["logits/mean_logit"] == 0.0
