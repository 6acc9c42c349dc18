"""stabmon without Lightning: the detectors and the policy watching a hand-written loop.

    python examples/plain_loop.py
    torchrun --nproc_per_node=2 examples/plain_loop.py --fsdp     # the model sharded with FSDP2

A small MLP regression trained with SGD; at step 150 a corrupted batch (targets x 1000)
hits it, and at steps 300-301 the loss turns NaN. The monitor skips the bad step, rolls
back to the last healthy snapshot when the trouble repeats, and the run ends healthy.

With ``--fsdp`` every process holds a shard of the model (``torch.distributed.fsdp.fully_shard``,
gloo on CPU, NCCL on GPUs) and trains on its own batches; the bad batch and the NaN hit the
first process only. The monitor's norms are those of the whole model, every process takes the
same action at the same step, and the rollback restores each process's shards.
"""

from __future__ import annotations

import gc
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from stabmon import DetectionConfig, InterventionConfig, MonitorCore


def main(steps: int = 400, fsdp: bool = False) -> MonitorCore:
    rank = 0
    if fsdp:
        import torch.distributed as dist
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank = dist.get_rank()
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch.manual_seed(0)  # the same initial weights everywhere
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    if fsdp:
        fully_shard(model[0])
        fully_shard(model[2])
        fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(rank)  # each process its own batches
    w_true = torch.randn(8, 1, generator=torch.Generator().manual_seed(0))
    core = MonitorCore(  # after fully_shard: the monitor sees the sharded parameters
        model,
        sample_every_n_steps=50,
        log_every_n_steps=50,
        detection=DetectionConfig(spike_warmup=30),
        intervention=InterventionConfig(snapshot_every_n_steps=50, skip_batches=5),
    )
    device = torch.device("cuda") if fsdp and torch.cuda.is_available() else torch.device("cpu")
    for step in range(steps):
        x = torch.randn(32, 8, generator=gen)
        y = x @ w_true
        if step == 150 and rank == 0:
            y = y * 1000  # a corrupted batch
        x, y = x.to(device), y.to(device)
        core.start_step(step)
        core.observe_batch((x, y), lambda batch: F.mse_loss(model(batch[0]), batch[1]))  # for the forensics
        loss = F.mse_loss(model(x), y)
        if step in (300, 301) and rank == 0:
            loss = loss * float("nan")  # a numerical blow-up
        core.end_forward()
        core.observe_loss(loss)
        opt.zero_grad()
        loss.backward()
        core.before_optimizer_step(optimizer=opt)
        opt.step()
        core.after_optimizer_step()
        metrics = core.end_step()
        if metrics and rank == 0:
            print(f"step {step:4d} | loss {metrics.get('loss/mean', float('nan')):.4f}"
                  f" | grad norm max {metrics.get('gradients/norm_max', float('nan')):.3f}"
                  f" | LR factor {metrics['actions/lr_factor']:.2f}")
    if rank == 0:
        print("\nfindings:")
        for f in core.findings:
            print(f"  step {f.step:4d} {f.severity:8s} {f.message}")
        print("actions:")
        for a in core.actions_taken:
            print(f"  step {a.step:4d} {a.name:9s} {a.detail}")
        for record in core.forensics:
            print(f"forensics: {record.headline()}")
        print()
        print(core.summary())
    core.close()  # the monitor's hooks come off the model
    if fsdp:
        torch.distributed.barrier()  # no rank tears its connections down while another still talks
        torch.distributed.destroy_process_group()
    return core


if __name__ == "__main__":
    unknown = [a for a in sys.argv[1:] if a != "--fsdp"]
    if unknown:
        raise SystemExit(f"unknown arguments {unknown}; the only option is --fsdp (run it with torchrun)")
    main(fsdp="--fsdp" in sys.argv[1:])
    # The sharded parameters hold the process group through their device mesh; free them now,
    # while the interpreter is whole, not during its shutdown (gloo's threads may abort then).
    gc.collect()
