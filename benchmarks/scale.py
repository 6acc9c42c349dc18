"""The monitor's memory at the sizes users train at, and the formulas checked against measured peaks.

    python benchmarks/scale.py            # about 2 CPU minutes

Part 1, by formula (``stabmon.memory_plan``): Llama-shaped models of 125M, 1B, 7B and 70B
parameters, trained in bf16 with fp32 Adam (16 bytes of training state per parameter) and full
activation checkpointing, sequence length 4096, under DDP and FSDP2 over 8 and 64 GPUs of 80 GiB.
Per GPU: training's own memory; the monitor's in full (the sharpness probe as it was before
budgets: the whole Lanczos basis, the double backward where it is possible, 4 held rows) and with
the default budget (``MemoryBudget()``: 10% of the memory free after training, at most 8 GiB, for
the sharpness probe; the fixed parts, a copy of the weights for the update ratio and the
forensics' gradient, come on top); the snapshots per host of 8 GPUs (one copy per job under
DDP, each rank its shards under FSDP2; in brackets: one copy per rank, as before); the sharpness
probe's choices under the default budget and under ``MemoryBudget(0.3, 24)``, with the time of
one estimate in training steps (a step: 8 rows of 4096 tokens per GPU; an estimate: 42
Hessian-vector products, Lanczos at its cap for the sharpness and again for Adam's
preconditioned sharpness, each two forward-backward passes of the held rows by finite
differences, 2.2 by double backward: 1.09 times finite differences as measured on the example
model, 1.49 s against 1.37 s for 17 products).

Part 2, measured: the sharpness probe's extra peak host memory (``VmHWM`` after resetting it
through ``/proc/self/clear_refs``, Linux, with large blocks returned to the system when freed;
after one estimate that is not counted, which loads the code and thread pools a first estimate
pays for once) on GPTs of 0.4M and 3.3M parameters, each in a fresh process, double backward and
finite differences, against the plan's bytes. Writes ``benchmarks/out/scale.json``.

    python benchmarks/scale.py --measure='{"layers": 2, ...}'   # one measurement, as JSON
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from _common import machine, markdown_table, parse_options, write_json

GIB = 1 << 30
LLAMAS = {  # params, layers, heads, hidden
    "125M": (125 * 10**6, 12, 12, 768),
    "1B": (1_240 * 10**6, 16, 32, 2048),
    "7B": (6_740 * 10**6, 32, 32, 4096),
    "70B": (70_600 * 10**6, 80, 64, 8192),
}
GPU_BYTES = 80 * GIB
SEQ_LEN = 4096
TRAIN_STATE_BYTES = 16  # bf16 weights and gradients, fp32 master weights and Adam moments
TRAIN_ROWS = 8  # rows of SEQ_LEN tokens per GPU and training step


def probe_steps(plan) -> float:  # noqa: ANN001 - a SharpnessPlan
    """One estimate in training steps: 42 products of about two forward-backward passes of the held rows."""
    hvps = 2 * 21  # Lanczos at its default cap, for the sharpness and for Adam's preconditioned sharpness
    per_hvp = 2.0 if plan.hvp_mode == "finite_difference" else 2.2  # in forward+backward passes
    return hvps * per_hvp * plan.rows * plan.seq_len / (SEQ_LEN * TRAIN_ROWS) if plan.fits else 0.0


def _choice(plan, steps: float) -> str:  # noqa: ANN001 - a SharpnessPlan
    if not plan.fits:
        return "skipped: " + plan.why.replace("even power iteration with finite difference on one row of 16 tokens ",
                                              "power iteration ")
    return (f"{plan.method} {plan.vectors} vectors, {plan.hvp_mode.replace('_', ' ')}, {plan.rows} rows x "
            f"{plan.seq_len}; {steps:.1f} steps")


def formula_rows() -> tuple[list[list[object]], list[dict]]:
    from stabmon.memory import MemoryBudget, ModelShape, activation_bytes, memory_plan

    LARGER = MemoryBudget(fraction=0.3, cap_gib=24)  # noqa: N806

    rows, records = [], []
    for name, (params, layers, heads, hidden) in LLAMAS.items():
        # Activations with full activation checkpointing, as runs of this size train: each layer's
        # input kept (2 h bytes per token and layer), and one layer's activations during its recompute.
        per_token = 2 * hidden * layers + 34 * hidden
        shape = ModelShape(params, layers, heads, hidden, weight_bytes=2, optimizer_bytes=12,
                           activation_bytes_per_token=per_token)
        for strategy in ("ddp", "fsdp2"):
            for world in (8, 64):
                sharded = strategy == "fsdp2"
                local = params // world if sharded else params
                training = local * TRAIN_STATE_BYTES + activation_bytes(shape, 1, SEQ_LEN)
                if training > GPU_BYTES:
                    rows.append([name, strategy, world, f"training alone needs {training / GIB:.0f} GiB per GPU",
                                 "", "", "", "", "", ""])
                    continue
                free = GPU_BYTES - training
                plan = memory_plan(shape=shape, seq_len=SEQ_LEN, world_size=world, sharded=sharded,
                                   budget=MemoryBudget(), device_free=free)
                larger = memory_plan(shape=shape, seq_len=SEQ_LEN, world_size=world, sharded=sharded,
                                     budget=LARGER, device_free=free).sharpness
                parts = {p.name: {"where": p.where, "bytes": p.bytes, "budgeted": p.budgeted} for p in plan.parts}
                # without a budget: the double backward where it is possible (not sharded), else finite differences
                unused = "sharpness, HVP (finite differences)" if not sharded else "sharpness, HVP (double backward)"
                device_full = sum(p.bytes for p in plan.parts if p.where == "device" and p.name != unused)
                device_budgeted = sum(p.budgeted for p in plan.parts if p.where == "device")
                host = next(p for p in plan.parts if p.where == "host")
                sp = plan.sharpness
                steps = probe_steps(sp)
                choice, other = (_choice(p, p_steps) for p, p_steps in ((sp, steps), (larger, probe_steps(larger))))
                rows.append([name, strategy, world, f"{training / GIB:.1f}", f"{device_full / GIB:.1f}",
                             f"{device_budgeted / GIB:.2f}", f"{plan.budget / GIB:.1f}",
                             f"{host.budgeted / GIB:.1f} (of {host.bytes / GIB:.1f})", choice, other])
                records.append({"model": name, "strategy": strategy, "world_size": world, "parts": parts,
                                "training_gib": training / GIB, "device_full_gib": device_full / GIB,
                                "device_budgeted_gib": device_budgeted / GIB, "budget_gib": plan.budget / GIB,
                                "sharpness": sp.__dict__, "probe_steps": steps,
                                "sharpness_under_0.3_24GiB": larger.__dict__})
    return rows, records


def measure(args: dict) -> dict:
    """One sharpness estimate in this process: its extra peak resident memory against the plan."""
    import torch

    from _common import load_example
    from stabmon.memory import MemoryBudget
    from stabmon.probes.sharpness import SharpnessConfig, SharpnessProbe

    def status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"{key} not in /proc/self/status")

    example = load_example()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    cfg = example.Config(n_layer=args["layers"], n_head=args["heads"], n_embd=args["width"], block_size=args["seq"])
    model = example.GPT(cfg)
    x = torch.randint(0, 256, (args["rows"], args["seq"]))
    y = torch.randint(0, 256, (args["rows"], args["seq"]))

    def loss_of(batch):
        return torch.nn.functional.cross_entropy(model(batch[0]).flatten(0, 1), batch[1].flatten())

    probe = SharpnessProbe(SharpnessConfig(every_n_steps=1, iters=args["iters"], hvp_mode=args["mode"],
                                           batch_size=args["rows"], preconditioned=False, tol=1e-9),
                           MemoryBudget(fraction=1.0, cap_gib=args["budget_gib"]))
    probe.hold((x, y), loss_of)
    attention = {f"layer_{i:02d}": (args["heads"], args["seq"], args["seq"]) for i in range(args["layers"])}
    probe.measure(None, model, None, attention)  # once before: code pages and thread pools load on first use
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    before = status("VmRSS:")
    out = probe.measure(None, model, None, attention)
    peak = status("VmHWM:") - before
    plan = probe.plan  # as the estimate made it: with the activations measured on the model
    return {"params": sum(p.numel() for p in model.parameters()), "plan": plan.__dict__, "peak": peak,
            "budget": args["budget_gib"] * GIB, "ratio": peak / plan.bytes, "value": out.get("sharpness/top_eigenvalue"),
            "notes": probe.notes}


def measure_in_subprocess(args: dict) -> dict:
    proc = subprocess.run([sys.executable, str(Path(__file__)), f"--measure={json.dumps(args)}"],
                          capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore",
                               "MALLOC_MMAP_THRESHOLD_": "65536"})  # large blocks go back to the system when freed
    return json.loads(proc.stdout.strip().splitlines()[-1])


MEASURED = [  # layers, heads, width, seq, rows, mode, budget GiB
    (2, 4, 128, 128, 4, "autograd", 4.0),
    (2, 4, 128, 128, 4, "finite_difference", 4.0),
    (4, 4, 256, 256, 4, "autograd", 4.0),
    (4, 4, 256, 256, 4, "finite_difference", 4.0),
    (4, 4, 256, 256, 4, "auto", 0.08),  # a budget that cuts the held batch
]


def main(argv: list[str]) -> None:
    opts = parse_options(argv, __doc__, values=("measure",))
    if "measure" in opts:
        print(json.dumps(measure(json.loads(opts["measure"]))))
        return
    rows, records = formula_rows()
    print(f"The monitor's memory per GPU, L={SEQ_LEN}, bf16 + fp32 Adam, {GPU_BYTES // GIB} GiB GPUs (formulas)\n")
    print(markdown_table(["model", "strategy", "GPUs", "training GiB/GPU", "monitor in full GiB/GPU",
                          "monitor with the budget GiB/GPU", "budget GiB", "snapshots GiB/host", "sharpness under the budget",
                          "under MemoryBudget(0.3, 24)"],
                         rows))
    measured = []
    for layers, heads, width, seq, n_rows, mode, budget in MEASURED:
        m = measure_in_subprocess({"layers": layers, "heads": heads, "width": width, "seq": seq, "rows": n_rows,
                                   "iters": 20, "mode": mode, "budget_gib": budget})
        p = m["plan"]
        measured.append([f"{m['params'] / 1e6:.2f}M", f"{layers}x{width}, L={seq}", mode, f"{budget:g}",
                         f"{p['hvp_mode']}, {p['rows']} rows, {p['vectors']} vectors",
                         f"{p['bytes'] / 2**20:.0f}", f"{m['peak'] / 2**20:.0f}", f"{m['ratio']:.2f}"])
        m.update(layers=layers, width=width, seq=seq, mode=mode)
        records.append({"measured": m})
    print("\nThe sharpness probe's extra peak memory on CPU, measured against the plan\n")
    print(markdown_table(["params", "shape", "hvp_mode", "budget GiB", "plan", "plan MiB", "measured MiB",
                          "measured / plan"], measured))
    path = write_json("scale", {"machine": machine(), "seq_len": SEQ_LEN, "gpu_gib": GPU_BYTES / GIB,
                                "records": records})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
