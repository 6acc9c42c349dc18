"""What an armed QK-clip layer costs per step, as a ratio measured in one run.

    python benchmarks/qk_clip.py                  # about 3 CPU minutes
    python benchmarks/qk_clip.py --rounds=5 --steps=200
    python benchmarks/qk_clip.py --taus=40,60,80,120 --lrs=0.003,0.01,0.03   # the choice of tau, about 10 minutes

Method: the example GPT (4 attention layers) trains with the monitor at its defaults; its
layers are located at step 0 and then, in alternating blocks of ``--segment`` steps, all
four are armed (per-head max logit measured on every step with the max-only kernel,
heads above tau rescaled after every step; tau is set above every logit so that no weight
changes and both halves train the same model) or disarmed. Ratio = mean step time armed /
unarmed, median and range over rounds, plus the extra milliseconds per step and per armed
layer. On CUDA the same script times the Triton max-logit kernel. Writes
``benchmarks/out/qk_clip.json``.
"""

from __future__ import annotations

import statistics
import sys

import pytorch_lightning as pl
import torch

from _common import StepTimer, load_example, machine, markdown_table, parse_options, write_json
from stabmon import InterventionConfig, StabilityMonitor


class ArmingSwitch(pl.Callback):
    """Arms every located layer at the start of even blocks, disarms at odd ones."""

    def __init__(self, monitor: StabilityMonitor, segment: int) -> None:
        self.monitor, self.segment = monitor, segment

    def armed(self, step: int) -> bool:
        return (step // self.segment) % 2 == 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        clipper = self.monitor.core.responder.qk_clip
        step = trainer.global_step
        if step % self.segment or step == 0:
            return
        if self.armed(step):
            for site in list(clipper.located):
                clipper.arm(site, step)
        else:
            clipper.disarm_all()


def run_once(example, steps: int, segment: int, warmup: int) -> dict:
    cfg = example.Config(max_steps=steps, sharpness_every=0)
    pl.seed_everything(cfg.seed, verbose=False)
    train_loader, _ = example.make_data(cfg)
    # tau far above every logit: armed layers are measured and "clipped" by a factor of exactly 1
    monitor = StabilityMonitor(verbose=False, sharpness_every_n_steps=None,
                               intervention=InterventionConfig(qk_clip_tau=1e9))
    switch = ArmingSwitch(monitor, segment)
    timer = StepTimer()
    trainer = pl.Trainer(max_steps=steps, accelerator="auto", devices=1, callbacks=[monitor, switch, timer],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, gradient_clip_val=cfg.grad_clip)
    trainer.fit(example.GPTModule(cfg), train_loader)
    layers = len(monitor.core.responder.qk_clip.located)
    armed, plain = [], []
    for i, t in enumerate(timer.times, start=1):  # times[i - 1] is the step with global_step i
        if i % segment < warmup or i % monitor.sample_every_n_steps == 0:
            continue  # the switch itself and the sampled steps are left out of both halves
        (armed if switch.armed(i) else plain).append(t)
    return {"armed": statistics.fmean(armed), "unarmed": statistics.fmean(plain), "layers": layers,
            "ratio": statistics.fmean(armed) / statistics.fmean(plain)}


def kernel_table(device: str) -> tuple[str, list[dict]]:
    """The max-logit reduction against the full attention statistics and the SDPA forward."""
    import torch.nn.functional as F
    from _common import median

    from stabmon.kernels import attention_max_logit, attention_stats

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shapes = [(8, 16, 16, 1024, 64), (8, 16, 16, 4096, 128), (8, 32, 8, 4096, 128)] if device == "cuda" \
        else [(16, 4, 4, 128, 32), (4, 8, 8, 512, 64)]
    rows, out = [], []
    for b, h, hkv, length, d in shapes:
        gen = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(b, h, length, d, device=device, dtype=dtype, generator=gen)
        k = torch.randn(b, hkv, length, d, device=device, dtype=dtype, generator=gen)
        fns = {"max_logit": lambda: attention_max_logit(q, k, is_causal=True),
               "stats": lambda: attention_stats(q, k, is_causal=True),
               "sdpa": lambda: F.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=h != hkv)}
        if device == "cuda":
            from triton.testing import do_bench

            t = {name: do_bench(fn) / 1e3 for name, fn in fns.items()}
        else:
            import time

            t = {}
            for name, fn in fns.items():
                fn()
                samples = []
                for _ in range(7):
                    start = time.perf_counter()
                    fn()
                    samples.append(time.perf_counter() - start)
                t[name] = median(samples)
        out.append({"shape": [b, h, hkv, length, d], "seconds": t})
        rows.append([f"B{b} H{h}/{hkv} L{length} D{d}", f"{1000 * t['max_logit']:.2f}",
                     f"{t['max_logit'] / t['sdpa']:.2f}", f"{t['max_logit'] / t['stats']:.2f}"])
    return markdown_table(["shape (causal)", "max-logit ms", "max-logit / SDPA fwd", "max-logit / attention_stats"],
                          rows), out


