"""Run by test_ddp.py: the copy-task loop of ``loop.py`` under 2-rank gloo DDP, each rank on its own
batches, one row poisoned on rank 1 only at ``POISON_STEP``. Each rank writes its records, actions,
skip list and a hash of its weights.

    python ddp_forensics.py OUT_DIR
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tests.forensics.loop import POISON_STEP, batches, loss_of, make  # noqa: E402
from tests.helpers import monitored_step  # noqa: E402


def train(out_dir: str, rank: int) -> None:
    model, opt, core = make(run_dir=out_dir if rank == 0 else None)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    core = type(core)(ddp, options=core.options)  # the monitor watches the DDP model, as a user's would
    for step, batch in batches(POISON_STEP + 5, poison_step=POISON_STEP if rank == 1 else None, seed=rank):
        x, y = batch
        monitored_step(core, step, lambda: torch.nn.functional.cross_entropy(ddp(x).reshape(-1, 32), y.reshape(-1)),
                       opt, before_forward=lambda: core.observe_batch(  # the replay: the module itself
                           batch, loss_of(model), epoch=0, batch_index=step))
    weights = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
    record = {"records": [r.to_dict() for r in core.forensics], "actions": [a.to_dict() for a in core.actions_taken],
              "skip_list": core.responder.forensics.skip_list.state_dict(), "weights": weights,
              "disabled": sorted(core.guard.disabled)}
    for r in record["records"]:
        r.pop("seconds")
        r.pop("path")
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)


def worker(rank: int, out_dir: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        train(out_dir, rank)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(sys.argv[1], 29500 + os.getpid() % 1000), nprocs=2)
