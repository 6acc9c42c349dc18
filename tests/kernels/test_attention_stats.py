import math

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from stabmon.kernels import attention_stats
from stabmon.kernels.attention_stats import attention_stats_chunked, attention_stats_reference
from tests.kernels._compare import assert_close_to_truth, max_abs_err

ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
SHAPES = [  # B, H, Hkv, Lq, Lk, D: single block, odd sizes, GQA, Lq != Lk, multi-block
    (1, 1, 1, 1, 1, 16),
    (2, 4, 2, 37, 129, 16),
    (1, 8, 2, 64, 300, 32),
    (2, 2, 1, 130, 70, 64),
]


def random_qk(b, h, hkv, lq, lk, d, dtype, seed, magnitude=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=gen, dtype=torch.float64) * magnitude
    k = torch.randn(b, hkv, lk, d, generator=gen, dtype=torch.float64) * magnitude
    return q.to(dtype), k.to(dtype)


def masks(b, h, lq, lk, seed):
    gen = torch.Generator().manual_seed(seed)
    return {
        "none": {},
        "causal": {"is_causal": True},
        "bool": {"attn_mask": torch.rand(b, 1, lq, lk, generator=gen) > 0.3},
        "float": {"attn_mask": torch.randn(lq, lk, generator=gen, dtype=torch.float64) * 2},
        "float_inf": {"attn_mask": torch.where(torch.rand(h, lq, lk, generator=gen) > 0.5, 0.0, float("-inf"))},
    }


def check(q, k, kwargs, *, block=None, what=""):
    dtype = q.dtype
    kw64 = {key: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for key, v in kwargs.items()}
    kw_lo = {key: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for key, v in kwargs.items()}
    truth = attention_stats_reference(q.double(), k.double(), **kw64)
    same = attention_stats_reference(q, k, **kw_lo)
    got = (attention_stats_chunked(q, k, max_block_elements=block, **kwargs) if block else attention_stats(q, k, **kwargs))
    assert got.entropy.dtype == got.max_logit.dtype == torch.float32
    assert got.entropy.shape == got.max_logit.shape == q.shape[:3]
    assert not torch.isnan(got.entropy).any() and not torch.isnan(got.max_logit).any()
    assert torch.equal(torch.isneginf(got.max_logit), torch.isneginf(truth.max_logit)), "fully masked rows differ"
    assert_close_to_truth(got.entropy, same.entropy, truth.entropy, ATOL[dtype], f"entropy {what}")
    assert_close_to_truth(got.max_logit, same.max_logit, truth.max_logit, ATOL[dtype], f"max_logit {what}")
    return got, truth


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask", ["none", "causal", "bool", "float", "float_inf"])
def test_chunked_matches_float64_reference(shape, dtype, mask):
    b, h, hkv, lq, lk, d = shape
    q, k = random_qk(*shape, dtype=dtype, seed=hash((shape, mask)) % 2**31, magnitude=1.5)
    kwargs = masks(b, h, lq, lk, seed=lq * lk)[mask]
    # A small block forces several query and key blocks (and the online rescaling).
    check(q, k, kwargs, block=1024, what=f"{shape} {dtype} {mask}")
    check(q, k, kwargs, what=f"{shape} {dtype} {mask} default blocks")


def test_relative_error_bounds_of_the_issue():
    # fp32 within 1e-3 relative, bf16 within 1e-2 relative, on a GQA causal case.
    for dtype, rel in ((torch.float32, 1e-3), (torch.bfloat16, 1e-2)):
        q, k = random_qk(2, 8, 2, 200, 200, 64, dtype, seed=5)
        got = attention_stats_chunked(q, k, is_causal=True, max_block_elements=4096)
        truth = attention_stats_reference(q.double(), k.double(), is_causal=True)
        live = truth.entropy > 0.1  # rows 0.. have entropy 0 exactly: relative error undefined
        rel_err = ((got.entropy.double() - truth.entropy).abs() / truth.entropy.abs())[live].max().item()
        assert rel_err < rel, (dtype, rel_err)
        rel_max = ((got.max_logit.double() - truth.max_logit).abs() / truth.max_logit.abs().clamp_min(1)).max().item()
        assert rel_max < rel, (dtype, rel_max)


