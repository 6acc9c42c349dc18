"""Compile every Triton kernel specialization for sm_80 and sm_90, without a GPU.

    python -m stabmon.kernels._compile_report [--out=PATH.json] [--jobs=2] [--arch=80,90]

``triton.compile`` lowers each kernel to PTX and a cubin with the ``ptxas`` that ships in
the Triton wheel, so compile errors, shared-memory blow-ups and register spills show up on
a CPU-only machine, where the interpreter would never see them. For each specialization
it reports the shared memory the kernel asks for (Triton's metadata) and the registers and
spill bytes that ``ptxas -v`` printed during that compile.

The specializations are listed by ``specializations``. Must run without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

__all__ = ["Spec", "SHARED_LIMIT", "compile_spec", "specializations"]

# Largest dynamic shared memory per block (bytes): A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB.
SHARED_LIMIT = {80: 166912, 90: 232448}
_TORCH_NAMES = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}


@dataclass(frozen=True)
class Spec:
    kernel: str  # "attention_stats", "attention_max_logit" or "logit_stats"
    arch: int
    dtype: str
    constexprs: tuple[tuple[str, object], ...]
    num_warps: int
    num_stages: int

    @property
    def name(self) -> str:
        c = dict(self.constexprs)
        if self.kernel == "logit_stats":
            return f"{self.kernel} sm_{self.arch} {self.dtype} BLOCK_V={c['BLOCK_V']} w{self.num_warps}"
        mask = "causal" if c["IS_CAUSAL"] else ("none", "bool", "float")[c["MASK_KIND"]]
        return (f"{self.kernel} sm_{self.arch} {self.dtype} D={c['BLOCK_D']} {mask} G={c['GROUPS']} "
                f"{c['BLOCK_M']}x{c['BLOCK_N']} w{self.num_warps} s{self.num_stages}")


def _attention_spec(kernel: str, arch: int, dtype: str, d: int, mask: str, groups: int,
                    config: tuple[int, int, int, int] | None = None) -> Spec:
    from stabmon.kernels._attention_stats_triton import config_kind, configs_for

    mask_kind = {"none": 0, "causal": 0, "bool": 1, "float": 2}[mask]
    m, n, w, s = config or configs_for(config_kind(dtype == "fp32", mask_kind), d)[0]
    constexprs = dict(GROUPS=groups, IS_CAUSAL=mask == "causal", MASK_KIND=mask_kind, DOT_FP32=dtype == "fp32",
                      BLOCK_M=m, BLOCK_N=n, BLOCK_D=d)
    return Spec(kernel, arch, dtype, tuple(constexprs.items()), w, s)


def specializations(archs: tuple[int, ...] = (80, 90)) -> list[Spec]:
    """What the compile test covers, per architecture and attention kernel: every dtype at every
    head dim (causal); every mask kind at every head dim (bf16) and in fp32 / fp16 (head dim
    128); grouped-query attention in every dtype; and, for the attention-stats kernel, every
    other autotune config. Plus the logit kernel in every dtype at both block sizes."""
    from stabmon.kernels._attention_stats_triton import CONFIGS
    from stabmon.kernels._logit_stats_triton import launch_config

    specs: list[Spec] = []
    for arch in archs:
        for kernel in ("attention_stats", "attention_max_logit"):
            for d in (64, 128, 256):
                specs += [_attention_spec(kernel, arch, dtype, d, "causal", 1) for dtype in ("fp32", "fp16", "bf16")]
                specs += [_attention_spec(kernel, arch, "bf16", d, mask, 1) for mask in ("none", "bool", "float")]
            for dtype in ("fp32", "fp16"):
                specs += [_attention_spec(kernel, arch, dtype, 128, mask, 1) for mask in ("none", "bool", "float")]
            specs += [_attention_spec(kernel, arch, dtype, 128, "causal", 4) for dtype in ("fp32", "fp16", "bf16")]
            if kernel == "attention_stats":
                for (kind, d), configs in CONFIGS.items():
                    dtype, mask = {"lowp": ("bf16", "causal"), "masked": ("bf16", "float"),
                                   "fp32": ("fp32", "none")}[kind]
                    specs += [_attention_spec(kernel, arch, dtype, d, mask, 1, config) for config in configs[1:]]
        for dtype in ("fp32", "fp16", "bf16"):
            for v in (1000, 131072):
                block_v, warps = launch_config(v)
                specs.append(Spec("logit_stats", arch, dtype, (("BLOCK_V", block_v),), warps, 3))
    return list(dict.fromkeys(specs))


def _kernel_and_signature(spec: Spec):  # noqa: ANN202
    from stabmon.kernels import _attention_max_logit_triton, _attention_stats_triton, _logit_stats_triton

    fn = {"attention_stats": _attention_stats_triton._attention_stats_kernel,
          "attention_max_logit": _attention_max_logit_triton._attention_max_logit_kernel,
          "logit_stats": _logit_stats_triton._logit_stats_kernel}[spec.kernel]
    constexprs = dict(spec.constexprs)
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ("q_ptr", "k_ptr", "x_ptr"):
            signature[name] = f"*{_TORCH_NAMES[spec.dtype]}"
        elif name == "mask_ptr":
            signature[name] = "*u8" if constexprs["MASK_KIND"] == 1 else f"*{_TORCH_NAMES[spec.dtype]}"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32"
        elif name in ("scale", "qk_scale"):
            signature[name] = "fp32"
        else:  # strides and sizes: 32-bit, as Triton specializes them for tensors below 2^31 elements
            signature[name] = "i32"
    return fn, signature, constexprs


def _ptxas_numbers(text: str) -> dict[str, int]:
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return {"registers": int(regs.group(1)) if regs else -1,
            "spill_stores": int(spill.group(1)) if spill else -1,
            "spill_loads": int(spill.group(2)) if spill else -1}


def compile_spec(spec: Spec) -> dict[str, object]:
    """Compile one specialization; registers and spills from the ``ptxas -v`` log of that very
    compile (Triton prints it when ``knobs.nvidia.dump_ptxas_log`` is set)."""
    import contextlib
    import io

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    fn, signature, constexprs = _kernel_and_signature(spec)
    start = time.perf_counter()
    log = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", spec.arch, 32),
                                  options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    seconds = time.perf_counter() - start
    report = {"name": spec.name, **asdict(spec), "shared": int(compiled.metadata.shared),
              "cubin_bytes": len(compiled.asm["cubin"]), "seconds": round(seconds, 2)}
    report.update(_ptxas_numbers(log.getvalue()))
    return report


def main(argv: list[str]) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("run without TRITON_INTERPRET: the interpreter compiles nothing")
    opts = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    archs = tuple(int(a) for a in opts.get("arch", "80,90").split(","))
    specs = specializations(archs)
    jobs = int(opts.get("jobs", min(2, os.cpu_count() or 1)))
    print(f"compiling {len(specs)} kernel specializations for sm_{', sm_'.join(map(str, archs))} "
          f"({jobs} processes)", flush=True)
    start = time.perf_counter()
    with ProcessPoolExecutor(jobs) as pool:
        reports = []
        for i, report in enumerate(pool.map(compile_spec, specs), 1):
            reports.append(report)
            flag = "" if report["spill_stores"] == 0 and report["shared"] <= SHARED_LIMIT[report["arch"]] else "  <-- !"
            print(f"[{i:3d}/{len(specs)}] {report['name']:62s} shared {report['shared']:6d} B  "
                  f"regs {report['registers']:3d}  spills {report['spill_stores']}/{report['spill_loads']} B  "
                  f"{report['seconds']:.1f} s{flag}", flush=True)
    print(f"done in {time.perf_counter() - start:.0f} s", flush=True)
    if "out" in opts:
        with open(opts["out"], "w") as f:
            json.dump({"triton": __import__("triton").__version__, "reports": reports}, f, indent=1)
    bad = [r["name"] for r in reports if r["spill_stores"] != 0 or r["shared"] > SHARED_LIMIT[r["arch"]]]
    if bad:
        print("spills or shared memory over the limit:", *bad, sep="\n  ")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
