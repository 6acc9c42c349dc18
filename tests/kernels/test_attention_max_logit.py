"""attention_max_logit (the max-only reduction QK-clip reads every armed step) against the
float64 reference: the torch path, the Triton kernel on the CPU interpreter, and on CUDA."""

import os

import pytest
import torch
import torch.nn.functional as F

from stabmon.kernels import attention_max_logit
from stabmon.kernels.attention_max_logit import attention_max_logit_chunked, attention_max_logit_reference
from tests.kernels._compare import assert_close_to_truth
from tests.kernels.test_attention_stats import ATOL, SHAPES, _LargestTensor, masks, random_qk

interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")


def check(q, k, kwargs, run, what=""):
    dtype = q.dtype
    kw64 = {key: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for key, v in kwargs.items()}
    kw_lo = {key: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for key, v in kwargs.items()}
    truth = attention_max_logit_reference(q.double(), k.double(), **kw64)
    same = attention_max_logit_reference(q, k, **kw_lo)
    got = run(q, k, **kwargs).cpu()
    assert got.dtype == torch.float32 and got.shape == q.shape[:3]
    assert not torch.isnan(got).any()
    assert torch.equal(torch.isneginf(got), torch.isneginf(truth)), "fully masked rows differ"
    assert_close_to_truth(got, same, truth, ATOL[dtype], f"max_logit {what}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask", ["none", "causal", "bool", "float", "float_inf"])
def test_torch_path_matches_float64_reference(shape, dtype, mask):
    b, h, hkv, lq, lk, d = shape
    q, k = random_qk(*shape, dtype=dtype, seed=hash((shape, mask, "max")) % 2**31, magnitude=1.5)
    kwargs = masks(b, h, lq, lk, seed=lq * lk + 1)[mask]
    check(q, k, kwargs, lambda q, k, **kw: attention_max_logit_chunked(q, k, max_block_elements=1024, **kw),
          what=f"{shape} {dtype} {mask} small blocks")
    check(q, k, kwargs, attention_max_logit, what=f"{shape} {dtype} {mask}")


def test_extreme_logits_and_fully_masked_rows():
    q, k = random_qk(1, 2, 1, 9, 30, 16, torch.float32, seed=4, magnitude=100.0)  # logits ~1e4
    mask = torch.ones(1, 2, 9, 30, dtype=torch.bool)
    mask[0, 1, 3] = False
    check(q, k, {"attn_mask": mask}, attention_max_logit, what="1e4 logits")
    assert torch.isneginf(attention_max_logit(q, k, attn_mask=mask)[0, 1, 3])


def test_same_as_the_max_logit_of_attention_stats_and_no_score_matrix():
    from stabmon.kernels import attention_stats

    q, k = random_qk(1, 2, 1, 2048, 2048, 16, torch.float32, seed=9)
    budget = 1 << 18
    with _LargestTensor() as probe:
        got = attention_max_logit_chunked(q, k, is_causal=True, max_block_elements=budget)
    assert 0 < probe.largest <= budget  # the full score matrix would hold 8.4M elements
    torch.testing.assert_close(got, attention_stats(q, k, is_causal=True).max_logit, rtol=1e-6, atol=1e-6)


def test_rejects_what_sdpa_rejects():
    q = torch.zeros(1, 3, 4, 8)
    with pytest.raises(ValueError, match="multiple of the key heads"):
        attention_max_logit(q, torch.zeros(1, 2, 4, 8))
    with pytest.raises(ValueError, match="cannot be combined"):
        attention_max_logit(q, q, attn_mask=torch.ones(4, 4, dtype=torch.bool), is_causal=True)
    assert F.scaled_dot_product_attention(q, q, q).shape == q.shape


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mask", ["none", "causal", "bool", "float_inf"])
def test_interpreted_kernel_matches_reference(dtype, mask):
    pytest.importorskip("triton")
    from stabmon.kernels._attention_max_logit_triton import attention_max_logit_triton

    b, h, hkv, lq, lk, d = 2, 4, 2, 37, 300, 16
    q, k = random_qk(b, h, hkv, lq, lk, d, dtype=dtype, seed=lq + lk, magnitude=1.5)
    check(q, k, masks(b, h, lq, lk, seed=7)[mask], attention_max_logit_triton, what=f"{dtype} {mask}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mask", ["none", "causal", "bool", "float", "float_inf"])
@pytest.mark.parametrize("shape", [(2, 8, 2, 37, 1029, 64), (1, 4, 4, 300, 300, 128), (1, 2, 1, 100, 77, 256)],
                         ids=lambda s: "x".join(map(str, s)))
def test_cuda_kernel_matches_reference(shape, dtype, mask):
    b, h, hkv, lq, lk, d = shape
    q, k = random_qk(*shape, dtype=dtype, seed=lq + lk + d, magnitude=1.5)
    kwargs = masks(b, h, lq, lk, seed=lq * lk)[mask]
    check(q, k, kwargs, lambda q, k, **kw: attention_max_logit(
        q.cuda(), k.cuda(), **{n: (v.cuda() if isinstance(v, torch.Tensor) else v) for n, v in kw.items()}),
        what=f"{shape} {dtype} {mask}")
