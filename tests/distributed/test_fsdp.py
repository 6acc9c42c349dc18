"""The monitor on a model sharded with FSDP2 (``fully_shard``) over 2 CPU ranks (gloo): norms
of the whole model, the same decisions on every rank, bit-identical rollback of the shards,
QK-clip on sharded weights, and sharpness from finite differences."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ddp, pytest.mark.slow]

SCRIPT = Path(__file__).with_name("fsdp_run.py")


def run(tmp_path, mode, *flags):
    env = {**os.environ, "STABMON_STRICT": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), mode, *flags], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    names = ["single0"] if mode == "single" else ["fsdp0", "fsdp1"]
    return [json.loads((tmp_path / f"{n}.json").read_text()) for n in names]


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_plain")
    return run(out, "fsdp"), run(out, "single")[0]


def assert_norms_equal(ranks, single):
    rank0, rank1 = ranks
    compared = 0
    for step, reference in single["metrics"].items():
        for key, value in reference.items():
            if key.startswith(("gradients/", "params/", "update/", "loss/")):
                assert key in rank0["metrics"][step], (step, key)
                assert rank0["metrics"][step][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (step, key)
                compared += 1
        assert rank0["metrics"][step] == rank1["metrics"][step]  # every rank logs the same values
    assert compared > 200 and any("/norm/blocks_1" in k for k in single["metrics"]["0"])


def test_norms_equal_those_of_the_unsharded_model(plain):
    assert_norms_equal(*plain)


def test_the_monitor_clips_sharded_gradients_as_the_unsharded_ones(tmp_path):
    # SGD: each step is the clipped gradient itself, so a wrong clip coefficient moves the parameters
    sharded, single = run(tmp_path, "fsdp", "--sgd", "--gradclip"), run(tmp_path, "single", "--sgd", "--gradclip")[0]
    assert_norms_equal(sharded, single)  # clipped by the whole model's norm on every rank
    unclipped = run(tmp_path, "single", "--sgd")[0]
    clipped_update, free_update = single["metrics"]["20"]["update/ratio"], unclipped["metrics"]["20"]["update/ratio"]
    assert clipped_update < 0.5 * free_update, (clipped_update, free_update)
    # the logged gradient norm is the one before the clip (far above 0.05)
    assert min(m["gradients/norm"] for m in single["metrics"].values()) > 0.05


def test_qk_layernorm_gain_norms_of_the_sharded_model_equal_the_unsharded(tmp_path):
    (rank0, rank1), single = run(tmp_path, "fsdp", "--qkln"), run(tmp_path, "single", "--qkln")[0]
    compared = 0
    for step, reference in single["metrics"].items():
        for key, value in reference.items():
            if "_gain_norm/" in key:
                assert rank0["metrics"][step][key] == pytest.approx(value, rel=1e-5), (step, key)
                assert rank1["metrics"][step][key] == rank0["metrics"][step][key]
                compared += 1
    sampled = sum("attention/entropy_mean" in m for m in single["metrics"].values())
    assert compared == 4 * sampled > 0  # q and k of two layers at every sampled emission


def test_sharpness_from_finite_differences_on_the_sharded_model(plain):
    (rank0, _), single = plain
    for step in ("0", "10"):
        assert rank0["metrics"][step]["sharpness/top_eigenvalue"] == pytest.approx(
            single["metrics"][step]["sharpness/top_eigenvalue"], rel=0.02)


def test_a_spike_on_one_rank_gives_the_same_action_on_both_and_rollback_restores_the_shards(tmp_path):
    rank0, rank1 = run(tmp_path, "fsdp", "--spike", "--nan")
    names = [(a["step"], a["name"]) for a in rank0["actions"]]
    assert names == [(11, "skip_step"), (12, "rollback"), (12, "lr_cut"), (15, "skip_step")]
    assert rank0["actions"] == rank1["actions"] and rank0["findings"] == rank1["findings"]
    for r in (rank0, rank1):  # parameters and optimizer state: the shards of the snapshot after step 10
        assert r["hash_after"]["12"] == r["hash_after"]["10"]
        assert r["hash_after"]["13"] == r["hash_after"]["10"]  # a skipped batch after the rollback


def test_qk_clip_on_sharded_weights_and_rollback_through_distributed_checkpoint(tmp_path):
    rank0, rank1 = run(tmp_path, "fsdp", "--clip", "--nan", "--dcp")
    assert rank0["qk_clip_armed"] == rank1["qk_clip_armed"] == ["blocks.0", "blocks.1"]
    assert rank0["actions"] == rank1["actions"]
    assert ("qk_clip", 0) in {(a["name"], a["step"]) for a in rank0["actions"]}
    assert (12, "rollback") in {(a["step"], a["name"]) for a in rank0["actions"]}
    for step in ("5", "10"):
        assert rank0["metrics"][step]["attention/max_logit"] < 4.0 * 1.1  # held at tau on the sharded weights
    assert rank0["metrics"]["4"]["actions/qk_clip_count"] > 0
    assert (tmp_path / "snapshots" / "stabmon-snapshot-dcp").is_dir()
    for r in (rank0, rank1):
        assert r["hash_after"]["12"] == r["hash_after"]["10"]


MODEL_PARALLEL = Path(__file__).with_name("model_parallel_run.py")


def run_lightning(tmp_path, mode, *flags):
    env = {**os.environ, "STABMON_STRICT": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(MODEL_PARALLEL), str(tmp_path), mode, *flags], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    names = ["mp_single0"] if mode == "single" else ["mp_fsdp0", "mp_fsdp1"]
    return [json.loads((tmp_path / f"{n}.json").read_text()) for n in names]


def test_lightning_model_parallel_strategy_logs_the_norms_of_the_unsharded_model(tmp_path):
    rank0, rank1 = run_lightning(tmp_path, "fsdp")
    (single,) = run_lightning(tmp_path, "single")
    assert rank0["metrics"].keys() == single["metrics"].keys()
    compared = 0
    for step, reference in single["metrics"].items():
        for key, value in reference.items():
            if key.startswith(("gradients/", "params/", "update/", "loss/")):
                assert rank0["metrics"][step][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (step, key)
                compared += 1
        assert rank0["metrics"][step] == rank1["metrics"][step]
    assert compared > 200
    # Finite-difference HVPs in float32 on a tiny model: the estimates agree to a few percent.
    for step in ("0", "10", "20"):
        assert rank0["metrics"][step]["sharpness/top_eigenvalue"] == pytest.approx(
            single["metrics"][step]["sharpness/top_eigenvalue"], rel=0.1)


def test_lightning_model_parallel_strategy_takes_the_same_action_on_every_rank(tmp_path):
    rank0, rank1 = run_lightning(tmp_path, "fsdp", "--spike")
    assert [(a["step"], a["name"]) for a in rank0["actions"]] == [(15, "skip_step")]
    assert rank0["actions"] == rank1["actions"] and rank0["findings"] == rank1["findings"]
