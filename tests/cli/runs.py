"""Real short runs that write real logs, for the tests of ``stabmon inspect``."""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

from stabmon import DetectionConfig, StabilityMonitor
from tests.helpers import Faulty, token_loader

SPIKE_STEP = 50


class Logged(Faulty):
    """The test LM that logs its loss every step as ``train_loss``, as most LightningModules do."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss, on_step=True)
        return loss


def lightning_run(tmp_path, logger: str = "csv", spike: int | None = SPIKE_STEP, monitor: bool = True,
                  steps: int = 80) -> StabilityMonitor | None:
    """A fit of ``steps`` steps logged by a CSVLogger or a TensorBoardLogger every step, with the
    loss multiplied by 1000 at ``spike``; watched by ``StabilityMonitor`` unless ``monitor`` is False."""
    pl.seed_everything(0)
    log = CSVLogger(tmp_path) if logger == "csv" else TensorBoardLogger(tmp_path)
    watch = StabilityMonitor(sample_every_n_steps=10, sharpness_every_n_steps=None, verbose=False,
                             detection=DetectionConfig(spike_warmup=20)) if monitor else None
    trainer = pl.Trainer(max_steps=steps, logger=log, log_every_n_steps=1, callbacks=[watch] if watch else [],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", devices=1)
    trainer.fit(Logged({spike: 1000.0} if spike is not None else {}, lr=0.05), token_loader(n=1000))
    return watch
