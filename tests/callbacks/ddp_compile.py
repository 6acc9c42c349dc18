"""Run by test_stability_monitor.py: a 2-rank gloo DDP fit of a model with a torch.compile-d
submodule, with or without the monitor; each rank writes its graph count and what it logged.

    python ddp_compile.py OUT_DIR [monitor | plain]
"""

import json
import os
import sys

import pytorch_lightning as pl
import torch
from torch._dynamo.utils import counters

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from stabmon import StabilityMonitor  # noqa: E402
from tests.helpers import TinyLM, token_loader  # noqa: E402


class Compiled(TinyLM):
    def __init__(self):
        super().__init__(layers=2)
        self.model = torch.compile(self.model, backend="aot_eager")


def main(out_dir: str, mode: str) -> None:
    pl.seed_everything(0)
    callbacks = [StabilityMonitor(sample_every_n_steps=3, sharpness_every_n_steps=5, verbose=False)] \
        if mode == "monitor" else []
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=12, logger=False,
                         callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(Compiled(), token_loader(n=640, batch_size=8))
    record = {"graphs": counters["stats"]["unique_graphs"],
              "metrics": sorted(callbacks[0].latest_metrics) if callbacks else []}
    with open(os.path.join(out_dir, f"{mode}{trainer.global_rank}.json"), "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], sys.argv[2])
