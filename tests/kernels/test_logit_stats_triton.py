"""The Triton logit kernel against the float64 reference (interpreter on CPU, CUDA when marked gpu)."""

import math
import os

import pytest
import torch

from stabmon.kernels import logit_stats
from stabmon.kernels.logit_stats import logit_stats_reference
from tests.kernels._compare import assert_close_to_truth
from tests.kernels.test_logit_stats import ATOL, random_logits

triton = pytest.importorskip("triton")

from stabmon.kernels._logit_stats_triton import logit_stats_triton  # noqa: E402

interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")


def check(x, device="cpu"):
    got = logit_stats_triton(x) if device == "cpu" else logit_stats(x.to(device))
    got = type(got)(*(t.cpu() for t in got))
    truth = logit_stats_reference(x.double())
    same = logit_stats_reference(x)
    for name in ("lse", "max_logit", "entropy"):
        g = getattr(got, name)
        assert g.dtype == torch.float32 and g.shape == x.shape[:-1]
        assert_close_to_truth(g, getattr(same, name), getattr(truth, name),
                              ATOL[x.dtype] * max(1, math.log(x.shape[-1])), f"{name} {tuple(x.shape)} {x.dtype}")


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1,), (3, 1), (2, 5, 257), (2, 40_000)], ids=str)
def test_interpreted_kernel_matches_reference(shape, dtype):
    check(random_logits(shape, dtype, seed=sum(shape)))


@interpreted
def test_interpreted_large_and_non_contiguous():
    x = random_logits((3, 64, 5), torch.float32, seed=1).transpose(1, 2) * 1000  # stride(-1) != 1, logits ~3e3
    check(x)
    y = torch.zeros(2, 4)
    y[1, 2] = float("nan")
    got = logit_stats_triton(y)
    assert math.isclose(got.entropy[0].item(), math.log(4), rel_tol=1e-6) and math.isnan(got.lse[1].item())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (64, 50_257), (8, 131_072), (2, 262_144)], ids=str)
def test_cuda_kernel_matches_reference(shape, dtype):
    check(random_logits(shape, dtype, seed=sum(shape), scale=8.0), device="cuda")
