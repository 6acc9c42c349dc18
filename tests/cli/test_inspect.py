"""``stabmon inspect`` on the logs of real runs: the findings the live monitor made, at their steps;
none on a healthy run; the HF Trainer's trainer_state.json; the exit status; --watch; bad input."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stabmon.cli import main
from stabmon.cli.inspect import KeyMap, Replay
from tests.cli.runs import SPIKE_STEP, lightning_run

ROOT = Path(__file__).resolve().parents[2]


def inspect(*args, capsys=None):
    code = main(["inspect", *map(str, args)])
    out = capsys.readouterr() if capsys is not None else None
    return code, out


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("csv")
    return path, lightning_run(path, "csv")


@pytest.mark.parametrize("logger", ["csv", "tensorboard"])
def test_a_spike_is_found_at_its_step_as_the_live_monitor_found_it(tmp_path, capsys, logger, csv_run):
    path, monitor = csv_run if logger == "csv" else (tmp_path, lightning_run(tmp_path, logger))
    code, out = inspect(path, capsys=capsys)
    assert code == 1, out.err  # a critical finding
    live = sorted((f.step, f.signal, f.severity) for f in monitor.findings)
    assert live and all(step == SPIKE_STEP for step, _, _ in live)
    table = [line.split() for line in out.out.splitlines() if line.strip().startswith(str(SPIKE_STEP))]
    assert sorted((int(r[0]), r[2], r[1]) for r in table) == live
    assert "loss/last <- train_loss" in out.out
    assert "the run's own event log: 2 findings, 1 actions (skip_step)" in out.out


def test_a_healthy_run_has_no_finding(tmp_path, capsys):
    lightning_run(tmp_path, "csv", spike=None, monitor=False)
    code, out = inspect(tmp_path, capsys=capsys)
    assert code == 0 and "no findings" in out.out and "divergence" not in out.out
    assert "loss/last <- train_loss" in out.out  # a run stabmon did not watch: its own key


def test_the_same_detectors_as_in_training():
    """Replaying the values a live monitor saw gives the findings it made (same detectors, defaults)."""
    from stabmon.detectors import DetectionConfig

    losses = [2.0 + 0.01 * math.sin(s) for s in range(120)]
    losses[90] = 50.0
    live = DetectionConfig().build()
    found_live = [f for s, x in enumerate(losses) for f in live.on_step(s, {"loss/last": x})]
    replay = Replay(DetectionConfig())
    found = replay.feed((s, {"train/loss": x}) for s, x in enumerate(losses)) + replay.finish()
    assert [(f.step, f.signal, f.severity, f.value) for f in found] == \
           [(f.step, f.signal, f.severity, f.value) for f in found_live] and found_live


def test_fail_on_and_the_detection_options(csv_run, capsys):
    path, _ = csv_run
    assert inspect(path, "--fail-on", "never", capsys=capsys)[0] == 0
    code, out = inspect(path, "--spike-z-critical", "1000", "--spike-z-warning", "999", capsys=capsys)
    assert code == 0 and "no findings" in out.out  # the thresholds are DetectionConfig's


def test_the_hugging_face_trainer_state(tmp_path, capsys):
    pytest.importorskip("transformers")
    from tests.integrations.test_transformers import tiny_llama, train

    train(tmp_path, None, steps=80, model=tiny_llama({60: 1000.0}), logging_steps=1, save_strategy="steps",
          save_steps=40)
    out_dir = tmp_path / "out"
    assert sorted(p.name for p in out_dir.glob("checkpoint-*")) == ["checkpoint-40", "checkpoint-80"]
    code, out = inspect(out_dir, capsys=capsys)
    assert code == 1
    assert "loss/last <- loss, gradients/norm <- grad_norm" in out.out
    assert "checkpoint-80/trainer_state.json (the furthest global_step)" in out.out
    # the Trainer logs a step under the global step it reaches: the optimizer step 60 is its step 61
    rows = [line.split() for line in out.out.splitlines() if line.strip().startswith("61 ")]
    assert {(r[1], r[2]) for r in rows} == {("critical", "loss/last"), ("critical", "gradients/norm")}


def test_jsonl_and_key_overrides(tmp_path, capsys):
    path = tmp_path / "run.jsonl"
    lines = [{"iteration": s, "objective": 1.0 + 0.01 * (s % 3), "note": "text"} for s in range(80)]
    lines[60]["objective"] = 80.0
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    code, out = inspect(path, capsys=capsys)
    assert code == 0 and "no loss found" in out.out  # 'objective' is no name stabmon knows
    code, out = inspect(path, "--key", "loss=objective", capsys=capsys)
    assert code == 1 and any(line.split()[:3] == ["60", "critical", "loss/last"] for line in out.out.splitlines())
    with pytest.raises(ValueError, match="--key speed=x"):
        KeyMap({"speed": "x"})


@pytest.mark.parametrize("case", ["missing", "empty", "cut", "no-step", "no-loss", "not-a-log", "bad-key"])
def test_bad_input_is_a_clear_message_and_exit_2(tmp_path, capsys, case):
    csv = tmp_path / "metrics.csv"
    args = [csv]
    if case == "missing":
        args = [tmp_path / "nowhere"]
    elif case == "empty":
        csv.write_text("")
    elif case == "cut":  # a run killed while writing: the last row is half there
        csv.write_text("step,train_loss\n0,2.5\n1,2.4\n2,2.")
    elif case == "no-step":
        csv.write_text("epoch,train_loss\n0,2.5\n")
    elif case == "no-loss":
        csv.write_text("step,val_acc\n0,0.5\n1,0.6\n")
    elif case == "not-a-log":
        args = [tmp_path / "notes.txt"]
        args[0].write_text("hello")
    elif case == "bad-key":
        csv.write_text("step,train_loss\n0,2.5\n")
        args = [csv, "--key", "loss"]
    code, out = inspect(*args, capsys=capsys)
    message = out.err + out.out
    assert "Traceback" not in message
    expected = {"missing": "no such file", "empty": "the file is empty", "no-step": "no step column",
                "not-a-log": "not a log stabmon reads", "bad-key": "--key takes SIGNAL=KEY",
                "no-loss": "no loss found", "cut": "read 2 steps (0..1)"}[case]
    assert expected in message, message
    assert code == (0 if case in ("cut", "no-loss") else 2), message
    if case not in ("cut", "bad-key"):
        assert str(args[0]) in message  # the message names the file


def test_an_event_file_cut_mid_record_keeps_what_came_before(tmp_path, capsys):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(tmp_path)
    for step in range(80):
        writer.add_scalar("train_loss", 2.0 + 0.01 * (step % 3) if step != 70 else 500.0, step)
    writer.close()
    (event,) = tmp_path.glob("events.out.tfevents.*")
    data = event.read_bytes()
    event.write_bytes(data[: len(data) - 7])  # the last record cut in the middle
    code, out = inspect(tmp_path, capsys=capsys)
    assert "Traceback" not in out.err and code == 1
    assert "read 79 steps (0..78)" in out.out and any(line.split()[:1] == ["70"] for line in out.out.splitlines())
    assert "stopped reading at a damaged or cut record" in out.out


def test_watch_follows_a_run_in_progress(tmp_path):
    csv = tmp_path / "metrics.csv"
    csv.write_text("step,train_loss\n" + "".join(f"{s},{2.0 + 0.01 * (s % 3)}\n" for s in range(60)))
    proc = subprocess.Popen([sys.executable, "-m", "stabmon", "inspect", str(csv), "--watch", "--interval", "0.2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            # a suite started in the background (`cmd &`) ignores SIGINT, and so would the child
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        time.sleep(3)
        with csv.open("a") as f:  # the run goes on and spikes
            f.write("".join(f"{s},{2.0 if s != 70 else 300.0}\n" for s in range(60, 80)))
        time.sleep(2)
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert "Traceback" not in err, err
    assert any(line.split()[:3] == ["70", "critical", "loss/last"] for line in out.splitlines()), out
    assert "read 80 steps (0..79)" in out
    assert proc.returncode == 1


def test_python_dash_m_and_the_console_script(csv_run):
    path, _ = csv_run
    for cmd in ([sys.executable, "-m", "stabmon"], [str(Path(sys.executable).with_name("stabmon"))]):
        proc = subprocess.run([*cmd, "inspect", str(path), "--fail-on", "never"], capture_output=True, text=True,
                              cwd=ROOT, timeout=120)
        assert proc.returncode == 0 and "loss/last <- train_loss" in proc.stdout, proc.stderr
