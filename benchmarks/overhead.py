"""Step-time overhead of the monitor, as a ratio measured in one run, with the time of each hook.

    python benchmarks/overhead.py                           # about 12 CPU minutes
    python benchmarks/overhead.py --rounds=5 --steps=550
    python benchmarks/overhead.py --only=small-default-log50,small-compiled

Method: one ``Trainer.fit`` per configuration and round, in which the monitor is switched
on and off in alternating blocks of ``--segment`` steps (50, the default sampling period,
shifted by half a block so that an "on" block holds one sampled step in its middle: exactly
the share of sampled steps that a monitored run has).
Slow drifts of a noisy machine hit both halves alike. The overhead of a run is
``mean step time (on) / mean step time (off)``; the table gives the median over rounds and
the range, and the same ratio for the unsampled "on" steps alone (what an ordinary step
costs). Every Lightning hook of the monitor is timed with ``time.perf_counter`` on the
"on" steps (a GPU is synchronized around each hook, so on CUDA the figure includes the
device work the hook enqueues); "hooks % of step" is their sum over the mean "off" step;
"ordinary step" is the hooks' time on the unsampled steps of the cadence (logging every 50:
also not emitting), and "sampled step" on the sampled ones (their mean over the run is the per-step figure).

The floor: reading every gradient once, timed where the monitor reads them (after the
backward) in a fit without the monitor (``GradientReadTimer``): the fused per-tensor norms
the monitor uses, and one norm over a single contiguous buffer of the same size. No per-step
gradient norm can cost less. It also times ``float()`` of a scalar twice at that point: on a
CPU the backward leaves the caches cold, and the first Python there runs several times slower
than the same call a moment later. ``--floor=no`` skips it.

Models: ``example`` (the example GPT, context 128) and ``small`` (the same GPT at context
32: a short step, where a fixed per-step cost shows most). Cadences: the Trainer's default
``log_every_n_steps=50`` and logging every step (a no-op logger receives the keys, so the
monitor's emission is timed and the logger's own I/O is not). ``all``: attention and logit
probes and emission every step, sharpness every 10 steps. ``compiled``: the small model under
``torch.compile`` (inductor); its row also gives the graphs Dynamo compiled with the monitor
against a run without it (``torch._dynamo.utils.counters["stats"]["unique_graphs"]``).
``monitor-clips``: the monitor clips the gradients (``clip_grad_norm``) in the "on" blocks and
the Trainer (``gradient_clip_val``, as in every other row) in the "off" blocks: what moving the
clip into the monitor saves, since the Trainer's clip reads every gradient once more.

On CUDA, ``syncs / unsampled step`` counts the host-device synchronizations the monitor's
hooks make on an unsampled step (``torch.cuda.set_sync_debug_mode("warn")``). Peak memory:
each configuration of the example trains ``--memory_steps`` steps in a fresh process whose
peak resident set size is compared with the monitor-off process. Writes
``benchmarks/out/overhead.json``.

Code against code: ``--baseline=PATH`` (another checkout of stabmon, e.g. ``git worktree add
/tmp/before HEAD~1``) times the same configurations with both trees in one run, each fit in a
fresh process (``PYTHONPATH``), the order of the two alternating by round and configuration; it
prints the hooks' time per step of each and their ratio per round (median and range), and writes
``benchmarks/out/overhead_ab.json``::

    python benchmarks/overhead.py --baseline=/tmp/before --only=small-default-log50,small-default-log1 --rounds=7
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import Logger

from _common import ROOT, StepTimer, load_example, machine, markdown_table, parse_options, write_json
from stabmon import StabilityMonitor

HOOKS = ("on_train_batch_start", "on_before_backward", "on_before_optimizer_step", "on_train_batch_end")
CUDA = torch.cuda.is_available()


@dataclass(frozen=True)
class Setup:
    model: str  # "example" (context 128) or "small" (context 32)
    log_every: int  # the Trainer's log_every_n_steps
    monitor: dict[str, Any] = field(default_factory=dict)
    compiled: bool = False
    monitor_clips: bool = False  # the monitor clips (clip_grad_norm) in place of the Trainer's gradient_clip_val


SETUPS = {
    "example-default-log50": Setup("example", 50),
    "example-default-log1": Setup("example", 1),
    "example-all-log1": Setup("example", 1, {"sample_every_n_steps": 1, "sharpness_every_n_steps": 10}),
    "small-default-log50": Setup("small", 50),
    "small-default-log1": Setup("small", 1),
    "small-compiled": Setup("small", 50, compiled=True),
    "small-monitor-clips": Setup("small", 50, monitor_clips=True),
}
BLOCK = {"example": 128, "small": 32}


class NullLogger(Logger):
    """Takes the metrics and drops them: the monitor's emission is timed, not a logger's I/O."""

    @property
    def name(self) -> str:
        return "null"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


class TimedSegmentedMonitor(StabilityMonitor):
    """StabilityMonitor that sits out every other block of ``segment`` steps and times its hooks."""

    def __init__(self, segment: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.segment = segment
        self.hook_seconds: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))  # step -> hook -> s
        self.syncs: dict[int, int] = {}  # unsampled step -> host-device synchronizations in the hooks (CUDA)
        self._on = False
        self._step = 0

    def is_on(self, step: int) -> bool:
        # Blocks are shifted by half a segment, so that each "on" block holds one sampled step
        # (a multiple of the sampling period) in its middle, not at its start.
        return ((step + self.segment // 2) // self.segment) % 2 == 0

    def counted(self, step: int, warmup: int) -> bool:
        """Steps that enter the comparison: not the first partial block (the run's own warm-up,
        with the early samples at powers of two), not the first ``warmup`` steps after a switch."""
        return step >= self.segment - self.segment // 2 and (step + self.segment // 2) % self.segment >= warmup

    def _timed(self, hook: str, *args: Any) -> None:
        if not self._on:
            return
        count_syncs = CUDA and self.core is not None and not self.core.sampled and hook != "on_train_batch_start"
        if CUDA:
            torch.cuda.synchronize()
        start = time.perf_counter()
        if count_syncs:
            torch.cuda.set_sync_debug_mode("warn")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                getattr(super(), hook)(*args)
            torch.cuda.set_sync_debug_mode("default")
            self.syncs[self._step] = self.syncs.get(self._step, 0) + sum("synchroniz" in str(w.message) for w in caught)
        else:
            getattr(super(), hook)(*args)
        if CUDA:
            torch.cuda.synchronize()
        self.hook_seconds[self._step][hook] += time.perf_counter() - start

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
        self._step = trainer.global_step
        self._on = self.is_on(self._step)
        if self.settings.clip_grad_norm is not None:  # one of the two clips, never both, never neither
            trainer.gradient_clip_val = None if self._on else self.settings.clip_grad_norm
        self._timed("on_train_batch_start", trainer, pl_module, batch, batch_idx)

    def on_before_backward(self, trainer, pl_module, loss):  # noqa: ANN001
        self._timed("on_before_backward", trainer, pl_module, loss)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # noqa: ANN001
        self._timed("on_before_optimizer_step", trainer, pl_module, optimizer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
        self._timed("on_train_batch_end", trainer, pl_module, outputs, batch, batch_idx)


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _fit(example, setup: Setup, steps: int, callbacks: list[pl.Callback]) -> pl.LightningModule:  # noqa: ANN001
    cfg = example.Config(max_steps=steps, block_size=BLOCK[setup.model])
    pl.seed_everything(cfg.seed, verbose=False)
    train_loader, _ = example.make_data(cfg)
    module = example.GPTModule(cfg)
    if setup.compiled:
        module.model = torch.compile(module.model)
    trainer = pl.Trainer(
        max_steps=steps, accelerator="auto", devices=1, callbacks=callbacks, logger=NullLogger(),
        log_every_n_steps=setup.log_every, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, gradient_clip_val=cfg.grad_clip,
    )
    trainer.fit(module, train_loader)
    return module


def run_once(example, setup: Setup, steps: int, segment: int, warmup: int,  # noqa: ANN001
             count_graphs: bool = True) -> dict[str, Any]:
    count_graphs = setup.compiled and count_graphs
    if count_graphs:  # a fresh Dynamo cache: every graph of this fit is counted
        torch._dynamo.reset()
    graphs_before = _graphs() if count_graphs else 0
    clip = {"clip_grad_norm": example.Config().grad_clip} if setup.monitor_clips else {}
    monitor = TimedSegmentedMonitor(segment, verbose=False, **setup.monitor, **clip)
    timer = StepTimer()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*clip the gradients")  # the Trainer clips in the "off" blocks
        _fit(example, setup, steps, [monitor, timer])
    on, off, on_steps, on_unsampled = [], [], [], []
    for i, t in enumerate(timer.times, start=1):  # times[i - 1] is the step with global_step i
        if not monitor.counted(i, warmup):
            continue  # the first steps of a block pay for the switch (caches, allocator)
        (on if monitor.is_on(i) else off).append(t)
        if monitor.is_on(i):
            on_steps.append(i)
            if not monitor.core.is_sampled(i):
                on_unsampled.append(t)
    # the hooks of the same steps as the step times (so step 0, with its sharpness estimate, is out)
    hook_ms = {h: 1000 * statistics.fmean(monitor.hook_seconds[i][h] for i in on_steps) for h in HOOKS}
    # an ordinary step of that cadence: not sampled, and (logging every 50) not emitting either
    ordinary = [i for i in on_steps if not monitor.core.is_sampled(i) and (setup.log_every == 1 or (i + 1) % setup.log_every)]
    sampled = [i for i in on_steps if monitor.core.is_sampled(i)]
    result = {"on": statistics.fmean(on), "off": statistics.fmean(off), "ratio": statistics.fmean(on) / statistics.fmean(off),
              "unsampled_ratio": statistics.fmean(on_unsampled) / statistics.fmean(off) if on_unsampled else None,
              "hook_ms": hook_ms,
              "ordinary_step_hook_ms": (1000 * statistics.fmean(sum(monitor.hook_seconds[i].values()) for i in ordinary)
                                        if ordinary else None),
              "sampled_step_hook_ms": (1000 * statistics.fmean(sum(monitor.hook_seconds[i].values()) for i in sampled)
                                       if sampled else None)}
    if CUDA:
        unsampled = [monitor.syncs[i] for i in on_steps if i in monitor.syncs]
        result["syncs_per_unsampled_step"] = statistics.fmean(unsampled) if unsampled else float("nan")
    if count_graphs:
        result["graphs_with_monitor"] = _graphs() - graphs_before
        torch._dynamo.reset()
        before = _graphs()
        _fit(example, setup, min(steps, 60), [])
        result["graphs_without_monitor"] = _graphs() - before
    return result


class GradientReadTimer(pl.Callback):
    """Times reading every gradient once at the point where the monitor reads them (the
    Trainer's ``on_before_optimizer_step``, right after the backward), with no monitor."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = {"foreach_norm": [], "flat_norm": [], "first_float": [],
                                                "second_float": []}
        self._flat: torch.Tensor | None = None
        self._scalar = torch.ones(())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # noqa: ANN001
        # The same host read twice: on a CPU the first Python after the backward runs with the
        # caches the backward left cold; the second shows what the code itself costs.
        for name in ("first_float", "second_float"):
            start = time.perf_counter()
            float(self._scalar)
            self.seconds[name].append(time.perf_counter() - start)
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if self._flat is None:
            self._flat = torch.zeros(sum(g.numel() for g in grads), device=grads[0].device)
        sync = torch.cuda.synchronize if CUDA else (lambda: None)
        # alternate which read comes first: the second one finds the gradients warmer in cache
        reads = [("foreach_norm", lambda: torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))),
                 ("flat_norm", lambda: torch.linalg.vector_norm(self._flat))]
        for name, read in reads if trainer.global_step % 2 == 0 else reads[::-1]:
            sync()
            start = time.perf_counter()
            read()
            sync()
            self.seconds[name].append(time.perf_counter() - start)