@pytest.mark.parametrize("magnitude", [30.0, 100.0])
def test_extreme_logits_stay_finite_and_accurate(magnitude):
    # q.k / sqrt(D) ~ magnitude^2: about 1e3 and 1e4.
    q, k = random_qk(1, 2, 2, 33, 257, 16, torch.float32, seed=3, magnitude=magnitude)
    got, truth = check(q, k, {}, block=512, what=f"magnitude {magnitude}")
    assert truth.max_logit.abs().max() > magnitude**2 / 10
    assert max_abs_err(got.entropy, truth.entropy) < 1e-3


def test_fully_masked_rows_are_zero_entropy_and_minus_inf_logit():
    q, k = random_qk(1, 2, 1, 5, 7, 8, torch.float32, seed=1)
    mask = torch.ones(1, 2, 5, 7, dtype=torch.bool)
    mask[0, 1, 2] = False  # one row of head 1 sees no key
    got = attention_stats(q, k, attn_mask=mask)
    assert got.entropy[0, 1, 2] == 0 and torch.isneginf(got.max_logit[0, 1, 2])
    assert torch.isfinite(got.entropy).all()
    assert torch.isfinite(got.max_logit[0, 0]).all()


def test_uniform_attention_has_entropy_log_n():
    q = torch.zeros(1, 1, 4, 8)
    k = torch.randn(1, 1, 10, 8)
    got = attention_stats(q, k, is_causal=True)  # row i sees i + 1 keys, all with score 0
    expected = torch.log(torch.arange(1, 5, dtype=torch.float32))
    torch.testing.assert_close(got.entropy[0, 0], expected, atol=1e-6, rtol=0)


def test_matches_sdpa_scale_and_gqa_semantics():
    # The same call as SDPA with enable_gqa and a custom scale: the attention output computed
    # from our max logit and an explicit softmax must equal SDPA's output.
    q, k = random_qk(2, 6, 3, 9, 11, 8, torch.float64, seed=2)
    v = torch.randn(2, 3, 11, 8, dtype=torch.float64)
    scale = 0.37
    out = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True, is_causal=True)
    kf = k.repeat_interleave(2, dim=1)
    s = (q @ kf.transpose(-1, -2)) * scale
    s = s.masked_fill(~torch.ones(9, 11, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(torch.softmax(s, -1) @ v.repeat_interleave(2, dim=1), out)
    got = attention_stats(q, k, is_causal=True, scale=scale)
    torch.testing.assert_close(got.max_logit.double(), s.amax(-1), atol=1e-5, rtol=1e-5)
    p = torch.softmax(s, -1)
    entropy = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)
    torch.testing.assert_close(got.entropy.double(), entropy, atol=1e-5, rtol=1e-5)


class _LargestTensor(TorchFunctionMode):
    """Records the largest tensor any torch call returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            self.largest = max(self.largest, out.numel())
        return out


def test_never_builds_the_full_score_matrix_for_long_sequences():
    q, k = random_qk(1, 2, 1, 2048, 2048, 16, torch.float32, seed=4)
    budget = 1 << 18
    with _LargestTensor() as probe:
        attention_stats_chunked(q, k, is_causal=True, max_block_elements=budget)
    # the full score matrix would hold 2 * 2048 * 2048 = 8.4M elements
    assert 0 < probe.largest <= budget


@pytest.mark.parametrize(
    "q_shape,k_shape,kwargs,match",
    [
        ((2, 4, 8), (2, 4, 8, 8), {}, "`q` must be a 4-d tensor"),
        ((1, 4, 8, 8), (1, 3, 8, 8), {}, r"multiple of the key heads \(3\)"),
        ((1, 4, 8, 8), (1, 4, 8, 16), {}, "`k` must have the batch size and head dim"),
        ((1, 4, 8, 8), (1, 4, 8, 8), {"attn_mask": torch.ones(3, 8, dtype=torch.bool)}, "does not broadcast"),
        ((1, 4, 8, 8), (1, 4, 8, 8), {"attn_mask": torch.ones(8, 8, dtype=torch.bool), "is_causal": True}, "cannot be combined"),
    ],
)
def test_bad_input_names_the_argument(q_shape, k_shape, kwargs, match):
    with pytest.raises(ValueError, match=match):
        attention_stats(torch.zeros(q_shape), torch.zeros(k_shape), **kwargs)


def test_entropy_is_in_nats_and_bounded_by_log_lk():
    q, k = random_qk(2, 3, 3, 16, 50, 8, torch.float32, seed=9)
    got = attention_stats(q, k)
    assert (got.entropy >= 0).all() and (got.entropy <= math.log(50) + 1e-5).all()
