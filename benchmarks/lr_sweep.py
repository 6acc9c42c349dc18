"""Learning-rate sensitivity at CPU scale (after Wortsman et al. 2023, "Small-scale proxies
for large-scale Transformer training instabilities").

    python benchmarks/lr_sweep.py                          # 5 LRs x 3 configurations, about 12 CPU minutes
    python benchmarks/lr_sweep.py --lrs=0.001,0.01,0.1 --steps=200
    python benchmarks/lr_sweep.py --seeds=1337,1338         # every cell twice; the tables show the means
    python benchmarks/lr_sweep.py --from_json                # tables and plot again from the saved runs
    python benchmarks/lr_sweep.py --high --seeds=1337,1338 --jobs=2   # the second table, about 25 CPU minutes
    python benchmarks/lr_sweep.py --high --lrs=0.3,1.0 --arms="qk-ln + stabmon;qk-ln + stabmon, no rollback cut"
    python benchmarks/lr_sweep.py --high --setup=sweep --lrs=0.3,1.0       # past lr 0.1 in the first set-up
    python benchmarks/lr_sweep.py --high --lrs=1.0 --jobs=2 --arms="qk-ln + z-loss 1e-2;qk-ln + output centering;qk-ln + gain cap"

Configurations on the example GPT (AdamW, no gradient clipping): ``plain``; ``qk-ln + z-loss``
(qk-layernorm and z-loss 1e-4, the architectural fix); ``plain + stabmon`` (the monitor
acting with its default ladder). The plain and qk-ln runs carry the monitor in
observe-only mode, which changes nothing in them and gives the warning times.

``--high`` (past lr 0.1, where QK-clip alone is not enough) runs lr 0.001 to 1.0 (``--lrs``) with a
fourth arm, ``qk-ln + stabmon`` (qk-layernorm, the monitor acting), in the set-up of issue 24
(``--setup=issue``: 2 layers, context 64, 300 warmup steps to a constant LR, 600 steps, weight
decay 0.1; ``--setup=sweep`` is the first table's), and reports per run the final, best and peak
loss, whether it diverged (final loss above the initial one, or not finite) and the rungs each
acting run took, then per arm the LR sensitivity. Other arms (``--arms``): the ladder without the
rollback's lasting LR cut, and three candidate rungs measured as upper bounds (on from step 0,
observing): z-loss 1e-2, output centering, a cap on the qk-layernorm gains. ``--jobs=2`` runs two at a time, one thread
each. Writes ``benchmarks/out/lr_sweep_high.json`` and ``docs/lr_sweep_high.png``; the first
table's JSON and plot are left alone.

LR sensitivity of a configuration = mean over the LRs of min(final loss, initial loss)
minus the best final loss over the LRs (lower is better). For every plain run that fails
(from some step on, its EMA loss stays ``--margin`` nats or more above the best plain
run's) the warning lead time is the failure step minus the first warning. Writes
``benchmarks/out/lr_sweep.json`` and the plot ``docs/lr_sweep.png``.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import multiprocessing
import sys

import pytorch_lightning as pl
import torch

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
    # the ladder before the rollback's lasting LR cut became the default, for comparison
    "plain + stabmon, no rollback cut": {"observe_only": False,
                                         "intervention": InterventionConfig(rollback_lr_cut=False)},
    "qk-ln + stabmon, no rollback cut": {"observe_only": False, "qk_layernorm": True,
                                         "intervention": InterventionConfig(rollback_lr_cut=False)},
}
DEFAULT_HIGH_ARMS = ("plain", "qk-ln + z-loss", "plain + stabmon", "qk-ln + stabmon")


class OutputCentering(pl.Callback):
    """After every step, subtract the output layer's mean row (the logits' mean over the vocabulary
    goes to 0; the softmax is unchanged). The example ties it to the token embedding, so the mean
    goes onto every position embedding instead: the model's inputs stay exactly the same."""

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        weight, mean = pl_module.model.lm_head.weight, pl_module.model.lm_head.weight.mean(0, keepdim=True)
        weight.sub_(mean)
        pl_module.model.transformer.wpe.weight.add_(mean)


class GainCap(pl.Callback):
    """After every step, scale each qk-layernorm's gain and bias down to the gain's initial norm
    (sqrt of its size): the gains may not grow at all, the strongest cap there is."""

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        for name, norm in pl_module.named_modules():
            if name.endswith(("q_ln", "k_ln")):
                cap, size = norm.weight.numel() ** 0.5, norm.weight.norm()
                if size > cap:
                    norm.weight.mul_(cap / size)
                    norm.bias.mul_(cap / size)


