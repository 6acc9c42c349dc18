"""Sharpness estimates on the example GPT: Lanczos vs power iteration, and their cost.

    python benchmarks/sharpness.py            # about 3 CPU minutes

After ``--train_steps`` AdamW steps of the example model, on a held batch of
``--batch_size`` sequences: a converged reference (Lanczos, 100 products, tol 1e-6), then
for each method the Hessian-vector products and seconds until the estimate stays within
1% of the reference, and the cost of one estimate with the monitor's defaults
(``SharpnessConfig()``) relative to one training step of the example, both timed in this
run. Writes ``benchmarks/out/sharpness.json``.
"""

from __future__ import annotations

import sys
import time

import pytorch_lightning as pl
import torch

from _common import load_example, machine, markdown_table, parse_options, write_json
from stabmon import SharpnessConfig
from stabmon.curvature import hvp, top_eigenvalue
from stabmon.probes.sharpness import SharpnessProbe


def main(argv: list[str]) -> None:
    opts = parse_options(argv, __doc__, values=("train_steps", "batch_size"))
    train_steps, batch_size = int(opts.get("train_steps", 100)), int(opts.get("batch_size", 8))
    example = load_example()
    cfg = example.Config(max_steps=train_steps + 1)  # one batch more: the held batch
    pl.seed_everything(cfg.seed, verbose=False)
    loader, _ = example.make_data(cfg)
    module = example.GPTModule(cfg)
    opt = torch.optim.AdamW(module.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    batches = iter(loader)
    step_times = []
    for _ in range(train_steps):
        x, y = next(batches)
        t = time.perf_counter()
        loss = module.loss(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - t)
    step_time = sorted(step_times[10:])[len(step_times[10:]) // 2]
    x, y = next(batches)
    held = (x[:batch_size], y[:batch_size])
    params = [p for p in module.parameters() if p.requires_grad]

    def loss_fn():
        return module.loss(*held)

    print(f"trained {train_steps} steps ({1000 * step_time:.0f} ms/step median); reference estimate ...", flush=True)
    reference = top_eigenvalue(hvp(loss_fn, params), params, iters=100, tol=1e-6, seed=1)
    print(f"reference top eigenvalue {reference.value:.4f} ({reference.hvps} HVPs)", flush=True)

    rows, results = [], {}
    for method in ("lanczos", "power"):
        trace: list[tuple[int, float, float]] = []
        start = time.perf_counter()
        fn = hvp(loss_fn, params)
        top_eigenvalue(fn, params, iters=100, tol=1e-9, method=method, seed=2,
                       callback=lambda k, v: trace.append((k, v, time.perf_counter() - start)))
        within = [i for i, (_, v, _) in enumerate(trace) if abs(v - reference.value) <= 0.01 * abs(reference.value)]
        # first product after which every later estimate stays within 1%
        first = next((i for i in within if all(j in within for j in range(i, len(trace)))), None)
        k, value, seconds = trace[first] if first is not None else (float("nan"),) * 3
        results[method] = {"hvps_to_1pct": k, "seconds_to_1pct": seconds, "estimate": value, "trace": trace}
        rows.append([method, k, f"{seconds:.2f}", f"{value:.4f}", f"{seconds / step_time:.1f}"])
        print(f"{method}: within 1% after {k} HVPs, {seconds:.2f} s", flush=True)

    model = module
    config = SharpnessConfig()
    held = (x[: config.batch_size], y[: config.batch_size])  # the probe's own default held batch
    probe = SharpnessProbe(config)
    t = time.perf_counter()
    values = probe.measure(loss_fn, model, opt)
    default_seconds = time.perf_counter() - t
    default_reference = top_eigenvalue(hvp(loss_fn, params), params, iters=100, tol=1e-6, seed=1).value
    rel_err = abs(values["sharpness/top_eigenvalue"] - default_reference) / abs(default_reference)
    table = markdown_table(["method", "HVPs to 1%", "seconds to 1%", "estimate", "cost in training steps"], rows)
    default = (f"default probe (SharpnessConfig(): held batch of {config.batch_size}, top + Adam-preconditioned): "
               f"{values['sharpness/hvps']:.0f} HVPs, "
               f"{default_seconds:.2f} s = {default_seconds / step_time:.1f} training steps; "
               f"error of its top eigenvalue {100 * rel_err:.2f}%; "
               f"every {config.every_n_steps} steps that is "
               f"{100 * default_seconds / step_time / config.every_n_steps:.2f}% of training time")
    print(table)
    print(default)
    info = machine()
    path = write_json("sharpness", {"machine": info, "reference": reference.value, "reference_hvps": reference.hvps,
                                    "step_seconds": step_time, "methods": results, "default_probe": values,
                                    "default_seconds": default_seconds, "table": table, "default": default})
    print(f"\n{info['device']}, {info['date']}; JSON in {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
