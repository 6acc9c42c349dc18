"""Step-time overhead of the monitor inside the Hugging Face Trainer, as ratios measured in one run.

    python benchmarks/overhead_hf.py                  # about 4 CPU minutes
    python benchmarks/overhead_hf.py --rounds=7 --steps=200 --block=128

Method: the Llama-style model of ``examples/hf_trainer.py`` (2 layers, hidden 128, GQA 4/2,
rotary, SDPA) trains ``--steps`` steps at the Trainer's defaults (``max_grad_norm=1.0``,
``logging_steps`` 50) in a fresh Trainer per run, three ways, in an order that alternates
from round to round: without the monitor (``off``), with ``StabilityMonitorCallback()``
(``monitor``: its read of the gradients also gives the Trainer its ``grad_norm`` and clip),
and with the monitor next to the Trainer's own clip (``monitor, Trainer clips``: the way it
ran before, two reads of every gradient per step). The first 20 steps of each run are left
out (step 0 holds the monitor's first sharpness estimate). A run's figure is its mean step
time; the table gives, per configuration, the median over rounds of its ratio to the ``off``
run of the same round, and the range. Writes ``benchmarks/out/overhead_hf.json``.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

import torch

from _common import ROOT, load_example, machine, markdown_table, parse_options, write_json

CONFIGS = ("off", "monitor", "monitor, Trainer clips")


def run_once(example, data: torch.Tensor, config: str, steps: int, block: int, skip: int = 20) -> float:
    """Mean step time in seconds of one Trainer run of ``steps`` steps, after the first ``skip``."""
    import transformers

    import stabmon.integrations.transformers as hf

    times: list[float] = []

    class StepTimer(transformers.TrainerCallback):
        last = None

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
            now = time.perf_counter()
            if self.last is not None and state.global_step > skip:
                times.append(now - self.last)
            self.last = now

    opts = example.Options(max_steps=steps, block_size=block, output_dir=str(ROOT / "benchmarks" / "out" / "hf_runs"))
    args = transformers.TrainingArguments(
        opts.output_dir, max_steps=steps, per_device_train_batch_size=opts.batch_size, learning_rate=opts.lr,
        save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(), disable_tqdm=True, seed=opts.seed,
        dataloader_num_workers=0, logging_steps=50)
    callbacks: list[Any] = [] if config == "off" else [hf.StabilityMonitorCallback(verbose=False)]
    trainer = transformers.Trainer(model=example.build_model(opts), args=args,
                                   train_dataset=example.Windows(data, block, steps * opts.batch_size, opts.seed),
                                   callbacks=[*callbacks, StepTimer()])
    trainer.remove_callback(transformers.PrinterCallback)
    plain = hf._plain_gradient_norm
    if config == "monitor, Trainer clips":  # the callback as it was: it reads, then the Trainer's clip reads again
        hf._plain_gradient_norm = lambda *a: False
    try:
        trainer.train()
    finally:
        hf._plain_gradient_norm = plain
    return statistics.fmean(times)


def main(argv: list[str]) -> None:
    opts = parse_options(argv, __doc__, values=("rounds", "steps", "block"))
    rounds, steps, block = int(opts.get("rounds", 5)), int(opts.get("steps", 150)), int(opts.get("block", 32))
    example = load_example("hf_trainer")
    data = example.load_bytes()
    data = data[: int(0.9 * len(data))]
    results: dict[str, list[float]] = {c: [] for c in CONFIGS}
    for r in range(rounds):
        order = CONFIGS if r % 2 == 0 else CONFIGS[::-1]
        for config in order:
            results[config].append(run_once(example, data, config, steps, block))
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{c} {1000 * results[c][-1]:.2f} ms/step" for c in CONFIGS),
              flush=True)
    ratios = {c: [on / off for on, off in zip(results[c], results["off"])] for c in CONFIGS[1:]}
    fused = [a / b for a, b in zip(results["monitor"], results["monitor, Trainer clips"])]
    rows = [[c, f"{1000 * statistics.median(results[c]):.2f}",
             f"{statistics.median(ratios[c]):.3f}" if c in ratios else "1",
             f"{min(ratios[c]):.3f} .. {max(ratios[c]):.3f}" if c in ratios else "-"] for c in CONFIGS]
    table = markdown_table(["config", "ms/step (median over rounds)", "step time / off (median)", "range"], rows)
    print(table)
    print(f"\nmonitor / (monitor, Trainer clips): median {statistics.median(fused):.3f}, "
          f"range {min(fused):.3f} .. {max(fused):.3f}")
    info = machine()
    path = write_json("overhead_hf", {"machine": info, "steps": steps, "block": block, "rounds": rounds,
                                      "seconds_per_step": results, "ratios": ratios, "fused_over_unfused": fused,
                                      "table": table})
    print(f"\n{info['device']}, {info['date']}; JSON in {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
