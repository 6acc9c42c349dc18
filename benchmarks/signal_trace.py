"""Which signals move first when a run past lr 0.1 fails: the monitor observing, every 5 steps.

    python benchmarks/signal_trace.py                          # lr 1.0 and 0.3 (z-loss, no weight decay), about 3 CPU minutes
    python benchmarks/signal_trace.py --runs="1.0,0.1,0,1;0.3,0,1e-4,1" --seed=1338
    python benchmarks/signal_trace.py --from_json              # the tables again from the saved traces

A run is ``lr,weight_decay,z_loss,qk_layernorm`` in the set-up of issue 24 (the example GPT with 2
layers, context 64, 300 warmup steps to a constant LR, 600 steps, AdamW 0.9/0.95, fp32, no
clipping). The monitor observes (sample, log and sharpness every 5/5/50 steps) into an in-memory
Lightning logger. Per run it prints:

* the **loss turn**: the first step from which the loss (EMA over 20 steps) stays 0.1 nats or
  more above its lowest value so far, to the end;
* per signal family, the first step a detector raised a warning or critical finding on it, and
  its lead over the turn (positive: before it);
* the signals around the turn (every 10 steps from 60 steps before it to 40 after): log Z, the
  mean and min output logit, the max attention logit, the min attention entropy, the largest
  qk-layernorm gain norm (``attention/{q,k}_gain_norm``), the gradient norm, the parameter norm
  and the top Hessian eigenvalue.

Writes ``benchmarks/out/signal_trace.json``.
"""

from __future__ import annotations

import json
import sys
import time

import pytorch_lightning as pl
from pytorch_lightning.loggers.logger import Logger

from _common import OUT, load_example, machine, markdown_table, parse_options, write_json
from detection import LossRecorder, ema
from stabmon import StabilityMonitor

SETUP = {"n_layer": 2, "block_size": 64, "warmup_steps": 300, "schedule": "constant", "max_steps": 600,
         "grad_clip": 0.0}
COLUMNS = {
    "log Z": "stabmon-logits/logz_mean", "mean logit": "stabmon-logits/mean_logit",
    "min logit": "stabmon-logits/min_logit", "max attn logit": "stabmon-attention/max_logit",
    "min attn entropy": "stabmon-attention/entropy_min", "qk-ln gain": "qk-ln gain",
    "grad norm": "stabmon-gradients/norm", "param norm": "stabmon-params/norm",
    "top eigenvalue": "stabmon-sharpness/top_eigenvalue",
}


class MemoryLogger(Logger):
    """Keeps every logged value: ``rows[step] = {key: value}``."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[int, dict[str, float]] = {}

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> str:
        return "0"

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.setdefault(int(step or 0), {}).update({k: float(v) for k, v in metrics.items()})

    def log_hyperparams(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        pass


def trace(example, lr: float, weight_decay: float, z_loss: float, qk_layernorm: bool, seed: int) -> dict:
    cfg = example.Config(lr=lr, weight_decay=weight_decay, z_loss=z_loss, qk_layernorm=qk_layernorm, seed=seed,
                         **SETUP)
    pl.seed_everything(seed, verbose=False)
    train_loader, _ = example.make_data(cfg)
    module = example.GPTModule(cfg)
    logger, losses = MemoryLogger(), LossRecorder()
    monitor = StabilityMonitor(sample_every_n_steps=5, log_every_n_steps=5, sharpness_every_n_steps=50,
                               observe_only=True, verbose=False)
    trainer = pl.Trainer(max_steps=cfg.max_steps, accelerator="auto", devices=1, logger=logger,
                         callbacks=[monitor, losses], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         log_every_n_steps=5)
    start = time.perf_counter()
    trainer.fit(module, train_loader)
    return {"lr": lr, "weight_decay": weight_decay, "z_loss": z_loss, "qk_layernorm": qk_layernorm, "seed": seed,
            "losses": losses.losses, "rows": {str(k): v for k, v in sorted(logger.rows.items())},
            "findings": [f.to_dict() for f in monitor.findings], "seconds": time.perf_counter() - start}


def loss_turn(losses: list[float], margin: float = 0.1, start: int = 20) -> int | None:
    """First step from which the EMA loss stays ``margin`` or more above its lowest value so far."""
    curve, low, turn = ema(losses), float("inf"), None
    for i, value in enumerate(curve):
        low = min(low, value)
        if i >= start and value - low >= margin:
            turn = i if turn is None else turn
        elif i >= start:
            turn = None
    return turn


def report(res: dict) -> str:
    turn = loss_turn(res["losses"])
    title = (f"lr {res['lr']:g}, weight decay {res['weight_decay']:g}, z-loss {res['z_loss']:g}, "
             f"qk-layernorm {res['qk_layernorm']}, seed {res['seed']}: the loss turns at step {turn}")
    first: dict[str, int] = {}
    for f in res["findings"]:
        if f["severity"] in ("warning", "critical"):
            family = "/".join(f["signal"].split("/")[:2])
            first.setdefault(family, f["step"])
    lead = markdown_table(["signal", "first warning (step)", "lead over the turn (steps)"],
                          [[name, step, turn - step if turn is not None else "-"]
                           for name, step in sorted(first.items(), key=lambda kv: kv[1])])
    rows = []
    centre = turn if turn is not None else len(res["losses"]) // 2
    for step in range(max(0, (centre - 60) // 10 * 10), min(len(res["losses"]), centre + 41), 10):
        values = dict(res["rows"].get(str(step), {}))
        gains = [v for k, v in values.items() if "_gain_norm/" in k]
        if gains:  # the largest q or k gain norm of any layer
            values["qk-ln gain"] = max(gains)
        window = res["losses"][max(0, step - 9):step + 1]
        rows.append([step, f"{sum(window) / len(window):.3f}",
                     *(f"{values[key]:.3g}" if key in values else "-" for key in COLUMNS.values())])
    values = markdown_table(["step", "loss (10-step mean)", *COLUMNS], rows)
    return f"{title}\n\n{lead}\n\n{values}"


def main(argv: list[str]) -> None:
    opts = parse_options(argv, __doc__, values=("runs", "seed"), flags=("from_json",))
    if "from_json" in opts:
        for res in json.loads((OUT / "signal_trace.json").read_text())["runs"]:
            print(report(res), end="\n\n")
        return
    runs = []
    for spec in opts.get("runs", "1.0,0.1,0,1;0.3,0,1e-4,1").split(";"):
        parts = spec.split(",")
        if len(parts) != 4:
            raise SystemExit(f"--runs takes lr,weight_decay,z_loss,qk_layernorm(0/1) separated by ';', got {spec!r}")
        runs.append((float(parts[0]), float(parts[1]), float(parts[2]), parts[3] in ("1", "True", "true")))
    example, seed, results = load_example(), int(opts.get("seed", 1337)), []
    for lr, wd, z, qk in runs:
        results.append(trace(example, lr, wd, z, qk, seed))
        print(report(results[-1]), end="\n\n", flush=True)
    info = machine()
    path = write_json("signal_trace", {"machine": info, "setup": SETUP, "runs": results})
    print(f"{info['device']}, {info['date']}; JSON in {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
