"""Run by test_qk_clip_fit.py in a subprocess: a 2-rank gloo DDP fit in which QK-clip acts.

Each rank sees other data (so its own per-head maxima differ); the clip must use the
all-reduced maxima, leaving the replicas bit-identical. Each rank writes what it did."""

import hashlib
import json
import os
import sys

import pytorch_lightning as pl
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tests.callbacks.test_qk_clip_fit import ClipLM, monitor  # noqa: E402
from tests.helpers import token_loader  # noqa: E402


def main(out_dir: str) -> None:
    pl.seed_everything(0)
    mon = monitor()
    clips = []

    class Count(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            clipped = mon.core.responder.qk_clip.clipped_heads if mon.core.responder.qk_clip is not None else 0
            clips.append(float(clipped))

    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=15, logger=False,
                         callbacks=[mon, Count()], enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(ClipLM(), token_loader(n=640, seq=8, batch_size=8))
    weights = torch.cat([p.detach().flatten() for p in trainer.lightning_module.parameters()])
    record = {"rank": trainer.global_rank, "clips": sum(clips),
              "actions": [a.to_dict() for a in mon.actions_taken],
              "weights": hashlib.sha256(weights.numpy().tobytes()).hexdigest()}
    with open(os.path.join(out_dir, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