def gradient_read_floor(example, setup: Setup, steps: int = 200) -> dict[str, float]:  # noqa: ANN001
    """What reading every gradient once costs in a training step, in ms: the floor under any
    per-step gradient norm.

    ``foreach_norm``: the monitor's fused per-parameter norms (``torch._foreach_norm``, then the
    norm of the norms); ``flat_norm``: one ``vector_norm`` over a single contiguous buffer of
    the same size (no per-tensor overhead at all). Both timed inside a ``Trainer.fit`` of
    ``steps`` steps without the monitor, where the monitor reads (after the backward, with the
    caches as the step leaves them); median over the steps after the first ten.
    """
    timer = GradientReadTimer()
    step_timer = StepTimer()
    _fit(example, setup, steps, [timer, step_timer])
    out = {name: 1000 * statistics.median(values[10:]) for name, values in timer.seconds.items()}
    out["step"] = 1000 * statistics.median(step_timer.times[10:])
    return out


def _peak_rss_child(name: str, steps: int, queue) -> None:  # noqa: ANN001
    """In a fresh process: train ``steps`` steps of the example with configuration ``name`` and report peak RSS."""
    example = load_example()
    setup = SETUPS.get(name, Setup("example", 50))
    callbacks = [] if name == "off" else [StabilityMonitor(verbose=False, **setup.monitor)]
    _fit(example, setup, steps, callbacks)
    queue.put(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # KiB -> MiB on Linux


def peak_rss(name: str, steps: int) -> float:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_rss_child, args=(name, steps, queue))
    proc.start()
    value = queue.get(timeout=600)
    proc.join()
    return value


