import importlib.util
import math
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_plain_loop_skips_the_bad_batch_and_rolls_back_the_blow_up(capsys):
    spec = importlib.util.spec_from_file_location("plain_loop", ROOT / "examples" / "plain_loop.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    core = module.main()
    assert [(a.step, a.name) for a in core.actions_taken] == [(150, "skip_step"), (300, "skip_step"), (301, "rollback")]
    assert all(f.severity == "critical" for f in core.findings)  # no false alarm on the healthy stretches
    assert math.isfinite(core.summary.latest["loss/mean"]) and core.summary.latest["loss/mean"] < 0.1
    assert "rollback" in capsys.readouterr().out
