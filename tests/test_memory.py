"""The memory model (stabmon.memory), the budget it sets the sharpness probe, and its checks."""

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from stabmon import MemoryBudget, MonitorCore, MonitorOptions, SharpnessConfig, memory_plan
from stabmon.memory import GIB, ModelShape, activation_bytes, plan_sharpness, saved_activation_bytes
from stabmon.probes.sharpness import SharpnessProbe
from tests.helpers import monitored_step

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20


def _example():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from _common import load_example
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return load_example()


# -- the plan -------------------------------------------------------------------------------------

SHAPE = ModelShape(params=10**6, layers=4, heads=4, hidden=256, weight_bytes=4, optimizer_bytes=8,
                   activation_bytes_per_token=40_000)


def plan(budget_mib: float, **kw):
    args = {"iters": 20, "rows": 4, "seq_len": 512, **kw}
    return plan_sharpness(SHAPE, int(budget_mib * MIB), **args)


def test_the_plan_gives_up_exactness_then_rows_then_vectors_as_the_budget_shrinks():
    vector = 4 * 10**6
    roomy = plan(4096)
    assert (roomy.hvp_mode, roomy.method, roomy.vectors, roomy.rows, roomy.fits, roomy.why) == (
        "autograd", "lanczos", 21, 4, True, "")
    no_math_attention = plan(300)  # the double backward's L^2 terms (about 200 MiB) no longer fit
    assert no_math_attention.hvp_mode == "finite_difference" and no_math_attention.rows == 4
    assert "finite difference on 4 rows of 512 tokens" in no_math_attention.why
    fewer_rows = plan(80)
    assert fewer_rows.hvp_mode == "finite_difference" and fewer_rows.rows < 4 and fewer_rows.vectors >= 3
    shorter = plan(40)
    assert (shorter.rows, shorter.method) == (1, "lanczos") and shorter.seq_len < 512
    power = plan(25)
    assert power.method == "power" and power.vectors == 2 and "power iteration instead of Lanczos" in power.why
    nothing = plan(10)
    assert not nothing.fits and "the budget is" in nothing.why
    for p, budget_mib in ((roomy, 4096), (no_math_attention, 300), (fewer_rows, 80), (shorter, 40), (power, 25)):
        assert vector * p.vectors < p.bytes <= budget_mib * MIB, (p, budget_mib)


def test_the_plan_keeps_what_it_may_not_change():
    assert plan(40, shrinkable=False).rows == 4 and plan(40, shorter_sequences=False).seq_len == 512
    assert plan(4096, sharded=True).hvp_mode == "finite_difference"  # no double backward through FSDP2
    assert plan(4096, hvp_mode="finite_difference").hvp_mode == "finite_difference"
    forced = plan(300, hvp_mode="autograd")  # told exact: no fallback to finite differences
    assert forced.hvp_mode == "autograd" and (not forced.fits or forced.vectors < 21)
    assert plan(4096, method="power").method == "power"


def test_saved_activation_bytes_counts_each_storage_once_and_no_parameters():
    lin = torch.nn.Linear(16, 16)
    x = torch.randn(8, 16)
    h = lin(x)
    assert saved_activation_bytes(lambda: (lin(x) * lin(x)).sum(), list(lin.parameters())) == 3 * h.nbytes
    assert saved_activation_bytes(lambda: lin(x).sum(), list(lin.parameters())) == x.nbytes
    measured = ModelShape(10, 2, 2, 8, activation_bytes_per_token=100)
    assert activation_bytes(measured, rows=3, seq_len=5) == 1500
    assert activation_bytes(ModelShape(10, 2, 2, 8, weight_bytes=2), rows=1, seq_len=1) == 2 * 8 * 34


def test_memory_plan_lists_every_part_and_what_is_over_the_budget():
    shape = ModelShape(7 * 10**9, 32, 32, 4096)
    full = memory_plan(shape=shape, seq_len=4096, world_size=8, sharded=True, budget=8 * GIB)
    names = [p.name for p in full.parts]
    assert names[:2] == ["gradient probe, update ratio", "attention probe, score block"]
    assert any(n.startswith("snapshots") for n in names) and any(n.startswith("forensics") for n in names)
    sharpness = [p for p in full.parts if p.name.startswith("sharpness")]
    assert sum(p.budgeted for p in sharpness) <= 8 * GIB < sum(p.bytes for p in sharpness)
    assert {p.name for p in full.over_budget()} <= set(names) and full.over_budget()
    table = full.table()
    assert "device budget: 8 GiB" in table and all(n in table for n in names)
    ddp = memory_plan(shape=shape, seq_len=4096, world_size=8, sharded=False, budget=8 * GIB)
    assert not ddp.sharpness.fits and all(p.budgeted == 0 for p in ddp.parts if p.name.startswith("sharpness"))
    with pytest.raises(ValueError, match="`model` or its `shape`"):
        memory_plan(seq_len=16)
    with pytest.raises(ValueError, match="`fraction` must be in"):
        MemoryBudget(fraction=0)
    with pytest.raises(ValueError, match="`cap_gib` must be a positive number"):
        MemoryBudget(cap_gib=-1)