def _median_ms(runs: list[dict[str, Any]], key: str) -> str:
    values = [res[key] for res in runs if res.get(key) is not None]
    return f"{statistics.median(values):.2f}" if values else "-"


def _fit_in(tree: str, name: str, steps: int, segment: int, warmup: int) -> dict[str, Any]:
    """One configuration's fit in a fresh process that imports stabmon from ``tree``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tree, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, __file__, f"--child={name}", f"--steps={steps}", f"--segment={segment}", f"--warmup={warmup}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"the fit of {name} with {tree} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if not result["stabmon"].startswith(str(Path(tree).resolve())):
        raise SystemExit(f"the fit of {name} imported stabmon from {result['stabmon']}, not from {tree}")
    return result


def compare_code(names: list[str], baseline: str, rounds: int, steps: int, segment: int, warmup: int) -> None:
    """The hooks' time per monitored step with this tree and with ``baseline``, alternating."""
    trees = {"this": str(ROOT), "baseline": str(Path(baseline).resolve())}
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {name: {"this": [], "baseline": []} for name in names}
    for r in range(rounds):
        for i, name in enumerate(names):
            order = ["this", "baseline"] if (r + i) % 2 == 0 else ["baseline", "this"]
            for which in order:
                res = _fit_in(trees[which], name, steps, segment, warmup)
                runs[name][which].append(res)
                print(f"round {r + 1}/{rounds} {name:22s} {which:8s} hooks {sum(res['hook_ms'].values()):.3f} ms/step, "
                      f"ordinary step {res['ordinary_step_hook_ms']:.3f} ms, step on/off {res['ratio']:.4f}", flush=True)
    rows = []
    for name in names:
        this, base = runs[name]["this"], runs[name]["baseline"]
        hooks = [sum(a["hook_ms"].values()) / sum(b["hook_ms"].values()) for a, b in zip(this, base)]
        ordinary = [a["ordinary_step_hook_ms"] / b["ordinary_step_hook_ms"] for a, b in zip(this, base)]
        rows.append([name, f"{statistics.median(sum(x['hook_ms'].values()) for x in this):.3f}",
                     f"{statistics.median(sum(x['hook_ms'].values()) for x in base):.3f}",
                     f"{statistics.median(hooks):.3f}", f"{min(hooks):.3f} .. {max(hooks):.3f}",
                     f"{statistics.median(ordinary):.3f}", f"{min(ordinary):.3f} .. {max(ordinary):.3f}",
                     f"{statistics.median(x['ratio'] for x in this):.3f} / {statistics.median(x['ratio'] for x in base):.3f}"])
    table = markdown_table(["config", "hooks ms/step, this", "hooks ms/step, baseline", "this / baseline (median)",
                            "range over rounds", "ordinary-step hooks, this / baseline", "range",
                            "step time on/off, this / baseline"], rows)
    print(table)
    info = machine()
    path = write_json("overhead_ab", {"machine": info, "baseline": trees["baseline"], "rounds": rounds, "steps": steps,
                                      "runs": runs, "table": table})
    print(f"\n{info['device']}, {info['date']}; JSON in {path}")


