"""The forensics in the trainers, the batch captured without a change to the user's code: the
Lightning callback (records and skip list in the logger's directory, the alert names the row,
a skip list given to a new fit) and the Hugging Face Trainer."""

import json

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from stabmon import DetectionConfig, InterventionConfig, StabilityMonitor
from stabmon.alerts import AlertChannel
from stabmon.data import item_fingerprint
from tests.forensics.loop import POISON_ROW, POISON_STEP
from tests.helpers import TinyLM, quiet_trainer

DETECTION = DetectionConfig(spike_warmup=30, spike_z_critical=7)


class Collect(AlertChannel):
    def __init__(self):
        self.sent = []

    def send(self, alert):
        self.sent.append(alert)


def copy_data(poison: bool = True, steps: int = POISON_STEP + 10, rows: int = 8) -> TensorDataset:
    """The copy task as a dataset; the item that lands at row POISON_ROW of step POISON_STEP
    (no shuffle) is one byte repeated with shuffled targets."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(32, (steps * rows, 12), generator=gen)
    y = x.clone()
    if poison:
        i = POISON_STEP * rows + POISON_ROW
        x[i], y[i] = 7, torch.randperm(32, generator=gen)[:12]
    return TensorDataset(x, y)


class CopyLM(TinyLM):
    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def fit(tmp_path, data, **monitor_kwargs):
    pl.seed_everything(0)
    alerts = Collect()
    monitor = StabilityMonitor(sample_every_n_steps=50, sharpness_every_n_steps=None, verbose=False, alerts=[alerts],
                               detection=DETECTION, intervention=InterventionConfig(qk_clip_tau=None), **monitor_kwargs)
    trainer = quiet_trainer(max_steps=len(data) // 8, callbacks=[monitor], logger=CSVLogger(tmp_path),
                            default_root_dir=tmp_path)
    trainer.fit(CopyLM(), DataLoader(data, batch_size=8))
    return monitor, trainer, alerts


def test_lightning_writes_the_record_and_the_skip_list_where_its_logger_writes(tmp_path):
    data = copy_data()
    monitor, trainer, alerts = fit(tmp_path, data)
    poisoned = item_fingerprint(data[POISON_STEP * 8 + POISON_ROW])
    (record,) = monitor.core.forensics
    assert record.rows[0].fingerprint == poisoned and record.rows[0].position == POISON_ROW
    assert record.verdict == "reproducible" and (record.epoch, record.batch_index) == (0, POISON_STEP)
    log_dir = tmp_path / "lightning_logs" / "version_0"
    assert (log_dir / "stabmon-forensics" / f"step_{POISON_STEP}.json").is_file()
    assert [e["fingerprint"] for e in json.loads((log_dir / "stabmon-skip.json").read_text())["entries"]] == [poisoned]
    (alert,) = [a for a in alerts.sent if a.step == POISON_STEP][:1]
    assert "forensics: step 250" in alert.text and f"fingerprint {poisoned}" in alert.text and "reproducible" in alert.text
    assert "forensics: 1 events (1 reproducible)" in monitor.summary()
    assert monitor.state_dict()["forensics"]["skip_list"][0]["fingerprint"] == poisoned  # kept in checkpoints
    from stabmon.cli import main  # and the report of `stabmon inspect` shows the record

    assert main(["inspect", str(log_dir), "--html", str(tmp_path / "report.html"), "--fail-on", "never"]) == 0
    report = (tmp_path / "report.html").read_text()
    assert f"<tr><td class=num>{POISON_STEP}</td><td>loss/last</td><td>reproducible</td>" in report
    assert poisoned in report


def test_a_fit_given_the_skip_list_skips_the_batch_that_holds_the_row(tmp_path):
    data = copy_data()
    first, _, _ = fit(tmp_path / "first", data)
    skip_file = tmp_path / "first" / "lightning_logs" / "version_0" / "stabmon-skip.json"
    second, _, _ = fit(tmp_path / "second", data, skip_list=str(skip_file))
    assert not [f for f in second.findings if f.step == POISON_STEP]
    assert [(a.step, a.name, a.detail) for a in second.actions_taken] == [
        (POISON_STEP, "skip_step", "the batch holds a row of the skip list")]
    assert second.core.forensics == []


def test_the_hugging_face_trainer_captures_the_batch_itself(tmp_path):
    transformers = pytest.importorskip("transformers")
    from stabmon.integrations.transformers import StabilityMonitorCallback
    from tests.integrations.test_transformers import tiny_llama

    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(64, (3200, 1), generator=gen)
    ids = (starts + torch.arange(16)) % 64  # counting up from a random start: learnt in a few hundred steps
    data = [{"input_ids": row, "labels": row.clone()} for row in ids]
    monitor = StabilityMonitorCallback(sample_every_n_steps=50, sharpness_every_n_steps=None, verbose=False,
                                       detection=DETECTION, intervention=InterventionConfig(qk_clip_tau=None))
    args = transformers.TrainingArguments(str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=360,
                                          logging_steps=50, report_to=[], save_strategy="no", learning_rate=3e-3,
                                          use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0,
                                          remove_unused_columns=False, lr_scheduler_type="constant")

    class InOrder(transformers.Trainer):  # the data in order, so the test knows its step (the monitor needs nothing)
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    step, row = 350, 3
    poisoned = step * 8 + row
    data[poisoned] = {"input_ids": torch.full((16,), 5), "labels": torch.randperm(64, generator=gen)[:16]}
    trainer = InOrder(model=tiny_llama(), args=args, train_dataset=data, callbacks=[monitor])
    trainer.train()
    record = next(r for r in monitor.core.forensics if r.step == step)
    assert (record.rows[0].position, record.rows[0].fingerprint) == (row, item_fingerprint(data[poisoned]))
    assert record.rows[0].loss_share > 0.9 and record.verdict == "reproducible"
    assert (tmp_path / "out" / "stabmon-forensics" / f"step_{step}.json").is_file()
