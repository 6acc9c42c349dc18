"""The Triton kernel against the float64 reference: on the CPU through Triton's
interpreter (TRITON_INTERPRET=1, set in conftest.py), on CUDA in the tests marked gpu."""

import os

import pytest
import torch

from stabmon.kernels import attention_stats
from stabmon.kernels.attention_stats import attention_stats_reference
from tests.kernels._compare import assert_close_to_truth
from tests.kernels.test_attention_stats import ATOL, masks, random_qk

triton = pytest.importorskip("triton")

from stabmon.kernels._attention_stats_triton import attention_stats_triton  # noqa: E402

interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")


def check_kernel(q, k, kwargs, device="cpu", what=""):
    dtype = q.dtype
    kw64 = {key: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for key, v in kwargs.items()}
    kw_lo = {key: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for key, v in kwargs.items()}
    truth = attention_stats_reference(q.double(), k.double(), **kw64)
    same = attention_stats_reference(q, k, **kw_lo)
    kw_dev = {key: (v.to(device) if isinstance(v, torch.Tensor) else v) for key, v in kwargs.items()}
    if device == "cpu":
        got = attention_stats_triton(q, k, **kw_dev)
    else:
        got = attention_stats(q.to(device), k.to(device), **kw_dev)
    got = type(got)(*(t.cpu() for t in got))
    assert got.entropy.dtype == torch.float32 and got.entropy.shape == q.shape[:3]
    assert not torch.isnan(got.entropy).any() and not torch.isnan(got.max_logit).any()
    assert torch.equal(torch.isneginf(got.max_logit), torch.isneginf(truth.max_logit)), "fully masked rows differ"
    assert_close_to_truth(got.entropy, same.entropy, truth.entropy, ATOL[dtype], f"entropy {what}")
    assert_close_to_truth(got.max_logit, same.max_logit, truth.max_logit, ATOL[dtype], f"max_logit {what}")
    return got, truth


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mask", ["none", "causal", "bool", "float", "float_inf"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1, 16), (2, 4, 2, 37, 300, 16), (1, 2, 1, 130, 70, 64)],
                         ids=lambda s: "x".join(map(str, s)))
def test_interpreted_kernel_matches_reference(shape, dtype, mask):
    b, h, hkv, lq, lk, d = shape
    q, k = random_qk(*shape, dtype=dtype, seed=lq + lk + d, magnitude=1.5)
    check_kernel(q, k, masks(b, h, lq, lk, seed=lq * lk)[mask], what=f"{shape} {dtype} {mask}")


@interpreted
@pytest.mark.parametrize("d", [16, 40, 128, 256])
def test_interpreted_head_dims(d):
    q, k = random_qk(1, 2, 1, 20, 33, d, torch.float16, seed=d)
    check_kernel(q, k, {"is_causal": True}, what=f"D={d}")


@interpreted
def test_interpreted_extreme_logits_and_fully_masked_rows():
    q, k = random_qk(1, 2, 2, 17, 40, 16, torch.float32, seed=3, magnitude=100.0)  # logits ~1e4
    mask = torch.ones(1, 2, 17, 40, dtype=torch.bool)
    mask[0, 0, 5] = False
    got, truth = check_kernel(q, k, {"attn_mask": mask}, what="1e4 logits")
    assert truth.max_logit[torch.isfinite(truth.max_logit)].abs().max() > 1e3
    assert got.entropy[0, 0, 5] == 0 and torch.isneginf(got.max_logit[0, 0, 5])


# -- CUDA --------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mask", ["none", "causal", "bool", "float", "float_inf"])
@pytest.mark.parametrize(
    "shape", [(1, 1, 1, 1, 1, 16), (2, 8, 2, 37, 1029, 64), (1, 4, 4, 300, 300, 128), (1, 2, 1, 100, 77, 256)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_cuda_kernel_matches_reference(shape, dtype, mask):
    b, h, hkv, lq, lk, d = shape
    q, k = random_qk(*shape, dtype=dtype, seed=lq + lk + d, magnitude=1.5)
    check_kernel(q, k, masks(b, h, lq, lk, seed=lq * lk)[mask], device="cuda", what=f"{shape} {dtype} {mask}")


@pytest.mark.gpu
def test_cuda_long_sequence_extreme_logits():
    q, k = random_qk(1, 4, 1, 4096, 4096, 64, torch.bfloat16, seed=11, magnitude=30.0)
    check_kernel(q, k, {"is_causal": True}, device="cuda", what="L=4096 bf16 1e3 logits")


@pytest.mark.gpu
def test_cuda_runs_the_compiled_kernels_not_the_interpreter():
    from stabmon.kernels import _attention_max_logit_triton, _attention_stats_triton, _logit_stats_triton

    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
    for module, name in ((_attention_stats_triton, "_attention_stats_kernel"),
                         (_attention_max_logit_triton, "_attention_max_logit_kernel"),
                         (_logit_stats_triton, "_logit_stats_kernel")):
        assert not module._INTERPRET if hasattr(module, "_INTERPRET") else True
        assert type(getattr(module, name)).__name__ == "JITFunction", name
