"""Does the monitor see trouble coming, stay quiet on healthy runs, and save the run?

    python benchmarks/detection.py                  # about 6 CPU minutes
    python benchmarks/detection.py --steps=600 --unstable_lr=0.1

On the example GPT (no qk-layernorm, no gradient clipping, AdamW):

* healthy runs at normal learning rates, monitor observing: every finding is a false alarm;
* a run at ``--unstable_lr``, monitor observing: the first warning, and the step where
  the run has visibly failed, i.e. from which its loss (EMA over 20 steps) stays
  ``--margin`` nats or more above the healthy reference run's to the end;
* the same unstable run with the monitor acting (default ladder): final loss against the
  observing run, at the same step budget.

Writes ``benchmarks/out/detection.json`` and prints a Markdown table.
"""

from __future__ import annotations

import hashlib
import sys
import time

import pytorch_lightning as pl
import torch

from _common import load_example, machine, markdown_table, parse_options, write_json
from stabmon import InterventionConfig, StabilityMonitor


class LossRecorder(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.losses.append(float(outputs["loss"]))


def ema(values: list[float], span: int = 20) -> list[float]:
    out, acc, alpha = [], None, 2 / (span + 1)
    for v in values:
        v = v if v == v else float("inf")
        acc = v if acc is None else acc + alpha * (v - acc)
        out.append(acc)
    return out


def failure_step(curve: list[float], reference: list[float], margin: float, start: int = 20) -> int | None:
    """First step from which ``curve`` stays at least ``margin`` above ``reference`` to the end."""
    failed = None
    for i, (a, b) in enumerate(zip(curve, reference)):
        if i < start:
            continue
        if a - b >= margin:
            failed = i if failed is None else failed
        else:
            failed = None
    return failed


def run(example, lr: float, steps: int, observe_only: bool, qk_layernorm: bool = False, z_loss: float = 0.0,
        intervention: InterventionConfig | None = None, seed: int = 1337, setup: dict | None = None,
        callbacks: tuple = ()) -> dict:
    """One run of the example GPT; ``setup`` overrides fields of its ``Config`` (the model, the schedule);
    ``callbacks`` are classes of more Lightning callbacks (made one per run)."""
    fields = {"lr": lr, "max_steps": steps, "grad_clip": 0.0, "sharpness_every": 100, "warmup_steps": 20,
              "qk_layernorm": qk_layernorm, "z_loss": z_loss, "seed": seed, **(setup or {})}
    cfg = example.Config(**fields)
    pl.seed_everything(cfg.seed, verbose=False)
    train_loader, val_loader = example.make_data(cfg)
    module = example.GPTModule(cfg)
    monitor = StabilityMonitor(sample_every_n_steps=25, log_every_n_steps=25, sharpness_every_n_steps=100,
                               observe_only=observe_only, verbose=False,
                               intervention=intervention or InterventionConfig())
    losses = LossRecorder()
    trainer = pl.Trainer(max_steps=steps, accelerator="auto", devices=1,
                         callbacks=[monitor, losses, *(make() for make in callbacks)], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0)
    start = time.perf_counter()
    trainer.fit(module, train_loader)
    module.eval()
    with torch.no_grad():
        val = [module.loss(x, y).item() for x, y in val_loader]
    digest = torch.cat([p.detach().flatten() for p in module.parameters()])
    sha = hashlib.sha256(digest.numpy().tobytes()).hexdigest() if digest.device.type == "cpu" else None
    summary = monitor.core.run_summary
    return {
        "params_sha256": sha, "params_sum": float(digest.double().sum()), "params_abs_sum": float(digest.double().abs().sum()),
        "qk_clips": sum(v for k, v in summary.totals.items() if k == "actions/qk_clip_count"),
        "lr": lr, "observe_only": observe_only, "losses": losses.losses, "val_loss": sum(val) / len(val),
        "findings": [f.to_dict() for f in monitor.findings], "actions": [a.to_dict() for a in monitor.actions_taken],
        "seconds": time.perf_counter() - start,
        "max_attention_logit": monitor.core.run_summary.extremes.get("attention/max_logit"),
    }


def alarms(res: dict) -> int:
    """Findings that ask for action (warning or critical); ``info`` findings are reports."""
    return sum(f["severity"] in ("warning", "critical") for f in res["findings"])


def main(argv: list[str]) -> None:
    opts = parse_options(argv, __doc__, values=("steps", "healthy_lrs", "unstable_lr", "margin"))
    steps = int(opts.get("steps", 400))
    healthy = [float(x) for x in opts.get("healthy_lrs", "0.001,0.003").split(",")]
    unstable = float(opts.get("unstable_lr", 0.1))
    margin = float(opts.get("margin", 0.25))
    example = load_example()
    results = {}
    identical = {}
    for lr in healthy:
        results[f"healthy {lr:g}"] = run(example, lr, steps, observe_only=True)
        print(f"healthy lr {lr:g}: {alarms(results[f'healthy {lr:g}'])} warnings or critical findings", flush=True)
        # the same run with the monitor free to act: nothing may fire, and then nothing may change
        acting = results[f"healthy {lr:g}, acting"] = run(example, lr, steps, observe_only=False)
        identical[lr] = acting["params_sha256"] == results[f"healthy {lr:g}"]["params_sha256"]
        print(f"healthy lr {lr:g}, acting: {len(acting['actions'])} actions, parameters bit-identical to observing: "
              f"{identical[lr]}", flush=True)
    reference = ema(results[f"healthy {healthy[-1]:g}"]["losses"])
    watched = results["unstable observed"] = run(example, unstable, steps, observe_only=True)
    acted = results["unstable acted"] = run(example, unstable, steps, observe_only=False)
    curve = ema(watched["losses"])
    failed_at = failure_step(curve, reference, margin)
    warnings = [f for f in watched["findings"] if f["severity"] in ("warning", "critical")]
    first_warning = warnings[0]["step"] if warnings else None
    lead = failed_at - first_warning if failed_at is not None and first_warning is not None else None
    rows = []
    for name, res in results.items():
        rows.append([name, f"{res['lr']:g}", alarms(res), len(res["findings"]) - alarms(res), len(res["actions"]),
                     f"{res['losses'][-1]:.3f}", f"{res['val_loss']:.3f}",
                     f"{res['max_attention_logit']:.3g}" if res["max_attention_logit"] is not None else "-"])
    table = markdown_table(["run", "lr", "warnings + critical", "info findings", "actions", "final train loss", "val loss", "max attention logit"],
                           rows)
    summary = (f"unstable lr {unstable:g}: first warning at step {first_warning} "
               f"({warnings[0]['message'] if warnings else '-'}); the run fails (EMA loss {margin} nats above the "
               f"healthy run) at step {failed_at}; lead time {lead} steps. False alarms on healthy runs: "
               f"{sum(alarms(results[f'healthy {lr:g}']) for lr in healthy)}; actions on them when acting: "
               f"{sum(len(results[f'healthy {lr:g}, acting']['actions']) for lr in healthy)}, parameters "
               f"bit-identical to observing: {all(identical.values())}. Validation loss, acting vs "
               f"observing: {acted['val_loss']:.3f} vs {watched['val_loss']:.3f}.")
    print(table)
    print(summary)
    info = machine()
    path = write_json("detection", {"machine": info, "steps": steps, "margin": margin, "first_warning": first_warning,
                                    "failed_at": failed_at, "lead_steps": lead, "healthy_identical": identical, "runs": results, "table": table,
                                    "summary": summary})
    print(f"\n{info['device']}, {info['date']}; JSON in {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