def tau_sweep(example, taus: list[float], lrs: list[float], steps: int, seed: int) -> tuple[str, list[dict]]:  # noqa: ANN001
    """Final loss, head clips and max attention logit per (lr, tau): the runs of benchmarks/lr_sweep.py
    ("plain + stabmon") with other thresholds. A tau that clips a healthy run is too low."""
    from detection import run
    from lr_sweep import final

    rows, out = [], []
    for lr in lrs:
        for tau in taus:
            res = run(example, lr, steps, observe_only=False, seed=seed,
                      intervention=InterventionConfig(qk_clip_tau=tau))
            armed = [a["step"] for a in res["actions"] if a["name"] == "qk_clip"]
            out.append({"lr": lr, "tau": tau, "final": final(res), "val_loss": res["val_loss"],
                        "qk_clips": res["qk_clips"], "first_armed": min(armed) if armed else None,
                        "max_attention_logit": res["max_attention_logit"]})
            rows.append([f"{lr:g}", f"{tau:g}", f"{final(res):.3f}", int(res["qk_clips"]),
                         min(armed) if armed else "-", f"{res['max_attention_logit']:.3g}"])
            print(rows[-1], flush=True)
    return markdown_table(["lr", "tau", "final loss", "head clips", "first armed at step", "max attention logit"],
                          rows), out


def main(argv: list[str]) -> None:
    opts = parse_options(argv, __doc__, values=("taus", "lrs", "steps", "seed", "rounds", "segment", "warmup"))
    if "taus" in opts:  # the choice of the default tau
        taus = [float(x) for x in opts["taus"].split(",")]
        lrs = [float(x) for x in opts.get("lrs", "0.003,0.01,0.03").split(",")]
        table, runs = tau_sweep(load_example(), taus, lrs, int(opts.get("steps", 300)), int(opts.get("seed", 1338)))
        print(table)
        path = write_json("qk_clip_tau", {"machine": machine(), "taus": taus, "lrs": lrs, "runs": runs, "table": table})
        print(f"\nJSON in {path}")
        return
    rounds, steps = int(opts.get("rounds", 3)), int(opts.get("steps", 200))
    segment, warmup = int(opts.get("segment", 25)), int(opts.get("warmup", 2))
    example = load_example()
    results = []
    for r in range(rounds):
        res = run_once(example, steps, segment, warmup)
        results.append(res)
        print(f"round {r + 1}/{rounds}: armed {1000 * res['armed']:.2f} ms/step, unarmed {1000 * res['unarmed']:.2f}"
              f" ms/step, ratio {res['ratio']:.4f} ({res['layers']} layers)", flush=True)
    ratios = [res["ratio"] for res in results]
    extra = [1000 * (res["armed"] - res["unarmed"]) for res in results]
    layers = results[0]["layers"]
    table = markdown_table(
        ["device", "step armed / unarmed (median)", "range over rounds", "ms/step unarmed", "extra ms/step",
         "extra ms per armed layer"],
        [[machine()["device"], f"{statistics.median(ratios):.3f}", f"{min(ratios):.3f} .. {max(ratios):.3f}",
          f"{1000 * statistics.median(res['unarmed'] for res in results):.1f}", f"{statistics.median(extra):.2f}",
          f"{statistics.median(extra) / layers:.2f}"]])
    print(table)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ktable, kresults = kernel_table(device)
    print()
    print(ktable)
    info = machine()
    path = write_json("qk_clip", {"machine": info, "steps": steps, "segment": segment, "rounds": results,
                                  "table": table, "kernel_table": ktable, "kernels": kresults})
    print(f"\n{info['device']}, {info['date']}; JSON in {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
