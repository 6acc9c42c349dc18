"""Run by test_fsdp.py: a plain training loop with MonitorCore on a model sharded with
``fully_shard`` (FSDP2) over 2 gloo ranks, or the same model unsharded in one process on the
same data (both ranks' batches side by side). Writes one JSON record per process.

    python fsdp_run.py OUT_DIR [fsdp | single] [--spike] [--nan] [--clip] [--dcp] [--sgd] [--gradclip]

--spike multiplies rank 1's loss by 1000 at step 15, --nan makes it NaN at steps 11 and 12 (a
rollback to the snapshot of step 10), --clip starts with large attention logits and QK-clip at
tau = 4, --dcp keeps the snapshots on disk (torch.distributed.checkpoint when sharded),
--sgd trains with SGD (lr 0.5), whose steps scale with the gradient (Adam's hardly do), and
--gradclip has the monitor clip the gradients to a global norm of 0.05 (``clip_grad_norm``),
--qkln uses qk-layernorm blocks with random gains (their norms are signals).
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
from tests.interventions.attention_zoo import QKNorm, Stack, grow_logits  # noqa: E402

WORLD, STEPS, ROWS, SEQ = 2, 24, 4, 8


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(32, (ROWS, SEQ + 1), generator=torch.Generator().manual_seed(1000 * step + rank))
    return tokens[:, :-1], tokens[:, 1:]


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(local_tensor(t).detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def optimizer_tensors(opt):
    return [v for p in (q for g in opt.param_groups for q in g["params"]) for v in opt.state.get(p, {}).values()
            if isinstance(v, torch.Tensor)]


def train(out_dir: str, mode: str, flags: set[str], rank: int) -> None:
    sharded = mode == "fsdp"
    torch.manual_seed(0)
    model = Stack("nanogpt_fused_c_attn")
    if "--qkln" in flags:
        model.blocks = torch.nn.ModuleList([QKNorm() for _ in model.blocks])
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "_ln." in name:
                    p.uniform_(0.5, 2.0)
    if "--clip" in flags:
        grow_logits(model, 30.0)
    if sharded:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5) if "--sgd" in flags else torch.optim.AdamW(model.parameters(), lr=3e-3)
    ranks = [rank] if sharded else list(range(WORLD))
    held = [batch(0, r) for r in ranks]
    held_x, held_y = torch.cat([x for x, _ in held]), torch.cat([y for _, y in held])

    def held_loss() -> torch.Tensor:
        logits = model(held_x)
        return F.cross_entropy(logits.reshape(-1, 32), held_y.reshape(-1))

    core = MonitorCore(
        model, sample_every_n_steps=5, log_every_n_steps=5, strict=True,
        clip_grad_norm=0.05 if "--gradclip" in flags else None,
        sharpness=SharpnessConfig(every_n_steps=10, hvp_mode="finite_difference", iters=12, tol=1e-3),
        detection=DetectionConfig(spike_warmup=8, spike_window=50),
        intervention=InterventionConfig(qk_clip_tau=4.0 if "--clip" in flags else None, snapshot_every_n_steps=5,
                                        skip_batches=2, grace_steps=2, cooldown=3,
                                        snapshot_dir=os.path.join(out_dir, "snapshots") if "--dcp" in flags else None),
    )
    record = {"rank": rank, "metrics": {}, "hash_after": {}}
    for step in range(STEPS):
        data = [batch(step, r) for r in ranks]
        x, y = torch.cat([d[0] for d in data]), torch.cat([d[1] for d in data])

        def loss_of_batch() -> torch.Tensor:
            loss = F.cross_entropy(model(x).reshape(-1, 32), y.reshape(-1))
            if "--spike" in flags and step == 15 and rank == 1:
                loss = loss * 1000.0
            if "--nan" in flags and step in (11, 12) and rank == 1:
                loss = loss * float("nan")
            return loss

        metrics = monitored_step(core, step, loss_of_batch, opt, held_loss)
        if metrics:
            record["metrics"][step] = metrics
        record["hash_after"][step] = digest(list(model.parameters()) + optimizer_tensors(opt))
    record["actions"] = [a.to_dict() for a in core.actions_taken]
    record["findings"] = [(f.step, f.signal, f.severity) for f in core.findings]
    record["qk_clip_armed"] = sorted(core.responder.qk_clip.armed) if core.responder.qk_clip is not None else []
    record["params"] = {n: float(torch.linalg.vector_norm(local_tensor(p).detach().double()) ** 2)
                        for n, p in model.named_parameters()}
    with open(os.path.join(out_dir, f"{mode}{rank}.json"), "w") as f:
        json.dump(record, f)


def worker(rank: int, out_dir: str, flags: set[str], port: int) -> None:
    import faulthandler

    faulthandler.enable()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        train(out_dir, "fsdp", flags, rank)
        dist.barrier()  # no rank tears its connections down while another still talks (see plain_loop.py)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    out, mode, flags = sys.argv[1], sys.argv[2], set(sys.argv[3:])
    if mode == "fsdp":
        port = 29500 + os.getpid() % 1000
        mp.spawn(worker, args=(out, flags, port), nprocs=WORLD)
    else:
        torch.set_num_threads(1)
        train(out, "single", flags, 0)
