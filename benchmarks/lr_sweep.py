"""Learning-rate sensitivity at CPU scale (after Wortsman et al. 2023, "Small-scale proxies
for large-scale Transformer training instabilities").

    python benchmarks/lr_sweep.py                          # 5 LRs x 3 configurations, about 12 CPU minutes
    python benchmarks/lr_sweep.py --lrs=0.001,0.01,0.1 --steps=200
    python benchmarks/lr_sweep.py --seeds=1337,1338         # every cell twice; the tables show the means
    python benchmarks/lr_sweep.py --from_json                # tables and plot again from the saved runs
    python benchmarks/lr_sweep.py --high --seeds=1337,1338   # the second table: lr 0.3 and 1.0, four arms
    python benchmarks/lr_sweep.py --high --arms="plain + stabmon, rollback cut;qk-ln + stabmon, rollback cut"

Configurations on the example GPT (AdamW, no gradient clipping): ``plain``; ``qk-ln + z-loss``
(qk-layernorm and z-loss 1e-4, the architectural fix); ``plain + stabmon`` (the monitor
acting with its default ladder). The plain and qk-ln runs carry the monitor in
observe-only mode, which changes nothing in them and gives the warning times.

``--high`` (past lr 0.1, where QK-clip alone is not enough) runs lr 0.3 and 1.0 (``--lrs``) with a
fourth arm, ``qk-ln + stabmon`` (qk-layernorm, the monitor acting), and reports per arm the final
and best loss, whether the run diverged (final loss above the initial one, or not finite) and the
rungs each acting run took. Writes ``benchmarks/out/lr_sweep_high.json``; the first table's JSON
and plot are left alone.

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
from stabmon import InterventionConfig

CONFIGS = {
    "plain": {"observe_only": True},
    "qk-ln + z-loss": {"observe_only": True, "qk_layernorm": True, "z_loss": 1e-4},
    "plain + stabmon": {"observe_only": False},
}


HIGH_CONFIGS = {
    **CONFIGS,
    "qk-ln + stabmon": {"observe_only": False, "qk_layernorm": True},
    # a candidate rung, measured: a rollback also cuts the LR for good
    "plain + stabmon, rollback cut": {"observe_only": False, "intervention": InterventionConfig(rollback_lr_cut=True)},
    "qk-ln + stabmon, rollback cut": {"observe_only": False, "qk_layernorm": True,
                                      "intervention": InterventionConfig(rollback_lr_cut=True)},
}
DEFAULT_HIGH_ARMS = ("plain", "qk-ln + z-loss", "plain + stabmon", "qk-ln + stabmon")


def _means(res: dict) -> list[float]:
    x = res["losses"]
    return [sum(x[i:i + 20]) / 20 for i in range(0, len(x) - 19)]


def best(res: dict) -> float:
    """Lowest mean of 20 consecutive training losses."""
    return min((m for m in _means(res) if math.isfinite(m)), default=math.inf)


def peak(res: dict) -> float:
    """Highest mean of 20 consecutive training losses (inf when one is not finite)."""
    return max(_means(res), key=lambda m: m if math.isfinite(m) else math.inf, default=math.inf)


def rungs(res: dict) -> str:
    taken: dict[str, list[int]] = {}
    for a in res["actions"]:
        taken.setdefault(a["name"], []).append(a["step"])
    return "; ".join(f"{n} at {', '.join(map(str, s[:4]))}{' ...' if len(s) > 4 else ''}"
                     for n, s in taken.items()) or "none"


def run_grid(example, configs: dict[str, dict], lrs: list[float], steps: int, seeds: list[int],
             describe) -> dict[str, dict[float, list[dict]]]:  # noqa: ANN001
    """Every (seed, lr, config) run, each printed as it ends; results[config][lr] = the seeds' runs."""
    results: dict[str, dict[float, list[dict]]] = {name: {} for name in configs}
    for seed in seeds:
        for lr in lrs:
            for name, kwargs in configs.items():
                res = run(example, lr, steps, seed=seed, **kwargs)
                results[name].setdefault(lr, []).append(res)
                print(f"seed {seed} lr {lr:g} {name:16s} {describe(res)} ({res['seconds']:.0f} s)", flush=True)
    return results


