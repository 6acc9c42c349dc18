import math

import pytest
import torch

from stabmon.kernels import logit_stats
from stabmon.kernels.logit_stats import logit_stats_chunked, logit_stats_reference
from tests.kernels._compare import assert_close_to_truth

ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def random_logits(shape, dtype, seed, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1,), (3, 1), (7, 5), (2, 9, 257), (4, 70_000)], ids=str)
@pytest.mark.parametrize("block", [None, 1000])
def test_matches_float64_reference(shape, dtype, block):
    x = random_logits(shape, dtype, seed=sum(shape))
    got = logit_stats_chunked(x, max_block_elements=block) if block else logit_stats(x)
    truth = logit_stats_reference(x.double())
    same = logit_stats_reference(x)
    for name in ("lse", "max_logit", "entropy"):
        g = getattr(got, name)
        assert g.dtype == torch.float32 and g.shape == x.shape[:-1]
        assert_close_to_truth(g, getattr(same, name), getattr(truth, name), ATOL[dtype] * max(1, math.log(shape[-1])),
                              f"{name} {shape} {dtype}")


def test_closed_forms():
    v = 1000
    uniform = logit_stats(torch.full((2, v), 7.0))
    torch.testing.assert_close(uniform.lse, torch.full((2,), 7.0 + math.log(v)))
    torch.testing.assert_close(uniform.entropy, torch.full((2,), math.log(v)))
    one_hot = logit_stats(torch.tensor([[0.0, 1e4, 0.0]]))
    assert one_hot.entropy.item() < 1e-30 and one_hot.max_logit.item() == 1e4  # terms below e^-80 are floored
    torch.testing.assert_close(one_hot.lse, torch.tensor([1e4]))


def test_large_logits_keep_precision():
    x = random_logits((16, 512), torch.float32, seed=1) + 1e4  # shift: lse and max move, entropy must not
    got = logit_stats(x)
    base = logit_stats_reference((x.double() - 1e4))
    torch.testing.assert_close(got.entropy.double(), base.entropy, atol=2e-4, rtol=0)


def test_non_finite_rows_give_nan_but_leave_other_rows_alone():
    x = random_logits((3, 10), torch.float32, seed=2)
    x[1, 4] = float("nan")
    got = logit_stats(x)
    assert torch.isnan(got.lse[1]) and torch.isfinite(got.lse[[0, 2]]).all()


@pytest.mark.parametrize("bad,match", [(torch.zeros(3, 0), "V >= 1"), (torch.zeros(3, 4, dtype=torch.long), "floating point")])
def test_bad_input_names_the_argument(bad, match):
    with pytest.raises(ValueError, match=f"`logits`.*{match}"):
        logit_stats(bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_row_means_in_blocks_match_float64(dtype):
    from stabmon.kernels.logit_stats import row_means

    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(3, 7, 53, generator=gen) * 30 - 40).to(dtype)
    exact = x.double().mean(dim=-1)
    got = row_means(x, max_block_elements=100)  # blocks of 1 row: every block boundary exercised
    assert got.shape == (3, 7) and got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.allclose(got.double(), exact, rtol=1e-6, atol=1e-5)
    assert torch.equal(row_means(x), row_means(x, max_block_elements=100))
