"""Snapshots: asynchronous copies that are the state of the step they name, the host-memory
check with its fallback, and one copy per job under DDP."""

import copy
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import stabmon.memory
from stabmon.interventions import Snapshotter


def trained(width: int = 256, steps: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.BatchNorm1d(width), torch.nn.Tanh(),
                                torch.nn.Linear(width, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        step(model, opt)
    return model, opt


def step(model, opt, seed: int = 1):
    x = torch.randn(32, model[0].in_features, generator=torch.Generator().manual_seed(seed))
    loss = F.mse_loss(model(x), x[:, :1])
    loss.backward()
    return loss


def state_of(model, opt):
    return copy.deepcopy(model.state_dict()), copy.deepcopy([opt.state[p] for p in model.parameters()])


def assert_same(a, b):
    (ma, oa), (mb, ob) = a, b
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
    for sa, sb in zip(oa, ob):
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_an_asynchronous_snapshot_is_the_state_of_its_step_while_training_goes_on():
    model, opt = trained(width=1024)  # 1M weights: the copy overlaps the next forward and backward
    opt.step()
    opt.zero_grad()
    expected = state_of(model, opt)
    snap, sync = Snapshotter(asynchronous=True), Snapshotter()
    sync.take(3, model, opt)
    snap.take(3, model, opt)
    step(model, opt, seed=2)  # the next forward (BatchNorm statistics move) and backward, during the copy
    snap.wait()  # what the monitor does before the optimizer step
    opt.step()
    model[0].weight.data.add_(1.0)  # and anything after it
    for s in (snap, sync):
        assert s.restore(model, opt) == 3
        assert_same(state_of(model, opt), expected)
        step(model, opt, seed=3)
        opt.step()
        opt.zero_grad()


def test_the_host_buffers_are_reused_from_one_snapshot_to_the_next():
    model, opt = trained()
    opt.step()
    snap = Snapshotter(asynchronous=True)
    snap.take(1, model, opt)
    snap.wait()
    first = {id(t) for t in snap._copier._buffers.values()}
    step(model, opt)
    opt.step()
    snap.take(2, model, opt)
    snap.wait()
    assert {id(t) for t in snap._copier._buffers.values()} == first


def test_a_snapshot_too_big_for_host_memory_goes_to_disk_or_stops_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setattr(stabmon.memory, "free_memory", lambda device: 1000)
    model, opt = trained()
    opt.step()
    fallback = Snapshotter(fallback_dir=tmp_path / "snaps")
    fallback.take(4, model, opt)
    assert fallback.directory == tmp_path / "snaps" and (tmp_path / "snaps" / "stabmon-snapshot.pt").is_file()
    assert "snapshots go to" in fallback.notes[0] and "GiB of host memory" in fallback.notes[0]
    expected = state_of(model, opt)
    model[0].weight.data.zero_()
    assert fallback.restore(model, opt) == 4
    assert_same(state_of(model, opt), expected)
    with pytest.raises(RuntimeError, match="set InterventionConfig.snapshot_dir to keep snapshots on disk"):
        Snapshotter().take(4, model, opt)


def test_a_failed_copy_is_no_snapshot(monkeypatch):
    model, opt = trained()
    snap = Snapshotter(asynchronous=True)
    snap.take(1, model, opt)
    snap.wait()
    original = torch.Tensor.copy_

    def failing(self, src, *args, **kwargs):  # the background copy fails, the step's own copies do not
        if threading.current_thread() is threading.main_thread():
            return original(self, src, *args, **kwargs)
        raise RuntimeError("host memory error")

    monkeypatch.setattr(torch.Tensor, "copy_", failing)
    snap.take(2, model, opt)
    with pytest.raises(RuntimeError, match="the snapshot's copy failed"):
        snap.wait()
    monkeypatch.setattr(torch.Tensor, "copy_", original)
    assert not snap.available and not snap.restorable()


def test_under_ddp_a_first_snapshot_that_fails_on_one_rank_fails_on_both_without_a_hang(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "STABMON_TEST_FAIL_RANK": "1"}
    script = Path(__file__).with_name("ddp_snapshot.py")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert "could not be prepared on some rank" in rank0["error"] and "this one was fine" in rank0["error"]
    assert "no room for the fingerprint" in rank1["error"]


def test_the_fingerprint_sums_in_chunks_what_a_whole_float64_copy_sums():
    from stabmon.interventions._snapshot_copy import fingerprint

    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(37, 11, generator=gen, dtype=torch.bfloat16), torch.arange(29),
               torch.randn(13, generator=gen, dtype=torch.complex64), torch.randn(5, 3, generator=gen)]
    expected = torch.zeros(3, dtype=torch.float64)
    for i, t in enumerate(tensors):
        d = (torch.view_as_real(t) if t.is_complex() else t).double()
        square = (d * d).sum() if t.is_floating_point() or t.is_complex() else torch.tensor(float(t.numel()))
        expected += torch.stack([d.sum(), d.sum() * (i + 1), square])
    for chunk in (1, 7, 1 << 22):
        torch.testing.assert_close(fingerprint(tensors, chunk=chunk), expected, rtol=1e-12, atol=1e-9)
    assert not torch.equal(fingerprint(tensors), fingerprint([tensors[1], tensors[0], *tensors[2:]]))


@pytest.mark.parametrize("on_disk", [False, True], ids=["memory", "disk"])
def test_under_ddp_one_copy_on_rank_0_and_the_rollback_restores_both_ranks(tmp_path, on_disk):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    script = Path(__file__).with_name("ddp_snapshot.py")
    args = [sys.executable, str(script), str(tmp_path)] + ([str(tmp_path / "snaps")] if on_disk else [])
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["replicated"] and rank1["replicated"]
    assert rank0["kept_copy"] and not rank1["kept_copy"] and not rank1["holds_state"]
    assert rank0["holds_state"] != on_disk
    assert rank0["at_snapshot"] == rank1["at_snapshot"]  # DDP: the same state on both ranks
    assert rank0["before_rollback"] != rank0["at_snapshot"]
    assert rank0["after_rollback"] == rank1["after_rollback"] == rank0["at_snapshot"]
    assert rank0["restored_step"] == rank1["restored_step"] == 3
    if on_disk:
        assert [p.name for p in (tmp_path / "snaps").iterdir()] == ["stabmon-snapshot.pt"]  # rank 0's only
