"""Run by test_faults.py: a plain training loop with MonitorCore over 2 gloo ranks (DDP, or the
model sharded with FSDP2's ``fully_shard``), with a fault in one stage of the monitor on rank 1
only, from step ``FAULT_FROM`` on. Each rank writes what it saw: the stages switched off and the
step each went off, the metrics it emitted, its actions, and a hash of its parameters after
every step (of its shards under FSDP2).

    python fault_run.py OUT_DIR [ddp | fsdp] [none | signals | sharpness | qk-clip | step-read | detection]

signals: the attention probe raises on rank 1 (its signals are missing there at the next
emission); sharpness: the probe runs out of memory on rank 1 (DDP: in its forward; FSDP2: in
its memory check before the estimate, since FSDP2's all-gathers inside the estimate would
leave the other rank waiting); qk-clip: the per-step max-logit measurement of an armed layer
raises; step-read: the step's read of the gradient norms raises before its all-reduce;
detection: the per-step detectors raise.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from stabmon import DetectionConfig, InterventionConfig, MonitorCore, SharpnessConfig  # noqa: E402
from stabmon.distributed import local_tensor  # noqa: E402
from tests.helpers import monitored_step  # noqa: E402
from tests.interventions.attention_zoo import Stack, grow_logits  # noqa: E402

WORLD, STEPS, ROWS, SEQ, FAULT_FROM = 2, 24, 4, 8, 7


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(32, (ROWS, SEQ + 1), generator=torch.Generator().manual_seed(1000 * step + rank))
    return tokens[:, :-1], tokens[:, 1:]


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(local_tensor(p).detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def inject(stage: str, mode: str, clock: dict[str, int]) -> None:
    """Make the stage's code raise on this rank from ``FAULT_FROM`` on."""
    import stabmon.detectors as detectors
    import stabmon.interventions.qk_layer as qk_layer
    import stabmon.probes.attention as attention
    import stabmon.probes.gradients as gradients
    import stabmon.probes.sharpness as sharpness

    target = {
        "signals": (attention.AttentionProbe, "observe", RuntimeError("attention kernel fault")),
        "sharpness": (sharpness.SharpnessProbe, "preflight" if mode == "fsdp" else "measure",
                      torch.OutOfMemoryError("out of memory in the sharpness probe")),
        "qk-clip": (qk_layer.ArmedLayer, "measure", RuntimeError("max-logit kernel fault")),
        "step-read": (gradients.GradientProbe, "squares", RuntimeError("fault in the step's read")),
        "detection": (detectors.DetectorSet, "on_step", RuntimeError("detector fault")),
    }[stage]
    cls, name, error = target
    original = getattr(cls, name)

    def faulty(*args, **kwargs):
        if clock["step"] >= FAULT_FROM:
            raise error
        return original(*args, **kwargs)

    setattr(cls, name, faulty)


def train(out_dir: str, mode: str, stage: str, rank: int) -> None:
    torch.manual_seed(0)
    model = Stack("nanogpt_fused_c_attn")
    grow_logits(model, 30.0)  # large attention logits: QK-clip arms at step 0
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        trained, inner = model, model
    else:
        trained = torch.nn.parallel.DistributedDataParallel(model)
        inner = model  # the held batch's loss runs on the module itself: no DDP hooks in the probe
    opt = torch.optim.AdamW(trained.parameters(), lr=3e-3)
    held_x, held_y = batch(0, rank)

    def held_loss() -> torch.Tensor:
        return F.cross_entropy(inner(held_x).reshape(-1, 32), held_y.reshape(-1))

    clock = {"step": 0}
    if stage != "none" and rank == 1:
        inject(stage, mode, clock)
    core = MonitorCore(
        trained, sample_every_n_steps=5, log_every_n_steps=5, strict=False,
        sharpness=SharpnessConfig(every_n_steps=5, hvp_mode="finite_difference", iters=8, tol=1e-3),
        detection=DetectionConfig(spike_warmup=8, spike_window=50),
        intervention=InterventionConfig(qk_clip_tau=4.0, snapshot_every_n_steps=5, cooldown=3),
    )
    record = {"rank": rank, "metrics": {}, "hash_after": {}, "disabled_at": {}}
    for step in range(STEPS):
        clock["step"] = step
        x, y = batch(step, rank)
        metrics = monitored_step(core, step, lambda: F.cross_entropy(trained(x).reshape(-1, 32), y.reshape(-1)), opt,
                                 held_loss)
        if metrics:
            record["metrics"][step] = {k: v for k, v in metrics.items() if k != "sharpness/seconds"}
        record["hash_after"][step] = digest(model)
        for name in core.guard.disabled:
            record["disabled_at"].setdefault(name, step)
    record["actions"] = [a.to_dict() for a in core.actions_taken]
    record["pending"] = sorted(core.guard.pending)
    with open(os.path.join(out_dir, f"{mode}{rank}.json"), "w") as f:
        json.dump(record, f)


def worker(rank: int, out_dir: str, mode: str, stage: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        train(out_dir, mode, stage, rank)
        dist.barrier()  # no rank tears its connections down while another still talks
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    out, mode, stage = sys.argv[1], sys.argv[2], sys.argv[3]
    mp.spawn(worker, args=(out, mode, stage, 29500 + os.getpid() % 1000), nprocs=WORLD)
