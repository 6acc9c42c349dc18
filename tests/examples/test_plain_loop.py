import importlib.util
import math
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_plain_loop_skips_the_bad_batch_and_rolls_back_the_blow_up(capsys):
    spec = importlib.util.spec_from_file_location("plain_loop", ROOT / "examples" / "plain_loop.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    core = module.main()
    assert [(a.step, a.name) for a in core.actions_taken] == [(150, "skip_step"), (300, "skip_step"), (301, "rollback"),
                                                                 (301, "lr_cut")]
    assert all(f.severity == "critical" for f in core.findings)  # no false alarm on the healthy stretches
    assert math.isfinite(core.run_summary.latest["loss/mean"]) and core.run_summary.latest["loss/mean"] < 0.1
    assert "rollback" in capsys.readouterr().out


def test_plain_loop_under_fsdp_on_two_processes(tmp_path):
    import os
    import subprocess
    import sys

    import pytest

    pytest.importorskip("torch.distributed.fsdp")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "examples" / "plain_loop.py"), "--fsdp"], capture_output=True, text=True,
                          env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, f"{proc.stdout[-1500:]}\n{proc.stderr[-6000:]}"  # faulthandler: where it aborted
    out = proc.stdout
    for expected in ("step  150 skip_step", "step  300 skip_step", "step  301 rollback"):
        assert expected in out, out[-3000:]
    assert out.count("actions:") == 1  # printed by the first process only
    assert proc.stderr.count("action rollback") == 1  # and logged by it only
