"""Attention- and logit-statistics kernels against plain torch, as ratios in one run.

    python benchmarks/kernels.py               # CPU: the blocked torch path vs naive torch
    python benchmarks/kernels.py --full        # CUDA: the paper shapes (L up to 16k, V = 128k)

Providers for attention statistics: ``stabmon`` (``stabmon.kernels.attention_stats``:
Triton on CUDA, the blocked torch path elsewhere), ``naive`` (scores, softmax, entropy
in torch: materialises the ``L x L`` matrix) and ``sdpa`` (the
``F.scaled_dot_product_attention`` forward that the monitor watches, for scale). For logit
statistics: ``stabmon`` vs ``three`` torch reductions (max, logsumexp, softmax entropy),
and its bandwidth (the logits read once) against a device-to-device copy of the same tensor
in the same run and, for the GPUs in ``HBM_PEAK``, against the data-sheet HBM bandwidth.
Times are the median of ``triton.testing.do_bench`` on CUDA, else the best of 5 runs of
``--reps`` calls with the providers alternated; memory is the peak allocated during the
call (CUDA) or, on the CPU, the analytic size of the score and probability buffers (naive:
the full ``B*H*L*L`` matrix; stabmon: one block of at most 4M elements). Writes
``benchmarks/out/kernels.json``.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

from _common import machine, markdown_table, parse_options, write_json
from stabmon.kernels import attention_stats, logit_stats

CUDA = torch.cuda.is_available()


def naive_attention_stats(q, k, is_causal=True):
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    s = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    if is_causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    logp = torch.log_softmax(s, dim=-1)
    entropy = -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1)
    return entropy, s.amax(-1)


def three_reductions(x):
    x = x.float()
    logp = torch.log_softmax(x, -1)
    return torch.logsumexp(x, -1), x.amax(-1), -(logp.exp() * logp).sum(-1)


def timed(fn, reps: int) -> float:
    if CUDA:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100) / 1000
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


# Data-sheet HBM bandwidth by device name (bytes/s); the "device copy" column needs none.
HBM_PEAK = {"H200": 4.8e12, "H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12, "H100 NVL": 3.9e12, "A100-SXM4-80GB": 2.04e12,
            "A100-SXM4-40GB": 1.555e12, "A100-PCIE-40GB": 1.555e12, "A100 80GB PCIe": 1.935e12}


def hbm_peak_bytes_per_second() -> float | None:
    if not CUDA:
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in HBM_PEAK.items() if key in name), None)


def peak_bytes(fn) -> float:
    if not CUDA:
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def compare(providers: dict, reps: int, rounds: int) -> dict[str, float]:
    best = {name: float("inf") for name in providers}
    for r in range(rounds):  # alternate the order between rounds
        for name in list(providers)[:: 1 if r % 2 == 0 else -1]:
            best[name] = min(best[name], timed(providers[name], reps))
        if CUDA:
            break  # do_bench already repeats and takes the median
    return best


def main(argv: list[str]) -> None:
    full = "full" in parse_options(argv, __doc__, flags=("full",))
    device = "cuda" if CUDA else "cpu"
    dtype = torch.bfloat16 if CUDA else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    if CUDA or full:
        attn_shapes = [(8, 16, 16, L, D) for D in (64, 128) for L in (1024, 4096, 16384)] + [(8, 32, 8, 4096, 128)]
        logit_shapes = [(4096, 32768), (4096, 131072)]
    else:
        attn_shapes = [(4, 8, 8, 256, 64), (2, 8, 8, 1024, 64), (1, 8, 2, 2048, 64)]
        logit_shapes = [(1024, 4096), (512, 32768)]
    rows, results = [], []
    for b, h, hkv, L, d in attn_shapes:
        q = torch.randn(b, h, L, d, device=device, dtype=dtype, generator=gen)
        k = torch.randn(b, hkv, L, d, device=device, dtype=dtype, generator=gen)
        v = torch.randn_like(k)
        naive_bytes = 2 * b * h * L * L * 4  # scores + probabilities in fp32
        providers = {
            "stabmon": lambda: attention_stats(q, k, is_causal=True),
            "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=h != hkv),
        }
        if naive_bytes < (8 << 30 if CUDA else 2 << 30):
            providers["naive"] = lambda: naive_attention_stats(q, k)
        t = compare(providers, reps=3, rounds=5)
        mem = {name: peak_bytes(fn) for name, fn in providers.items()}
        res = {"shape": [b, h, hkv, L, d], "seconds": t, "peak_bytes": mem, "naive_bytes_analytic": naive_bytes}
        results.append(res)
        rows.append([f"B{b} H{h}/{hkv} L{L} D{d}", f"{1000 * t['stabmon']:.2f}",
                     f"{t['stabmon'] / t['sdpa']:.2f}",
                     f"{t['stabmon'] / t['naive']:.2f}" if "naive" in t else "(too big)",
                     f"{mem['stabmon'] / 2**20:.0f}" if CUDA else f"{min(b * h * L * L, 1 << 22) * 8 / 2**20:.0f}",
                     f"{mem['naive'] / 2**20:.0f}" if CUDA and "naive" in mem else f"{naive_bytes / 2**20:.0f}"])
        print(rows[-1], flush=True)
        q = k = v = None  # free the inputs before the next shape (the closures read these names)
    attn_table = markdown_table(["attention shape", "stabmon ms", "stabmon / SDPA fwd", "stabmon / naive",
                                 "stabmon MiB", "naive MiB"], rows)
    rows = []
    for n, vocab in logit_shapes:
        x = torch.randn(n, vocab, device=device, dtype=dtype, generator=gen) * 4
        copy = torch.empty_like(x)
        t = compare({"stabmon": lambda: logit_stats(x), "three": lambda: three_reductions(x),
                     "copy": lambda: copy.copy_(x)}, reps=3, rounds=5)
        logit_bytes = x.numel() * x.element_size()
        # the kernel reads the logits once: its bandwidth against a device copy's (read + write) in this run
        read_bw, copy_bw = logit_bytes / t["stabmon"], 2 * logit_bytes / t["copy"]
        spec = hbm_peak_bytes_per_second()
        results.append({"logits": [n, vocab], "seconds": t, "read_bytes_per_s": read_bw, "copy_bytes_per_s": copy_bw,
                        "hbm_peak_bytes_per_s": spec})
        rows.append([f"{n} x {vocab}", f"{1000 * t['stabmon']:.2f}", f"{1000 * t['three']:.2f}",
                     f"{t['three'] / t['stabmon']:.2f}", f"{read_bw / 1e9:.0f}", f"{read_bw / copy_bw:.0%}",
                     f"{read_bw / spec:.0%}" if spec else "-"])
        print(rows[-1], flush=True)
        x = copy = None
    logit_table = markdown_table(["logits", "stabmon ms", "three torch reductions ms", "speed-up", "stabmon GB/s",
                                  "of a device copy's GB/s", "of the HBM peak"], rows)
    print(attn_table)
    print()
    print(logit_table)
    info = machine()
    path = write_json("kernels", {"machine": info, "dtype": str(dtype), "results": results,
                                  "attention_table": attn_table, "logit_table": logit_table})
    print(f"\n{info['device']}, {info['date']}; JSON in {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
