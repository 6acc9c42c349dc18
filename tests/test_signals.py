import math

import torch

from stabmon.signals import SignalSet, torch_distributed_all_reduce


def test_reduce_reads_each_kind():
    s = SignalSet()
    s.add_sum("n", torch.tensor(2.0))
    s.add_max("hi", torch.tensor(5.0))
    s.add_min("lo", torch.tensor(-1.0))
    s.add_mean("avg", torch.tensor(9.0), torch.tensor(3.0))
    s.add_mean("empty", torch.tensor(0.0), torch.tensor(0.0))
    s.add_min_of_means("head_min", torch.tensor([4.0, 3.0, 0.0]), torch.tensor([2.0, 1.0, 0.0]))
    assert s.reduce() == {"n": 2.0, "hi": 5.0, "lo": -1.0, "avg": 3.0, "head_min": 2.0}
    assert len(s) == 6 and "avg" in s


def test_cross_rank_reduction_combines_sufficient_statistics():
    # Two simulated ranks: the all-reduce sees both ranks' packed tensors.
    def rank(values):
        s = SignalSet()
        s.add_mean("mean", torch.tensor(values).sum(), torch.tensor(float(len(values))))
        s.add_max("max", torch.tensor(values).max())
        s.add_min_of_means("mom", torch.tensor([sum(values), 1.0]), torch.tensor([len(values), 1.0]))
        return s

    packed = {}

    def fake_all_reduce(tensor, op):
        packed.setdefault(op, []).append(tensor)
        return tensor

    a, b = rank([1.0, 2.0, 3.0]), rank([10.0])
    a.reduce(fake_all_reduce)
    b.reduce(fake_all_reduce)
    combine = {"sum": lambda x, y: x + y, "max": torch.maximum, "min": torch.minimum}
    reduced = {op: combine[op](*ts) for op, ts in packed.items()}
    out = a.reduce(lambda t, op: reduced[op])
    assert out["mean"] == 4.0  # (1 + 2 + 3 + 10) / 4, not the mean of means 6.0
    assert out["max"] == 10.0
    assert out["mom"] == 1.0  # head 1: 2/2; head 0: 16/4


def test_nan_is_reported_not_hidden():
    s = SignalSet()
    s.add_max("x", torch.tensor(float("nan")))
    assert math.isnan(s.reduce()["x"])


def test_all_reduce_is_identity_without_a_process_group():
    t = torch.tensor([1.0, 2.0])
    assert torch_distributed_all_reduce(t, "sum") is t
