"""Every Triton kernel specialization compiles for sm_80 and sm_90 on this CPU-only machine,
within the shared memory of an A100 / H100 block and without a register spill."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

from stabmon.kernels._attention_stats_triton import CONFIGS  # noqa: E402
from stabmon.kernels._compile_report import SHARED_LIMIT, specializations  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def test_the_specializations_cover_every_dtype_mask_head_dim_group_and_config():
    specs = specializations()
    for arch in (80, 90):
        for kernel in ("attention_stats", "attention_max_logit"):
            mine = [dict(s.constexprs) | {"dtype": s.dtype, "warps": s.num_warps, "stages": s.num_stages}
                    for s in specs if s.arch == arch and s.kernel == kernel]
            assert {m["dtype"] for m in mine} == {"fp32", "fp16", "bf16"}
            assert {m["BLOCK_D"] for m in mine} == {64, 128, 256}
            assert {(m["IS_CAUSAL"], m["MASK_KIND"]) for m in mine} == {(True, 0), (False, 0), (False, 1), (False, 2)}
            assert {m["GROUPS"] for m in mine} == {1, 4}
        stats = {(dict(s.constexprs)["BLOCK_M"], dict(s.constexprs)["BLOCK_N"], s.num_warps, s.num_stages)
                 for s in specs if s.arch == arch and s.kernel == "attention_stats"}
        assert {cfg for cfgs in CONFIGS.values() for cfg in cfgs} <= stats  # every autotune config
        assert {s.dtype for s in specs if s.arch == arch and s.kernel == "logit_stats"} == {"fp32", "fp16", "bf16"}


@pytest.mark.slow
def test_every_specialization_compiles_for_sm80_and_sm90_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # compile for real, not from a cache
    out = tmp_path / "compile.json"
    proc = subprocess.run([sys.executable, "-m", "stabmon.kernels._compile_report", f"--out={out}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    reports = json.loads(out.read_text())["reports"] if out.exists() else []
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(reports) == len(specializations())
    for r in reports:
        assert r["registers"] > 0 and r["cubin_bytes"] > 0, r["name"]
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r["name"]
        assert r["shared"] <= SHARED_LIMIT[r["arch"]], r["name"]
