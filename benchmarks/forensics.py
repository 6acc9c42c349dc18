"""What one forensic investigation costs, in training steps of the example GPT.

    python benchmarks/forensics.py                 # the example at its defaults (batch 16, context 128)
    python benchmarks/forensics.py --batch_size=4 --repeats=5

A plain loop trains the example's GPT (its model, data and AdamW) and, at a few steps after
warm-up, right before the optimizer step, times one investigation as the monitor runs it on a
finding: the replay forward and backward of the batch with every row's loss, the forward and
backward of each of the 8 highest-loss rows alone, and (for a non-finite finding) the forward
with a hook on every module. Its time is set against the median training step of the same run
(forward, backward, optimizer step). Writes ``benchmarks/out/forensics.json``.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.nn.functional as F

from _common import load_example, machine, markdown_table, parse_options, write_json
from stabmon.detectors import Finding
from stabmon.forensics import Forensics, ForensicsConfig


def main(argv: list[str]) -> None:
    opts = parse_options(argv, __doc__, values=("batch_size", "repeats", "steps"))
    example = load_example()
    cfg = example.Config(batch_size=int(opts.get("batch_size", 16)), max_steps=int(opts.get("steps", 80)))
    torch.manual_seed(cfg.seed)
    loader, _ = example.make_data(cfg)
    model = example.GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    forensics = Forensics(model, ForensicsConfig(max_events=10**6))

    def loss_of(batch):
        x, y = batch
        return F.cross_entropy(model(x).view(-1, 256), y.view(-1))

    repeats = int(opts.get("repeats", 3))
    step_times, spike, nonfinite = [], [], []
    for step, batch in enumerate(loader):
        start = time.perf_counter()
        forensics.hold(step, batch, loss_of)
        loss = loss_of(batch)
        loss.backward()
        step_time = time.perf_counter() - start
        if step >= 40 and step % 10 == 0 and len(spike) < repeats:
            for finding, times in ((Finding(step, "loss/last", "critical", 9.0, 3.0, "spike", "loss_spike"), spike),
                                   (Finding(step, "loss/last", "critical", float("nan"), float("inf"), "nan",
                                            "nonfinite"), nonfinite)):
                t0 = time.perf_counter()
                forensics.investigate(step, [finding], step_loss=float(loss.detach()), step_grad_norm=1.0)
                times.append(time.perf_counter() - t0)
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad()
        step_times.append(step_time + time.perf_counter() - t1)
    step_ms = 1000 * statistics.median(step_times[10:])
    rows = [[name, f"{1000 * statistics.median(t):.0f}", f"{1000 * min(t):.0f} .. {1000 * max(t):.0f}",
             f"{statistics.median(t) / (step_ms / 1000):.1f}"] for name, t in (("spike", spike), ("non-finite", nonfinite))]
    table = markdown_table(["investigation", "ms (median)", "range", "training steps"], rows)
    print(f"the example GPT, batch {cfg.batch_size} x {cfg.block_size}: a training step takes {step_ms:.0f} ms")
    print(table)
    info = machine()
    path = write_json("forensics", {"machine": info, "batch_size": cfg.batch_size, "step_ms": step_ms,
                                    "spike_s": spike, "nonfinite_s": nonfinite, "table": table})
    print(f"\n{info['device']}, {info['date']}; JSON in {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
