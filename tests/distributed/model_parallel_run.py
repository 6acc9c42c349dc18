"""Run by test_fsdp.py: ``StabilityMonitor`` in a Lightning fit with ``ModelParallelStrategy``
(FSDP2 through ``configure_model``) on 2 CPU ranks (gloo), or the same model unsharded in one
process on both ranks' batches side by side. Each process writes the metrics its monitor
emitted and what it did.

    python model_parallel_run.py OUT_DIR [fsdp | single] [--spike]

--spike multiplies rank 1's loss by 1000 at step 15.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import pytorch_lightning as pl  # noqa: E402

from stabmon import DetectionConfig, InterventionConfig, SharpnessConfig, StabilityMonitor  # noqa: E402
from tests.distributed.fsdp_run import STEPS, WORLD, batch  # noqa: E402
from tests.interventions.attention_zoo import Stack  # noqa: E402


class Batches(IterableDataset):
    """The batches of fsdp_run.py: rank r's own at every step, or every rank's side by side."""

    def __init__(self, sharded: bool) -> None:
        self.sharded = sharded

    def __iter__(self):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        for step in range(STEPS):
            data = [batch(step, r) for r in ([rank] if self.sharded else range(WORLD))]
            yield torch.cat([x for x, _ in data]), torch.cat([y for _, y in data])


class ShardedLM(pl.LightningModule):
    def __init__(self, sharded: bool, spike: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = Stack("nanogpt_fused_c_attn")
        self.sharded, self.spike = sharded, spike

    def configure_model(self) -> None:
        if not self.sharded:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for block in self.model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def training_step(self, data, batch_idx):
        x, y = data
        loss = F.cross_entropy(self.model(x).reshape(-1, 32), y.reshape(-1))
        if self.spike and self.global_step == 15 and self.global_rank == 1:
            loss = loss * 1000.0
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


class RecordingMonitor(StabilityMonitor):
    """Keeps every emission by step."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.emitted: dict[int, dict[str, float]] = {}

    def _emit(self, trainer, step, metrics):
        self.emitted[step] = dict(metrics)
        super()._emit(trainer, step, metrics)


def main(out_dir: str, mode: str, flags: set[str]) -> None:
    from pytorch_lightning.strategies import ModelParallelStrategy

    sharded = mode == "fsdp"
    monitor = RecordingMonitor(
        sample_every_n_steps=5, sharpness_every_n_steps=10, verbose=False, strict=True,
        # the held batch: each rank its own 4 rows, or both ranks' rows side by side
        sharpness=SharpnessConfig(every_n_steps=10, batch_size=4 if sharded else 4 * WORLD, hvp_mode="finite_difference", iters=12, tol=1e-3),
        detection=DetectionConfig(spike_warmup=8, spike_window=50),
        intervention=InterventionConfig(qk_clip_tau=None, snapshot_every_n_steps=5, grace_steps=2, cooldown=3),
    )
    strategy = ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1) if sharded else "auto"
    trainer = pl.Trainer(accelerator="cpu", devices=WORLD if sharded else 1, strategy=strategy, max_steps=STEPS,
                         log_every_n_steps=5, logger=False, callbacks=[monitor], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(ShardedLM(sharded, "--spike" in flags), DataLoader(Batches(sharded), batch_size=None))
    record = {
        "rank": trainer.global_rank,
        "metrics": {str(k): v for k, v in monitor.emitted.items()},
        "actions": [a.to_dict() for a in monitor.actions_taken],
        "findings": [(f.step, f.signal, f.severity) for f in monitor.findings],
    }
    with open(os.path.join(out_dir, f"mp_{mode}{trainer.global_rank}.json"), "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], sys.argv[2], set(sys.argv[3:]))
