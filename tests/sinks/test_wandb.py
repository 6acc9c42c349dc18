"""W&B offline: what the monitor wrote, read back from the run's transaction log."""

import json
import shutil
import subprocess

from pathlib import Path

import pytest
import pytorch_lightning as pl

from stabmon import StabilityMonitor
from stabmon.alerts import WandbAlert
from stabmon.sinks import render_heatmap
from tests.callbacks.test_stability_monitor_actions import FAST
from tests.helpers import Faulty, lightning, quiet_trainer, token_loader

wandb = pytest.importorskip("wandb")


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
        (tmp_path / var.lower()).mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield tmp_path / "wandb_dir"
    if wandb.run is not None:
        wandb.finish()


def read_records(run_dir):
    exe = shutil.which("wandb")
    out = subprocess.run([exe, "leet", "inspect", "--json", str(run_dir)], capture_output=True, text=True, timeout=60)
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("namespace", ["pytorch_lightning", "lightning.pytorch"])
def test_dashboard_extras_and_alerts_offline(offline_wandb, namespace):
    pytest.importorskip(namespace)
    lit = lightning(namespace)
    logger = lit.ns.loggers.WandbLogger(project="stabmon-test", save_dir=str(offline_wandb), offline=True)
    monitor = StabilityMonitor(alerts=[WandbAlert(wait_duration=1)], wandb_heatmap_every_n_steps=10, **FAST)
    lit.quiet_trainer(max_steps=24, callbacks=[monitor], logger=logger).fit(lit.Faulty({20: 1000.0}),
                                                                             token_loader(n=400))
    assert monitor.wandb is not None and monitor.wandb.run is logger.experiment  # found through the logger
    run_dir = logger.experiment.dir.rsplit("/files", 1)[0]
    summary = dict(logger.experiment.summary)
    wandb.finish()
    records = read_records(run_dir)
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    keys = {k.split(".")[0] for k in set().union(*history)}  # media are flattened: "<key>._type", "<key>.path"
    # one section per family; per-layer signals as one line-series chart each, not a chart per layer
    assert "stabmon-attention/entropy_min" in keys and "stabmon-gradients/norm" in keys
    assert not any(k.endswith("/layer_00") for k in keys)
    assert "stabmon-attention/max_logit/by_layer_table" in keys and "stabmon-gradients/norm/by_layer_table" in keys
    assert "stabmon-attention/entropy_heatmap" in keys and "stabmon-attention/heads" in keys
    assert "stabmon-actions/events" in keys and "stabmon-actions/event" in keys
    metrics = [r["metric"] for r in records if r["type"] == "metric"]
    assert any(m.get("glob_name") == "stabmon-attention/entropy_min*" and m["summary"].get("min") for m in metrics)
    alerts = [r["alert"] for r in records if r["type"] == "alert"]
    assert alerts and alerts[0]["level"] == "ERROR" and "step 20" in alerts[0]["title"]
    assert "skip_step" in alerts[0]["text"]
    images = list((offline_wandb).rglob("*.png"))
    assert len(images) >= 2
    assert "stabmon-attention/max_logit" in summary
    # the last line-series table of the max logit holds every sample of both layers
    tables = sorted(Path(run_dir).rglob("by_layer_table_*.table.json"), key=lambda p: int(p.name.split("_")[3]))
    last = json.loads([t for t in tables if "max_logit" in str(t)][-1].read_text())
    assert last["columns"] == ["step", "lineKey", "lineVal"]
    lines = {row[1] for row in last["data"]}
    steps = sorted({row[0] for row in last["data"] if row[1] == "layer_00"})
    assert lines == {"layer_00", "layer_01"} and steps == [0, 1, 2, 4, 8, 10, 20]  # early samples at powers of two


def test_other_loggers_skip_the_wandb_extras_silently(tmp_path):
    monitor = StabilityMonitor(**FAST)
    quiet_trainer(max_steps=3, callbacks=[monitor], logger=pl.loggers.CSVLogger(tmp_path)).fit(
        Faulty({}), token_loader())
    assert monitor.wandb is None


def test_heatmap_renders_a_png(tmp_path):
    img = render_heatmap([[3.1, 2.0, 0.2], [3.5, 3.0, float("nan")]], title="entropy", row_labels=["L00", "L01"])
    path = tmp_path / "h.png"
    img.save(path)
    assert path.stat().st_size > 200
