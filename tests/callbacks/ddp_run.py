"""Run by test_stability_monitor_actions.py in a subprocess: a 2-rank gloo DDP fit with a
loss spike injected on rank 1 only. Each rank writes what its monitor found and did.
``fp16``: under fp16 mixed precision with a GradScaler whose high initial scale makes the
first steps overflow.

    python ddp_run.py OUT_DIR [pytorch_lightning | lightning.pytorch] [fp16]
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from stabmon import DetectionConfig, StabilityMonitor  # noqa: E402
from tests.helpers import lightning, token_loader  # noqa: E402


def main(out_dir: str, namespace: str, fp16: bool = False) -> None:
    lit = lightning(namespace)

    class SpikeOnRankOne(lit.TinyLM):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            if self.global_step == 25 and self.global_rank == 1:
                loss = loss * 1000.0
            return loss

    lit.ns.seed_everything(0)
    monitor = StabilityMonitor(sample_every_n_steps=10, detection=DetectionConfig(spike_warmup=10),
                               sharpness_every_n_steps=10, verbose=False)
    assert isinstance(monitor, lit.ns.Callback)
    plugins = ([lit.ns.plugins.precision.MixedPrecision("16-mixed", "cpu",
                                                        scaler=torch.amp.GradScaler("cpu", init_scale=2.0**24))]
               if fp16 else [])
    trainer = lit.ns.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=35, logger=False,
                             callbacks=[monitor], enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, plugins=plugins)
    trainer.fit(SpikeOnRankOne(lr=0.05), token_loader(n=640, batch_size=8))
    record = {
        "rank": trainer.global_rank,
        "actions": [a.to_dict() for a in monitor.actions_taken],
        "findings": [(f.step, f.signal, f.severity) for f in monitor.findings],
        "weights": float(sum(p.double().sum() for p in trainer.lightning_module.parameters())),
        "sharpness": monitor.latest_metrics.get("sharpness/top_eigenvalue"),
        "overflow_steps": monitor.core.run_summary.totals["gradients/overflow_steps"],
        "loss_scale": monitor.latest_metrics.get("gradients/loss_scale"),
    }
    with open(os.path.join(out_dir, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "pytorch_lightning", "fp16" in sys.argv[3:])