# -- the probe under its budget, measured --------------------------------------------------------

def measure(**args) -> dict:
    """One estimate in a fresh process (benchmarks/scale.py --measure): its extra peak RSS."""
    env = {**__import__("os").environ, "PYTHONWARNINGS": "ignore", "MALLOC_MMAP_THRESHOLD_": "65536"}
    spec = {"layers": 2, "heads": 4, "width": 128, "seq": 128, "rows": 4, "iters": 10, "mode": "auto", **args}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scale.py"), f"--measure={json.dumps(spec)}"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS is read from Linux's /proc")
@pytest.mark.parametrize("width,seq,budget_mib", [(128, 128, 24), (256, 256, 80)], ids=["0.4M", "3.3M"])
def test_the_probe_stays_under_a_small_budget_and_its_plan_is_within_20_percent(width, seq, budget_mib):
    layers = 2 if width == 128 else 4
    roomy = measure(layers=layers, width=width, seq=seq, budget_gib=4.0)
    small = measure(layers=layers, width=width, seq=seq, budget_gib=budget_mib / 1024)
    assert roomy["plan"]["hvp_mode"] == "autograd" and roomy["plan"]["vectors"] == 11 and not roomy["plan"]["why"]
    assert small["plan"]["hvp_mode"] == "finite_difference" and small["plan"]["why"]  # a fallback was taken
    assert small["peak"] <= budget_mib * MIB, (small["peak"] / MIB, small["plan"])
    for m in (roomy, small):
        assert 0.8 <= m["ratio"] <= 1.2, m
    assert any("within its memory budget" in n for n in small["notes"])
    assert math.isfinite(small["value"])  # of fewer rows, so not the roomy estimate's value


# -- hvp_mode="auto" -----------------------------------------------------------------------------

def test_auto_picks_autograd_for_a_short_sequence_and_finite_differences_for_a_long_one():
    probe = SharpnessProbe(SharpnessConfig(), MemoryBudget(fraction=1.0, cap_gib=64 / 1024))
    model = torch.nn.Linear(64, 64)
    short = probe.make_plan(model, {"layer_00": (8, 64, 64)})
    long = probe.make_plan(model, {"layer_00": (8, 2048, 2048)})
    assert short.hvp_mode == "autograd" and long.hvp_mode == "finite_difference"


def test_auto_says_once_what_it_chose_and_agrees_with_autograd_within_2_percent():
    ex = _example()
    torch.manual_seed(0)
    cfg = ex.Config(n_layer=2, n_head=4, n_embd=64, block_size=256)
    model = ex.GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)

    def batch(seq):
        x = torch.randint(0, 256, (4, seq + 1), generator=gen)
        return x[:, :-1], x[:, 1:]

    def loss_of(b):
        return F.cross_entropy(model(b[0]).flatten(0, 1), b[1].flatten())

    for _ in range(30):  # a few steps, so the spectrum has a top
        opt.zero_grad()
        loss_of(batch(64)).backward()
        opt.step()
    held = batch(256)
    estimates = {}
    for mode in ("autograd", "finite_difference"):
        probe = SharpnessProbe(SharpnessConfig(every_n_steps=1, iters=40, tol=1e-3, hvp_mode=mode, preconditioned=False))
        estimates[mode] = probe.measure(lambda: loss_of(held), model, opt)["sharpness/top_eigenvalue"]
    assert math.isclose(estimates["autograd"], estimates["finite_difference"], rel_tol=0.02), estimates

    # Through the monitor: a budget the double backward of 256 tokens does not fit, said once.
    core = MonitorCore(model, options=MonitorOptions(
        sample_every_n_steps=1, log_every_n_steps=1,
        sharpness=SharpnessConfig(every_n_steps=1, iters=10, preconditioned=False),
        memory_budget=MemoryBudget(fraction=1.0, cap_gib=60 / 1024)))
    core.hold_sharpness_batch(held, loss_of)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.zero_grad()
        for step in range(3):
            metrics = monitored_step(core, step, lambda: loss_of(batch(256)), opt)
            assert math.isfinite(metrics["sharpness/top_eigenvalue"])
    said = [str(w.message) for w in caught if "memory budget" in str(w.message)]
    assert len(said) == 1 and "finite difference" in said[0], said
    tables = [str(w.message) for w in caught if "part by part" in str(w.message)]
    assert len(tables) == 1 and "sharpness, HVP (double backward)" in tables[0]
    assert core.probes.sharpness.plan.hvp_mode == "finite_difference"
