"""Step-time overhead of the monitor on the example GPT, as a ratio measured in one run.

    python benchmarks/overhead.py                  # about 4 CPU minutes
    python benchmarks/overhead.py --rounds=5 --steps=500

Method: one ``Trainer.fit`` per configuration and round, in which the monitor is switched
on and off in alternating blocks of ``--segment`` steps (50, the default sampling period,
so an "on" block holds exactly the share of sampled steps that a monitored run has).
Slow drifts of a noisy machine hit both halves alike. The overhead of a run is
``mean step time (on) / mean step time (off)``; the table gives the median over rounds and
the range. Configurations: ``default`` (``StabilityMonitor()``) and ``all`` (attention and
logit probes and emission every step, sharpness every 10 steps). Peak memory: each
configuration trains ``--memory_steps`` steps in a fresh process whose peak resident set
size is compared with the monitor-off process (on CUDA the runs above also record the
peak allocated GPU memory). Writes ``benchmarks/out/overhead.json``.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import statistics
import sys

import pytorch_lightning as pl
import torch

from _common import StepTimer, load_example, machine, markdown_table, write_json
from stabmon import StabilityMonitor

CONFIGS = {
    "default": {},
    "all": {"sample_every_n_steps": 1, "log_every_n_steps": 1, "sharpness_every_n_steps": 10},
}


class SegmentedMonitor(StabilityMonitor):
    """StabilityMonitor that sits out every other block of ``segment`` steps."""

    def __init__(self, segment: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.segment = segment

    def is_on(self, step: int) -> bool:
        return (step // self.segment) % 2 == 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
        self._on = self.is_on(trainer.global_step)
        if self._on:
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_before_backward(self, trainer, pl_module, loss):  # noqa: ANN001
        if self._on:
            super().on_before_backward(trainer, pl_module, loss)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # noqa: ANN001
        if self._on:
            super().on_before_optimizer_step(trainer, pl_module, optimizer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
        if self._on:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def run_once(example, cfg, monitor_kwargs, steps: int, segment: int, warmup: int) -> dict[str, float]:
    pl.seed_everything(cfg.seed, verbose=False)
    train_loader, _ = example.make_data(cfg)
    module = example.GPTModule(cfg)
    monitor = SegmentedMonitor(segment, verbose=False, **monitor_kwargs)
    timer = StepTimer()
    trainer = pl.Trainer(
        max_steps=steps, accelerator="auto", devices=1, callbacks=[monitor, timer], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        gradient_clip_val=cfg.grad_clip,
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, train_loader)
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else float("nan")
    on, off = [], []
    for i, t in enumerate(timer.times, start=1):  # times[i - 1] is the step with global_step i
        if i % segment < warmup:
            continue  # the first steps of a block pay for the switch (caches, allocator)
        (on if monitor.is_on(i) else off).append(t)
    return {"on": statistics.fmean(on), "off": statistics.fmean(off), "ratio": statistics.fmean(on) / statistics.fmean(off),
            "peak_mib": peak}


def _peak_rss_child(name: str, steps: int, queue) -> None:  # noqa: ANN001
    """In a fresh process: train ``steps`` steps with configuration ``name`` and report peak RSS."""
    example = load_example()
    cfg = example.Config(max_steps=steps)
    pl.seed_everything(cfg.seed, verbose=False)
    train_loader, _ = example.make_data(cfg)
    callbacks = [] if name == "off" else [StabilityMonitor(verbose=False, **CONFIGS[name])]
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, callbacks=callbacks, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0)
    trainer.fit(example.GPTModule(cfg), train_loader)
    queue.put(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # KiB -> MiB on Linux


def peak_rss(name: str, steps: int) -> float:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_rss_child, args=(name, steps, queue))
    proc.start()
    value = queue.get(timeout=600)
    proc.join()
    return value


def main(argv: list[str]) -> None:
    opts = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    rounds, steps = int(opts.get("rounds", 3)), int(opts.get("steps", 300))
    segment, warmup = int(opts.get("segment", 50)), int(opts.get("warmup", 2))
    example = load_example()
    cfg = example.Config(max_steps=steps)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in CONFIGS}
    names = list(CONFIGS)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            res = run_once(example, cfg, CONFIGS[name], steps, segment, warmup)
            results[name].append(res)
            print(f"round {r + 1}/{rounds} {name:8s} on {1000 * res['on']:7.2f} ms/step, off {1000 * res['off']:7.2f}"
                  f" ms/step, ratio {res['ratio']:.4f}", flush=True)
    # Peak memory: a fresh process per configuration (peak RSS on CPU; on CUDA see peak_mib above).
    memory_steps = int(opts.get("memory_steps", 40))
    rss = {name: peak_rss(name, memory_steps) for name in ["off", *names]}
    print("peak RSS MiB:", {k: round(v) for k, v in rss.items()}, flush=True)
    rows = []
    for name in names:
        ratios = [res["ratio"] for res in results[name]]
        rows.append([name, f"{statistics.median(ratios):.3f}", f"{min(ratios):.3f} .. {max(ratios):.3f}",
                     f"{1000 * statistics.median(res['off'] for res in results[name]):.1f}",
                     f"{rss[name] / rss['off']:.3f} ({rss[name] - rss['off']:+.0f} MiB)"])
    table = markdown_table(["config", "step time on / off (median)", "range over rounds", "ms/step off",
                            "peak memory on / off"], rows)
    print(table)
    info = machine()
    path = write_json("overhead", {"machine": info, "steps": steps, "segment": segment, "rounds": rounds,
                                   "results": results, "peak_rss_mib": rss, "table": table})
    print(f"\n{info['device']}, {info['date']}; JSON in {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