# Candidate rungs measured as upper bounds: applied from step 0 rather than when a detector fires (observing).
HIGH_CONFIGS.update({
    "qk-ln + z-loss 1e-2": {"observe_only": True, "qk_layernorm": True, "z_loss": 1e-2},
    "qk-ln + output centering": {"observe_only": True, "qk_layernorm": True, "callbacks": (OutputCentering,)},
    "qk-ln + gain cap": {"observe_only": True, "qk_layernorm": True, "callbacks": (GainCap,)},
})
# The set-ups of the second table: the (a 2-layer GPT with context 64, 300 warmup steps to a constant
# LR, 600 steps: the blow-up comes late enough for a monitor to act), and the first table's (warmup 20, cosine).
SETUPS = {
    "issue": {"steps": 600, "fields": {"n_layer": 2, "block_size": 64, "warmup_steps": 300, "schedule": "constant"}},
    "sweep": {"steps": 300, "fields": {}},
}


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


def _one_run(task: tuple) -> dict:
    """A worker's run (one thread: the workers share the cores)."""
    lr, steps, seed, setup, kwargs = task
    torch.set_num_threads(1)
    return run(load_example(), lr, steps, seed=seed, setup=setup, **kwargs)


def run_grid(example, configs: dict[str, dict], lrs: list[float], steps: int, seeds: list[int],
             describe, setup: dict | None = None, jobs: int = 1) -> dict[str, dict[float, list[dict]]]:  # noqa: ANN001
    """Every (seed, lr, config) run, each printed as it ends; results[config][lr] = the seeds' runs.

    ``jobs`` > 1 runs that many at a time in worker processes of one thread each."""
    tasks = [(seed, lr, name) for seed in seeds for lr in lrs for name in configs]
    results: dict[str, dict[float, list[dict]]] = {name: {lr: [None] * len(seeds) for lr in lrs} for name in configs}

    def done(seed: int, lr: float, name: str, res: dict) -> None:
        results[name][lr][seeds.index(seed)] = res
        print(f"seed {seed} lr {lr:g} {name:16s} {describe(res)} ({res['seconds']:.0f} s)", flush=True)

    if jobs <= 1:
        for seed, lr, name in tasks:
            done(seed, lr, name, run(example, lr, steps, seed=seed, setup=setup, **configs[name]))
        return results
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
        futures = {pool.submit(_one_run, (lr, steps, seed, setup, configs[name])): (seed, lr, name)
                   for seed, lr, name in tasks}
        for future in concurrent.futures.as_completed(futures):
            done(*futures[future], future.result())
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


def sensitivity(runs: dict[float, list[dict]], lrs: list[float], initial: float) -> float:
    """Mean over the LRs of min(final loss, initial loss) minus the best of them (seeds averaged)."""
    finals = [min(initial, sum(final(r) for r in runs[lr]) / len(runs[lr])) for lr in lrs]
    return sum(finals) / len(finals) - min(finals)


def high(example, lrs: list[float], seeds: list[int], arms: tuple[str, ...], setup_name: str, jobs: int,
         steps: int | None = None) -> None:
    """The second table: past lr 0.1, four arms (``--arms``: others, or some)."""
    unknown = [a for a in arms if a not in HIGH_CONFIGS]
    if unknown:
        raise SystemExit(f"unknown arms {unknown}; allowed: {', '.join(HIGH_CONFIGS)}")
    if setup_name not in SETUPS:
        raise SystemExit(f"--setup takes one of {', '.join(SETUPS)}, got {setup_name!r}")
    setup = SETUPS[setup_name]
    steps = steps or setup["steps"]
    configs = {name: HIGH_CONFIGS[name] for name in arms}
    results = run_grid(example, configs, lrs, steps, seeds,
                       lambda res: f"final {final(res):.3f} best {best(res):.3f} actions {len(res['actions'])}",
                       setup=setup["fields"], jobs=jobs)
    initial = next(iter(results.values()))[lrs[0]][0]["losses"][0]
    table = high_table(results, lrs, seeds, initial)
    print(table)
    summary = sensitivity_table(results, lrs, initial)
    print()
    print(summary)
    info = machine()
    if jobs > 1 and info["device"].startswith("CPU"):
        info["device"] = f"CPU ({jobs} processes of 1 thread)"
    name = "lr_sweep_high" + ("" if setup_name == "issue" else f"_{setup_name}")
    if arms != DEFAULT_HIGH_ARMS:
        name += "_" + "_".join(a.replace(" + ", "_").replace(", ", "_").replace(" ", "_").replace("-", "")
                               for a in arms)
    path = write_json(name, {"machine": info, "lrs": lrs, "steps": steps, "seeds": seeds, "arms": list(arms),
                             "setup": setup_name, "setup_fields": setup["fields"], "jobs": jobs,
                             "initial_loss": initial, "table": table, "sensitivity_table": summary,
                             "runs": {n: {str(lr): r for lr, r in v.items()} for n, v in results.items()}})
    if len(lrs) > 1 and arms == DEFAULT_HIGH_ARMS and setup_name == "issue":
        high_plot(results, lrs, seeds, steps, initial)
    print(f"\n{info['device']}, {info['date']}; JSON in {path}")