def high_table(results: dict[str, dict[float, list[dict]]], lrs: list[float], seeds: list[int], initial: float) -> str:
    """Per run: final, best and peak loss (means of 20 steps), whether it diverged (final above
    the initial loss, or not finite) or blew up on the way (peak above the initial loss), rungs."""
    rows = []
    for lr in lrs:
        for name, runs in results.items():
            for seed, res in zip(seeds, runs[lr]):
                f, p = final(res), peak(res)
                rows.append([f"{lr:g}", name, seed, f"{f:.3f}", f"{best(res):.3f}", f"{p:.3g}",
                             "yes" if not math.isfinite(f) or f > initial else ("on the way" if p > initial else "no"),
                             rungs(res) if not res["observe_only"] else "(observing)"])
    return markdown_table(["lr", "config", "seed", "final loss", "best loss", "peak loss", "diverged",
                           "rungs taken (step)"], rows)


def high(example, lrs: list[float], steps: int, seeds: list[int], arms: tuple[str, ...]) -> None:
    """The second table: past lr 0.1, four arms (``--arms``: others, or some)."""
    unknown = [a for a in arms if a not in HIGH_CONFIGS]
    if unknown:
        raise SystemExit(f"unknown arms {unknown}; allowed: {', '.join(HIGH_CONFIGS)}")
    configs = {name: HIGH_CONFIGS[name] for name in arms}
    results = run_grid(example, configs, lrs, steps, seeds,
                       lambda res: f"final {final(res):.3f} best {best(res):.3f} actions {len(res['actions'])}")
    initial = next(iter(results.values()))[lrs[0]][0]["losses"][0]
    table = high_table(results, lrs, seeds, initial)
    print(table)
    info = machine()
    name = "lr_sweep_high" if arms == DEFAULT_HIGH_ARMS else "lr_sweep_high_" + "_".join(
        a.replace(" + ", "_").replace(", ", "_").replace(" ", "_").replace("-", "") for a in arms)
    path = write_json(name, {"machine": info, "lrs": lrs, "steps": steps, "seeds": seeds, "arms": list(arms),
                                        "initial_loss": initial, "table": table,
                                        "runs": {n: {str(lr): r for lr, r in v.items()} for n, v in results.items()}})
    print(f"\n{info['device']}, {info['date']}; JSON in {path}")


def final(res: dict) -> float:
    """Mean training loss of the last 20 steps (inf when any of them is not finite)."""
    tail = [x for x in res["losses"][-20:] if math.isfinite(x)]
    return sum(tail) / len(tail) if len(tail) == 20 else math.inf


def main(argv: list[str]) -> None:
    opts = parse_options(argv, __doc__, values=("lrs", "steps", "margin", "seeds", "arms"), flags=("from_json", "high"))
    lrs = [float(x) for x in opts.get("lrs", "0.3,1.0" if "high" in opts else "0.001,0.003,0.01,0.03,0.1").split(",")]
    steps, margin = int(opts.get("steps", 300)), float(opts.get("margin", 0.25))
    seeds = [int(x) for x in opts.get("seeds", "1337").split(",")]
    if "high" in opts and "from_json" in opts:  # the second table again from saved runs
        for path in sorted(OUT.glob("lr_sweep_high*.json")):
            saved = json.loads(path.read_text())
            runs = {n: {float(lr): r for lr, r in v.items()} for n, v in saved["runs"].items()}
            print(f"{path.name}:\n{high_table(runs, saved['lrs'], saved['seeds'], saved['initial_loss'])}\n")
        return
    if "high" in opts:
        arms = tuple(a.strip() for a in opts["arms"].split(";")) if "arms" in opts else DEFAULT_HIGH_ARMS
        high(load_example(), lrs, steps, seeds, arms)
        return
    results: dict[str, dict[float, list[dict]]] = {name: {} for name in CONFIGS}
    if "from_json" in opts:  # recompute the tables and the plot from the last run's JSON
        saved = json.loads((OUT / "lr_sweep.json").read_text())
        lrs, steps, seeds = saved["lrs"], saved["steps"], saved.get("seeds", [1337])
        results = {name: {float(lr): (r if isinstance(r, list) else [r]) for lr, r in runs.items()}
                   for name, runs in saved["runs"].items()}
    else:
        results = run_grid(load_example(), CONFIGS, lrs, steps, seeds,
                           lambda res: f"final loss {final(res):.3f} val {res['val_loss']:.3f} "
                                       f"findings {len(res['findings'])} actions {len(res['actions'])}")

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
