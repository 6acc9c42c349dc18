"""A fault in the monitor on one rank only never kills or splits a distributed run: the stage is
switched off on every rank at the same step (the failure travels with the step's reduction),
no collective is left waiting, and the ranks keep identical weights and emit identical signals.
2 gloo ranks, DDP and FSDP2, a plain loop (``fault_run.py``)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ddp, pytest.mark.slow]

SCRIPT = Path(__file__).with_name("fault_run.py")
FAULT_FROM = 7
STAGE_OFF = {"signals": "attention probe", "sharpness": "sharpness probe", "qk-clip": "qk-clip",
             "step-read": "step read", "detection": "detection"}
# the step the fault first fires at on rank 1: a sampled step (attention), a sharpness step, any step
FIRST_FAULT = {"signals": 8, "sharpness": 10, "qk-clip": 7, "step-read": 7, "detection": 7}


def run(tmp_path, mode, stage):
    env = {**os.environ, "STABMON_STRICT": "0", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), mode, stage], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return [json.loads((tmp_path / f"{mode}{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def healthy(tmp_path_factory):
    """The same runs without a fault, by mode."""
    return {mode: run(tmp_path_factory.mktemp(mode), mode, "none") for mode in ("ddp", "fsdp")}


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
@pytest.mark.parametrize("stage", list(STAGE_OFF))
def test_a_fault_on_one_rank_switches_the_stage_off_on_every_rank_at_the_same_step(tmp_path, mode, stage, healthy):
    rank0, rank1 = run(tmp_path, mode, stage)
    off = STAGE_OFF[stage]
    assert rank0["disabled_at"] == rank1["disabled_at"] and set(rank0["disabled_at"]) == {off}
    # settled by the first reduction after the fault: the step's read (or, for a probe's signals, the emission)
    assert FIRST_FAULT[stage] <= rank0["disabled_at"][off] <= FIRST_FAULT[stage] + 2
    assert rank0["pending"] == rank1["pending"] == []
    if mode == "ddp":
        assert rank0["hash_after"] == rank1["hash_after"]  # the replicas stayed identical
    for rank, reference in zip((rank0, rank1), healthy[mode]):  # each rank's weights (its shards, under FSDP2)
        if stage == "qk-clip":  # as without the fault until QK-clip went off, everywhere at once
            assert all(rank["hash_after"][str(s)] == reference["hash_after"][str(s)] for s in range(FAULT_FROM))
        else:  # a measuring or detecting stage: training is exactly the run without the fault
            assert rank["hash_after"] == reference["hash_after"]
    assert rank0["metrics"] == rank1["metrics"] and rank0["actions"] == rank1["actions"]
    assert set(rank0["metrics"]) == {str(s) for s in range(24) if s % 5 == 0 or s in (1, 2, 4) or (s + 1) % 5 == 0}
    last = rank0["metrics"]["20"]
    assert "loss/mean" in last and ("gradients/norm_max" in last)  # measuring went on
    if stage != "signals":
        assert "attention/max_logit" in last
    if stage != "sharpness":
        assert "sharpness/top_eigenvalue" in last


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_without_a_fault_nothing_is_switched_off(mode, healthy):
    rank0, rank1 = healthy[mode]
    assert rank0["disabled_at"] == rank1["disabled_at"] == {}
    assert rank0["metrics"] == rank1["metrics"]
    assert mode == "fsdp" or rank0["hash_after"] == rank1["hash_after"]
    assert ("qk_clip", 0) in {(a["name"], a["step"]) for a in rank0["actions"]}
