"""Learning-rate sensitivity at CPU scale (after Wortsman et al. 2023, "Small-scale proxies
for large-scale Transformer training instabilities").

    python benchmarks/lr_sweep.py                          # 5 LRs x 3 configurations, about 12 CPU minutes
    python benchmarks/lr_sweep.py --lrs=0.001,0.01,0.1 --steps=200
    python benchmarks/lr_sweep.py --seeds=1337,1338         # every cell twice; the tables show the means
    python benchmarks/lr_sweep.py --from_json                # tables and plot again from the saved runs

Configurations on the example GPT (AdamW, no gradient clipping): ``plain``; ``qk-ln + z-loss``
(qk-layernorm and z-loss 1e-4, the architectural fix); ``plain + stabmon`` (the monitor
acting with its default ladder). The plain and qk-ln runs carry the monitor in
observe-only mode, which changes nothing in them and gives the warning times.

LR sensitivity of a configuration = mean over the LRs of min(final loss, initial loss)
minus the best final loss over the LRs (lower is better). For every plain run that fails
(from some step on, its EMA loss stays ``--margin`` nats or more above the best plain
run's) the warning lead time is the failure step minus the first warning. Writes
``benchmarks/out/lr_sweep.json`` and the plot ``docs/lr_sweep.png``.
"""

from __future__ import annotations

import json
import math
import sys

from _common import OUT, ROOT, load_example, machine, markdown_table, parse_options, write_json
from _plot import line_plot
from detection import ema, failure_step, run

CONFIGS = {
    "plain": {"observe_only": True},
    "qk-ln + z-loss": {"observe_only": True, "qk_layernorm": True, "z_loss": 1e-4},
    "plain + stabmon": {"observe_only": False},
}


def final(res: dict) -> float:
    """Mean training loss of the last 20 steps (inf when any of them is not finite)."""
    tail = [x for x in res["losses"][-20:] if math.isfinite(x)]
    return sum(tail) / len(tail) if len(tail) == 20 else math.inf


def main(argv: list[str]) -> None:
    opts = parse_options(argv, __doc__, values=("lrs", "steps", "margin", "seeds"), flags=("from_json",))
    lrs = [float(x) for x in opts.get("lrs", "0.001,0.003,0.01,0.03,0.1").split(",")]
    steps, margin = int(opts.get("steps", 300)), float(opts.get("margin", 0.25))
    seeds = [int(x) for x in opts.get("seeds", "1337").split(",")]
    results: dict[str, dict[float, list[dict]]] = {name: {} for name in CONFIGS}
    if "from_json" in opts:  # recompute the tables and the plot from the last run's JSON
        saved = json.loads((OUT / "lr_sweep.json").read_text())
        lrs, steps, seeds = saved["lrs"], saved["steps"], saved.get("seeds", [1337])
        results = {name: {float(lr): (r if isinstance(r, list) else [r]) for lr, r in runs.items()}
                   for name, runs in saved["runs"].items()}
    else:
        example = load_example()
        for seed in seeds:
            for lr in lrs:
                for name, kwargs in CONFIGS.items():
                    res = run(example, lr, steps, seed=seed, **kwargs)
                    results[name].setdefault(lr, []).append(res)
                    print(f"seed {seed} lr {lr:g} {name:16s} final loss {final(res):.3f} val {res['val_loss']:.3f} "
                          f"findings {len(res['findings'])} actions {len(res['actions'])} ({res['seconds']:.0f} s)",
                          flush=True)

    def mean_final(runs: list[dict]) -> float:
        return sum(final(r) for r in runs) / len(runs)

    initial = results["plain"][lrs[0]][0]["losses"][0]
    rows, sensitivity = [], {}
    for name in CONFIGS:
        finals = [mean_final(results[name][lr]) for lr in lrs]
        sensitivity[name] = sum(min(f, initial) for f in finals) / len(finals) - min(finals)
        rows.append([name, *(f"{f:.3f}" for f in finals), f"{sensitivity[name]:.3f}"])
    table = markdown_table(["config", *(f"lr {lr:g}" for lr in lrs), "LR sensitivity"], rows)
    rung_rows = []
    for lr in lrs:
        for i, res in enumerate(results["plain + stabmon"][lr]):
            taken: dict[str, list[int]] = {}
            for a in res["actions"]:
                taken.setdefault(a["name"], []).append(a["step"])
            rung_rows.append([f"{lr:g}", seeds[i], "; ".join(f"{n} at {', '.join(map(str, s))}"
                                                              for n, s in taken.items()) or "none",
                              f"{int(res.get('qk_clips', 0))}"])
    rung_table = markdown_table(["lr", "seed", "rungs taken (step)", "head clips"], rung_rows)

    best_lr = min(lrs, key=lambda lr: final(results["plain"][lr][0]))
    reference = ema(results["plain"][best_lr][0]["losses"])
    lead_rows = []
    for lr in lrs:
        res = results["plain"][lr][0]
        curve = ema(res["losses"])
        failed = failure_step(curve, reference, margin)
        if failed is None:
            continue
        warned = [f["step"] for f in res["findings"] if f["severity"] in ("warning", "critical")]
        first = min(warned) if warned else None
        lead_rows.append([f"{lr:g}", failed, first if first is not None else "none",
                          failed - first if first is not None else "-"])
    lead_table = markdown_table(["plain lr", "fails at step", "first warning", "lead (steps)"], lead_rows)
    print(table)
    print()
    print(rung_table)
    print()
    print(lead_table)
    plot = line_plot({name: [(lr, mean_final(results[name][lr])) for lr in lrs] for name in CONFIGS},
                     title=f"final loss (mean of the last 20 steps) after {steps} steps"
                           + (f", mean of {len(seeds)} seeds" if len(seeds) > 1 else ""),
                     xlabel="learning rate", ylabel="loss")
    (ROOT / "docs").mkdir(exist_ok=True)
    plot.save(ROOT / "docs" / "lr_sweep.png")
    info = machine()
    path = write_json("lr_sweep", {"machine": info, "lrs": lrs, "steps": steps, "seeds": seeds, "initial_loss": initial,
                                   "sensitivity": sensitivity, "table": table, "lead_table": lead_table,
                                   "rung_table": rung_table,
                                   "runs": {n: {str(lr): r for lr, r in v.items()} for n, v in results.items()}})
    print(f"\n{info['device']}, {info['date']}; JSON in {path}; plot in docs/lr_sweep.png")


if __name__ == "__main__":
    main(sys.argv[1:])