def main(argv: list[str]) -> None:
    opts = parse_options(argv, __doc__, values=("rounds", "steps", "segment", "warmup", "only", "floor", "memory_steps",
                                                "baseline", "child"))
    rounds, steps = int(opts.get("rounds", 3)), int(opts.get("steps", 350))
    segment, warmup = int(opts.get("segment", 50)), int(opts.get("warmup", 2))
    names = opts["only"].split(",") if "only" in opts else list(SETUPS)
    unknown = sorted(set(names + ([opts["child"]] if "child" in opts else [])) - set(SETUPS))
    if unknown:
        raise SystemExit(f"--only: unknown configurations {unknown}; allowed: {', '.join(SETUPS)}")
    if "child" in opts:  # one fit, its result as JSON on the last line (for --baseline)
        import stabmon

        res = run_once(load_example(), SETUPS[opts["child"]], steps, segment, warmup, count_graphs=False)
        print(json.dumps({**res, "stabmon": str(Path(stabmon.__file__).resolve())}))
        return
    if "baseline" in opts:
        compare_code(names, opts["baseline"], rounds, steps, segment, warmup)
        return
    example = load_example()
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            res = run_once(example, SETUPS[name], steps, segment, warmup, count_graphs=r == 0)
            results[name].append(res)
            hooks = sum(res["hook_ms"].values())
            print(f"round {r + 1}/{rounds} {name:22s} on {1000 * res['on']:7.2f} ms/step, off {1000 * res['off']:7.2f}"
                  f" ms/step, ratio {res['ratio']:.4f}, hooks {hooks:.2f} ms/step", flush=True)
    floors = {}
    if opts.get("floor", "yes") != "no":
        for model in sorted({SETUPS[n].model for n in names}):
            floors[model] = gradient_read_floor(example, Setup(model, 50))
            f = floors[model]
            print(f"{model}: reading every gradient once where the monitor does (median in a fit without it): "
                  f"foreach_norm {f['foreach_norm']:.3f} ms, one flat buffer of the same size {f['flat_norm']:.3f} ms "
                  f"(step {f['step']:.1f} ms); float() of a scalar there: first {1000 * f['first_float']:.1f} us, "
                  f"second {1000 * f['second_float']:.1f} us", flush=True)
    memory_steps = int(opts.get("memory_steps", 40))
    rss_names = [n for n in names if SETUPS[n].model == "example"]
    rss = {name: peak_rss(name, memory_steps) for name in ["off", *rss_names]} if rss_names else {}
    if rss:
        print("peak RSS MiB:", {k: round(v) for k, v in rss.items()}, flush=True)

    rows, hook_rows = [], []
    for name in names:
        runs = results[name]
        ratios = [res["ratio"] for res in runs]
        off_ms = statistics.median(1000 * res["off"] for res in runs)
        hook_ms = {h: statistics.median(res["hook_ms"][h] for res in runs) for h in HOOKS}
        total = sum(hook_ms.values())
        extra = []
        if CUDA:
            extra.append(f"{statistics.median(res['syncs_per_unsampled_step'] for res in runs):.2f}")
        if SETUPS[name].compiled:
            extra.append(f"{runs[0]['graphs_with_monitor']} vs {runs[0]['graphs_without_monitor']}")
        rows.append([name, f"{statistics.median(ratios):.3f}", f"{min(ratios):.3f} .. {max(ratios):.3f}",
                     f"{statistics.median(res['unsampled_ratio'] for res in runs):.3f}"
                     if runs[0]["unsampled_ratio"] is not None else "- (every step sampled)", f"{off_ms:.1f}", f"{total:.2f}", f"{100 * total / off_ms:.2f}%",
                     _median_ms(runs, "ordinary_step_hook_ms"), _median_ms(runs, "sampled_step_hook_ms"),
                     f"{rss[name] / rss['off']:.3f}" if name in rss else "-", *(extra or [])])
        hook_rows.append([name, *(f"{hook_ms[h]:.3f}" for h in HOOKS), f"{total:.3f}"])
    headers = ["config", "step time on / off (median)", "range over rounds", "unsampled steps on / off",
               "ms/step off", "hooks ms/step",
               "hooks % of step", "hooks ms, ordinary step", "hooks ms, sampled step", "peak RSS on / off"]
    if CUDA:
        headers.append("syncs / unsampled step")
    if any(SETUPS[n].compiled for n in names):
        headers.append("graphs: monitor vs none")
        for row in rows:
            if len(row) < len(headers):
                row.append("-")
    table = markdown_table(headers, rows)
    hook_table = markdown_table(["config (ms per monitored step, median over rounds)", *HOOKS, "sum"], hook_rows)
    print(table)
    print()
    print(hook_table)
    info = machine()
    path = write_json("overhead", {"machine": info, "steps": steps, "segment": segment, "rounds": rounds,
                                   "results": results, "peak_rss_mib": rss, "table": table,
                                   "gradient_read_floor_ms": floors,
                                   "hook_table": hook_table})
    print(f"\n{info['device']}, {info['date']}; JSON in {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
