"""Run by test_snapshot.py: 2-rank gloo DDP, AdamW, one snapshot at SNAP_STEP through the Snapshotter
(in memory, or with a directory when a second argument is given), more training, then a rollback.
Each rank writes whether it kept a copy, and hashes of its weights and optimizer state at the
snapshot and after the rollback.

    python ddp_snapshot.py OUT_DIR [SNAPSHOT_DIR]

With ``STABMON_TEST_FAIL_RANK=1`` the first snapshot's fingerprint raises on rank 1 only: both
ranks must raise alike (no rank left waiting in the all-reduce) and write the error.
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

from stabmon.interventions import Snapshotter  # noqa: E402

SNAP_STEP, STEPS = 3, 8


def digest(model: torch.nn.Module, opt: torch.optim.Optimizer) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().contiguous().numpy().tobytes())
        for key, value in sorted(opt.state[p].items()):
            h.update(key.encode() + value.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def worker(rank: int, out_dir: str, snapshot_dir: str | None, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
        snap = Snapshotter(snapshot_dir, asynchronous=True)
        if os.environ.get("STABMON_TEST_FAIL_RANK") == str(rank):
            import stabmon.interventions.snapshot as snapshot_module

            def broken(tensors):  # noqa: ANN001, ANN202
                raise MemoryError("no room for the fingerprint")

            snapshot_module.fingerprint = broken
        gen = torch.Generator().manual_seed(rank)  # each rank its own batches
        at_snapshot = None
        for step in range(STEPS):
            x = torch.randn(8, 16, generator=gen)
            loss = ddp(x).pow(2).mean()
            snap.wait()  # as the monitor does before the optimizer step
            loss.backward()
            opt.step()
            opt.zero_grad()
            if step == SNAP_STEP:
                try:
                    snap.take(step, ddp, opt)
                except RuntimeError as err:
                    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
                        json.dump({"error": str(err)}, f)
                    dist.barrier()
                    return
                at_snapshot = digest(model, opt)
        before = digest(model, opt)
        restored = snap.restore(ddp, opt)
        result = {"kept_copy": snap.keeps_copy, "holds_state": snap._state is not None, "replicated": snap.replicated,
                  "at_snapshot": at_snapshot, "before_rollback": before, "after_rollback": digest(model, opt),
                  "restored_step": restored}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    import socket

    with socket.socket() as s:  # a port the system just handed out, not one derived from the pid
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    out, snapshot_dir = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
    mp.spawn(worker, args=(out, snapshot_dir, free_port()), nprocs=2)