def sensitivity_table(results: dict[str, dict[float, list[dict]]], lrs: list[float], initial: float) -> str:
    """Per arm: mean final loss per LR (capped at the initial loss), diverged runs, LR sensitivity."""
    rows = []
    for name, runs in results.items():
        means = [sum(final(r) for r in runs[lr]) / len(runs[lr]) for lr in lrs]
        diverged = sum(not math.isfinite(final(r)) or final(r) > initial for lr in lrs for r in runs[lr])
        rows.append([name, *(f"{m:.3f}" if m <= initial else f"**{m:.3g}**" for m in means),
                     f"{diverged}/{sum(len(runs[lr]) for lr in lrs)}", f"{sensitivity(runs, lrs, initial):.3f}"])
    return markdown_table(["config", *(f"lr {lr:g}" for lr in lrs), "diverged", "LR sensitivity"], rows)


def high_plot(results: dict[str, dict[float, list[dict]]], lrs: list[float], seeds: list[int], steps: int,
              initial: float) -> None:
    series = {name: [(lr, min(initial, sum(final(r) for r in runs[lr]) / len(runs[lr]))) for lr in lrs]
              for name, runs in results.items()}
    plot = line_plot(series, title=f"past lr 0.1: final loss after {steps} steps (capped at the initial "
                                   f"{initial:.2f}), mean of {len(seeds)} seeds",
                     xlabel="learning rate", ylabel="loss")
    (ROOT / "docs").mkdir(exist_ok=True)
    plot.save(ROOT / "docs" / "lr_sweep_high.png")
    print("plot in docs/lr_sweep_high.png")


def final(res: dict) -> float:
    """Mean training loss of the last 20 steps (inf when any of them is not finite)."""
    tail = [x for x in res["losses"][-20:] if math.isfinite(x)]
    return sum(tail) / len(tail) if len(tail) == 20 else math.inf


def main(argv: list[str]) -> None:
    opts = parse_options(argv, __doc__, values=("lrs", "steps", "margin", "seeds", "arms", "setup", "jobs"),
                         flags=("from_json", "high"))
    lrs = [float(x) for x in opts.get("lrs", "0.001,0.01,0.1,0.3,1.0" if "high" in opts
                                      else "0.001,0.003,0.01,0.03,0.1").split(",")]
    steps, margin = int(opts.get("steps", 300)), float(opts.get("margin", 0.25))
    seeds = [int(x) for x in opts.get("seeds", "1337").split(",")]
    if "high" in opts and "from_json" in opts:  # the second table again from saved runs
        for path in sorted(OUT.glob("lr_sweep_high*.json")):
            saved = json.loads(path.read_text())
            runs = {n: {float(lr): r for lr, r in v.items()} for n, v in saved["runs"].items()}
            print(f"{path.name}:\n{high_table(runs, saved['lrs'], saved['seeds'], saved['initial_loss'])}\n\n"
                  f"{sensitivity_table(runs, saved['lrs'], saved['initial_loss'])}\n")
        return
    if "high" in opts:
        arms = tuple(a.strip() for a in opts["arms"].split(";")) if "arms" in opts else DEFAULT_HIGH_ARMS
        high(load_example(), lrs, seeds, arms, opts.get("setup", "issue"), int(opts.get("jobs", 1)),
             int(opts["steps"]) if "steps" in opts else None)
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
